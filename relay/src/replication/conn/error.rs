//! Errors of the replication connection, split into transient (reconnect with backoff and resume
//! from the last checkpoint) and definite (an operator must act: wrong password, slot missing or
//! held by another process, bad configuration).

use std::fmt;
use std::io;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// SQLSTATEs worth naming: the ones [`ReplicationError::is_transient`] decides on and the ones
/// callers of this module match on.
pub mod sqlstate {
    /// `admin_shutdown`: the server is shutting down or an administrator terminated the backend.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `crash_shutdown`: another backend crashed and the server is restarting.
    pub const CRASH_SHUTDOWN: &str = "57P02";
    /// `cannot_connect_now`: the server is starting up or in recovery.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `too_many_connections`, including "all replication slots / WAL senders are in use".
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `invalid_password`: wrong password (or the role has none).
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `invalid_authorization_specification`: no pg_hba.conf entry, role may not log in.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `undefined_object`: e.g. the replication slot does not exist.
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// `duplicate_object`: e.g. the replication slot already exists.
    pub const DUPLICATE_OBJECT: &str = "42710";
    /// `object_in_use`: e.g. "replication slot ... is active for PID ...".
    pub const OBJECT_IN_USE: &str = "55006";
}

/// An `ErrorResponse` (or `NoticeResponse`) from the server, with the fields an operator needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbError {
    /// Non-localized severity (`ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`, ...).
    pub severity: String,
    /// The SQLSTATE code, e.g. `55006`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl DbError {
    /// Reads the fields of an `ErrorResponse`/`NoticeResponse` body. The non-localized severity
    /// (`V`, sent since 9.6) wins over the localized one (`S`) so that matching on it works
    /// whatever `lc_messages` the server runs with.
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> io::Result<DbError> {
        let mut severity = None;
        let mut localized_severity = None;
        let mut code = None;
        let mut message = None;
        let mut detail = None;
        let mut hint = None;
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => severity = Some(value),
                b'S' => localized_severity = Some(value),
                b'C' => code = Some(value),
                b'M' => message = Some(value),
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        Ok(DbError {
            severity: severity.or(localized_severity).unwrap_or_default(),
            code: code.unwrap_or_default(),
            message: message.unwrap_or_default(),
            detail,
            hint,
        })
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {}

/// Everything that can go wrong on a replication connection.
///
/// Decide what to do with [`ReplicationError::is_transient`]: transient errors mean "reconnect
/// with backoff and resume from the last checkpoint"; everything else needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed (refused, reset, timed out, ...).
    #[error("I/O error on the replication connection: {0}")]
    Io(#[from] io::Error),

    /// TLS could not be set up: the server refused TLS under `sslmode=require`/`verify-full`,
    /// the certificate did not verify, or the root certificate file is unusable.
    #[error("TLS: {0}")]
    Tls(String),

    /// The server sent something this client does not expect at this point, or a frame that is
    /// malformed (a bad length, a truncated body). `offset` is the position of the offending
    /// message in the bytes received on this connection, where known.
    #[error("protocol violation: {what}{}", offset.map(|o| format!(" (at byte {o} of the input)")).unwrap_or_default())]
    Protocol { what: String, offset: Option<u64> },

    /// Authentication failed: a method this client does not implement, a missing password, a
    /// server signature that does not verify, or the server's verdict (`28P01` wrong password,
    /// `28000` no pg_hba.conf entry), which is kept in `server`.
    #[error("authentication failed: {what}{}", server.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Auth {
        what: String,
        server: Option<Box<DbError>>,
    },

    /// The server reported an error (`ErrorResponse`); see [`DbError::code`] for the SQLSTATE.
    #[error("server error: {0}")]
    Server(Box<DbError>),

    /// The connection ended when the protocol says it may not. `mid_frame` tells an EOF inside
    /// a message (bytes of an incomplete frame were buffered) from one between messages.
    #[error("the server closed the connection unexpectedly ({})", if *mid_frame { "in the middle of a message" } else { "between messages" })]
    UnexpectedEof { mid_frame: bool },

    /// The configuration is unusable (malformed URL, invalid slot name, bad option value).
    #[error("invalid replication configuration: {0}")]
    Config(String),
}

impl From<DbError> for ReplicationError {
    fn from(e: DbError) -> Self {
        ReplicationError::Server(Box::new(e))
    }
}

