//! The CDC relay: replication slot → pgoutput → outbox envelope → Kafka transaction, exactly once.
//!
//! ```text
//!            ┌──────────── session (reconnects on transient errors) ─────────────┐
//!  Postgres  │ START_REPLICATION ─▶ Assembler ─▶ map outbox inserts / messages ─▶│ Sink thread ─▶ Kafka
//!  (slot) ◀──┤ standby status: flush = end LSN of the last COMMITTED checkpoint   │  (events + checkpoint
//!            └────────────────────────────────────────────────────────────────────┘   in one transaction)
//! ```
//!
//! ## Progress tracking: which LSN is safe to confirm
//!
//! A Kafka transaction carries the events of one or more whole WAL transactions and, last, a
//! checkpoint record whose `end_lsn` is the end LSN of the last of them (from its Commit message:
//! Postgres skips on restart the transactions whose commit record ends at or before the confirmed
//! point, so confirming the commit LSN instead would replay the last transaction). Only after
//! `commit_transaction` has returned is that `end_lsn` sent to Postgres as the flush position.
//! Keepalives are answered with the same last committed position, and with the keepalive's own
//! `wal_end` only when the relay is idle (nothing received is waiting for Kafka), and then only
//! after a checkpoint at `wal_end` has committed: confirming past a transaction that is open or
//! not yet committed to Kafka is how other relays have lost events. So the slot's confirmed LSN
//! is always the end LSN of the last committed checkpoint.
//!
//! On start the checkpoint is read back from Kafka (`read_committed`) and streaming resumes at its
//! `end_lsn`. The slot's `confirmed_flush_lsn` can lag behind it (the process died between the
//! Kafka commit and the status update; Postgres persists the slot only at checkpoints), so every
//! transaction whose commit LSN is below the checkpoint's `end_lsn` is dropped here: it is in Kafka.
//!
//! ## Batching
//!
//! Batching, the commit in flight, the checkpoint and the reconnect loop are the shared
//! [`pipeline`](crate::pipeline): each WAL transaction is one unit of it. This module decodes the
//! stream, maps outbox rows and messages to records, and confirms to Postgres what the pipeline
//! reports committed.
//!
//! ## First start
//!
//! A slot sees only what commits after it exists. On the first start (no checkpoint) the relay
//! takes a snapshot after the slot exists (`pg_current_snapshot()`), records it in the
//! checkpoint with the slot's position, and publishes every outbox row visible in it from the
//! table, one Kafka transaction per few thousand rows, each checkpointing its cursor. Every
//! transaction that committed before the slot's position is visible in that later snapshot, so
//! nothing is missed; the stream, which starts at the slot's position, drops the inserts whose
//! transaction is visible in the snapshot (they were published from the table), so nothing is
//! published twice. A restart mid-backfill resumes from the cursor with the same snapshot (the
//! query filters with `pg_visible_in_snapshot`, so no exported snapshot needs to survive).
//!
//! ## Liveness
//!
//! A heartbeat (`pg_logical_emit_message(true, <heartbeat_prefix>, <time>)`) is written on an
//! interval through a second connection. It arrives as a transaction of its own, so on a quiet
//! outbox the checkpoint, and with it the slot, still advance (otherwise the slot would retain
//! all WAL written by other tables); its round trip is measured.

use crate::checkpoint::{self, Checkpoint};
use crate::config::RelayKind;
use crate::health::Health;
use crate::metrics::{Component, EventKind, IgnoredChange, Metrics};
use crate::outbox::{self, ColumnSet, Event, MessageEvent, OutRecord, Source, TopicRouter};
use crate::pipeline::{self as pl, DlqRecord, Pipeline, Position, RecordKind, SessionError};
pub use crate::pipeline::{BatchLimits, Disposition};
use crate::replication::assembler::{Assembler, AssemblerConfig, AssemblerError, Change, TxnEvent};
use crate::replication::conn::{
    ReplicationClient, ReplicationConfig, ReplicationError, ReplicationMessage, ReplicationStream,
    SnapshotAction, StartOptions,
};
use crate::replication::pgoutput::{Column, Relation};
use crate::replication::snapshot::Snapshot;
use crate::replication::timeline;
use crate::replication::Lsn;
use crate::shutdown::Shutdown;
use crate::sink::kafka::{KafkaBackend, KafkaSettings, Poison};
use crate::sink::{KafkaSink, Sink, SinkError};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Everything the CDC relay needs, already validated (see `config`).
#[derive(Clone, Debug)]
pub struct CdcSettings {
    pub postgres: ReplicationConfig,
    pub slot: String,
    pub publication: String,
    pub create_slot: bool,
    /// Schema and name of the outbox table.
    pub table_schema: String,
    pub table_name: String,
    pub columns: ColumnSet,
    pub topic_template: String,
    /// Transactional logical messages with this prefix are events.
    pub message_prefix: String,
    pub heartbeat_prefix: String,
    /// `None` disables the heartbeat.
    pub heartbeat_interval: Option<Duration>,
    pub status_interval: Duration,
    pub proto_version: u32,
    pub batch: BatchLimits,
    pub kafka: KafkaSettings,
    /// Topic for rows and messages that cannot be mapped to an event (nothing is dropped).
    pub dlq_topic: String,
    pub shutdown_timeout: Duration,
    pub assembler: AssemblerConfig,
    /// Publish the rows the outbox holds at the first start (see "First start").
    pub initial_backfill: crate::config::InitialBackfill,
    /// Recover a lost or dropped slot from the table (see "Lost slot").
    pub recover_lost_slot: bool,
}

