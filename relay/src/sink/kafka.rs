//! The Kafka transactional producer behind the sink thread.
//!
//! Transactions follow rust-rdkafka's three questions on every error: `is_fatal()` (fenced or
//! broken: exit), `txn_requires_abort()` (abort and resume from the checkpoint), `is_retriable()`
//! (retry the same call). Anything else is treated as requiring an abort: unknown errors are not
//! retried blindly.
//!
//! `QueueFull` is backpressure, not an error: the thread waits for deliveries and tries again.

use super::security::{await_connection, SecurityWatch};
use super::{Backend, SinkError};
use crate::checkpoint::Checkpoint;
use crate::outbox::OutRecord;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashSet};
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
        }
    }
}

/// Timeout of one blocking transaction call (init, commit, abort).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaBackend {
    settings: KafkaSettings,
    producer: Option<ThreadedProducer<SinkContext>>,
    deliveries: Arc<Deliveries>,
    admin: Option<AdminClient<DefaultClientContext>>,
    runtime: tokio::runtime::Handle,
    known_topics: HashSet<String>,
    queue_full: Option<prometheus::IntCounter>,
    security: SecurityWatch,
}

impl KafkaBackend {
    /// `runtime` serves the admin client's futures (topic creation) from the sink thread.
    pub fn new(settings: KafkaSettings, runtime: tokio::runtime::Handle) -> KafkaBackend {
        KafkaBackend {
            settings,
            producer: None,
            deliveries: Arc::new(Deliveries::default()),
            admin: None,
            runtime,
            known_topics: HashSet::new(),
            queue_full: None,
            security: SecurityWatch::default(),
        }
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

    fn ensure_topic(
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
        let admin = match &self.admin {
            Some(a) => a,
            None => {
                let a: AdminClient<DefaultClientContext> = self
                    .base_config()
                    .create()
                    .map_err(|e| SinkError::Config(e.to_string()))?;
                self.admin.insert(a)
            }
        };
        // Replication factor -1: the broker's default.replication.factor.
        let mut nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
        if compact {
            nt = nt.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = self
            .runtime
            .block_on(admin.create_topics(&[nt], &opts))
            .map_err(|e| SinkError::Unavailable(format!("creating topic {topic}: {e}")))?;
        for r in res {
            match r {
                Ok(_) => tracing::info!(topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => {
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
        let Some(producer) = &self.producer else {
            return Ok(());
        };
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
                let hint = if self.settings.create_topics {
                    ""
                } else {
                    " (outbox.create_topics is false: the topic must be created beforehand)"
                };
                return Err(SinkError::Unavailable(format!(
                    "topic {topic} {state} after {CALL_TIMEOUT:?}{hint}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the checkpoint topic to its end under read_committed; the last value for `key`.
    fn read_checkpoint(&self, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        let topic = &self.settings.checkpoint_topic;
        let consumer: BaseConsumer<ReaderContext> = self
            .base_config()
            .set(
                "group.id",
                format!("{}-checkpoint-reader", self.settings.transactional_id),
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
            Err((e, _)) => Some(e.to_string()),
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
        config
            .set("transactional.id", &self.settings.transactional_id)
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                self.settings.transaction_timeout.as_millis().to_string(),
            );
        // Low latency by default; the passthrough map may change these.
        if !self.settings.librdkafka.contains_key("linger.ms") {
            config.set("linger.ms", "1");
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
        let producer: ThreadedProducer<SinkContext> = config
            .create_with_context(SinkContext {
                deliveries: self.deliveries.clone(),
                security: self.security.clone(),
            })
            .map_err(|e| SinkError::Config(e.to_string()))?;
        // A refused SASL login or an unverifiable broker certificate ends here, with the
        // broker's reason, instead of in timeouts further on.
        await_connection(
            producer.client(),
            &self.security,
            &self.settings.bootstrap_servers,
            CALL_TIMEOUT,
        )?;
        self.producer = Some(producer);
        let topic = self.settings.checkpoint_topic.clone();
        self.ensure_topic(&topic, 1, true)?;
        // Fences any older producer with our transactional id and aborts its open transaction,
        // so the checkpoint read below sees a settled topic.
        let producer = self.producer()?;
        let mut attempt = 0;
        loop {
            match producer.init_transactions(CALL_TIMEOUT) {
                Ok(()) => break,
                Err(e) if is_retriable(&e) && attempt < 3 => attempt += 1,
                Err(e) => return Err(classify("init_transactions", e)),
            }
        }
        self.read_checkpoint(key)
    }

    fn begin(&mut self) -> Result<(), SinkError> {
        self.producer()?
            .begin_transaction()
            .map_err(|e| classify("begin_transaction", e))
    }

    fn send(&mut self, r: OutRecord) -> Result<(), SinkError> {
        if !self.known_topics.contains(&*r.topic) {
            let partitions = self.settings.topic_partitions;
            self.ensure_topic(&r.topic, partitions, false)?;
        }
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
        let mut record = BaseRecord::with_opaque_to(&r.topic, self.deliveries.generation())
            .key(&r.key[..])
            .payload(&r.value[..])
            .headers(headers);
        loop {
            self.deliveries.sent();
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    self.deliveries.unsent();
                    // Backpressure: the producer's own thread delivers meanwhile.
                    if let Some(c) = &self.queue_full {
                        c.inc();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    record = back;
                }
                Err((e, _)) => return Err(classify("produce", e)),
            }
        }
    }

    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError> {
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
        let record = BaseRecord::with_opaque_to(&topic, self.deliveries.generation())
            .partition(0)
            .key(&key)
            .payload(&value);
        let mut record = record;
        loop {
            self.deliveries.sent();
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    self.deliveries.unsent();
                    std::thread::sleep(Duration::from_millis(2));
                    record = back;
                }
                Err((e, _)) => {
                    let err = classify("produce checkpoint", e);
                    let _ = producer.abort_transaction(CALL_TIMEOUT);
                    self.deliveries.reset();
                    return Err(err);
                }
            }
        }
        // rust-rdkafka's commit_transaction first flushes by polling the producer's queue in
        // steps of up to 100 ms; with the ThreadedProducer another thread serves that queue, so
        // each step waits its full 100 ms. Waiting here for the deliveries (which that thread
        // serves at once, signalling `deliveries`) leaves nothing to flush and removes 100 ms from
        // every commit.
        self.deliveries.wait_all(CALL_TIMEOUT);
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
        let res = self
            .producer()?
            .abort_transaction(CALL_TIMEOUT)
            .map_err(|e| classify("abort_transaction", e));
        // Aborting purges what was not delivered: nothing of that transaction is awaited any more.
        self.deliveries.reset();
        res
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
