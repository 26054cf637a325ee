//! Plain SQL connections (migrations, and the SQL the relays run outside the replication
//! protocol) with the replication connection's settings: the same [`ReplicationConfig`], the
//! same socket and TLS code ([`super::tls`]), so `sslmode`, `sslrootcert` and the timeout mean
//! exactly the same on both, and a URL that validates is one that connects.
//!
//! tokio-postgres speaks the SQL protocol (extended queries, typed rows); it gets a socket that
//! is already encrypted as the configuration says and does no TLS negotiation of its own.

use std::io;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::NoTls;

use super::config::ReplicationConfig;
use super::error::{DbError, ReplicationError};
use super::tls;

/// Opens a SQL (non-replication) connection as `cfg` says: TLS as `cfg.sslmode` says (with
/// libpq's `prefer` fallback), the password, `application_name`, all within
/// `cfg.connect_timeout`. The connection's I/O runs on a task of its own until the client is
/// dropped.
///
/// Errors are [`ReplicationError`]s, classified alike: a refused login is `Auth` (SQLSTATE class
/// 28), another server error `Server`, a socket failure `Io`.
pub async fn connect_sql(
    cfg: &ReplicationConfig,
) -> Result<tokio_postgres::Client, ReplicationError> {
    tls::establish(cfg, |cfg, encrypted| {
        Box::pin(attempt(cfg, encrypted, None))
    })
    .await
}

/// Like [`connect_sql`], and every notification the connection receives (after a `LISTEN`) is
/// a wake-up on the returned receiver; at most one is pending, as a wake-up needs no more.
pub async fn connect_sql_listening(
    cfg: &ReplicationConfig,
) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::Receiver<()>), ReplicationError> {
    let (wake_tx, wake) = tokio::sync::mpsc::channel(1);
    let client = tls::establish(cfg, |cfg, encrypted| {
        Box::pin(attempt(cfg, encrypted, Some(wake_tx.clone())))
    })
    .await?;
    Ok((client, wake))
}

async fn attempt(
    cfg: &ReplicationConfig,
    encrypted: &mut bool,
    wake: Option<tokio::sync::mpsc::Sender<()>>,
) -> Result<tokio_postgres::Client, ReplicationError> {
    let socket = tls::open(cfg, encrypted).await?;
    let mut pg = tokio_postgres::Config::new();
    pg.user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name)
        // The socket is encrypted already (or deliberately not): no second negotiation.
        .ssl_mode(PgSslMode::Disable);
    if let Some(password) = &cfg.password {
        pg.password(password);
    }
    let (client, mut connection) = pg.connect_raw(socket, NoTls).await.map_err(from_pg)?;
    tokio::spawn(async move {
        let Some(wake) = wake else {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "SQL connection ended");
            }
            return;
        };
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    let _ = wake.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "SQL connection ended");
                    break;
                }
            }
        }
    });
    Ok(client)
}

/// A tokio-postgres error as the replication client would have reported it.
pub(crate) fn from_pg(e: tokio_postgres::Error) -> ReplicationError {
    if let Some(db) = e.as_db_error() {
        let db = DbError {
            severity: db
                .parsed_severity()
                .map_or_else(|| db.severity().to_owned(), |s| s.to_string()),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        };
        return if db.code.starts_with("28") {
            ReplicationError::Auth {
                what: "the server rejected the login".into(),
                server: Some(Box::new(db)),
            }
        } else {
            ReplicationError::Server(Box::new(db))
        };
    }
    let io_kind = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    match io_kind {
        Some(kind) => ReplicationError::Io(io::Error::new(kind, e.to_string())),
        // tokio-postgres's own message when the server asks for a password and none is set.
        None if e.to_string().contains("password missing") => ReplicationError::Auth {
            what: "the server asks for a password and none is configured".into(),
            server: None,
        },
        None if e.is_closed() => ReplicationError::UnexpectedEof { mid_frame: false },
        None => ReplicationError::protocol(e.to_string(), None),
    }
}
