//! The Kafka transactional producer behind the sink thread.
//!
//! Transactions follow rust-rdkafka's three questions on every error: `is_fatal()` (fenced or
//! broken: exit), `txn_requires_abort()` (abort and resume from the checkpoint), `is_retriable()`
//! (retry the same call). Anything else is treated as requiring an abort: unknown errors are not
//! retried blindly.
//!
//! `QueueFull` is backpressure, not an error: the thread waits for deliveries and tries again.
//!
//! ## Two producers in turn (`kafka.transactional_producers = 2`)
//!
//! librdkafka speaks Kafka transactions v1 only: a transaction's first AddPartitionsToTxn,
//! sent right after the previous commit returned, is answered `CONCURRENT_TRANSACTIONS` until
//! the coordinator has written that commit's markers, and librdkafka retries it after a fixed
//! 20 ms. Back-to-back commits therefore wait about 20 ms each. With two producers (the
//! configured transactional id and `<id>.alt`), transaction N+1 runs on the producer that did
//! not run N: its own last transaction (N-1) committed a whole transaction earlier, so its
//! markers are written and its AddPartitionsToTxn is accepted at once.
//!
//! Why exactly-once still holds:
//! - Commits stay strictly ordered with one in flight: the sink thread begins transaction N+1
//!   (produces its first record) only after `commit_transaction` of N returned. So the
//!   checkpoint records on the single-partition checkpoint topic are in commit order, and every
//!   record of N+1 sits after every record of N in each partition (per-key order holds).
//! - On start both producers call `init_transactions`, which fences older instances of both
//!   transactional ids and aborts whichever transaction either left open; only then is the
//!   checkpoint topic read (read_committed) to its end. Its last record for the relay's key is
//!   the last transaction that committed, whichever producer ran it. At most one transaction
//!   can be open at a crash (the one after the last commit), and it is aborted.
//! - A relay that starts with 2 after running with 1 fences the old id as before; one that
//!   goes back to 1 leaves `<id>.alt` unfenced, which is harmless only when no instance with 2
//!   is still running (stop it first).
//!
//! ## At-least-once mode (`delivery = "at_least_once"`)
//!
//! The same backend, without Kafka transactions: an idempotent producer (`enable.idempotence`,
//! which implies `acks=all`; no `transactional.id`), so the pipeline, the DLQ rerouting and the
//! checkpoint logic stay one code path. `begin` does nothing; `commit` waits until every record
//! of the batch is acknowledged (a failed delivery fails the batch, as it fails a transaction),
//! then produces the checkpoint and waits for its acknowledgement too; only then does it
//! return, and only then does the relay confirm the position to Postgres. So a checkpoint is
//! never durable before the events it covers, and a crash repeats at most what followed the
//! last durable checkpoint: duplicates are possible (the records of a failed or interrupted
//! batch may have been written), loss is not. Records are visible to consumers as soon as they
//! are acknowledged, without waiting for a commit. What is given up: duplicates after a crash,
//! a failed delivery or a restart; and no fencing (a second relay on the same slot is kept out
//! by Postgres, which lets one reader stream from a slot at a time, not by Kafka).

use super::security::{await_connection, SecurityWatch};
use super::{Backend, Returned, SinkError};
use crate::checkpoint::Checkpoint;
use crate::config::Delivery;
use crate::outbox::OutRecord;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Settings of the Kafka backend.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub transactional_id: String,
    pub checkpoint_topic: String,
    pub transaction_timeout: Duration,
    /// Partitions of the event topics the relay creates (the unit of parallelism and, with the
    /// key, of order; fixed up front because adding partitions rehashes keys).
    pub topic_partitions: i32,
    pub create_topics: bool,
    /// librdkafka options passed through unchanged.
    pub librdkafka: BTreeMap<String, String>,
    /// Kafka transactions (exactly once) or an idempotent producer (at least once).
    pub delivery: Delivery,
    /// Transactional producers used in turn (1 or 2; see "Two producers in turn").
    pub transactional_producers: u8,
    /// The client to produce with (librdkafka, or the experimental `sink::wire`).
    pub client: crate::config::KafkaClient,
    /// `sink::wire` only: the transactions protocol (0 = what the cluster finalized).
    pub wire_transaction_version: u8,
}

impl KafkaSettings {
    /// The sink's settings for relay `kind` (the two relays share everything but the
    /// transactional id).
    pub fn from_config(cfg: &crate::config::RelayConfig, kind: crate::config::RelayKind) -> Self {
        KafkaSettings {
            bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
            transactional_id: cfg.transactional_id(kind),
            checkpoint_topic: cfg.kafka.checkpoint_topic.clone(),
            transaction_timeout: cfg.kafka.transaction_timeout,
            topic_partitions: i32::try_from(cfg.outbox.topic_partitions).unwrap_or(i32::MAX),
            create_topics: cfg.outbox.create_topics,
            librdkafka: cfg
                .kafka
                .librdkafka
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            delivery: cfg.delivery,
            transactional_producers: cfg.kafka.transactional_producers,
            client: cfg.kafka.client,
            wire_transaction_version: cfg.kafka.wire_transaction_version,
        }
    }

    /// How long a batch may take before its failure means it can never succeed
    /// ([`Pipeline::with_transaction_timeout`](crate::pipeline::Pipeline::with_transaction_timeout)):
    /// the transaction timeout, or no limit at all without transactions.
    pub fn transaction_limit(&self) -> Duration {
        match self.delivery {
            Delivery::ExactlyOnce => self.transaction_timeout,
            Delivery::AtLeastOnce => Duration::MAX,
        }
    }
}

