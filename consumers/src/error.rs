//! Why a record could not take effect, and whether trying again can help.
//!
//! Its own module because both the handler contract and the record's envelope parsing
//! (`record.rs`) produce these errors; with them inside `handler.rs` the two modules imported
//! each other.

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
