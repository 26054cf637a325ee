//! Poison records go to the DLQ with their context while their partition keeps flowing; a
//! redrive after the fix applies each of them exactly once, and repeating it changes nothing.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use consumers::dlq::{self, Selection};
use consumers::{Effect, ErrorClass, Handler, HandlerError, Record};
use serde_json::json;

use crate::support::kafka::create_topic;
use crate::support::pg::TestDb;
use crate::support::produce::{self, TestEvent};
use crate::support::{procs, runtime, unique_name, wait_for};

/// Records `(event_id, seq)` in `test_effects`; fails records marked poison until `fixed`.
struct Flaky {
    fixed: Arc<AtomicBool>,
    class: ErrorClass,
}

#[async_trait]
impl Handler for Flaky {
    async fn apply(&self, cx: &Effect<'_>, r: &Record) -> Result<(), HandlerError> {
        let v: serde_json::Value = r.json()?;
        if v["poison"] == true && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandlerError {
                class: self.class,
                kind: "test_poison",
                message: "this record is poison until the fix".into(),
            });
        }
        let seq = v["seq"].as_i64().unwrap_or(-1);
        cx.tx
            .execute(
                "INSERT INTO test_effects (event_id, seq) VALUES ($1, $2)",
                &[&r.event_id()?, &seq],
            )
            .await?;
        Ok(())
    }
}

async fn effects_db() -> TestDb {
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE test_effects (n bigserial, event_id uuid NOT NULL, seq bigint NOT NULL)",
        )
        .await
        .unwrap();
    db
}