/// Timeout of one blocking transaction call (init, commit, abort).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaBackend {
    settings: KafkaSettings,
    /// The producer the next transaction runs on.
    producer: Option<ThreadedProducer<SinkContext>>,
    /// With two producers in turn, the other one (its last transaction's markers are being
    /// written, or long written).
    standby: Option<ThreadedProducer<SinkContext>>,
    deliveries: Arc<Deliveries>,
    admin: Option<AdminClient<DefaultClientContext>>,
    runtime: tokio::runtime::Handle,
    known_topics: HashSet<String>,
    /// Topics refused for good (invalid, colliding, not authorized, not there while the relay
    /// may not create topics), with the reason: their records go to the DLQ at once.
    refused_topics: HashMap<String, (String, &'static str)>,
    poison: Poison,
    queue_full: Option<prometheus::IntCounter>,
    security: SecurityWatch,
    /// How long into the last commit every record had been acknowledged.
    /// (A cell: it is set while the producer is borrowed.)
    delivered_after: std::cell::Cell<Option<Duration>>,
}

/// Records whose delivery failed with a definite error (too large for the broker, topic not
/// authorized...). Such a failure is only known after the transaction has failed, which must
/// abort; the set outlives the producer, so that when the relay replays the aborted
/// transaction the record goes to the DLQ instead, and the relay does not retry it forever.
/// Keys are hashes of (topic, key, event id): no payload is kept.
///
/// A broker's size refusal is special: it refuses a whole batch, innocent records included
/// (a batch holds several records of a partition). Those records are only *suspects*; the next
/// producer reads the topic's `max.message.bytes` and poisons only a record that is too large on
/// its own (see `KafkaBackend::resolve_suspects`).
#[derive(Clone, Debug, Default)]
pub struct Poison {
    state: Arc<Mutex<PoisonState>>,
    /// Whether either map holds anything: read once per record on the sink thread without
    /// taking the lock (nearly always false).
    any: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct PoisonState {
    refused: HashMap<u64, Refusal>,
    /// Records in a batch the broker refused as too large: id -> (topic, estimated size of the
    /// record alone in a batch).
    suspects: HashMap<u64, (String, usize)>,
}

/// Why a record was refused: the reason, its DLQ class, and whether the value may go along.
type Refusal = (String, &'static str, bool);

impl Poison {
    fn id(topic: &str, key: Option<&[u8]>, event_id: Option<&[u8]>) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut h);
        key.hash(&mut h);
        event_id.hash(&mut h);
        h.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoisonState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refreshes `any` from `st` (called with the lock held, after every change).
    fn mark(&self, st: &PoisonState) {
        let any = !st.refused.is_empty() || !st.suspects.is_empty();
        self.any.store(any, std::sync::atomic::Ordering::Release);
    }

    /// Whether any record waits to be refused or decided (cheap: no lock).
    fn any(&self) -> bool {
        self.any.load(std::sync::atomic::Ordering::Acquire)
    }

    // Both maps are bounded: poison records are rare; a flood of them is a broken setup that
    // the consecutive-failure alert reports.
    fn insert(&self, id: u64, reason: String, class: &'static str, keep_value: bool) {
        let mut st = self.lock();
        if st.refused.len() < 100_000 {
            st.refused.insert(id, (reason, class, keep_value));
        }
        self.mark(&st);
    }

    fn suspect(&self, id: u64, topic: &str, size: usize) {
        let mut st = self.lock();
        if st.suspects.len() < 100_000 {
            st.suspects.insert(id, (topic.to_owned(), size));
        }
        self.mark(&st);
    }

    fn take(&self, id: u64) -> Option<Refusal> {
        let mut st = self.lock();
        let r = st.refused.remove(&id);
        self.mark(&st);
        r
    }

    /// The suspects of `topic`, removed from the set.
    fn take_suspects(&self, topic: &str) -> Vec<(u64, usize)> {
        let mut st = self.lock();
        let ids: Vec<u64> = st
            .suspects
            .iter()
            .filter(|(_, (t, _))| t == topic)
            .map(|(id, _)| *id)
            .collect();
        let taken = ids
            .into_iter()
            .filter_map(|id| st.suspects.remove(&id).map(|(_, size)| (id, size)))
            .collect();
        self.mark(&st);
        taken
    }

    fn has_suspects(&self) -> bool {
        !self.lock().suspects.is_empty()
    }

    /// How many records are waiting to be sent to the DLQ on the next attempt.
    pub fn len(&self) -> usize {
        self.lock().refused.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A definite (never transient) per-record error code: retrying the same record cannot help,
/// the DLQ can. The class names it in the DLQ record; `keep_value` says whether the value can
/// go along (not when the value is the problem).
fn definite_record_error(code: RDKafkaErrorCode) -> Option<(&'static str, bool)> {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => Some(("record_too_large", false)),
        C::InvalidTopic => Some(("invalid_topic", true)),
        C::TopicAuthorizationFailed => Some(("topic_authorization_failed", true)),
        C::PolicyViolation => Some(("policy_violation", true)),
        C::InvalidRecord => Some(("invalid_record", true)),
        _ => None,
    }
}

impl KafkaBackend {
    /// `runtime` serves the admin client's futures (topic creation) from the sink thread.
    pub fn new(settings: KafkaSettings, runtime: tokio::runtime::Handle) -> KafkaBackend {
        KafkaBackend {
            settings,
            producer: None,
            standby: None,
            deliveries: Arc::new(Deliveries::default()),
            admin: None,
            runtime,
            known_topics: HashSet::new(),
            refused_topics: HashMap::new(),
            poison: Poison::default(),
            queue_full: None,
            security: SecurityWatch::default(),
            delivered_after: std::cell::Cell::new(None),
        }
    }

    /// Shares `poison` with this backend: records that failed delivery for good under an
    /// earlier producer go to the DLQ now (see [`Poison`]).
    pub fn with_poison(mut self, poison: Poison) -> Self {
        self.poison = poison;
        self
    }

    /// Counts waits on a full producer queue.
    pub fn with_queue_full_counter(mut self, c: prometheus::IntCounter) -> Self {
        self.queue_full = Some(c);
        self
    }

    fn base_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.settings.librdkafka {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.settings.bootstrap_servers);
        c
    }

    fn producer(&self) -> Result<&ThreadedProducer<SinkContext>, SinkError> {
        self.producer.as_ref().ok_or(SinkError::Stopped)
    }

    pub(super) fn ensure_topic(
        &mut self,
        topic: &str,
        partitions: i32,
        compact: bool,
    ) -> Result<(), SinkError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        if !self.settings.create_topics {
            self.await_partition_leaders(topic)?;
            self.known_topics.insert(topic.to_owned());
            return Ok(());
        }
        let runtime = self.runtime.clone();
        let admin = self.admin()?;
        // Replication factor -1: the broker's default.replication.factor.
        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
        if compact {
            nt = nt.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = runtime
            .block_on(admin.create_topics(&[nt], &opts))
            .map_err(|e| SinkError::Unavailable(format!("creating topic {topic}: {e}")))?;
        for r in res {
            match r {
                Ok(_) => tracing::info!(topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => {
                    if let Some((class, _)) = definite_record_error(e) {
                        // Kafka refuses this name (invalid, colliding with an existing topic
                        // in '.' versus '_', a policy) or refuses it to us: definite.
                        return Err(SinkError::Rejected {
                            reason: format!("creating topic {t}: {e}"),
                            class,
                            keep_value: true,
                            record: Returned::default(),
                        });
                    }
                    if e == RDKafkaErrorCode::ClusterAuthorizationFailed {
                        return Err(SinkError::Config(format!(
                            "creating topic {t}: {e}: the relay's principal may not create topics; \
                             grant it CREATE, or set outbox.create_topics = false and create the topics beforehand"
                        )));
                    }
                    return Err(SinkError::Unavailable(format!("creating topic {t}: {e}")));
                }
            }
        }
        self.await_partition_leaders(topic)?;
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    /// Waits until the producer's own metadata shows `topic` with every partition led. The
    /// first record to a topic is produced only then: records sent to a topic the producer has
    /// no metadata for wait in librdkafka's unassigned queue and are partitioned once metadata
    /// arrives, and a freshly created partition may not have a leader yet. The stress runs of
    /// the exactly-once tests lost the first record(s) of brand-new topics (committed
    /// transaction, no failed delivery report, absent even under read_uncommitted) on that
    /// path; it is not taken any more. One metadata round trip per topic and producer.
    fn await_partition_leaders(&self, topic: &str) -> Result<(), SinkError> {
        for producer in self.producer.iter().chain(&self.standby) {
            self.await_partition_leaders_of(producer, topic)?;
        }
        Ok(())
    }

    fn await_partition_leaders_of(
        &self,
        producer: &ThreadedProducer<SinkContext>,
        topic: &str,
    ) -> Result<(), SinkError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let md = producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .map_err(|e| SinkError::Unavailable(format!("metadata of topic {topic}: {e}")))?;
            let t = md.topics().iter().find(|t| t.name() == topic);
            let state = match t {
                None => Some("is not in the metadata".to_owned()),
                Some(t) => match t.error() {
                    Some(e) => Some(format!("is unavailable ({e:?})")),
                    None if t.partitions().is_empty() => Some("has no partitions".to_owned()),
                    None if t
                        .partitions()
                        .iter()
                        .any(|p| p.error().is_some() || p.leader() < 0) =>
                    {
                        Some("has partitions without a leader".to_owned())
                    }
                    None => None,
                },
            };
            let Some(state) = state else {
                return Ok(());
            };
            if Instant::now() > deadline {
                let missing = t.is_none_or(|t| {
                    t.error().is_some_and(|e| {
                        RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                    })
                });
                return Err(topic_not_ready(&self.settings, topic, missing, &state));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin client, made on first use.
    fn admin(&mut self) -> Result<&AdminClient<DefaultClientContext>, SinkError> {
        if self.admin.is_none() {
            let a: AdminClient<DefaultClientContext> = self
                .base_config()
                .create()
                .map_err(|e| SinkError::Config(e.to_string()))?;
            self.admin = Some(a);
        }
        self.admin.as_ref().ok_or(SinkError::Stopped)
    }

    /// Decides the suspects of `topic` (records in a batch the broker refused as too large):
    /// those larger than the topic's `max.message.bytes` on their own are poisoned (sent to
    /// the DLQ when replayed), the others are innocent and produced again. When none is too
    /// large alone, the producer's batches are what is too large for the topic: a setting the
    /// operator must change, reported as such instead of retried forever.
    fn resolve_suspects(&mut self, topic: &str) -> Result<(), SinkError> {
        let suspects = self.poison.take_suspects(topic);
        if suspects.is_empty() {
            return Ok(());
        }
        let limit = self.topic_max_message_bytes(topic)?;
        let mut poisoned = 0;
        for (id, size) in suspects {
            if size > limit {
                poisoned += 1;
                self.poison.insert(
                    id,
                    format!(
                        "the record (about {size} bytes in a batch of its own) is larger than topic {topic}'s max.message.bytes ({limit})"
                    ),
                    "record_too_large",
                    false,
                );
            }
        }
        if poisoned == 0 {
            return Err(SinkError::Config(format!(
                "the broker refused a batch to topic {topic} as larger than its max.message.bytes ({limit}), though no record alone is: set kafka.librdkafka.batch.size (and message.max.bytes) to at most {limit}, or raise the topic's max.message.bytes"
            )));
        }
        Ok(())
    }

    /// The topic's `max.message.bytes`, as the broker reports it.
    pub(super) fn topic_max_message_bytes(&mut self, topic: &str) -> Result<usize, SinkError> {
        let runtime = self.runtime.clone();
        let admin = self.admin()?;
        let opts = AdminOptions::new().request_timeout(Some(CALL_TIMEOUT));
        let spec = ResourceSpecifier::Topic(topic);
        let res = runtime
            .block_on(admin.describe_configs([&spec], &opts))
            .map_err(|e| SinkError::Unavailable(format!("describing topic {topic}: {e}")))?;
        res.into_iter()
            .filter_map(Result::ok)
            .find_map(|r| {
                r.get("max.message.bytes")
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse::<usize>().ok())
            })
            .ok_or_else(|| {
                SinkError::Unavailable(format!("topic {topic}'s max.message.bytes is unknown"))
            })
    }

    /// Hands `r` back if its topic exists (created first when the relay may create topics);
    /// a topic refused for good refuses the record too ([`SinkError::Rejected`], with the
    /// record), now and for every later record to it.
    pub(super) fn admit_topic(&mut self, r: OutRecord) -> Result<OutRecord, SinkError> {
        if let Some((reason, class)) = self.refused_topics.get(&*r.topic) {
            return Err(SinkError::Rejected {
                reason: reason.clone(),
                class,
                keep_value: true,
                record: Returned(Some(Box::new(r))),
            });
        }
        if !self.known_topics.contains(&*r.topic) {
            let partitions = self.settings.topic_partitions;
            if let Err(e) = self.ensure_topic(&r.topic, partitions, false) {
                self.remember_refusal(&r.topic, &e);
                return Err(e.refusing(r));
            }
        }
        Ok(r)
    }

    /// Remembers `e` if it refuses `topic` for good, so that later records to it are refused
    /// at once by [`KafkaBackend::admit_topic`] instead of each waiting for the topic again.
    pub(super) fn remember_refusal(&mut self, topic: &str, e: &SinkError) {
        if let SinkError::Rejected { reason, class, .. } = e {
            self.known_topics.remove(topic);
            self.refused_topics
                .insert(topic.to_owned(), (reason.clone(), class));
        }
    }

    /// Reads the checkpoint topic to its end under read_committed; the last value for `key`.
    pub(super) fn read_checkpoint(&self, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        self.read_checkpoint_as("checkpoint-reader", key)
    }

    /// [`KafkaBackend::read_checkpoint`] by a consumer named `<transactional id>-<role>`. It
    /// assigns the partition: no group membership, no offsets committed.
    fn read_checkpoint_as(&self, role: &str, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        let topic = &self.settings.checkpoint_topic;
        let consumer: BaseConsumer<ReaderContext> = self
            .base_config()
            .set(
                "group.id",
                format!("{}-{role}", self.settings.transactional_id),
            )
            .set("enable.auto.commit", "false")
            // Only committed checkpoints count: an aborted transaction's checkpoint never happened.
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create_with_context(ReaderContext)
            .map_err(|e| SinkError::Config(e.to_string()))?;
        let (low, high) = consumer
            .fetch_watermarks(topic, 0, CALL_TIMEOUT)
            .map_err(|e| SinkError::Unavailable(format!("checkpoint topic {topic}: {e}")))?;
        if high <= low {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|e| SinkError::Unavailable(e.to_string()))?;
        consumer
            .assign(&tpl)
            .map_err(|e| SinkError::Unavailable(e.to_string()))?;
        let deadline = Instant::now() + CALL_TIMEOUT * 2;
        let mut latest: Option<Checkpoint> = None;
        loop {
            if Instant::now() > deadline {
                return Err(SinkError::Unavailable(format!(
                    "reading checkpoint topic {topic} did not reach its end in {:?}",
                    CALL_TIMEOUT * 2
                )));
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => {}
                // The end is the end offset read before starting (after init_transactions has
                // settled the topic), not merely the first EOF event: a checkpoint older than
                // the latest would now make the relay refuse its slot as "confirmed past the
                // checkpoint", so the read must not stop short.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    let reached = consumer
                        .position()
                        .ok()
                        .and_then(|tpl| tpl.find_partition(topic, 0).map(|p| p.offset()))
                        .and_then(|o| o.to_raw())
                        .unwrap_or(-1);
                    if reached >= high {
                        break;
                    }
                }
                Some(Err(e)) => {
                    return Err(SinkError::Unavailable(format!("reading checkpoints: {e}")))
                }
                Some(Ok(m)) => {
                    if m.key() != Some(key.as_bytes()) {
                        continue;
                    }
                    let Some(value) = m.payload() else { continue };
                    match Checkpoint::decode(value) {
                        Ok(cp) => latest = Some(cp),
                        Err(e) => {
                            return Err(SinkError::Config(format!(
                                "checkpoint at {topic}/0@{} is not readable ({e}); \
                                 refusing to guess a resume point",
                                m.offset()
                            )))
                        }
                    }
                }
            }
        }
        Ok(latest)
    }
}

/// The error for `topic` still not ready (`state`) after [`CALL_TIMEOUT`]. A topic that is
/// `missing` while the operator creates the topics (`outbox.create_topics = false`) refuses
/// its records: they wait in the DLQ, to be redriven once it exists. Anything else is
/// unavailability, retried.
pub(super) fn topic_not_ready(
    settings: &KafkaSettings,
    topic: &str,
    missing: bool,
    state: &str,
) -> SinkError {
    if missing && !settings.create_topics && topic != settings.checkpoint_topic {
        return SinkError::Rejected {
            reason: format!(
                "topic {topic} does not exist and outbox.create_topics is false: create it, then redrive"
            ),
            class: "unknown_topic",
            keep_value: true,
            record: Returned::default(),
        };
    }
    SinkError::Unavailable(format!("topic {topic} {state} after {CALL_TIMEOUT:?}"))
}

/// Reads the last committed checkpoint of `key` without a producer, for `relay status`: no
/// `init_transactions`, so a relay running with the same transactional id is not fenced. A
/// missing checkpoint topic means no checkpoint. Blocking (call it from `spawn_blocking`).
///
/// Unlike the relay's own read, nothing has settled the topic first: a transaction of a relay
/// that died mid-commit stays open until `kafka.transaction_timeout`, and until then the read
/// cannot reach the end and fails after a minute, saying so.
pub fn read_checkpoint_read_only(
    settings: KafkaSettings,
    key: &str,
    runtime: tokio::runtime::Handle,
) -> Result<Option<Checkpoint>, SinkError> {
    let reader = KafkaBackend::new(settings, runtime);
    let topic = &reader.settings.checkpoint_topic;
    let probe: BaseConsumer<ReaderContext> = reader
        .base_config()
        .create_with_context(ReaderContext)
        .map_err(|e| SinkError::Config(e.to_string()))?;
    let md = probe
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .map_err(|e| SinkError::Unavailable(format!("metadata of topic {topic}: {e}")))?;
    let exists = md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Ok(None);
    }
    reader.read_checkpoint_as("checkpoint-status", key)
}

/// Delivery reports of the open transaction: how many of its records librdkafka has not yet
/// reported, and how many it reported failed. Each record carries the transaction's generation
/// as its delivery opaque, so late reports of an aborted transaction's records (purged by the
/// abort) never count against the next one.
#[derive(Default)]
struct Deliveries {
    state: Mutex<DeliveryState>,
    done: Condvar,
}

#[derive(Default)]
struct DeliveryState {
    generation: usize,
    outstanding: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Deliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation to tag the open transaction's records with.
    fn generation(&self) -> usize {
        self.lock().generation
    }

