//! Where records go: bad outbox rows to the DLQ with their identity while the rest flows exactly
//! once, records Kafka refuses for good (too large, a colliding topic) to the DLQ instead of a
//! retry loop, and keys on the partition the Java client would choose.

use crate::cdc::{sample, Harness};
use crate::support::kafka::{self, Isolation, Record};
use crate::support::pg::TestDb;
use crate::support::process::RelayProc;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use std::collections::HashMap;
use std::time::Duration;

/// Inserts one outbox row; returns (event id, outbox id).
pub(crate) async fn insert(
    c: &tokio_postgres::Client,
    aggregate_type: &str,
    aggregate_id: &str,
    payload: &serde_json::Value,
) -> (uuid::Uuid, i64) {
    let id = uuid::Uuid::new_v4();
    let row = c
        .query_one(
            "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ($1, $2, $3, 'Happened', $4, '{\"trace\": \"t-1\"}') RETURNING id",
            &[&id, &aggregate_type, &aggregate_id, payload],
        )
        .await
        .expect("insert outbox row");
    (id, row.get(0))
}

async fn create_topic_with(bootstrap: &str, name: &str, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let mut topic = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let res = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.expect("topic created");
    }
}

pub(crate) fn by_event_id(records: &[Record]) -> HashMap<String, Vec<&Record>> {
    let mut m: HashMap<String, Vec<&Record>> = HashMap::new();
    for r in records {
        if let Some(id) = r.header("event_id") {
            m.entry(id.to_owned()).or_default().push(r);
        }
    }
    m
}

