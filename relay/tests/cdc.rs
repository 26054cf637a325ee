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
/// Shared with the other test modules (`slot_watch`).
pub(crate) struct Harness {
    pub(crate) db_url: String,
    pub(crate) bootstrap: String,
    pub(crate) slot: String,
    pub(crate) prefix: String,
    pub(crate) checkpoint_topic: String,
    pub(crate) txn_id: String,
}

impl Harness {
    pub(crate) fn new(db_url: String, bootstrap: String) -> Harness {
        Harness {
            db_url,
            bootstrap,
            slot: unique_name("slot"),
            prefix: unique_name("ev"),
            checkpoint_topic: unique_name("cp"),
            txn_id: unique_name("txn"),
        }
    }

    /// The same relay (slot, topics, checkpoint, transactional id) pointed at another database.
    pub(crate) fn on(&self, db_url: String) -> Harness {
        Harness {
            db_url,
            bootstrap: self.bootstrap.clone(),
            slot: self.slot.clone(),
            prefix: self.prefix.clone(),
            checkpoint_topic: self.checkpoint_topic.clone(),
            txn_id: self.txn_id.clone(),
        }
    }

    pub(crate) fn env(&self) -> RelayEnv {
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
            .set("RELAY_KAFKA__DLQ_TOPIC", format!("{}.dlq", self.prefix))
            .set("RELAY_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .set("RELAY_SHUTDOWN__TIMEOUT", "10s")
            // Every WAL transaction and Kafka commit is logged: a miss can be traced.
            .set(
                "RELAY_LOG__LEVEL",
                "info,relay::cdc=debug,relay::pipeline=debug",
            );
        e
    }

    pub(crate) fn spawn(&self) -> RelayProc {
        RelayProc::spawn(&["cdc"], &self.env())
    }

    /// The relay's /metrics text (its http.listen is in `env`).
    pub(crate) async fn metrics(env: &RelayEnv) -> String {
        Self::http_get(env, "/metrics").await
    }

    /// The relay's http.listen address (in `env`).
    pub(crate) fn http_listen(env: &RelayEnv) -> String {
        env.vars
            .iter()
            .find(|(k, _)| k == "RELAY_HTTP__LISTEN")
            .map(|(_, v)| v.clone())
            .expect("http.listen set")
    }

    /// The whole HTTP response (status line, headers, body) of GET `path` on the relay's
    /// http.listen (in `env`).
    pub(crate) async fn http_get(env: &RelayEnv, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = Self::http_listen(env);
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect to http.listen");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Writes WAL past a small `max_slot_wal_keep_size` and checkpoints until Postgres
    /// invalidates the slot (`wal_status = lost`), as it does to a stalled slot for real.
    pub(crate) async fn invalidate_slot(&self, c: &tokio_postgres::Client) {
        c.batch_execute("CREATE TABLE IF NOT EXISTS filler (x text)")
            .await
            .unwrap();
        let mut status = String::new();
        for _ in 0..10 {
            c.batch_execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000); \
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
            status = c
                .query_one(
                    "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
                .unwrap()
                .get(0);
            if status == "lost" {
                break;
            }
        }
        assert_eq!(status, "lost", "premise: Postgres invalidated the slot");
    }

    pub(crate) fn topics(&self) -> Vec<String> {
        AGGREGATE_TYPES
            .iter()
            .map(|t| format!("{}.{t}", self.prefix))
            .collect()
    }

    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.db_url, NoTls)
            .await
            .expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c
    }