    /// Called before a record is handed to librdkafka (whose report may come at once);
    /// `unsent` undoes it when the handover fails.
    fn sent(&self) {
        self.lock().outstanding += 1;
    }

    fn unsent(&self) {
        let mut st = self.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.done.notify_all();
        }
    }

    /// A delivery report for a record of transaction `generation`; `error` if it failed.
    fn delivered(&self, generation: usize, error: Option<String>) {
        let mut st = self.lock();
        if st.generation != generation {
            return;
        }
        if let Some(e) = error {
            st.failed += 1;
            st.first_error.get_or_insert(e);
        }
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.done.notify_all();
        }
    }

    /// The transaction ended (committed or aborted): the next one starts from zero.
    fn reset(&self) {
        let mut st = self.lock();
        st.generation = st.generation.wrapping_add(1);
        st.outstanding = 0;
        st.failed = 0;
        st.first_error = None;
        self.done.notify_all();
    }

    /// Records sent and not yet reported.
    fn outstanding(&self) -> u64 {
        self.lock().outstanding
    }

    /// Records of the open transaction reported failed, with the first error.
    fn failures(&self) -> Option<(u64, String)> {
        let st = self.lock();
        (st.failed > 0).then(|| (st.failed, st.first_error.clone().unwrap_or_default()))
    }

    /// Waits until every record sent has been reported, or `timeout`.
    fn wait_all(&self, timeout: Duration) {
        let st = self.lock();
        let _ = self
            .done
            .wait_timeout_while(st, timeout, |st| st.outstanding > 0);
    }
}

