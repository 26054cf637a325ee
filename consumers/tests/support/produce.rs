//! Writes events to Kafka exactly as the relay would (its envelope: `relay::outbox`), so the
//! consumer tests do not need a relay running.

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use relay::outbox::{Event, OutRecord, Source};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// One event, as a test describes it.
#[derive(Clone, Debug)]
pub struct TestEvent {
    pub event_id: uuid::Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
}

impl TestEvent {
    pub fn new(
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> TestEvent {
        TestEvent {
            event_id: uuid::Uuid::new_v4(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            event_type: event_type.to_owned(),
            payload,
        }
    }

    /// The Kafka record the polling relay would write for this event to `topic`.
    pub fn record(&self, topic: &str) -> OutRecord {
        static ID: AtomicI64 = AtomicI64::new(1);
        let id = ID.fetch_add(1, Ordering::Relaxed);
        Event {
            event_id: self.event_id.to_string(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: bytes::Bytes::from(self.aggregate_id.clone()),
            event_type: self.event_type.clone(),
            payload: bytes::Bytes::from(self.payload.to_string()),
            headers: Vec::new(),
            source: Source::Table {
                txid: u64::try_from(id).unwrap_or(0) + 1000,
                id,
            },
            commit_ts_us: 0,
        }
        .into_record(topic.into())
    }
}

/// A producer like the relay's as far as placement goes: murmur2 on the key.
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", super::kafka::bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Writes `events` to `topic` in the given order (per key, Kafka keeps that order) and waits for
/// every acknowledgement.
pub async fn send(topic: &str, events: &[TestEvent]) {
    let p = producer();
    let records: Vec<OutRecord> = events.iter().map(|e| e.record(topic)).collect();
    send_records(&p, &records).await;
}

pub async fn send_records(p: &FutureProducer, records: &[OutRecord]) {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let headers = r
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(r.extra_headers.iter().cloned())
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: &k,
                    value: Some(&v[..]),
                })
            });
        let fr = FutureRecord::to(&r.topic)
            .key(&r.key[..])
            .payload(&r.value[..])
            .headers(headers);
        pending.push(p.send(fr, Duration::from_secs(30)));
    }
    for (i, f) in futures_util::future::join_all(pending)
        .await
        .into_iter()
        .enumerate()
    {
        if let Err((e, _)) = f {
            panic!("producing record {i}: {e}");
        }
    }
}