    pub(crate) async fn create_slot(&self) {
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
    pub(crate) async fn wait_caught_up(&self, relay: &mut RelayProc, timeout: Duration) {
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

    /// The `end_lsn` of the last checkpoint committed to Kafka.
    pub(crate) async fn last_checkpoint_end(&self) -> u64 {
        let checkpoints = kafka::read_all_from(
            &self.bootstrap,
            &self.checkpoint_topic,
            Isolation::ReadCommitted,
        )
        .await;
        let last = checkpoints
            .last()
            .expect("at least one checkpoint committed");
        let cp: serde_json::Value =
            serde_json::from_slice(last.value.as_deref().unwrap_or_default()).expect("JSON");
        cp["end_lsn"].as_u64().expect("end_lsn")
    }

    /// The slot's `confirmed_flush_lsn`.
    pub(crate) async fn slot_confirmed(&self) -> relay::replication::Lsn {
        let confirmed: String = self
            .client()
            .await
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("slot")
            .get(0);
        confirmed.parse().expect("an LSN")
    }

    /// When a count is off, prints what the investigation needs: the relay logs (without
    /// librdkafka's lines) and every committed checkpoint.
    pub(crate) async fn explain(&self, t: &Tally, logs: &[std::path::PathBuf]) {
        if t.lost + t.duplicates + t.out_of_order == 0 {
            return;
        }
        for (i, log) in logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // librdkafka's own debug lines are noise here; its warnings and errors are not.
            for line in text
                .lines()
                .filter(|l| !(l.contains("librdkafka") && l.contains("\"DEBUG\"")))
            {
                eprintln!("run {i}: {line}");
            }
        }
        let cps = kafka::read_all_from(
            &self.bootstrap,
            &self.checkpoint_topic,
            Isolation::ReadCommitted,
        )
        .await;
        for c in cps {
            eprintln!("checkpoint @{}: {}", c.offset, c.value_str());
        }
        // Where the lost events are, if anywhere: under read_uncommitted a lost event found in
        // an event topic was produced in a transaction that did not commit (the relay confirmed
        // past it: a relay bug); not found at all, it was never produced; records in the DLQ
        // topic were rows the relay could not map.
        let mut topics = self.topics();
        topics.push(format!("{}.dlq", self.prefix));
        for topic in topics {
            let all =
                kafka::read_all_from(&self.bootstrap, &topic, Isolation::ReadUncommitted).await;
            if topic.ends_with(".dlq") && !all.is_empty() {
                eprintln!("{} record(s) in the DLQ topic {topic}", all.len());
            }
            for r in &all {
                let id = r
                    .header("event_id")
                    .and_then(|v| v.parse::<uuid::Uuid>().ok());
                if id.is_some_and(|id| t.lost_ids.contains(&id)) {
                    eprintln!(
                        "lost event {} is in {topic}/{}@{} under read_uncommitted (lsn {}, xid {})",
                        id.unwrap_or_default(),
                        r.partition,
                        r.offset,
                        r.header("lsn").unwrap_or("?"),
                        r.header("xid").unwrap_or("?"),
                    );
                }
            }
        }
        if let Ok(row) = self
            .client()
            .await
            .query_one(
                "SELECT confirmed_flush_lsn::text, restart_lsn::text, pg_current_wal_lsn()::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
        {
            eprintln!(
                "slot: confirmed_flush_lsn {}, restart_lsn {}; server at {}",
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2)
            );
        }
    }

    /// The end of every load test: wait until the relay has confirmed everything written, stop
    /// it with SIGTERM (it must exit 0), count, and explain any miss with `logs`.
    pub(crate) async fn settle(
        &self,
        relay: &mut RelayProc,
        timeout: Duration,
        state: &LoadState,
        logs: &[std::path::PathBuf],
    ) -> Tally {
        self.wait_caught_up(relay, timeout).await;
        let st = relay
            .terminate(Duration::from_secs(20))
            .expect("relay exits on SIGTERM");
        assert!(st.success(), "graceful exit: {st}\n{}", relay.log_text());
        let t = self.tally(state).await;
        self.explain(&t, logs).await;
        t
    }

    /// The end of a single-relay load test: stop the writers, settle, and assert that every
    /// committed event arrived exactly once, in per-key order.
    pub(crate) async fn finish(
        &self,
        relay: &mut RelayProc,
        state: &LoadState,
        writers: Vec<tokio::task::JoinHandle<()>>,
        timeout: Duration,
        what: &str,
    ) {
        stop_writers(state, writers).await;
        let log = relay.log.clone();
        let t = self.settle(relay, timeout, state, &[log]).await;
        assert_exactly_once(&t, what);
    }

    pub(crate) async fn tally(&self, state: &LoadState) -> Tally {
        let rolled_back = state.rolled_back.lock().unwrap().clone();
        outbox_load::tally(&self.db_url, &self.bootstrap, &self.topics(), &rolled_back).await
    }
}

pub(crate) fn start_writers(url: &str, n: u32) -> (LoadState, Vec<tokio::task::JoinHandle<()>>) {
    let state = LoadState::default();
    let handles = writers_on(url, 0..n, &state);
    (state, handles)
}

/// Writers with the ids `ids` (each owns its aggregates) counting into `state`.
fn writers_on(
    url: &str,
    ids: std::ops::Range<u32>,
    state: &LoadState,
) -> Vec<tokio::task::JoinHandle<()>> {
    state.stop.store(false, Ordering::Relaxed);
    ids.map(|w| {
        tokio::spawn(outbox_load::writer(
            url.to_owned(),
            w,
            state.clone(),
            Duration::from_millis(3),
        ))
    })
    .collect()
}

pub(crate) async fn stop_writers(state: &LoadState, handles: Vec<tokio::task::JoinHandle<()>>) {
    state.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
}

pub(crate) fn assert_exactly_once(t: &Tally, what: &str) {
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

/// Starts a relay with `spawn` and SIGKILLs it after a random time in `ms`, `n` times; each
/// run must still be running when killed. Returns the runs' logs.
pub(crate) async fn kill_repeatedly(
    n: usize,
    ms: std::ops::Range<u64>,
    spawn: impl Fn() -> RelayProc,
) -> Vec<std::path::PathBuf> {
    let mut logs = Vec::new();
    for i in 0..n {
        let mut relay = spawn();
        logs.push(relay.log.clone());
        let wait = ms.start + rand::random::<u64>() % (ms.end - ms.start);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if let Some(st) = relay.try_status() {
            panic!(
                "relay run {i} exited by itself ({st}):\n{}",
                relay.log_text()
            );
        }
        relay.kill9();
    }
    logs
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
    let mut logs = kill_repeatedly(20, 400..2400, || h.spawn()).await;
    stop_writers(&state, writers).await;
    let mut relay = h.spawn();
    logs.push(relay.log.clone());
    let t = h
        .settle(&mut relay, Duration::from_secs(120), &state, &logs)
        .await;
    assert_exactly_once(&t, "20 SIGKILLs");
}

/// The experimental wire client (`kafka.client = "wire"`) under the same SIGKILLs: from one run
/// to the next the relay alternates the wire client with transactions v2, the wire client with
/// transactions v1, and librdkafka (two producers in turn), so each must fence and settle what
/// the other left open. A read_committed reader then finds every committed event exactly once,
/// in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_sigkills_with_the_wire_client() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let (state, writers) = start_writers(&db.url(), 2);
    let run = std::cell::Cell::new(0usize);
    let spawn = || {
        let i = run.get();
        run.set(i + 1);
        let mut env = h.env();
        match i % 3 {
            0 => {
                env.set("RELAY_KAFKA__CLIENT", "wire");
            }
            1 => {
                env.set("RELAY_KAFKA__CLIENT", "wire")
                    .set("RELAY_KAFKA__WIRE_TRANSACTION_VERSION", "1");
            }
            _ => {}
        }
        RelayProc::spawn(&["cdc"], &env)
    };
    let mut logs = kill_repeatedly(12, 400..2400, spawn).await;
    stop_writers(&state, writers).await;
    let mut env = h.env();
    env.set("RELAY_KAFKA__CLIENT", "wire");
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    logs.push(relay.log.clone());
    let t = h
        .settle(&mut relay, Duration::from_secs(120), &state, &logs)
        .await;
    assert_exactly_once(
        &t,
        "12 SIGKILLs, wire client (v2, v1) and librdkafka in turn",
    );
    let text = relay.log_text();
    assert!(
        text.contains("Kafka wire client ready"),
        "the last run used the wire client:\n{text}"
    );
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

    let end_lsn = h.last_checkpoint_end().await;
    let confirmed = h.slot_confirmed().await;
    assert_eq!(
        confirmed.0, end_lsn,
        "slot confirmed = last committed checkpoint"
    );

    // Everything committed after the stop is delivered by the next run, exactly once.
    let mut relay = h.spawn();
    let log = relay.log.clone();
    let t = h
        .settle(&mut relay, Duration::from_secs(60), &state, &[log])
        .await;
    assert_exactly_once(&t, "graceful shutdown");
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
    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(120),
        "Postgres restarts",
    )
    .await;
    drop(pg);
}