/// The producer's context: counts delivery reports (the producer's own thread serves them).
/// A failed delivery fails the transaction's commit: librdkafka's `commit_transaction` checks
/// that too, and the sink checks it itself before committing, so that no path of librdkafka's
/// (a record failed before it had a partition, say) can let a transaction commit without it.
struct SinkContext {
    deliveries: Arc<Deliveries>,
    poison: Poison,
    security: SecurityWatch,
}

impl rdkafka::client::ClientContext for SinkContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.security.observe(&error, reason);
        tracing::error!(error = %error, reason, "producer: librdkafka error");
    }
}

impl rdkafka::producer::ProducerContext for SinkContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, generation: usize) {
        // The error only: never the record (it holds the payload). A success without an offset
        // is librdkafka acknowledging a record implicitly, because a later batch of the
        // partition succeeded; its own append was never confirmed, so it fails the transaction
        // too (an abort and a retry cost little; a lost event is not acceptable).
        let error = match result {
            Err((e, m)) => {
                let code = e.rdkafka_error_code();
                if let Some((class, keep_value)) = code.and_then(definite_record_error) {
                    let event_id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "event_id").and_then(|h| h.value));
                    let id = Poison::id(m.topic(), m.key(), event_id);
                    if class == "record_too_large" {
                        // The broker refused the whole batch: a suspect only (see `Poison`).
                        let headers = m.headers().map_or(0, |h| {
                            h.iter()
                                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 6)
                                .sum::<usize>()
                        });
                        let size = 61
                            + 24
                            + m.key().map_or(0, <[u8]>::len)
                            + m.payload().map_or(0, <[u8]>::len)
                            + headers;
                        self.poison.suspect(id, m.topic(), size);
                    } else {
                        self.poison.insert(
                            id,
                            format!("delivery to {} failed: {e}", m.topic()),
                            class,
                            keep_value,
                        );
                    }
                }
                Some(e.to_string())
            }
            Ok(m) if m.offset() < 0 => Some(format!(
                "acknowledged without an offset on {} [{}]: its append was not confirmed",
                m.topic(),
                m.partition()
            )),
            Ok(_) => None,
        };
        self.deliveries.delivered(generation, error);
    }
}