/// Every kind of bad row a new user can write, between good rows: each bad one is in the DLQ
/// once with its identity and reason, every good one on its topic once, and the relay never
/// reconnected (nothing was retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_rows_go_to_the_dlq_with_their_identity_and_the_rest_flows_once() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    // A topic that exists already and collides, in '.' versus '_', with the one a later type
    // would need: only Kafka knows it, so the sink must learn it from CreateTopics.
    create_topic_with(&h.bootstrap, &format!("{}.pre_made", h.prefix), &[]).await;
    let env = {
        let mut e = h.env();
        // Small enough that a 3 kB payload is refused by the producer itself.
        e.set("RELAY_KAFKA__LIBRDKAFKA__MESSAGE.MAX.BYTES", "2048");
        e
    };
    // The slot exists before the rows are written: a slot sees only what commits after it.
    h.create_slot().await;
    let mut relay = RelayProc::spawn(&["cdc"], &env);

    let small = serde_json::json!({"n": 1});
    let big = serde_json::json!({"blob": "x".repeat(3000)});
    let long_type = "t".repeat(300);
    let mut good = Vec::new();
    let mut bad: Vec<(uuid::Uuid, i64, &str, String)> = Vec::new();
    good.push(insert(&c, "order", "o-1", &small).await.0);
    for (ty, class) in [
        ("bad type", "invalid_topic"),
        ("", "invalid_topic"),
        (long_type.as_str(), "invalid_topic"),
        ("pre.made", "invalid_topic"),
    ] {
        let (e, id) = insert(&c, ty, "a-1", &small).await;
        bad.push((e, id, class, ty.to_owned()));
        good.push(insert(&c, "order", "o-2", &small).await.0);
    }
    // Two types the relay itself would put on colliding topics: the first one wins.
    good.push(insert(&c, "bad_type", "b-1", &small).await.0);
    let (e, id) = insert(&c, "bad.type", "b-2", &small).await;
    bad.push((e, id, "invalid_topic", "bad.type".into()));
    let (e, id) = insert(&c, "order", "o-3", &big).await;
    bad.push((e, id, "record_too_large", "order".into()));
    good.push(insert(&c, "order", "o-4", &small).await.0);
    h.wait_caught_up(&mut relay, Duration::from_secs(90)).await;

    let mut delivered = Vec::new();
    for t in ["order", "bad_type"] {
        delivered
            .extend(kafka::read_all(&format!("{}.{t}", h.prefix), Isolation::ReadCommitted).await);
    }
    let delivered = by_event_id(&delivered);
    for g in &good {
        let n = delivered.get(&g.to_string()).map_or(0, Vec::len);
        assert_eq!(n, 1, "good event {g} delivered {n} times");
    }
    assert_eq!(delivered.len(), good.len(), "nothing else on the topics");

    let dead = kafka::read_all(&format!("{}.dlq", h.prefix), Isolation::ReadCommitted).await;
    let dead_by_id = by_event_id(&dead);
    assert_eq!(dead.len(), bad.len(), "one DLQ record per bad row");
    for (event_id, outbox_id, class, ty) in &bad {
        let recs = dead_by_id
            .get(&event_id.to_string())
            .unwrap_or_else(|| panic!("bad row {event_id} ({class}) not in the DLQ"));
        assert_eq!(recs.len(), 1);
        let r = recs[0];
        assert_eq!(r.header("error_class"), Some(*class), "{:?}", r.headers);
        assert!(r.header("error").is_some_and(|e| !e.is_empty()));
        assert_eq!(r.header("aggregate_type"), Some(ty.as_str()));
        // Its source position: from the stream (lsn, xid) or the first start's backfill of
        // rows written before the relay had its snapshot (txid, id).
        let streamed = r.header("lsn").is_some() && r.header("xid").is_some();
        let backfilled = r.header("replay") == Some("backfill") && r.header("txid").is_some();
        assert!(streamed || backfilled, "{:?}", r.headers);
        if *class == "record_too_large" {
            // The value cannot go along; the row is found by its ids.
            assert!(r.value.as_deref().unwrap_or_default().is_empty());
            assert!(r.header("value_bytes").is_some());
            assert!(r
                .header("original_topic")
                .is_some_and(|t| t.ends_with(".order")));
        } else {
            if ty != "pre.made" {
                // Refused by the relay's routing, which has the row: its outbox id goes along.
                // (A record Kafka refuses carries the event's own headers: event id, lsn, xid.)
                assert_eq!(r.header("id"), Some(outbox_id.to_string().as_str()));
            }
            assert_eq!(r.header("original.trace"), Some("t-1"));
            assert_eq!(r.value_str(), r#"{"n": 1}"#);
        }
    }

    let m = Harness::metrics(&env).await;
    assert_eq!(
        sample(&m, "relay_dlq_records_total{relay=\"cdc\"}"),
        Some(bad.len() as f64),
        "{m}"
    );
    assert_eq!(
        sample(&m, "relay_events_total{kind=\"row\",relay=\"cdc\"}"),
        Some(good.len() as f64),
        "{m}"
    );
    for component in ["kafka", "postgres"] {
        assert_eq!(
            sample(
                &m,
                &format!("relay_reconnects_total{{component=\"{component}\"}}")
            ),
            Some(0.0),
            "nothing was retried: {m}"
        );
    }
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
}

/// The topic `small` with max.message.bytes 1500 (before the relay creates it with defaults).
pub(crate) async fn create_small_topic(h: &Harness) {
    create_topic_with(
        &h.bootstrap,
        &format!("{}.small", h.prefix),
        &[("max.message.bytes", "1500")],
    )
    .await;
}

/// Writes an event to `order`, one too large for `small` (whose max.message.bytes is 1500),
/// one that fits in `small`, and one more to `order`; returns their event ids in that order.
pub(crate) async fn write_around_a_refused_record(c: &tokio_postgres::Client) -> [uuid::Uuid; 4] {
    let small = serde_json::json!({"n": 1});
    let before = insert(c, "order", "o-1", &small).await.0;
    let big = serde_json::json!({"blob": "y".repeat(4000)});
    let (refused, _) = insert(c, "small", "s-1", &big).await;
    let fits = insert(c, "small", "s-2", &small).await.0;
    let after = insert(c, "order", "o-2", &small).await.0;
    [before, refused, fits, after]
}

/// Every record of the `order` and `small` topics, read_committed.
pub(crate) async fn read_order_and_small(h: &Harness) -> Vec<Record> {
    let mut delivered = Vec::new();
    for t in ["order", "small"] {
        delivered
            .extend(kafka::read_all(&format!("{}.{t}", h.prefix), Isolation::ReadCommitted).await);
    }
    delivered
}

