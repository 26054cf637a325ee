//! Where events go: a transactional destination driven from a dedicated thread.
//!
//! ```text
//!  relay loop (async) ──Records──▶ ┌──────────── sink thread ────────────┐
//!                     ──Commit───▶ │ begin (lazily, at the first record) │──▶ Kafka
//!        ◀── CommitResult ──────── │ send… send… checkpoint, commit      │
//!                                  └──────────────────────────────────────┘
//! ```
//!
//! librdkafka's transaction calls block, so they run on a thread of their own, never on the
//! async executor. Commands travel through a bounded channel: when Kafka is slow, the relay
//! loop's sends wait, and the loop stops reading WAL (backpressure instead of unbounded memory).
//!
//! ## The contract
//!
//! A [`Backend`] groups records into transactions. Records sent after `begin` are invisible to
//! `read_committed` readers until `commit` returns `Ok`; then all of them, and the checkpoint
//! written in the same transaction, are durable together. If `commit` fails or the process dies
//! first, none of them is. Therefore the relay may confirm a position to Postgres only after
//! `commit` returned `Ok` for a checkpoint at or beyond it. After any error the backend is
//! unusable: the relay drops it, makes a new one (which fences the old transactional id) and
//! resumes from the last committed checkpoint.

pub mod kafka;
pub mod null;
mod scram;
mod security;
pub mod wire;

use crate::checkpoint::Checkpoint;
use crate::outbox::OutRecord;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What went wrong in the sink, classified by what the relay must do about it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The transaction was aborted (an abortable error, or a timeout). Resume from the last
    /// committed checkpoint with a new producer.
    #[error("Kafka transaction aborted: {0}")]
    Aborted(String),
    /// The broker is unreachable or timed out; retry with backoff from the last checkpoint.
    #[error("Kafka unavailable: {0}")]
    Unavailable(String),
    /// Another producer with our transactional id took over (a zombie was fenced: us), or the
    /// producer hit an unrecoverable error. The process must exit non-zero.
    #[error("Kafka producer fatal error (fenced by a newer instance, or unrecoverable): {0}")]
    Fatal(String),
    /// Bad configuration (a librdkafka option it rejected, say). Operator action needed.
    #[error("Kafka configuration rejected: {0}")]
    Config(String),
    /// The sink thread is gone (after an earlier error).
    #[error("the sink thread has stopped")]
    Stopped,
    /// A Kafka transaction failed after being open longer than `kafka.transaction_timeout`:
    /// the broker aborts transactions older than that (fencing the producer), so replaying the
    /// same WAL transaction would fail the same way, forever. The operator must act.
    #[error("a Kafka transaction failed after being open for {age:?}, longer than kafka.transaction_timeout ({limit:?}): the broker aborts (and fences) transactions older than that, so the WAL transaction being relayed is too large to produce within it. Raise kafka.transaction_timeout (up to the broker's transaction.max.timeout.ms, 15 min by default) and restart; see RUNBOOK.md, 'Transaction too large'. Cause: {cause}")]
    TransactionTimeout {
        age: Duration,
        limit: Duration,
        cause: String,
    },
    /// One record can never be written where it is going (its topic is invalid or refused to
    /// the relay, the record is too large): definite, no retry helps. The sink sends it to the
    /// DLQ topic instead, in the same transaction; without a DLQ topic it ends the relay.
    #[error("record refused for good ({class}): {reason}")]
    Rejected {
        reason: String,
        class: &'static str,
        /// Whether the DLQ record may keep the value (not when the value is what is wrong).
        keep_value: bool,
        /// The record, handed back so the sink can send it to the DLQ.
        record: Returned,
    },
}

/// A record handed back with an error. Its `Debug` shows the topic only: errors are logged,
/// and payloads never are.
#[derive(Clone, Default)]
pub struct Returned(pub Option<Box<OutRecord>>);

impl std::fmt::Debug for Returned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(r) => write!(f, "Returned(topic {})", r.topic),
            None => f.write_str("Returned(none)"),
        }
    }
}

