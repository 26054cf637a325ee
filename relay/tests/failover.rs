//! `relay cdc` after a failover: a real standby (`pg_basebackup -R`) promoted with `pg_ctl
//! promote`, so the relay's checkpoint was written on timeline 1 and the server it resumes on is
//! on timeline 2.
//!
//! Postgres 15 neither replicates logical slots to a standby nor creates them on one, so the
//! slot is carried over the way failover tooling does it before Postgres 17: its directory is
//! copied from the primary into the stopped standby, which loads it on start. The copy holds the
//! slot's state at the primary's last checkpoint, at or before the relay's checkpoint, so the
//! relay's slot rules (`SlotDropped`: no slot; `SlotAhead`: a slot past the checkpoint) let it
//! through and only the timeline check decides.

use crate::cdc::{insert_event, Harness};
use crate::support::kafka::{self, Isolation};
use crate::support::process::{PgCluster, RelayProc};
use relay::replication::conn::{ReplicationClient, ReplicationConfig};
use relay::replication::timeline::TimelineHistory;
use relay::replication::Lsn;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Runs a blocking cluster operation off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Waits until `standby` has replayed everything `primary` has written so far.
async fn wait_replayed(primary: &Client, standby: &PgCluster) {
    let target: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replayed: bool = connect(&standby.url("postgres"))
            .await
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        if replayed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not replay up to {target} in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A primary (migrated) with a streaming standby, and a relay harness on the primary with its
/// slot. The standby is made before the slot, so the standby's WAL covers the slot's whole life.
async fn primary_and_standby() -> (PgCluster, PgCluster, Harness) {
    let primary = blocking(PgCluster::start).await;
    relay::migrate::run(&primary.url("postgres"))
        .await
        .expect("migrate");
    let (primary, standby) = blocking(move || {
        let standby = primary.standby();
        (primary, standby)
    })
    .await;
    let h = Harness::new(primary.url("postgres"), kafka::bootstrap());
    h.create_slot().await;
    (primary, standby, h)
}

/// Carries the relay's slot over to the standby (stop it, copy the slot's directory as the
/// primary last checkpointed it, start it again) and waits until the standby has caught up.
async fn copy_slot(primary: PgCluster, standby: PgCluster, h: &Harness) -> (PgCluster, PgCluster) {
    let c = h.client().await;
    c.batch_execute("CHECKPOINT").await.unwrap();
    wait_replayed(&c, &standby).await;
    let slot = h.slot.clone();
    let (primary, standby) = blocking(move || {
        standby.stop_within("fast", 60).expect("standby stops");
        standby.copy_slot_from(&primary, &slot);
        standby.start_again();
        (primary, standby)
    })
    .await;
    wait_replayed(&c, &standby).await;
    (primary, standby)
}

/// A WAL-only event (no `event_id`: the relay derives one) of type `event_type`.
async fn emit_message(c: &Client, event_type: &str) {
    c.execute(
        "SELECT pg_logical_emit_message(true, 'outbox', $1::text)",
        &[
            &serde_json::json!({"aggregate_type": "order", "aggregate_id": event_type,
            "event_type": event_type, "payload": {"seq": 1}})
            .to_string(),
        ],
    )
    .await
    .unwrap();
}

/// `n` outbox rows for aggregates `<agg>-0..n`, one transaction each.
async fn insert_events(c: &Client, agg: &str, n: usize) -> Vec<uuid::Uuid> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(insert_event(c, &format!("{agg}-{i}")).await);
    }
    ids
}

