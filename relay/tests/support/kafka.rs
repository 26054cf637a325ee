//! Kafka side: unique names, topic creation, and readers that return every record of a topic
//! under a stated isolation level, so tests can count.

use super::env_or;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub fn bootstrap() -> String {
    env_or("STACK_KAFKA_BOOTSTRAP", "127.0.0.1:59092")
}

/// What a reader sees of transactional writes. Always chosen explicitly: librdkafka defaults to
/// `read_committed`, Java clients to `read_uncommitted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    ReadCommitted,
    ReadUncommitted,
}

impl Isolation {
    fn as_str(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "read_committed",
            Isolation::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// One record as a test sees it.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for r in res {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("creating topic {t}: {e}");
            }
        }
    }
}

/// Every record of `topic` from the beginning up to the end offsets as of the call, under
/// `isolation`. Runs on a blocking thread (the consumer's calls block).
pub async fn read_all(topic: &str, isolation: Isolation) -> Vec<Record> {
    read_all_from(&bootstrap(), topic, isolation).await
}

/// Like [`read_all`], from the broker at `bootstrap`.
pub async fn read_all_from(bootstrap: &str, topic: &str, isolation: Isolation) -> Vec<Record> {
    let topic = topic.to_owned();
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic, isolation))
        .await
        .expect("reader thread")
}

/// Every record of `topic` under `isolation`, from the beginning to the end offsets taken before
/// reading (the high watermarks, which include any open transaction's records), partition by
/// partition. The read ends only when the reader's position in every partition has reached its
/// end offset: a partition's first EOF event is not enough, since under `read_committed` it comes
/// at the last stable offset, short of the records of a transaction still open, and a duplicate
/// among them, committed a moment later, would go unseen. An open transaction is waited for (it
/// commits or aborts, by its producer, by fencing or by `transaction.timeout.ms`).
pub fn read_all_blocking(bootstrap: &str, topic: &str, isolation: Isolation) -> Vec<Record> {
    let consumer = reader(bootstrap, isolation);
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("topic metadata");
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    // librdkafka asks for watermarks at the client's isolation level: under read_committed the
    // "high" one is the last stable offset. A read_uncommitted client gives the true end.
    let probe = reader(bootstrap, Isolation::ReadUncommitted);
    let mut tpl = TopicPartitionList::new();
    let mut end = HashMap::new();
    for &p in &partitions {
        let (low, high) = probe
            .fetch_watermarks(topic, p, timeout)
            .expect("watermarks");
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
            end.insert(p, high);
        }
    }
    drop(probe);
    if end.is_empty() {
        return Vec::new();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !end.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach the end offsets {end:?} in 120 s (a transaction left open?)"
        );
        let check = match consumer.poll(Duration::from_millis(200)) {
            None | Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => true,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_owned(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                // Between messages only now and then: a large topic is read message by message.
                out.len() % 1000 == 0
            }
        };
        if !check {
            continue;
        }
        // The position moves past transaction markers and aborted records too, which are never
        // returned as messages, so it reaches the end offset even when the last record is one.
        let position = consumer.position().expect("position");
        end.retain(|&p, &mut high| {
            position
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .is_none_or(|at| at < high)
        });
    }
    out
}

/// A consumer that reads assigned partitions under `isolation`, committing nothing.
fn reader(bootstrap: &str, isolation: Isolation) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", super::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation.as_str())
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer")
}
