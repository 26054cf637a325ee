//! The first start on an outbox that already holds rows: the relay publishes them from the
//! table (in a snapshot it records in its checkpoint) and streams the rest from the slot, each
//! row exactly once, also when it is killed in the middle of the backfill.

use crate::cdc::{start_writers, Harness};
use crate::support::kafka::{self, Isolation};
use crate::support::pg::TestDb;
use std::collections::HashMap;
use std::time::Duration;

/// Writers run before the relay's first start and across it: the rows committed before the slot
/// existed are backfilled, the later ones streamed, every row once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_start_publishes_the_rows_written_before_it_once() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    // No slot: the relay creates it on its first start, while the writers write.
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: i64 = h
        .client()
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(before > 0, "rows exist before the first start");
    let mut relay = h.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(120),
        "first start with writers running",
    )
    .await;
    let mut backfilled = 0;
    for topic in h.topics() {
        backfilled += kafka::read_all(&topic, Isolation::ReadCommitted)
            .await
            .iter()
            .filter(|r| r.header("replay") == Some("backfill"))
            .count() as i64;
    }
    assert!(
        backfilled >= before,
        "the {before} rows written before the start came from the backfill ({backfilled})"
    );
}

/// A relay killed in the middle of its backfill resumes it from the checkpointed cursor, with
/// the same snapshot: 50,000 rows written before the first start arrive once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_killed_midway_resumes_and_publishes_each_row_once() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    c.batch_execute(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
         SELECT gen_random_uuid(), 'order', 'o-' || (g % 50), 'Placed', \
                jsonb_build_object('seq', g, 'pad', repeat('x', 200)) \
         FROM generate_series(1, 50000) g",
    )
    .await
    .unwrap();
    let mut env = h.env();
    env.set("RELAY_BATCH__MAX_EVENTS", "1000");
    let mut relay = crate::support::process::RelayProc::spawn(&["cdc"], &env);
    // Kill it once part of the backfill is committed to Kafka (the relay's own counter, counted
    // at commit: reading a topic the relay is still creating can hit a partition without a
    // leader yet).
    let topic = format!("{}.order", h.prefix);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            std::time::Instant::now() < deadline,
            "no backfill progress:\n{}",
            relay.log_text()
        );
        // Not listening yet right after the spawn: ask again.
        let addr = Harness::http_listen(&env);
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            continue;
        }
        let m = Harness::metrics(&env).await;
        let n =
            crate::cdc::sample(&m, "relay_events_total{kind=\"row\",relay=\"cdc\"}").unwrap_or(0.0);
        if n > 0.0 {
            assert!(n < 50_000.0, "the backfill finished before the kill ({n})");
            break;
        }
    }
    relay.kill9();
    let mut relay = crate::support::process::RelayProc::spawn(&["cdc"], &env);
    // The slot's position says nothing about the backfill (the slot was made after the rows):
    // wait for the rows themselves, then for the stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while kafka::read_all(&topic, Isolation::ReadCommitted)
        .await
        .len()
        < 50_000
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the backfill did not finish:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{st}:\n{}", relay.log_text());
    let records = kafka::read_all(&topic, Isolation::ReadCommitted).await;
    let mut copies: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *copies
            .entry(r.header("event_id").unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let ids: Vec<String> = c
        .query("SELECT event_id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost = ids.iter().filter(|id| !copies.contains_key(*id)).count();
    let dup = copies.values().filter(|n| **n > 1).count();
    assert_eq!(
        (lost, dup, records.len()),
        (0, 0, 50_000),
        "lost, duplicated, records"
    );
    // Per key, the seq order of the rows is kept (the backfill publishes in id order).
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &records {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        if let Some(p) = last.insert(r.key_str(), seq) {
            assert!(seq > p, "key {} went from {p} to {seq}", r.key_str());
        }
    }
}

/// A slot invalidated for real (WAL past `max_slot_wal_keep_size` while the relay was stopped)
/// is refused (exit 3); `relay cdc --recover-lost-slot` then creates a new slot and publishes
/// from the table the rows of the gap, marked `replay: recovered`, without re-publishing what
/// the checkpoint's delivered snapshot proves delivered; later rows stream. Each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_recovered_from_the_table_without_loss() {
    use crate::cdc::insert_event;
    use crate::support::process::{PgCluster, RelayProc};
    let pg = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(|_| ("max_slot_wal_keep_size = 1MB\n".to_owned(), String::new()))
    })
    .await
    .unwrap();
    relay::migrate::run(&pg.url("postgres"))
        .await
        .expect("migrate");
    let h = Harness::new(pg.url("postgres"), kafka::bootstrap());
    h.create_slot().await;
    let c = h.client().await;
    let before = insert_event(&c, "r-1").await;
    // Long enough for heartbeats (1 s) after the row: the checkpoint records a snapshot that
    // proves it delivered.
    let mut relay = h.spawn();
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
    // The gap: rows committed while the relay is stopped, then WAL past the cap.
    let gap = [insert_event(&c, "r-2").await, insert_event(&c, "r-1").await];
    h.invalidate_slot(&c).await;
    h.expect_refusal(3, "was invalidated (wal_status = lost)");

    let mut env = h.env();
    env.set("RELAY_CDC__RECOVER_LOST_SLOT", "true");
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    let after = insert_event(&c, "r-2").await;
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    let log = relay.log_text();
    assert!(
        log.contains("lost slot recovery"),
        "the recovery is logged:\n{log}"
    );
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());

    let records = kafka::read_all(&format!("{}.order", h.prefix), Isolation::ReadCommitted).await;
    let count = |id: &uuid::Uuid| {
        records
            .iter()
            .filter(|r| r.header("event_id") == Some(id.to_string().as_str()))
            .count()
    };
    assert_eq!(count(&before), 1, "delivered before the loss, not again");
    for g in &gap {
        assert_eq!(count(g), 1, "the gap's row {g} recovered once");
        let r = records
            .iter()
            .find(|r| r.header("event_id") == Some(g.to_string().as_str()))
            .unwrap();
        assert_eq!(r.header("replay"), Some("recovered"));
    }
    assert_eq!(count(&after), 1, "streamed from the new slot");
    assert_eq!(records.len(), 4, "nothing else");
    drop(pg);
}
