//! The relay's Prometheus metrics: every name in one place, every label value from a closed set.
//!
//! ```text
//!  relay loop ──▶ Metrics (Clone, shares handles) ──▶ its own Registry ──▶ render() ──▶ GET /metrics
//! ```
//!
//! Conventions (checked by a test over the gathered families): names start with `relay_`,
//! counters end in `_total`, quantities carry their unit (`_seconds`, `_bytes`). Label values come
//! from enums, never from data (no topic, aggregate or event names), so the number of series is
//! fixed and known: every labelled series is created at start-up with value zero, which keeps
//! `rate()` and absence alerts honest from the first scrape.
//!
//! Instrument per batch, not per event, on the hot path: `events(..).inc_by(n)` once per
//! Kafka transaction.

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::RelayKind;

/// Metric names.
pub mod names {
    /// Events published (committed to Kafka), by relay and kind.
    pub const EVENTS_TOTAL: &str = "relay_events_total";
    /// Payload bytes published, by relay.
    pub const EVENT_BYTES_TOTAL: &str = "relay_event_bytes_total";
    /// Kafka transactions ended, by relay and outcome.
    pub const KAFKA_TRANSACTIONS_TOTAL: &str = "relay_kafka_transactions_total";
    /// Events per Kafka transaction.
    pub const BATCH_EVENTS: &str = "relay_batch_events";
    /// From the Postgres commit of the oldest event in a batch to its Kafka commit.
    pub const COMMIT_TO_KAFKA_SECONDS: &str = "relay_commit_to_kafka_seconds";
    /// How long one Kafka transaction's commit took (waiting for its records' delivery, then
    /// `commit_transaction`): the Kafka share of the commit-to-Kafka latency.
    pub const KAFKA_COMMIT_SECONDS: &str = "relay_kafka_commit_seconds";
    /// Seconds from an event's Postgres commit to each stage of its way through the relay, by
    /// relay and stage (see [`super::Stage`]).
    pub const STAGE_SECONDS: &str = "relay_stage_seconds";
    /// The LSN last confirmed to Postgres (as a float: exact up to 2^53 bytes of WAL).
    pub const CONFIRMED_LSN: &str = "relay_confirmed_lsn";
    /// Bytes of WAL between the server's WAL end as the walsender last reported it (XLogData
    /// and keepalives carry it) and the LSN the relay confirmed: the relay's own view, updated
    /// while streaming. The slot metrics read from `pg_replication_slots` are the authority.
    pub const CHECKPOINT_LAG_BYTES: &str = "relay_checkpoint_lag_bytes";
    /// Reconnections, by component.
    pub const RECONNECTS_TOTAL: &str = "relay_reconnects_total";
    /// From emitting a heartbeat message to committing it, with the checkpoint, to Kafka.
    pub const HEARTBEAT_RTT_SECONDS: &str = "relay_heartbeat_rtt_seconds";
    /// Changes seen but not relayed, by kind.
    pub const IGNORED_CHANGES_TOTAL: &str = "relay_ignored_changes_total";
    /// WAL transactions dropped because the checkpoint says they were already delivered.
    pub const SKIPPED_TRANSACTIONS_TOTAL: &str = "relay_skipped_transactions_total";
    /// Times the producer queue was full (backpressure, not an error).
    pub const KAFKA_QUEUE_FULL_TOTAL: &str = "relay_kafka_queue_full_total";
    /// Seconds due batches were held back by the commit-rate pacer, by relay.
    pub const PACING_WAIT_SECONDS_TOTAL: &str = "relay_pacing_wait_seconds_total";
    /// Batches the commit-rate pacer held back, by relay.
    pub const PACED_BATCHES_TOTAL: &str = "relay_paced_batches_total";
    /// Records written to the DLQ topic instead of their event (committed), by relay.
    pub const DLQ_RECORDS_TOTAL: &str = "relay_dlq_records_total";
    /// Sessions in a row that ended in an error (0 once a session streams again), by relay.
    pub const CONSECUTIVE_FAILURES: &str = "relay_consecutive_failures";
    /// Always 1; the labels say which build runs.
    pub const BUILD_INFO: &str = "relay_build_info";
    /// 1 while the relay loop reports healthy.
    pub const UP: &str = "relay_up";
    /// 1 while the relay is connected to Postgres and Kafka and streaming.
    pub const READY: &str = "relay_ready";
    /// Outbox queries the polling relay ran.
    pub const POLL_QUERIES_TOTAL: &str = "relay_poll_queries_total";
    /// Rows one poll returned.
    pub const POLL_ROWS: &str = "relay_poll_rows";
    /// Polls that returned no row.
    pub const POLL_EMPTY_TOTAL: &str = "relay_poll_empty_total";
    /// Committed outbox rows past the polling relay's last committed checkpoint (counted up to
    /// a cap, so that measuring a large backlog stays cheap).
    pub const POLL_CURSOR_LAG_ROWS: &str = "relay_poll_cursor_lag_rows";
    /// Age (from `created_at`) of the oldest committed outbox row past the polling relay's last
    /// committed checkpoint; 0 when there is none.
    pub const POLL_CURSOR_LAG_SECONDS: &str = "relay_poll_cursor_lag_seconds";
    /// Delivered outbox rows the polling relay's janitor deleted.
    pub const JANITOR_DELETED_ROWS_TOTAL: &str = "relay_janitor_deleted_rows_total";

