//! What both relays share after the envelope: batching, the one commit in flight, the
//! checkpoint carried by each Kafka transaction, commit-time metrics, DLQ records, and the
//! reconnect loop around a relay's session. Generic over the sink's [`Backend`]: the relays give
//! it records and source positions, it gives back committed checkpoints.
//!
//! ```text
//!  relay (cdc / poll)                      Pipeline                          Sink thread
//!  begin_unit ─ push … push ─ end_unit ──▶ batch ──close (count/bytes/delay)──▶ records, checkpoint,
//!        ◀──────────── committed checkpoint ─────── on_committed ◀──────────── commit result
//!  confirm it (cdc: standby status to Postgres; poll: nothing to confirm)
//! ```
//!
//! ## Units and batches
//!
//! A *unit* is what the source commits atomically: a WAL transaction for CDC, a batch of rows
//! read below the visibility horizon for polling. Its records go to the sink as they arrive (a
//! unit of any size is never held whole in memory: it sits in the open Kafka transaction,
//! invisible to `read_committed` readers). A batch (one Kafka transaction) closes only between
//! units, when it reaches `max_events` or `max_bytes`, or `max_delay` after its first complete
//! unit. One commit is in flight at a time; meanwhile the relay goes on reading and the next
//! batch grows, so under load batches grow to what arrives during one commit.
//!
//! ## Where the time goes
//!
//! `relay_stage_seconds{relay, stage}` places each source transaction (unit) with records on
//! a time line that starts at its Postgres commit: `received` (its last record reached the
//! pipeline), `batch_closed` (the Kafka transaction carrying it was asked to commit),
//! `produced` (the sink thread had handed every record of that transaction to the producer),
//! `delivered` (every record acknowledged) and `committed` (the commit returned and the loop saw
//! it). It is observed once per unit, not per event: the per-record path takes no cost, and a
//! unit of many events counts once (the relay's units are what Postgres commits). `produced`
//! and `delivered` happen on the sink thread; they are placed back from the moment the loop
//! sees the commit by the durations the sink thread measured (so a loop busy elsewhere when the
//! commit returns delays them all alike, and `committed` shows it).
//!
//! ## What is counted when
//!
//! Events, bytes and DLQ records are counted when the Kafka transaction that carries them has
//! committed, never when they are read: an aborted transaction's records are read again after
//! the reconnect, and counting them twice would tell on-call that more was delivered than was.

use crate::checkpoint::Checkpoint;
use crate::config::RelayKind;
use crate::health::Health;
use crate::metrics::{Component, EventKind, Metrics, Stage, TxnOutcome};
use crate::outbox::{Event, OutRecord, TopicError, TopicRouter};
use crate::replication::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::{Committed, Sink, SinkError};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
// The tokio clock, so that the batching unit tests can run under `tokio::time::pause()`.
use tokio::time::Instant;

/// When a batch closes.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
    /// How fast batches may close (see [`Pacing`]).
    pub pacing: Pacing,
}

impl BatchLimits {
    /// The `[batch]` section's limits.
    pub fn from_config(cfg: &crate::config::BatchConfig) -> BatchLimits {
        BatchLimits {
            max_events: cfg.max_events,
            max_bytes: cfg.max_bytes,
            max_delay: cfg.max_delay,
            pacing: Pacing::new(cfg.max_commit_rate, cfg.commit_burst),
        }
    }
}

/// The Kafka transaction rate the relay stays under: on average at most `rate` commits a
/// second, with up to `burst` of them back to back after a quiet spell.
///
/// The broker's work follows the number of Kafka transactions, not the number of events (each
/// commit costs an AddPartitionsToTxn, a produce request and a marker per partition touched,
/// and three transaction-log writes; docs/eos-levers.md measures it). Below the rate nothing
/// waits: a batch closes as soon as it is due (`max_delay` after its first unit, or when the
/// commit in flight returns). Above it, a due batch waits for its turn and grows meanwhile, so
/// the transactions get larger instead of more frequent: the latency this costs is at most
/// one interval (`1 / rate`), and only while the source produces more than `rate` batches a
/// second would need.
///
/// It is the generic cell rate algorithm: a close is allowed from `tat - (burst - 1) / rate`
/// on, where `tat` (the theoretical arrival time) moves `1 / rate` past the later of itself and
/// the close. With `burst = 1` closes are simply at least `1 / rate` apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// Time between closes at the sustained rate; `None`: unpaced.
    interval: Option<Duration>,
    /// How far ahead of `tat` a close may be (`(burst - 1) * interval`).
    tolerance: Duration,
}

impl Pacing {
    /// `rate` commits a second (0: unpaced), `burst` (at least 1) back to back.
    pub fn new(rate: f64, burst: u32) -> Pacing {
        // Validation refuses a positive rate whose interval is unrepresentable; here it is
        // unpaced rather than a panic.
        let Some(interval) = crate::config::BatchConfig::commit_interval(rate) else {
            return Pacing::unpaced();
        };
        Pacing {
            interval: Some(interval),
            tolerance: interval
                .checked_mul(burst.max(1) - 1)
                .unwrap_or(Duration::MAX),
        }
    }

    /// No pacing: every batch closes when it is due.
    pub fn unpaced() -> Pacing {
        Pacing {
            interval: None,
            tolerance: Duration::ZERO,
        }
    }

    /// The earliest a close may happen, given the theoretical arrival time `tat` (`None`: any
    /// time, also when the burst's tolerance reaches back past the clock's start).
    fn earliest(&self, tat: Option<Instant>) -> Option<Instant> {
        self.interval?;
        tat?.checked_sub(self.tolerance)
    }

    /// The theoretical arrival time after a close at `now`.
    fn advance(&self, tat: Option<Instant>, now: Instant) -> Option<Instant> {
        let interval = self.interval?;
        tat.map_or(now, |t| t.max(now)).checked_add(interval)
    }
}

