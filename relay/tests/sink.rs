//! The Kafka sink against the real broker: zombie fencing and checkpoint read-back, with
//! each client (librdkafka, and the experimental wire client with transactions v2 and v1).

use crate::support::kafka::{self, Isolation};
use crate::support::unique_name;
use bytes::Bytes;
use relay::checkpoint::Checkpoint;
use relay::config::KafkaClient;
use relay::outbox::OutRecord;
use relay::sink::kafka::{KafkaBackend, KafkaSettings};
use relay::sink::wire::WireBackend;
use relay::sink::{KafkaSink, Sink, SinkError};
use std::time::Duration;

/// Which client a test runs with: librdkafka, or the wire client with transactions `v`.
#[derive(Clone, Copy, Debug)]
enum Client {
    Librdkafka,
    Wire(u8),
}

fn backend(client: Client, txn_id: &str, checkpoint_topic: &str) -> KafkaSink {
    let rt = tokio::runtime::Handle::current();
    let mut s = settings(txn_id, checkpoint_topic);
    match client {
        Client::Librdkafka => KafkaSink::Librdkafka(Box::new(KafkaBackend::new(s, rt))),
        Client::Wire(v) => {
            s.client = KafkaClient::Wire;
            KafkaSink::Wire(Box::new(WireBackend::new(s, v, rt)))
        }
    }
}

fn settings(txn_id: &str, checkpoint_topic: &str) -> KafkaSettings {
    KafkaSettings {
        bootstrap_servers: kafka::bootstrap(),
        transactional_id: txn_id.to_owned(),
        checkpoint_topic: checkpoint_topic.to_owned(),
        transaction_timeout: Duration::from_secs(30),
        topic_partitions: 2,
        create_topics: true,
        librdkafka: Default::default(),
        delivery: relay::config::Delivery::ExactlyOnce,
        transactional_producers: 1,
        client: relay::config::KafkaClient::Librdkafka,
        wire_transaction_version: 0,
    }
}

fn records(topic: &str, tag: &str, n: usize) -> Vec<OutRecord> {
    (0..n)
        .map(|i| OutRecord {
            topic: topic.into(),
            key: Bytes::from(format!("k{i}")),
            value: Bytes::from(format!("{tag}-{i}")),
            headers: vec![("event_id", Bytes::from(format!("{tag}-{i}")))],
            extra_headers: vec![],
        })
        .collect()
}

/// Commits on `sink` with `cp`; a commit that fails fails the test.
async fn commit_ok(sink: &Sink, cp: Checkpoint) -> relay::sink::Committed {
    sink.commit(cp)
        .await
        .unwrap()
        .await
        .unwrap()
        .expect("commit")
}

fn checkpoint(key: &str, end: u64) -> Checkpoint {
    Checkpoint {
        relay: key.to_owned(),
        system_id: 1,
        end_lsn: end,
        commit_lsn: end - 8,
        ..Default::default()
    }
}