/// A logical walsender ends only when its client has confirmed everything sent, so a relay that
/// never confirmed the shutdown's WAL would hold `pg_ctl stop -m fast` up (with heartbeats off,
/// indefinitely: its status updates keep the walsender from timing out). The relay, idle, records
/// the position in a checkpoint and confirms it: Postgres stops in time, the slot's confirmed LSN
/// is still the last checkpoint's, and after the restart nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fast_shutdown_is_not_held_up_by_an_idle_relay() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = pg.url("postgres");
    relay::migrate::run(&url).await.expect("migrate");
    let h = Harness::new(url.clone(), kafka::bootstrap());
    h.create_slot().await;
    let mut env = h.env();
    env.set("RELAY_CDC__HEARTBEAT_INTERVAL", "0s");
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let (state, writers) = start_writers(&url, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_writers(&state, writers).await;
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    // WAL the relay does not publish moves the walsender's position past the relay's last
    // transaction: at shutdown there is something to confirm that no event carries.
    h.client()
        .await
        .batch_execute(
            "CREATE TABLE not_published (x int); INSERT INTO not_published VALUES (1); CHECKPOINT;",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let stop_started = Instant::now();
    let (pg, stopped) = tokio::task::spawn_blocking(move || {
        let r = pg.stop_within("fast", 30);
        (pg, r)
    })
    .await
    .unwrap();
    eprintln!("pg_ctl stop -m fast took {:?}", stop_started.elapsed());
    if let Err(out) = &stopped {
        panic!(
            "pg_ctl stop -m fast did not finish in 30 s with the relay attached: {out}\n{}",
            relay.log_text()
        );
    }
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    let end_lsn = h.last_checkpoint_end().await;
    let confirmed = h.slot_confirmed().await;
    // Postgres 15 does not write a slot whose confirmed LSN alone moved at the shutdown
    // checkpoint, so after the restart it may be behind the relay's checkpoint (the relay drops
    // by LSN what it delivered); it must never be ahead of it.
    assert!(
        confirmed.0 <= end_lsn,
        "the slot ({confirmed}) is confirmed past the last checkpoint ({end_lsn})"
    );

    // The relay reconnects by itself; what is written now arrives too, exactly once.
    let writers = writers_on(&url, 2..4, &state);
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(120),
        "fast shutdown with an idle relay",
    )
    .await;
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
    h.finish(
        &mut relay,
        &state,
        writers,
        Duration::from_secs(180),
        "broker restart",
    )
    .await;
    drop(broker);
}