/// The source position a complete unit leaves the relay at; the checkpoint records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// CDC: the last delivered WAL transaction's commit LSN and end LSN (or, when idle, the
    /// last commit LSN and a keepalive's position).
    Wal { commit_lsn: Lsn, end_lsn: Lsn },
    /// Polling: the cursor `(txid, id)` of the last delivered row.
    Table { txid: u64, id: i64 },
    /// CDC's first-start backfill: the last outbox `id` published from the table, rows so far,
    /// and whether it is complete (the checkpoint's `backfill` record must exist).
    Backfill { cursor: i64, rows: u64, done: bool },
}

impl Position {
    fn apply(self, cp: &mut Checkpoint) {
        match self {
            Position::Wal {
                commit_lsn,
                end_lsn,
            } => {
                cp.commit_lsn = commit_lsn.0;
                cp.end_lsn = end_lsn.0;
            }
            Position::Table { txid, id } => {
                cp.poll_txid = Some(txid);
                cp.poll_id = Some(id);
            }
            Position::Backfill { cursor, rows, done } => {
                if let Some(b) = cp.backfill.as_mut() {
                    b.cursor = cursor;
                    b.rows = rows;
                    b.done = done;
                }
            }
        }
    }
}

/// What one record is, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Event(EventKind),
    /// A record sent to the DLQ topic instead of its event.
    Dlq,
}

/// The contents of the open (not yet committed) Kafka transaction.
#[derive(Default, Debug)]
struct Batch {
    rows: u64,
    messages: u64,
    dlq: u64,
    /// Payload bytes of the events (what `relay_event_bytes_total` counts).
    payload_bytes: u64,
    /// Wire bytes of every record (what `max_bytes` limits).
    bytes: usize,
    /// Commit times (µs since the Unix epoch) of the units with records in it.
    commit_times: Vec<i64>,
    /// The first complete unit's arrival: the batch's deadline counts from here.
    opened: Option<Instant>,
    /// Where the last complete unit left the source.
    position: Option<Position>,
    /// Heartbeats received in it: when each was emitted (µs since the Unix epoch).
    heartbeats: Vec<i64>,
    /// The snapshot the last heartbeat in it took (see `Checkpoint::delivered_snapshot`).
    snapshot: Option<String>,
}

impl Batch {
    fn events(&self) -> u64 {
        self.rows + self.messages + self.dlq
    }
}

struct Inflight {
    reply: oneshot::Receiver<Result<Committed, SinkError>>,
    batch: Batch,
    /// When the batch was closed (µs since the Unix epoch, by the pipeline's clock).
    closed_us: i64,
    /// When its Kafka transaction received its first record.
    began: Option<Instant>,
}

/// Counters resolved once, not per event.
struct Counters {
    rows: prometheus::IntCounter,
    messages: prometheus::IntCounter,
    bytes: prometheus::IntCounter,
    dlq: prometheus::IntCounter,
    /// `relay_stage_seconds`, in the order of [`Stage`]'s variants.
    received: prometheus::Histogram,
    batch_closed: prometheus::Histogram,
    produced: prometheus::Histogram,
    delivered: prometheus::Histogram,
    committed: prometheus::Histogram,
    /// `relay_pacing_wait_seconds_total`, `relay_paced_batches_total`.
    pacing_wait: prometheus::Counter,
    paced: prometheus::IntCounter,
}

/// The wall clock the stage timings are read from, in µs since the Unix epoch (replaceable so
/// that tests can run it on tokio's paused time).
pub type Clock = Box<dyn Fn() -> i64 + Send + Sync>;

/// Seconds from `from_us` to `to_us`, never negative (clocks of two hosts may disagree a little).
fn age(from_us: i64, to_us: i64) -> f64 {
    (to_us - from_us).max(0) as f64 / 1e6
}

/// Records handed to the sink thread at a time.
const CHUNK: usize = 256;