/// The checkpoint reader's client context: the end of the partition is how the reader knows it
/// is done, not an error worth an ERROR log line (librdkafka also reports it as a global error).
struct ReaderContext;

impl rdkafka::client::ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::error!(error = %error, reason, "checkpoint reader: librdkafka error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Maps a transaction call's error by rust-rdkafka's three questions.
fn classify(what: &str, e: KafkaError) -> SinkError {
    if let KafkaError::Transaction(ref te) = e {
        return classify_txn(what, te);
    }
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::ProducerFenced)
        | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        | Some(RDKafkaErrorCode::Fatal) => SinkError::Fatal(format!("{what}: {e}")),
        Some(RDKafkaErrorCode::InvalidConfig) | Some(RDKafkaErrorCode::InvalidArgument) => {
            SinkError::Config(format!("{what}: {e}"))
        }
        _ => SinkError::Unavailable(format!("{what}: {e}")),
    }
}

fn classify_txn(what: &str, te: &RDKafkaError) -> SinkError {
    if te.is_fatal() {
        SinkError::Fatal(format!("{what}: {te}"))
    } else if te.txn_requires_abort() {
        SinkError::Aborted(format!("{what}: {te}"))
    } else {
        SinkError::Unavailable(format!("{what}: {te}"))
    }
}

