//! The consumer runtime: one poll thread, one ordered worker per partition, offsets stored only
//! for finished work.
//!
//! ```text
//!                        ┌──────────── per partition: bounded queue ───────────┐
//!  Kafka ─▶ poll thread ─┤ worker p0: [BEGIN; dedup row; guard; effect; COMMIT]  ├─▶ done channel
//!  (read_committed,      │ worker p1: ...                                         │       │
//!   auto-commit off)     └────────────────────────────────────────────────────────┘       │
//!        ▲                                                                                 │
//!        └── store_offsets(offset + 1) for each finished record ◀── poll thread ◀──────────┘
//!            commit every `commit_interval`, and synchronously on revoke and shutdown
//! ```
//!
//! ## Progress: which offset is safe to commit
//!
//! A partition's records are processed in order by its single worker, and the worker reports a
//! record as done only when it has finished for good: its effect and dedup row committed, or
//! it was a duplicate (rolled back), or a stale version (skipped), or it was written to the DLQ
//! and Kafka acknowledged that write. So the offset after the last done record is always safe:
//! everything before it has taken effect or is in the DLQ. A crash at any point loses at most
//! the done-but-uncommitted tail, which is redelivered and then recognised by the dedup row.
//!
//! ## Rebalance and shutdown
//!
//! On revoke (inside `poll`, on the poll thread) the revoked partitions' workers are told to
//! stop, the runtime waits for the record each is in the middle of, stores what finished and
//! commits synchronously before the partitions go. Queued records that were not started are
//! dropped: the next owner gets them from the committed offset. Shutdown does the same for all.
//!
//! ## Retries and the DLQ
//!
//! A retryable error is retried with exponential backoff and jitter up to
//! `retry.max_attempts`; a permanent error, or the last failed attempt, sends the record to the
//! DLQ with its context. The partition is blocked only for the length of the retry budget.
//!
//! ## Naive mode
//!
//! Every defence can be switched off (see [`Defences`](crate::config::Defences)); a drill runs
//! the same code with them off to count what each one prevents.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use relay::shutdown::Shutdown;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

use crate::config::RuntimeConfig;
use crate::dlq::{DlqError, DlqWriter, Failure};
use crate::fault::FaultPoint;
use crate::handler::{Effect, Handler, HandlerError, DB_UNAVAILABLE};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::store;

/// The runtime could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("DLQ: {0}")]
    Dlq(#[from] DlqError),
    #[error("creating the DLQ topic {topic}: {source}")]
    DlqTopic {
        topic: String,
        source: RDKafkaErrorCode,
    },
    #[error("librdkafka option {0} is set by the runtime and cannot be passed through")]
    ReservedOption(String),
    #[error("the poll thread ended abnormally")]
    PollThread,
    #[error("a partition worker ended unexpectedly (a handler panicked); the consumer stopped at its last committed offsets")]
    WorkerDied,
}

/// Options the runtime sets itself; setting them through `RuntimeConfig::kafka` is an error.
const RESERVED_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
];

/// How one record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    Stale,
}

/// A record on its way from the poll thread to its worker.
struct Queued {
    record: Record,
    polled_at: Instant,
}

/// A finished record: the offset to store next.
struct Done {
    topic: String,
    partition: i32,
    next_offset: i64,
}

/// One consumer group member running `H`.
pub struct Runtime<H: Handler> {
    config: RuntimeConfig,
    handler: Arc<H>,
    metrics: Metrics,
}

impl<H: Handler> Runtime<H> {
    pub fn new(config: RuntimeConfig, handler: H, metrics: Metrics) -> Runtime<H> {
        Runtime {
            config,
            handler: Arc::new(handler),
            metrics,
        }
    }

