//! Smoke tests of the stack itself: Kafka transactions work on the single node, and a pgoutput
//! slot on the real Postgres streams an outbox insert.

use crate::support::kafka::{self, Isolation};
use crate::support::pg::TestDb;
use crate::support::unique_name;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::time::Duration;

/// A transactional producer commits one transaction and aborts another; a `read_committed`
/// reader sees exactly the committed records, a `read_uncommitted` reader sees both.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_transactions_commit_and_abort() {
    let topic = unique_name("smoke_txn");
    kafka::create_topic(&topic, 3).await;
    let txn_id = unique_name("smoke_txn_id");
    let t = topic.clone();
    tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", kafka::bootstrap())
            .set("transactional.id", &txn_id)
            .create()
            .expect("producer");
        let timeout = Duration::from_secs(30);
        producer
            .init_transactions(timeout)
            .expect("init_transactions");

        producer.begin_transaction().expect("begin");
        for i in 0..10 {
            let key = format!("k{i}");
            let value = format!("committed-{i}");
            producer
                .send(BaseRecord::to(&t).key(&key).payload(&value))
                .expect("send");
        }
        producer.commit_transaction(timeout).expect("commit");

        producer.begin_transaction().expect("begin");
        for i in 0..7 {
            let key = format!("k{i}");
            let value = format!("aborted-{i}");
            producer
                .send(BaseRecord::to(&t).key(&key).payload(&value))
                .expect("send");
        }
        producer.flush(timeout).expect("flush");
        producer.abort_transaction(timeout).expect("abort");
    })
    .await
    .unwrap();

    let committed = kafka::read_all(&topic, Isolation::ReadCommitted).await;
    assert_eq!(
        committed.len(),
        10,
        "read_committed sees the committed transaction only"
    );
    assert!(committed
        .iter()
        .all(|r| r.value_str().starts_with("committed-")));
    let mut values: Vec<String> = committed.iter().map(|r| r.value_str()).collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 10, "no duplicates");

    let uncommitted = kafka::read_all(&topic, Isolation::ReadUncommitted).await;
    assert_eq!(
        uncommitted.len(),
        17,
        "read_uncommitted also sees the aborted records"
    );
    assert_eq!(
        uncommitted
            .iter()
            .filter(|r| r.value_str().starts_with("aborted-"))
            .count(),
        7
    );
}

/// A pgoutput slot streams an outbox insert: Begin, Relation, Insert (carrying the event id),
/// Commit, in that order, read as raw bytes through `pg_logical_slot_get_binary_changes`.
#[tokio::test]
async fn pgoutput_slot_streams_an_outbox_insert() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let slot = unique_name("smoke_slot");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    let event_id = uuid::Uuid::new_v4();
    client
        .execute(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, 'order', 'o-1', 'OrderPlaced', '{\"amount\": 42}')",
            &[&event_id],
        )
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'outbox_pub', 'messages', 'true')",
            &[&slot],
        )
        .await
        .unwrap();
    let messages: Vec<Vec<u8>> = rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
    let tags: Vec<u8> = messages.iter().filter_map(|m| m.first().copied()).collect();
    assert_eq!(
        tags, b"BRIC",
        "one transaction: Begin, Relation, Insert, Commit"
    );
    let insert = &messages[2];
    let needle = event_id.to_string();
    assert!(
        insert.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "the Insert carries the event id as text"
    );
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
}

/// `relay migrate` applies every migration once; a second run applies none and changes nothing.
#[tokio::test]
async fn migrations_apply_once_and_again_is_a_no_op() {
    let db = TestDb::create_empty().await;
    let first = relay::migrate::run(&db.url()).await.expect("first run");
    assert_eq!(
        first,
        relay::migrate::MIGRATOR.iter().count(),
        "all migrations applied"
    );
    let second = relay::migrate::run(&db.url()).await.expect("second run");
    assert_eq!(second, 0, "nothing applied the second time");
    let c = db.client().await;
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('outbox', 'processed_events', 'orders')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 3);
    let publication: i64 = c
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'outbox_pub' AND tablename = 'outbox'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publication, 1, "the publication covers the outbox");
}