/// Two producers with one transactional id: the newer fences the older, whose commit then fails
/// fatally; only the newer's records and checkpoint are committed, and a third instance resumes
/// from the newer's checkpoint.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_is_fenced_and_cannot_commit() {
    zombie_is_fenced(Client::Librdkafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_is_fenced_and_cannot_commit_with_the_wire_client() {
    zombie_is_fenced(Client::Wire(2)).await;
    zombie_is_fenced(Client::Wire(1)).await;
}

async fn zombie_is_fenced(client: Client) {
    let topic = unique_name("fence");
    let cp_topic = unique_name("fence_cp");
    let txn = unique_name("fence_txn");
    let key = "cdc/fence";

    let (old, cp) = Sink::start(backend(client, &txn, &cp_topic), key.into())
        .await
        .expect("old instance opens");
    assert!(cp.is_none(), "a new checkpoint topic has no checkpoint");
    old.send(records(&topic, "old", 5)).await.unwrap();
    // Let the old instance's records reach the broker inside its open transaction.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (new, cp) = Sink::start(backend(client, &txn, &cp_topic), key.into())
        .await
        .expect("new instance opens and fences the old one");
    assert!(cp.is_none());

    let old_result = old
        .commit(checkpoint(key, 1000))
        .await
        .unwrap()
        .await
        .unwrap();
    match old_result {
        Err(SinkError::Fatal(msg)) => eprintln!("old instance fenced: {msg}"),
        other => panic!("{client:?}: the zombie's commit must fail fatally, got {other:?}"),
    }
    old.close().await;

    new.send(records(&topic, "new", 3)).await.unwrap();
    let committed = commit_ok(&new, checkpoint(key, 2000)).await;
    assert_eq!(committed.records, 3);
    new.close().await;

    let seen = kafka::read_all(&topic, Isolation::ReadCommitted).await;
    let mut values: Vec<String> = seen.iter().map(|r| r.value_str()).collect();
    values.sort();
    assert_eq!(
        values,
        vec!["new-0", "new-1", "new-2"],
        "only the live instance's records"
    );

    let (third, cp) = Sink::start(backend(client, &txn, &cp_topic), key.into())
        .await
        .expect("third instance");
    assert_eq!(
        cp.map(|c| c.end_lsn),
        Some(2000),
        "resumes from the last committed checkpoint"
    );
    third.close().await;
}

/// Topics the sink creates while its transaction is open (the first event of a new aggregate
/// type) lose nothing: in each of 5 transactions, 3 records to each of 4 brand-new topics, all
/// read back, under read_committed, exactly once.
///
/// A commit may fail visibly (`Aborted`): librdkafka reports a record acknowledged without an
/// offset when a produce request timed out and was retried on a loaded machine, and the sink
/// aborts such a transaction rather than trust it. The relay then resumes from its checkpoint
/// with a new sink; so does this test (at most twice a round), sending the round's records
/// again. What it must never see is a commit that returned `Ok` with a record missing, or an
/// aborted record made visible: each topic must hold exactly 3 records.
#[tokio::test(flavor = "multi_thread")]
async fn records_to_topics_created_inside_the_transaction_all_commit() {
    new_topics_commit(Client::Librdkafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_to_topics_created_inside_the_transaction_all_commit_with_the_wire_client() {
    new_topics_commit(Client::Wire(2)).await;
    new_topics_commit(Client::Wire(1)).await;
}

async fn new_topics_commit(client: Client) {
    let cp_topic = unique_name("newtopics_cp");
    let txn = unique_name("newtopics_txn");
    let key = "cdc/newtopics";
    let open = || async {
        Sink::start(backend(client, &txn, &cp_topic), key.into())
            .await
            .expect("sink opens")
            .0
    };
    let mut sink = open().await;
    let mut topics = Vec::new();
    let mut aborts = 0;
    for round in 0..5u64 {
        let round_topics: Vec<String> = (0..4).map(|_| unique_name("newtopic")).collect();
        let mut attempt = 0;
        loop {
            for topic in &round_topics {
                sink.send(records(topic, &format!("r{round}"), 3))
                    .await
                    .unwrap();
            }
            let result = sink
                .commit(checkpoint(key, 1000 + round))
                .await
                .unwrap()
                .await
                .unwrap();
            match result {
                Ok(committed) => {
                    assert_eq!(committed.records, 12);
                    break;
                }
                Err(SinkError::Aborted(e)) if attempt < 2 => {
                    eprintln!("{client:?}: round {round} aborted ({e}); again with a new sink");
                    attempt += 1;
                    aborts += 1;
                    sink.close().await;
                    sink = open().await;
                }
                Err(e) => panic!("{client:?}: commit of round {round}: {e:?}"),
            }
        }
        topics.extend(round_topics);
    }
    sink.close().await;
    let mut wrong = Vec::new();
    for topic in &topics {
        let seen = kafka::read_all(topic, Isolation::ReadCommitted).await;
        if seen.len() != 3 {
            wrong.push(format!("{topic}: {} of 3", seen.len()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{client:?}: topics without exactly their 3 records ({aborts} aborted commits): {wrong:?}"
    );
}

/// The wire client puts each key on the partition librdkafka (`murmur2_random`, the Java
/// client's partitioner) puts it on: the same 200 keys through each client, to topics of 6
/// partitions, land on the same partitions, and with all headers and values intact.
#[tokio::test(flavor = "multi_thread")]
async fn the_wire_client_partitions_and_encodes_as_librdkafka_does() {
    let cp_topic = unique_name("parts_cp");
    let key = "cdc/parts";
    let mut placed = Vec::new();
    for client in [Client::Librdkafka, Client::Wire(2)] {
        let topic = unique_name("parts");
        let txn = unique_name("parts_txn");
        let mut s = settings(&txn, &cp_topic);
        s.topic_partitions = 6;
        let rt = tokio::runtime::Handle::current();
        let b = match client {
            Client::Librdkafka => KafkaSink::Librdkafka(Box::new(KafkaBackend::new(s, rt))),
            Client::Wire(v) => {
                s.client = KafkaClient::Wire;
                KafkaSink::Wire(Box::new(WireBackend::new(s, v, rt)))
            }
        };
        let (sink, _) = Sink::start(b, key.into()).await.expect("sink opens");
        let mut recs = records(&topic, "v", 200);
        for r in &mut recs {
            r.key = Bytes::from(format!("order-{}", String::from_utf8_lossy(&r.key)));
            r.extra_headers = vec![("trace".into(), Bytes::from_static(b"t-1"))];
        }
        sink.send(recs).await.unwrap();
        let committed = commit_ok(&sink, checkpoint(key, 1000)).await;
        assert_eq!(committed.records, 200);
        sink.close().await;
        let seen = kafka::read_all(&topic, Isolation::ReadCommitted).await;
        assert_eq!(seen.len(), 200, "{client:?}");
        let mut by_key: Vec<(String, i32)> = Vec::new();
        for r in &seen {
            let k = r.key_str();
            let i = k.trim_start_matches("order-k");
            assert_eq!(r.value_str(), format!("v-{i}"), "{client:?}");
            assert_eq!(r.header("event_id"), Some(&*format!("v-{i}")), "{client:?}");
            assert_eq!(r.header("trace"), Some("t-1"), "{client:?}");
            by_key.push((k, r.partition));
        }
        by_key.sort();
        let used: std::collections::BTreeSet<i32> = by_key.iter().map(|(_, p)| *p).collect();
        assert_eq!(
            used.len(),
            6,
            "{client:?}: 200 keys spread over all 6 partitions"
        );
        placed.push(by_key);
    }
    assert_eq!(
        placed[0], placed[1],
        "each key on the same partition with both clients"
    );
}

/// A transaction past the wire client's 4 MiB goes out before its commit (memory stays
/// bounded), and an abort then ends it at the broker: of its 5,000 records of ~1 KB, the first
/// 4 MiB are in the topic (read_uncommitted sees them) but never visible to read_committed,
/// while the next transaction of the same sink commits normally.
#[tokio::test(flavor = "multi_thread")]
async fn the_wire_client_flushes_a_large_transaction_and_aborts_it_at_the_broker() {
    for v in [2, 1] {
        let topic = unique_name("wire_big");
        let cp_topic = unique_name("wire_big_cp");
        let txn = unique_name("wire_big_txn");
        let key = "cdc/wire_big";
        let (sink, _) = Sink::start(backend(Client::Wire(v), &txn, &cp_topic), key.into())
            .await
            .expect("sink opens");
        let mut big = records(&topic, "aborted", 5_000);
        for r in &mut big {
            r.value = Bytes::from(vec![b'x'; 1_000]);
        }
        for chunk in big.chunks(500) {
            sink.send(chunk.to_vec()).await.unwrap();
        }
        sink.abort().await.expect("abort");
        sink.send(records(&topic, "kept", 7)).await.unwrap();
        let committed = commit_ok(&sink, checkpoint(key, 1000)).await;
        assert_eq!(committed.records, 7);
        sink.close().await;
        let committed = kafka::read_all(&topic, Isolation::ReadCommitted).await;
        let mut values: Vec<String> = committed.iter().map(|r| r.value_str()).collect();
        values.sort();
        let want: Vec<String> = (0..7).map(|i| format!("kept-{i}")).collect();
        assert_eq!(
            values, want,
            "v{v}: only the committed transaction is visible"
        );
        let all = kafka::read_all(&topic, Isolation::ReadUncommitted).await;
        let flushed = all
            .iter()
            .filter(|r| r.value.as_deref().is_some_and(|v| v.len() == 1_000))
            .count();
        assert!(
            flushed >= 3_000,
            "v{v}: the large transaction's first 4 MiB (about 4,000 records) went out before its end; {flushed} of 5000 in the log"
        );
    }
}