impl ReplicationError {
    pub(crate) fn protocol(what: impl Into<String>, offset: Option<u64>) -> ReplicationError {
        ReplicationError::Protocol {
            what: what.into(),
            offset,
        }
    }

    /// True when reconnecting with backoff can succeed without anyone acting: the connection was
    /// refused, reset or timed out, the server closed it, shut down (`57P01`, `57P02`) or is not
    /// accepting connections yet (`57P03`), or all connection/WAL sender slots were taken
    /// (`53300`).
    ///
    /// Everything else is definite and the list is deliberately short: a wrong password, a
    /// missing slot (`42704`), a slot in use by another process (`55006`), a protocol violation
    /// or a bad configuration will fail the same way again, so retrying them blindly would only
    /// hide the problem. (A caller that knows the other holder of a slot is its own previous
    /// incarnation, whose walsender the server has not reaped yet, may retry `55006` itself.)
    pub fn is_transient(&self) -> bool {
        match self {
            // Every socket error is a network condition that may pass (refused, reset, host or
            // network unreachable, a DNS lookup that failed: the resolver's errors carry no
            // kind of their own), except the few that say the request itself is wrong.
            ReplicationError::Io(e) => !matches!(
                e.kind(),
                io::ErrorKind::PermissionDenied
                    | io::ErrorKind::InvalidInput
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::Unsupported
                    | io::ErrorKind::AddrNotAvailable
            ),
            ReplicationError::UnexpectedEof { .. } => true,
            ReplicationError::Server(e) => matches!(
                e.code.as_str(),
                sqlstate::ADMIN_SHUTDOWN
                    | sqlstate::CRASH_SHUTDOWN
                    | sqlstate::CANNOT_CONNECT_NOW
                    | sqlstate::TOO_MANY_CONNECTIONS
            ),
            ReplicationError::Tls(_)
            | ReplicationError::Protocol { .. }
            | ReplicationError::Auth { .. }
            | ReplicationError::Config(_) => false,
        }
    }

    /// The SQLSTATE of a server-reported error (including an authentication failure), if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            ReplicationError::Auth {
                server: Some(e), ..
            } => Some(&e.code),
            _ => None,
        }
    }

    /// The server's error, if the server reported one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            ReplicationError::Server(e) => Some(e),
            ReplicationError::Auth { server, .. } => server.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(Box::new(DbError {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        }))
    }

    #[test]
    fn transient_versus_definite() {
        assert!(ReplicationError::Io(io::ErrorKind::ConnectionRefused.into()).is_transient());
        assert!(ReplicationError::Io(io::ErrorKind::ConnectionReset.into()).is_transient());
        assert!(ReplicationError::Io(io::ErrorKind::HostUnreachable.into()).is_transient());
        assert!(ReplicationError::Io(io::ErrorKind::NetworkUnreachable.into()).is_transient());
        // What tokio's resolver returns for a name that does not resolve (no kind of its own).
        let dns =
            io::Error::other("failed to lookup address information: Name or service not known");
        assert!(ReplicationError::Io(dns).is_transient());
        assert!(!ReplicationError::Io(io::ErrorKind::PermissionDenied.into()).is_transient());
        assert!(ReplicationError::UnexpectedEof { mid_frame: true }.is_transient());
        assert!(server(sqlstate::ADMIN_SHUTDOWN).is_transient());
        assert!(server(sqlstate::CANNOT_CONNECT_NOW).is_transient());

        assert!(!server(sqlstate::UNDEFINED_OBJECT).is_transient());
        assert!(!server(sqlstate::OBJECT_IN_USE).is_transient());
        assert!(!ReplicationError::Auth {
            what: "x".into(),
            server: None
        }
        .is_transient());
        assert!(!ReplicationError::Config("x".into()).is_transient());
        assert!(!ReplicationError::protocol("x", Some(3)).is_transient());
        assert!(!ReplicationError::Io(io::ErrorKind::PermissionDenied.into()).is_transient());
    }

    #[test]
    fn display_carries_sqlstate_detail_and_hint() {
        let e = ReplicationError::Server(Box::new(DbError {
            severity: "ERROR".into(),
            code: "55006".into(),
            message: "replication slot \"s\" is active for PID 42".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        }));
        assert_eq!(
            e.to_string(),
            "server error: ERROR: replication slot \"s\" is active for PID 42 (SQLSTATE 55006); \
             detail: d; hint: h"
        );
        assert_eq!(e.sqlstate(), Some("55006"));
    }
}
