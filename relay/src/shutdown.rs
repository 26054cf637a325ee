//! Graceful shutdown: one signal, seen by every task.
//!
//! ```text
//!  SIGTERM / SIGINT ──▶ listen_for_signals task ──▶ Shutdown::trigger() ──▶ watch channel
//!                                                                              │
//!        relay loop: select! { biased; _ = shutdown.triggered() => drain … }  ◀┤
//!        health server: graceful shutdown                                     ◀┘
//!  second SIGTERM / SIGINT ──▶ log, exit(130) at once (the operator means it)
//!  still running shutdown.timeout + 2 s after the first ──▶ backstop: log, exit(0)
//! ```
//!
//! The state is level-triggered (a `watch` holding `true` once triggered), so a task that starts
//! waiting after the signal still sees it, and waiting never misses an edge. The relay loop
//! finishes (or aborts) its open Kafka transaction within `shutdown.timeout`; systemd's
//! `TimeoutStopSec` sits above that.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The exit code for a forced exit on a second signal (128 + SIGINT, the shell convention).
pub const FORCED_EXIT_CODE: i32 = 130;

/// How long after `shutdown.timeout` the backstop ends the process (see [`Shutdown::backstop`]).
/// Below the 5 s between the unit's `TimeoutStopSec` and the default timeout.
pub const BACKSTOP_GRACE: Duration = Duration::from_secs(2);

/// A shutdown flag shared by every task. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A flag not yet triggered.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Shutdown { tx: Arc::new(tx) }
    }

    /// Asks every task to stop. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown has been asked for.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once shutdown has been asked for (at once if it already has).
    ///
    /// Cancellation safe: it holds no state beyond its own receiver, and the flag is
    /// level-triggered, so dropping this future in a `select!` and calling it again later loses
    /// nothing.
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // `wait_for` fails only when the sender is dropped; we hold it, so it cannot.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }

    /// Installs SIGTERM and SIGINT handlers and spawns the task that triggers this flag on the
    /// first signal and exits the process with code 130 on the second.
    ///
    /// The handlers are installed before this returns, so a signal arriving right after is
    /// caught; an error means they could not be installed. Call it from within a Tokio runtime.
    pub fn listen_for_signals(&self) -> std::io::Result<JoinHandle<()>> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        Ok(tokio::spawn(async move {
            let first = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(
                signal = first,
                "shutdown requested; finishing the open transaction"
            );
            shutdown.trigger();
            let second = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            // Exactly-once still holds: an unfinished Kafka transaction is aborted by the broker
            // (or fenced by the next instance), and Postgres was not told of its position.
            tracing::warn!(
                signal = second,
                exit_code = FORCED_EXIT_CODE,
                "second signal: exiting without finishing the open transaction"
            );
            std::process::exit(FORCED_EXIT_CODE);
        }))
    }
}

impl Shutdown {
    /// Spawns the task that ends the process (exit 0) if it is still running `timeout` plus
    /// [`BACKSTOP_GRACE`] after shutdown was triggered; abort the handle once the relay has
    /// stopped by itself.
    ///
    /// The relay's drain gives up at `timeout`, but what follows may still block: closing the
    /// Kafka producer waits for librdkafka calls that an unreachable broker holds for up to 30 s
    /// each, and the async runtime waits for blocking threads on exit. Exiting here loses nothing:
    /// the open Kafka transaction aborts (or is fenced by the next instance), and Postgres was not
    /// told of its position.
    pub fn backstop(&self, timeout: Duration) -> JoinHandle<()> {
        let shutdown = self.clone();
        tokio::spawn(async move {
            shutdown.triggered().await;
            tokio::time::sleep(timeout + BACKSTOP_GRACE).await;
            tracing::warn!(
                timeout_ms = (timeout + BACKSTOP_GRACE).as_millis() as u64,
                "the relay did not stop within shutdown.timeout; exiting with the open Kafka \
                 transaction abandoned (it aborts; nothing is lost)"
            );
            std::process::exit(0);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_wakes_waiters_before_and_after() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_triggered());
        let waiter = tokio::spawn({
            let s = shutdown.clone();
            async move { s.triggered().await }
        });
        // A triggered() future dropped before the signal must not lose it later.
        let dropped = tokio::time::timeout(Duration::from_millis(10), shutdown.triggered()).await;
        assert!(dropped.is_err());
        shutdown.trigger();
        waiter.await.unwrap();
        assert!(shutdown.is_triggered());
        // Late waiters see the level, not an edge.
        tokio::time::timeout(Duration::from_secs(1), shutdown.triggered())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sigint_triggers() {
        let shutdown = Shutdown::new();
        let _task = shutdown.listen_for_signals().unwrap();
        // Only the first signal is sent: the second would exit the test process by design.
        let status = std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(5), shutdown.triggered())
            .await
            .expect("SIGINT did not trigger shutdown");
    }
}
