//! Rebalances commit only finished work, and all of it: a second member joining and the first
//! one leaving, mid-stream, lose nothing and redeliver nothing that had taken effect.

use std::time::Duration;

use async_trait::async_trait;
use consumers::{Effect, Handler, HandlerError, Record};
use serde_json::json;

use crate::support::kafka::create_topic;
use crate::support::pg::TestDb;
use crate::support::produce::{self, TestEvent};
use crate::support::{runtime, unique_name, wait_for};

const RECORDS: usize = 800;

/// Records the event in `test_effects`, slowly, so the rebalances happen mid-stream.
struct Slow;

#[async_trait]
impl Handler for Slow {
    async fn apply(&self, cx: &Effect<'_>, r: &Record) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(8)).await;
        cx.tx
            .execute(
                "INSERT INTO test_effects (event_id, key, seq, consumer) VALUES ($1, $2, $3, $4)",
                &[
                    &r.event_id()?,
                    &r.key_str().unwrap_or_default(),
                    &r.json::<serde_json::Value>()?["seq"].as_i64().unwrap_or(-1),
                    &cx.consumer,
                ],
            )
            .await?;
        Ok(())
    }
}

async fn effects(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM test_effects", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_stream_commits_finished_work_only_and_all_of_it() {
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE test_effects (n bigserial, event_id uuid NOT NULL, key text NOT NULL, \
             seq bigint NOT NULL, consumer text NOT NULL)",
        )
        .await
        .unwrap();
    let topic = unique_name("rebalance");
    create_topic(&topic, 4).await;
    let events: Vec<TestEvent> = (0..RECORDS)
        .map(|i| {
            TestEvent::new(
                "thing",
                &format!("k-{}", i % 16),
                "Thing",
                json!({"seq": i}),
            )
        })
        .collect();
    produce::send(&topic, &events).await;

    let group = unique_name("g");
    let a = runtime::start(runtime::config(&group, &[&topic], &db.url()), Slow);
    wait_for("a quarter applied", Duration::from_secs(60), || {
        let d = &db;
        async move { (effects(d).await >= (RECORDS / 4) as i64).then_some(()) }
    })
    .await;
    // A second member joins: the partitions are revoked from the first and split.
    let b = runtime::start(runtime::config(&group, &[&topic], &db.url()), Slow);
    wait_for(
        "both members hold partitions",
        Duration::from_secs(60),
        || {
            let (x, y) = (a.metrics.assigned.get(), b.metrics.assigned.get());
            async move { (x > 0 && y > 0 && x + y == 4).then_some(()) }
        },
    )
    .await;
    let split = (a.metrics.assigned.get(), b.metrics.assigned.get());
    wait_for("half applied", Duration::from_secs(60), || {
        let d = &db;
        async move { (effects(d).await >= (RECORDS / 2) as i64).then_some(()) }
    })
    .await;
    // The first member leaves: its partitions go to the second.
    let a_metrics = a.metrics.clone();
    a.stop().await;
    b.drain(&topic, Duration::from_secs(90)).await;

    let applied = effects(&db).await;
    let distinct: i64 = db
        .client()
        .await
        .query_one("SELECT count(DISTINCT event_id) FROM test_effects", &[])
        .await
        .unwrap()
        .get(0);
    let (pa, pb) = (a_metrics.processed.get(), b.metrics.processed.get());
    let hits = a_metrics.dedup_hits.get() + b.metrics.dedup_hits.get();
    println!(
        "rebalance: split {split:?}; applied {pa} by the first member, {pb} by the second, dedup hits {hits}"
    );
    assert_eq!(
        (applied, distinct),
        (RECORDS as i64, RECORDS as i64),
        "every record once"
    );
    assert_eq!(pa + pb, RECORDS as u64);
    // Within each key, records took effect in the order they were written, across both
    // rebalances (a key's records were produced with increasing seq).
    let rows = db
        .client()
        .await
        .query("SELECT key, seq FROM test_effects ORDER BY n", &[])
        .await
        .unwrap();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for r in rows {
        let (key, seq): (String, i64) = (r.get(0), r.get(1));
        let prev = last.insert(key.clone(), seq).unwrap_or(-1);
        assert!(seq > prev, "key {key}: seq {seq} applied after {prev}");
    }
    assert!(pa > 0 && pb > 0, "both members did work");
    // Revoke waited for the records in progress and committed them: nothing that took effect
    // came back to the next owner.
    assert_eq!(
        hits, 0,
        "no finished record was redelivered across the rebalances"
    );
    b.stop().await;
}
