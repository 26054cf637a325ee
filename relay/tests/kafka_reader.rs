//! The tests' Kafka reader counts what a consumer would find: it reads every partition to the
//! end offset taken before it starts, so records committed in a transaction that was still open
//! then are counted too, and aborted ones are not.

use crate::support::kafka::{self, Isolation};
use crate::support::unique_name;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::time::Duration;

fn producer() -> BaseProducer {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka::bootstrap())
        .set("transactional.id", unique_name("reader_txn"))
        .create()
        .expect("producer");
    p.init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    p
}

/// One transaction of records `(partition, event_id)`, flushed to the log but not ended.
fn write_open(p: &BaseProducer, topic: &str, records: &[(i32, &str)]) {
    p.begin_transaction().expect("begin");
    for (partition, id) in records {
        p.send(
            BaseRecord::<str, str>::to(topic)
                .partition(*partition)
                .key("k")
                .payload(*id)
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "event_id",
                        value: Some(*id),
                    }),
                ),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

fn copies(records: &[kafka::Record], id: &str) -> usize {
    records
        .iter()
        .filter(|r| r.header("event_id") == Some(id))
        .count()
}

/// A duplicate in a transaction still open when the reader starts, committed while it reads,
/// is counted (a reader that stopped at the first EOF, which read_committed gives at the last
/// stable offset, would miss it); records of an aborted transaction are not, and the reader
/// still ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_counts_a_duplicate_committed_while_it_reads() {
    let topic = unique_name("reader");
    kafka::create_topic(&topic, 2).await;
    let p = producer();
    write_open(&p, &topic, &[(0, "e-0"), (1, "e-1")]);
    p.commit_transaction(Duration::from_secs(30))
        .expect("commit");
    write_open(&p, &topic, &[(1, "e-0")]);

    let reader = tokio::spawn({
        let topic = topic.clone();
        async move { kafka::read_all(&topic, Isolation::ReadCommitted).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waited = !reader.is_finished();
    p.commit_transaction(Duration::from_secs(30))
        .expect("commit");
    let records = reader.await.unwrap();
    eprintln!(
        "reader waited for the open transaction: {waited}; {} records, e-0 {} times",
        records.len(),
        copies(&records, "e-0")
    );
    assert_eq!(copies(&records, "e-0"), 2, "the duplicate is counted");
    assert_eq!(copies(&records, "e-1"), 1);

    write_open(&p, &topic, &[(0, "aborted"), (1, "aborted")]);
    p.abort_transaction(Duration::from_secs(30)).expect("abort");
    let committed = kafka::read_all(&topic, Isolation::ReadCommitted).await;
    assert_eq!(committed.len(), 3, "aborted records are not read");
    let all = kafka::read_all(&topic, Isolation::ReadUncommitted).await;
    assert_eq!(copies(&all, "aborted"), 2, "read_uncommitted reads them");
}
