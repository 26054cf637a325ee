//! The polling relay: outbox rows below the visibility horizon → outbox envelope → Kafka
//! transaction, exactly once. No replication slot: it reads the outbox table with SQL.
//!
//! ```text
//!            ┌────────────── session (reconnects on transient errors) ──────────────┐
//!  Postgres  │ SELECT … WHERE (txid, id) > cursor AND txid < xmin ORDER BY txid, id  │ Sink thread ─▶ Kafka
//!  (outbox) ◀┤ LIMIT batch_size: one poll = one pipeline unit ending at its last row  │  (events + cursor
//!            └───────────────────────────────────────────────────────────────────────┘   in one transaction)
//! ```
//!
//! ## Why no row is ever skipped
//!
//! `id` is assigned when a row is inserted, not when its transaction commits: a transaction that
//! inserted id 10 and commits after the one that inserted id 11 makes row 10 visible after row
//! 11. A cursor on `id` alone would have moved past 10 by then and skip it for good. So the
//! cursor is `(txid, id)`, where `txid` is the writing transaction's 64-bit id (the column's
//! default, `pg_current_xact_id()`, which is the top-level transaction's id even inside a
//! savepoint), and each poll reads only rows of transactions that have *finished*:
//!
//! ```sql
//! WHERE (txid, id) > ($t, $i) AND txid < pg_snapshot_xmin(pg_current_snapshot())
//! ORDER BY txid, id LIMIT $n
//! ```
//!
//! `pg_snapshot_xmin` of the statement's own snapshot is the oldest transaction still running:
//! every transaction with a smaller id has committed or aborted, so the snapshot sees all the
//! rows it will ever have. By induction over the polls: a row `r` past the cursor either has
//! `r.txid` below the horizon, and then it is visible to this poll and, in `(txid, id)` order,
//! read by it or a later one (the `LIMIT` only cuts the ordered list short; the next poll goes on
//! from the last row returned), or its transaction had not finished and `r.txid` is at or above
//! the horizon, hence above every row read so far, so the cursor has not passed it. A row can
//! therefore never appear behind the cursor. The rows of one transaction become visible together
//! (its commit is atomic), so the tie-break on `id` within one `txid` is safe too.
//! All of this rests on `txid` being the writing transaction's own id (the column default):
//! a writer must not set it. A lower value (a copy from another table, a restored dump) can fall
//! behind the cursor and never be read; a higher one waits until the server's ids reach it.
//!
//! **Across a Postgres restart** nothing changes: the cursor lives in Kafka (the checkpoint of the
//! last committed Kafka transaction), not in Postgres; transactions that were running at the crash
//! are aborted (their rows never become visible), and the transaction ids handed out after the
//! restart are above every id of a transaction that committed before it (Postgres recovers its
//! next id from WAL past every id written there, and a commit is in WAL). That last point assumes
//! the rows the relay read were durable: a transaction committed with `synchronous_commit = off`,
//! or on a primary that fails over to an asynchronous standby, can vanish in a crash after the
//! relay published it, and its id can be handed out again. The relay checks that the server's
//! next transaction id is above its cursor at every start and refuses to go on otherwise
//! ([`PollError::CursorAhead`]).
//!
//! **Across xid wraparound** nothing changes either: `txid` is `xid8`, the 32-bit xid extended
//! with its epoch. It only grows (at a million transactions a second it would take 500,000 years
//! to wrap), so the order of `(txid, id)` is the order of assignment forever, and freezing, which
//! rewrites a row's 32-bit `xmin`, never touches the `txid` column.
//!
//! The horizon is cluster-wide: a long transaction anywhere in the cluster (or a prepared one)
//! holds it back and delays polling, never loses rows; `relay_poll_cursor_lag_seconds` shows it.
//!
//! ## Order
//!
//! Rows are published in `(txid, id)` order. Per key this is commit order whenever a key's
//! transactions do not overlap (each begins writing after the previous one committed, which is
//! what a writer that owns its aggregates, or that locks the aggregate's row first, does). Two
//! transactions that overlap in time and write the same key are published in the order their
//! ids were assigned, which may differ from their commit order: the consumers' version guard
//! exists for such cases (and for CDC's, which differ in the other direction).
//!
//! ## Progress
//!
//! One poll's rows are one unit of the shared [`pipeline`](crate::pipeline), ending at
//! [`Position::Table`] of its last row: the Kafka transaction carrying the rows carries the
//! cursor in its checkpoint. A session starts from the last committed checkpoint (a relay without
//! one starts at the beginning of the table), so after a crash the rows of an aborted Kafka
//! transaction are read again and nothing committed is read twice. There is nothing to confirm
//! to Postgres.
//!
//! ## Adaptive polling
//!
//! A poll that returns a full batch is followed by the next at once; a partial one by a pause of
//! `poll.interval`; while polls return nothing the pause doubles up to `poll.max_interval`. The
//! relay stops polling while `batch.max_events` rows wait behind the Kafka commit in flight, so
//! a slow broker slows reading instead of growing one Kafka transaction without bound.
//!
//! ## LISTEN/NOTIFY wake-up
//!
//! With `poll.notify_channel` set, the relay LISTENs on that channel and a notification starts
//! the next poll at once instead of at the end of the pause, so `poll.max_interval` can be long
//! (little load on an idle database) without the first event after a quiet spell waiting for
//! it. The writers notify (`NOTIFY <channel>` in their transaction, or a statement-level trigger
//! on the outbox). It only wakes the poller: what a poll reads, and so correctness, does not
//! depend on it, and a notification lost with a broken connection costs one pause at most.
//! NOTIFY serializes committing transactions on a cluster-wide lock, which is why it is off by
//! default.
//!
//! ## Janitor
//!
//! Off by default (`poll.janitor`). When on, every `poll.janitor_interval` it deletes rows at or
//! below this relay's *committed* cursor (they are in Kafka) that are older than
//! `poll.janitor_retention`, oldest first, `poll.janitor_batch` rows per statement, and counts
//! them (`relay_janitor_deleted_rows_total`). Rows past the cursor are never touched, so it cannot
//! delete an undelivered row of this relay. The CDC relay reads WAL, not the table, so it does not
//! need the rows (it sees the deletes and ignores them); the retention keeps the window a CDC
//! lost-slot recovery reads from the table. Another polling relay's cursor is not known here: enable
//! the janitor only on a polling relay that is the only one reading its table.
//!
//! The SQL connection is the relay's own ([`connect_sql_listening`]): the same URL, `sslmode` and
//! TLS as every other Postgres connection of the relay.