/// Inserts one outbox row for aggregate `agg` (payload `{"seq": 1}`); returns its event id.
pub(crate) async fn insert_event(c: &tokio_postgres::Client, agg: &str) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    c.execute(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, 'order', $2, 'Placed', '{\"seq\": 1}')",
        &[&id, &agg],
    )
    .await
    .expect("insert outbox row");
    id
}

impl Harness {
    /// How many records of the `order` topic carry `id` (read_committed).
    pub(crate) async fn copies_of(&self, id: uuid::Uuid) -> usize {
        kafka::read_all_from(
            &self.bootstrap,
            &format!("{}.order", self.prefix),
            Isolation::ReadCommitted,
        )
        .await
        .iter()
        .filter(|r| r.header("event_id") == Some(id.to_string().as_str()))
        .count()
    }

    /// Runs the relay until it has relayed what is committed, then stops it (exit 0).
    pub(crate) async fn run_until_caught_up(&self) {
        let mut relay = self.spawn();
        self.wait_caught_up(&mut relay, Duration::from_secs(60))
            .await;
        let st = relay.terminate(Duration::from_secs(20)).expect("exit");
        assert!(st.success(), "{}", relay.log_text());
    }

    /// Starts `relay cdc` and expects it to exit with `code` by itself, with a log containing
    /// `needle` (3: a refusal to protect events, 1: a failure a restart may cure; see
    /// `relay::exit`). Returns the log.
    pub(crate) fn expect_refusal(&self, code: i32, needle: &str) -> String {
        let mut relay = self.spawn();
        let st = relay
            .wait_exit(Duration::from_secs(60))
            .expect("the relay exits by itself");
        let log = relay.log_text();
        assert_eq!(st.code(), Some(code), "{log}");
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
        assert!(log.contains(&self.slot), "the slot is not named:\n{log}");
        log
    }
}

