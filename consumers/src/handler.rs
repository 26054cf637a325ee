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

use crate::fault::{FaultPoint, Faults};
use crate::record::Record;

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (a timeout, a lost connection, a 5xx): retried with backoff within the budget.
    Retryable,
    /// Definite (a malformed record, a rule the data breaks): straight to the DLQ.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// The error kind of a database that cannot be reached (see [`HandlerError::db`]).
pub const DB_UNAVAILABLE: &str = "db_unavailable";

/// A record could not take effect.
///
/// `kind` is a short, fixed identifier chosen by the code (`gateway_timeout`, `bad_payload`,
/// `db`), fit for a DLQ header and a log field; `message` is for the operator and never carries
/// payload data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} ({}): {message}", class.as_str())]
pub struct HandlerError {
    pub class: ErrorClass,
    pub kind: &'static str,
    pub message: String,
}

impl HandlerError {
    pub fn retryable(kind: &'static str, message: impl Into<String>) -> HandlerError {
        HandlerError {
            class: ErrorClass::Retryable,
            kind,
            message: message.into(),
        }
    }

    pub fn permanent(kind: &'static str, message: impl Into<String>) -> HandlerError {
        HandlerError {
            class: ErrorClass::Permanent,
            kind,
            message: message.into(),
        }
    }

    /// A Postgres error, classified: lost connections, serialization failures, deadlocks,
    /// resource shortages and operator intervention are retryable; any other SQL error (a
    /// constraint the data violates, a type error) is permanent, because it would fail the same
    /// way every time.
    ///
    /// A connection that cannot be made or was lost is [`DB_UNAVAILABLE`]: the runtime retries
    /// it without spending the retry budget, so an outage does not fill the DLQ.
    pub fn db(e: tokio_postgres::Error) -> HandlerError {
        let code = e.code().map(|c| c.code().to_owned());
        // No SQLSTATE: the connection failed or closed; class 08: connection exception.
        let unavailable = code.as_deref().is_none_or(|c| c.starts_with("08"));
        let retryable = unavailable
            || code.as_deref().is_some_and(|c| {
                c.starts_with("40") // transaction rollback: serialization, deadlock
                    || c.starts_with("53") // insufficient resources
                    || c.starts_with("57") // operator intervention (admin shutdown, cancel)
            });
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        HandlerError {
            class: if retryable {
                ErrorClass::Retryable
            } else {
                ErrorClass::Permanent
            },
            kind: if unavailable { DB_UNAVAILABLE } else { "db" },
            message,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

impl From<tokio_postgres::Error> for HandlerError {
    fn from(e: tokio_postgres::Error) -> Self {
        HandlerError::db(e)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_kind_and_class() {
        let e = HandlerError::retryable("gateway_timeout", "no answer in 500 ms");
        assert_eq!(
            e.to_string(),
            "gateway_timeout (retryable): no answer in 500 ms"
        );
        assert!(e.is_retryable());
        assert!(!HandlerError::permanent("bad_payload", "x").is_retryable());
    }
}
