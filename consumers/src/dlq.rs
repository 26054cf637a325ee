//! The dead-letter queue: where a record goes when it cannot take effect, with its context, so
//! its partition keeps flowing; and the tools to inspect and redrive it.
//!
//! ```text
//!  worker ── permanent error / budget spent ──▶ DlqWriter::write ──▶ <consumer>.dlq (acks=all)
//!                                                   │ acknowledged
//!                                                   ▼
//!                                         offset stored, partition moves on
//!
//!  consumers dlq list|show ◀── read_all (read_committed) ◀── <consumer>.dlq
//!  consumers dlq redrive ──▶ token bucket ──▶ original topic (same key, value, envelope headers)
//! ```
//!
//! A DLQ record is the original record (key, value, every header, so `event_id` survives) plus
//! the `dlq.*` headers below. A redriven record is the original again, with `dlq.redriven_from`
//! added: the consumer's dedup row makes a redrive of an already-applied event a no-op, and the
//! version guard makes a redrive of a stale one a skip, so a redrive is safe to repeat.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::HandlerError;
use crate::record::Record;

/// DLQ header names.
pub mod headers {
    pub const CONSUMER: &str = "dlq.consumer";
    pub const ERROR_CLASS: &str = "dlq.error.class";
    pub const ERROR_KIND: &str = "dlq.error.kind";
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    /// Milliseconds since the Unix epoch.
    pub const FIRST_FAILURE_MS: &str = "dlq.first_failure_ms";
    pub const LAST_FAILURE_MS: &str = "dlq.last_failure_ms";
    /// On a redriven record: `<dlq topic>/<partition>/<offset>` it came from.
    pub const REDRIVEN_FROM: &str = "dlq.redriven_from";
    pub const PREFIX: &str = "dlq.";
}

/// An error message is cut to this many bytes in the header (it is context, not a log).
const MAX_MESSAGE_BYTES: usize = 1000;

/// DLQ and redrive errors.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("reading {topic} did not reach its end within {timeout:?}")]
    ReadTimeout { topic: String, timeout: Duration },
    #[error(
        "DLQ record at offset {offset} lacks header {header}; it was not written by this runtime"
    )]
    NotADlqRecord { offset: i64, header: &'static str },
}

/// Why and when a record failed, as it goes into the DLQ headers.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: HandlerError,
    pub attempts: u32,
    pub first_failure: SystemTime,
    pub last_failure: SystemTime,
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The headers of a DLQ record for `record`: its own, then the `dlq.*` context.
pub fn dlq_headers(consumer: &str, record: &Record, failure: &Failure) -> Vec<(String, Vec<u8>)> {
    let mut h: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with(headers::PREFIX))
        .cloned()
        .collect();
    let mut add = |k: &str, v: String| h.push((k.to_owned(), v.into_bytes()));
    add(headers::CONSUMER, consumer.to_owned());
    add(
        headers::ERROR_CLASS,
        failure.error.class.as_str().to_owned(),
    );
    add(headers::ERROR_KIND, failure.error.kind.to_owned());
    add(
        headers::ERROR_MESSAGE,
        truncate_utf8(&failure.error.message, MAX_MESSAGE_BYTES).to_owned(),
    );
    add(headers::ATTEMPTS, failure.attempts.to_string());
    add(headers::ORIGINAL_TOPIC, record.topic.clone());
    add(headers::ORIGINAL_PARTITION, record.partition.to_string());
    add(headers::ORIGINAL_OFFSET, record.offset.to_string());
    add(
        headers::FIRST_FAILURE_MS,
        epoch_ms(failure.first_failure).to_string(),
    );
    add(
        headers::LAST_FAILURE_MS,
        epoch_ms(failure.last_failure).to_string(),
    );
    h
}

fn owned_headers(h: &[(String, Vec<u8>)]) -> OwnedHeaders {
    h.iter()
        .fold(OwnedHeaders::new_with_capacity(h.len()), |acc, (k, v)| {
            acc.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            })
        })
}

/// A producer for DLQ writes and redrives: idempotent, `acks=all`, murmur2 partitioner (the
/// relay's, so a key lands where the relay puts it).
pub fn producer(bootstrap: &str) -> Result<FutureProducer, DlqError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .create()?)
}

/// Writes failed records to one DLQ topic.
#[derive(Clone)]
pub struct DlqWriter {
    producer: FutureProducer,
    topic: String,
    consumer: String,
}

impl DlqWriter {
    pub fn new(bootstrap: &str, topic: &str, consumer: &str) -> Result<DlqWriter, DlqError> {
        Ok(DlqWriter {
            producer: producer(bootstrap)?,
            topic: topic.to_owned(),
            consumer: consumer.to_owned(),
        })
    }

