//! Test support: the relay's helpers for per-test databases and Kafka readers (shared, not
//! copied), plus what the consumer tests need on top: envelope producers, in-process runtimes,
//! `consumers` processes to kill, group offsets to wait on, and an in-process gateway.

#![allow(dead_code)]

// The relay's own helpers, compiled into this test binary.
#[path = "../../../relay/tests/support/kafka.rs"]
pub mod kafka;
#[path = "../../../relay/tests/support/pg.rs"]
pub mod pg;

pub mod gateway;
pub mod offsets;
pub mod orders;
pub mod procs;
pub mod produce;
pub mod runtime;

#[path = "../../../relay/tests/support/names.rs"]
mod names;
pub use names::{env_or, unique_name};

use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `limit`
/// (a limit against hanging, not a timed assertion).
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
