//! `relay cdc` against the real Postgres and Kafka: exactly once under SIGKILL, Postgres restarts
//! and broker restarts, counted; graceful shutdown; zombie fencing.

use crate::support::kafka::{self, Isolation};
use crate::support::outbox_load::{self, LoadState, Tally, AGGREGATE_TYPES};
use crate::support::pg::TestDb;
use crate::support::process::{free_port, KafkaBroker, PgCluster, RelayEnv, RelayProc};
use crate::support::unique_name;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// One relay's names: its slot, topics, checkpoint topic and transactional id, all unique.
struct Harness {
    db_url: String,
    bootstrap: String,
    slot: String,
    prefix: String,
    checkpoint_topic: String,
    txn_id: String,
}

impl Harness {
    fn new(db_url: String, bootstrap: String) -> Harness {
        Harness {
            db_url,
            bootstrap,
            slot: unique_name("slot"),
            prefix: unique_name("ev"),
            checkpoint_topic: unique_name("cp"),
            txn_id: unique_name("txn"),
        }
    }

    fn env(&self) -> RelayEnv {
        let mut e = RelayEnv::default();
        e.set("RELAY_POSTGRES__URL", &self.db_url)
            .set("RELAY_KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap)
            .set("RELAY_KAFKA__CHECKPOINT_TOPIC", &self.checkpoint_topic)
            .set("RELAY_KAFKA__TRANSACTIONAL_ID", &self.txn_id)
            .set("RELAY_CDC__SLOT", &self.slot)
            .set("RELAY_CDC__HEARTBEAT_INTERVAL", "1s")
            .set("RELAY_CDC__STATUS_INTERVAL", "1s")
            .set(
                "RELAY_OUTBOX__TOPIC_TEMPLATE",
                format!("{}.{{aggregate_type}}", self.prefix),
            )
            .set("RELAY_OUTBOX__TOPIC_PARTITIONS", "3")
            .set("RELAY_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .set("RELAY_SHUTDOWN__TIMEOUT", "10s");
        e
    }

    fn spawn(&self) -> RelayProc {
        RelayProc::spawn(&["cdc"], &self.env())
    }

    fn topics(&self) -> Vec<String> {
        AGGREGATE_TYPES
            .iter()
            .map(|t| format!("{}.{t}", self.prefix))
            .collect()
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c
    }

    async fn create_slot(&self) {
        self.client()
            .await
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&self.slot],
            )
            .await
            .expect("create slot");
    }

    /// Waits until the slot is confirmed past everything written so far (heartbeats move it
    /// on once the outbox is quiet), so every committed event is in Kafka.
    async fn wait_caught_up(&self, relay: &mut RelayProc, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut target: Option<String> = None;
        loop {
            if let Some(st) = relay.try_status() {
                panic!(
                    "relay exited ({st}) before catching up:\n{}",
                    relay.log_text()
                );
            }
            let Ok(c) = tokio::time::timeout(Duration::from_secs(5), self.client()).await else {
                continue;
            };
            if target.is_none() {
                target = Some(
                    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
                        .await
                        .unwrap()
                        .get(0),
                );
            }
            let t = target.clone().unwrap_or_default();
            let done: Option<bool> = c
                .query_opt(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot, &t],
                )
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get(0));
            if done == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not catch up with {t} in {timeout:?}:\n{}",
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn tally(&self, state: &LoadState) -> Tally {
        let rolled_back = state.rolled_back.lock().unwrap().clone();
        outbox_load::tally(&self.db_url, &self.bootstrap, &self.topics(), &rolled_back).await
    }
}

fn start_writers(url: &str, n: u32) -> (LoadState, Vec<tokio::task::JoinHandle<()>>) {
    let state = LoadState::default();
    let handles = (0..n)
        .map(|w| {
            tokio::spawn(outbox_load::writer(
                url.to_owned(),
                w,
                state.clone(),
                Duration::from_millis(3),
            ))
        })
        .collect();
    (state, handles)
}

async fn stop_writers(state: &LoadState, handles: Vec<tokio::task::JoinHandle<()>>) {
    state.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
}