impl SinkError {
    /// A refusal of `record`'s destination (its topic) as a refusal of `record`, handed back
    /// so the sink can send it to the DLQ. Other errors are returned as they are.
    pub fn refusing(self, record: OutRecord) -> SinkError {
        match self {
            SinkError::Rejected {
                reason,
                class,
                keep_value,
                ..
            } => SinkError::Rejected {
                reason,
                class,
                keep_value,
                record: Returned(Some(Box::new(record))),
            },
            other => other,
        }
    }

    /// Whether reconnecting and resuming from the last checkpoint can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SinkError::Aborted(_) | SinkError::Unavailable(_) | SinkError::Stopped
        )
    }
}

/// What a successful commit reports.
#[derive(Clone, Debug)]
pub struct Committed {
    pub checkpoint: Checkpoint,
    /// Records in the transaction, the checkpoint not counted.
    pub records: usize,
    pub bytes: usize,
    /// How long `commit` took.
    pub commit_duration: Duration,
    /// How long into `commit` every record of the transaction had been acknowledged, when the
    /// backend knows (for `relay_stage_seconds{stage="delivered"}`).
    pub delivered_after: Option<Duration>,
    /// Records the sink sent to the DLQ topic instead of their own (see
    /// [`SinkError::Rejected`]), and their value bytes: the relay counts them as DLQ records,
    /// not as events.
    pub rerouted: u64,
    pub rerouted_bytes: u64,
}

/// A transactional destination, called from the sink thread only (its calls may block).
pub trait Backend: Send + 'static {
    /// Prepares the destination (for Kafka: `init_transactions`, which fences zombies and
    /// aborts their open transactions) and returns the latest committed checkpoint for `key`.
    fn open(&mut self, key: &str) -> Result<Option<Checkpoint>, SinkError>;
    /// Starts a transaction. Called lazily before the first record of each transaction.
    fn begin(&mut self) -> Result<(), SinkError>;
    /// Queues one record in the open transaction; may block while the client's queue is full.
    fn send(&mut self, record: OutRecord) -> Result<(), SinkError>;
    /// Writes `checkpoint` into the open transaction (beginning one if none is open) and
    /// commits. Returns only when the commit is durable or has definitely failed.
    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError>;
    /// Aborts the open transaction, if any.
    fn abort(&mut self) -> Result<(), SinkError>;
    /// How long into the last `commit` every record of its transaction had been acknowledged,
    /// if the backend measures it.
    fn delivered_after(&self) -> Option<Duration> {
        None
    }
}

/// The Kafka backend `kafka.client` names.
pub enum KafkaSink {
    Librdkafka(Box<kafka::KafkaBackend>),
    Wire(Box<wire::WireBackend>),
}

impl KafkaSink {
    /// The backend for `settings.client`. The librdkafka one counts queue-full waits in
    /// `queue_full` and shares `poison` (records refused for good) with its predecessors;
    /// the wire client holds a transaction's records itself and refuses oversized ones before
    /// sending, so it uses neither.
    pub fn new(
        settings: kafka::KafkaSettings,
        runtime: tokio::runtime::Handle,
        queue_full: prometheus::IntCounter,
        poison: kafka::Poison,
    ) -> KafkaSink {
        match settings.client {
            crate::config::KafkaClient::Librdkafka => KafkaSink::Librdkafka(Box::new(
                kafka::KafkaBackend::new(settings, runtime)
                    .with_queue_full_counter(queue_full)
                    .with_poison(poison),
            )),
            crate::config::KafkaClient::Wire => {
                let v = settings.wire_transaction_version;
                KafkaSink::Wire(Box::new(wire::WireBackend::new(settings, v, runtime)))
            }
        }
    }

    fn inner(&mut self) -> &mut dyn Backend {
        match self {
            KafkaSink::Librdkafka(b) => &mut **b,
            KafkaSink::Wire(b) => &mut **b,
        }
    }
}