use crate::checkpoint::{self, Checkpoint};
use crate::config::{ConfigError, PostgresConfig, RelayKind};
use crate::health::Health;
use crate::metrics::{Component, EventKind, Metrics};
use crate::outbox::{self, ColumnSet, Event, OutRecord, Source, TopicRouter};
use crate::pipeline::{self as pl, BatchLimits, Disposition, DlqRecord, Pipeline, Position};
use crate::pipeline::{RecordKind, SessionError};
use crate::replication::conn::{connect_sql_listening, quote_ident, ReplicationError};
use crate::shutdown::Shutdown;
use crate::sink::kafka::{KafkaSettings, Poison};
use crate::sink::{KafkaSink, Sink, SinkError};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Everything the polling relay needs, already validated (see `config`).
#[derive(Clone, Debug)]
pub struct PollSettings {
    /// Connection settings; read at every connect (a rotated password file is picked up).
    pub postgres: PostgresConfig,
    /// Schema and name of the outbox table.
    pub table_schema: String,
    pub table_name: String,
    pub columns: ColumnSet,
    pub topic_template: String,
    /// Instance name: the checkpoint key is `poll/<name>`.
    pub name: String,
    pub interval: Duration,
    pub max_interval: Duration,
    pub batch_size: u32,
    pub batch: BatchLimits,
    pub kafka: KafkaSettings,
    /// Topic for rows that cannot be mapped to an event (nothing is dropped).
    pub dlq_topic: String,
    pub shutdown_timeout: Duration,
    /// `None`: the janitor is off.
    pub janitor: Option<Janitor>,
    /// LISTEN on this channel; a notification starts the next poll at once.
    pub notify_channel: Option<String>,
}

/// The janitor's settings (see the module docs).
#[derive(Clone, Debug)]
pub struct Janitor {
    pub retention: Duration,
    pub interval: Duration,
    pub batch: u32,
}

