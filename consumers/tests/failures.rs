//! Failures that are not the record's: a database outage does not fill the DLQ, and a handler
//! that panics stops the consumer at its last finished record instead of skipping past it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use consumers::{Effect, ErrorClass, Handler, HandlerError, Record, RuntimeError};
use serde_json::json;

use crate::support::kafka::create_topic;
use crate::support::pg::TestDb;
use crate::support::produce::{self, TestEvent};
use crate::support::{offsets, runtime, unique_name, wait_for};

/// Applies nothing; panics on the record whose `seq` is `panic_at` while `armed`.
struct Panicky {
    panic_at: i64,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl Handler for Panicky {
    async fn apply(&self, _cx: &Effect<'_>, r: &Record) -> Result<(), HandlerError> {
        let v: serde_json::Value = r.json()?;
        if v["seq"].as_i64() == Some(self.panic_at) && self.armed.load(Ordering::SeqCst) {
            panic!("handler bug on purpose");
        }
        Ok(())
    }
}

fn events(n: i64) -> Vec<TestEvent> {
    (0..n)
        .map(|i| TestEvent::new("thing", "k", "Thing", json!({ "seq": i })))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_retried_without_spending_the_budget() {
    let topic = unique_name("outage");
    create_topic(&topic, 1).await;
    produce::send(&topic, &events(3)).await;
    // Nothing listens on this port: every connection attempt fails.
    let port = crate::support::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/none");
    let group = unique_name("g");
    let mut cfg = runtime::config(&group, &[&topic], &url);
    cfg.retry.max_attempts = 3;
    let armed = Arc::new(AtomicBool::new(false));
    let run = runtime::start(
        cfg,
        Panicky {
            panic_at: -1,
            armed,
        },
    );
    wait_for("ten failed attempts", Duration::from_secs(60), || {
        let n = run.metrics.failures(ErrorClass::Retryable);
        async move { (n >= 10).then_some(()) }
    })
    .await;
    let failures = run.metrics.failures(ErrorClass::Retryable);
    assert_eq!(
        run.metrics.dlq_writes.get(),
        0,
        "an outage sends nothing to the DLQ"
    );
    assert_eq!(run.metrics.records.get(), 0, "and finishes no record");
    assert_eq!(
        offsets::lag(&group, &topic).await,
        3,
        "nothing was committed"
    );
    println!("outage: {failures} failed attempts on the first record, budget 3, DLQ writes 0");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_stops_the_consumer_at_its_last_finished_record() {
    let db = TestDb::create().await;
    let topic = unique_name("panic");
    create_topic(&topic, 1).await;
    produce::send(&topic, &events(10)).await;
    let group = unique_name("g");
    let armed = Arc::new(AtomicBool::new(true));
    let run = runtime::start(
        runtime::config(&group, &[&topic], &db.url()),
        Panicky {
            panic_at: 5,
            armed: armed.clone(),
        },
    );
    // The runtime ends by itself, with an error.
    let ended = tokio::time::timeout(Duration::from_secs(60), run.ended())
        .await
        .expect("the runtime stops by itself");
    assert!(matches!(ended, Err(RuntimeError::WorkerDied)), "{ended:?}");
    // Records 0-4 finished and were committed; record 5 and after were not skipped.
    let positions = tokio::task::spawn_blocking({
        let (g, t) = (group.clone(), topic.clone());
        move || offsets::positions(&g, &t)
    })
    .await
    .unwrap();
    assert_eq!(positions, vec![(0, 5, 10)]);

    // The bug fixed, a restart takes it from record 5.
    armed.store(false, Ordering::SeqCst);
    let run = runtime::start(
        runtime::config(&group, &[&topic], &db.url()),
        Panicky { panic_at: 5, armed },
    );
    run.drain(&topic, Duration::from_secs(60)).await;
    assert_eq!(run.metrics.processed.get(), 5, "records 5-9, once each");
    run.stop().await;
}