impl Backend for KafkaSink {
    fn open(&mut self, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        self.inner().open(key)
    }
    fn begin(&mut self) -> Result<(), SinkError> {
        self.inner().begin()
    }
    fn send(&mut self, record: OutRecord) -> Result<(), SinkError> {
        self.inner().send(record)
    }
    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError> {
        self.inner().commit(checkpoint)
    }
    fn abort(&mut self) -> Result<(), SinkError> {
        self.inner().abort()
    }
    fn delivered_after(&self) -> Option<Duration> {
        match self {
            KafkaSink::Librdkafka(b) => b.delivered_after(),
            KafkaSink::Wire(b) => b.delivered_after(),
        }
    }
}

enum Command {
    Records(Vec<OutRecord>),
    Commit(Checkpoint, oneshot::Sender<Result<Committed, SinkError>>),
    Abort(oneshot::Sender<Result<(), SinkError>>),
}

/// The relay loop's handle on the sink thread.
pub struct Sink {
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").finish_non_exhaustive()
    }
}

/// Commands the channel holds before `send` waits: with chunks of a few hundred records, a few
/// thousand records in flight at most.
const CHANNEL_DEPTH: usize = 8;

impl Sink {
    /// Starts the sink thread on `backend`, opens it and returns the latest committed checkpoint
    /// for `key`. Runs the (blocking) open on the new thread.
    pub async fn start<B: Backend>(
        backend: B,
        key: String,
    ) -> Result<(Sink, Option<Checkpoint>), SinkError> {
        Self::start_inner(backend, key, None).await
    }

    /// Like [`Sink::start`], and a record the backend refuses for good
    /// ([`SinkError::Rejected`]) goes to `dlq_topic` in the same transaction instead.
    pub async fn start_with_dlq<B: Backend>(
        backend: B,
        key: String,
        dlq_topic: Arc<str>,
    ) -> Result<(Sink, Option<Checkpoint>), SinkError> {
        Self::start_inner(backend, key, Some(dlq_topic)).await
    }