impl PollSettings {
    /// Settings from a validated configuration.
    pub fn from_config(cfg: &crate::config::RelayConfig) -> PollSettings {
        let (table_schema, table_name) = match cfg.outbox.table.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), cfg.outbox.table.clone()),
        };
        PollSettings {
            postgres: cfg.postgres.clone(),
            table_schema,
            table_name,
            columns: cfg.outbox.columns,
            topic_template: cfg.outbox.topic_template.clone(),
            name: cfg.poll.name.clone(),
            interval: cfg.poll.interval,
            max_interval: cfg.poll.max_interval.max(cfg.poll.interval),
            batch_size: cfg.poll.batch_size,
            batch: BatchLimits::from_config(&cfg.batch),
            kafka: KafkaSettings::from_config(cfg, RelayKind::Poll),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            shutdown_timeout: cfg.shutdown.timeout,
            janitor: cfg.poll.janitor.then_some(Janitor {
                retention: cfg.poll.janitor_retention,
                interval: cfg.poll.janitor_interval,
                batch: cfg.poll.janitor_batch,
            }),
            notify_channel: cfg.poll.notify_channel.clone(),
        }
    }

    /// `"schema"."table"`, quoted as an identifier (the names are the catalog's, exactly).
    fn table_sql(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.table_schema),
            quote_ident(&self.table_name)
        )
    }

    fn table(&self) -> String {
        format!("{}.{}", self.table_schema, self.table_name)
    }

    /// The poll query, with `commit_ts` the SQL expression of a row's commit time: parameters
    /// `$1` the cursor's txid (as text), `$2` its id, `$3` the batch size; columns txid (as
    /// text), id, event_id, aggregate_type, aggregate_id, event_type, payload, headers, commit
    /// time (µs since the Unix epoch).
    ///
    /// The output columns are named apart from the table's, and ORDER BY names the table's: a
    /// bare `ORDER BY txid` would sort by the output column `txid::text` (SQL resolves ORDER BY
    /// names against the output first), putting txid 10000 before 9999, so that a batch cut by
    /// LIMIT could end on a row below others it returned, and the next poll would read those
    /// again.
    pub fn poll_sql(&self, commit_ts: &str) -> String {
        format!(
            "SELECT o.txid::text AS txid_text, o.id AS row_id, o.event_id::text AS event_id_text, \
             o.aggregate_type::text AS aggregate_type_text, o.aggregate_id::text AS aggregate_id_text, \
             o.event_type::text AS event_type_text, o.payload::text AS payload_text, \
             o.headers::text AS headers_text, (extract(epoch FROM {commit_ts}) * 1000000)::int8 AS commit_us \
             FROM {} AS o \
             WHERE (o.txid, o.id) > ($1::text::xid8, $2::int8) \
             AND o.txid < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY o.txid, o.id LIMIT $3::int8",
            self.table_sql()
        )
    }
}

/// What went wrong, named after the situation.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("Postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("connecting to Postgres: {0}")]
    Connect(#[from] ReplicationError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("Postgres did not answer the {0} within {1:?}; reconnecting")]
    Timeout(&'static str, Duration),
    #[error("the polling relay needs the native outbox schema (an `id` bigint and a `txid` xid8 column, see migrations/); outbox.columns = debezium has neither. Use relay cdc for a Debezium outbox table")]
    Columns,
    #[error("the checkpoint in Kafka belongs to Postgres system {checkpoint}, but this server is system {server}: refusing to resume from another cluster's cursor. Use another checkpoint topic or poll.name for this cluster")]
    SystemMismatch { checkpoint: u64, server: u64 },
    #[error("the relay's cursor in Kafka is at transaction {cursor}, but this server's next transaction id is {next}: the server has lost transactions the relay already published (restored from a backup, failed over to an asynchronous standby, or synchronous_commit = off and a crash), and rows written from now on could hide behind the cursor. See RUNBOOK.md")]
    CursorAhead { cursor: u64, next: u64 },
    #[error("Postgres answered a query in an unexpected shape: {0}")]
    Unexpected(String),
}

impl SessionError for PollError {
    /// One `match` deciding retry or fatal. The retryable list is deliberately short: unknown
    /// errors are not retried blindly.
    fn disposition(&self) -> Disposition {
        match self {
            PollError::Postgres(e) if postgres_transient(e) => Disposition::Retry,
            PollError::Connect(e) if e.is_transient() => Disposition::Retry,
            // Resuming could skip rows, or cannot work with this table: a restart refuses again.
            PollError::CursorAhead { .. }
            | PollError::SystemMismatch { .. }
            | PollError::Columns => Disposition::Refuse,
            PollError::Sink(e) if e.is_transient() => Disposition::Retry,
            PollError::Timeout(..) => Disposition::Retry,
            _ => Disposition::Fatal,
        }
    }

    fn component(&self) -> Component {
        match self {
            PollError::Sink(_) => Component::Kafka,
            _ => Component::Postgres,
        }
    }
}

/// A Postgres error that reconnecting can cure: the connection broke or was refused, the server
/// is shutting down or starting, out of connections, or the statement was cancelled. Errors of
/// the query itself (a missing table or column, a permission) need the operator.
fn postgres_transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: I/O, a closed connection, a connect timeout.
        return true;
    };
    let code = code.code();
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, …)
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up, recovering)
                | "57014" // query_canceled (statement_timeout)
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
        )
}