    /// Consumes until `shutdown` is triggered, then finishes the records in progress, commits
    /// what finished and leaves.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), RuntimeError> {
        let cfg = self.config;
        for (k, _) in &cfg.kafka {
            if RESERVED_OPTIONS.contains(&k.as_str()) {
                return Err(RuntimeError::ReservedOption(k.clone()));
            }
        }
        if cfg.defences.retry_budget {
            ensure_topic(&cfg.bootstrap, &cfg.dlq_topic).await?;
        }
        let dlq = DlqWriter::new(&cfg.bootstrap, &cfg.dlq_topic, &cfg.consumer)?;
        let (done_tx, done_rx) = std_mpsc::channel();
        let processor = Arc::new(Processor {
            handler: self.handler,
            metrics: self.metrics.clone(),
            dlq,
            shutdown: shutdown.clone(),
            config: cfg.clone(),
        });
        let context = PollContext {
            processor,
            rt: tokio::runtime::Handle::current(),
            done_tx,
            state: Mutex::new(PollState {
                workers: HashMap::new(),
                done_rx,
            }),
            worker_died: AtomicBool::new(false),
            commit_failed: AtomicBool::new(false),
        };
        let manual = cfg.defences.offsets_after_effect;
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.bootstrap)
            .set("group.id", &cfg.consumer)
            // What a consumer of transactional topics must see: only committed records.
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", if manual { "false" } else { "true" })
            .set(
                "enable.auto.offset.store",
                if manual { "false" } else { "true" },
            )
            // Naive mode commits what was polled on the same schedule the hardened mode
            // commits what finished, so a drill compares like with like.
            .set(
                "auto.commit.interval.ms",
                cfg.commit_interval.as_millis().max(1).to_string(),
            )
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000");
        if let Some(id) = &cfg.instance_id {
            cc.set("group.instance.id", id);
        }
        for (k, v) in &cfg.kafka {
            cc.set(k, v);
        }
        let consumer: BaseConsumer<PollContext<H>> = cc.create_with_context(context)?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(
            consumer = %cfg.consumer,
            topics = ?cfg.topics,
            defences = ?cfg.defences,
            faults = cfg.faults.enabled(),
            "consumer started"
        );
        // librdkafka's consumer calls block; the loop gets a thread of its own.
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let commit_interval = cfg.commit_interval;
        std::thread::Builder::new()
            .name(format!("poll-{}", cfg.consumer))
            .spawn(move || {
                poll_loop(&consumer, &shutdown, commit_interval, manual);
                let died = consumer.context().worker_died.load(Ordering::SeqCst);
                let _ = drained_tx.send(died);
                drop(consumer);
                let _ = closed_tx.send(());
            })
            .map_err(|_| RuntimeError::PollThread)?;
        // The loop has finished its records and committed their offsets: what the stop
        // promises. Closing the consumer comes after; librdkafka's close has been seen to hang
        // with no end (the log's last line the revoke inside close, on a starved machine; see
        // librdkafka issues 4527 and 4884), so it gets a bounded time, and past it the process
        // goes on without it: nothing is left to commit, and the group's session expires.
        let died = drained_rx.await.map_err(|_| RuntimeError::PollThread)?;
        if tokio::time::timeout(CLOSE_TIMEOUT, closed_rx)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_s = CLOSE_TIMEOUT.as_secs(),
                "the Kafka consumer did not close in time; going on without it (offsets are committed)"
            );
        }
        if died {
            return Err(RuntimeError::WorkerDied);
        }
        Ok(())
    }
}

/// How long the consumer's close may take once the loop has committed its work.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the DLQ topic unless it exists (one partition: DLQ order does not matter, and the
/// replication factor is the broker's default).
pub async fn ensure_topic(bootstrap: &str, topic: &str) -> Result<(), RuntimeError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(-1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, source)) => return Err(RuntimeError::DlqTopic { topic, source }),
        }
    }
    Ok(())
}

fn poll_loop<H: Handler>(
    consumer: &BaseConsumer<PollContext<H>>,
    shutdown: &Shutdown,
    commit_interval: Duration,
    manual: bool,
) {
    let ctx = consumer.context().clone();
    let mut last_commit = Instant::now();
    let mut uncommitted = false;
    while !shutdown.is_triggered() {
        if manual {
            uncommitted |= ctx.flush_done(consumer);
            uncommitted |= ctx.commit_failed.swap(false, Ordering::SeqCst);
            if uncommitted && last_commit.elapsed() >= commit_interval {
                commit(consumer, CommitMode::Async);
                uncommitted = false;
                last_commit = Instant::now();
            }
        }
        ctx.check_workers();
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(m)) => {
                let record = Record::from_message(&m);
                drop(m);
                ctx.dispatch(record);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
        }
    }
    tracing::info!("shutting down: finishing the records in progress");
    let all: Vec<(String, i32)> = ctx.state().workers.keys().cloned().collect();
    ctx.stop_workers(&all);
    if manual {
        ctx.flush_done(consumer);
        commit(consumer, CommitMode::Sync);
    }
}

