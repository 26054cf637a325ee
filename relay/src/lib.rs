//! The outbox relay: moves committed outbox events from PostgreSQL into Kafka exactly once.
//!
//! Map of the modules (imports run downward only):
//!
//! ```text
//!  main.rs (bin `relay`)       CLI: cdc | poll | migrate | check-config
//!     │
//!  cdc / polling  slot_watch  status   the two relays, side by side; slot metrics and checks
//!     │
//!  replication  outbox  sink  checkpoint   Postgres protocol; envelope; Kafka; progress record
//!     │
//!  config  metrics  telemetry  shutdown  health
//! ```

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
pub mod slot_watch;
pub mod status;
pub mod systemd;
pub mod telemetry;