/// Every committed record of the `order` topic, counted by event id.
async fn delivered(h: &Harness) -> (HashMap<String, usize>, Vec<kafka::Record>) {
    let records = kafka::read_all_from(
        &h.bootstrap,
        &format!("{}.order", h.prefix),
        Isolation::ReadCommitted,
    )
    .await;
    let mut counts = HashMap::new();
    for r in &records {
        *counts
            .entry(r.header("event_id").unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    (counts, records)
}

/// The last committed checkpoint, as JSON.
async fn last_checkpoint(h: &Harness) -> serde_json::Value {
    let cps =
        kafka::read_all_from(&h.bootstrap, &h.checkpoint_topic, Isolation::ReadCommitted).await;
    let last = cps.last().expect("a checkpoint");
    serde_json::from_slice(last.value.as_deref().unwrap_or_default()).expect("checkpoint JSON")
}

/// Where timeline 1 ended, read from the promoted server's `00000002.history` by SQL (not by the
/// relay's parser): the first field after the timeline on its first line.
async fn switchpoint(promoted: &Client) -> Lsn {
    let text: String = promoted
        .query_one("SELECT pg_read_file('pg_wal/00000002.history')", &[])
        .await
        .unwrap()
        .get(0);
    let line = text
        .lines()
        .find(|l| l.starts_with("1\t"))
        .expect("timeline 1 in the history");
    line.split('\t').nth(1).unwrap().parse().expect("an LSN")
}

/// The server's current timeline: the first eight hex digits of its current WAL file's name.
async fn timeline_of(c: &Client) -> u32 {
    let name: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    u32::from_str_radix(&name[..8], 16).expect("a timeline")
}

/// The checkpoint lies before the fork: events committed on timeline 1 after the checkpoint
/// (replicated to the standby before the promotion) and on timeline 2 after it are all relayed,
/// each exactly once, from the promoted standby; the next checkpoint records timeline 2; WAL
/// messages' derived event ids name the timeline that wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_before_the_fork_resumes_on_the_promoted_standby() {
    let (primary, standby, h) = primary_and_standby().await;
    let c = h.client().await;
    let before = insert_events(&c, "a", 20).await;
    h.run_until_caught_up().await;
    let cp = last_checkpoint(&h).await;
    assert_eq!(cp["timeline"], 1, "{cp}");
    // Committed on timeline 1 while the relay is stopped, and replicated: shared by both
    // timelines, past the checkpoint.
    let shared = insert_events(&c, "b", 20).await;
    emit_message(&c, "FromWalOnTimeline1").await;
    let (primary, standby) = copy_slot(primary, standby, &h).await;
    let standby = blocking(move || {
        standby.promote();
        standby
    })
    .await;
    let h2 = h.on(standby.url("postgres"));
    let c2 = h2.client().await;
    assert_eq!(timeline_of(&c2).await, 2, "the standby is on timeline 2");
    let fork = switchpoint(&c2).await;
    let cp_end = Lsn(cp["end_lsn"].as_u64().unwrap());
    assert!(
        cp_end <= fork,
        "premise: checkpoint {cp_end} at or before the fork {fork}"
    );
    assert!(
        h2.slot_confirmed().await <= cp_end,
        "premise: the copied slot is not past the checkpoint"
    );
    let after = insert_events(&c2, "c", 20).await;
    emit_message(&c2, "FromWalOnTimeline2").await;

    let mut relay = h2.spawn();
    h2.wait_caught_up(&mut relay, Duration::from_secs(120))
        .await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    let log = relay.log_text();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("resuming on the new timeline"),
        "the timeline check did not run:\n{log}"
    );

    let (counts, records) = delivered(&h2).await;
    let rows: Vec<&uuid::Uuid> = before.iter().chain(&shared).chain(&after).collect();
    let once = rows
        .iter()
        .filter(|id| counts.get(&id.to_string()) == Some(&1))
        .count();
    eprintln!(
        "failover before the fork: {once} of {} rows exactly once, {} records in all",
        rows.len(),
        records.len()
    );
    assert_eq!(
        once,
        rows.len(),
        "every row exactly once: {counts:?}\n{log}"
    );
    assert_eq!(
        records.len(),
        rows.len() + 2,
        "two WAL messages, nothing else, nothing twice"
    );
    let system_id: i64 = c2
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);
    // A derived id names the timeline that wrote the message: timeline 1 for the one in the
    // shared WAL (its id as on the old primary), timeline 2 for the one written after the fork.
    for (event_type, timeline) in [("FromWalOnTimeline1", 1), ("FromWalOnTimeline2", 2)] {
        let msg = records
            .iter()
            .find(|r| r.header("event_type") == Some(event_type))
            .expect("the WAL message is relayed");
        let lsn: Lsn = msg.header("lsn").unwrap().parse().unwrap();
        let want = relay::outbox::wal_event_id(system_id as u64, timeline, lsn.0);
        assert_eq!(
            msg.header("event_id"),
            Some(want.to_string().as_str()),
            "{event_type}: the id names timeline {timeline}"
        );
    }
    let cp = last_checkpoint(&h2).await;
    assert_eq!(
        cp["timeline"], 2,
        "the next checkpoint records timeline 2: {cp}"
    );
    drop(primary);
}

