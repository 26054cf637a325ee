//! A consumer group's committed offsets against the topic's end offsets: the lag a test waits
//! on ("everything produced has been processed and committed").

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

/// Per partition: (committed offset or -1, end offset).
pub fn positions(group: &str, topic: &str) -> Vec<(i32, i64, i64)> {
    // Never subscribes or joins: it only reads the group's committed offsets.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", super::kafka::bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let t = Duration::from_secs(10);
    let md = c.fetch_metadata(Some(topic), t).expect("metadata");
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, t).expect("committed offsets");
    parts
        .iter()
        .map(|p| {
            let (_, high) = c.fetch_watermarks(topic, *p, t).expect("watermarks");
            let done = committed
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(-1);
            (*p, done, high)
        })
        .collect()
}

/// Sum over partitions of end offset minus committed offset (a partition with nothing
/// committed counts all its records).
pub async fn lag(group: &str, topic: &str) -> i64 {
    let (g, t) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        positions(&g, &t)
            .iter()
            .map(|(_, done, high)| high - (*done).max(0))
            .sum()
    })
    .await
    .expect("lag thread")
}