    async fn start_inner<B: Backend>(
        mut backend: B,
        key: String,
        dlq_topic: Option<Arc<str>>,
    ) -> Result<(Sink, Option<Checkpoint>), SinkError> {
        let (tx, mut rx) = mpsc::channel::<Command>(CHANNEL_DEPTH);
        let (open_tx, open_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("relay-sink".into())
            .spawn(move || {
                let opened = backend.open(&key);
                let ok = opened.is_ok();
                let _ = open_tx.send(opened);
                if ok {
                    run_thread(backend, &mut rx, dlq_topic);
                }
            })
            .map_err(|e| SinkError::Config(format!("cannot start the sink thread: {e}")))?;
        let checkpoint = match open_rx.await {
            Ok(r) => r,
            Err(_) => Err(SinkError::Stopped),
        };
        let sink = Sink {
            tx: Some(tx),
            thread: Some(thread),
        };
        match checkpoint {
            Ok(cp) => Ok((sink, cp)),
            Err(e) => {
                sink.close().await;
                Err(e)
            }
        }
    }

    /// Queues records for the open transaction. Waits while the channel is full (backpressure).
    /// Cancellation safe: if cancelled, the records were not queued.
    pub async fn send(&self, records: Vec<OutRecord>) -> Result<(), SinkError> {
        let tx = self.tx.as_ref().ok_or(SinkError::Stopped)?;
        tx.send(Command::Records(records))
            .await
            .map_err(|_| SinkError::Stopped)
    }

    /// Asks for a commit with `checkpoint` after every record queued so far. Returns the
    /// receiver of the result at once, so the caller can go on reading while Kafka commits.
    pub async fn commit(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<oneshot::Receiver<Result<Committed, SinkError>>, SinkError> {
        let tx = self.tx.as_ref().ok_or(SinkError::Stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Commit(checkpoint, reply))
            .await
            .map_err(|_| SinkError::Stopped)?;
        Ok(rx)
    }

    /// Aborts the open transaction (shutdown inside a WAL transaction).
    pub async fn abort(&self) -> Result<(), SinkError> {
        let tx = self.tx.as_ref().ok_or(SinkError::Stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Abort(reply))
            .await
            .map_err(|_| SinkError::Stopped)?;
        rx.await.map_err(|_| SinkError::Stopped)?
    }

    /// Stops the thread and waits for it (the producer is closed, which a new producer with the
    /// same transactional id needs before it can take over cleanly).
    pub async fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Closing the channel ends the thread; it is not joined here (Drop cannot wait
        // asynchronously). Use `close` to wait.
        self.tx.take();
    }
}

/// Sends `r`; a record refused for good goes to the DLQ topic instead (counted in
/// `rerouted`). Refused by the DLQ topic too, or without one, it is an error: the DLQ cannot
/// help, and the operator must.
fn send_or_reroute<B: Backend>(
    backend: &mut B,
    r: OutRecord,
    dlq_topic: Option<&Arc<str>>,
    rerouted: &mut (u64, u64),
) -> Result<(), SinkError> {
    match backend.send(r) {
        Err(SinkError::Rejected {
            reason,
            class,
            keep_value,
            record: Returned(record),
        }) => {
            let (Some(dlq), Some(r)) = (dlq_topic, record) else {
                return Err(SinkError::Fatal(format!(
                    "a record was refused ({class}: {reason}) and there is no DLQ topic to send it to"
                )));
            };
            // The reason names topics and sizes, never the payload.
            tracing::warn!(topic = %r.topic, class, error = %reason, "record refused for good; sent to the DLQ topic");
            let bytes = r.value.len() as u64;
            let to_dlq = (*r).into_dlq(dlq.clone(), reason.clone(), class, keep_value);
            match backend.send(to_dlq) {
                Ok(()) => {
                    rerouted.0 += 1;
                    rerouted.1 += bytes;
                    Ok(())
                }
                Err(SinkError::Rejected { reason: why, .. }) => Err(SinkError::Fatal(format!(
                    "the DLQ topic {dlq} refused a record too ({why}); the original was refused with: {reason}"
                ))),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

fn run_thread<B: Backend>(
    mut backend: B,
    rx: &mut mpsc::Receiver<Command>,
    dlq_topic: Option<Arc<str>>,
) {
    let mut open = false;
    let mut rerouted = (0u64, 0u64);
    let mut records = 0usize;
    let mut bytes = 0usize;
    let mut failed: Option<SinkError> = None;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Command::Records(batch) => {
                if failed.is_some() {
                    continue;
                }
                for r in batch {
                    let step = if open { Ok(()) } else { backend.begin() };
                    let step = step.and_then(|()| {
                        open = true;
                        records += 1;
                        bytes += r.size();
                        send_or_reroute(&mut backend, r, dlq_topic.as_ref(), &mut rerouted)
                    });
                    if let Err(e) = step {
                        tracing::warn!(error = %e, "sink send failed; the transaction will be aborted");
                        let _ = backend.abort();
                        failed = Some(e);
                        open = false;
                        break;
                    }
                }
            }
            Command::Commit(cp, reply) => {
                if let Some(e) = failed.take() {
                    // Records of this transaction were lost to the error: it must not commit.
                    // A definite error keeps its class (fatal, config); others abort.
                    let e = match e {
                        SinkError::Fatal(_) | SinkError::Config(_) => e,
                        other => SinkError::Aborted(other.to_string()),
                    };
                    let _ = reply.send(Err(e));
                    return;
                }
                let started = std::time::Instant::now();
                let res = backend.commit(&cp);
                let n = std::mem::take(&mut records);
                let b = std::mem::take(&mut bytes);
                let (rerouted, rerouted_bytes) = std::mem::take(&mut rerouted);
                open = false;
                match res {
                    Ok(()) => {
                        let _ = reply.send(Ok(Committed {
                            checkpoint: cp,
                            records: n,
                            bytes: b,
                            commit_duration: started.elapsed(),
                            delivered_after: backend.delivered_after(),
                            rerouted,
                            rerouted_bytes,
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            Command::Abort(reply) => {
                let res = if open { backend.abort() } else { Ok(()) };
                open = false;
                records = 0;
                bytes = 0;
                rerouted = (0, 0);
                failed = None;
                let _ = reply.send(res);
            }
        }
    }
    if open {
        let _ = backend.abort();
    }
}