/// How long one query may take before the session is ended and reconnected.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the cursor lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Rows counted at most for `relay_poll_cursor_lag_rows`, so the count stays cheap on a backlog.
const LAG_ROWS_CAP: i64 = 100_000;

/// Runs the polling relay until shutdown (Ok) or a fatal error (Err). Transient errors
/// reconnect with a jittered exponential backoff and resume from the last committed checkpoint.
pub async fn run(
    settings: PollSettings,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), PollError> {
    if settings.columns == ColumnSet::Debezium {
        return Err(PollError::Columns);
    }
    // Records Kafka refused for good in one session go to the DLQ in the next (see `Poison`).
    let poison = Poison::default();
    let (s, m, h, sd, p) = (&settings, &metrics, &health, &shutdown, &poison);
    pl::run_sessions(RelayKind::Poll, &s.name, m, h, sd, move || {
        Box::pin(async move { Session::new(s, m, h, sd).run(p).await })
    })
    .await
}

/// The cursor: the last row read (in memory) or committed (in the checkpoint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Cursor {
    txid: u64,
    id: i64,
}

impl Cursor {
    fn of(cp: &Checkpoint) -> Cursor {
        Cursor {
            txid: cp.poll_txid.unwrap_or(0),
            id: cp.poll_id.unwrap_or(0),
        }
    }
}

/// One outbox row as the poll query returns it (text columns, `None` for NULL).
#[derive(Debug, Default)]
struct Row {
    txid: u64,
    id: i64,
    event_id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    payload: Option<String>,
    headers: Option<String>,
    commit_ts_us: i64,
}

struct Session<'a> {
    s: &'a PollSettings,
    metrics: &'a Metrics,
    health: &'a Health,
    shutdown: &'a Shutdown,
    router: TopicRouter,
    dlq_topic: Arc<str>,
}

impl<'a> Session<'a> {
    fn new(
        s: &'a PollSettings,
        metrics: &'a Metrics,
        health: &'a Health,
        shutdown: &'a Shutdown,
    ) -> Self {
        Session {
            s,
            metrics,
            health,
            shutdown,
            router: TopicRouter::new(&s.topic_template),
            dlq_topic: s.dlq_topic.as_str().into(),
        }
    }

    async fn run(&mut self, poison: &Poison) -> Result<(), PollError> {
        let s = self.s;
        let mut connection = s.postgres.connection()?;
        if connection.application_name.is_empty() {
            connection.application_name = format!("outbox-relay-poll-{}", s.name);
        }
        // Notifications (LISTEN wake-ups) arrive on `wake`; the connection's I/O runs on a task
        // of its own until the client is dropped.
        let (client, mut wake) = bounded(
            "connection",
            connect_sql_listening(&connection),
            s.postgres.connect_timeout + QUERY_TIMEOUT,
        )
        .await?;
        if let Some(channel) = &s.notify_channel {
            bounded(
                "LISTEN",
                client.batch_execute(&format!("LISTEN {}", quote_ident(channel))),
                QUERY_TIMEOUT,
            )
            .await?;
        }
        self.with_connection(&client, poison, &mut wake).await
    }

    async fn with_connection(
        &mut self,
        client: &tokio_postgres::Client,
        poison: &Poison,
        wake: &mut tokio::sync::mpsc::Receiver<()>,
    ) -> Result<(), PollError> {
        let s = self.s;
        let server = bounded("system identifier query", system_id(client), QUERY_TIMEOUT).await?;
        let commit_ts = bounded(
            "settings query",
            client.query_one(
                "SELECT current_setting('track_commit_timestamp') = 'on'",
                &[],
            ),
            QUERY_TIMEOUT,
        )
        .await?
        .try_get::<_, bool>(0)?;

        let key = checkpoint::poll_key(&s.name);
        let backend = KafkaSink::new(
            s.kafka.clone(),
            tokio::runtime::Handle::current(),
            self.metrics.kafka_queue_full(RelayKind::Poll),
            poison.clone(),
        );
        let (sink, checkpoint) =
            Sink::start_with_dlq(backend, key.clone(), self.dlq_topic.clone()).await?;
        let fresh = Checkpoint {
            relay: key,
            system_id: server.unwrap_or(0),
            ..Checkpoint::default()
        };
        let mut pipe = Pipeline::new(
            RelayKind::Poll,
            sink,
            s.batch.clone(),
            self.metrics.clone(),
            checkpoint.unwrap_or(fresh),
        )
        .with_transaction_timeout(s.kafka.transaction_limit());
        let result = match self.preflight(client, pipe.committed(), server).await {
            Ok(()) => self.poll_loop(client, &mut pipe, commit_ts, wake).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            // The open Kafka transaction (if any) dies with the producer: the rows in it are
            // read again by the next session, from the last committed cursor.
            pipe.close().await;
        } else {
            pipe.finish().await;
        }
        result
    }