fn assert_exactly_once(t: &Tally, what: &str) {
    eprintln!("{what}: {t:?}");
    assert!(
        t.expected > 100,
        "{what}: the writers committed too little to prove anything: {t:?}"
    );
    assert_eq!(t.lost, 0, "{what}: events lost: {t:?}");
    assert_eq!(t.duplicates, 0, "{what}: events duplicated: {t:?}");
    assert_eq!(
        t.out_of_order, 0,
        "{what}: events out of per-key order: {t:?}"
    );
    assert_eq!(
        t.rolled_back_delivered, 0,
        "{what}: rolled-back events delivered: {t:?}"
    );
    assert_eq!(t.delivered, t.expected, "{what}: {t:?}");
}

/// While writers commit, the relay is SIGKILLed at random moments 20 times and restarted; a
/// read_committed reader then finds every committed event exactly once, in per-key order, and
/// none that rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_sigkills() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let (state, writers) = start_writers(&db.url(), 2);
    for i in 0..20 {
        let mut relay = h.spawn();
        let ms = 400 + rand::random::<u64>() % 2000;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if let Some(st) = relay.try_status() {
            panic!(
                "relay run {i} exited by itself ({st}):\n{}",
                relay.log_text()
            );
        }
        relay.kill9();
    }
    stop_writers(&state, writers).await;
    let mut relay = h.spawn();
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    let st = relay
        .terminate(Duration::from_secs(20))
        .expect("relay exits on SIGTERM");
    assert!(st.success(), "graceful exit: {st}");
    let t = h.tally(&state).await;
    assert_exactly_once(&t, "20 SIGKILLs");
}

/// SIGTERM finishes cleanly: exit 0, nothing lost, and the slot's confirmed LSN equals the end
/// LSN of the last checkpoint committed to Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_confirms_the_last_checkpoint() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let mut relay = h.spawn();
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Stop in the middle of the load: whatever is open is committed or aborted, never half.
    let st = relay
        .terminate(Duration::from_secs(20))
        .expect("relay exits within the timeout");
    assert!(st.success(), "exit status {st}:\n{}", relay.log_text());
    stop_writers(&state, writers).await;

    let checkpoints = kafka::read_all(&h.checkpoint_topic, Isolation::ReadCommitted).await;
    let last = checkpoints
        .last()
        .expect("at least one checkpoint committed");
    let cp: serde_json::Value = serde_json::from_slice(last.value.as_deref().unwrap()).unwrap();
    let end_lsn = cp["end_lsn"].as_u64().expect("end_lsn");
    let confirmed: String = h
        .client()
        .await
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&h.slot],
        )
        .await
        .unwrap()
        .get(0);
    let confirmed: relay::replication::Lsn = confirmed.parse().unwrap();
    assert_eq!(
        confirmed.0, end_lsn,
        "slot confirmed = last committed checkpoint"
    );

    // Everything committed after the stop is delivered by the next run, exactly once.
    let mut relay = h.spawn();
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
    assert_exactly_once(&h.tally(&state).await, "graceful shutdown");
}

/// Postgres restarts twice under the relay (fast, then immediate: a crash); nothing is lost or
/// duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_postgres_restarts() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = pg.url("postgres");
    relay::migrate::run(&url).await.expect("migrate");
    let h = Harness::new(url.clone(), kafka::bootstrap());
    h.create_slot().await;
    let mut relay = h.spawn();
    let (state, writers) = start_writers(&url, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart("fast");
        pg
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart("immediate");
        pg
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_writers(&state, writers).await;
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
    assert_exactly_once(&h.tally(&state).await, "Postgres restarts");
    drop(pg);
}

/// The Kafka broker restarts under the relay; nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_a_broker_restart() {
    let mut broker = tokio::task::spawn_blocking(KafkaBroker::start)
        .await
        .unwrap();
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), broker.bootstrap());
    h.create_slot().await;
    let mut relay = h.spawn();
    let (state, writers) = start_writers(&db.url(), 2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_writers(&state, writers).await;
    h.wait_caught_up(&mut relay, Duration::from_secs(180)).await;
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
    assert_exactly_once(&h.tally(&state).await, "broker restart");
    drop(broker);
}