fn commit<C: ConsumerContext>(consumer: &BaseConsumer<C>, mode: CommitMode) {
    match consumer.commit_consumer_state(mode) {
        Ok(()) => {}
        // Nothing stored since the last commit.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "offset commit failed; it is retried with the next one")
        }
    }
}

struct WorkerHandle {
    tx: mpsc::Sender<Queued>,
    cancel: Arc<AtomicBool>,
    join: tokio::task::JoinHandle<()>,
}

struct PollState {
    workers: HashMap<(String, i32), WorkerHandle>,
    done_rx: std_mpsc::Receiver<Done>,
}

/// The poll thread's state, reachable from librdkafka's rebalance callback (which runs on the
/// poll thread, inside `poll`).
struct PollContext<H: Handler> {
    processor: Arc<Processor<H>>,
    rt: tokio::runtime::Handle,
    done_tx: std_mpsc::Sender<Done>,
    state: Mutex<PollState>,
    /// Set when a worker ended without being told to.
    worker_died: AtomicBool,
    /// Set when an asynchronous offset commit failed, so the next loop commits again even if
    /// no record finished since.
    commit_failed: AtomicBool,
}

impl<H: Handler> PollContext<H> {
    fn state(&self) -> std::sync::MutexGuard<'_, PollState> {
        // Only the poll thread takes this lock, so poisoning would mean it panicked already.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `record` to its partition's worker, starting the worker if needed. Blocks while
    /// the worker's queue is full (backpressure on polling).
    fn dispatch(&self, record: Record) {
        let key = (record.topic.clone(), record.partition);
        let tx = {
            let mut st = self.state();
            st.workers
                .entry(key)
                .or_insert_with(|| self.spawn_worker(&record.topic, record.partition))
                .tx
                .clone()
        };
        let queued = Queued {
            record,
            polled_at: Instant::now(),
        };
        if tx.blocking_send(queued).is_err() {
            self.check_workers();
        }
    }

    /// Stops the consumer if a worker ended without being told to. A worker ends on its own
    /// only if its handler panicked, in the middle of a record whose offset was never stored:
    /// going on would store later offsets past it and lose it, while stopping leaves the
    /// partition at its last committed offset.
    fn check_workers(&self) {
        // A worker also ends early when it abandons a backoff for shutdown: not a death.
        if self.processor.shutdown.is_triggered() {
            return;
        }
        let died = self
            .state()
            .workers
            .values()
            .any(|w| w.join.is_finished() && !w.cancel.load(Ordering::SeqCst));
        if died && !self.worker_died.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "a partition worker ended unexpectedly (did a handler panic?); stopping the \
                 consumer so that the partition resumes from its last committed offset"
            );
            self.processor.shutdown.trigger();
        }
    }

    fn spawn_worker(&self, topic: &str, partition: i32) -> WorkerHandle {
        let cfg = &self.processor.config;
        // With auto-commit (naive mode) a queued record's offset is committed before it is
        // processed; a queue of one keeps that window to the classic poll-then-process loop's,
        // instead of letting the queue turn every crash into hundreds of lost records.
        let cap = if cfg.defences.offsets_after_effect {
            cfg.queue_per_partition.max(1)
        } else {
            1
        };
        let (tx, rx) = mpsc::channel(cap);
        let cancel = Arc::new(AtomicBool::new(false));
        let join = self.rt.spawn(worker(
            self.processor.clone(),
            topic.to_owned(),
            partition,
            rx,
            cancel.clone(),
            self.done_tx.clone(),
        ));
        WorkerHandle { tx, cancel, join }
    }

    /// Stops the workers of `partitions` and waits for the record each is in the middle of.
    fn stop_workers(&self, partitions: &[(String, i32)]) {
        let handles: Vec<WorkerHandle> = {
            let mut st = self.state();
            partitions
                .iter()
                .filter_map(|k| st.workers.remove(k))
                .collect()
        };
        for h in &handles {
            h.cancel.store(true, Ordering::SeqCst);
        }
        let joins: Vec<_> = handles.into_iter().map(|h| h.join).collect();
        self.rt.block_on(async {
            for j in joins {
                // A handler stuck longer than this keeps its record uncommitted: the next owner
                // gets it again, and the dedup row settles who applied it.
                if tokio::time::timeout(Duration::from_secs(30), j)
                    .await
                    .is_err()
                {
                    tracing::warn!("a worker did not finish its record within 30 s");
                }
            }
        });
    }

    /// Stores the offsets of finished records; true if it stored any.
    fn flush_done<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> bool {
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        {
            let st = self.state();
            while let Ok(d) = st.done_rx.try_recv() {
                let e = next.entry((d.topic, d.partition)).or_insert(d.next_offset);
                *e = (*e).max(d.next_offset);
            }
        }
        if next.is_empty() {
            return false;
        }
        for ((topic, partition), offset) in next {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(&topic, partition, Offset::Offset(offset))
                .is_err()
            {
                continue;
            }
            // Fails for a partition no longer assigned: its next owner starts from the last
            // commit and the dedup row absorbs the overlap.
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(topic, partition, error = %e, "offset not stored");
            }
        }
        true
    }
}

