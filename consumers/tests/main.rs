//! Integration tests of the consumers against the real Postgres and Kafka of `scripts/stack up`.
//!
//! One test binary; each file beside this one is a module of it. Every test gets its own
//! database, topics and consumer groups, so they run in parallel. Events are written to Kafka
//! directly with the relay's envelope (`support::produce`), so no relay needs to run.

mod accounts;
mod dedup;
mod dlq;
mod downstreams;
mod failures;
mod gateway;
mod payment_drill;
mod rebalance;
mod support;