/// Batching, the commit in flight and the checkpoint, for one session of one relay.
pub struct Pipeline {
    kind: RelayKind,
    sink: Sink,
    limits: BatchLimits,
    metrics: Metrics,
    counters: Counters,
    /// The last checkpoint committed to Kafka.
    committed: Checkpoint,
    batch: Batch,
    pending: Vec<OutRecord>,
    inflight: Option<Inflight>,
    /// A unit has begun and not yet ended: the batch may not close now.
    unit_open: bool,
    /// When the open Kafka transaction received its first record.
    began: Option<Instant>,
    /// Records of the open unit so far.
    unit_records: u64,
    /// The pacer's theoretical arrival time (see [`Pacing`]).
    tat: Option<Instant>,
    /// When the last commit's result was taken (a batch waits for it before it may close).
    last_commit_return: Option<Instant>,
    /// `kafka.transaction_timeout`: a transaction that fails after being open longer is too
    /// large to ever commit (see [`SinkError::TransactionTimeout`]).
    transaction_timeout: Option<Duration>,
    clock: Clock,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("kind", &self.kind)
            .field("committed", &self.committed)
            .field("batch", &self.batch)
            .field("unit_open", &self.unit_open)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline over an opened sink, resuming after `committed` (the checkpoint read back
    /// from Kafka, or a fresh one naming the relay and the cluster).
    pub fn new(
        kind: RelayKind,
        sink: Sink,
        limits: BatchLimits,
        metrics: Metrics,
        committed: Checkpoint,
    ) -> Pipeline {
        let (pacing_wait, paced) = metrics.pacing(kind);
        let counters = Counters {
            rows: metrics.events(kind, EventKind::Row),
            messages: metrics.events(kind, EventKind::Message),
            bytes: metrics.event_bytes(kind),
            dlq: metrics.dlq_records(kind),
            received: metrics.stage_seconds(kind, Stage::Received),
            batch_closed: metrics.stage_seconds(kind, Stage::BatchClosed),
            produced: metrics.stage_seconds(kind, Stage::Produced),
            delivered: metrics.stage_seconds(kind, Stage::Delivered),
            committed: metrics.stage_seconds(kind, Stage::Committed),
            pacing_wait,
            paced,
        };
        Pipeline {
            kind,
            sink,
            limits,
            metrics,
            counters,
            committed,
            batch: Batch::default(),
            pending: Vec::with_capacity(CHUNK),
            inflight: None,
            unit_open: false,
            began: None,
            unit_records: 0,
            tat: None,
            last_commit_return: None,
            transaction_timeout: None,
            clock: Box::new(|| unix_micros(SystemTime::now())),
        }
    }

    /// Reads the stage timings from `clock` instead of the system's wall clock.
    pub fn with_clock(mut self, clock: Clock) -> Pipeline {
        self.clock = clock;
        self
    }

    /// The broker's limit on how long a transaction may stay open (`kafka.transaction_timeout`):
    /// a failure after that long is reported as [`SinkError::TransactionTimeout`], which no
    /// retry can fix, instead of a transient error retried forever.
    pub fn with_transaction_timeout(mut self, limit: Duration) -> Pipeline {
        self.transaction_timeout = Some(limit);
        self
    }

    /// `e` as the transaction-timeout error when the failed transaction had been open longer
    /// than the limit.
    fn explain(&self, e: SinkError, began: Option<Instant>) -> SinkError {
        match (self.transaction_timeout, began) {
            (Some(limit), Some(began))
                if began.elapsed() >= limit
                    && !matches!(e, SinkError::TransactionTimeout { .. }) =>
            {
                SinkError::TransactionTimeout {
                    age: began.elapsed(),
                    limit,
                    cause: e.to_string(),
                }
            }
            _ => e,
        }
    }

    /// The last checkpoint committed to Kafka.
    pub fn committed(&self) -> &Checkpoint {
        &self.committed
    }

    /// The checkpoint to build on (the relay records a new timeline here, say).
    pub fn committed_mut(&mut self) -> &mut Checkpoint {
        &mut self.committed
    }

    /// A unit (WAL transaction, poll batch) starts: no batch closes until it ends.
    pub fn begin_unit(&mut self) {
        self.unit_open = true;
    }

    /// Whether a unit has begun and not ended.
    pub fn unit_open(&self) -> bool {
        self.unit_open
    }

    /// Adds a record of the open unit to the open Kafka transaction. Waits while the sink's
    /// channel is full (backpressure: the relay stops reading its source meanwhile).
    pub async fn push(&mut self, record: OutRecord, kind: RecordKind) -> Result<(), SinkError> {
        self.unit_records += 1;
        match kind {
            RecordKind::Event(EventKind::Row) => self.batch.rows += 1,
            RecordKind::Event(EventKind::Message) => self.batch.messages += 1,
            RecordKind::Dlq => self.batch.dlq += 1,
        }
        if matches!(kind, RecordKind::Event(_)) {
            self.batch.payload_bytes += record.value.len() as u64;
        }
        self.batch.bytes += record.size();
        self.began.get_or_insert_with(Instant::now);
        self.pending.push(record);
        if self.pending.len() >= CHUNK {
            let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
            if let Err(e) = self.sink.send(chunk).await {
                return Err(self.explain(e, self.began));
            }
        }
        Ok(())
    }

    /// The open unit is complete and leaves the source at `position`. `commit_ts_us` (when the
    /// source committed it) is kept for the commit-to-Kafka latency if the unit had records.
    /// Closes the batch if a limit is reached.
    pub async fn end_unit(
        &mut self,
        position: Position,
        commit_ts_us: Option<i64>,
    ) -> Result<(), SinkError> {
        self.unit_open = false;
        if let Some(ts) = commit_ts_us.filter(|_| self.unit_records > 0) {
            self.batch.commit_times.push(ts);
            self.counters.received.observe(age(ts, (self.clock)()));
        }
        self.unit_records = 0;
        self.batch.position = Some(position);
        self.batch.opened.get_or_insert_with(Instant::now);
        if self.due(Instant::now()) {
            self.close_batch().await?;
        }
        Ok(())
    }

    /// The open unit is dropped whole (already delivered): nothing of it is in the batch.
    pub fn skip_unit(&mut self) {
        self.unit_open = false;
        self.unit_records = 0;
    }

    /// A heartbeat emitted at `sent_us` arrived; its round trip is observed at the commit.
    pub fn heartbeat(&mut self, sent_us: i64, snapshot: Option<String>) {
        self.batch.heartbeats.push(sent_us);
        if snapshot.is_some() {
            self.batch.snapshot = snapshot;
        }
    }

    /// Nothing read is waiting for Kafka: no unit open, nothing batched, no commit in flight.
    pub fn is_idle(&self) -> bool {
        !self.unit_open
            && self.inflight.is_none()
            && self.batch.position.is_none()
            && self.batch.events() == 0
            && self.pending.is_empty()
    }

    /// Records `position` in a checkpoint of its own (an idle relay's progress: a keepalive's
    /// position, a poll cursor that moved past rows of no interest). Only when idle.
    pub async fn checkpoint_at(&mut self, position: Position) -> Result<(), SinkError> {
        if !self.is_idle() {
            return Ok(());
        }
        self.batch.position = Some(position);
        self.batch.opened = Some(Instant::now());
        self.close_batch().await
    }

    /// When the batch must close: `max_delay` after its first complete unit. `None` while a
    /// commit is in flight or a unit is open (it closes after them), or when there is nothing.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        if self.inflight.is_some() || self.unit_open {
            return None;
        }
        self.batch.position?;
        let opened = self.batch.opened?;
        Some(self.paced(opened + self.limits.max_delay))
    }

    /// `at`, or later if the pacer holds the next close back (see [`Pacing`]).
    fn paced(&self, at: Instant) -> Instant {
        match self.limits.pacing.earliest(self.tat) {
            Some(earliest) => at.max(earliest),
            None => at,
        }
    }

    fn due(&self, now: Instant) -> bool {
        if self.inflight.is_some() || self.unit_open || self.batch.position.is_none() {
            return false;
        }
        self.batch.events() >= self.limits.max_events as u64
            || self.batch.bytes >= self.limits.max_bytes
            || self
                .batch
                .opened
                .is_some_and(|o| now >= self.paced(o + self.limits.max_delay))
    }

    /// Closes the batch when its deadline passed (see [`Pipeline::deadline`]).
    pub async fn on_deadline(&mut self) -> Result<(), SinkError> {
        if self.due(Instant::now()) {
            self.close_batch().await?;
        }
        Ok(())
    }

    /// Sends the batch's checkpoint and asks for the commit; the result arrives through
    /// [`Pipeline::next_commit`]. Only with no commit in flight, so `committed` is the latest
    /// checkpoint and the new one derives from it.
    async fn close_batch(&mut self) -> Result<(), SinkError> {
        if self.inflight.is_some() {
            return Ok(());
        }
        let Some(position) = self.batch.position else {
            return Ok(());
        };
        if !self.pending.is_empty() {
            self.sink.send(std::mem::take(&mut self.pending)).await?;
        }
        let mut cp = self.committed.clone();
        position.apply(&mut cp);
        cp.events_total += self.batch.events();
        // The heartbeat's WAL transaction is a unit of this batch, complete (a batch closes
        // only between units): once committed, what its snapshot saw is delivered.
        if let Some(snap) = self.batch.snapshot.take() {
            cp.delivered_snapshot = Some(snap);
        }
        cp.written_at_us = unix_micros(SystemTime::now());
        let reply = self.sink.commit(cp).await?;
        let now = Instant::now();
        self.count_pacing_wait(now);
        self.tat = self.limits.pacing.advance(self.tat, now);
        let batch = std::mem::take(&mut self.batch);
        let began = self.began.take().or_else(|| Some(Instant::now()));
        self.inflight = Some(Inflight {
            reply,
            batch,
            closed_us: (self.clock)(),
            began,
        });
        Ok(())
    }

    /// Counts how long the batch closing at `now` was held back by the pacer: from when it was
    /// ready (due by `max_delay`, and the previous commit returned) to when the pacer let it go.
    fn count_pacing_wait(&self, now: Instant) {
        let (Some(earliest), Some(opened)) =
            (self.limits.pacing.earliest(self.tat), self.batch.opened)
        else {
            return;
        };
        let due = opened + self.limits.max_delay;
        let ready = self.last_commit_return.map_or(due, |r| r.max(due));
        // Closed before the pacer's time: a count or byte limit closed it, unpaced.
        if now >= earliest && earliest > ready {
            self.counters
                .pacing_wait
                .inc_by((earliest - ready).as_secs_f64());
            self.counters.paced.inc();
        }
    }

    /// Waits for the commit in flight; pending forever when there is none (for `select!`).
    /// Cancellation safe: the reply stays in place until it has produced a value. Pass the
    /// result to [`Pipeline::on_committed`].
    pub async fn next_commit(&mut self) -> CommitResult {
        let Some(f) = self.inflight.as_mut() else {
            return std::future::pending().await;
        };
        let res = (&mut f.reply).await;
        CommitResult(match res {
            Ok(r) => r,
            Err(_) => Err(SinkError::Stopped),
        })
    }

    /// Records a finished commit: counts what it carried and closes the next batch if it is
    /// due. Returns the checkpoint now committed, whose position the relay may confirm.
    pub async fn on_committed(&mut self, res: CommitResult) -> Result<&Checkpoint, SinkError> {
        let Some(f) = self.inflight.take() else {
            return Err(SinkError::Stopped);
        };
        self.last_commit_return = Some(Instant::now());
        let committed = match res.0 {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .kafka_transactions(self.kind, TxnOutcome::Aborted)
                    .inc();
                return Err(self.explain(e, f.began));
            }
        };
        let mut batch = f.batch;
        // Records the sink sent to the DLQ instead (their topic refused them for good) are DLQ
        // records, not events. Which kind each was is not reported back; rows come first, as
        // they are by far the most common.
        let from_rows = committed.rerouted.min(batch.rows);
        batch.rows -= from_rows;
        batch.messages = batch
            .messages
            .saturating_sub(committed.rerouted - from_rows);
        batch.dlq += committed.rerouted;
        batch.payload_bytes = batch.payload_bytes.saturating_sub(committed.rerouted_bytes);
        let now = unix_micros(SystemTime::now());
        self.metrics
            .kafka_transactions(self.kind, TxnOutcome::Committed)
            .inc();
        self.counters.rows.inc_by(batch.rows);
        self.counters.messages.inc_by(batch.messages);
        self.counters.dlq.inc_by(batch.dlq);
        self.counters.bytes.inc_by(batch.payload_bytes);
        self.metrics
            .batch_events(self.kind)
            .observe(batch.events() as f64);
        self.metrics
            .kafka_commit_seconds(self.kind)
            .observe(committed.commit_duration.as_secs_f64());
        let latency = self.metrics.commit_to_kafka_seconds(self.kind);
        for t in &batch.commit_times {
            latency.observe((now - t).max(0) as f64 / 1e6);
        }
        let committed_us = (self.clock)();
        let produced_us = (committed_us - committed.commit_duration.as_micros() as i64)
            .clamp(f.closed_us, committed_us);
        let delivered_us = committed
            .delivered_after
            .map_or(produced_us, |d| produced_us + d.as_micros() as i64)
            .min(committed_us);
        let c = &self.counters;
        for &t in &batch.commit_times {
            c.batch_closed.observe(age(t, f.closed_us));
            c.produced.observe(age(t, produced_us));
            c.delivered.observe(age(t, delivered_us));
            c.committed.observe(age(t, committed_us));
        }
        for h in &batch.heartbeats {
            self.metrics
                .heartbeat_rtt_seconds()
                .observe((now - h).max(0) as f64 / 1e6);
        }
        self.committed = committed.checkpoint;
        tracing::debug!(
            relay = self.kind.as_str(),
            lsn = %self.committed.end_lsn(),
            events = batch.events(),
            commit_ms = committed.commit_duration.as_millis() as u64,
            "kafka transaction committed"
        );
        if self.due(Instant::now()) {
            self.close_batch().await?;
        }
        Ok(&self.committed)
    }

    /// Shutdown: commits what is complete and waits for it; a unit that is still open is
    /// aborted with everything queued beside it in the open Kafka transaction (it is read again
    /// after a restart). Returns the last committed checkpoint.
    pub async fn drain(&mut self) -> Result<&Checkpoint, SinkError> {
        // A finished commit may close the next batch at once (it is due): wait until none is
        // in flight, so that the checkpoint returned is the last one Kafka has.
        while self.inflight.is_some() {
            let res = self.next_commit().await;
            self.on_committed(res).await?;
        }
        if self.unit_open {
            self.pending.clear();
            self.sink.abort().await?;
            self.metrics
                .kafka_transactions(self.kind, TxnOutcome::Aborted)
                .inc();
            self.batch = Batch::default();
            self.unit_open = false;
        } else if self.batch.position.is_some() {
            self.close_batch().await?;
            while self.inflight.is_some() {
                let res = self.next_commit().await;
                self.on_committed(res).await?;
            }
        }
        Ok(&self.committed)
    }

    /// The session ends on an error: whatever was open dies with the producer (it aborts), and
    /// nothing past the last committed checkpoint was confirmed. Counts that abort and stops
    /// the sink thread.
    pub async fn close(self) {
        let open = self.batch.events() > 0 || self.inflight.is_some() || self.unit_open;
        if open {
            self.metrics
                .kafka_transactions(self.kind, TxnOutcome::Aborted)
                .inc();
        }
        self.sink.close().await;
    }

    /// Stops the sink thread after a clean drain.
    pub async fn finish(self) {
        self.sink.close().await;
    }
}