fn is_retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(te) if te.is_retriable() && !te.is_fatal() && !te.txn_requires_abort())
}

impl Backend for KafkaBackend {
    fn open(&mut self, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        let mut config = self.base_config();
        config.set("enable.idempotence", "true");
        if self.exactly_once() {
            config
                .set("transactional.id", &self.settings.transactional_id)
                .set(
                    "transaction.timeout.ms",
                    self.settings.transaction_timeout.as_millis().to_string(),
                );
        } else {
            // Idempotence implies it; said explicitly, as the at-least-once promise rests on it
            // (a record acknowledged by the leader alone could be lost with it).
            config.set("acks", "all");
        }
        // Low latency by default; the passthrough map may change these.
        if !self.settings.librdkafka.contains_key("linger.ms") {
            config.set("linger.ms", "1");
        }
        // The Java client's partitioner (murmur2 of the key), which Debezium, Kafka Connect and
        // Java producers use: a key stays on its partition whichever of them wrote it, so a
        // team can switch from Debezium without breaking per-key order. librdkafka's own
        // default (consistent_random, CRC32) would place keys elsewhere.
        if !self.settings.librdkafka.contains_key("partitioner") {
            config.set("partitioner", "murmur2_random");
        }
        // Bound the producer's memory: when its queue is full, sends wait (backpressure) and
        // the relay stops reading WAL, instead of buffering up to librdkafka's 1 GiB default.
        if !self
            .settings
            .librdkafka
            .contains_key("queue.buffering.max.kbytes")
        {
            config.set("queue.buffering.max.kbytes", "16384");
        }
        let producer = self.create_producer(&config)?;
        self.producer = Some(producer);
        if self.exactly_once() && self.settings.transactional_producers >= 2 {
            config.set("transactional.id", self.alternate_transactional_id());
            let standby = self.create_producer(&config)?;
            self.standby = Some(standby);
        }
        let topic = self.settings.checkpoint_topic.clone();
        self.ensure_topic(&topic, 1, true)?;
        // Fences any older producer with our transactional id(s) and aborts its open
        // transaction, so the checkpoint read below sees a settled topic. With two producers,
        // both: either may have died with a transaction open.
        if self.exactly_once() {
            for producer in self.producer.iter().chain(&self.standby) {
                let mut attempt = 0;
                loop {
                    match producer.init_transactions(CALL_TIMEOUT) {
                        Ok(()) => break,
                        Err(e) if is_retriable(&e) && attempt < 3 => attempt += 1,
                        Err(e) => return Err(classify("init_transactions", e)),
                    }
                }
            }
        }
        self.read_checkpoint(key)
    }

    fn begin(&mut self) -> Result<(), SinkError> {
        if !self.exactly_once() {
            return Ok(());
        }
        self.producer()?
            .begin_transaction()
            .map_err(|e| classify("begin_transaction", e))
    }

