//! What a downstream implements: the effect of one record, inside the runtime's transaction.
//!
//! The contract, which the runtime keeps and every handler relies on:
//!
//! - [`Handler::apply`] runs inside an open Postgres transaction whose first statement (when
//!   dedup is on) inserted the record's `processed_events` row. Everything the handler writes
//!   through [`Effect::tx`] commits together with that row, or not at all.
//! - The offset is stored only after that transaction has committed (or the record has been
//!   written to the DLQ), so a crash anywhere before means a redelivery, and the dedup row makes
//!   the redelivery a no-op.
//! - Effects outside Postgres (an HTTP call) cannot join the transaction: they must be
//!   idempotent on their own, keyed by something stable across redeliveries (the payment
//!   consumer's `Idempotency-Key` is derived from the order id). Call
//!   [`Effect::external_call_done`] right after such a call so the drill's fault point sits
//!   exactly between the external effect and the database commit.

use async_trait::async_trait;

pub use crate::error::{ErrorClass, HandlerError, DB_UNAVAILABLE};
use crate::fault::{FaultPoint, Faults};
use crate::record::Record;

/// The entity a record changes and the version it carries, for the version guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityVersion {
    pub entity: String,
    pub version: i64,
}

/// What a handler gets besides the record: the open transaction and the drill's fault points.
pub struct Effect<'a> {
    pub tx: &'a tokio_postgres::Transaction<'a>,
    pub(crate) faults: &'a Faults,
    /// The consumer's name (its group id and dedup namespace).
    pub consumer: &'a str,
    /// The transaction's id: one per record, or one per batch for batching consumers.
    pub batch_id: uuid::Uuid,
}

impl Effect<'_> {
    /// Marks the point between an external effect and the database commit (a drill may abort
    /// the process here).
    pub fn external_call_done(&self) {
        self.faults.hit(FaultPoint::AfterExternalCall);
    }
}

/// One downstream's effect.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The entity and version this record carries, for handlers that use the version guard;
    /// `Ok(None)` for records that are not versioned. An error here is the record's error.
    fn version(&self, _record: &Record) -> Result<Option<EntityVersion>, HandlerError> {
        Ok(None)
    }

    /// Applies the record's effect through `cx.tx`. Must not commit or roll back (the runtime
    /// does). Cancellation: the runtime never drops this future half-way; it always runs to the
    /// end of the attempt.
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError>;
}