/// What went wrong, named after the situation.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Stream(#[from] AssemblerError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("wal_level is {0:?}; logical decoding needs wal_level = logical (set it in postgresql.conf and restart Postgres)")]
    WalLevel(String),
    #[error("replication slot {slot:?} uses the output plugin {plugin:?}; this relay needs pgoutput. Drop the slot or configure another cdc.slot")]
    SlotPlugin { slot: String, plugin: String },
    #[error("replication slot {slot:?} belongs to database {database:?}, not to {expected:?}")]
    SlotDatabase {
        slot: String,
        database: String,
        expected: String,
    },
    #[error("replication slot {slot:?} is in use by process {pid}; another relay is reading it (only one reader per slot). Retrying")]
    SlotInUse { slot: String, pid: String },
    #[error("replication slot {0:?} does not exist and cdc.create_slot is false; create it or set cdc.create_slot = true")]
    SlotMissing(String),
    #[error("replication slot {slot:?} does not exist, but the relay's checkpoint in Kafka is at {checkpoint}: the slot was dropped, and events committed after {checkpoint} may not have been relayed. Not creating a new slot, which would start after them. See RUNBOOK.md, 'Lost slot'")]
    SlotDropped { slot: String, checkpoint: Lsn },
    #[error("replication slot {slot:?} is confirmed at {slot_lsn}, past the relay's checkpoint in Kafka at {checkpoint}: something else confirmed this slot (another reader, pg_replication_slot_advance, or the slot was re-created), and the events in between cannot be read from it any more. See RUNBOOK.md, 'Lost slot'")]
    SlotAhead {
        slot: String,
        slot_lsn: Lsn,
        checkpoint: Lsn,
    },
    #[error("replication slot {0:?} was invalidated (wal_status = lost): Postgres removed WAL it still needed, because the slot fell behind by more than max_slot_wal_keep_size. See RUNBOOK.md, 'Lost slot'")]
    SlotLost(String),
    #[error("replication slot {slot:?} was invalidated by Postgres (invalidation_reason = {reason}): it cannot be streamed any more. See RUNBOOK.md, 'Lost slot'")]
    SlotInvalidated { slot: String, reason: String },
    #[error("publication {publication:?} does not publish inserts; run: ALTER PUBLICATION {publication} SET (publish = 'insert')")]
    PublicationNoInserts { publication: String },
    #[error("publication {publication:?} does not publish {table}; run: ALTER PUBLICATION {publication} ADD TABLE {table}")]
    PublicationMissingTable { publication: String, table: String },
    #[error("the checkpoint in Kafka belongs to Postgres system {checkpoint}, but this server is system {server}: refusing to resume from another cluster's positions. Use another checkpoint topic or slot name for this cluster")]
    SystemMismatch { checkpoint: u64, server: u64 },
    #[error(transparent)]
    Timeline(#[from] crate::replication::timeline::TimelineError),
    #[error("outbox table {table} has no column {column:?} (cdc columns = {naming:?}); set outbox.columns to match the table")]
    OutboxColumn {
        table: String,
        column: String,
        naming: ColumnSet,
    },
    #[error("replication stream ended by the server")]
    StreamEnded,
    #[error("Postgres did not answer the {0} within {1:?}; reconnecting")]
    Timeout(&'static str, Duration),
    #[error("Postgres answered a query in an unexpected shape: {0}")]
    Unexpected(String),
}

/// What to do about an error.
impl SessionError for CdcError {
    /// One `match` deciding retry or fatal. The retryable list is deliberately short: unknown
    /// errors are not retried blindly.
    fn disposition(&self) -> Disposition {
        match self {
            CdcError::Replication(e) if e.is_transient() => Disposition::Retry,
            CdcError::Sink(e) if e.is_transient() => Disposition::Retry,
            CdcError::SlotInUse { .. } | CdcError::StreamEnded | CdcError::Timeout(..) => {
                Disposition::Retry
            }
            // No restart fixes a transaction too large for the transaction timeout.
            CdcError::Sink(SinkError::TransactionTimeout { .. }) => Disposition::Refuse,
            CdcError::Timeline(e) if e.is_transient() => Disposition::Retry,
            CdcError::SlotDropped { .. }
            | CdcError::SlotAhead { .. }
            | CdcError::SlotLost(_)
            | CdcError::SlotInvalidated { .. }
            | CdcError::SystemMismatch { .. }
            | CdcError::Timeline(_) => Disposition::Refuse,
            _ => Disposition::Fatal,
        }
    }

    fn component(&self) -> Component {
        match self {
            CdcError::Sink(_) => Component::Kafka,
            _ => Component::Postgres,
        }
    }
}

impl CdcError {
    /// See [`SessionError::disposition`].
    pub fn disposition(&self) -> Disposition {
        SessionError::disposition(self)
    }
}

/// Runs the CDC relay until shutdown (Ok) or a fatal error (Err). Transient errors reconnect
/// with a jittered exponential backoff and resume from the last committed checkpoint.
pub async fn run(
    settings: CdcSettings,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), CdcError> {
    // Records Kafka refused for good in one session go to the DLQ in the next (see `Poison`).
    let poison = Poison::default();
    let (s, m, h, sd, p) = (&settings, &metrics, &health, &shutdown, &poison);
    pl::run_sessions(RelayKind::Cdc, &settings.slot, m, h, sd, move || {
        Box::pin(async move { Session::new(s, m, h, sd).run(p).await })
    })
    .await
}

/// What `relay reset-checkpoint` did.
#[derive(Debug)]
pub struct Reset {
    /// The checkpoint replaced, if there was one.
    pub previous: Option<Checkpoint>,
    /// The checkpoint written: the slot's confirmed position on this server.
    pub current: Checkpoint,
    /// Whether the slot was missing and has been created.
    pub created_slot: bool,
}

/// Moves the CDC relay's checkpoint to the slot's confirmed position (creating the slot if it
/// is missing): the operator's explicit acknowledgement that events between the two positions
/// will not be relayed from WAL (after a dropped, lost or re-created slot, or a restored
/// primary). Writes the checkpoint in a Kafka transaction with the relay's transactional id, so
/// a relay still running is fenced (it exits 1).
pub async fn reset_checkpoint(
    settings: &CdcSettings,
    metrics: &Metrics,
) -> Result<Reset, CdcError> {
    let health = Health::new();
    let shutdown = Shutdown::new();
    let mut session = Session::new(settings, metrics, &health, &shutdown);
    let mut sql = ReplicationClient::connect(&settings.postgres).await?;
    let ident = sql.identify_system().await?;
    session.system_id = ident.system_id;
    let slot = session.preflight(&mut sql).await?;
    let (position, created_slot) = match slot {
        Some(lsn) => (lsn, false),
        None => {
            let created = sql
                .create_logical_slot(&settings.slot, "pgoutput", false, SnapshotAction::NoExport)
                .await?;
            (created.consistent_point, true)
        }
    };
    let key = checkpoint::cdc_key(&settings.slot);
    let backend = KafkaBackend::new(settings.kafka.clone(), tokio::runtime::Handle::current());
    let (sink, previous) = Sink::start(backend, key.clone()).await?;
    let current = Checkpoint {
        relay: key,
        system_id: ident.system_id,
        timeline: ident.timeline,
        commit_lsn: position.0,
        end_lsn: position.0,
        events_total: previous.as_ref().map_or(0, |p| p.events_total),
        written_at_us: pl::unix_micros(SystemTime::now()),
        ..Checkpoint::default()
    };
    let result = match sink.commit(current.clone()).await {
        Ok(reply) => match reply.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(CdcError::Sink(SinkError::Stopped)),
        },
        Err(e) => Err(e.into()),
    };
    sink.close().await;
    sql.close().await;
    result.map(|()| Reset {
        previous,
        current,
        created_slot,
    })
}

/// A WAL transaction being received.
struct WalTxn {
    xid: u32,
    commit_lsn: Lsn,
    commit_ts_us: i64,
    /// Already in Kafka (commit LSN below the checkpoint): drop its changes.
    skip: bool,
    /// Records made of it so far.
    records: usize,
}

/// Column positions of the outbox table in the current relation schema.
struct OutboxLayout {
    relation: Arc<Relation>,
    event_id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    headers: Option<usize>,
    /// The outbox `id` column, when the table has one (for the DLQ record's identity).
    id: Option<usize>,
    /// The `txid` column (`xid8`), when the table has one (the backfill's overlap).
    txid: Option<usize>,
}

