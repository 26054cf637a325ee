//! Idempotent consumer runtime and the downstream services of the order pipeline.
//!
//! Kafka delivers at least once, and a redelivery can arrive after newer records: the relay's
//! exactly-once ends at Kafka. This crate makes each event take effect once downstream.
//!
//! Map of the modules (imports run downward only):
//!
//! ```text
//!  main.rs (bin `consumers`)   run <downstream> | gateway | dlq list|show|redrive | migrate
//!     │
//!  downstream                  payment, inventory, notification, loyalty, recommendations,
//!     │                        warehouse, fraud audit, account balance: each only its effect
//!  runtime                     poll thread, per-partition workers, offsets after the effect,
//!     │                        retries, DLQ writes, rebalance and shutdown
//!  handler  record  store      the handler contract; the record and its envelope; dedup row
//!     │                        and version guard SQL
//!  dlq  gateway                DLQ records, list/show/redrive; the fake payment gateway
//!     │                        (server and client)
//!  error  config  fault        HandlerError and its class; settings and defences; drill fault
//!  metrics                     points; Prometheus
//! ```
//!
//! The envelope (headers `event_id`, `event_type`, ...) is the relay's (`relay::outbox`).

pub mod config;
pub mod dlq;
pub mod downstream;
pub mod error;
pub mod fault;
pub mod gateway;
pub mod handler;
pub mod metrics;
pub mod record;
pub mod runtime;
pub mod store;

pub use config::{Defences, RetryPolicy, RuntimeConfig};
pub use handler::{Effect, EntityVersion, ErrorClass, Handler, HandlerError};
pub use metrics::Metrics;
pub use record::Record;
pub use runtime::{Runtime, RuntimeError};
