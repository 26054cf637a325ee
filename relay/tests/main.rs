//! Integration tests against the real Postgres and Kafka of `scripts/stack up`.
//!
//! One test binary; each file beside this one is a module of it. Every test gets its own
//! database (or its own cluster) and its own topic names and transactional ids, so they run
//! in parallel. Connection settings come from the variables `scripts/stack env` prints.

mod at_least_once;
mod backfill;
mod cdc;
mod compose;
mod exits;
mod failover;
mod kafka_reader;
mod pgoutput_stream;
mod poll;
mod replication_client;
mod routing;
mod security;
mod sink;
mod slot_watch;
mod smoke;
mod stack;
mod support;