    fn send(&mut self, r: OutRecord) -> Result<(), SinkError> {
        // Nearly always false: one atomic load per record, the lock only when something waits.
        if self.poison.any() && self.poison.has_suspects() {
            self.resolve_suspects(&r.topic)?;
        }
        if self.poison.any() && !self.poison.is_empty() {
            let event_id = r
                .headers
                .iter()
                .find(|(k, _)| *k == "event_id")
                .map(|(_, v)| &v[..]);
            let id = Poison::id(&r.topic, Some(&r.key[..]), event_id);
            if let Some((reason, class, keep_value)) = self.poison.take(id) {
                return Err(SinkError::Rejected {
                    reason,
                    class,
                    keep_value,
                    record: Returned(Some(Box::new(r))),
                });
            }
        }
        let r = self.admit_topic(r)?;
        let producer = self.producer()?;
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + r.extra_headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
        for (k, v) in &r.extra_headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
        let record = BaseRecord::with_opaque_to(&r.topic, self.deliveries.generation())
            .key(&r.key[..])
            .payload(&r.value[..])
            .headers(headers);
        let sent = self.send_waiting(producer, record);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some((class, keep_value)) =
                    e.rdkafka_error_code().and_then(definite_record_error)
                {
                    // librdkafka checks a record against message.max.bytes before it
                    // queues it: this one can never be written, to any partition.
                    let reason = format!("produce to {}: {e}", r.topic);
                    return Err(SinkError::Rejected {
                        reason,
                        class,
                        keep_value,
                        record: Returned(Some(Box::new(r))),
                    });
                }
                Err(classify("produce", e))
            }
        }
    }

    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError> {
        let started = Instant::now();
        if !self.exactly_once() {
            return self.checkpoint_after_delivery(checkpoint, started);
        }
        let value = checkpoint.encode();
        let key = checkpoint.relay.clone();
        let topic = self.settings.checkpoint_topic.clone();
        let producer = self.producer()?;
        // A transaction with events is already open; a checkpoint-only one (heartbeat) is not.
        match producer.begin_transaction() {
            Ok(()) => {}
            Err(KafkaError::Transaction(te)) if te.code() == RDKafkaErrorCode::State => {}
            Err(e) => return Err(classify("begin_transaction", e)),
        }
        if let Err(e) = self.produce_checkpoint(producer, &topic, &key, &value) {
            let err = classify("produce checkpoint", e);
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            self.deliveries.reset();
            return Err(err);
        }
        // rust-rdkafka's commit_transaction first flushes by polling the producer's queue in
        // steps of up to 100 ms; with the ThreadedProducer another thread serves that queue, so
        // each step waits its full 100 ms. Waiting here for the deliveries (which that thread
        // serves at once, signalling `deliveries`) leaves nothing to flush and removes 100 ms from
        // every commit.
        self.deliveries.wait_all(CALL_TIMEOUT);
        self.delivered_after.set(Some(started.elapsed()));
        if let Some((n, error)) = self.deliveries.failures() {
            // A fenced (or otherwise dead) producer purges its queue: that is the fatal error,
            // not an abortable one.
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Err(SinkError::Fatal(format!("commit: {code:?}: {reason}")));
            }
            tracing::warn!(failed = n, error = %error, "records of the transaction failed delivery; aborting it");
            let _ = producer.abort_transaction(CALL_TIMEOUT);
            self.deliveries.reset();
            return Err(SinkError::Aborted(format!(
                "{n} record(s) of the transaction failed delivery, the first with: {error}"
            )));
        }
        // The report callback runs just before librdkafka releases the message; wait out that
        // instant too, or the flush would see it outstanding and poll for 100 ms.
        let deadline = Instant::now() + Duration::from_millis(200);
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut attempt = 0;
        loop {
            match producer.commit_transaction(CALL_TIMEOUT) {
                Ok(()) => {
                    self.deliveries.reset();
                    // The next transaction runs on the other producer, if there is one: this
                    // one's markers are being written now (see "Two producers in turn").
                    if self.standby.is_some() {
                        std::mem::swap(&mut self.producer, &mut self.standby);
                    }
                    return Ok(());
                }
                Err(e) if is_retriable(&e) && attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "commit_transaction retriable error; retrying");
                }
                Err(e) => {
                    let err = classify("commit_transaction", e);
                    if !matches!(err, SinkError::Fatal(_)) {
                        // Abortable (or unknown): abort so the transactional id is usable again
                        // by the producer that replaces this one.
                        let _ = producer.abort_transaction(CALL_TIMEOUT);
                        self.deliveries.reset();
                        return Err(match err {
                            SinkError::Unavailable(m) => SinkError::Aborted(m),
                            other => other,
                        });
                    }
                    return Err(err);
                }
            }
        }
    }

    fn abort(&mut self) -> Result<(), SinkError> {
        if !self.exactly_once() {
            // Nothing can be taken back: what was handed to the producer may still be written
            // (a duplicate after the replay, never a loss). The checkpoint is not written.
            self.deliveries.reset();
            return Ok(());
        }
        let res = self
            .producer()?
            .abort_transaction(CALL_TIMEOUT)
            .map_err(|e| classify("abort_transaction", e));
        // Aborting purges what was not delivered: nothing of that transaction is awaited any more.
        self.deliveries.reset();
        res
    }

    fn delivered_after(&self) -> Option<Duration> {
        self.delivered_after.get()
    }
}