/// Protocol 2 under SIGKILLs: writers interleave large transactions that Postgres streams
/// before they commit (logical_decoding_work_mem 64kB) with small ones, and roll back to
/// savepoints inside committed transactions. Killed mid-stream, mid-commit and, with a small
/// stream memory budget, while replaying a spilled transaction: each committed row once, in
/// per-key order, and no row of a rolled-back savepoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_sigkills_under_protocol_2_with_streamed_and_savepoint_transactions() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            db.name
        ))
        .await
        .unwrap();
    h.create_slot().await;
    let mut env = h.env();
    env.set("RELAY_CDC__PROTO_VERSION", "2")
        // Streamed transactions past 1 MiB are spilled (a big one is about 1.3 MB), so kills
        // land during spill replay too.
        .set("RELAY_CDC__STREAM_MEMORY_BUDGET", "1048576");
    let state = LoadState::default();
    let shape = outbox_load::Shape {
        savepoints: true,
        big_every: 25,
        big_rows: 4_000,
    };
    let writers: Vec<_> = (0..2)
        .map(|w| {
            tokio::spawn(outbox_load::writer_shaped(
                db.url(),
                w,
                state.clone(),
                Duration::from_millis(3),
                shape,
            ))
        })
        .collect();
    let mut logs = Vec::new();
    for i in 0..12 {
        let mut relay = RelayProc::spawn(&["cdc"], &env);
        logs.push(relay.log.clone());
        let ms = 500 + rand::random::<u64>() % 2000;
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
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    logs.push(relay.log.clone());
    let t = h
        .settle(&mut relay, Duration::from_secs(180), &state, &logs)
        .await;
    assert!(
        !state.rolled_back.lock().unwrap().is_empty(),
        "premise: savepoints were rolled back"
    );
    assert_exactly_once(&t, "12 SIGKILLs under protocol 2");
}

/// A slot dropped while the relay was stopped: the relay refuses to start (exit 3, naming the
/// slot and its checkpoint) instead of creating a new slot that would begin after events it never
/// relayed. `relay reset-checkpoint` records the operator's decision; then the relay runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_slot_is_refused_until_the_checkpoint_is_reset() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let c = h.client().await;
    let first = insert_event(&c, "a-1").await;
    h.run_until_caught_up().await;

    c.execute("SELECT pg_drop_replication_slot($1)", &[&h.slot])
        .await
        .unwrap();
    insert_event(&c, "a-2").await;
    h.expect_refusal(
        3,
        "does not exist, but the relay's checkpoint in Kafka is at",
    );
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&h.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the refusing relay created a slot");

    let mut reset = RelayProc::spawn(&["reset-checkpoint"], &h.env());
    let st = reset.wait_exit(Duration::from_secs(60)).expect("exits");
    let out = reset.log_text();
    assert!(st.success(), "{out}");
    assert!(out.contains("created replication slot"), "{out}");
    assert!(out.contains("moved from"), "{out}");

    let after = insert_event(&c, "a-3").await;
    h.run_until_caught_up().await;
    assert_eq!(h.copies_of(first).await, 1);
    assert_eq!(
        h.copies_of(after).await,
        1,
        "the relay runs after the reset"
    );
}