/// A record the broker refuses for good (larger than the topic's max.message.bytes, which the
/// producer cannot know) fails its transaction once; the relay aborts, and on the retry sends
/// that record to the DLQ instead of looping on it. Everything else is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_broker_refuses_goes_to_the_dlq_after_one_abort() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    create_small_topic(&h).await;
    let env = h.env();
    // The slot exists before the rows are written: a slot sees only what commits after it.
    h.create_slot().await;
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let [before, refused, fits, after] = write_around_a_refused_record(&c).await;
    h.wait_caught_up(&mut relay, Duration::from_secs(120)).await;
    let delivered = read_order_and_small(&h).await;
    let delivered = by_event_id(&delivered);
    for (what, id) in [("before", before), ("fits", fits), ("after", after)] {
        assert_eq!(
            delivered.get(&id.to_string()).map_or(0, Vec::len),
            1,
            "event {what} {id}:\n{}",
            relay.log_text()
        );
    }
    assert!(!delivered.contains_key(&refused.to_string()));
    let dead = kafka::read_all(&format!("{}.dlq", h.prefix), Isolation::ReadCommitted).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header("event_id"),
        Some(refused.to_string().as_str())
    );
    assert_eq!(dead[0].header("error_class"), Some("record_too_large"));
    let m = Harness::metrics(&env).await;
    let aborted = sample(
        &m,
        "relay_kafka_transactions_total{outcome=\"aborted\",relay=\"cdc\"}",
    )
    .unwrap_or(0.0);
    assert!(
        aborted >= 1.0,
        "the broker's refusal aborted a transaction: {m}"
    );
    assert_eq!(
        sample(&m, "relay_dlq_records_total{relay=\"cdc\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "relay_consecutive_failures{relay=\"cdc\"}"),
        Some(0.0),
        "streaming again: {m}"
    );
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
}

/// The Java client's partition for `key` among `n`: the relay's own murmur2 partitioner (the
/// wire client's), checked here against Kafka's test vectors and, below, against where
/// librdkafka's `murmur2_random` puts keys.
fn java_partition(key: &[u8], n: i32) -> i32 {
    relay::sink::wire::partition_for(key, n)
}

#[test]
fn murmur2_matches_kafkas_own_test_vectors() {
    // From Kafka's UtilsTest.testMurmur2.
    for (key, want) in [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ] {
        assert_eq!(relay::sink::wire::murmur2(key.as_bytes()), want, "{key}");
    }
}

/// Every key lands on the partition the Java client (and so Debezium) would choose.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_the_java_partitioner_puts_them() {
    let db = TestDb::create().await;
    let h = Harness::new(db.url(), kafka::bootstrap());
    let c = h.client().await;
    let mut env = h.env();
    env.set("RELAY_OUTBOX__TOPIC_PARTITIONS", "6");
    // The slot exists before the rows are written: a slot sees only what commits after it.
    h.create_slot().await;
    let mut relay = RelayProc::spawn(&["cdc"], &env);
    let small = serde_json::json!({"n": 1});
    let keys: Vec<String> = ["21", "foobar", "abc", "a-little-bit-long-string"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..60).map(|i| format!("order-{i}")))
        .collect();
    for k in &keys {
        insert(&c, "order", k, &small).await;
    }
    h.wait_caught_up(&mut relay, Duration::from_secs(60)).await;
    let records = kafka::read_all(&format!("{}.order", h.prefix), Isolation::ReadCommitted).await;
    assert_eq!(records.len(), keys.len());
    let mut used = std::collections::HashSet::new();
    for r in &records {
        let key = r.key.clone().unwrap_or_default();
        assert_eq!(
            r.partition,
            java_partition(&key, 6),
            "key {:?}",
            String::from_utf8_lossy(&key)
        );
        used.insert(r.partition);
    }
    assert!(used.len() > 1, "the keys spread over partitions");
    assert!(relay
        .terminate(Duration::from_secs(20))
        .expect("exit")
        .success());
}
