//! Test support: per-test databases, unique Kafka names, readers that count.