impl<H: Handler> ClientContext for PollContext<H> {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal unassigned queue.
                if *partition >= 0 && p.committed_offset >= 0 && p.hi_offset >= 0 {
                    self.processor.metrics.set_lag(
                        topic,
                        *partition,
                        p.hi_offset - p.committed_offset,
                    );
                }
            }
        }
    }
}

impl<H: Handler> ConsumerContext for PollContext<H> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(partitions = parts.len(), "partitions revoked");
            // On shutdown the poll loop has already stopped every worker and committed what
            // they finished, and this revoke comes from inside the consumer's close: a second,
            // synchronous commit there adds nothing and waits on a group being left (the one
            // stop seen to take over 30 s, on a starved CPU, logged this revoke last). A revoke
            // racing the shutdown signal is covered too: the loop then stops those workers, and
            // an offset it can no longer store is re-read by the next owner and deduplicated.
            if self.processor.shutdown.is_triggered() {
                return;
            }
            self.stop_workers(&parts);
            if self.processor.config.defences.offsets_after_effect {
                self.flush_done(consumer);
                commit(consumer, CommitMode::Sync);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
        let n = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.processor
            .metrics
            .assigned
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; committing again");
                self.commit_failed.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// One partition's worker: its records in order, one at a time (or one batch at a time).
async fn worker<H: Handler>(
    p: Arc<Processor<H>>,
    topic: String,
    partition: i32,
    mut rx: mpsc::Receiver<Queued>,
    cancel: Arc<AtomicBool>,
    done: std_mpsc::Sender<Done>,
) {
    let mut db: Option<Client> = None;
    let batch_max = p.config.batch_max_records.max(1);
    while let Some(first) = rx.recv().await {
        if cancel.load(Ordering::SeqCst) {
            return;
        }
        let mut batch = vec![first];
        if batch_max > 1 {
            let deadline = tokio::time::Instant::now() + p.config.batch_window;
            while batch.len() < batch_max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(q)) => batch.push(q),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let last = batch.last().map(|q| q.record.offset).unwrap_or(-1);
        let finished = if batch.len() == 1 {
            p.process(&mut db, &batch[0], &cancel).await
        } else {
            p.process_batch(&mut db, &batch, &cancel).await
        };
        if !finished {
            // Abandoned for shutdown or revoke: not stored, so redelivered.
            return;
        }
        let _ = done.send(Done {
            topic: topic.clone(),
            partition,
            next_offset: last + 1,
        });
    }
}

/// What every worker shares: the handler and the runtime's machinery around it.
struct Processor<H: Handler> {
    handler: Arc<H>,
    metrics: Metrics,
    dlq: DlqWriter,
    shutdown: Shutdown,
    config: RuntimeConfig,
}

impl<H: Handler> Processor<H> {
    /// A connection, made (again) when there is none or it has closed.
    async fn client<'a>(&self, db: &'a mut Option<Client>) -> Result<&'a mut Client, HandlerError> {
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = tokio_postgres::connect(&self.config.database_url, NoTls)
                .await
                .map_err(HandlerError::db)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "database connection ended");
                }
            });
            *db = Some(client);
        }
        db.as_mut()
            .ok_or_else(|| HandlerError::retryable(DB_UNAVAILABLE, "no database connection"))
    }

    /// One attempt at one record: BEGIN, dedup row, version guard, effect, COMMIT.
    async fn attempt(&self, db: &mut Option<Client>, r: &Record) -> Result<Outcome, HandlerError> {
        let d = &self.config.defences;
        let event_id = if d.dedup { Some(r.event_id()?) } else { None };
        let version = if d.version_guard {
            self.handler.version(r)?
        } else {
            None
        };
        let consumer = self.config.consumer.as_str();
        let client = self.client(db).await?;
        let tx = client.transaction().await?;
        if let Some(id) = event_id {
            if !store::insert_dedup(&tx, consumer, id).await? {
                tx.rollback().await?;
                return Ok(Outcome::Duplicate);
            }
        }
        if let Some(v) = version {
            if !store::advance_version(&tx, consumer, &v.entity, v.version).await? {
                // The dedup row commits: the stale record counts as processed (skipped).
                tx.commit().await?;
                return Ok(Outcome::Stale);
            }
        }
        let cx = Effect {
            tx: &tx,
            faults: &self.config.faults,
            consumer,
            batch_id: uuid::Uuid::new_v4(),
        };
        self.handler.apply(&cx, r).await?;
        tx.commit().await?;
        self.config.faults.hit(FaultPoint::AfterDbCommit);
        Ok(Outcome::Applied)
    }

    /// Sleeps `d`, waking early when the worker is told to stop; false if it was.
    async fn pause(&self, d: Duration, cancel: &AtomicBool) -> bool {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            if cancel.load(Ordering::SeqCst) || self.shutdown.is_triggered() {
                return false;
            }
            let step = end
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_millis(50));
            tokio::time::sleep(step).await;
        }
        !(cancel.load(Ordering::SeqCst) || self.shutdown.is_triggered())
    }

    /// Processes one record to its end: applied, duplicate, stale, dead-lettered or dropped.
    /// False if it was abandoned (stop requested during a backoff): the record stays
    /// uncommitted and is redelivered.
    async fn process(&self, db: &mut Option<Client>, q: &Queued, cancel: &AtomicBool) -> bool {
        let r = &q.record;
        let cfg = &self.config;
        cfg.faults.hit(FaultPoint::BeforeEffect);
        let mut attempts = 0u32;
        let mut first_failure = None;
        let result = loop {
            attempts += 1;
            match self.attempt(db, r).await {
                Ok(outcome) => break Ok(outcome),
                Err(error) => {
                    let now = SystemTime::now();
                    let first = *first_failure.get_or_insert(now);
                    self.metrics.failure(error.class);
                    tracing::warn!(
                        consumer = %cfg.consumer,
                        topic = %r.topic,
                        partition = r.partition,
                        offset = r.offset,
                        attempt = attempts,
                        error = %error,
                        "attempt failed"
                    );
                    // The database being unreachable is not the record's fault: it would send
                    // every record of an outage to the DLQ. Such attempts do not spend the
                    // budget; the partition waits (as every partition does) for the database.
                    let budget_left = !cfg.defences.retry_budget
                        || attempts < cfg.retry.max_attempts
                        || error.kind == DB_UNAVAILABLE;
                    if error.is_retryable() && budget_left {
                        if !self.pause(cfg.retry.backoff(attempts), cancel).await {
                            return false;
                        }
                        self.metrics.retries.inc();
                        continue;
                    }
                    break Err(Failure {
                        error,
                        attempts,
                        first_failure: first,
                        last_failure: now,
                    });
                }
            }
        };
        match result {
            Ok(Outcome::Applied) => self.metrics.processed.inc(),
            Ok(Outcome::Duplicate) => self.metrics.dedup_hits.inc(),
            Ok(Outcome::Stale) => self.metrics.guard_skips.inc(),
            Err(failure) if cfg.defences.retry_budget => {
                if !self.dead_letter(r, &failure, cancel).await {
                    return false;
                }
            }
            Err(failure) => {
                self.metrics.dropped.inc();
                tracing::error!(
                    consumer = %cfg.consumer,
                    topic = %r.topic,
                    partition = r.partition,
                    offset = r.offset,
                    error = %failure.error,
                    "record dropped (no DLQ in naive mode)"
                );
            }
        }
        self.metrics.records.inc();
        self.metrics
            .processing
            .observe(q.polled_at.elapsed().as_secs_f64());
        true
    }

    /// Writes the record to the DLQ, retrying until Kafka acknowledges it; false if told to
    /// stop first (then the record is not done and is redelivered).
    async fn dead_letter(&self, r: &Record, failure: &Failure, cancel: &AtomicBool) -> bool {
        let mut n = 0u32;
        loop {
            match self.dlq.write(r, failure).await {
                Ok(()) => {
                    self.metrics.dlq_writes.inc();
                    tracing::warn!(
                        consumer = %self.config.consumer,
                        topic = %r.topic,
                        partition = r.partition,
                        offset = r.offset,
                        dlq = %self.dlq.topic(),
                        kind = failure.error.kind,
                        attempts = failure.attempts,
                        "record dead-lettered"
                    );
                    return true;
                }
                Err(e) => {
                    n = n.saturating_add(1);
                    tracing::error!(error = %e, attempt = n, "DLQ write failed; retrying");
                    if !self.pause(self.config.retry.backoff(n), cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// A batch of one partition's records in one transaction. Any error rolls the whole batch
    /// back and falls back to one transaction per record, so a poison record is isolated and
    /// dead-lettered on its own while the others still apply.
    async fn process_batch(
        &self,
        db: &mut Option<Client>,
        batch: &[Queued],
        cancel: &AtomicBool,
    ) -> bool {
        for _ in batch {
            self.config.faults.hit(FaultPoint::BeforeEffect);
        }
        match self.attempt_batch(db, batch).await {
            Ok(outcomes) => {
                for (q, o) in batch.iter().zip(outcomes) {
                    match o {
                        Outcome::Applied => self.metrics.processed.inc(),
                        Outcome::Duplicate => self.metrics.dedup_hits.inc(),
                        Outcome::Stale => self.metrics.guard_skips.inc(),
                    }
                    self.metrics.records.inc();
                    self.metrics
                        .processing
                        .observe(q.polled_at.elapsed().as_secs_f64());
                }
                true
            }
            Err(e) => {
                self.metrics.failure(e.class);
                tracing::warn!(
                    consumer = %self.config.consumer,
                    records = batch.len(),
                    error = %e,
                    "batch failed; applying its records one by one"
                );
                for q in batch {
                    if !self.process(db, q, cancel).await {
                        return false;
                    }
                }
                true
            }
        }
    }

    async fn attempt_batch(
        &self,
        db: &mut Option<Client>,
        batch: &[Queued],
    ) -> Result<Vec<Outcome>, HandlerError> {
        let d = &self.config.defences;
        let consumer = self.config.consumer.as_str();
        let client = self.client(db).await?;
        let tx = client.transaction().await?;
        let cx = Effect {
            tx: &tx,
            faults: &self.config.faults,
            consumer,
            batch_id: uuid::Uuid::new_v4(),
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for q in batch {
            let r = &q.record;
            if d.dedup && !store::insert_dedup_in_batch(&tx, consumer, r.event_id()?).await? {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            if d.version_guard {
                if let Some(v) = self.handler.version(r)? {
                    if !store::advance_version(&tx, consumer, &v.entity, v.version).await? {
                        outcomes.push(Outcome::Stale);
                        continue;
                    }
                }
            }
            self.handler.apply(&cx, r).await?;
            outcomes.push(Outcome::Applied);
        }
        tx.commit().await?;
        self.config.faults.hit(FaultPoint::AfterDbCommit);
        Ok(outcomes)
    }
}
