//! A consumer's Prometheus metrics: every name in one place, every label value from a closed set.
//!
//! Names start with `consumer_`; counters end in `_total`; durations are `_seconds`. Each
//! consumer process has its own registry whose series carry a constant `consumer` label (the
//! group name, fixed by configuration). The lag gauge is labelled by `topic` and `partition`:
//! both are fixed by configuration and by the topics' partition counts, not by record data.
//!
//! The dedup hit rate is `consumer_dedup_hits_total / consumer_records_total` (rates of both).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Metric names.
pub mod names {
    /// Records finished, whatever the outcome (applied, duplicate, stale, dead-lettered, dropped).
    pub const RECORDS_TOTAL: &str = "consumer_records_total";
    /// Records whose effect was applied and committed.
    pub const PROCESSED_TOTAL: &str = "consumer_processed_total";
    /// Redeliveries recognised by the dedup row (unique violation, rolled back).
    pub const DEDUP_HITS_TOTAL: &str = "consumer_dedup_hits_total";
    /// Records skipped by the version guard (older or equal version).
    pub const VERSION_GUARD_SKIPS_TOTAL: &str = "consumer_version_guard_skips_total";
    /// Failed attempts, by error class.
    pub const FAILURES_TOTAL: &str = "consumer_failures_total";
    /// Attempts after a retryable failure.
    pub const RETRIES_TOTAL: &str = "consumer_retries_total";
    /// Records written to the DLQ (acknowledged by Kafka).
    pub const DLQ_WRITES_TOTAL: &str = "consumer_dlq_writes_total";
    /// Records dropped after a permanent error with the retry budget (and so the DLQ) off.
    pub const DROPPED_TOTAL: &str = "consumer_dropped_total";
    /// From the poll that returned a record to the end of its processing.
    pub const PROCESSING_SECONDS: &str = "consumer_processing_seconds";
    /// High watermark minus committed offset, per partition (from librdkafka's statistics).
    pub const LAG_MESSAGES: &str = "consumer_lag_messages";
    /// Partitions currently assigned to this consumer.
    pub const ASSIGNED_PARTITIONS: &str = "consumer_assigned_partitions";
}

/// The metrics of one consumer. Cloning shares the handles.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub records: IntCounter,
    pub processed: IntCounter,
    pub dedup_hits: IntCounter,
    pub guard_skips: IntCounter,
    failures: IntCounterVec,
    pub retries: IntCounter,
    pub dlq_writes: IntCounter,
    pub dropped: IntCounter,
    pub processing: Histogram,
    lag: IntGaugeVec,
    pub assigned: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry for consumer `consumer`, every series created at zero.
    pub fn new(consumer: &str) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some(std::iter::once(("consumer".to_owned(), consumer.to_owned())).collect()),
        )
        .expect("a constant label named `consumer` is valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique name");
            c
        };
        let records = counter(
            names::RECORDS_TOTAL,
            "Records finished, whatever the outcome.",
        );
        let processed = counter(
            names::PROCESSED_TOTAL,
            "Records whose effect was applied and committed.",
        );
        let dedup_hits = counter(
            names::DEDUP_HITS_TOTAL,
            "Redeliveries recognised by the dedup row.",
        );
        let guard_skips = counter(
            names::VERSION_GUARD_SKIPS_TOTAL,
            "Records skipped by the version guard.",
        );
        let retries = counter(names::RETRIES_TOTAL, "Attempts after a retryable failure.");
        let dlq_writes = counter(names::DLQ_WRITES_TOTAL, "Records written to the DLQ.");
        let dropped = counter(
            names::DROPPED_TOTAL,
            "Records dropped after a permanent error with the DLQ off.",
        );
        let failures = IntCounterVec::new(
            Opts::new(names::FAILURES_TOTAL, "Failed attempts, by error class."),
            &["class"],
        )
        .expect("valid counter");
        registry
            .register(Box::new(failures.clone()))
            .expect("unique name");
        for class in ["retryable", "permanent"] {
            failures.with_label_values(&[class]);
        }
        let processing = Histogram::with_opts(
            HistogramOpts::new(
                names::PROCESSING_SECONDS,
                "From the poll that returned a record to the end of its processing.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        registry
            .register(Box::new(processing.clone()))
            .expect("unique name");
        let lag = IntGaugeVec::new(
            Opts::new(
                names::LAG_MESSAGES,
                "High watermark minus committed offset, per partition.",
            ),
            &["topic", "partition"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(lag.clone()))
            .expect("unique name");
        let assigned =
            IntGauge::new(names::ASSIGNED_PARTITIONS, "Partitions assigned.").expect("valid gauge");
        registry
            .register(Box::new(assigned.clone()))
            .expect("unique name");
        Metrics {
            registry,
            records,
            processed,
            dedup_hits,
            guard_skips,
            failures,
            retries,
            dlq_writes,
            dropped,
            processing,
            lag,
            assigned,
        }
    }

    pub fn failure(&self, class: crate::error::ErrorClass) {
        self.failures.with_label_values(&[class.as_str()]).inc();
    }

    pub fn failures(&self, class: crate::error::ErrorClass) -> u64 {
        self.failures.with_label_values(&[class.as_str()]).get()
    }

    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }

    /// The lag gauge of one partition, when it has been reported.
    pub fn lag(&self, topic: &str, partition: i32) -> Option<i64> {
        self.lag
            .get_metric_with_label_values(&[topic, &partition.to_string()])
            .ok()
            .map(|g| g.get())
    }

    /// The text exposition format, for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on invalid metric families, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new("payment");
        m.set_lag("orders", 0, 3);
        for family in m.registry().gather() {
            let name = family.name();
            assert!(name.starts_with("consumer_"), "{name}");
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        let text = m.render();
        assert!(text.contains("consumer_dedup_hits_total{consumer=\"payment\"} 0"));
        assert!(
            text.contains("consumer_failures_total{class=\"permanent\",consumer=\"payment\"} 0")
        );
        assert_eq!(m.lag("orders", 0), Some(3));
    }
}
