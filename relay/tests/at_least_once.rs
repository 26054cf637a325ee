//! `relay cdc` with `delivery = "at_least_once"` against the real Postgres and Kafka: nothing is
//! lost, with or without SIGKILLs; duplicates after a kill are counted and printed (allowed).

use crate::cdc::{kill_repeatedly, start_writers, stop_writers, Harness};
use crate::routing::{
    by_event_id, create_small_topic, read_order_and_small, write_around_a_refused_record,
};
use crate::support::kafka::{self, Isolation};
use crate::support::outbox_load::Tally;
use crate::support::pg::TestDb;
use crate::support::process::RelayProc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn spawn(h: &Harness) -> RelayProc {
    let mut env = h.env();
    env.set("RELAY_DELIVERY", "at_least_once");
    RelayProc::spawn(&["cdc"], &env)
}

fn assert_nothing_lost(t: &Tally, what: &str) {
    eprintln!(
        "{what}: {} committed, {} delivered, {} lost, {} duplicates, {} out of per-key order",
        t.expected, t.delivered, t.lost, t.duplicates, t.out_of_order
    );
    assert!(
        t.expected > 100,
        "{what}: the writers committed too little to prove anything: {t:?}"
    );
    assert_eq!(t.lost, 0, "{what}: events lost: {t:?}");
    assert_eq!(
        t.rolled_back_delivered, 0,
        "{what}: rolled-back events delivered: {t:?}"
    );
    assert!(t.delivered >= t.expected, "{what}: {t:?}");
}

/// Without failures, every committed row arrives, once (the idempotent producer does not
/// duplicate on its own retries) and in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_relays_every_row() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let mut relay = spawn(&h);
    let (state, writers) = start_writers(&db.url(), 2);
    // Enough transactions to prove something, however loaded the machine is.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while state.committed_txns.load(Ordering::Relaxed) < 400 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_writers(&state, writers).await;
    let log = relay.log.clone();
    let t = h
        .settle(&mut relay, Duration::from_secs(120), &state, &[log])
        .await;
    assert_nothing_lost(&t, "at least once, no failure");
    assert_eq!(t.duplicates, 0, "no failure, no duplicate: {t:?}");
    assert_eq!(t.out_of_order, 0, "{t:?}");
    assert_eq!(t.delivered, t.expected, "{t:?}");
}

/// While writers commit, the at-least-once relay is SIGKILLed at random moments 12 times and
/// restarted: every committed event is in Kafka (0 lost); the tail that was delivered but not
/// yet checkpointed at a kill is delivered again (the duplicates are printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_loses_nothing_across_sigkills() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let (state, writers) = start_writers(&db.url(), 2);
    let mut logs = kill_repeatedly(12, 400..2400, || spawn(&h)).await;
    stop_writers(&state, writers).await;
    let mut relay = spawn(&h);
    logs.push(relay.log.clone());
    let t = h
        .settle(&mut relay, Duration::from_secs(120), &state, &logs)
        .await;
    assert_nothing_lost(&t, "at least once, 12 SIGKILLs");
}

/// The DLQ rerouting works without transactions too: a record the broker refuses for good fails
/// its batch once; on the replay it goes to the DLQ topic, and every other event is delivered
/// (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_sends_a_refused_record_to_the_dlq() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    create_small_topic(&h).await;
    h.create_slot().await;
    let mut relay = spawn(&h);
    let [before, refused, fits, after] = write_around_a_refused_record(&c).await;
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    let delivered = read_order_and_small(&h).await;
    let delivered = by_event_id(&delivered);
    for (what, id) in [("before", before), ("fits", fits), ("after", after)] {
        let n = delivered.get(&id.to_string()).map_or(0, Vec::len);
        eprintln!("event {what}: delivered {n} time(s)");
        assert!(n >= 1, "event {what} {id} lost:\n{}", relay.log_text());
    }
    assert!(!delivered.contains_key(&refused.to_string()));
    let dead = kafka::read_all(&format!("{}.dlq", h.prefix), Isolation::ReadCommitted).await;
    assert!(!dead.is_empty(), "the refused record is in the DLQ topic");
    assert!(
        dead.iter().all(
            |d| d.header("event_id") == Some(refused.to_string().as_str())
                && d.header("error_class") == Some("record_too_large")
        ),
        "{dead:?}"
    );
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
}
