//! The outbox relay: moves committed outbox events from PostgreSQL into Kafka exactly once.
//!
//! Map of the modules (imports run downward only):
//!
//! ```text
//!  main.rs (bin `relay`)       CLI: cdc | poll | migrate | check-config
//!     │
//!  cdc / polling               the two relays, side by side
//!     │
//!  replication  outbox  sink  checkpoint   Postgres protocol; envelope; Kafka; progress record
//!     │
//!  config  metrics  telemetry  shutdown  health
//! ```
//!
//! One exception, deliberate: `config` validates `postgres.url` with the parser and TLS checks of
//! `replication::conn` (one Postgres configuration for every connection, so a URL that
//! validates is one that connects). `replication` imports nothing else of the crate, so there
//! is no cycle.

pub mod cdc;
pub mod checkpoint;
pub mod config;
pub mod health;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod replication;
pub mod shutdown;
pub mod sink;
pub mod systemd;
pub mod telemetry;