    /// Refuses a checkpoint of another cluster, and a cursor past the server's transaction
    /// counter (see the module docs: rows could hide behind it).
    async fn preflight(
        &self,
        client: &tokio_postgres::Client,
        committed: &Checkpoint,
        server: Option<u64>,
    ) -> Result<(), PollError> {
        if let Some(server) = server {
            if committed.system_id != 0 && committed.system_id != server {
                return Err(PollError::SystemMismatch {
                    checkpoint: committed.system_id,
                    server,
                });
            }
        }
        let cursor = Cursor::of(committed);
        let next: String = bounded(
            "transaction counter query",
            client.query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[]),
            QUERY_TIMEOUT,
        )
        .await?
        .try_get(0)?;
        let next: u64 = next
            .parse()
            .map_err(|_| PollError::Unexpected(format!("next transaction id {next:?}")))?;
        if cursor.txid >= next {
            return Err(PollError::CursorAhead {
                cursor: cursor.txid,
                next,
            });
        }
        Ok(())
    }

    async fn poll_loop(
        &mut self,
        client: &tokio_postgres::Client,
        pipe: &mut Pipeline,
        commit_ts: bool,
        wake: &mut tokio::sync::mpsc::Receiver<()>,
    ) -> Result<(), PollError> {
        let s = self.s;
        let table = s.table_sql();
        // The commit time when Postgres records it; else the row's `created_at` (its
        // transaction's start), which makes the commit-to-Kafka latency include the writing
        // transaction's own duration.
        let ts = if commit_ts {
            "coalesce(pg_xact_commit_timestamp(o.xmin), o.created_at)"
        } else {
            "o.created_at"
        };
        let poll = client.prepare(&s.poll_sql(ts)).await?;
        let lag = client
            .prepare(&format!(
                "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 \
                 FROM (SELECT created_at FROM {table} \
                 WHERE (txid, id) > ($1::text::xid8, $2::int8) LIMIT {LAG_ROWS_CAP}) AS past"
            ))
            .await?;

        // Rows at or below the committed cursor are in Kafka; the janitor deletes those older
        // than the retention, oldest first, a small batch per statement.
        let janitor = client
            .prepare(&format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
                 WHERE (txid, id) <= ($1::text::xid8, $2::int8) \
                 AND created_at < clock_timestamp() - make_interval(secs => $3::float8) \
                 ORDER BY txid, id LIMIT $4::int8)"
            ))
            .await?;
        let mut janitor_tick = tokio::time::interval(
            s.janitor
                .as_ref()
                .map_or(Duration::from_secs(3600), |j| j.interval),
        );
        janitor_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut cursor = Cursor::of(pipe.committed());
        tracing::info!(table = %s.table(), txid = cursor.txid, id = cursor.id, "polling");
        self.health.set_ready(true);
        self.health.set_healthy(true);
        self.metrics.set_up_and_ready(true, true);
        pl::session_healthy(RelayKind::Poll, self.metrics);

        let mut next_poll = Instant::now();
        let mut pace = Pace::new(s.interval, s.max_interval);
        // Rows read since the last commit result: at `batch.max_events` the relay waits for
        // the commit in flight before reading more (see the module docs).
        let mut waiting: u64 = 0;
        let mut lag_tick = tokio::time::interval(LAG_EVERY);
        lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.shutdown;
        loop {
            // The loop went round: the watchdog may be fed (a wedged loop stops feeding it).
            self.health.progress();
            let deadline = pipe.deadline();
            let may_poll = waiting < s.batch.max_events as u64;
            tokio::select! {
                biased;
                // 1. Shutdown first: stop reading, drain below.
                _ = shutdown.triggered() => break,
                // 2. The result of the commit in flight: nothing to confirm to Postgres.
                res = pipe.next_commit() => {
                    pipe.on_committed(res).await?;
                    waiting = 0;
                }
                // 3. The batch's deadline.
                _ = tokio::time::sleep_until(deadline.unwrap_or(next_poll)), if deadline.is_some() => {
                    pipe.on_deadline().await?;
                }
                // 4. The cursor lag (before the poll, which is always ready while batches come
                //    back full).
                _ = lag_tick.tick() => {
                    let committed = Cursor::of(pipe.committed());
                    let row = bounded(
                        "lag query",
                        client.query_one(&lag, &[&committed.txid.to_string(), &committed.id]),
                        QUERY_TIMEOUT,
                    )
                    .await?;
                    let rows: i64 = row.try_get(0)?;
                    let seconds: f64 = row.try_get(1)?;
                    self.metrics
                        .set_poll_cursor_lag(u64::try_from(rows).unwrap_or(0), seconds);
                }
                // 5. The janitor, when on: a few small batches, then back to polling.
                _ = janitor_tick.tick(), if s.janitor.is_some() => {
                    if let Some(j) = &s.janitor {
                        self.clean(client, &janitor, j, Cursor::of(pipe.committed())).await?;
                    }
                }
                // 6. A notification on poll.notify_channel: poll now, not at the end of the pause.
                Some(()) = wake.recv() => {
                    next_poll = Instant::now() + pace.wake();
                }
                // 7. The next poll.
                _ = tokio::time::sleep_until(next_poll), if may_poll => {
                    let n = self.poll(client, &poll, pipe, &mut cursor).await?;
                    waiting += n;
                    next_poll = Instant::now() + pace.after(n, s.batch_size);
                }
            }
        }

        // Draining: commit what is complete, within the shutdown timeout. A poll's rows are
        // pushed whole inside one arm, so no unit is ever half read here.
        match tokio::time::timeout(s.shutdown_timeout, pipe.drain()).await {
            Ok(r) => {
                let cp = r?;
                tracing::info!(
                    txid = cp.poll_txid.unwrap_or(0),
                    id = cp.poll_id.unwrap_or(0),
                    "poll relay stopped cleanly"
                );
            }
            Err(_) => tracing::warn!(
                timeout_ms = s.shutdown_timeout.as_millis() as u64,
                "shutdown timed out; the open Kafka transaction is abandoned (it aborts) and is re-read after restart"
            ),
        }
        Ok(())
    }

    /// One janitor round: deletes delivered rows (at or below `committed`) older than the
    /// retention, `batch` per statement, up to 10 statements (the loop goes on polling between
    /// rounds); counts them.
    async fn clean(
        &self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        j: &Janitor,
        committed: Cursor,
    ) -> Result<(), PollError> {
        if committed == Cursor::default() {
            return Ok(());
        }
        let txid = committed.txid.to_string();
        let retention = j.retention.as_secs_f64();
        let batch = i64::from(j.batch);
        for _ in 0..10 {
            let deleted = bounded(
                "janitor delete",
                client.execute(statement, &[&txid, &committed.id, &retention, &batch]),
                QUERY_TIMEOUT,
            )
            .await?;
            self.metrics.janitor_deleted_rows().inc_by(deleted);
            if deleted < j.batch.into() {
                break;
            }
        }
        Ok(())
    }

    /// One poll: reads up to `batch_size` rows past `cursor` below the horizon and hands them to
    /// the pipeline as one unit. Returns how many rows it read.
    async fn poll(
        &mut self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        pipe: &mut Pipeline,
        cursor: &mut Cursor,
    ) -> Result<u64, PollError> {
        let limit = i64::from(self.s.batch_size);
        let rows = bounded(
            "poll query",
            client.query(statement, &[&cursor.txid.to_string(), &cursor.id, &limit]),
            QUERY_TIMEOUT,
        )
        .await?;
        self.metrics.poll_queries().inc();
        self.metrics.poll_rows().observe(rows.len() as f64);
        if rows.is_empty() {
            self.metrics.poll_empty().inc();
            return Ok(0);
        }
        pipe.begin_unit();
        let mut oldest_commit: Option<i64> = None;
        let mut last = *cursor;
        for r in &rows {
            let row = parse_row(r)?;
            oldest_commit =
                Some(oldest_commit.map_or(row.commit_ts_us, |t| t.min(row.commit_ts_us)));
            last = Cursor {
                txid: row.txid,
                id: row.id,
            };
            let (record, kind) = self.map_row(row);
            pipe.push(record, kind).await?;
        }
        tracing::debug!(
            rows = rows.len(),
            from_txid = cursor.txid,
            from_id = cursor.id,
            to_txid = last.txid,
            to_id = last.id,
            "poll"
        );
        pipe.end_unit(
            Position::Table {
                txid: last.txid,
                id: last.id,
            },
            oldest_commit,
        )
        .await?;
        *cursor = last;
        Ok(rows.len() as u64)
    }

    /// The Kafka record of one row: its event, or a DLQ record when it is not one.
    fn map_row(&mut self, row: Row) -> (OutRecord, RecordKind) {
        match row_event(&row) {
            Ok(event) => self.publish(event, row.txid, row.id),
            Err(why) => self.row_dlq(row, why),
        }
    }

    /// The record of `event` on its topic; a DLQ record when its aggregate type makes no valid
    /// topic (see [`outbox`]'s routing rules).
    fn publish(&mut self, event: Event, txid: u64, id: i64) -> (OutRecord, RecordKind) {
        pl::route(&mut self.router, event, EventKind::Row).unwrap_or_else(|unroutable| {
            unroutable.into_dlq(self.dlq_topic.clone(), self.source_identity(txid, id))
        })
    }

    /// The DLQ record of a row that is not an event (a NULL column, bad headers): whatever
    /// identity columns it has, and its payload.
    fn row_dlq(&self, row: Row, why: String) -> (OutRecord, RecordKind) {
        tracing::warn!(txid = row.txid, id = row.id, error = %why, "outbox row cannot be mapped; sent to the DLQ topic");
        let mut identity: Vec<(&'static str, Bytes)> = [
            ("event_id", &row.event_id),
            ("aggregate_type", &row.aggregate_type),
            ("aggregate_id", &row.aggregate_id),
            ("event_type", &row.event_type),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.clone().map(|v| (name, Bytes::from(v))))
        .collect();
        identity.extend(self.source_identity(row.txid, row.id));
        DlqRecord {
            reason: why,
            key: row.aggregate_id.map(Bytes::from).unwrap_or_default(),
            value: row.payload.map(Bytes::from).unwrap_or_default(),
            identity,
            original_headers: row
                .headers
                .map(|h| vec![("headers".to_owned(), Bytes::from(h))])
                .unwrap_or_default(),
        }
        .unmappable_row(self.dlq_topic.clone())
    }

    /// `txid`, `id` and `table` headers of a DLQ record.
    fn source_identity(&self, txid: u64, id: i64) -> Vec<(&'static str, Bytes)> {
        vec![
            ("txid", Bytes::from(txid.to_string())),
            ("id", Bytes::from(id.to_string())),
            ("table", Bytes::from(self.s.table())),
        ]
    }
}