/// The outcome of the commit in flight, from [`Pipeline::next_commit`].
#[derive(Debug)]
pub struct CommitResult(Result<Committed, SinkError>);

/// Why a record went to the DLQ topic, and the identity of what it replaces: enough for a DLQ
/// reader to find the row (or message) it came from.
#[derive(Debug, Default)]
pub struct DlqRecord {
    /// Why the record could not be published; never the payload.
    pub reason: String,
    /// The original key (the aggregate id, when there was one).
    pub key: Bytes,
    /// The original value (the payload), unchanged.
    pub value: Bytes,
    /// Identity and source headers: `event_id`, `aggregate_type`, `aggregate_id`, `event_type`,
    /// `id` (outbox id), `lsn`, `xid`, `table`, whichever are known.
    pub identity: Vec<(&'static str, Bytes)>,
    /// The row's own headers object, as it was.
    pub original_headers: Vec<(String, Bytes)>,
}

impl DlqRecord {
    /// The Kafka record on the DLQ topic: headers `error` and `error_class` first, then the
    /// identity, then the original headers prefixed `original.`.
    pub fn into_record(self, topic: Arc<str>, class: &'static str) -> OutRecord {
        let mut headers = Vec::with_capacity(self.identity.len() + 2);
        headers.push(("error", Bytes::from(self.reason)));
        headers.push(("error_class", Bytes::from_static(class.as_bytes())));
        headers.extend(self.identity);
        OutRecord {
            topic,
            key: self.key,
            value: self.value,
            headers,
            extra_headers: self
                .original_headers
                .into_iter()
                .map(|(k, v)| (format!("original.{k}"), v))
                .collect(),
        }
    }
}

impl DlqRecord {
    /// The DLQ record of a source row that is not an event (a NULL column, bad headers), of
    /// class `unmappable_row`.
    pub fn unmappable_row(self, dlq_topic: Arc<str>) -> (OutRecord, RecordKind) {
        (
            self.into_record(dlq_topic, "unmappable_row"),
            RecordKind::Dlq,
        )
    }
}

/// An event whose `aggregate_type` makes no valid topic (see [`outbox`](crate::outbox)'s
/// routing rules), from [`route`].
#[derive(Debug)]
pub struct Unroutable {
    pub event: Event,
    pub why: TopicError,
}

/// The record of `event` on its topic, or the event back when its aggregate type makes no
/// valid topic. Both relays route through here, so their records and DLQ records look alike.
pub fn route(
    router: &mut TopicRouter,
    event: Event,
    kind: EventKind,
) -> Result<(OutRecord, RecordKind), Box<Unroutable>> {
    match router.topic(&event.aggregate_type) {
        Ok(topic) => Ok((event.into_record(topic), RecordKind::Event(kind))),
        // Boxed: the error path is rare, and the Ok path should not carry its size.
        Err(why) => Err(Box::new(Unroutable { event, why })),
    }
}

impl Unroutable {
    /// The DLQ record on `dlq_topic` instead: the event's identity, then `source` (the relay's
    /// position headers: outbox `id`, `lsn` and `xid` or `txid`, and `table`), its key, payload
    /// and headers.
    pub fn into_dlq(
        self: Box<Self>,
        dlq_topic: Arc<str>,
        source: Vec<(&'static str, Bytes)>,
    ) -> (OutRecord, RecordKind) {
        let Unroutable { event, why } = *self;
        tracing::warn!(
            event_id = %event.event_id,
            error = %why,
            "event's aggregate_type cannot be a topic; sent to the DLQ topic"
        );
        let mut identity = vec![
            ("event_id", Bytes::from(event.event_id)),
            ("aggregate_type", Bytes::from(event.aggregate_type)),
            ("aggregate_id", event.aggregate_id.clone()),
            ("event_type", Bytes::from(event.event_type)),
        ];
        identity.extend(source);
        let dlq = DlqRecord {
            reason: why.to_string(),
            key: event.aggregate_id,
            value: event.payload,
            identity,
            original_headers: event
                .headers
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
        };
        (dlq.into_record(dlq_topic, why.class()), RecordKind::Dlq)
    }
}

/// What to do about a session's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Reconnect with backoff and resume from the last committed checkpoint.
    Retry,
    /// Exit non-zero; a restart may help once the cause is gone (exit code 1).
    Fatal,
    /// Resuming could skip or misplace events, or cannot succeed with this configuration:
    /// refuse until an operator decides (exit code 3; restarting refuses again).
    Refuse,
}

/// A relay session's error, as the reconnect loop sees it.
pub trait SessionError: std::fmt::Display {
    fn disposition(&self) -> Disposition;
    /// Which side failed, for `relay_reconnects_total`.
    fn component(&self) -> Component;
}

/// A session future borrowing the relay's settings.
pub type SessionFuture<'a, E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send + 'a>>;

/// Backoff between sessions: from 100 ms doubling to 30 s, reset after a session that ran
/// 30 s; each sleep is drawn uniformly from its upper half (jitter, so relays that failed
/// together do not reconnect in lockstep).
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    /// The sleep before the next attempt, after a session that ran `ran`.
    pub fn next(&mut self, ran: Duration) -> Duration {
        if ran > Self::MAX {
            self.next = Self::FIRST;
        }
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Runs sessions of relay `kind` until shutdown (Ok) or a fatal error (Err). A retryable error
/// reconnects after a jittered backoff and the next session resumes from the last committed
/// checkpoint; consecutive failures are exported as `relay_consecutive_failures`.
pub async fn run_sessions<'a, E: SessionError>(
    kind: RelayKind,
    // Names the instance in the log lines (the slot, for CDC).
    name: &str,
    metrics: &Metrics,
    health: &Health,
    shutdown: &Shutdown,
    mut session: impl FnMut() -> SessionFuture<'a, E>,
) -> Result<(), E> {
    let mut backoff = Backoff::default();
    let mut failures: u64 = 0;
    let consecutive = metrics.consecutive_failures(kind);
    loop {
        let started = Instant::now();
        let result = session().await;
        health.set_ready(false);
        metrics.set_up_and_ready(true, false);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.disposition() == Disposition::Retry => {
                metrics.reconnects(e.component()).inc();
                // /readyz says why the relay is not ready.
                health.set_note(
                    crate::health::NoteSource::Relay,
                    Some(format!("reconnecting after: {e}")),
                );
                if started.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures += 1;
                consecutive.set(failures as i64);
                let sleep = backoff.next(started.elapsed());
                tracing::warn!(
                    relay = kind.as_str(),
                    name,
                    error = %e,
                    consecutive_failures = failures,
                    backoff_ms = sleep.as_millis() as u64,
                    "session ended; reconnecting"
                );
                tokio::select! {
                    _ = shutdown.triggered() => return Ok(()),
                    _ = tokio::time::sleep(sleep) => {}
                }
            }
            Err(e) => {
                failures += 1;
                consecutive.set(failures as i64);
                tracing::error!(relay = kind.as_str(), name, error = %e, "relay stopped: operator action needed");
                health.set_healthy(false);
                return Err(e);
            }
        }
    }
}