/// A slot confirmed past the relay's checkpoint (here by `pg_replication_slot_advance`) is
/// refused: the events in between cannot be read from it any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_moved_past_the_checkpoint_is_refused() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let c = h.client().await;
    insert_event(&c, "m-1").await;
    h.run_until_caught_up().await;
    insert_event(&c, "m-2").await;
    c.execute(
        "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
        &[&h.slot],
    )
    .await
    .unwrap();
    h.expect_refusal(3, "past the relay's checkpoint in Kafka");
}

/// A slot of another output plugin is refused with a message naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_of_another_plugin_is_refused() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.client()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&h.slot],
        )
        .await
        .unwrap();
    h.expect_refusal(1, "uses the output plugin \\\"test_decoding\\\"");
}

impl Harness {
    /// Another reader streaming the slot: the stream and its server process id.
    pub(crate) async fn hold_slot(&self) -> (relay::replication::conn::ReplicationStream, i32) {
        use relay::replication::conn::{ReplicationClient, ReplicationConfig, StartOptions};
        let cfg = ReplicationConfig::from_url(&self.db_url).unwrap();
        let client = ReplicationClient::connect(&cfg).await.unwrap();
        let pid = client.backend_key().expect("backend key").process_id;
        let stream = client
            .start_replication(
                &self.slot,
                relay::replication::Lsn::INVALID,
                StartOptions::new(vec!["outbox_pub".into()]),
            )
            .await
            .unwrap();
        (stream, pid)
    }
}