impl KafkaBackend {
    /// A producer on `config`, connected (a refused SASL login or an unverifiable broker
    /// certificate ends here, with the broker's reason, instead of in timeouts further on).
    fn create_producer(
        &self,
        config: &ClientConfig,
    ) -> Result<ThreadedProducer<SinkContext>, SinkError> {
        let producer: ThreadedProducer<SinkContext> = config
            .create_with_context(SinkContext {
                deliveries: self.deliveries.clone(),
                poison: self.poison.clone(),
                security: self.security.clone(),
            })
            .map_err(|e| SinkError::Config(e.to_string()))?;
        await_connection(
            producer.client(),
            &self.security,
            &self.settings.bootstrap_servers,
            CALL_TIMEOUT,
        )?;
        Ok(producer)
    }

    /// The second producer's transactional id.
    fn alternate_transactional_id(&self) -> String {
        format!("{}.alt", self.settings.transactional_id)
    }

    fn exactly_once(&self) -> bool {
        self.settings.delivery == Delivery::ExactlyOnce
    }

    /// At-least-once "commit" (see the module doc): every record of the batch acknowledged,
    /// then the checkpoint written and acknowledged.
    fn checkpoint_after_delivery(
        &mut self,
        checkpoint: &Checkpoint,
        started: Instant,
    ) -> Result<(), SinkError> {
        self.await_deliveries("records of the batch")?;
        self.delivered_after.set(Some(started.elapsed()));
        let value = checkpoint.encode();
        let key = checkpoint.relay.clone();
        let topic = self.settings.checkpoint_topic.clone();
        let producer = self.producer()?;
        if let Err(e) = self.produce_checkpoint(producer, &topic, &key, &value) {
            self.deliveries.reset();
            return Err(match classify("produce checkpoint", e) {
                SinkError::Unavailable(m) => SinkError::Aborted(m),
                other => other,
            });
        }
        self.await_deliveries("checkpoint")?;
        self.deliveries.reset();
        Ok(())
    }

    /// Hands one record to `producer`, counting it as awaiting its delivery report, and waits
    /// while the producer's queue is full (backpressure: the producer's own thread delivers
    /// meanwhile; `relay_kafka_queue_full_total` counts the waits). Any other error is
    /// returned with the record uncounted. Runs on the sink thread, never in async code.
    fn send_waiting<K, P>(
        &self,
        producer: &ThreadedProducer<SinkContext>,
        mut record: BaseRecord<'_, K, P, usize>,
    ) -> Result<(), KafkaError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            self.deliveries.sent();
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    self.deliveries.unsent();
                    if let Some(c) = &self.queue_full {
                        c.inc();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    record = back;
                }
                Err((e, _)) => {
                    self.deliveries.unsent();
                    return Err(e);
                }
            }
        }
    }

    /// Hands the checkpoint record to `producer` (partition 0 of the checkpoint topic), waiting
    /// while its queue is full.
    fn produce_checkpoint(
        &self,
        producer: &ThreadedProducer<SinkContext>,
        topic: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(), KafkaError> {
        let record = BaseRecord::with_opaque_to(topic, self.deliveries.generation())
            .partition(0)
            .key(key)
            .payload(value);
        self.send_waiting(producer, record)
    }

    /// Waits until every record sent so far is acknowledged. A failed delivery fails the batch
    /// (fatal if the producer itself is dead), as does a report that does not come within the
    /// call timeout: the checkpoint must not be written past a record that is not durable.
    fn await_deliveries(&self, what: &str) -> Result<(), SinkError> {
        self.deliveries.wait_all(CALL_TIMEOUT);
        let producer = self.producer()?;
        if let Some((n, error)) = self.deliveries.failures() {
            self.deliveries.reset();
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Err(SinkError::Fatal(format!("producer: {code:?}: {reason}")));
            }
            return Err(SinkError::Aborted(format!(
                "{n} of the {what} failed delivery, the first with: {error}; the batch is sent again"
            )));
        }
        let outstanding = self.deliveries.outstanding();
        if outstanding > 0 {
            self.deliveries.reset();
            return Err(SinkError::Unavailable(format!(
                "{outstanding} of the {what} not acknowledged within {CALL_TIMEOUT:?}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Deliveries;
    use std::time::Duration;

    #[test]
    fn a_failed_delivery_is_counted_against_its_own_transaction_only() {
        let d = Deliveries::default();
        let old = d.generation();
        d.sent();
        d.sent();
        // The transaction is aborted with both records outstanding; their late reports (purged)
        // must not count against the next transaction.
        d.reset();
        let new = d.generation();
        assert_ne!(old, new);
        d.sent();
        d.delivered(old, Some("purged".into()));
        d.delivered(old, Some("purged".into()));
        assert!(d.failures().is_none());
        d.delivered(new, None);
        d.wait_all(Duration::from_millis(1));
        assert_eq!(d.lock().outstanding, 0);

        d.sent();
        d.sent();
        d.delivered(new, Some("Message production error: UnknownTopic".into()));
        d.delivered(new, Some("second".into()));
        let (n, first) = d.failures().expect("failures counted");
        assert_eq!(n, 2);
        assert!(first.contains("UnknownTopic"), "{first}");
        d.reset();
        assert!(d.failures().is_none());
    }

    #[test]
    fn wait_all_returns_once_everything_is_reported() {
        let d = std::sync::Arc::new(Deliveries::default());
        let g = d.generation();
        d.sent();
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.delivered(g, None));
        d.wait_all(Duration::from_secs(10));
        t.join().unwrap();
        assert_eq!(d.lock().outstanding, 0);
    }
}
