//! An in-process consumer runtime for a test, stopped (gracefully) when dropped or on `stop`.

use consumers::{Handler, Metrics, Runtime, RuntimeConfig};
use relay::shutdown::Shutdown;
use std::time::Duration;

pub struct Running {
    pub metrics: Metrics,
    pub group: String,
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<Result<(), consumers::RuntimeError>>>,
}

/// A config for `group` on `topics` with the test stack's Kafka, fast retries and commits.
pub fn config(group: &str, topics: &[&str], database_url: &str) -> RuntimeConfig {
    let mut cfg = RuntimeConfig::new(
        group,
        &super::kafka::bootstrap(),
        topics.iter().map(|t| (*t).to_owned()).collect(),
        database_url,
    );
    cfg.retry.initial_backoff = Duration::from_millis(10);
    cfg.retry.max_backoff = Duration::from_millis(50);
    cfg.commit_interval = Duration::from_millis(50);
    cfg
}

pub fn start<H: Handler>(cfg: RuntimeConfig, handler: H) -> Running {
    let metrics = Metrics::new(&cfg.consumer);
    let shutdown = Shutdown::new();
    let group = cfg.consumer.clone();
    let task = tokio::spawn(Runtime::new(cfg, handler, metrics.clone()).run(shutdown.clone()));
    Running {
        metrics,
        group,
        shutdown,
        task: Some(task),
    }
}

impl Running {
    /// Shuts down and waits; panics if the runtime failed.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.task.take() {
            t.await.expect("runtime task").expect("runtime ran cleanly");
        }
    }

    /// Waits for the runtime to end on its own (without a shutdown request) and returns how.
    pub async fn ended(mut self) -> Result<(), consumers::RuntimeError> {
        let t = self.task.take().expect("not yet joined");
        t.await.expect("runtime task")
    }

    /// Waits until the group has committed everything `topic` holds.
    pub async fn drain(&self, topic: &str, limit: Duration) {
        let group = self.group.clone();
        super::wait_for(&format!("{group} drains {topic}"), limit, || {
            let (g, t) = (group.clone(), topic.to_owned());
            async move { (super::offsets::lag(&g, &t).await == 0).then_some(()) }
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}