/// The effects in the order they were applied (`n` is assigned at insert).
async fn effects(db: &TestDb) -> Vec<(uuid::Uuid, i64)> {
    db.client()
        .await
        .query("SELECT event_id, seq FROM test_effects ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_goes_to_the_dlq_with_its_context_while_later_records_flow() {
    let db = effects_db().await;
    let topic = unique_name("poison");
    create_topic(&topic, 1).await;
    // 60 records of one key (one partition, one order); record 10 is poison.
    let events: Vec<TestEvent> = (0..60)
        .map(|i| {
            TestEvent::new(
                "thing",
                "k-1",
                "Thing",
                json!({"seq": i, "poison": i == 10}),
            )
        })
        .collect();
    produce::send(&topic, &events).await;

    let group = unique_name("g");
    let mut cfg = runtime::config(&group, &[&topic], &db.url());
    cfg.retry.max_attempts = 3;
    let fixed = Arc::new(AtomicBool::new(false));
    let run = runtime::start(
        cfg,
        Flaky {
            fixed: fixed.clone(),
            class: ErrorClass::Retryable,
        },
    );
    // Sample the lag gauge while the consumer works: it must stay within what was produced.
    let max_lag = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (m, t, max) = (run.metrics.clone(), topic.clone(), max_lag.clone());
        tokio::spawn(async move {
            loop {
                if let Some(l) = m.lag(&t, 0) {
                    max.fetch_max(l, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    run.drain(&topic, Duration::from_secs(60)).await;
    // The lag gauge (from librdkafka's statistics, once a second) comes back to zero.
    wait_for("lag gauge at zero", Duration::from_secs(20), || {
        let m = run.metrics.clone();
        let t = topic.clone();
        async move { (m.lag(&t, 0) == Some(0)).then_some(()) }
    })
    .await;
    sampler.abort();

    let applied = effects(&db).await;
    let seqs: Vec<i64> = applied.iter().map(|(_, s)| *s).collect();
    let expected: Vec<i64> = (0..60).filter(|i| *i != 10).collect();
    assert_eq!(
        seqs, expected,
        "every record but the poison one took effect, once, in order"
    );

    let dead = dlq::list(&crate::support::kafka::bootstrap(), &format!("{group}.dlq"))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "exactly the poison record is in the DLQ");
    let d = &dead[0];
    assert_eq!(d.event_id(), events[10].event_id.to_string());
    assert_eq!(d.consumer, group);
    assert_eq!(
        (d.error_class.as_str(), d.error_kind.as_str()),
        ("retryable", "test_poison")
    );
    assert_eq!(d.error_message, "this record is poison until the fix");
    assert_eq!(d.attempts, 3);
    assert_eq!(
        (
            d.original_topic.as_str(),
            d.original_partition,
            d.original_offset
        ),
        (topic.as_str(), 0, 10)
    );
    assert!(d.first_failure_ms > 0 && d.last_failure_ms >= d.first_failure_ms);
    assert_eq!(
        d.record.payload,
        events[10].record(&topic).value.to_vec().into()
    );

    let m = &run.metrics;
    assert_eq!(m.processed.get(), 59);
    assert_eq!(m.records.get(), 60);
    assert_eq!(
        m.failures(ErrorClass::Retryable),
        3,
        "three attempts failed"
    );
    assert_eq!(m.retries.get(), 2, "two of them were retries");
    assert_eq!(m.dlq_writes.get(), 1);
    let max = max_lag.load(Ordering::SeqCst);
    assert!(
        max <= 60,
        "lag never exceeded what was produced (max {max})"
    );
    println!(
        "poison: 59 applied, 1 dead-lettered after 3 attempts, max lag seen {max}, final lag 0"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_the_fix_applies_each_dead_lettered_record_exactly_once() {
    let db = effects_db().await;
    let topic = unique_name("redrive");
    create_topic(&topic, 3).await;
    // 30 records over 3 keys; every sixth is poison (5 in all), failing permanently.
    let events: Vec<TestEvent> = (0..30)
        .map(|i| {
            TestEvent::new(
                "thing",
                &format!("k-{}", i % 3),
                "Thing",
                json!({"seq": i, "poison": i % 6 == 5}),
            )
        })
        .collect();
    produce::send(&topic, &events).await;
    let poison: Vec<String> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 == 5)
        .map(|(_, e)| e.event_id.to_string())
        .collect();

    let group = unique_name("g");
    let dlq_topic = format!("{group}.dlq");
    let fixed = Arc::new(AtomicBool::new(false));
    let run = runtime::start(
        runtime::config(&group, &[&topic], &db.url()),
        Flaky {
            fixed: fixed.clone(),
            class: ErrorClass::Permanent,
        },
    );
    run.drain(&topic, Duration::from_secs(60)).await;
    assert_eq!(effects(&db).await.len(), 25);
    let bootstrap = crate::support::kafka::bootstrap();
    let dead = dlq::list(&bootstrap, &dlq_topic).await.unwrap();
    let mut dead_ids: Vec<String> = dead.iter().map(|d| d.event_id().to_owned()).collect();
    dead_ids.sort();
    let mut want = poison.clone();
    want.sort();
    assert_eq!(
        dead_ids, want,
        "the five poison records, and only they, are in the DLQ"
    );
    assert!(dead
        .iter()
        .all(|d| d.attempts == 1 && d.error_class == "permanent"));

    // The fix ships; redrive everything in the DLQ, 50 records/s.
    fixed.store(true, Ordering::SeqCst);
    let redriven = dlq::redrive(&bootstrap, &dlq_topic, &Selection::default(), 50.0)
        .await
        .unwrap();
    assert_eq!(redriven.len(), 5);
    run.drain(&topic, Duration::from_secs(60)).await;
    let applied = effects(&db).await;
    assert_eq!(applied.len(), 30, "each redriven record took effect");
    for id in &poison {
        let n = applied.iter().filter(|(e, _)| e.to_string() == *id).count();
        assert_eq!(n, 1, "poison record {id} applied exactly once");
    }

    // An operator redrives again, through the CLI: dedup makes it a no-op.
    let out = std::process::Command::new(procs::bin())
        .args([
            "dlq",
            "redrive",
            "--bootstrap",
            &bootstrap,
            "--topic",
            &dlq_topic,
        ])
        .args(["--rate", "100"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 record(s) redriven"), "{stdout}");
    run.drain(&topic, Duration::from_secs(60)).await;
    wait_for("five dedup hits", Duration::from_secs(30), || {
        let n = run.metrics.dedup_hits.get();
        async move { (n == 5).then_some(()) }
    })
    .await;
    assert_eq!(
        effects(&db).await.len(),
        30,
        "the second redrive changed nothing"
    );
    assert_eq!(run.metrics.processed.get(), 30);

    let list = std::process::Command::new(procs::bin())
        .args([
            "dlq",
            "list",
            "--bootstrap",
            &bootstrap,
            "--topic",
            &dlq_topic,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(
        listed.lines().count(),
        1 + 5,
        "header and five records:\n{listed}"
    );
    let show = std::process::Command::new(procs::bin())
        .args([
            "dlq",
            "show",
            "--bootstrap",
            &bootstrap,
            "--topic",
            &dlq_topic,
        ])
        .arg(dead[0].record.offset.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    for line in [
        format!("event_id: {}", dead[0].event_id()),
        "dlq.error.kind: test_poison".to_owned(),
        "dlq.attempts: 1".to_owned(),
        format!("dlq.original.topic: {topic}"),
    ] {
        assert!(shown.contains(&line), "{line:?} in:\n{shown}");
    }
    assert!(
        !shown.contains("\"seq\""),
        "no payload unless asked:\n{shown}"
    );
    println!(
        "redrive: 5 dead-lettered, redriven twice: 5 applied once each, 5 dedup hits on the repeat"
    );
    run.stop().await;
}