/// When to poll next: at once after a full batch, `interval` after a partial one, and while
/// polls find nothing, a pause doubling from `interval` to `max`.
#[derive(Debug)]
struct Pace {
    interval: Duration,
    max: Duration,
    idle: Duration,
}

impl Pace {
    fn new(interval: Duration, max: Duration) -> Pace {
        Pace {
            interval,
            max,
            idle: interval,
        }
    }

    /// A notification arrived: poll at once, and while polls find nothing, back off from a few
    /// milliseconds rather than from `interval`. The notifying transaction has committed, but
    /// an older one still running anywhere in the cluster can keep its rows above the horizon
    /// for a moment; one empty poll must not leave them waiting a whole pause.
    fn wake(&mut self) -> Duration {
        self.idle = WAKE_RETRY.min(self.interval);
        Duration::ZERO
    }

    /// The pause after a poll that returned `rows` with a limit of `batch`.
    fn after(&mut self, rows: u64, batch: u32) -> Duration {
        if rows > 0 {
            self.idle = self.interval;
            return if rows >= u64::from(batch) {
                Duration::ZERO
            } else {
                self.interval
            };
        }
        let pause = self.idle;
        self.idle = (self.idle * 2).min(self.max);
        pause
    }
}

/// The first pause after a woken poll that found nothing (see [`Pace::wake`]).
const WAKE_RETRY: Duration = Duration::from_millis(10);