/// A slot another reader holds: the relay says so and retries (it does not exit), then streams
/// once the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_in_use_is_waited_for() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let (holder, _) = h.hold_slot().await;
    let mut relay = h.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !relay.log_text().contains("is in use by process") {
        assert!(
            relay.try_status().is_none(),
            "exited:\n{}",
            relay.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no in-use message:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.finish().await.unwrap();
    let id = insert_event(&h.client().await, "u-1").await;
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;
    let st = relay.terminate(Duration::from_secs(20)).expect("exit");
    assert!(st.success(), "{}", relay.log_text());
    assert_eq!(h.copies_of(id).await, 1);
}

/// The value of a sample line `name{labels} value` in a metrics text, if present.
pub(crate) fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Debezium's column names, transactional logical messages as events, updates and deletes of
/// outbox rows ignored and counted, and a poison message sent to the DLQ topic (not dropped, not
/// blocking the rows after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debezium_columns_messages_ignored_changes_and_poison() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    c.batch_execute(
        "CREATE TABLE dbz_outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL); \
         CREATE PUBLICATION dbz_pub FOR TABLE dbz_outbox;",
    )
    .await
    .unwrap();
    h.create_slot().await;
    let dlq = unique_name("dlq");
    let mut env = h.env();
    env.set("RELAY_OUTBOX__TABLE", "public.dbz_outbox")
        .set("RELAY_OUTBOX__COLUMNS", "debezium")
        .set("RELAY_CDC__PUBLICATION", "dbz_pub")
        .set("RELAY_KAFKA__DLQ_TOPIC", &dlq);
    let mut relay = RelayProc::spawn(&["cdc"], &env);

    let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        c.execute(
            "INSERT INTO dbz_outbox VALUES ($1, 'order', $2, 'OrderPlaced', $3)",
            &[id, &format!("o-{i}"), &serde_json::json!({"seq": i + 1})],
        )
        .await
        .unwrap();
    }
    c.execute(
        "UPDATE dbz_outbox SET type = 'Changed' WHERE id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    c.execute("DELETE FROM dbz_outbox WHERE id = $1", &[&ids[1]])
        .await
        .unwrap();
    // A poison message first, then a good one in a later transaction: the good one still arrives.
    c.batch_execute("SELECT pg_logical_emit_message(true, 'outbox', 'not json at all')")
        .await
        .unwrap();
    let msg_id = uuid::Uuid::new_v4();
    c.execute(
        "SELECT pg_logical_emit_message(true, 'outbox', $1::text)",
        &[&serde_json::json!({"event_id": msg_id, "aggregate_type": "order", "aggregate_id": "o-9",
            "event_type": "FromWal", "payload": {"seq": 1}, "headers": {"trace": "t-1"}})
        .to_string()],
    )
    .await
    .unwrap();
    // Not transactional: not relayed (it could be re-sent after a restart), counted as ignored.
    c.batch_execute("SELECT pg_logical_emit_message(false, 'outbox', '{}')")
        .await
        .unwrap();
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;

    let events = kafka::read_all(&format!("{}.order", h.prefix), Isolation::ReadCommitted).await;
    let mut got: Vec<(String, String)> = events
        .iter()
        .map(|r| {
            (
                r.header("event_id").unwrap().to_owned(),
                r.header("event_type").unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.to_string(), "OrderPlaced".to_owned()))
        .chain([(msg_id.to_string(), "FromWal".to_owned())])
        .collect();
    want.sort();
    assert_eq!(
        got, want,
        "three rows (by Debezium column names) and one WAL message, once each"
    );
    let from_wal = events
        .iter()
        .find(|r| r.header("event_type") == Some("FromWal"))
        .unwrap();
    assert_eq!(from_wal.key_str(), "o-9");
    assert_eq!(from_wal.value_str(), r#"{"seq":1}"#);
    assert_eq!(from_wal.header("trace"), Some("t-1"));

    let dead = kafka::read_all(&dlq, Isolation::ReadCommitted).await;
    assert_eq!(dead.len(), 1, "the poison message is in the DLQ topic");
    assert_eq!(dead[0].value_str(), "not json at all");
    assert!(dead[0]
        .header("error")
        .is_some_and(|e| e.contains("not an outbox event")));

    let m = Harness::metrics(&env).await;
    assert_eq!(
        sample(&m, "relay_ignored_changes_total{kind=\"update\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "relay_ignored_changes_total{kind=\"delete\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "relay_ignored_changes_total{kind=\"non_transactional_message\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "relay_events_total{kind=\"row\",relay=\"cdc\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "relay_events_total{kind=\"message\",relay=\"cdc\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "relay_dlq_records_total{relay=\"cdc\"}"),
        Some(1.0),
        "the poison message is counted: {m}"
    );
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
}

/// `relay check-config` rejects a bad configuration naming each key and its problem (exit 2),
/// and accepts a good one (exit 0) without printing the password.
#[test]
fn check_config_names_the_key_and_the_problem() {
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("check-config")
        .env("RELAY_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .env("RELAY_BATCH__MAX_EVENTS", "0")
        .env("RELAY_CDC__SLOT", "Bad-Slot")
        .env("RELAY_KAFKA__BOOTSTRAP_SERVER", "typo")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    for key in [
        "postgres.url",
        "batch.max_events",
        "cdc.slot",
        "kafka.bootstrap_server",
    ] {
        assert!(err.contains(key), "the error names {key}: {err}");
    }

    let good = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("check-config")
        .env(
            "RELAY_POSTGRES__URL",
            "postgres://relay:s3cret-pw@127.0.0.1:5432/app",
        )
        .env("RELAY_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&good.stdout),
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(good.status.success(), "{out}");
    assert!(
        !out.contains("s3cret-pw"),
        "the password is never printed: {out}"
    );
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Kafka backpressure slows reading instead of failing: with a producer queue of 50 records, a
/// 20,000-row transaction fills it again and again; the relay waits (counted), does not
/// reconnect, and delivers every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_producer_queue_slows_reading_instead_of_failing() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    h.create_slot().await;
    let mut env = h.env();
    env.set(
        "RELAY_KAFKA__LIBRDKAFKA__QUEUE.BUFFERING.MAX.MESSAGES",
        "50",
    );
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    h.client()
        .await
        .batch_execute(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'order', 'bp-' || (g % 50), 'Bulk', \
                    jsonb_build_object('seq', g / 50 + 1) \
             FROM generate_series(0, 19999) g",
        )
        .await
        .unwrap();
    h.wait_caught_up(&mut relay, Duration::from_secs(180)).await;
    let m = Harness::metrics(&env).await;
    let waits = sample(&m, "relay_kafka_queue_full_total{relay=\"cdc\"}").unwrap_or(0.0);
    let reconnects = sample(&m, "relay_reconnects_total{component=\"kafka\"}")
        .expect("the reconnect series exists from the start");
    assert!(
        relay
            .terminate(Duration::from_secs(20))
            .expect("exit")
            .success(),
        "{}",
        relay.log_text()
    );
    let t = h.tally(&LoadState::default()).await;
    eprintln!("backpressure: {t:?}, {waits} waits on a full queue");
    assert!(waits > 0.0, "the producer queue never filled: {m}");
    assert_eq!(reconnects, 0.0, "a full queue made the relay reconnect");
    assert_eq!(t.expected, 20_000);
    assert_eq!((t.lost, t.duplicates, t.out_of_order), (0, 0, 0), "{t:?}");
    assert_eq!(t.delivered, 20_000);
}

/// One transaction of 100,000 outbox rows, relayed exactly once with protocol 1 (passed through
/// as it is decoded) and protocol 2 (streamed by Postgres before it commits, buffered and spilled
/// by the relay), without the relay's memory growing with the transaction; protocol 2 once more
/// with the wire client, which produces a transaction's records before its commit once they
/// pass 4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100k_row_transaction_is_relayed_once_with_bounded_memory() {
    for (proto, client) in [("1", "librdkafka"), ("2", "librdkafka"), ("2", "wire")] {
        let db = TestDb::create().await;
        let h = Harness::new(db.url(), kafka::bootstrap());
        // Small decoding memory makes Postgres stream (protocol 2) or spill the transaction.
        h.client()
            .await
            .batch_execute(&format!(
                "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
                db.name
            ))
            .await
            .unwrap();
        h.create_slot().await;
        let mut env = h.env();
        env.set("RELAY_CDC__PROTO_VERSION", proto)
            .set("RELAY_KAFKA__CLIENT", client);
        let mut relay = RelayProc::spawn(&["cdc"], &env);
        let c = h.client().await;
        c.batch_execute(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'order', 'big-' || (g % 100), 'Bulk', \
                    jsonb_build_object('seq', g / 100 + 1, 'pad', repeat('x', 300)) \
             FROM generate_series(0, 99999) g",
        )
        .await
        .unwrap();
        h.wait_caught_up(&mut relay, Duration::from_secs(300)).await;
        let rss = peak_rss(relay.pid());
        assert!(relay
            .terminate(Duration::from_secs(20))
            .expect("exit")
            .success());
        // Postgres's own account of how it handed the transaction over: streamed before commit
        // (protocol 2) or spilled to its disk and sent after commit (protocol 1).
        let column = if proto == "2" {
            "stream_txns"
        } else {
            "spill_txns"
        };
        let mut handed = 0i64;
        for _ in 0..50 {
            handed = c
                .query_one(
                    &format!("SELECT coalesce(max({column}), 0) FROM pg_stat_replication_slots WHERE slot_name = $1"),
                    &[&h.slot],
                )
                .await
                .unwrap()
                .get(0);
            if handed > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            handed > 0,
            "protocol {proto}: Postgres reports {column} = 0"
        );
        let t = h.tally(&LoadState::default()).await;
        eprintln!(
            "protocol {proto}, {client}: {t:?}, relay peak RSS {:.1} MB",
            rss as f64 / 1e6
        );
        assert_eq!(t.expected, 100_000);
        assert_eq!((t.lost, t.duplicates, t.out_of_order), (0, 0, 0), "{t:?}");
        assert_eq!(t.delivered, 100_000);
        // About 45 MB of records pass through; the relay holds a bounded part of them.
        assert!(rss < 200_000_000, "{client}: relay peak RSS {rss} bytes");
    }
}
