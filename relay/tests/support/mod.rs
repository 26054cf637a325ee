//! Test support: per-test databases, unique Kafka names, readers that count.
//!
//! Connection settings come from the variables `scripts/stack env` prints, with the stack's
//! defaults when they are unset, so `cargo test` works after a plain `scripts/stack up`.

#![allow(dead_code)]

pub mod kafka;
pub mod outbox_load;
pub mod pg;
pub mod process;

// In a file of their own so the consumers' tests can include them too (`#[path]`).
mod names;
pub use names::{env_or, unique_name};
