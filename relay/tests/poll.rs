//! `relay poll` against the real Postgres and Kafka: no row skipped when transactions commit out
//! of id order, exactly once under SIGKILL, and side by side with `relay cdc` on one outbox,
//! counted.

use crate::cdc::{
    assert_exactly_once, kill_repeatedly, sample, start_writers, stop_writers, Harness,
};
use crate::support::kafka::{self, Isolation};
use crate::support::outbox_load::{LoadState, Tally};
use crate::support::pg::TestDb;
use crate::support::process::{PgCluster, RelayEnv, RelayProc};
use crate::support::unique_name;
use std::time::{Duration, Instant};

/// One polling relay's names: the [`Harness`]'s topics, checkpoint topic and transactional id,
/// and its own `poll.name` (the checkpoint key is `poll/<name>`).
struct PollHarness {
    h: Harness,
    name: String,
}

impl PollHarness {
    fn new(db_url: String) -> PollHarness {
        PollHarness {
            h: Harness::new(db_url, kafka::bootstrap()),
            name: unique_name("poll"),
        }
    }

    fn env(&self) -> RelayEnv {
        let mut e = self.h.env();
        e.set("RELAY_POLL__NAME", &self.name)
            .set("RELAY_POLL__INTERVAL", "20ms")
            .set("RELAY_POLL__MAX_INTERVAL", "200ms")
            // Small batches: the LIMIT cuts the ordered rows short often, and the next poll
            // must go on exactly after the last row returned.
            .set("RELAY_POLL__BATCH_SIZE", "50")
            .set(
                "RELAY_LOG__LEVEL",
                "info,relay::poll=debug,relay::pipeline=debug",
            );
        e
    }

    fn spawn_with(&self, env: &RelayEnv) -> RelayProc {
        RelayProc::spawn(&["poll"], env)
    }

    fn spawn(&self) -> RelayProc {
        self.spawn_with(&self.env())
    }

    /// The cursor `(txid, id)` of this relay's last committed checkpoint, if any.
    async fn checkpoint_cursor(&self) -> Option<(u64, i64)> {
        let key = format!("poll/{}", self.name);
        let cps = kafka::read_all_from(
            &self.h.bootstrap,
            &self.h.checkpoint_topic,
            Isolation::ReadCommitted,
        )
        .await;
        let last = cps.iter().rev().find(|r| r.key_str() == key)?;
        let cp: serde_json::Value =
            serde_json::from_slice(last.value.as_deref().unwrap_or_default()).expect("JSON");
        Some((cp["poll_txid"].as_u64()?, cp["poll_id"].as_i64()?))
    }