/// Called by a session once it is connected and streaming: the failures in a row are over.
pub fn session_healthy(kind: RelayKind, metrics: &Metrics) {
    metrics.consecutive_failures(kind).set(0);
}

pub(crate) fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::null::NullBackend;
    use std::sync::atomic::Ordering;

    fn record(n: usize) -> OutRecord {
        OutRecord {
            topic: "t".into(),
            key: Bytes::from(format!("k{n}")),
            value: Bytes::from_static(b"{}"),
            headers: Vec::new(),
            extra_headers: Vec::new(),
        }
    }

    fn wal(n: u64) -> Position {
        Position::Wal {
            commit_lsn: Lsn(n * 100),
            end_lsn: Lsn(n * 100 + 8),
        }
    }

    async fn pipeline(limits: BatchLimits) -> (Pipeline, NullBackend, Metrics) {
        let backend = NullBackend::default();
        let (sink, cp) = Sink::start(backend.clone(), "cdc/t".into()).await.unwrap();
        assert!(cp.is_none());
        let metrics = Metrics::new().unwrap();
        let committed = Checkpoint {
            relay: "cdc/t".into(),
            system_id: 7,
            ..Checkpoint::default()
        };
        let p = Pipeline::new(RelayKind::Cdc, sink, limits, metrics.clone(), committed);
        (p, backend, metrics)
    }

    fn limits(max_events: usize, max_delay_ms: u64) -> BatchLimits {
        BatchLimits {
            max_events,
            max_bytes: usize::MAX,
            max_delay: Duration::from_millis(max_delay_ms),
            pacing: Pacing::unpaced(),
        }
    }

    /// Feeds `n` one-record units.
    async fn units(p: &mut Pipeline, from: u64, n: u64) {
        for i in from..from + n {
            p.begin_unit();
            p.push(record(i as usize), RecordKind::Event(EventKind::Row))
                .await
                .unwrap();
            p.end_unit(wal(i), Some(0)).await.unwrap();
        }
    }

    async fn settle(p: &mut Pipeline) -> Checkpoint {
        let res = p.next_commit().await;
        p.on_committed(res).await.unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_events_between_units_only() {
        let (mut p, backend, metrics) = pipeline(limits(3, 60_000)).await;
        units(&mut p, 1, 2).await;
        assert!(p.inflight.is_none(), "2 events < max_events: still open");
        // A unit with 2 records: the batch passes max_events inside it but closes only at its end.
        p.begin_unit();
        p.push(record(3), RecordKind::Event(EventKind::Row))
            .await
            .unwrap();
        p.push(record(4), RecordKind::Event(EventKind::Row))
            .await
            .unwrap();
        assert!(p.inflight.is_none(), "never inside a unit");
        p.end_unit(wal(3), Some(0)).await.unwrap();
        assert!(p.inflight.is_some(), "closed at the unit's end");
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 308);
        assert_eq!(cp.events_total, 4);
        assert_eq!(backend.committed_records.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.events(RelayKind::Cdc, EventKind::Row).get(), 4);
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_its_deadline() {
        let (mut p, backend, metrics) = pipeline(limits(1000, 50)).await;
        units(&mut p, 1, 1).await;
        let deadline = p.deadline().expect("a deadline once a unit is complete");
        assert_eq!(metrics.events(RelayKind::Cdc, EventKind::Row).get(), 0);
        tokio::time::sleep_until(deadline).await;
        p.on_deadline().await.unwrap();
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 108);
        assert_eq!(backend.commits.load(Ordering::Relaxed), 1);
        assert_eq!(
            metrics.events(RelayKind::Cdc, EventKind::Row).get(),
            1,
            "counted once committed"
        );
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn one_commit_in_flight_and_the_next_batch_grows_meanwhile() {
        let (mut p, backend, _) = pipeline(limits(1, 60_000)).await;
        units(&mut p, 1, 1).await;
        assert!(p.inflight.is_some());
        units(&mut p, 2, 3).await;
        assert_eq!(p.batch.events(), 3, "waiting for the commit in flight");
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 108);
        // on_committed closed the grown batch at once (it is due).
        assert!(p.inflight.is_some());
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 408);
        assert_eq!(cp.events_total, 4);
        assert_eq!(backend.commits.load(Ordering::Relaxed), 2);
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_checkpoint_is_written_only_when_nothing_is_open() {
        let (mut p, backend, metrics) = pipeline(limits(1000, 60_000)).await;
        p.begin_unit();
        p.checkpoint_at(wal(9)).await.unwrap();
        assert!(p.inflight.is_none(), "not idle: a unit is open");
        p.skip_unit();
        assert!(p.is_idle());
        p.checkpoint_at(wal(9)).await.unwrap();
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 908);
        assert_eq!(cp.events_total, 0);
        assert_eq!(backend.commits.load(Ordering::Relaxed), 1);
        assert_eq!(
            metrics
                .kafka_transactions(RelayKind::Cdc, TxnOutcome::Committed)
                .get(),
            1
        );
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn drain_commits_complete_units_and_aborts_an_open_one() {
        let (mut p, backend, metrics) = pipeline(limits(1000, 60_000)).await;
        units(&mut p, 1, 2).await;
        let cp = p.drain().await.unwrap().clone();
        assert_eq!(cp.end_lsn, 208);
        assert_eq!(backend.committed_records.load(Ordering::Relaxed), 2);

        units(&mut p, 3, 1).await;
        p.begin_unit();
        p.push(record(99), RecordKind::Event(EventKind::Row))
            .await
            .unwrap();
        let cp = p.drain().await.unwrap().clone();
        assert_eq!(cp.end_lsn, 208, "the open unit and its batch are aborted");
        assert_eq!(backend.committed_records.load(Ordering::Relaxed), 2);
        assert_eq!(
            metrics
                .kafka_transactions(RelayKind::Cdc, TxnOutcome::Aborted)
                .get(),
            1
        );
        assert_eq!(metrics.events(RelayKind::Cdc, EventKind::Row).get(), 2);
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dlq_records_are_counted_apart_from_events() {
        let (mut p, _, metrics) = pipeline(limits(2, 60_000)).await;
        p.begin_unit();
        p.push(record(1), RecordKind::Event(EventKind::Message))
            .await
            .unwrap();
        let dlq = DlqRecord {
            reason: "bad".into(),
            identity: vec![("event_id", Bytes::from_static(b"e1"))],
            original_headers: vec![("trace".into(), Bytes::from_static(b"t"))],
            ..DlqRecord::default()
        }
        .into_record("dlq".into(), "invalid_topic");
        assert_eq!(dlq.headers[0].0, "error");
        assert_eq!(dlq.extra_headers[0].0, "original.trace");
        p.push(dlq, RecordKind::Dlq).await.unwrap();
        p.end_unit(wal(1), Some(0)).await.unwrap();
        settle(&mut p).await;
        assert_eq!(metrics.events(RelayKind::Cdc, EventKind::Message).get(), 1);
        assert_eq!(metrics.dlq_records(RelayKind::Cdc).get(), 1);
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_the_closes_and_the_batch_grows_meanwhile() {
        let mut l = limits(1000, 1);
        // 50 commits a second, none back to back: closes at least 20 ms apart.
        l.pacing = Pacing::new(50.0, 1);
        let (mut p, backend, _) = pipeline(l).await;
        units(&mut p, 1, 1).await;
        let first = Instant::now() + Duration::from_millis(1);
        assert_eq!(
            p.deadline(),
            Some(first),
            "the first batch is not held back"
        );
        tokio::time::sleep_until(first).await;
        p.on_deadline().await.unwrap();
        settle(&mut p).await;
        // The next unit arrives at once; its batch waits until 20 ms after the last close.
        units(&mut p, 2, 1).await;
        assert_eq!(p.deadline(), Some(first + Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(5)).await;
        p.on_deadline().await.unwrap();
        assert!(p.inflight.is_none(), "not due before the interval");
        units(&mut p, 3, 2).await;
        tokio::time::sleep_until(p.deadline().unwrap()).await;
        p.on_deadline().await.unwrap();
        let cp = settle(&mut p).await;
        assert_eq!(cp.end_lsn, 408);
        assert_eq!(
            backend.commits.load(Ordering::Relaxed),
            2,
            "3 units, one commit"
        );
        p.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_closes_at_once_then_the_rate_applies() {
        let mut l = limits(1000, 1);
        // 10 commits a second (100 ms apart), 3 back to back after a quiet spell.
        l.pacing = Pacing::new(10.0, 3);
        let (mut p, backend, metrics) = pipeline(l).await;
        let mut closes = Vec::new();
        let start = Instant::now();
        for i in 1..=5u64 {
            units(&mut p, i, 1).await;
            let due = p.deadline().expect("a complete unit is batched");
            closes.push(due - start);
            tokio::time::sleep_until(due).await;
            p.on_deadline().await.unwrap();
            settle(&mut p).await;
        }
        let ms = |n| Duration::from_millis(n);
        // The first three only wait max_delay (1 ms after the unit); the fourth and fifth are
        // held to the sustained rate: 100 ms after the burst's allowance, then 100 ms apart.
        assert_eq!(closes[0], ms(1));
        assert_eq!(closes[1], ms(2));
        assert_eq!(closes[2], ms(3));
        assert_eq!(closes[3], ms(101));
        assert_eq!(closes[4], ms(201));
        assert_eq!(backend.commits.load(Ordering::Relaxed), 5);
        // Held back: the fourth from 4 ms (its max_delay) to 101 (97 ms), the fifth from 102 to
        // 201 (99 ms).
        let (wait, paced) = metrics.pacing(RelayKind::Cdc);
        assert_eq!(paced.get(), 2);
        assert!((wait.get() - 0.196).abs() < 1e-6, "{}", wait.get());
        // After a quiet spell of a burst's length the allowance is back.
        tokio::time::advance(ms(300)).await;
        let t = Instant::now();
        units(&mut p, 6, 1).await;
        assert_eq!(p.deadline(), Some(t + ms(1)));
        p.finish().await;
    }

    #[test]
    fn pacing_off_for_zero_or_nonsense_rates() {
        assert_eq!(Pacing::new(0.0, 4), Pacing::unpaced());
        assert_eq!(Pacing::new(f64::NAN, 4), Pacing::unpaced());
        assert_eq!(Pacing::new(-1.0, 4), Pacing::unpaced());
        assert_eq!(Pacing::new(f64::INFINITY, 4), Pacing::unpaced());
        let p = Pacing::new(20.0, 0);
        assert_eq!(p.interval, Some(Duration::from_millis(50)));
        assert_eq!(p.tolerance, Duration::ZERO, "a burst of 0 is a burst of 1");
    }

    #[tokio::test(start_paused = true)]
    async fn stages_are_timed_from_the_postgres_commit() {
        let (p, _backend, metrics) = pipeline(limits(1000, 10)).await;
        // The pipeline's clock runs on tokio's paused time, from 1,000 s after the epoch.
        let start = tokio::time::Instant::now();
        let p = p.with_clock(Box::new(move || {
            1_000_000_000 + start.elapsed().as_micros() as i64
        }));
        let mut p = p;
        // A WAL transaction committed at t = 0 reaches the relay 3 ms later.
        tokio::time::advance(Duration::from_millis(3)).await;
        p.begin_unit();
        p.push(record(1), RecordKind::Event(EventKind::Row))
            .await
            .unwrap();
        p.end_unit(wal(1), Some(1_000_000_000)).await.unwrap();
        // The batch closes at its deadline, 10 ms later (t = 13 ms).
        let deadline = p.deadline().expect("a deadline");
        tokio::time::sleep_until(deadline).await;
        p.on_deadline().await.unwrap();
        assert!(p.inflight.is_some());
        // The loop sees the commit 4 ms after it was asked for (t = 17 ms).
        tokio::time::advance(Duration::from_millis(4)).await;
        settle(&mut p).await;
        let stage = |s| metrics.stage_seconds(RelayKind::Cdc, s);
        for s in [
            Stage::Received,
            Stage::BatchClosed,
            Stage::Produced,
            Stage::Delivered,
            Stage::Committed,
        ] {
            assert_eq!(
                stage(s).get_sample_count(),
                1,
                "{s:?}: one observation per unit"
            );
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(stage(Stage::Received).get_sample_sum(), 0.003));
        assert!(close(stage(Stage::BatchClosed).get_sample_sum(), 0.013));
        assert!(close(stage(Stage::Committed).get_sample_sum(), 0.017));
        // The null backend commits at once (in real time): produced and delivered lie between
        // the close and the moment the loop saw the commit, in order.
        let produced = stage(Stage::Produced).get_sample_sum();
        let delivered = stage(Stage::Delivered).get_sample_sum();
        assert!((0.013..=0.017).contains(&produced), "{produced}");
        assert!((produced..=0.017).contains(&delivered), "{delivered}");

        // A unit without records (a skipped or empty transaction) is not timed.
        p.begin_unit();
        p.end_unit(wal(2), Some(1_000_000_000)).await.unwrap();
        assert_eq!(stage(Stage::Received).get_sample_count(), 1);
        p.drain().await.unwrap();
        assert_eq!(stage(Stage::Committed).get_sample_count(), 1);
        p.finish().await;
    }

    /// A backend whose commit fails as a fenced producer does.
    #[derive(Default)]
    struct Fenced;

    impl crate::sink::Backend for Fenced {
        fn open(&mut self, _key: &str) -> Result<Option<Checkpoint>, SinkError> {
            Ok(None)
        }
        fn begin(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
        fn send(&mut self, _record: OutRecord) -> Result<(), SinkError> {
            Ok(())
        }
        fn commit(&mut self, _checkpoint: &Checkpoint) -> Result<(), SinkError> {
            Err(SinkError::Fatal("ProducerFenced".into()))
        }
        fn abort(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_transaction_failing_after_the_timeout_is_reported_as_too_large() {
        let (sink, _) = Sink::start(Fenced, "cdc/t".into()).await.unwrap();
        let metrics = Metrics::new().unwrap();
        let mut p = Pipeline::new(
            RelayKind::Cdc,
            sink,
            limits(1, 60_000),
            metrics,
            Checkpoint::default(),
        )
        .with_transaction_timeout(Duration::from_millis(30));
        p.begin_unit();
        p.push(record(1), RecordKind::Event(EventKind::Row))
            .await
            .unwrap();
        // The WAL transaction takes longer than the limit to arrive whole.
        tokio::time::sleep(Duration::from_millis(50)).await;
        p.end_unit(wal(1), Some(0)).await.unwrap();
        let res = p.next_commit().await;
        let e = p.on_committed(res).await.unwrap_err();
        assert!(matches!(e, SinkError::TransactionTimeout { .. }), "{e}");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("kafka.transaction_timeout"));
        p.close().await;

        // The same failure within the limit stays what it was.
        let (sink, _) = Sink::start(Fenced, "cdc/t".into()).await.unwrap();
        let mut p = Pipeline::new(
            RelayKind::Cdc,
            sink,
            limits(1, 60_000),
            Metrics::new().unwrap(),
            Checkpoint::default(),
        )
        .with_transaction_timeout(Duration::from_secs(600));
        units(&mut p, 1, 1).await;
        let res = p.next_commit().await;
        let e = p.on_committed(res).await.unwrap_err();
        assert!(matches!(e, SinkError::Fatal(_)), "{e}");
        p.close().await;
    }

    #[test]
    fn backoff_doubles_with_jitter_and_resets_after_a_long_session() {
        let mut b = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let c = b.next;
            let s = b.next(Duration::from_secs(1));
            assert!(s >= c / 2 && s <= c, "{s:?} within [{:?}, {c:?}]", c / 2);
            ceilings.push(c);
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(30));
        let s = b.next(Duration::from_secs(31));
        assert!(s <= Duration::from_millis(100));
    }
}