    // Slot metrics, read by `slot_watch` from `pg_replication_slots` on an interval over a
    // connection of their own, so they keep coming while the relay cannot stream. Label `slot`
    // is the slot name: the relay's own (`cdc.slot`), and with `slot_watch.all_slots` every
    // other slot of the database and the physical slots, bounded by `max_replication_slots`.

    /// 1 while the slot exists (0: dropped or not created yet).
    pub const SLOT_EXISTS: &str = "relay_slot_exists";
    /// 1 for the slot this relay streams (`cdc.slot`), 0 for the other slots it watches.
    pub const SLOT_OWN: &str = "relay_slot_own";
    /// WAL the slot keeps on the primary: `pg_current_wal_lsn() - restart_lsn`.
    pub const SLOT_RETAINED_WAL_BYTES: &str = "relay_slot_retained_wal_bytes";
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: what the slot's reader has not confirmed.
    pub const SLOT_CONFIRMED_LAG_BYTES: &str = "relay_slot_confirmed_lag_bytes";
    /// `safe_wal_size`: WAL that can still be written before the slot is in danger of losing
    /// WAL it needs (absent when `max_slot_wal_keep_size` is unlimited or the slot is lost).
    pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "relay_slot_safe_wal_size_bytes";
    /// `wal_status` as a labelled gauge: 1 on the current value, 0 on the others.
    pub const SLOT_WAL_STATUS: &str = "relay_slot_wal_status";
    /// 1 while a process streams from the slot.
    pub const SLOT_ACTIVE: &str = "relay_slot_active";
    /// Process id of the walsender streaming from the slot (0 when none).
    pub const SLOT_ACTIVE_PID: &str = "relay_slot_active_pid";
    /// Seconds since the slot's `confirmed_flush_lsn` last moved, counted only while the slot is
    /// behind the server's WAL end (an idle slot with nothing to confirm is not stalled).
    pub const SLOT_CONFIRMED_AGE_SECONDS: &str = "relay_slot_confirmed_age_seconds";
    /// Postgres 17+: `invalidation_reason` as a labelled gauge (1 on the current reason).
    pub const SLOT_INVALIDATION_REASON: &str = "relay_slot_invalidation_reason";
    /// The server's `max_slot_wal_keep_size` in bytes; -1 when unlimited.
    pub const POSTGRES_MAX_SLOT_WAL_KEEP_SIZE_BYTES: &str =
        "relay_postgres_max_slot_wal_keep_size_bytes";
    /// 1 when the last read of `pg_replication_slots` succeeded: the slot metrics are current.
    pub const SLOT_WATCH_SUCCESS: &str = "relay_slot_watch_success";
}

/// Declares a label's closed set of values: the enum, its label strings, and `ALL` for
/// creating every series at start-up.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            const ALL: &'static [$name] = &[$( $name::$variant ),+];

            fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }
        }
    };
}

label_enum! {
    /// `kind` of [`names::EVENTS_TOTAL`].
    EventKind {
        /// An outbox table row (insert).
        Row => "row",
        /// A `pg_logical_emit_message` event.
        Message => "message",
    }
}

label_enum! {
    /// `outcome` of [`names::KAFKA_TRANSACTIONS_TOTAL`].
    TxnOutcome {
        /// `commit_transaction` returned Ok.
        Committed => "committed",
        /// The transaction was aborted.
        Aborted => "aborted",
    }
}

label_enum! {
    /// `stage` of [`names::STAGE_SECONDS`], in the order an event passes them.
    Stage {
        /// The source transaction's last record reached the relay (CDC: its Commit message).
        Received => "received",
        /// The Kafka transaction (batch) carrying it was closed and its commit requested.
        BatchClosed => "batch_closed",
        /// The sink thread had handed every record of that batch to the producer.
        Produced => "produced",
        /// Every record of that batch was acknowledged (delivery reports).
        Delivered => "delivered",
        /// The batch's commit returned (exactly-once: `commit_transaction`; at-least-once: the
        /// checkpoint acknowledged) and the relay loop saw it.
        Committed => "committed",
    }
}

label_enum! {
    /// `component` of [`names::RECONNECTS_TOTAL`].
    Component {
        /// The replication or query connection.
        Postgres => "postgres",
        /// The producer.
        Kafka => "kafka",
    }
}

label_enum! {
    /// `kind` of [`names::IGNORED_CHANGES_TOTAL`].
    IgnoredChange {
        /// An UPDATE of an outbox row (the outbox is insert-only).
        Update => "update",
        /// A DELETE (e.g. the janitor's).
        Delete => "delete",
        /// A TRUNCATE.
        Truncate => "truncate",
        /// A change to a table other than the outbox (the publication is broader than needed),
        /// or a logical message with a prefix the relay does not own.
        OtherTable => "other_table",
        /// A non-transactional `pg_logical_emit_message(false, <outbox prefix>, ..)`: it could
        /// be re-sent after a restart, so it is never relayed.
        NonTransactionalMessage => "non_transactional_message",
        /// An outbox insert already published by the first start's backfill (its transaction
        /// was visible in the backfill's snapshot).
        Backfilled => "backfilled",
    }
}