    /// Waits until the last committed checkpoint's cursor is at the last row of the outbox in
    /// `(txid, id)` order, so every committed row is in Kafka. Call with the writers stopped.
    async fn wait_caught_up(&self, relay: &mut RelayProc, timeout: Duration) {
        let target: Option<(u64, i64)> = self
            .h
            .client()
            .await
            .query_opt(
                "SELECT txid::text, id FROM outbox ORDER BY txid DESC, id DESC LIMIT 1",
                &[],
            )
            .await
            .expect("last row")
            .map(|r| (r.get::<_, String>(0).parse().expect("a txid"), r.get(1)));
        let Some(target) = target else {
            return;
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = relay.try_status() {
                panic!(
                    "relay exited ({st}) before catching up:\n{}",
                    relay.log_text()
                );
            }
            if self.checkpoint_cursor().await.is_some_and(|c| c >= target) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not reach {target:?} in {timeout:?}:\n{}",
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until everything written is in Kafka, stops the relay with SIGTERM (exit 0), and
    /// counts this relay's topics against the outbox table.
    async fn settle(
        &self,
        relay: &mut RelayProc,
        state: &LoadState,
        logs: &[std::path::PathBuf],
    ) -> Tally {
        self.wait_caught_up(relay, Duration::from_secs(120)).await;
        let st = relay
            .terminate(Duration::from_secs(20))
            .expect("relay exits on SIGTERM");
        assert!(st.success(), "graceful exit: {st}\n{}", relay.log_text());
        let t = self.h.tally(state).await;
        if t.lost + t.duplicates + t.out_of_order > 0 {
            for (i, log) in logs.iter().enumerate() {
                for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
                    if !line.contains("librdkafka") {
                        eprintln!("run {i}: {line}");
                    }
                }
            }
        }
        t
    }
}

/// The relay's poll query orders by the xid8 value, not by its text: with txids 9, 10, 99 and
/// 100 (set explicitly, ids in another order) and batches of 2, each poll goes on exactly after
/// the last row of the one before, and the four rows come once each, in `(txid, id)` order.
/// (Sorting by the text would put 100 before 9 and read rows twice; it did, at txid 10000.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_poll_query_orders_by_txid_as_a_number() {
    let db = TestDb::create().await;
    let cfg = relay::config::RelayConfig::load_from(
        None,
        [
            ("RELAY_POSTGRES__URL", db.url()),
            ("RELAY_KAFKA__BOOTSTRAP_SERVERS", kafka::bootstrap()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    )
    .expect("valid configuration");
    let settings = relay::poll::PollSettings::from_config(&cfg);
    let c = crate::support::pg::connect(&db.name).await;
    for txid in [100i64, 9, 10, 99] {
        c.execute(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, txid) \
             VALUES (gen_random_uuid(), 'order', 'a', 'Happened', '{}', $1::text::xid8)",
            &[&txid.to_string()],
        )
        .await
        .unwrap();
    }
    let poll = c
        .prepare(&settings.poll_sql("o.created_at"))
        .await
        .expect("the poll query prepares");
    let mut cursor = ("0".to_owned(), 0i64);
    let mut read = Vec::new();
    for _ in 0..3 {
        let rows = c
            .query(&poll, &[&cursor.0, &cursor.1, &2i64])
            .await
            .unwrap();
        for r in &rows {
            read.push((r.get::<_, String>(0), r.get::<_, i64>(1)));
        }
        if let Some(last) = rows.last() {
            cursor = (last.get(0), last.get(1));
        }
    }
    let txids: Vec<&str> = read.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(txids, ["9", "10", "99", "100"], "{read:?}");
}

/// The value of the sample `name_and_labels` on the relay's /metrics, or `None` while the
/// endpoint is not up yet.
async fn metric(env: &RelayEnv, name_and_labels: &str) -> Option<f64> {
    let listen = env
        .vars
        .iter()
        .find(|(k, _)| k == "RELAY_HTTP__LISTEN")
        .map(|(_, v)| v.clone())
        .expect("http.listen set");
    tokio::net::TcpStream::connect(&listen).await.ok()?;
    sample(&Harness::metrics(env).await, name_and_labels)
}

/// Rows the polling relay has committed to Kafka.
const POLL_ROWS: &str = r#"relay_events_total{kind="row",relay="poll"}"#;

/// Waits until `name_and_labels` reaches `at_least` (the relay must stay up meanwhile).
async fn wait_for_metric(
    env: &RelayEnv,
    relay: &mut RelayProc,
    name_and_labels: &str,
    at_least: f64,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(env, name_and_labels).await < Some(at_least) {
        if let Some(st) = relay.try_status() {
            panic!("relay exited ({st}):\n{}", relay.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{name_and_labels} below {at_least} after 30 s:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts one row for aggregate `agg` of type `order` with payload `{"seq": seq}`.
async fn insert(c: &impl tokio_postgres::GenericClient, agg: &str, seq: i64) {
    c.execute(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
         VALUES (gen_random_uuid(), 'order', $1, 'Happened', jsonb_build_object('seq', $2::int8))",
        &[&agg, &seq],
    )
    .await
    .expect("insert outbox row");
}

/// A transaction inserts rows and stays open while 20 later transactions, with higher ids,
/// commit, and the relay polls at least 10 times meanwhile: nothing at or past the open
/// transaction is delivered while it is open (an id cursor would have moved past its rows).
/// Once it commits, every row is delivered exactly once, in per-key commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_committing_out_of_id_order_is_not_skipped() {
    let db = TestDb::create().await;
    let p = PollHarness::new(db.url());
    let env = p.env();
    let mut relay = p.spawn_with(&env);

    // Written and committed before: delivered while the held transaction is open.
    let c = p.h.client().await;
    for seq in 1..=5 {
        insert(&c, "before", seq).await;
    }
    let mut held_client = p.h.client().await;
    let held = held_client.transaction().await.unwrap();
    for seq in 1..=3 {
        insert(&held, "held", seq).await;
    }
    // Later transactions, each on keys the held one does not write, commit with higher ids.
    for n in 0..20 {
        let agg = format!("later-{}", n % 4);
        insert(&c, &agg, i64::from(n / 4 + 1)).await;
    }
    // The relay is up once it has committed a row of those before; then it polls at least 10
    // times while the transaction is open.
    wait_for_metric(&env, &mut relay, POLL_ROWS, 1.0).await;
    let start = metric(&env, "relay_poll_queries_total")
        .await
        .unwrap_or(0.0);
    wait_for_metric(&env, &mut relay, "relay_poll_queries_total", start + 10.0).await;
    let topic = format!("{}.order", p.h.prefix);
    let delivered_while_open =
        kafka::read_all_from(&p.h.bootstrap, &topic, Isolation::ReadCommitted).await;
    assert!(
        delivered_while_open.iter().all(|r| r.key_str() == "before"),
        "nothing at or past the open transaction is delivered while it is open: {:?}",
        delivered_while_open
            .iter()
            .map(|r| (r.key_str(), r.header("txid").map(str::to_owned)))
            .collect::<Vec<_>>()
    );
    held.commit().await.unwrap();
    // The key goes on after the commit.
    insert(&c, "held", 4).await;

    // The held rows were inserted before the later ones: ids out of commit order.
    let row = c
        .query_one(
            "SELECT max(id) FILTER (WHERE aggregate_id = 'held' AND payload->>'seq' <> '4'), \
             min(id) FILTER (WHERE aggregate_id LIKE 'later-%') FROM outbox",
            &[],
        )
        .await
        .unwrap();
    let (held_max, later_min): (i64, i64) = (row.get(0), row.get(1));
    assert!(held_max < later_min, "{held_max} < {later_min}");

    let log = relay.log.clone();
    let t = p.settle(&mut relay, &LoadState::default(), &[log]).await;
    eprintln!("held transaction: {t:?}");
    assert_eq!(t.expected, 5 + 3 + 20 + 1, "{t:?}");
    assert_eq!(t.lost, 0, "{t:?}");
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(t.out_of_order, 0, "{t:?}");
    assert_eq!(t.delivered, t.expected, "{t:?}");
}

/// While writers commit, the polling relay is SIGKILLed at random moments 20 times and
/// restarted; a read_committed reader then finds every committed event exactly once, in
/// per-key order, and none that rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_exactly_once_across_sigkills() {
    let db = TestDb::create().await;
    let p = PollHarness::new(db.url());
    let (state, writers) = start_writers(&db.url(), 2);
    let mut logs = kill_repeatedly(20, 300..1800, || p.spawn()).await;
    stop_writers(&state, writers).await;
    let mut relay = p.spawn();
    logs.push(relay.log.clone());
    let t = p.settle(&mut relay, &state, &logs).await;
    assert_exactly_once(&t, "poll, 20 SIGKILLs");
}

/// `relay cdc` and `relay poll` on the same outbox at once, each to its own topics and
/// transactional id (and one checkpoint topic, keyed per relay): each namespace holds every
/// committed event exactly once, in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdc_and_poll_side_by_side_each_exactly_once() {
    let db = TestDb::create().await;
    let cdc = Harness::new(db.url(), kafka::bootstrap());
    let mut p = PollHarness::new(db.url());
    p.h.checkpoint_topic = cdc.checkpoint_topic.clone();
    assert_ne!(cdc.prefix, p.h.prefix);
    assert_ne!(cdc.txn_id, p.h.txn_id);
    cdc.create_slot().await;
    let mut cdc_relay = cdc.spawn();
    let mut poll_relay = p.spawn();
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_writers(&state, writers).await;

    let poll_log = poll_relay.log.clone();
    let cdc_log = cdc_relay.log.clone();
    let tp = p.settle(&mut poll_relay, &state, &[poll_log]).await;
    let tc = cdc
        .settle(&mut cdc_relay, Duration::from_secs(120), &state, &[cdc_log])
        .await;
    assert_exactly_once(&tp, "poll beside cdc");
    assert_exactly_once(&tc, "cdc beside poll");
    assert_eq!(tp.expected, tc.expected);
    // The relays' own checkpoints, under their own keys in the one topic.
    let cps = kafka::read_all_from(
        &cdc.bootstrap,
        &cdc.checkpoint_topic,
        Isolation::ReadCommitted,
    )
    .await;
    for key in [format!("cdc/{}", cdc.slot), format!("poll/{}", p.name)] {
        assert!(
            cps.iter().any(|r| r.key_str() == key),
            "no checkpoint under {key}"
        );
    }
}

/// The janitor (on, retention 0 s, batches of 7) deletes every delivered row, and only
/// delivered ones: the table ends empty, the deletes are counted, and every row is in Kafka
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_deletes_delivered_rows_in_small_batches_counted() {
    let db = TestDb::create().await;
    let p = PollHarness::new(db.url());
    let mut env = p.env();
    env.set("RELAY_POLL__JANITOR", "true")
        .set("RELAY_POLL__JANITOR_RETENTION", "0s")
        .set("RELAY_POLL__JANITOR_INTERVAL", "100ms")
        .set("RELAY_POLL__JANITOR_BATCH", "7");
    let mut relay = p.spawn_with(&env);
    let c = p.h.client().await;
    const ROWS: i64 = 200;
    for n in 0..ROWS {
        insert(&c, &format!("j-{}", n % 10), n / 10 + 1).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = c
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} rows left:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The counter moves just after the last DELETE commits.
    let deleted = || async {
        sample(
            &Harness::metrics(&env).await,
            "relay_janitor_deleted_rows_total",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while deleted().await != Some(ROWS as f64) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(deleted().await, Some(ROWS as f64));
    let st = relay
        .terminate(Duration::from_secs(20))
        .expect("relay exits on SIGTERM");
    assert!(st.success(), "{st}\n{}", relay.log_text());
    let records = kafka::read_all_from(
        &p.h.bootstrap,
        &format!("{}.order", p.h.prefix),
        Isolation::ReadCommitted,
    )
    .await;
    let ids: std::collections::HashSet<&str> = records
        .iter()
        .filter_map(|r| r.header("event_id"))
        .collect();
    assert_eq!(records.len() as i64, ROWS, "every row once");
    assert_eq!(ids.len() as i64, ROWS, "no row twice");
}

/// Postgres restarts twice under the polling relay (fast, then immediate: a crash) while writers
/// commit; nothing is lost, duplicated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_exactly_once_across_postgres_restarts() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = pg.url("postgres");
    relay::migrate::run(&url).await.expect("migrate");
    let p = PollHarness::new(url.clone());
    let mut relay = p.spawn();
    let (state, writers) = start_writers(&url, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut pg = pg;
    for mode in ["fast", "immediate"] {
        pg = tokio::task::spawn_blocking(move || {
            pg.restart(mode);
            pg
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop_writers(&state, writers).await;
    let log = relay.log.clone();
    let t = p.settle(&mut relay, &state, &[log]).await;
    assert_exactly_once(&t, "poll, Postgres restarts");
    let reconnects = relay
        .log_text()
        .matches("session ended; reconnecting")
        .count();
    assert!(reconnects >= 2, "the restarts ended sessions: {reconnects}");
    drop(pg);
}

/// With `poll.notify_channel`, a NOTIFY starts the next poll at once: polls are a minute apart,
/// yet each of three rows committed with a NOTIFY arrives well within that minute, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notify_wakes_the_poller() {
    let db = TestDb::create().await;
    let p = PollHarness::new(db.url());
    let mut env = p.env();
    env.set("RELAY_POLL__INTERVAL", "60s")
        .set("RELAY_POLL__MAX_INTERVAL", "60s")
        .set("RELAY_POLL__NOTIFY_CHANNEL", "outbox_wake");
    let mut relay = p.spawn_with(&env);
    // Rows are written once the relay has polled (and so listens): a row committed before the
    // LISTEN and kept above the horizon by another test's transaction would wait for the minute.
    wait_for_metric(&env, &mut relay, "relay_poll_queries_total", 1.0).await;
    let mut c = p.h.client().await;
    for seq in 1..=3 {
        let tx = c.transaction().await.unwrap();
        insert(&tx, "woken", seq).await;
        tx.batch_execute("NOTIFY outbox_wake").await.unwrap();
        tx.commit().await.unwrap();
        // Each row is in Kafka within 30 s, long before the minute-long pause is over: the
        // NOTIFY woke the poll.
        wait_for_metric(&env, &mut relay, POLL_ROWS, seq as f64).await;
    }
    let log = relay.log.clone();
    let t = p.settle(&mut relay, &LoadState::default(), &[log]).await;
    assert_eq!((t.expected, t.delivered, t.duplicates), (3, 3, 0), "{t:?}");
}