struct Session<'a> {
    s: &'a CdcSettings,
    metrics: &'a Metrics,
    health: &'a Health,
    shutdown: &'a Shutdown,
    system_id: u64,
    timeline: u32,
    /// The history of `timeline`: which timeline wrote the WAL at a position (for event ids).
    history: timeline::TimelineHistory,
    /// Transactions with a commit LSN below this are already in Kafka.
    resume_floor: Lsn,
    router: TopicRouter,
    current: Option<WalTxn>,
    layout: Option<OutboxLayout>,
    dlq_topic: Arc<str>,
    /// The first start's backfill snapshot: outbox inserts of transactions visible in it were
    /// published from the table, and are dropped from the stream.
    backfilled: Option<Snapshot>,
    /// The slot was lost and has been re-created: the table backfill recovers the gap, minus
    /// what the checkpoint's delivered snapshot (if any) proves delivered.
    recovering: Option<Option<String>>,
}

impl<'a> Session<'a> {
    fn new(
        s: &'a CdcSettings,
        metrics: &'a Metrics,
        health: &'a Health,
        shutdown: &'a Shutdown,
    ) -> Self {
        Session {
            s,
            metrics,
            health,
            shutdown,
            system_id: 0,
            timeline: 0,
            history: Default::default(),
            resume_floor: Lsn::INVALID,
            router: TopicRouter::new(&s.topic_template),
            current: None,
            layout: None,
            dlq_topic: s.dlq_topic.as_str().into(),
            backfilled: None,
            recovering: None,
        }
    }

    fn table(&self) -> String {
        format!("{}.{}", self.s.table_schema, self.s.table_name)
    }

