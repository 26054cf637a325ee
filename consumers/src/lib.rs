//! Idempotent consumer runtime and the downstream services of the order pipeline.
//!
//! Not built yet: this crate holds its place in the workspace so that the dependency direction
//! (consumers use the relay's `outbox` envelope, never the other way) is fixed from the start.
//! The runtime (dedup row in the effect's transaction, version guard, retry budget, DLQ, redrive)
//! arrives with its own issue; the `processed_events` table it needs is already migrated.