label_enum! {
    /// `wal_status` of [`names::SLOT_WAL_STATUS`]: Postgres's `pg_replication_slots.wal_status`.
    WalStatus {
        /// The slot's WAL is within `max_wal_size`.
        Reserved => "reserved",
        /// Past `max_wal_size`, kept for the slot within `max_slot_wal_keep_size`.
        Extended => "extended",
        /// Past `max_slot_wal_keep_size`: WAL the slot needs will be removed at the next
        /// checkpoint unless its reader catches up first.
        Unreserved => "unreserved",
        /// WAL the slot needed was removed: the slot is invalidated.
        Lost => "lost",
    }
}

impl WalStatus {
    /// The variant of Postgres's text value, `None` for NULL or a value this relay does not know.
    pub fn parse(s: &str) -> Option<WalStatus> {
        WalStatus::ALL.iter().copied().find(|w| w.as_str() == s)
    }
}

label_enum! {
    /// `reason` of [`names::SLOT_INVALIDATION_REASON`] (Postgres 17+).
    InvalidationReason {
        /// WAL the slot needed was removed (`max_slot_wal_keep_size`).
        WalRemoved => "wal_removed",
        /// Rows the slot needed were vacuumed (a logical slot on a standby).
        RowsRemoved => "rows_removed",
        /// `wal_level` on the primary is not sufficient (a logical slot on a standby).
        WalLevelInsufficient => "wal_level_insufficient",
        /// Inactive longer than `idle_replication_slot_timeout` (Postgres 18).
        IdleTimeout => "idle_timeout",
        /// A reason this relay does not know.
        Other => "other",
    }
}

impl InvalidationReason {
    /// The variant of Postgres's text value (unknown values are [`InvalidationReason::Other`]).
    pub fn parse(s: &str) -> InvalidationReason {
        InvalidationReason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .unwrap_or(InvalidationReason::Other)
    }
}

/// One reading of a slot, as [`Metrics::set_slot`] exports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotReading {
    pub active: bool,
    /// 0 when no process streams from the slot.
    pub active_pid: i64,
    /// `None` when Postgres gives NULL (no `restart_lsn`).
    pub retained_wal_bytes: Option<i64>,
    /// `None` for a physical slot (no `confirmed_flush_lsn`).
    pub confirmed_lag_bytes: Option<i64>,
    /// `None` when unlimited or lost.
    pub safe_wal_size_bytes: Option<i64>,
    pub wal_status: Option<WalStatus>,
    pub confirmed_age_seconds: f64,
    /// `Some` only on Postgres 17+: `Some(None)` is a valid slot.
    pub invalidation_reason: Option<Option<InvalidationReason>>,
}

/// Why a [`Metrics`] could not be built (a name clash or bad name: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The relay's metrics. Cloning shares the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    event_bytes: IntCounterVec,
    kafka_transactions: IntCounterVec,
    batch_events: HistogramVec,
    commit_to_kafka: HistogramVec,
    kafka_commit: HistogramVec,
    stage: HistogramVec,
    confirmed_lsn: Gauge,
    checkpoint_lag_bytes: IntGauge,
    reconnects: IntCounterVec,
    heartbeat_rtt: Histogram,
    ignored_changes: IntCounterVec,
    skipped_transactions: IntCounter,
    kafka_queue_full: IntCounterVec,
    pacing_wait: CounterVec,
    paced_batches: IntCounterVec,
    dlq_records: IntCounterVec,
    consecutive_failures: IntGaugeVec,
    up: IntGauge,
    ready: IntGauge,
    poll: PollMetrics,
    slot: SlotGauges,
}

/// The slot metrics' handles (see [`names::SLOT_EXISTS`] and below).
#[derive(Clone)]
struct SlotGauges {
    exists: IntGaugeVec,
    own: IntGaugeVec,
    retained: IntGaugeVec,
    lag: IntGaugeVec,
    safe: IntGaugeVec,
    wal_status: IntGaugeVec,
    active: IntGaugeVec,
    active_pid: IntGaugeVec,
    confirmed_age: GaugeVec,
    invalidation: IntGaugeVec,
    max_keep: IntGauge,
    watch_success: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Latency buckets from 1ms to 30s: sub-millisecond is noise at this layer, and beyond 30s the
/// relay is stalled and the lag alerts speak instead.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Stage latency buckets, 1 ms to 10 s, dense where the relay's latencies live (5 to 300 ms), so
/// that p50 and p99 interpolate to a few milliseconds.
const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16,
    0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
];

/// Rows per poll: 0 (an empty poll) up to past the default `poll.batch_size` (1000).
const POLL_ROWS_BUCKETS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0];

