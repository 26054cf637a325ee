//! The outbox relay: moves committed outbox events from PostgreSQL into Kafka exactly once.
//!
//! Map of the modules (imports run downward only):
//!
//! ```text
//!  main.rs (bin `relay`)       CLI: cdc | poll | migrate | check-config; exit: its exit codes
//!     │
//!  cdc / poll   slot_watch  status   the two relays side by side (neither imports the other);
//!     │                             slot metrics, start-up checks, `relay status`
//!  pipeline                    batching, commit in flight, checkpoint, DLQ records, reconnects
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
pub mod exit;
pub mod health;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod pipeline;
pub mod poll;
pub mod replication;
pub mod shutdown;
pub mod sink;
pub mod slot_watch;
pub mod status;
pub mod systemd;
pub mod telemetry;