/// The checkpoint lies past the fork: the old primary went on (timeline 1) after the standby
/// was promoted, and the relay delivered from it. On the promoted standby, whose slot is at or
/// before the checkpoint, resuming at the checkpoint would skip what timeline 2 committed
/// between the fork and the checkpoint's LSN. The relay refuses with exit code 3, naming both
/// positions and both timelines, and delivers nothing of timeline 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_past_the_fork_is_refused() {
    let (primary, standby, h) = primary_and_standby().await;
    let c = h.client().await;
    insert_events(&c, "a", 5).await;
    h.run_until_caught_up().await;
    let (primary, standby) = copy_slot(primary, standby, &h).await;
    let standby = blocking(move || {
        standby.promote();
        standby
    })
    .await;
    // The old primary goes on, and the relay still follows it.
    insert_events(&c, "b", 5).await;
    h.run_until_caught_up().await;
    let cp = last_checkpoint(&h).await;
    let cp_end = Lsn(cp["end_lsn"].as_u64().unwrap());
    assert_eq!(cp["timeline"], 1);

    let h2 = h.on(standby.url("postgres"));
    let c2 = h2.client().await;
    let fork = switchpoint(&c2).await;
    assert!(
        cp_end > fork,
        "premise: checkpoint {cp_end} past the fork {fork}"
    );
    // The replication client's TIMELINE_HISTORY and the relay's parser agree with the file.
    let cfg = ReplicationConfig::from_url(&h2.db_url).unwrap();
    let mut client = ReplicationClient::connect(&cfg).await.unwrap();
    let file = client.timeline_history(2).await.unwrap();
    assert_eq!(file.filename, "00000002.history");
    let history = TimelineHistory::parse(&file.content).unwrap();
    assert_eq!(history.switchpoint(1), Some(fork));
    let none = client.timeline_history(1).await.unwrap_err();
    assert_eq!(
        none.sqlstate(),
        Some("58P01"),
        "timeline 1 has no history: {none}"
    );
    client.close().await;
    let slot = h2.slot_confirmed().await;
    assert!(
        slot <= cp_end,
        "premise: the slot ({slot}) is not past the checkpoint"
    );
    let lost = insert_events(&c2, "c", 5).await;

    let log = h2.expect_refusal(3, "forked from timeline 1 at");
    for part in [
        cp_end.to_string(),
        fork.to_string(),
        "timeline 1".to_owned(),
        "timeline 2".to_owned(),
    ] {
        assert!(log.contains(&part), "the refusal names {part}:\n{log}");
    }
    let (counts, _) = delivered(&h2).await;
    let relayed = lost
        .iter()
        .filter(|id| counts.contains_key(&id.to_string()))
        .count();
    assert_eq!(relayed, 0, "nothing of timeline 2 was relayed");
    assert_eq!(
        h2.slot_confirmed().await,
        slot,
        "the refusing relay did not move the slot"
    );

    // The RUNBOOK's recovery: reset-checkpoint records the decision on timeline 2 (what was
    // committed before it is re-published by the operator), and the relay runs again.
    let mut reset = RelayProc::spawn(&["reset-checkpoint"], &h2.env());
    let st = reset.wait_exit(Duration::from_secs(60)).expect("exits");
    assert!(st.success(), "{}", reset.log_text());
    assert_eq!(last_checkpoint(&h2).await["timeline"], 2);
    let later = insert_events(&c2, "d", 5).await;
    h2.run_until_caught_up().await;
    let (counts, _) = delivered(&h2).await;
    let once = later
        .iter()
        .filter(|id| counts.get(&id.to_string()) == Some(&1))
        .count();
    assert_eq!(
        once,
        later.len(),
        "after the reset, events are relayed once"
    );
    drop(primary);
}

/// A data directory copied back (a disk snapshot restored: same system identifier, same
/// timeline, the slot as it was) after the relay had read further: the server's WAL now ends
/// before the relay's checkpoint, and streaming from the checkpoint would skip what the server
/// commits anew up to it. The relay refuses with exit 3, naming the checkpoint, and relays
/// nothing of what was committed after the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_directory_copied_back_is_refused() {
    let pg = blocking(PgCluster::start).await;
    relay::migrate::run(&pg.url("postgres"))
        .await
        .expect("migrate");
    let h = Harness::new(pg.url("postgres"), kafka::bootstrap());
    h.create_slot().await;
    insert_events(&h.client().await, "a", 5).await;
    h.run_until_caught_up().await;
    let (pg, snapshot) = blocking(move || {
        pg.stop_within("fast", 60).expect("stops");
        let snapshot = pg.copy_data();
        pg.start_again();
        (pg, snapshot)
    })
    .await;
    insert_events(&h.client().await, "b", 50).await;
    h.run_until_caught_up().await;
    let cp = last_checkpoint(&h).await;
    let cp_end = Lsn(cp["end_lsn"].as_u64().unwrap());
    let pg = blocking(move || {
        pg.stop_within("fast", 60).expect("stops");
        pg.put_back_data(&snapshot);
        pg.start_again();
        pg
    })
    .await;
    let c = h.client().await;
    let lost = insert_events(&c, "c", 5).await;
    let end: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let end: Lsn = end.parse().unwrap();
    assert!(
        end < cp_end,
        "premise: the server ({end}) is behind the checkpoint ({cp_end})"
    );
    assert_eq!(timeline_of(&c).await, 1, "premise: no timeline switch");
    let slot = h.slot_confirmed().await;
    assert!(
        slot <= cp_end,
        "premise: the restored slot ({slot}) is not past the checkpoint"
    );

    let log = h.expect_refusal(3, "has lost WAL the relay had read");
    assert!(
        log.contains(&cp_end.to_string()),
        "the checkpoint is named:\n{log}"
    );
    let (counts, _) = delivered(&h).await;
    let relayed = lost
        .iter()
        .filter(|id| counts.contains_key(&id.to_string()))
        .count();
    assert_eq!(
        relayed, 0,
        "nothing committed after the restore was relayed"
    );
    drop(pg);
}