/// Up to the default `batch.max_events` (1000) and a little past it for large WAL transactions.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

impl Metrics {
    /// Builds and registers every metric on a fresh registry, all series at zero.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let relay = &["relay"];
        let m = Metrics {
            events: counter_vec(
                &registry,
                names::EVENTS_TOTAL,
                "Events published to Kafka (committed).",
                &["relay", "kind"],
            )?,
            event_bytes: counter_vec(
                &registry,
                names::EVENT_BYTES_TOTAL,
                "Payload bytes published to Kafka (committed).",
                relay,
            )?,
            kafka_transactions: counter_vec(
                &registry,
                names::KAFKA_TRANSACTIONS_TOTAL,
                "Kafka transactions ended, by outcome.",
                &["relay", "outcome"],
            )?,
            batch_events: histogram_vec(
                &registry,
                names::BATCH_EVENTS,
                "Events per Kafka transaction.",
                BATCH_BUCKETS,
                relay,
            )?,
            commit_to_kafka: histogram_vec(
                &registry,
                names::COMMIT_TO_KAFKA_SECONDS,
                "Seconds from the Postgres commit of an event to the Kafka commit carrying it.",
                LATENCY_BUCKETS,
                relay,
            )?,
            kafka_commit: histogram_vec(
                &registry,
                names::KAFKA_COMMIT_SECONDS,
                "Seconds one Kafka transaction commit took (record delivery and commit_transaction).",
                LATENCY_BUCKETS,
                relay,
            )?,
            stage: histogram_vec(
                &registry,
                names::STAGE_SECONDS,
                "Seconds from an event's Postgres commit (cdc: the WAL commit record's timestamp; poll: the oldest row's created_at in the poll) to a stage: received, batch_closed, produced, delivered, committed. Observed once per source transaction with records (cdc: WAL transaction; poll: poll batch), not per event, so that the hot path takes no per-record cost; produced and delivered are placed back from the commit's return by the sink thread's own measured durations.",
                STAGE_BUCKETS,
                &["relay", "stage"],
            )?,
            confirmed_lsn: register(
                &registry,
                Gauge::new(
                    names::CONFIRMED_LSN,
                    "LSN last confirmed to Postgres (flush position), as a number.",
                )?,
            )?,
            checkpoint_lag_bytes: register(
                &registry,
                IntGauge::new(
                    names::CHECKPOINT_LAG_BYTES,
                    "Bytes of WAL between the server's WAL end as last reported on the replication stream and the LSN the relay confirmed.",
                )?,
            )?,
            reconnects: counter_vec(
                &registry,
                names::RECONNECTS_TOTAL,
                "Reconnections after a transient error, by component.",
                &["component"],
            )?,
            heartbeat_rtt: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        names::HEARTBEAT_RTT_SECONDS,
                        "Seconds from emitting a heartbeat message to committing it to Kafka with the checkpoint.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            ignored_changes: counter_vec(
                &registry,
                names::IGNORED_CHANGES_TOTAL,
                "Changes received but not relayed, by kind.",
                &["kind"],
            )?,
            skipped_transactions: register(
                &registry,
                IntCounter::new(
                    names::SKIPPED_TRANSACTIONS_TOTAL,
                    "WAL transactions dropped because the checkpoint shows them delivered.",
                )?,
            )?,
            kafka_queue_full: counter_vec(
                &registry,
                names::KAFKA_QUEUE_FULL_TOTAL,
                "Times the Kafka producer queue was full (backpressure).",
                relay,
            )?,
            pacing_wait: register(
                &registry,
                CounterVec::new(
                    Opts::new(
                        names::PACING_WAIT_SECONDS_TOTAL,
                        "Seconds batches that were due waited for the commit-rate pacer (batch.max_commit_rate): the latency pacing added, summed over batches.",
                    ),
                    relay,
                )?,
            )?,
            paced_batches: counter_vec(
                &registry,
                names::PACED_BATCHES_TOTAL,
                "Batches the commit-rate pacer (batch.max_commit_rate) held back after they were due.",
                relay,
            )?,
            dlq_records: counter_vec(
                &registry,
                names::DLQ_RECORDS_TOTAL,
                "Records written to the DLQ topic instead of their event (committed).",
                relay,
            )?,
            consecutive_failures: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        names::CONSECUTIVE_FAILURES,
                        "Sessions in a row that ended in an error; 0 once streaming again.",
                    ),
                    relay,
                )?,
            )?,
            up: register(
                &registry,
                IntGauge::new(names::UP, "1 while the relay loop reports healthy.")?,
            )?,
            ready: register(
                &registry,
                IntGauge::new(
                    names::READY,
                    "1 while connected to Postgres and Kafka and streaming.",
                )?,
            )?,
            poll: PollMetrics::new(&registry)?,
            slot: SlotGauges::new(&registry)?,
            registry,
        };
        let build = register(
            &m.registry,
            IntGaugeVec::new(
                Opts::new(
                    names::BUILD_INFO,
                    "Always 1; the labels name the running build.",
                ),
                &["version", "rdkafka_version"],
            )?,
        )?;
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &rdkafka::util::get_rdkafka_version().1,
            ])
            .set(1);
        m.init_series();
        Ok(m)
    }

    /// Creates every labelled series at zero (see the module docs for why).
    fn init_series(&self) {
        for relay in RelayKind::ALL {
            for &kind in EventKind::ALL {
                self.events(relay, kind);
            }
            for &outcome in TxnOutcome::ALL {
                self.kafka_transactions(relay, outcome);
            }
            self.event_bytes(relay);
            self.batch_events(relay);
            self.commit_to_kafka_seconds(relay);
            for &stage in Stage::ALL {
                self.stage_seconds(relay, stage);
            }
            self.kafka_queue_full(relay);
            self.pacing(relay);
            self.dlq_records(relay);
            self.consecutive_failures(relay);
        }
        for &c in Component::ALL {
            self.reconnects(c);
        }
        for &k in IgnoredChange::ALL {
            self.ignored_changes(k);
        }
    }

    /// `relay_events_total{relay, kind}`.
    pub fn events(&self, relay: RelayKind, kind: EventKind) -> IntCounter {
        self.events
            .with_label_values(&[relay.as_str(), kind.as_str()])
    }

    /// `relay_event_bytes_total{relay}`.
    pub fn event_bytes(&self, relay: RelayKind) -> IntCounter {
        self.event_bytes.with_label_values(&[relay.as_str()])
    }

    /// `relay_kafka_transactions_total{relay, outcome}`.
    pub fn kafka_transactions(&self, relay: RelayKind, outcome: TxnOutcome) -> IntCounter {
        self.kafka_transactions
            .with_label_values(&[relay.as_str(), outcome.as_str()])
    }

    /// `relay_batch_events{relay}`.
    pub fn batch_events(&self, relay: RelayKind) -> Histogram {
        self.batch_events.with_label_values(&[relay.as_str()])
    }

    /// `relay_commit_to_kafka_seconds{relay}`.
    pub fn commit_to_kafka_seconds(&self, relay: RelayKind) -> Histogram {
        self.commit_to_kafka.with_label_values(&[relay.as_str()])
    }

    /// `relay_kafka_commit_seconds{relay}`.
    pub fn kafka_commit_seconds(&self, relay: RelayKind) -> Histogram {
        self.kafka_commit.with_label_values(&[relay.as_str()])
    }

    /// `relay_stage_seconds{relay, stage}`.
    pub fn stage_seconds(&self, relay: RelayKind, stage: Stage) -> Histogram {
        self.stage
            .with_label_values(&[relay.as_str(), stage.as_str()])
    }

    /// Sets `relay_confirmed_lsn`. A float holds every LSN below 2^53 (8 PiB of WAL) exactly.
    pub fn set_confirmed_lsn(&self, lsn: u64) {
        self.confirmed_lsn.set(lsn as f64);
    }

    /// Sets `relay_checkpoint_lag_bytes`, saturating at `i64::MAX`.
    pub fn set_checkpoint_lag_bytes(&self, bytes: u64) {
        self.checkpoint_lag_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// `relay_reconnects_total{component}`.
    pub fn reconnects(&self, component: Component) -> IntCounter {
        self.reconnects.with_label_values(&[component.as_str()])
    }

    /// `relay_heartbeat_rtt_seconds`.
    pub fn heartbeat_rtt_seconds(&self) -> &Histogram {
        &self.heartbeat_rtt
    }

    /// `relay_ignored_changes_total{kind}`.
    pub fn ignored_changes(&self, kind: IgnoredChange) -> IntCounter {
        self.ignored_changes.with_label_values(&[kind.as_str()])
    }

    /// `relay_skipped_transactions_total`.
    pub fn skipped_transactions(&self) -> &IntCounter {
        &self.skipped_transactions
    }

    /// `relay_kafka_queue_full_total{relay}`.
    pub fn kafka_queue_full(&self, relay: RelayKind) -> IntCounter {
        self.kafka_queue_full.with_label_values(&[relay.as_str()])
    }

    /// `relay_pacing_wait_seconds_total{relay}` and `relay_paced_batches_total{relay}`.
    pub fn pacing(&self, relay: RelayKind) -> (Counter, IntCounter) {
        let l = [relay.as_str()];
        (
            self.pacing_wait.with_label_values(&l),
            self.paced_batches.with_label_values(&l),
        )
    }

    /// `relay_dlq_records_total{relay}`.
    pub fn dlq_records(&self, relay: RelayKind) -> IntCounter {
        self.dlq_records.with_label_values(&[relay.as_str()])
    }

    /// `relay_consecutive_failures{relay}`.
    pub fn consecutive_failures(&self, relay: RelayKind) -> IntGauge {
        self.consecutive_failures
            .with_label_values(&[relay.as_str()])
    }

    /// Sets `relay_up` and `relay_ready`; the health server does this from the
    /// [`Health`](crate::health::Health) flags at every scrape, so the two cannot disagree.
    pub fn set_up_and_ready(&self, up: bool, ready: bool) {
        self.up.set(i64::from(up));
        self.ready.set(i64::from(ready));
    }

    /// `relay_poll_queries_total`.
    pub fn poll_queries(&self) -> &IntCounter {
        &self.poll.queries
    }

    /// `relay_poll_rows`.
    pub fn poll_rows(&self) -> &Histogram {
        &self.poll.rows
    }

    /// `relay_poll_empty_total`.
    pub fn poll_empty(&self) -> &IntCounter {
        &self.poll.empty
    }

    /// `relay_janitor_deleted_rows_total`.
    pub fn janitor_deleted_rows(&self) -> &IntCounter {
        &self.poll.janitor_deleted
    }

    /// Sets `relay_poll_cursor_lag_rows` and `relay_poll_cursor_lag_seconds`.
    pub fn set_poll_cursor_lag(&self, rows: u64, seconds: f64) {
        self.poll
            .lag_rows
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
        self.poll.lag_seconds.set(seconds.max(0.0));
    }

    /// Creates every series of `slot` (`own`: the slot this relay streams), so that alerts see
    /// them from the first scrape. `with_reason`: the server reports `invalidation_reason`
    /// (Postgres 17+).
    pub fn init_slot_series(&self, slot: &str, own: bool, with_reason: bool) {
        let g = &self.slot;
        // `exists` starts at 0 and is set by the first reading: until then nothing is known,
        // which relay_slot_watch_success says (the missing-slot alert requires it to be 1).
        g.exists.with_label_values(&[slot]);
        g.own.with_label_values(&[slot]).set(i64::from(own));
        for v in [&g.retained, &g.lag, &g.safe, &g.active, &g.active_pid] {
            v.with_label_values(&[slot]);
        }
        g.confirmed_age.with_label_values(&[slot]);
        for &w in WalStatus::ALL {
            g.wal_status.with_label_values(&[slot, w.as_str()]);
        }
        if with_reason {
            for &r in InvalidationReason::ALL {
                g.invalidation.with_label_values(&[slot, r.as_str()]);
            }
        }
    }

    /// Exports one reading of `slot` (created with [`Metrics::init_slot_series`] first).
    pub fn set_slot(&self, slot: &str, r: &SlotReading) {
        let g = &self.slot;
        let l = &[slot];
        g.exists.with_label_values(l).set(1);
        g.active.with_label_values(l).set(i64::from(r.active));
        g.active_pid.with_label_values(l).set(r.active_pid);
        g.confirmed_age
            .with_label_values(l)
            .set(r.confirmed_age_seconds);
        for (vec, value) in [
            (&g.retained, r.retained_wal_bytes),
            (&g.lag, r.confirmed_lag_bytes),
            (&g.safe, r.safe_wal_size_bytes),
        ] {
            match value {
                Some(v) => vec.with_label_values(l).set(v),
                // NULL in Postgres: no value, rather than a made-up zero an alert would trust.
                None => {
                    let _ = vec.remove_label_values(l);
                }
            }
        }
        for &w in WalStatus::ALL {
            g.wal_status
                .with_label_values(&[slot, w.as_str()])
                .set(i64::from(r.wal_status == Some(w)));
        }
        if let Some(reason) = r.invalidation_reason {
            for &k in InvalidationReason::ALL {
                g.invalidation
                    .with_label_values(&[slot, k.as_str()])
                    .set(i64::from(reason == Some(k)));
            }
        }
    }

    /// The relay's own slot does not exist: `relay_slot_exists` 0, its readings removed (the
    /// last ones would be stale), `wal_status` all 0.
    pub fn set_slot_missing(&self, slot: &str) {
        let g = &self.slot;
        g.exists.with_label_values(&[slot]).set(0);
        g.active.with_label_values(&[slot]).set(0);
        g.active_pid.with_label_values(&[slot]).set(0);
        g.confirmed_age.with_label_values(&[slot]).set(0.0);
        for vec in [&g.retained, &g.lag, &g.safe] {
            let _ = vec.remove_label_values(&[slot]);
        }
        for &w in WalStatus::ALL {
            g.wal_status.with_label_values(&[slot, w.as_str()]).set(0);
        }
    }

    /// Removes every series of a watched slot that no longer exists (not the relay's own).
    pub fn remove_slot_series(&self, slot: &str) {
        let g = &self.slot;
        for vec in [
            &g.exists,
            &g.own,
            &g.retained,
            &g.lag,
            &g.safe,
            &g.active,
            &g.active_pid,
        ] {
            let _ = vec.remove_label_values(&[slot]);
        }
        let _ = g.confirmed_age.remove_label_values(&[slot]);
        for &w in WalStatus::ALL {
            let _ = g.wal_status.remove_label_values(&[slot, w.as_str()]);
        }
        for &r in InvalidationReason::ALL {
            let _ = g.invalidation.remove_label_values(&[slot, r.as_str()]);
        }
    }

    /// Sets `relay_postgres_max_slot_wal_keep_size_bytes` (-1: unlimited).
    pub fn set_max_slot_wal_keep_size_bytes(&self, bytes: i64) {
        self.slot.max_keep.set(bytes);
    }

    /// Sets `relay_slot_watch_success`.
    pub fn set_slot_watch_success(&self, ok: bool) {
        self.slot.watch_success.set(i64::from(ok));
    }

    /// The registry, for components that register metrics of their own (e.g. slot_watch).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on a malformed family, which registration rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The polling relay's own metrics (see [`names::POLL_QUERIES_TOTAL`] and the names after it).
#[derive(Clone)]
struct PollMetrics {
    queries: IntCounter,
    rows: Histogram,
    empty: IntCounter,
    lag_rows: IntGauge,
    lag_seconds: Gauge,
    janitor_deleted: IntCounter,
}

impl PollMetrics {
    fn new(registry: &Registry) -> Result<PollMetrics, prometheus::Error> {
        Ok(PollMetrics {
            queries: register(
                registry,
                IntCounter::new(
                    names::POLL_QUERIES_TOTAL,
                    "Outbox queries the polling relay ran.",
                )?,
            )?,
            rows: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(names::POLL_ROWS, "Rows one poll of the outbox returned.")
                        .buckets(POLL_ROWS_BUCKETS.to_vec()),
                )?,
            )?,
            empty: register(
                registry,
                IntCounter::new(
                    names::POLL_EMPTY_TOTAL,
                    "Polls of the outbox that returned no row.",
                )?,
            )?,
            lag_rows: register(
                registry,
                IntGauge::new(
                    names::POLL_CURSOR_LAG_ROWS,
                    "Committed outbox rows past the polling relay's last committed checkpoint (counted up to a cap).",
                )?,
            )?,
            lag_seconds: register(
                registry,
                Gauge::new(
                    names::POLL_CURSOR_LAG_SECONDS,
                    "Age of the oldest committed outbox row past the polling relay's last committed checkpoint; 0 when none.",
                )?,
            )?,
            janitor_deleted: register(
                registry,
                IntCounter::new(
                    names::JANITOR_DELETED_ROWS_TOTAL,
                    "Delivered outbox rows the polling relay's janitor deleted.",
                )?,
            )?,
        })
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

impl SlotGauges {
    fn new(registry: &Registry) -> Result<SlotGauges, prometheus::Error> {
        let slot = &["slot"];
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        Ok(SlotGauges {
            exists: gauge(
                names::SLOT_EXISTS,
                "1 while the replication slot exists.",
                slot,
            )?,
            own: gauge(
                names::SLOT_OWN,
                "1 for the slot this relay streams (cdc.slot), 0 for other slots it watches.",
                slot,
            )?,
            retained: gauge(
                names::SLOT_RETAINED_WAL_BYTES,
                "Bytes of WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn.",
                slot,
            )?,
            lag: gauge(
                names::SLOT_CONFIRMED_LAG_BYTES,
                "Bytes of WAL not confirmed by the slot's reader: pg_current_wal_lsn() - confirmed_flush_lsn.",
                slot,
            )?,
            safe: gauge(
                names::SLOT_SAFE_WAL_SIZE_BYTES,
                "safe_wal_size: bytes of WAL that can be written before the slot may lose WAL it needs.",
                slot,
            )?,
            wal_status: gauge(
                names::SLOT_WAL_STATUS,
                "The slot's wal_status: 1 on the current value.",
                &["slot", "wal_status"],
            )?,
            active: gauge(
                names::SLOT_ACTIVE,
                "1 while a process streams from the slot.",
                slot,
            )?,
            active_pid: gauge(
                names::SLOT_ACTIVE_PID,
                "Process id of the walsender streaming from the slot (0: none).",
                slot,
            )?,
            confirmed_age: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        names::SLOT_CONFIRMED_AGE_SECONDS,
                        "Seconds since the slot's confirmed_flush_lsn last moved while behind the WAL end.",
                    ),
                    slot,
                )?,
            )?,
            invalidation: gauge(
                names::SLOT_INVALIDATION_REASON,
                "Postgres 17+: the slot's invalidation_reason, 1 on the current one (all 0: valid).",
                &["slot", "reason"],
            )?,
            max_keep: register(
                registry,
                IntGauge::new(
                    names::POSTGRES_MAX_SLOT_WAL_KEEP_SIZE_BYTES,
                    "The server's max_slot_wal_keep_size in bytes (-1: unlimited).",
                )?,
            )?,
            watch_success: register(
                registry,
                IntGauge::new(
                    names::SLOT_WATCH_SUCCESS,
                    "1 when the last read of pg_replication_slots succeeded.",
                )?,
            )?,
        })
    }
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, HistogramVec::new(opts, labels)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::MetricType;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new().unwrap();
        assert_eq!(
            m.registry().gather().len(),
            28,
            "every metric without a slot label is gathered from the start"
        );
        m.init_slot_series("outbox_relay", true, true);
        let families = m.registry().gather();
        assert_eq!(
            families.len(),
            38,
            "every slot metric is gathered once its slot's series exist"
        );
        for f in &families {
            let name = f.name();
            assert!(name.starts_with("relay_"), "{name}: no relay_ prefix");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}: not snake_case"
            );
            assert!(!f.help().is_empty(), "{name}: no help");
            let is_counter = f.get_field_type() == MetricType::COUNTER;
            assert_eq!(
                is_counter,
                name.ends_with("_total"),
                "{name}: counters, and only counters, end in _total"
            );
            let base = name.trim_end_matches("_total");
            for unit in ["seconds", "bytes"] {
                if name.contains(unit) {
                    assert!(
                        base.ends_with(unit),
                        "{name}: unit {unit} must be the suffix"
                    );
                }
            }
            for wrong in ["millis", "_ms", "_us", "kb", "mb", "_count", "_sum"] {
                assert!(!name.contains(wrong), "{name}: use base units, no {wrong}");
            }
            if f.get_field_type() == MetricType::HISTOGRAM && name.contains("latency") {
                panic!("{name}: say _seconds, not latency");
            }
            for metric in f.get_metric() {
                for label in metric.get_label() {
                    assert!(
                        [
                            "relay",
                            "kind",
                            "outcome",
                            "component",
                            "slot",
                            "wal_status",
                            "reason",
                            "stage"
                        ]
                        .contains(&label.name())
                            || name == names::BUILD_INFO,
                        "{name}: unexpected label {}",
                        label.name()
                    );
                }
            }
        }
    }

    #[test]
    fn render_shows_series_and_values() {
        let m = Metrics::new().unwrap();
        m.events(RelayKind::Cdc, EventKind::Row).inc_by(3);
        m.set_confirmed_lsn(0x16B_3748);
        m.commit_to_kafka_seconds(RelayKind::Cdc).observe(0.004);
        let clone = m.clone();
        clone.skipped_transactions().inc();
        let text = m.render();
        assert!(
            text.contains(r#"relay_events_total{kind="row",relay="cdc"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"relay_events_total{kind="message",relay="poll"} 0"#));
        assert!(text.contains("relay_confirmed_lsn 23803720"));
        assert!(text.contains("relay_skipped_transactions_total 1"));
        m.poll_rows().observe(0.0);
        m.poll_empty().inc();
        m.set_poll_cursor_lag(12, 0.5);
        let text = m.render();
        assert!(text.contains("relay_poll_empty_total 1"), "{text}");
        assert!(
            text.contains(r#"relay_poll_rows_bucket{le="0"} 1"#),
            "{text}"
        );
        assert!(text.contains("relay_poll_cursor_lag_rows 12"), "{text}");
        assert!(text.contains("relay_poll_cursor_lag_seconds 0.5"), "{text}");
        assert!(text.contains("relay_poll_queries_total 0"), "{text}");
        assert!(text.contains(r#"relay_commit_to_kafka_seconds_bucket{relay="cdc",le="0.005"} 1"#));
        assert!(text.contains(r#"relay_commit_to_kafka_seconds_bucket{relay="cdc",le="30"} 1"#));
    }

    #[test]
    fn slot_readings_set_and_remove_series() {
        let m = Metrics::new().unwrap();
        m.init_slot_series("s1", true, false);
        let text = m.render();
        assert!(text.contains(r#"relay_slot_wal_status{slot="s1",wal_status="lost"} 0"#));
        assert!(text.contains(r#"relay_slot_own{slot="s1"} 1"#));
        assert!(!text.contains("relay_slot_invalidation_reason"), "{text}");
        m.set_slot(
            "s1",
            &SlotReading {
                active: true,
                active_pid: 42,
                retained_wal_bytes: Some(1000),
                confirmed_lag_bytes: Some(10),
                safe_wal_size_bytes: None,
                wal_status: WalStatus::parse("unreserved"),
                confirmed_age_seconds: 2.5,
                invalidation_reason: None,
            },
        );
        let text = m.render();
        for line in [
            r#"relay_slot_wal_status{slot="s1",wal_status="unreserved"} 1"#,
            r#"relay_slot_wal_status{slot="s1",wal_status="reserved"} 0"#,
            r#"relay_slot_retained_wal_bytes{slot="s1"} 1000"#,
            r#"relay_slot_confirmed_lag_bytes{slot="s1"} 10"#,
            r#"relay_slot_active_pid{slot="s1"} 42"#,
            r#"relay_slot_confirmed_age_seconds{slot="s1"} 2.5"#,
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
        assert!(
            !text.contains("relay_slot_safe_wal_size_bytes{"),
            "NULL is no value"
        );
        m.set_slot_missing("s1");
        let text = m.render();
        assert!(text.contains(r#"relay_slot_exists{slot="s1"} 0"#));
        assert!(!text.contains("relay_slot_retained_wal_bytes{"));
        m.init_slot_series("other", false, true);
        m.set_slot(
            "other",
            &SlotReading {
                invalidation_reason: Some(Some(InvalidationReason::parse("idle_timeout"))),
                ..SlotReading::default()
            },
        );
        assert!(m
            .render()
            .contains(r#"relay_slot_invalidation_reason{reason="idle_timeout",slot="other"} 1"#));
        m.remove_slot_series("other");
        assert!(!m.render().contains(r#"slot="other""#));
    }
}
