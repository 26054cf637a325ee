//! The runtime's settings: what to consume, where effects go, and which defences are on.

use std::time::Duration;

use crate::fault::Faults;

/// The defences of the runtime, each of which can be switched off so a drill can show what it
/// prevents. [`Defences::hardened`] is the production setting; [`Defences::naive`] is a consumer
/// as it is often written first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defences {
    /// Insert the `processed_events` row first in the effect's transaction; a unique violation
    /// means a duplicate. Off: every delivery takes effect.
    pub dedup: bool,
    /// Skip records whose entity version is not newer than the one applied. Off: every record
    /// takes effect in arrival order.
    pub version_guard: bool,
    /// Store and commit an offset only after the record's effect (or DLQ write) is durable.
    /// Off: librdkafka's auto-commit, which commits what was polled whether or not it took
    /// effect (a crash loses the records in flight, and redelivers the ones done since the last
    /// auto-commit).
    pub offsets_after_effect: bool,
    /// A bounded retry budget, then the DLQ. Off: retryable errors are retried for ever
    /// (blocking the partition), and permanent ones are logged and skipped (the record is lost).
    pub retry_budget: bool,
}

impl Defences {
    pub fn hardened() -> Defences {
        Defences {
            dedup: true,
            version_guard: true,
            offsets_after_effect: true,
            retry_budget: true,
        }
    }

    pub fn naive() -> Defences {
        Defences {
            dedup: false,
            version_guard: false,
            offsets_after_effect: false,
            retry_budget: false,
        }
    }
}

/// Exponential backoff with jitter, within a budget of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first try included) before a retryable error goes to the DLQ.
    pub max_attempts: u32,
    /// The backoff before the second attempt; it doubles with every further attempt.
    pub initial_backoff: Duration,
    /// The cap on one backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based): the exponential step, capped,
    /// times a random factor in [0.5, 1.0] ("equal jitter"), so that consumers failing together
    /// do not retry together, while a backoff never shrinks below half its step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let step = self
            .initial_backoff
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_backoff);
        step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// Everything one consumer (one consumer group) needs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The consumer's name: its Kafka group id, its dedup and version-guard namespace, and the
    /// `consumer` label of its metrics.
    pub consumer: String,
    pub bootstrap: String,
    pub topics: Vec<String>,
    /// Postgres URL of the database holding `processed_events` and the effects.
    pub database_url: String,
    /// The DLQ topic (created at start when missing).
    pub dlq_topic: String,
    pub retry: RetryPolicy,
    pub defences: Defences,
    pub faults: Faults,
    /// `group.instance.id` (static membership): a restarted instance takes its partitions back
    /// at once instead of waiting for the session timeout of its dead predecessor.
    pub instance_id: Option<String>,
    /// How often stored offsets are committed (they are also committed on revoke and shutdown).
    pub commit_interval: Duration,
    /// Records buffered per partition between the poll thread and the partition's worker.
    pub queue_per_partition: usize,
    /// Records of one partition applied in one transaction, closed after `batch_window`. One
    /// (the default) is a transaction per record.
    pub batch_max_records: usize,
    pub batch_window: Duration,
    /// Extra librdkafka options, passed through (e.g. `session.timeout.ms`). The runtime's own
    /// options (`enable.auto.commit`, `isolation.level`, ...) cannot be overridden here.
    pub kafka: Vec<(String, String)>,
}

impl RuntimeConfig {
    /// Settings with the hardened defaults for `consumer` on `topics`.
    pub fn new(
        consumer: &str,
        bootstrap: &str,
        topics: Vec<String>,
        database_url: &str,
    ) -> RuntimeConfig {
        RuntimeConfig {
            consumer: consumer.to_owned(),
            bootstrap: bootstrap.to_owned(),
            topics,
            database_url: database_url.to_owned(),
            dlq_topic: format!("{consumer}.dlq"),
            retry: RetryPolicy::default(),
            defences: Defences::hardened(),
            faults: Faults::none(),
            instance_id: None,
            commit_interval: Duration::from_millis(200),
            queue_per_partition: 256,
            batch_max_records: 1,
            batch_window: Duration::ZERO,
            kafka: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for _ in 0..100 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            let b9 = p.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_millis(1000));
            // Far past the cap and the shift width: no overflow, still capped.
            assert!(p.backoff(200) <= Duration::from_millis(1000));
        }
    }
}