/// A row of the poll query.
fn parse_row(r: &tokio_postgres::Row) -> Result<Row, PollError> {
    let txid: String = r.try_get(0)?;
    Ok(Row {
        txid: txid
            .parse()
            .map_err(|_| PollError::Unexpected(format!("txid {txid:?}")))?,
        id: r.try_get(1)?,
        event_id: r.try_get(2)?,
        aggregate_type: r.try_get(3)?,
        aggregate_id: r.try_get(4)?,
        event_type: r.try_get(5)?,
        payload: r.try_get(6)?,
        headers: r.try_get(7)?,
        commit_ts_us: r.try_get::<_, Option<i64>>(8)?.unwrap_or(0),
    })
}

/// The event of an outbox row, or why it is not one.
fn row_event(row: &Row) -> Result<Event, String> {
    let get = |v: &Option<String>, name: &str| -> Result<String, String> {
        v.clone().ok_or_else(|| format!("column {name} is NULL"))
    };
    let headers = match &row.headers {
        Some(h) => outbox::parse_headers(h.as_bytes()).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    Ok(Event {
        event_id: get(&row.event_id, "event_id")?,
        aggregate_type: get(&row.aggregate_type, "aggregate_type")?,
        aggregate_id: Bytes::from(get(&row.aggregate_id, "aggregate_id")?),
        event_type: get(&row.event_type, "event_type")?,
        payload: Bytes::from(get(&row.payload, "payload")?),
        headers,
        source: Source::Table {
            txid: row.txid,
            id: row.id,
        },
        commit_ts_us: row.commit_ts_us,
    })
}

/// The cluster's `system_identifier`, or `None` where the role may not read it
/// (`pg_control_system()` is not granted to every role): the checkpoint check is skipped then.
async fn system_id(client: &tokio_postgres::Client) -> Result<Option<u64>, tokio_postgres::Error> {
    match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => Ok(row.try_get::<_, String>(0)?.parse().ok()),
        Err(e) if e.code().is_some() && !postgres_transient(&e) => {
            tracing::warn!(error = %e, "cannot read the cluster's system identifier; the checkpoint's cluster is not checked");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `fut`, or [`PollError::Timeout`] after `limit`: a Postgres that stops answering must end the
/// session (and be reported), not stall the loop while `/healthz` still says healthy.
async fn bounded<T, E: Into<PollError>>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
    limit: Duration,
) -> Result<T, PollError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(PollError::Timeout(what, limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_batches_poll_at_once_and_empty_polls_back_off_to_the_maximum() {
        let ms = Duration::from_millis;
        let mut pace = Pace::new(ms(50), ms(500));
        assert_eq!(pace.after(100, 100), Duration::ZERO);
        assert_eq!(pace.after(3, 100), ms(50));
        let empties: Vec<Duration> = (0..6).map(|_| pace.after(0, 100)).collect();
        assert_eq!(
            empties,
            [ms(50), ms(100), ms(200), ms(400), ms(500), ms(500)]
        );
        // A row resets the back-off.
        assert_eq!(pace.after(1, 100), ms(50));
        assert_eq!(pace.after(0, 100), ms(50));
        // A notification: at once, then a back-off from 10 ms until rows come.
        assert_eq!(pace.wake(), Duration::ZERO);
        let woken: Vec<Duration> = (0..4).map(|_| pace.after(0, 100)).collect();
        assert_eq!(woken, [ms(10), ms(20), ms(40), ms(80)]);
        assert_eq!(pace.after(2, 100), ms(50));
    }

    fn row() -> Row {
        Row {
            txid: 77,
            id: 5,
            event_id: Some("00000000-0000-0000-0000-000000000005".into()),
            aggregate_type: Some("order".into()),
            aggregate_id: Some("o-1".into()),
            event_type: Some("Placed".into()),
            payload: Some("{\"a\": 1}".into()),
            headers: Some("{\"trace\": \"t-1\", \"txid\": \"spoof\"}".into()),
            commit_ts_us: 1_000,
        }
    }

    #[test]
    fn a_row_maps_to_the_shared_envelope_with_its_table_position() {
        let event = row_event(&row()).unwrap();
        assert_eq!(event.source, Source::Table { txid: 77, id: 5 });
        assert_eq!(&event.payload[..], b"{\"a\": 1}");
        let record = event.into_record("outbox.event.order".into());
        let header = |k: &str| {
            record
                .headers
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("txid").as_deref(), Some("77"));
        assert_eq!(header("id").as_deref(), Some("5"));
        assert_eq!(header("commit_ts").as_deref(), Some("1000"));
        assert_eq!(&record.key[..], b"o-1");
        // The row's own headers may not replace the relay's.
        assert_eq!(record.extra_headers.len(), 1);
        assert_eq!(record.extra_headers[0].0, "trace");
    }

    #[test]
    fn a_row_that_is_not_an_event_says_why() {
        let mut r = row();
        r.aggregate_id = None;
        assert_eq!(row_event(&r).unwrap_err(), "column aggregate_id is NULL");
        let mut r = row();
        r.headers = Some("[1]".into());
        assert!(row_event(&r).unwrap_err().contains("JSON object"));
    }

    #[test]
    fn connection_trouble_is_retried_and_a_risk_of_skipping_rows_refused() {
        let e = PollError::Timeout("poll query", QUERY_TIMEOUT);
        assert_eq!(SessionError::disposition(&e), Disposition::Retry);
        for refused in [
            PollError::Columns,
            PollError::CursorAhead {
                cursor: 10,
                next: 9,
            },
            PollError::SystemMismatch {
                checkpoint: 1,
                server: 2,
            },
        ] {
            assert_eq!(SessionError::disposition(&refused), Disposition::Refuse);
            assert_eq!(crate::exit::Exit::of_poll(&refused).code(), 3);
        }
    }
}
