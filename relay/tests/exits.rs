//! How `relay cdc` ends, as a supervisor sees it: the exit code and the message. Refusals that
//! protect events exit 3 (see `relay::exit`); a drain that cannot finish ends at
//! `shutdown.timeout`, or at once (130) on a second signal.

use crate::cdc::{insert_event, Harness};
use crate::support::kafka;
use crate::support::pg::TestDb;
use crate::support::process::{KafkaBroker, PgCluster, RelayProc};
use std::time::{Duration, Instant};

async fn system_id(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT system_identifier::text FROM pg_control_system()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The relay's checkpoint comes from another cluster (its slot and checkpoint names reused
/// against a different Postgres, whose slot is not past the checkpoint): refused with exit 3,
/// naming both system identifiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_of_another_cluster_is_refused() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    insert_event(&h.client().await, "s-1").await;
    h.run_until_caught_up().await;
    let checkpoint = h.last_checkpoint_end().await;

    let other = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    relay::migrate::run(&other.url("postgres"))
        .await
        .expect("migrate");
    let h2 = h.on(other.url("postgres"));
    h2.create_slot().await;
    let slot = h2.slot_confirmed().await;
    assert!(
        slot.0 <= checkpoint,
        "premise: the other cluster's slot ({slot}) is not past the checkpoint"
    );
    let log = h2.expect_refusal(3, "belongs to Postgres system");
    let (ours, theirs) = (
        system_id(&h.client().await).await,
        system_id(&h2.client().await).await,
    );
    assert_ne!(ours, theirs);
    for id in [&ours, &theirs] {
        assert!(log.contains(id.as_str()), "the refusal names {id}:\n{log}");
    }
    assert_eq!(h2.slot_confirmed().await, slot, "the slot was not moved");
}

/// A slot Postgres invalidated (`wal_status = lost`: it fell behind by more than
/// `max_slot_wal_keep_size`, here 1MB) while the relay was stopped: refused with exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_refused() {
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
    insert_event(&c, "l-1").await;
    h.run_until_caught_up().await;
    // WAL past the cap, then checkpoints, which invalidate the slot.
    h.invalidate_slot(&c).await;
    h.expect_refusal(3, "was invalidated (wal_status = lost)");
    drop(pg);
}

/// Waits until the relay's log contains `needle` (the relay must still be running).
async fn wait_for_log(relay: &mut RelayProc, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.log_text().contains(needle) {
        assert!(
            relay.try_status().is_none(),
            "the relay exited before logging {needle:?}:\n{}",
            relay.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `f` (stop, start again) on the broker off the async threads.
async fn with_broker(mut broker: KafkaBroker, f: fn(&mut KafkaBroker)) -> KafkaBroker {
    tokio::task::spawn_blocking(move || {
        f(&mut broker);
        broker
    })
    .await
    .unwrap()
}

/// Starts the relay with `shutdown.timeout = timeout`, lets it catch up, then stops the broker
/// and commits one more event (`agg`), so the relay holds a Kafka transaction it cannot commit.
async fn relay_stuck_on_a_stopped_broker(
    h: &Harness,
    broker: KafkaBroker,
    timeout: &str,
    agg: &str,
) -> (RelayProc, KafkaBroker, uuid::Uuid) {
    let mut env = h.env();
    env.set("RELAY_SHUTDOWN__TIMEOUT", timeout);
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    let broker = with_broker(broker, KafkaBroker::stop).await;
    let id = insert_event(&h.client().await, agg).await;
    // Time for the relay to read the row and start a commit that cannot finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    (relay, broker, id)
}

/// With the broker stopped, the drain after SIGTERM cannot commit. (1) It ends at
/// `shutdown.timeout` (2 s here): the relay says so and exits 0 well before the 20 s systemd
/// waits (`TimeoutStopSec`) before it resorts to SIGKILL. (2) With a long timeout, a second
/// signal ends it at once with exit 130. Neither loses or duplicates anything: with the broker
/// back, each event is in Kafka exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_that_cannot_finish_ends_at_the_timeout_or_a_second_signal() {
    let broker = tokio::task::spawn_blocking(KafkaBroker::start)
        .await
        .unwrap();
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), broker.bootstrap());
    h.create_slot().await;
    let first = insert_event(&h.client().await, "d-1").await;

    // (1) The shutdown timeout.
    let (mut relay, broker, second) =
        relay_stuck_on_a_stopped_broker(&h, broker, "2s", "d-2").await;
    let stopping = Instant::now();
    let st = relay
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit within 20 s:\n{}", relay.log_text()));
    eprintln!(
        "SIGTERM with the broker down, shutdown.timeout 2 s: exit {st} after {:?}",
        stopping.elapsed()
    );
    let log = relay.log_text();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("shutdown timed out"), "{log}");

    // (2) A second signal during a drain with a long timeout.
    let broker = with_broker(broker, KafkaBroker::start_again).await;
    let (mut relay, broker, third) =
        relay_stuck_on_a_stopped_broker(&h, broker, "300s", "d-3").await;
    relay.signal("TERM");
    wait_for_log(&mut relay, "shutdown requested").await;
    relay.signal("INT");
    let stopping = Instant::now();
    let st = relay
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit on the second signal:\n{}", relay.log_text()));
    eprintln!(
        "second signal, shutdown.timeout 300 s: exit {st} after {:?}",
        stopping.elapsed()
    );
    let log = relay.log_text();
    assert_eq!(st.code(), Some(130), "{log}");
    assert!(log.contains("second signal"), "{log}");

    let broker = with_broker(broker, KafkaBroker::start_again).await;
    h.run_until_caught_up().await;
    let copies = [
        h.copies_of(first).await,
        h.copies_of(second).await,
        h.copies_of(third).await,
    ];
    eprintln!("copies of the three events after both stops: {copies:?}");
    assert_eq!(copies, [1, 1, 1]);
    drop(broker);
}