    /// Writes `record` with its failure context and waits for Kafka's acknowledgement.
    /// Cancellation safe in the sense that matters: dropping it before it returns means the
    /// offset is not stored, so the record is redelivered (and may be dead-lettered twice;
    /// `dlq.original.*` identifies the copies).
    pub async fn write(&self, record: &Record, failure: &Failure) -> Result<(), DlqError> {
        let headers = owned_headers(&dlq_headers(&self.consumer, record, failure));
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = record.key.as_deref() {
            fr = fr.key(k);
        }
        if let Some(p) = record.payload.as_deref() {
            fr = fr.payload(p);
        }
        self.producer
            .send(fr, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| DlqError::Kafka(e))
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// Every record of `topic` from the start to the end offsets as of the call, under
/// `read_committed`. Blocking (librdkafka's consumer calls block): run it on a blocking thread.
pub fn read_all(bootstrap: &str, topic: &str, timeout: Duration) -> Result<Vec<Record>, DlqError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("dlq-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                ends.insert(p.id(), high);
            }
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    // Done once every partition's position has reached the end offset taken above (under
    // read_committed a transaction marker may sit at the end; the position passes it).
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(DlqError::ReadTimeout {
                topic: topic.to_owned(),
                timeout,
            });
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            out.push(Record::from_message(&m));
        }
        let pos = consumer.position()?;
        for e in pos.elements() {
            if let Offset::Offset(o) = e.offset() {
                if ends.get(&e.partition()).is_some_and(|end| o >= *end) {
                    ends.remove(&e.partition());
                }
            }
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// One DLQ record, with its context read from the headers.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    pub record: Record,
    pub consumer: String,
    pub error_class: String,
    pub error_kind: String,
    pub error_message: String,
    pub attempts: u32,
    pub original_topic: String,
    pub original_partition: i32,
    pub original_offset: i64,
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
}

impl DlqEntry {
    /// Reads the context of a DLQ record; a record without `dlq.original.topic` is refused (it
    /// has no home to be redriven to).
    pub fn parse(record: Record) -> Result<DlqEntry, DlqError> {
        let s = |h: &str| record.header_str(h).unwrap_or_default().to_owned();
        let n = |h: &str| record.header_str(h).and_then(|v| v.parse::<i64>().ok());
        let original_topic = record
            .header_str(headers::ORIGINAL_TOPIC)
            .ok_or(DlqError::NotADlqRecord {
                offset: record.offset,
                header: headers::ORIGINAL_TOPIC,
            })?
            .to_owned();
        Ok(DlqEntry {
            consumer: s(headers::CONSUMER),
            error_class: s(headers::ERROR_CLASS),
            error_kind: s(headers::ERROR_KIND),
            error_message: s(headers::ERROR_MESSAGE),
            attempts: n(headers::ATTEMPTS)
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            original_partition: n(headers::ORIGINAL_PARTITION)
                .and_then(|v| i32::try_from(v).ok())
                .unwrap_or(-1),
            original_offset: n(headers::ORIGINAL_OFFSET).unwrap_or(-1),
            first_failure_ms: n(headers::FIRST_FAILURE_MS).unwrap_or(0),
            last_failure_ms: n(headers::LAST_FAILURE_MS).unwrap_or(0),
            original_topic,
            record,
        })
    }