    async fn run(&mut self, poison: &Poison) -> Result<(), CdcError> {
        let s = self.s;
        // The SQL side: checks, slot inspection, heartbeats. A replication=database connection
        // also runs plain SQL, so one client (and one TLS implementation) serves both sides.
        let mut sql = ReplicationClient::connect(&s.postgres).await?;
        let ident = sql.identify_system().await?;
        self.system_id = ident.system_id;
        self.timeline = ident.timeline;
        self.history = timeline::server_history(&mut sql, self.timeline).await?;
        let slot = match self.preflight(&mut sql).await {
            Err(e @ (CdcError::SlotLost(_) | CdcError::SlotInvalidated { .. }))
                if s.recover_lost_slot =>
            {
                // The invalidated slot can never stream again: drop it, and recover below.
                tracing::warn!(slot = %s.slot, error = %e, "recovering the lost slot: dropping it");
                sql.simple_query(&format!(
                    "SELECT pg_drop_replication_slot({})",
                    quote_literal(&s.slot)
                ))
                .await?;
                None
            }
            other => other?,
        };

        let key = checkpoint::cdc_key(&s.slot);
        let backend = KafkaSink::new(
            s.kafka.clone(),
            tokio::runtime::Handle::current(),
            self.metrics.kafka_queue_full(RelayKind::Cdc),
            poison.clone(),
        );
        let (sink, checkpoint) =
            Sink::start_with_dlq(backend, key.clone(), self.dlq_topic.clone()).await?;
        let fresh = Checkpoint {
            relay: key,
            system_id: self.system_id,
            timeline: self.timeline,
            ..Checkpoint::default()
        };
        let mut pipe = Pipeline::new(
            RelayKind::Cdc,
            sink,
            s.batch.clone(),
            self.metrics.clone(),
            checkpoint.clone().unwrap_or(fresh),
        )
        .with_transaction_timeout(s.kafka.transaction_limit());
        let result = match self
            .slot_position(&mut sql, slot, checkpoint.as_ref())
            .await
        {
            Ok(slot_confirmed) => {
                // The checkpoint is valid here (same system; on this timeline or before the
                // fork): the next ones record this server's timeline.
                pipe.committed_mut().system_id = self.system_id;
                pipe.committed_mut().timeline = self.timeline;
                match self
                    .backfill(&mut sql, &mut pipe, checkpoint.is_some(), slot_confirmed)
                    .await
                {
                    Ok(()) => {
                        self.stream(&mut sql, &mut pipe, checkpoint.is_some(), slot_confirmed)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // The open Kafka transaction (if any) dies with the producer; nothing was confirmed
            // past the last committed checkpoint.
            pipe.close().await;
        } else {
            pipe.finish().await;
        }
        sql.close().await;
        result
    }
    /// Where streaming can start, given the slot (its confirmed LSN, `None` if it does not exist)
    /// and the relay's checkpoint. A missing slot is created only when there is no checkpoint:
    /// with one, the slot was dropped, and a new slot would start after events that may never
    /// have been relayed. A slot confirmed past the checkpoint was moved by something else; the
    /// events in between cannot be read from it. Both are refused rather than skipped, as is a
    /// checkpoint from another timeline past the point where the server's timeline forked from it
    /// (`replication::timeline`).
    async fn slot_position(
        &mut self,
        sql: &mut ReplicationClient,
        slot: Option<Lsn>,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Lsn, CdcError> {
        let s = self.s;
        if let Some(cp) = checkpoint {
            if cp.system_id != self.system_id {
                return Err(CdcError::SystemMismatch {
                    checkpoint: cp.system_id,
                    server: self.system_id,
                });
            }
            let (history, tl) = (&self.history, self.timeline);
            timeline::check_resume(sql, history, cp.end_lsn(), cp.timeline, tl).await?;
        }
        match (slot, checkpoint) {
            (Some(confirmed), Some(cp)) if confirmed > cp.end_lsn() => Err(CdcError::SlotAhead {
                slot: s.slot.clone(),
                slot_lsn: confirmed,
                checkpoint: cp.end_lsn(),
            }),
            (Some(confirmed), _) => Ok(confirmed),
            (None, Some(cp)) if s.recover_lost_slot => {
                let created = sql
                    .create_logical_slot(&s.slot, "pgoutput", false, SnapshotAction::NoExport)
                    .await?;
                tracing::warn!(
                    slot = %s.slot,
                    checkpoint = %cp.end_lsn(),
                    new_slot = %created.consistent_point,
                    delivered_snapshot = cp.delivered_snapshot.as_deref().unwrap_or("none"),
                    "lost slot recovery: created a new slot; the outbox rows the checkpoint does not prove delivered are published from the table. WAL-only events (pg_logical_emit_message) committed between the checkpoint and the new slot cannot be recovered"
                );
                self.recovering = Some(cp.delivered_snapshot.clone());
                Ok(created.consistent_point)
            }
            (None, Some(cp)) => Err(CdcError::SlotDropped {
                slot: s.slot.clone(),
                checkpoint: cp.end_lsn(),
            }),
            (None, _) if !s.create_slot => Err(CdcError::SlotMissing(s.slot.clone())),
            (None, _) => {
                let created = sql
                    .create_logical_slot(&s.slot, "pgoutput", false, SnapshotAction::NoExport)
                    .await?;
                tracing::info!(slot = %s.slot, lsn = %created.consistent_point, "created replication slot");
                Ok(created.consistent_point)
            }
        }
    }

    /// Checks the server and the slot; creates the publication where missing. Returns the
    /// slot's confirmed flush LSN, or `None` if the slot does not exist.
    async fn preflight(&mut self, sql: &mut ReplicationClient) -> Result<Option<Lsn>, CdcError> {
        crate::slot_watch::preflight(sql, self.s).await
    }

    /// The first start's backfill (module docs, "First start"): on a first start (no
    /// checkpoint), takes a snapshot, records it in the checkpoint with the slot's position,
    /// and publishes every outbox row visible in it from the table, in `id` order, a few
    /// thousand rows per Kafka transaction, each checkpointing its cursor; after a crash it
    /// resumes from that cursor with the same snapshot. Streaming then drops the inserts whose
    /// transaction is visible in the snapshot: they were published here.
    async fn backfill(
        &mut self,
        sql: &mut ReplicationClient,
        pipe: &mut Pipeline,
        resumed: bool,
        slot_confirmed: Lsn,
    ) -> Result<(), CdcError> {
        let s = self.s;
        // (what the table backfill skips, is it a recovery) — or nothing to start.
        let start = if let Some(delivered) = self.recovering.take() {
            if delivered.is_none() {
                tracing::warn!("the checkpoint records no delivered snapshot (heartbeats off, or written by an older relay): every row of the outbox table is published again; consumers deduplicate on event_id");
            }
            Some((delivered, true))
        } else if !resumed && s.initial_backfill == crate::config::InitialBackfill::None {
            tracing::info!("cdc.initial_backfill = none: rows the outbox held before the slot are not published");
            None
        } else {
            (!resumed).then_some((None, false))
        };
        if let Some((delivered, recovery)) = start {
            if s.columns != ColumnSet::Native {
                tracing::warn!(
                    recovery,
                    "publishing outbox rows from the table needs the native schema (its txid column); \
                     rows the slot cannot see are not published: re-publish them by hand (RUNBOOK, 'Lost slot')"
                );
                return Ok(());
            }
            let snapshot =
                crate::slot_watch::one_value(sql, "SELECT pg_current_snapshot()::text").await?;
            let cp = pipe.committed_mut();
            // The stream starts at the slot's position; the checkpoint says so from the first
            // backfill transaction on, so that a restart mid-backfill resumes both.
            cp.commit_lsn = slot_confirmed.0;
            cp.end_lsn = slot_confirmed.0;
            cp.backfill = Some(checkpoint::Backfill {
                snapshot,
                delivered,
                recovery,
                ..Default::default()
            });
        }
        let Some(b) = pipe.committed().backfill.clone() else {
            return Ok(());
        };
        let snap = Snapshot::parse(&b.snapshot).map_err(|e| {
            CdcError::Unexpected(format!("the checkpoint's backfill snapshot: {e}"))
        })?;
        self.backfilled = Some(snap);
        if b.done {
            return Ok(());
        }
        tracing::info!(snapshot = %b.snapshot, from_id = b.cursor, rows_so_far = b.rows, "backfill: publishing the rows the outbox held at the first start");
        let (mut cursor, mut rows) = (b.cursor, b.rows);
        let limit = s.batch.max_events.max(1000);
        // Recovery: not the rows the lost slot had delivered (their transactions are visible in
        // the checkpoint's delivered snapshot).
        let not_delivered = match &b.delivered {
            Some(d) => format!(
                " AND NOT pg_visible_in_snapshot(txid, {}::pg_snapshot)",
                quote_literal(d)
            ),
            None => String::new(),
        };
        let mark: &'static [u8] = if b.recovery {
            b"recovered"
        } else {
            b"backfill"
        };
        let table = format!(
            "{}.{}",
            quote_ident(&s.table_schema),
            quote_ident(&s.table_name)
        );
        loop {
            let query = format!(
                "SELECT id, txid::text, event_id::text, aggregate_type, aggregate_id, event_type, \
                 payload::text, headers::text, (extract(epoch from created_at) * 1000000)::bigint \
                 FROM {table} WHERE id > {cursor} \
                 AND pg_visible_in_snapshot(txid, {}::pg_snapshot){not_delivered} ORDER BY id LIMIT {limit}",
                quote_literal(&b.snapshot)
            );
            let found = sql.simple_query(&query).await?;
            let done = found.len() < limit;
            pipe.begin_unit();
            for row in &found {
                let cell = |i: usize| row.get(i).cloned().flatten();
                let id = cell(0).and_then(|v| v.parse::<i64>().ok()).ok_or_else(|| {
                    CdcError::Unexpected("backfill: an outbox row without an id".into())
                })?;
                let txid = cell(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let created = cell(8).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                let headers = match cell(7) {
                    Some(h) => outbox::parse_headers(h.as_bytes()),
                    None => Ok(Vec::new()),
                };
                let (mut record, kind) =
                    match (cell(2), cell(3), cell(4), cell(5), cell(6), headers) {
                        (
                            Some(event_id),
                            Some(aggregate_type),
                            Some(aggregate_id),
                            Some(event_type),
                            Some(payload),
                            Ok(headers),
                        ) => {
                            let event = Event {
                                event_id,
                                aggregate_type,
                                aggregate_id: Bytes::from(aggregate_id),
                                event_type,
                                payload: Bytes::from(payload),
                                headers,
                                source: Source::Table { txid, id },
                                commit_ts_us: created,
                            };
                            self.publish(event, EventKind::Row, Some(Bytes::from(id.to_string())))
                        }
                        (event_id, aggregate_type, aggregate_id, event_type, payload, headers) => {
                            let why = match headers {
                                Err(e) => e.to_string(),
                                Ok(_) => "a required column is NULL".to_owned(),
                            };
                            let mut identity = vec![("id", Bytes::from(id.to_string()))];
                            for (name, v) in [
                                ("event_id", event_id),
                                ("aggregate_type", aggregate_type),
                                ("event_type", event_type),
                            ] {
                                if let Some(v) = v {
                                    identity.push((name, Bytes::from(v)));
                                }
                            }
                            let dlq = DlqRecord {
                                reason: why,
                                key: aggregate_id.map(Bytes::from).unwrap_or_default(),
                                value: payload.map(Bytes::from).unwrap_or_default(),
                                identity,
                                ..DlqRecord::default()
                            };
                            (
                                dlq.into_record(self.dlq_topic.clone(), "unmappable_row"),
                                RecordKind::Dlq,
                            )
                        }
                    };
                // Marked, so consumers and operators can tell a backfilled record.
                record.headers.push(("replay", Bytes::from_static(mark)));
                pipe.push(record, kind).await?;
                cursor = id;
                rows += 1;
            }
            pipe.end_unit(Position::Backfill { cursor, rows, done }, None)
                .await?;
            // One unit at a time: commit it (and its cursor) before reading on.
            pipe.drain().await?;
            if done {
                break;
            }
        }
        tracing::info!(rows, "backfill complete; streaming from the slot");
        Ok(())
    }

    async fn stream(
        &mut self,
        sql: &mut ReplicationClient,
        pipe: &mut Pipeline,
        resumed: bool,
        slot_confirmed: Lsn,
    ) -> Result<(), CdcError> {
        let s = self.s;
        // `slot_position` has checked the system id and that the slot is not ahead of the
        // checkpoint; the pipeline starts from the checkpoint (or a fresh one).
        let resume = if resumed {
            self.resume_floor = pipe.committed().end_lsn();
            self.resume_floor.max(slot_confirmed)
        } else {
            slot_confirmed
        };
        // Never report a position below what the slot already has.
        let mut confirmed = resume;
        self.metrics.set_confirmed_lsn(confirmed.0);
        // The server's WAL end as last reported (XLogData and keepalives carry it): the
        // checkpoint lag is how far the confirmed position trails it.
        let mut server_end = resume;
        let mut assembler = Assembler::new(s.proto_version, s.assembler.clone())?;
        let repl = ReplicationClient::connect(&s.postgres).await?;
        let opts = StartOptions {
            proto_version: s.proto_version,
            publication_names: vec![s.publication.clone()],
            messages: true,
            streaming: s.proto_version >= 2,
            binary: false,
        };
        let mut stream = repl
            .start_replication(&s.slot, resume, opts)
            .await
            .map_err(|e| {
                // The walsender of a reader that just died may still hold the slot: retried.
                if e.sqlstate() == Some(crate::replication::conn::sqlstate::OBJECT_IN_USE) {
                    CdcError::SlotInUse {
                        slot: s.slot.clone(),
                        pid: "?".into(),
                    }
                } else {
                    e.into()
                }
            })?;
        tracing::info!(slot = %s.slot, lsn = %resume, "streaming");
        self.health.set_ready(true);
        self.health.set_healthy(true);
        self.metrics.set_up_and_ready(true, true);
        pl::session_healthy(RelayKind::Cdc, self.metrics);

        let mut status_tick = tokio::time::interval(s.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat_every = s.heartbeat_interval.unwrap_or(Duration::from_secs(3600));
        let mut heartbeat_tick = tokio::time::interval(heartbeat_every);
        heartbeat_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // When the relay last checkpointed a keepalive's position while idle (see `idle`).
        let mut last_idle_checkpoint = Instant::now();
        // With heartbeats on, a message arrives at least once per heartbeat interval: a stream
        // silent for much longer is dead (a half-open connection the kernel has not noticed
        // yet) and the session ends, instead of waiting forever. Without heartbeats an idle
        // stream may legitimately be silent; TCP keepalive covers a vanished peer then.
        let receive_timeout = s
            .heartbeat_interval
            .map(|h| (h * 6).max(Duration::from_secs(60)));
        let mut last_received = tokio::time::Instant::now();
        let shutdown = self.shutdown;
        loop {
            // The loop went round: the watchdog may be fed (a wedged loop stops feeding it).
            self.health.progress();
            let deadline = pipe.deadline();
            tokio::select! {
                biased;
                // 1. Shutdown first: stop reading, drain below.
                _ = shutdown.triggered() => break,
                // 2. The result of the commit in flight: confirm it to Postgres.
                res = pipe.next_commit() => {
                    let lsn = pipe.on_committed(res).await?.end_lsn();
                    if lsn > confirmed {
                        confirmed = lsn;
                        confirm(&mut stream, confirmed, s.status_interval).await?;
                        self.metrics.set_confirmed_lsn(confirmed.0);
                        self.metrics.set_checkpoint_lag_bytes(server_end.0.saturating_sub(confirmed.0));
                    }
                }
                // 3. The batch's deadline.
                _ = sleep_until_opt(deadline) => {
                    pipe.on_deadline().await?;
                }
                // 3b. Nothing received for too long (see `receive_timeout`).
                _ = sleep_until_opt(receive_timeout.map(|t| last_received + t)) => {
                    let t = receive_timeout.unwrap_or_default();
                    return Err(CdcError::Timeout("next replication message", t));
                }
                // 4. The next message from the walsender (cancellation safe).
                msg = stream.next() => {
                    last_received = tokio::time::Instant::now();
                    match msg? {
                        None => return Err(CdcError::StreamEnded),
                        Some(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                            server_end = server_end.max(wal_end);
                            assembler.feed(wal_start, data)?;
                            while let Some(ev) = assembler.next_event()? {
                                self.on_event(ev, pipe).await?;
                            }
                        }
                        Some(ReplicationMessage::Keepalive { reply_requested, wal_end, .. }) => {
                            server_end = server_end.max(wal_end);
                            self.metrics.set_checkpoint_lag_bytes(server_end.0.saturating_sub(confirmed.0));
                            let now = Instant::now();
                            let due = reply_requested
                                || now.duration_since(last_idle_checkpoint) >= s.status_interval;
                            if due && wal_end > confirmed && self.idle(pipe, &assembler) {
                                // Everything before `wal_end` has arrived and is in Kafka: record
                                // the position in a checkpoint and confirm it once committed.
                                last_idle_checkpoint = now;
                                let commit_lsn = pipe.committed().commit_lsn();
                                pipe.checkpoint_at(Position::Wal { commit_lsn, end_lsn: wal_end }).await?;
                            } else if reply_requested {
                                confirm(&mut stream, confirmed, s.status_interval).await?;
                            }
                        }
                    }
                }
                // 5. Periodic status, so the walsender does not time us out.
                _ = status_tick.tick() => {
                    confirm(&mut stream, confirmed, s.status_interval).await?;
                }
                // 6. Heartbeat.
                _ = heartbeat_tick.tick(), if s.heartbeat_interval.is_some() => {
                    let now = pl::unix_micros(SystemTime::now());
                    // The snapshot is taken before the message's transaction commits: every
                    // transaction it sees is in WAL before the heartbeat (see
                    // `Checkpoint::delivered_snapshot`).
                    let query = format!(
                        "SELECT pg_logical_emit_message(true, {}, '{now}:' || pg_current_snapshot()::text)",
                        quote_literal(&s.heartbeat_prefix)
                    );
                    // Bounded: a Postgres that stops answering must end the session (and be
                    // reported), not stall the loop while /healthz still says healthy.
                    match tokio::time::timeout(s.status_interval, sql.simple_query(&query)).await {
                        Ok(r) => {
                            r?;
                        }
                        Err(_) => return Err(CdcError::Timeout("heartbeat", s.status_interval)),
                    }
                }
            }
        }

        // Draining: commit what is complete, abort a partly received WAL transaction, confirm
        // what Kafka has, and end the copy, all within the shutdown timeout.
        let drain = async {
            confirmed = confirmed.max(pipe.drain().await?.end_lsn());
            confirm(&mut stream, confirmed, s.status_interval).await?;
            self.metrics.set_confirmed_lsn(confirmed.0);
            stream.finish().await?;
            Ok::<(), CdcError>(())
        };
        match tokio::time::timeout(s.shutdown_timeout, drain).await {
            Ok(r) => {
                r?;
                tracing::info!(lsn = %confirmed, "cdc relay stopped cleanly");
            }
            Err(_) => tracing::warn!(
                timeout_ms = s.shutdown_timeout.as_millis() as u64,
                lsn = %confirmed,
                "shutdown timed out; the open Kafka transaction is abandoned (it aborts) and is re-read after restart"
            ),
        }
        Ok(())
    }

    /// Nothing is received but not yet committed to Kafka: no WAL transaction is open, the
    /// pipeline is idle, and no streamed transaction is buffered. Then a keepalive's `wal_end`
    /// (the walsender's sent position: every transaction that committed before it has been sent
    /// in full) may be checkpointed and confirmed. A logical walsender that is shutting down
    /// waits until its client confirms that position, so a relay that never did would hold
    /// `pg_ctl stop -m fast` up; and without heartbeats, WAL of unpublished tables would stay
    /// retained by the slot.
    fn idle(&self, pipe: &Pipeline, assembler: &Assembler) -> bool {
        self.current.is_none()
            && pipe.is_idle()
            && assembler.open_transaction().is_none()
            && assembler.streamed_transactions().0 == 0
    }

    async fn on_event(&mut self, ev: TxnEvent, pipe: &mut Pipeline) -> Result<(), CdcError> {
        match ev {
            TxnEvent::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                let skip = final_lsn < self.resume_floor;
                self.current = Some(WalTxn {
                    xid,
                    commit_lsn: final_lsn,
                    commit_ts_us: commit_time.to_unix_micros(),
                    skip,
                    records: 0,
                });
                pipe.begin_unit();
            }
            TxnEvent::Change(change) => {
                let Some(txn) = &self.current else {
                    return Ok(());
                };
                if txn.skip {
                    return Ok(());
                }
                let (xid, lsn, ts) = (txn.xid, txn.commit_lsn, txn.commit_ts_us);
                if let Some((record, kind)) = self.map_change(change, pipe, xid, lsn, ts)? {
                    if let Some(txn) = &mut self.current {
                        txn.records += 1;
                    }
                    pipe.push(record, kind).await?;
                }
            }
            TxnEvent::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                let Some(txn) = self.current.take() else {
                    return Ok(());
                };
                // One line per WAL transaction at debug level: with the checkpoints, it tells
                // which Kafka transaction carried which WAL transaction.
                tracing::debug!(
                    xid = txn.xid,
                    commit_lsn = %commit_lsn,
                    end_lsn = %end_lsn,
                    records = txn.records,
                    skip = txn.skip,
                    "wal transaction"
                );
                if txn.skip {
                    self.metrics.skipped_transactions().inc();
                    pipe.skip_unit();
                    return Ok(());
                }
                pipe.end_unit(
                    Position::Wal {
                        commit_lsn,
                        end_lsn,
                    },
                    Some(txn.commit_ts_us),
                )
                .await?;
            }
            TxnEvent::NonTxnMessage(m) => {
                if m.message.prefix == self.s.message_prefix {
                    tracing::warn!(
                        lsn = %m.wal_start,
                        "non-transactional logical message with the outbox prefix ignored: \
                         write events with pg_logical_emit_message(true, ...) so they commit with \
                         their transaction and are relayed exactly once"
                    );
                    self.metrics
                        .ignored_changes(IgnoredChange::NonTransactionalMessage)
                        .inc();
                }
            }
        }
        Ok(())
    }

    /// The Kafka record of one change (an event, or a DLQ record when the change cannot be
    /// one), or `None` for changes the relay does not publish.
    fn map_change(
        &mut self,
        change: Change,
        pipe: &mut Pipeline,
        xid: u32,
        commit_lsn: Lsn,
        commit_ts_us: i64,
    ) -> Result<Option<(OutRecord, RecordKind)>, CdcError> {
        match change {
            Change::Insert(ins) => {
                if !self.is_outbox(&ins.relation) {
                    self.metrics
                        .ignored_changes(IgnoredChange::OtherTable)
                        .inc();
                    return Ok(None);
                }
                self.ensure_layout(&ins.relation)?;
                let Some(layout) = &self.layout else {
                    return Ok(None);
                };
                let source = Source::Wal {
                    lsn: commit_lsn.0,
                    xid,
                };
                let cols = &ins.new.columns;
                if let (Some(snap), Some(i)) = (&self.backfilled, layout.txid) {
                    // Per event: parse the column's bytes in place, no allocation.
                    let txid = match cols.get(i) {
                        Some(Column::Text(b)) => std::str::from_utf8(b)
                            .ok()
                            .and_then(|t| t.parse::<u64>().ok()),
                        _ => None,
                    };
                    if txid.is_some_and(|t| snap.visible(t)) {
                        // Published by the backfill already.
                        self.metrics
                            .ignored_changes(IgnoredChange::Backfilled)
                            .inc();
                        return Ok(None);
                    }
                }
                let event = match row_event(layout, cols, source, commit_ts_us) {
                    Ok(event) => event,
                    Err(why) => {
                        let dlq = self.row_dlq(layout, cols, why, commit_lsn, xid);
                        return Ok(Some(dlq));
                    }
                };
                let outbox_id = layout.id.and_then(|i| text_column(cols, i));
                Ok(Some(self.publish(
                    event,
                    EventKind::Row,
                    outbox_id.map(Bytes::from),
                )))
            }
            // Outbox rows are append-only events: changes to them are counted, not published.
            Change::Update(u) => Ok(self.ignore(&u.relation, IgnoredChange::Update)),
            Change::Delete(d) => Ok(self.ignore(&d.relation, IgnoredChange::Delete)),
            Change::Truncate(_) => {
                self.metrics.ignored_changes(IgnoredChange::Truncate).inc();
                Ok(None)
            }
            Change::Message(m) => {
                if m.prefix == self.s.heartbeat_prefix {
                    // `<µs since the epoch>:<pg_current_snapshot()>` (older relays wrote the
                    // time alone).
                    let text = std::str::from_utf8(&m.content).unwrap_or_default();
                    let (sent, snapshot) = match text.split_once(':') {
                        Some((t, snap)) => (t, Snapshot::parse(snap).ok().map(|_| snap.to_owned())),
                        None => (text, None),
                    };
                    if let Ok(sent) = sent.parse::<i64>() {
                        pipe.heartbeat(sent, snapshot);
                    }
                    return Ok(None);
                }
                if m.prefix != self.s.message_prefix {
                    self.metrics
                        .ignored_changes(IgnoredChange::OtherTable)
                        .inc();
                    return Ok(None);
                }
                match MessageEvent::parse(&m.content) {
                    Ok(me) => {
                        let tl = self.history.timeline_at(m.lsn, self.timeline);
                        let event = me.into_event(self.system_id, tl, m.lsn.0, xid, commit_ts_us);
                        Ok(Some(self.publish(event, EventKind::Message, None)))
                    }
                    Err(why) => {
                        tracing::warn!(lsn = %m.lsn, xid, error = %why, "logical message cannot be mapped; sent to the DLQ topic");
                        let dlq = DlqRecord {
                            reason: why.to_string(),
                            value: m.content,
                            identity: self.source_identity(m.lsn, xid),
                            ..DlqRecord::default()
                        };
                        Ok(Some((
                            dlq.into_record(self.dlq_topic.clone(), "unmappable_message"),
                            RecordKind::Dlq,
                        )))
                    }
                }
            }
        }
    }

    /// The record of `event` on its topic; a DLQ record when its aggregate type makes no valid
    /// topic (see [`outbox`]'s routing rules).
    fn publish(
        &mut self,
        event: Event,
        kind: EventKind,
        outbox_id: Option<Bytes>,
    ) -> (OutRecord, RecordKind) {
        pl::route(&mut self.router, event, kind).unwrap_or_else(|unroutable| {
            let mut source: Vec<_> = outbox_id.map(|id| ("id", id)).into_iter().collect();
            match unroutable.event.source {
                Source::Wal { lsn, xid } => source.extend(self.source_identity(Lsn(lsn), xid)),
                Source::Table { txid, .. } => source.push(("txid", Bytes::from(txid.to_string()))),
            }
            unroutable.into_dlq(self.dlq_topic.clone(), source)
        })
    }

    /// The DLQ record of an outbox row that is not an event (a NULL column, bad headers...):
    /// whatever identity columns it has, and its payload.
    fn row_dlq(
        &self,
        layout: &OutboxLayout,
        cols: &[Column],
        why: String,
        lsn: Lsn,
        xid: u32,
    ) -> (OutRecord, RecordKind) {
        tracing::warn!(lsn = %lsn, xid, error = %why, "outbox row cannot be mapped; sent to the DLQ topic");
        let mut identity = Vec::new();
        for (name, idx) in [
            ("event_id", Some(layout.event_id)),
            ("aggregate_type", Some(layout.aggregate_type)),
            ("aggregate_id", Some(layout.aggregate_id)),
            ("event_type", Some(layout.event_type)),
            ("id", layout.id),
        ] {
            if let Some(v) = idx.and_then(|i| text_column(cols, i)) {
                identity.push((name, Bytes::from(v)));
            }
        }
        identity.extend(self.source_identity(lsn, xid));
        let original_headers = layout
            .headers
            .and_then(|i| text_column(cols, i))
            .map(|h| vec![("headers".to_owned(), Bytes::from(h))])
            .unwrap_or_default();
        let dlq = DlqRecord {
            reason: why,
            key: text_column(cols, layout.aggregate_id)
                .map(Bytes::from)
                .unwrap_or_default(),
            value: cols
                .get(layout.payload)
                .and_then(Column::bytes)
                .cloned()
                .unwrap_or_default(),
            identity,
            original_headers,
        };
        dlq.unmappable_row(self.dlq_topic.clone())
    }

    /// `lsn`, `xid` and `table` headers of a DLQ record.
    fn source_identity(&self, lsn: Lsn, xid: u32) -> Vec<(&'static str, Bytes)> {
        vec![
            ("lsn", Bytes::from(lsn.to_string())),
            ("xid", Bytes::from(xid.to_string())),
            ("table", Bytes::from(self.table())),
        ]
    }

    /// Counts an ignored change: as `kind` on the outbox table, as another table's otherwise.
    fn ignore(&self, r: &Relation, kind: IgnoredChange) -> Option<(OutRecord, RecordKind)> {
        let kind = if self.is_outbox(r) {
            kind
        } else {
            IgnoredChange::OtherTable
        };
        self.metrics.ignored_changes(kind).inc();
        None
    }

    fn is_outbox(&self, r: &Relation) -> bool {
        r.name == self.s.table_name
            && (r.namespace == self.s.table_schema
                || (r.namespace.is_empty() && self.s.table_schema == "pg_catalog"))
    }

    fn ensure_layout(&mut self, relation: &Arc<Relation>) -> Result<(), CdcError> {
        if self
            .layout
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.relation, relation))
        {
            return Ok(());
        }
        let cols = self.s.columns.names();
        let idx = |name: &str| {
            relation
                .column_index(name)
                .ok_or_else(|| CdcError::OutboxColumn {
                    table: self.table(),
                    column: name.to_owned(),
                    naming: self.s.columns,
                })
        };
        let layout = OutboxLayout {
            relation: relation.clone(),
            event_id: idx(cols.event_id)?,
            aggregate_type: idx(cols.aggregate_type)?,
            aggregate_id: idx(cols.aggregate_id)?,
            event_type: idx(cols.event_type)?,
            payload: idx(cols.payload)?,
            headers: cols.headers.and_then(|h| relation.column_index(h)),
            // The native schema's identity column; Debezium's `id` is the event id itself.
            id: match self.s.columns {
                ColumnSet::Native => relation.column_index("id"),
                ColumnSet::Debezium => None,
            },
            txid: relation.column_index("txid"),
        };
        self.layout = Some(layout);
        Ok(())
    }
}

/// A column's text, if it was sent and is UTF-8.
fn text_column(cols: &[Column], i: usize) -> Option<String> {
    match cols.get(i) {
        Some(Column::Text(b)) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    }
}

/// The event of an outbox row, or why it is not one.
fn row_event(
    layout: &OutboxLayout,
    cols: &[Column],
    source: Source,
    commit_ts_us: i64,
) -> Result<Event, String> {
    let get = |i: usize, name: &str| -> Result<Bytes, String> {
        match cols.get(i) {
            Some(Column::Text(b)) | Some(Column::Binary(b)) => Ok(b.clone()),
            Some(Column::Null) => Err(format!("column {name} is NULL")),
            Some(Column::UnchangedToast) => {
                Err(format!("column {name} was not sent (unchanged TOAST)"))
            }
            None => Err(format!("column {name} missing from the tuple")),
        }
    };
    let text = |b: Bytes, name: &str| -> Result<String, String> {
        String::from_utf8(b.to_vec()).map_err(|_| format!("column {name} is not UTF-8"))
    };
    let headers = match layout.headers.and_then(|i| cols.get(i)) {
        Some(Column::Text(b)) => outbox::parse_headers(b).map_err(|e| e.to_string())?,
        _ => Vec::new(),
    };
    Ok(Event {
        event_id: text(get(layout.event_id, "event_id")?, "event_id")?,
        aggregate_type: text(
            get(layout.aggregate_type, "aggregate_type")?,
            "aggregate_type",
        )?,
        aggregate_id: get(layout.aggregate_id, "aggregate_id")?,
        event_type: text(get(layout.event_type, "event_type")?, "event_type")?,
        payload: get(layout.payload, "payload")?,
        headers,
        source,
        commit_ts_us,
    })
}

/// Sends a standby status update with `lsn` as the written, flushed and applied position,
/// bounded by `limit`: a server that stops reading must end the session (and be reported), not
/// stall the loop while `/healthz` still says healthy.
async fn confirm(
    stream: &mut ReplicationStream,
    lsn: Lsn,
    limit: Duration,
) -> Result<(), CdcError> {
    match tokio::time::timeout(limit, stream.send_status_update(lsn, lsn, lsn, false)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CdcError::Timeout("standby status update", limit)),
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// `'text'` with quotes doubled: a SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"name"` with quotes doubled: a SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The configuration cannot be turned into settings (a password file that cannot be read, a
/// URL the replication client does not accept).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("postgres.url: {0}")]
    Url(ReplicationError),
    #[error("postgres.password_file: cannot read {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CdcSettings {
    /// Settings from a validated configuration.
    pub fn from_config(cfg: &crate::config::RelayConfig) -> Result<CdcSettings, SettingsError> {
        let mut postgres =
            ReplicationConfig::from_url(cfg.postgres.url.expose()).map_err(SettingsError::Url)?;
        if let Some(path) = &cfg.postgres.password_file {
            let password =
                std::fs::read_to_string(path).map_err(|source| SettingsError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            postgres.password = Some(password.trim_end_matches(['\r', '\n']).to_owned());
        }
        postgres.connect_timeout = cfg.postgres.connect_timeout;
        if postgres.application_name.is_empty() {
            postgres.application_name = format!("outbox-relay-{}", cfg.cdc.slot);
        }
        let (table_schema, table_name) = match cfg.outbox.table.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), cfg.outbox.table.clone()),
        };
        Ok(CdcSettings {
            postgres,
            slot: cfg.cdc.slot.clone(),
            publication: cfg.cdc.publication.clone(),
            create_slot: cfg.cdc.create_slot,
            table_schema,
            table_name,
            columns: cfg.outbox.columns,
            topic_template: cfg.outbox.topic_template.clone(),
            message_prefix: cfg.cdc.message_prefix.clone(),
            heartbeat_prefix: cfg.cdc.heartbeat_prefix.clone(),
            heartbeat_interval: cfg.cdc.heartbeat(),
            status_interval: cfg.cdc.status_interval,
            proto_version: cfg.cdc.proto_version,
            batch: BatchLimits::from_config(&cfg.batch),
            kafka: KafkaSettings::from_config(cfg, crate::config::RelayKind::Cdc),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            shutdown_timeout: cfg.shutdown.timeout,
            // Streamed (protocol 2) transactions are buffered until they commit; past the
            // budget the largest is spilled to a temporary file, so memory stays bounded.
            initial_backfill: cfg.cdc.initial_backfill,
            recover_lost_slot: cfg.cdc.recover_lost_slot,
            assembler: AssemblerConfig {
                memory_budget: cfg.cdc.stream_memory_budget,
                spill_dir: cfg.cdc.spill_dir.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::{
        Insert, PgTimestamp, RelColumn, ReplicaIdentity, TupleData,
    };
    use crate::sink::null::NullBackend;
    use std::sync::atomic::Ordering;

    fn settings() -> CdcSettings {
        let cfg = crate::config::RelayConfig::load_from(
            None,
            [
                ("RELAY_POSTGRES__URL", "postgres://relay@127.0.0.1:5432/db"),
                ("RELAY_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                ("RELAY_BATCH__MAX_DELAY", "30s"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect("valid configuration");
        CdcSettings::from_config(&cfg).expect("settings")
    }

    fn outbox_relation() -> Arc<Relation> {
        let col = |name: &str| RelColumn {
            flags: 0,
            name: name.to_owned(),
            type_oid: 25,
            type_modifier: -1,
        };
        Arc::new(Relation {
            xid: None,
            oid: 16384,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: [
                "id",
                "event_id",
                "aggregate_type",
                "aggregate_id",
                "event_type",
                "payload",
                "headers",
            ]
            .map(col)
            .to_vec(),
        })
    }

    fn insert(rel: &Arc<Relation>, n: u32) -> TxnEvent {
        let t = |s: String| Column::Text(Bytes::from(s));
        TxnEvent::Change(Change::Insert(Insert {
            xid: None,
            relation: rel.clone(),
            new: TupleData {
                columns: vec![
                    t(n.to_string()),
                    t(format!("00000000-0000-0000-0000-{n:012}")),
                    t("order".into()),
                    t(format!("o-{n}")),
                    t("Placed".into()),
                    t("{}".into()),
                    Column::Null,
                ],
            },
        }))
    }

    /// The relay's own safety net: WAL transactions whose commit LSN is below the checkpoint
    /// (the server resent them, as after a slot whose confirmed position moved back) are
    /// dropped whole and counted; later ones are relayed. In the integration tests the server
    /// filters by the start position, so nothing else reaches this path.
    #[tokio::test]
    async fn transactions_below_the_checkpoint_are_dropped_not_relayed_again() {
        let s = settings();
        let metrics = Metrics::new().unwrap();
        let (health, shutdown) = (Health::new(), Shutdown::new());
        let mut session = Session::new(&s, &metrics, &health, &shutdown);
        session.resume_floor = Lsn(1_000);
        let backend = NullBackend::default();
        let (sink, _) = Sink::start(backend.clone(), "cdc/t".into()).await.unwrap();
        let mut pipe = Pipeline::new(
            RelayKind::Cdc,
            sink,
            s.batch.clone(),
            metrics.clone(),
            Checkpoint::default(),
        );
        let rel = outbox_relation();
        let ts = PgTimestamp(0);
        for (n, (commit, end)) in [
            (900u64, 950u64),
            (999, 1_000),
            (1_000, 1_050),
            (1_100, 1_150),
        ]
        .into_iter()
        .enumerate()
        {
            let n = n as u32;
            let events = [
                TxnEvent::Begin {
                    xid: n,
                    final_lsn: Lsn(commit),
                    commit_time: ts,
                },
                insert(&rel, n),
                insert(&rel, n + 100),
                TxnEvent::Commit {
                    xid: n,
                    commit_lsn: Lsn(commit),
                    end_lsn: Lsn(end),
                    commit_time: ts,
                },
            ];
            for ev in events {
                session.on_event(ev, &mut pipe).await.unwrap();
            }
        }
        let cp = pipe.drain().await.unwrap().clone();
        assert_eq!(
            metrics.skipped_transactions().get(),
            2,
            "900 and 999 are below 1000"
        );
        assert_eq!(backend.committed_records.load(Ordering::Relaxed), 4);
        assert_eq!(cp.end_lsn, 1_150);
        assert_eq!(cp.events_total, 4);
        pipe.finish().await;
    }
}