    /// The envelope's event id, as text (empty when missing).
    pub fn event_id(&self) -> &str {
        self.record.header_str("event_id").unwrap_or_default()
    }
}

/// The records of DLQ topic `topic`, oldest first.
pub async fn list(bootstrap: &str, topic: &str) -> Result<Vec<DlqEntry>, DlqError> {
    let (b, t) = (bootstrap.to_owned(), topic.to_owned());
    let records = tokio::task::spawn_blocking(move || read_all(&b, &t, Duration::from_secs(60)))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    records.into_iter().map(DlqEntry::parse).collect()
}

/// A token bucket: `rate` tokens per second, bursts up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            last: tokio::time::Instant::now(),
        }
    }

    /// Waits until a token is available and takes it. Cancellation safe: a token is taken only
    /// when this returns.
    pub async fn take(&mut self) {
        loop {
            let now = tokio::time::Instant::now();
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.last = now;
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Which DLQ records to redrive.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these DLQ offsets (any partition), when not empty.
    pub offsets: Vec<i64>,
    /// Only these event ids, when not empty.
    pub event_ids: Vec<String>,
    /// Only records dead-lettered by this consumer.
    pub consumer: Option<String>,
}

impl Selection {
    pub fn matches(&self, e: &DlqEntry) -> bool {
        (self.offsets.is_empty() || self.offsets.contains(&e.record.offset))
            && (self.event_ids.is_empty() || self.event_ids.iter().any(|id| id == e.event_id()))
            && self.consumer.as_ref().is_none_or(|c| *c == e.consumer)
    }
}

/// One redriven record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Produces the selected records of DLQ topic `dlq_topic` back to their original topics at no
/// more than `rate` records per second, each acknowledged before the next; returns what was
/// redriven, in order.
pub async fn redrive(
    bootstrap: &str,
    dlq_topic: &str,
    selection: &Selection,
    rate: f64,
) -> Result<Vec<Redriven>, DlqError> {
    let entries = list(bootstrap, dlq_topic).await?;
    let producer = producer(bootstrap)?;
    let mut bucket = TokenBucket::new(rate, 1);
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| selection.matches(e)) {
        bucket.take().await;
        let mut h: Vec<(String, Vec<u8>)> = e
            .record
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(headers::PREFIX))
            .cloned()
            .collect();
        h.push((
            headers::REDRIVEN_FROM.to_owned(),
            format!("{dlq_topic}/{}/{}", e.record.partition, e.record.offset).into_bytes(),
        ));
        let mut fr: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&e.original_topic).headers(owned_headers(&h));
        if let Some(k) = e.record.key.as_deref() {
            fr = fr.key(k);
        }
        if let Some(p) = e.record.payload.as_deref() {
            fr = fr.payload(p);
        }
        let delivery = producer
            .send(fr, Duration::from_secs(30))
            .await
            .map_err(|(err, _)| DlqError::Kafka(err))?;
        tracing::info!(
            dlq_offset = e.record.offset,
            event_id = e.event_id(),
            topic = %e.original_topic,
            partition = delivery.partition,
            offset = delivery.offset,
            "redriven"
        );
        out.push(Redriven {
            dlq_partition: e.record.partition,
            dlq_offset: e.record.offset,
            event_id: e.event_id().to_owned(),
            topic: e.original_topic.clone(),
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            topic: "orders".into(),
            partition: 2,
            offset: 41,
            key: Some(b"o-1".to_vec()),
            payload: Some(b"{}".to_vec()),
            headers: vec![
                ("event_id".into(), b"e-1".to_vec()),
                ("dlq.attempts".into(), b"9".to_vec()),
            ],
            timestamp_ms: None,
        }
    }

    #[test]
    fn headers_carry_the_context_and_round_trip() {
        let t0 = UNIX_EPOCH + Duration::from_millis(1000);
        let f = Failure {
            error: HandlerError::retryable("gateway_timeout", "é".repeat(800)),
            attempts: 3,
            first_failure: t0,
            last_failure: t0 + Duration::from_millis(500),
        };
        let mut r = record();
        r.headers = dlq_headers("payment", &record(), &f);
        // A stale dlq.* header of an earlier round is replaced, not repeated.
        assert_eq!(
            r.headers
                .iter()
                .filter(|(k, _)| k == "dlq.attempts")
                .count(),
            1
        );
        let e = DlqEntry::parse(r).unwrap();
        assert_eq!(e.consumer, "payment");
        assert_eq!(e.error_class, "retryable");
        assert_eq!(e.error_kind, "gateway_timeout");
        assert!(e.error_message.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(e.attempts, 3);
        assert_eq!(
            (
                e.original_topic.as_str(),
                e.original_partition,
                e.original_offset
            ),
            ("orders", 2, 41)
        );
        assert_eq!((e.first_failure_ms, e.last_failure_ms), (1000, 1500));
        assert_eq!(e.event_id(), "e-1");
        assert!(DlqEntry::parse(record()).is_err());
    }

    proptest::proptest! {
        /// Whatever bytes a DLQ record carries, reading its context never panics.
        #[test]
        fn any_record_parses_or_is_refused(
            headers in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "event_id", "event_type", "dlq.attempts", "dlq.original.topic",
                        "dlq.original.partition", "dlq.original.offset", "dlq.first_failure_ms",
                        "dlq.error.message", "other",
                    ]),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                ),
                0..12,
            ),
            payload in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
        ) {
            let r = Record {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                key: None,
                payload,
                headers: headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                timestamp_ms: None,
            };
            let _ = r.event_id();
            let _ = r.json::<serde_json::Value>();
            let _ = r.json::<crate::downstream::OrderPlaced>();
            let _ = r.json::<crate::downstream::AccountEvent>();
            if let Ok(e) = DlqEntry::parse(r) {
                let _ = e.event_id();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_paces_to_its_rate() {
        let mut b = TokenBucket::new(10.0, 1);
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            b.take().await;
        }
        // One token up front, then one every 100 ms.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1990), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }
}
