//! The streaming-replication protocol client: a `replication=database` connection that runs
//! replication commands and then streams a logical slot in CopyBoth mode.
//!
//! No released `tokio-postgres` or `sqlx` can open such a connection or speak CopyBoth, so this
//! module speaks the protocol itself over a `TcpStream` (optionally TLS) or a `UnixStream`.
//! `postgres_protocol` writes the frontend messages and parses the backend messages it knows;
//! `conn/frame.rs` splits frames (checked lengths, no panics) and decodes what it does not know:
//! CopyBothResponse and the replication payloads inside CopyData. Payloads are delivered raw;
//! decoding pgoutput is `pgoutput.rs`'s job.
//!
//! # The exchange
//!
//! ```text
//!  client                                              server (walsender)
//!    │ [SSLRequest] ───────────────────────────────────▶ │
//!    │ ◀─────────────────────────────────────── 'S' | 'N' │  then the TLS handshake on 'S'
//!    │ StartupMessage(user, database, replication=database) ▶
//!    │ ◀──── Authentication* (cleartext | MD5 | SASL SCRAM-SHA-256) ⇄ password / SASL responses
//!    │ ◀──────── AuthenticationOk, ParameterStatus*, BackendKeyData, ReadyForQuery
//!    │ Query "IDENTIFY_SYSTEM" / "CREATE_REPLICATION_SLOT ..." / SQL ─▶ │
//!    │ ◀────────── RowDescription, DataRow*, CommandComplete, ReadyForQuery
//!    │ Query "START_REPLICATION SLOT s LOGICAL 0/0 (...)" ─────────▶ │
//!    │ ◀──────────────────────────────── CopyBothResponse 'W'        │  ReplicationStream
//!    │ ◀── CopyData('w' XLogData: start, end, time, pgoutput bytes)  │  next() → XLogData
//!    │ ◀── CopyData('k' keepalive: wal_end, time, reply_requested)   │  next() → Keepalive
//!    │ CopyData('r' status: write, flush, apply, time, reply) ─────▶ │  send_status_update()
//!    │ CopyDone ───────────────────────────────────────────────────▶ │  finish()
//!    │ ◀──── [CopyData...], CopyDone, CommandComplete, ReadyForQuery
//!    │ Terminate ──────────────────────────────────────────────────▶ │
//! ```
//!
//! # Which positions the caller reports, and why
//!
//! The standby status update's `flush` position tells Postgres "everything before this is
//! safe downstream": the slot's `confirmed_flush_lsn` moves to it, WAL before it may be
//! recycled, and on the next `START_REPLICATION` the server skips every transaction whose commit
//! record lies before it. So this client never confirms anything on its own, not even in answer
//! to a keepalive; the caller passes the positions, and they must obey:
//!
//! - **Confirm a transaction's end LSN, and only after downstream durability.** The end LSN is
//!   the `end_lsn` of pgoutput's Commit message (the position just past the commit record). The
//!   commit LSN itself is too early: confirming it makes Postgres replay that last transaction
//!   after a restart. And it may be confirmed only once the Kafka transaction carrying the
//!   events (and the checkpoint) has committed; confirming earlier loses the events if the
//!   relay dies in between.
//! - **Never confirm a keepalive's `wal_end` while a transaction is open or unacknowledged.**
//!   `wal_end` is the server's current WAL end, which may lie past the commit of a transaction
//!   that is still being received, or received but not yet committed to Kafka; confirming it
//!   silently drops that transaction on the next restart. When no transaction is open or
//!   pending, confirming `wal_end` is safe and keeps an idle slot from retaining WAL.
//! - `XLogData::wal_end` is likewise the server's WAL end, not the message's end: never a
//!   position to confirm by itself.
//! - Answer every keepalive with `reply_requested` promptly (re-sending the last safe position is
//!   fine), or the server drops the connection after `wal_sender_timeout`.
//!
//! The confirmed position is persisted only at checkpoints and can move back after a server
//! crash, so the caller must also drop by LSN what it already delivered.
//!
//! See the [streaming replication protocol](https://www.postgresql.org/docs/15/protocol-replication.html)
//! and [logical decoding](https://www.postgresql.org/docs/15/logicaldecoding-explanation.html).

mod config;
mod error;
mod frame;
mod sql;
mod tls;

use std::collections::HashMap;
use std::fmt;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use config::{ReplicationConfig, SslMode};
pub use error::{sqlstate, DbError, ReplicationError};
pub use frame::{pg_now_micros, ReplicationMessage, MAX_MESSAGE_LEN};
pub use sql::{connect_sql, connect_sql_listening};
pub use tls::check_tls_settings;

use frame::{Frame, FrameReader, StreamEvent, COPY_BOTH_RESPONSE_TAG};

use crate::replication::Lsn;

/// Anything the protocol can run over: TCP, TLS over TCP, a Unix socket.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// The socket with its receive buffer (all partial input) and its send buffer.
struct Connection {
    socket: Box<dyn Socket>,
    reader: FrameReader,
    wbuf: BytesMut,
}

impl Connection {
    fn new(socket: Box<dyn Socket>) -> Connection {
        Connection {
            socket,
            reader: FrameReader::new(),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Reads more bytes into the receive buffer. Cancellation safe: `read_buf` either appends
    /// to the buffer or does nothing.
    async fn fill(&mut self) -> Result<(), ReplicationError> {
        let n = self.socket.read_buf(self.reader.buffer_mut()).await?;
        if n == 0 {
            return Err(ReplicationError::UnexpectedEof {
                mid_frame: self.reader.buffered() > 0,
            });
        }
        Ok(())
    }

    /// The next complete frame. Cancellation safe (see [`Connection::fill`]).
    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.reader.next_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// The next message outside CopyBoth, with notices logged and skipped. Cancellation safe
    /// like [`Connection::read_frame`], though the callers are not.
    async fn read_message(&mut self) -> Result<Incoming, ReplicationError> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'E' => return Ok(Incoming::Error(frame.into_db_error()?)),
                b'N' => log_notice(&frame.into_db_error()?),
                COPY_BOTH_RESPONSE_TAG => return Ok(Incoming::CopyBothResponse(frame)),
                _ => {
                    let offset = frame.offset;
                    return Ok(Incoming::Message(frame.parse()?, offset));
                }
            }
        }
    }

    /// Writes out the send buffer. If cancelled, what was not written stays in the buffer and
    /// goes out first on the next call, so messages never interleave.
    async fn send(&mut self) -> Result<(), ReplicationError> {
        while !self.wbuf.is_empty() {
            let n = self.socket.write_buf(&mut self.wbuf).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
        }
        self.socket.flush().await?;
        Ok(())
    }

    /// Sends Terminate and closes the socket, ignoring errors: the server may be gone already.
    async fn terminate(&mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.send().await;
        let _ = self.socket.shutdown().await;
    }
}

/// A message received outside CopyBoth.
enum Incoming {
    Error(DbError),
    /// Kept as a frame: `postgres_protocol` cannot parse it.
    CopyBothResponse(Frame),
    /// A message and its offset in the input.
    Message(Message, u64),
}

impl Incoming {
    /// The message, when the caller expects neither an error nor CopyBoth at this point.
    fn into_message(self, during: &str) -> Result<(Message, u64), ReplicationError> {
        match self {
            Incoming::Message(message, offset) => Ok((message, offset)),
            Incoming::Error(e) => Err(e.into()),
            Incoming::CopyBothResponse(frame) => Err(ReplicationError::protocol(
                format!("unexpected CopyBothResponse {during}"),
                Some(frame.offset),
            )),
        }
    }
}

/// A message that has no place at this point of the protocol.
fn unexpected(message: &Message, during: &str, offset: u64) -> ReplicationError {
    ReplicationError::protocol(
        format!("unexpected {} {during}", frame::message_name(message)),
        Some(offset),
    )
}

/// The result of `IDENTIFY_SYSTEM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's `system_identifier`: a checkpoint from another cluster must not be used.
    pub system_id: u64,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database of a `replication=database` connection.
    pub dbname: Option<String>,
}

/// The result of `TIMELINE_HISTORY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineHistoryFile {
    /// The file's name, e.g. `00000002.history`.
    pub filename: String,
    /// The file's bytes.
    pub content: Vec<u8>,
}

/// What `CREATE_REPLICATION_SLOT` does with the snapshot of the slot's consistent point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it: the returned name can be imported with `SET TRANSACTION SNAPSHOT` by other
    /// sessions (to read the data the slot will not stream, e.g. for a backfill) until this
    /// connection runs its next command or closes.
    Export,
    /// No snapshot.
    NoExport,
    /// Use it in this connection's current transaction (which must have been started with
    /// `BEGIN ISOLATION LEVEL REPEATABLE READ` as its first command).
    Use,
}

/// The result of `CREATE_REPLICATION_SLOT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// Streaming from the slot starts with the transactions committing after this position.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// pgoutput options of `START_REPLICATION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartOptions {
    /// pgoutput protocol version: 1, or 2 for streamed in-progress transactions (PG14+).
    pub proto_version: u32,
    /// Publications to stream, at least one.
    pub publication_names: Vec<String>,
    /// Also stream `pg_logical_emit_message` messages.
    pub messages: bool,
    /// Stream large in-progress transactions (needs `proto_version >= 2`).
    pub streaming: bool,
    /// Send column values in binary rather than text.
    pub binary: bool,
}

impl StartOptions {
    /// Version 1, the given publications, with logical messages (the relay's WAL-only events).
    pub fn new(publication_names: Vec<String>) -> StartOptions {
        StartOptions {
            proto_version: 1,
            publication_names,
            messages: true,
            streaming: false,
            binary: false,
        }
    }
}

/// The cancel key of the server process serving this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKeyData {
    pub process_id: i32,
    pub secret_key: i32,
}

/// A `replication=database` connection, ready for replication commands and SQL.
///
/// Methods other than `connect` are not cancellation safe: a query abandoned halfway leaves its
/// answer unread, so drop the client if one is cancelled.
pub struct ReplicationClient {
    conn: Connection,
    parameters: HashMap<String, String>,
    backend_key: Option<BackendKeyData>,
    tls: bool,
}

impl fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("server_version", &self.parameter("server_version"))
            .field("backend_pid", &self.backend_key.map(|k| k.process_id))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Connects, negotiates TLS as `cfg.sslmode` says, authenticates (trust, cleartext, MD5 or
    /// SCRAM-SHA-256) and waits for the server to be ready. The whole set-up is bounded by
    /// `cfg.connect_timeout` (a timeout is an `Io` error of kind `TimedOut`, transient).
    ///
    /// Under `sslmode=prefer` a connection that fails once encrypted is retried without TLS,
    /// as libpq does (see [`SslMode::Prefer`]).
    pub async fn connect(cfg: &ReplicationConfig) -> Result<ReplicationClient, ReplicationError> {
        Self::connect_as(cfg, true).await
    }

    /// Like [`ReplicationClient::connect`], but an ordinary session (no `replication=database`):
    /// SQL only, no replication commands. It takes no walsender slot (`max_wal_senders`), so a
    /// monitor on it keeps working when every walsender is taken or the relay cannot stream.
    pub async fn connect_ordinary(
        cfg: &ReplicationConfig,
    ) -> Result<ReplicationClient, ReplicationError> {
        Self::connect_as(cfg, false).await
    }

    async fn connect_as(
        cfg: &ReplicationConfig,
        replication: bool,
    ) -> Result<ReplicationClient, ReplicationError> {
        tls::establish(cfg, |cfg, encrypted| {
            Box::pin(Self::connect_inner(cfg, replication, encrypted))
        })
        .await
    }

    /// One connection attempt; `encrypted` is set once TLS is agreed on.
    async fn connect_inner(
        cfg: &ReplicationConfig,
        replication: bool,
        encrypted: &mut bool,
    ) -> Result<ReplicationClient, ReplicationError> {
        let socket = tls::open(cfg, encrypted).await?;
        let tls = *encrypted;
        let mut client = ReplicationClient {
            conn: Connection::new(socket),
            parameters: HashMap::new(),
            backend_key: None,
            tls,
        };

        let mut params = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("application_name", cfg.application_name.as_str()),
            // Text results are decoded as UTF-8.
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params, &mut client.conn.wbuf)?;
        client.conn.send().await?;
        client.authenticate(cfg).await?;
        client.wait_until_ready().await?;
        tracing::debug!(
            host = %cfg.host,
            port = cfg.port,
            user = %cfg.user,
            dbname = %cfg.dbname,
            tls,
            server_version = client.parameter("server_version").unwrap_or("?"),
            "replication connection established"
        );
        Ok(client)
    }

    async fn authenticate(&mut self, cfg: &ReplicationConfig) -> Result<(), ReplicationError> {
        let password = || {
            cfg.password
                .as_deref()
                .ok_or_else(|| ReplicationError::Auth {
                    what: "the server asks for a password and none is configured".into(),
                    server: None,
                })
        };
        let scram_failed = |e: std::io::Error| ReplicationError::Auth {
            what: format!("SCRAM: {e}"),
            server: None,
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (message, offset) = match self.conn.read_message().await? {
                // Class 28 is "invalid authorization specification": wrong password, no
                // pg_hba.conf entry. Other errors (database missing, too many connections)
                // are not about the credentials.
                Incoming::Error(e) if e.code.starts_with("28") => {
                    return Err(ReplicationError::Auth {
                        what: "the server rejected the login".into(),
                        server: Some(Box::new(e)),
                    })
                }
                other => other.into_message("during authentication")?,
            };
            match message {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.conn.wbuf)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.conn.wbuf)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = Vec::new();
                    while let Some(mechanism) = mechanisms.next().map_err(|e| {
                        ReplicationError::protocol(
                            format!("malformed SASL mechanism list: {e}"),
                            Some(offset),
                        )
                    })? {
                        offered.push(mechanism.to_owned());
                    }
                    // Plain SCRAM-SHA-256 even when -PLUS is offered over TLS: the GS2 header
                    // "n" (client does not support channel binding) is what makes the server
                    // accept that choice; "y" would make it suspect a downgrade and refuse.
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::Auth {
                            what: format!("no supported SASL mechanism among {offered:?}"),
                            server: None,
                        });
                    }
                    let exchange =
                        ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        exchange.message(),
                        &mut self.conn.wbuf,
                    )?;
                    scram = Some(exchange);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let exchange = scram.as_mut().ok_or_else(|| {
                        ReplicationError::protocol(
                            "SASL continue without a SASL exchange",
                            Some(offset),
                        )
                    })?;
                    exchange.update(body.data()).map_err(scram_failed)?;
                    frontend::sasl_response(exchange.message(), &mut self.conn.wbuf)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let exchange = scram.as_mut().ok_or_else(|| {
                        ReplicationError::protocol(
                            "SASL final without a SASL exchange",
                            Some(offset),
                        )
                    })?;
                    // Verifies the server's signature: proof that the server knows the password
                    // too, not merely accepts anything.
                    exchange.finish(body.data()).map_err(scram_failed)?;
                    continue;
                }
                Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationSspi => {
                    return Err(ReplicationError::Auth {
                        what: "the server asks for GSSAPI/SSPI/Kerberos/SCM authentication, which this client \
                               does not implement; use scram-sha-256, md5, password or trust in pg_hba.conf"
                            .into(),
                        server: None,
                    });
                }
                other => return Err(unexpected(&other, "during authentication", offset)),
            }
            self.conn.send().await?;
        }
    }

    /// After AuthenticationOk: ParameterStatus and BackendKeyData until ReadyForQuery.
    async fn wait_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            let (message, offset) = self
                .conn
                .read_message()
                .await?
                .into_message("at start-up")?;
            match message {
                Message::ParameterStatus(body) => self.record_parameter(&body, offset)?,
                Message::BackendKeyData(body) => {
                    self.backend_key = Some(BackendKeyData {
                        process_id: body.process_id(),
                        secret_key: body.secret_key(),
                    });
                }
                Message::ReadyForQuery(_) => return Ok(()),
                other => return Err(unexpected(&other, "before ReadyForQuery", offset)),
            }
        }
    }

    fn record_parameter(
        &mut self,
        body: &postgres_protocol::message::backend::ParameterStatusBody,
        offset: u64,
    ) -> Result<(), ReplicationError> {
        let malformed =
            |e| ReplicationError::protocol(format!("malformed ParameterStatus: {e}"), Some(offset));
        let name = body.name().map_err(malformed)?.to_owned();
        let value = body.value().map_err(malformed)?.to_owned();
        self.parameters.insert(name, value);
        Ok(())
    }

    /// A parameter the server reported (`server_version`, `server_encoding`, `TimeZone`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The server version string, e.g. `15.8 (Debian 15.8-1)`.
    pub fn server_version(&self) -> Option<&str> {
        self.parameter("server_version")
    }

    /// The cancel key (process id and secret) of the server process serving this connection.
    pub fn backend_key(&self) -> Option<BackendKeyData> {
        self.backend_key
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Runs `sql` with the simple query protocol and returns the rows of all its result sets as
    /// text values (`None` for NULL). Works for replication commands and, on a
    /// `replication=database` connection, for SQL such as `SHOW wal_level` or a `SELECT`.
    ///
    /// An error from the server is returned after the server is ready again, so the client
    /// stays usable. Not cancellation safe (see [`ReplicationClient`]).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.query_rows(sql, data_row_text).await
    }

    /// [`simple_query`](Self::simple_query) with each row converted by `row`.
    async fn query_rows<T>(
        &mut self,
        sql: &str,
        row: fn(&DataRowBody, u64) -> Result<T, ReplicationError>,
    ) -> Result<Vec<T>, ReplicationError> {
        frontend::query(sql, &mut self.conn.wbuf)?;
        self.conn.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (message, offset) = match self.conn.read_message().await? {
                Incoming::Error(e) => {
                    error = Some(e);
                    continue;
                }
                other => {
                    other.into_message("in answer to a simple query (use start_replication)")?
                }
            };
            match message {
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                Message::DataRow(body) => rows.push(row(&body, offset)?),
                Message::ParameterStatus(body) => self.record_parameter(&body, offset)?,
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    }
                }
                other => return Err(unexpected(&other, "in answer to a simple query", offset)),
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the cluster's identity, timeline and current WAL position.
    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&rows, 4, "IDENTIFY_SYSTEM")?;
        let system_id = required(row, 0, "IDENTIFY_SYSTEM systemid")?;
        let timeline = required(row, 1, "IDENTIFY_SYSTEM timeline")?;
        let xlogpos = required(row, 2, "IDENTIFY_SYSTEM xlogpos")?;
        Ok(IdentifySystem {
            system_id: system_id
                .parse()
                .map_err(|_| bad_value("IDENTIFY_SYSTEM systemid", system_id))?,
            timeline: timeline
                .parse()
                .map_err(|_| bad_value("IDENTIFY_SYSTEM timeline", timeline))?,
            xlogpos: xlogpos
                .parse()
                .map_err(|_| bad_value("IDENTIFY_SYSTEM xlogpos", xlogpos))?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// `TIMELINE_HISTORY tli`: the history file of timeline `tli`, which lists its ancestor
    /// timelines and where each ended (parse it with
    /// [`TimelineHistory::parse`](super::timeline::TimelineHistory::parse)). Timeline 1 has no
    /// history: asking for it is a `Server` error (`58P01`, file not found).
    ///
    /// The server sends the file's bytes as they are (the column is `bytea` in text format, but
    /// not escaped), so the content is returned as bytes: its free-text reasons need not be UTF-8.
    pub async fn timeline_history(
        &mut self,
        timeline: u32,
    ) -> Result<TimelineHistoryFile, ReplicationError> {
        let rows = self
            .query_rows(&format!("TIMELINE_HISTORY {timeline}"), data_row_bytes)
            .await?;
        let [row] = rows.as_slice() else {
            return Err(ReplicationError::protocol(
                format!(
                    "TIMELINE_HISTORY returned {} rows, expected one",
                    rows.len()
                ),
                None,
            ));
        };
        let cell = |i: usize, what: &str| {
            row.get(i).cloned().flatten().ok_or_else(|| {
                ReplicationError::protocol(format!("TIMELINE_HISTORY {what} is NULL"), None)
            })
        };
        let filename = String::from_utf8(cell(0, "filename")?).map_err(|_| {
            ReplicationError::protocol("TIMELINE_HISTORY filename is not UTF-8", None)
        })?;
        Ok(TimelineHistoryFile {
            filename,
            content: cell(1, "content")?,
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL plugin (SNAPSHOT '...')` (PG15 syntax).
    ///
    /// A temporary slot disappears when this connection closes. With
    /// [`SnapshotAction::Export`] the snapshot stays importable only until this connection runs
    /// its next command, so import it (and finish reading with it) before calling anything else.
    /// An existing slot of that name gives a `Server` error with SQLSTATE `42710`.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        plugin: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ReplicationError> {
        validate_slot_name(name)?;
        let snapshot = match snapshot {
            SnapshotAction::Export => "export",
            SnapshotAction::NoExport => "nothing",
            SnapshotAction::Use => "use",
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL {} (SNAPSHOT '{snapshot}')",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            quote_ident(plugin),
        );
        let rows = self.simple_query(&sql).await?;
        let row = single_row(&rows, 4, "CREATE_REPLICATION_SLOT")?;
        let point = required(row, 1, "CREATE_REPLICATION_SLOT consistent_point")?;
        Ok(CreatedSlot {
            slot_name: required(row, 0, "CREATE_REPLICATION_SLOT slot_name")?.to_owned(),
            consistent_point: point
                .parse()
                .map_err(|_| bad_value("consistent_point", point))?,
            snapshot_name: row.get(2).cloned().flatten(),
            output_plugin: required(row, 3, "CREATE_REPLICATION_SLOT output_plugin")?.to_owned(),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`. Without `wait`, a slot in use by another connection
    /// is an error (`55006`); with it, the command waits until the slot is released. A missing
    /// slot is `42704`.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        validate_slot_name(name)?;
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(drop)
    }

    /// `START_REPLICATION SLOT slot LOGICAL start_lsn (pgoutput options)`: switches the
    /// connection into CopyBoth mode and returns the stream.
    ///
    /// `start_lsn` is where the relay's checkpoint says to resume; the server starts at the
    /// later of it and the slot's `confirmed_flush_lsn` (and still sends whole transactions from
    /// their beginning), so the caller drops transactions it already delivered by their LSN.
    /// A slot held by another connection gives a `Server` error `55006`, a missing one `42704`.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start_lsn: Lsn,
        options: StartOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        validate_slot_name(slot)?;
        if options.publication_names.is_empty() {
            return Err(ReplicationError::Config(
                "START_REPLICATION needs at least one publication".into(),
            ));
        }
        if options.streaming && options.proto_version < 2 {
            return Err(ReplicationError::Config(
                "streaming needs proto_version 2 or later".into(),
            ));
        }
        let publications = options
            .publication_names
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start_lsn} (\"proto_version\" '{}', \"publication_names\" {}",
            quote_ident(slot),
            options.proto_version,
            quote_literal(&publications),
        );
        // Options only when on, so that a server without them (before 14) accepts the defaults.
        for (name, on) in [
            ("messages", options.messages),
            ("streaming", options.streaming),
            ("binary", options.binary),
        ] {
            if on {
                sql.push_str(&format!(", \"{name}\" 'true'"));
            }
        }
        sql.push(')');

        frontend::query(&sql, &mut self.conn.wbuf)?;
        self.conn.send().await?;
        loop {
            let (message, offset) = match self.conn.read_message().await? {
                Incoming::CopyBothResponse(frame) => {
                    let offset = frame.offset;
                    frame::check_copy_both_response(&frame.into_body(), offset)?;
                    tracing::debug!(slot, lsn = %start_lsn, "replication streaming started");
                    return Ok(ReplicationStream {
                        conn: self.conn,
                        ended: false,
                        command_complete: false,
                    });
                }
                other => other.into_message("in answer to START_REPLICATION")?,
            };
            match message {
                Message::ParameterStatus(body) => self.record_parameter(&body, offset)?,
                other => return Err(unexpected(&other, "in answer to START_REPLICATION", offset)),
            }
        }
    }

    /// Sends Terminate and closes the connection (dropping the client closes it too, less
    /// politely: the server logs an unexpected EOF).
    pub async fn close(mut self) {
        self.conn.terminate().await;
    }
}

/// A logical replication stream in CopyBoth mode, from [`ReplicationClient::start_replication`].
///
/// A typical loop answers keepalives with the positions the caller knows are safe (see the
/// module docs for which ones); the stream never replies on its own:
///
/// ```no_run
/// # use relay::replication::{Lsn, conn::{ReplicationStream, ReplicationMessage, ReplicationError}};
/// # fn handle(_: bytes::Bytes) -> (bool, Option<Lsn>) { (false, None) }
/// # async fn run(mut stream: ReplicationStream) -> Result<(), ReplicationError> {
/// // The end LSN of the last transaction whose Kafka commit succeeded.
/// let mut durable = Lsn::INVALID;
/// // Whether a transaction is being received or waits for its Kafka commit.
/// let mut in_flight = false;
/// let mut status_interval = tokio::time::interval(std::time::Duration::from_secs(10));
/// loop {
///     tokio::select! {
///         // `next` is cancellation safe, so losing the race to the timer loses no data.
///         message = stream.next() => match message? {
///             Some(ReplicationMessage::XLogData { data, .. }) => {
///                 // Decode pgoutput and publish; `handle` says whether a transaction is open or
///                 // awaits its Kafka commit, and returns the Commit end LSN of a transaction
///                 // whose Kafka commit succeeded.
///                 let (open, committed) = handle(data);
///                 in_flight = open;
///                 if let Some(end_lsn) = committed {
///                     durable = end_lsn;
///                 }
///             }
///             Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
///                 // Idle: the server's WAL end holds nothing for us, confirming it lets the slot
///                 // advance. Busy: only what is durable in Kafka.
///                 if !in_flight && wal_end > durable {
///                     durable = wal_end;
///                 }
///                 if reply_requested {
///                     stream.send_status_update(durable, durable, durable, false).await?;
///                 }
///             }
///             None => break,
///         },
///         _ = status_interval.tick() => {
///             stream.send_status_update(durable, durable, durable, false).await?;
///         }
///     }
/// }
/// stream.finish().await
/// # }
/// ```
pub struct ReplicationStream {
    conn: Connection,
    /// The server ended the copy (CopyDone or CommandComplete seen): `next` returns `None`.
    ended: bool,
    /// The server completed START_REPLICATION; it may close the connection after that.
    command_complete: bool,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("bytes_received", &self.conn.reader.offset())
            .field("ended", &self.ended)
            .field("command_complete", &self.command_complete)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// The next XLogData or keepalive; `Ok(None)` once the server has ended the copy: with a
    /// CopyDone (sent first only when the server stops streaming on its own) or a
    /// CommandComplete (a walsender stopping for a server shutdown completes the command and
    /// exits). Then call [`ReplicationStream::finish`] to complete the exchange.
    ///
    /// **Cancellation safe**: it may be used as a branch of `tokio::select!`. All partial input
    /// is kept in the stream's own buffer, the only await is `read_buf` (which either appends to
    /// that buffer or does nothing), and a complete frame is decoded and returned without any
    /// further await, so a cancelled call loses no data and the next call resumes where it was.
    ///
    /// Errors: `Server` for an ErrorResponse (e.g. the slot was dropped, or the walsender was
    /// terminated: `57P01`, transient); `UnexpectedEof` when the connection closes while the
    /// copy is still running, with `mid_frame` telling a torn message from a close between
    /// messages; `Protocol` for malformed frames.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let Some(frame) = self.conn.reader.next_frame()? else {
                self.conn.fill().await?;
                continue;
            };
            let offset = frame.offset;
            match frame::decode_stream_frame(frame)? {
                StreamEvent::Message(message) => return Ok(Some(message)),
                StreamEvent::Error(e) => return Err(e.into()),
                StreamEvent::Notice(notice) => log_notice(&notice),
                StreamEvent::CopyDone => {
                    tracing::debug!(offset, "the server ended the replication copy");
                    self.ended = true;
                }
                StreamEvent::CommandComplete => {
                    self.command_complete = true;
                    self.ended = true;
                }
                StreamEvent::ReadyForQuery => self.ended = true,
                StreamEvent::Ignored => {}
            }
        }
    }

    /// Sends a standby status update: the positions written, flushed and applied downstream,
    /// the client clock, and whether the server should answer with a keepalive at once.
    ///
    /// The server takes `flush` as the slot's new `confirmed_flush_lsn`: pass only positions
    /// that are durable downstream (see the module docs). Nothing here confirms automatically.
    ///
    /// Cancellation: if cancelled, the unsent rest of the update stays queued and is written
    /// before the next update, so the byte stream is never corrupted; the cancelled update may
    /// still reach the server then.
    pub async fn send_status_update(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        frame::encode_status_update(
            write,
            flush,
            apply,
            pg_now_micros(),
            reply_requested,
            &mut self.conn.wbuf,
        );
        self.conn.send().await?;
        tracing::trace!(%write, %flush, %apply, "standby status update sent");
        Ok(())
    }

    /// Ends streaming cleanly: sends CopyDone, discards what the server still sends until its
    /// CopyDone, CommandComplete and ReadyForQuery, then sends Terminate. The slot becomes
    /// inactive once the server has processed this. Nothing received here is confirmed, so
    /// the caller loses nothing it has not already handled: those messages are streamed again
    /// next time. Send a last status update first if a newer position has become durable.
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(&mut self.conn.wbuf);
        let sent = self.conn.send().await;
        // After CommandComplete the server may be gone already; then there is nothing to end.
        if !self.command_complete {
            sent?;
        }
        loop {
            let frame = match self.conn.read_frame().await {
                Ok(frame) => frame,
                Err(ReplicationError::UnexpectedEof { mid_frame: false })
                    if self.command_complete =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            match frame::decode_stream_frame(frame)? {
                StreamEvent::ReadyForQuery => break,
                StreamEvent::CommandComplete => self.command_complete = true,
                StreamEvent::Error(e) => return Err(e.into()),
                StreamEvent::Notice(notice) => log_notice(&notice),
                StreamEvent::Message(_) | StreamEvent::CopyDone | StreamEvent::Ignored => {}
            }
        }
        self.conn.terminate().await;
        Ok(())
    }
}

fn log_notice(notice: &DbError) {
    tracing::info!(severity = %notice.severity, code = %notice.code, "postgres: {}", notice.message);
}

/// The text values of a DataRow (`None` for NULL).
fn data_row_text(body: &DataRowBody, offset: u64) -> Result<Vec<Option<String>>, ReplicationError> {
    data_row_bytes(body, offset)?
        .into_iter()
        .map(|v| {
            v.map(String::from_utf8).transpose().map_err(|_| {
                ReplicationError::protocol("malformed DataRow: value is not UTF-8", Some(offset))
            })
        })
        .collect()
}

/// The raw values of a DataRow (`None` for NULL).
fn data_row_bytes(
    body: &DataRowBody,
    offset: u64,
) -> Result<Vec<Option<Vec<u8>>>, ReplicationError> {
    let malformed = |what: String| {
        ReplicationError::protocol(format!("malformed DataRow: {what}"), Some(offset))
    };
    let mut values = Vec::new();
    let mut ranges = body.ranges();
    while let Some(range) = ranges.next().map_err(|e| malformed(e.to_string()))? {
        values.push(match range {
            None => None,
            Some(range) => Some(
                body.buffer()
                    .get(range)
                    .ok_or_else(|| malformed("value out of bounds".into()))?
                    .to_vec(),
            ),
        });
    }
    Ok(values)
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    columns: usize,
    command: &str,
) -> Result<&'a [Option<String>], ReplicationError> {
    match rows {
        [row] if row.len() >= columns => Ok(row),
        _ => Err(ReplicationError::protocol(
            format!(
                "{command} returned {} rows, expected one of at least {columns} columns",
                rows.len()
            ),
            None,
        )),
    }
}

fn required<'a>(
    row: &'a [Option<String>],
    index: usize,
    what: &str,
) -> Result<&'a str, ReplicationError> {
    row.get(index)
        .and_then(Option::as_deref)
        .ok_or_else(|| ReplicationError::protocol(format!("{what} is NULL"), None))
}

fn bad_value(what: &str, value: &str) -> ReplicationError {
    ReplicationError::protocol(format!("{what} {value:?} does not parse"), None)
}

/// Slot names are what Postgres itself allows: lower-case letters, digits and underscores, at
/// most 63 bytes (`NAMEDATALEN - 1`). Checking here gives a config error instead of a server
/// error, and makes quoting trivially safe.
pub fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if name.is_empty() || name.len() > 63 || !valid_chars {
        return Err(ReplicationError::Config(format!(
            "invalid replication slot name {name:?}: use 1 to 63 of [a-z0-9_]"
        )));
    }
    Ok(())
}

/// Quotes an identifier: `"` around it, inner `"` doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal: `'` around it, inner `'` doubled. Backslashes need no escape: the
/// replication command scanner and SQL with `standard_conforming_strings` (the default since
/// 9.1) take them literally.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slot_names() {
        validate_slot_name("relay_1").unwrap();
        validate_slot_name(&"a".repeat(63)).unwrap();
        for bad in ["", "Relay", "a-b", "a\"b", "a b", "é", &"a".repeat(64)] {
            assert!(
                matches!(validate_slot_name(bad), Err(ReplicationError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        let publications = ["p1", "we\"ird'"].map(quote_ident).join(",");
        assert_eq!(quote_literal(&publications), "'\"p1\",\"we\"\"ird''\"'");
    }

    use frame::tests::{frame as backend_frame, keepalive, xlogdata};
    use tokio::io::DuplexStream;

    /// A stream whose "server" is the other end of an in-memory pipe.
    fn stream_over_pipe() -> (ReplicationStream, DuplexStream) {
        let (ours, server) = tokio::io::duplex(1 << 16);
        let stream = ReplicationStream {
            conn: Connection::new(Box::new(ours)),
            ended: false,
            command_complete: false,
        };
        (stream, server)
    }

    #[tokio::test]
    async fn cancelled_next_loses_no_partial_input() {
        let (mut stream, mut server) = stream_over_pipe();
        let bytes = xlogdata(1, 2, 3, b"Bpayload");
        // Feed the frame a few bytes at a time; every next() in between is cancelled by its
        // timeout after having buffered what had arrived.
        for chunk in bytes.chunks(7) {
            server.write_all(chunk).await.unwrap();
            let pending = tokio::time::timeout(Duration::from_millis(5), stream.next()).await;
            if let Ok(message) = pending {
                // Only the last chunk completes the frame.
                assert!(std::ptr::eq(chunk, bytes.chunks(7).last().unwrap()));
                let message = message.unwrap().unwrap();
                assert!(
                    matches!(message, ReplicationMessage::XLogData { data, .. } if &data[..] == b"Bpayload")
                );
                return;
            }
        }
        panic!("the frame was never returned");
    }

    #[tokio::test]
    async fn eof_between_frames_and_mid_frame_are_told_apart() {
        let (mut stream, mut server) = stream_over_pipe();
        server.write_all(&keepalive(5, 6, true)).await.unwrap();
        drop(server);
        assert!(matches!(
            stream.next().await.unwrap(),
            Some(ReplicationMessage::Keepalive {
                reply_requested: true,
                ..
            })
        ));
        let err = stream.next().await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::UnexpectedEof { mid_frame: false }),
            "{err}"
        );

        let (mut stream, mut server) = stream_over_pipe();
        let bytes = keepalive(5, 6, true);
        server.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(server);
        let err = stream.next().await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::UnexpectedEof { mid_frame: true }),
            "{err}"
        );
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn error_during_streaming_is_typed_and_copy_end_is_none() {
        let (mut stream, mut server) = stream_over_pipe();
        server
            .write_all(&frame::tests::error_response("55006", "slot is active"))
            .await
            .unwrap();
        let err = stream.next().await.unwrap_err();
        assert_eq!(err.sqlstate(), Some("55006"));

        let (mut stream, mut server) = stream_over_pipe();
        let mut bytes = backend_frame(b'c', b"");
        bytes.extend(backend_frame(b'C', b"COPY 0\0"));
        server.write_all(&bytes).await.unwrap();
        assert_eq!(stream.next().await.unwrap(), None);
        // Fused: the end is reported again without reading.
        assert_eq!(stream.next().await.unwrap(), None);
    }

    /// Reads exactly `n` bytes the client sent.
    async fn client_sent(server: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        server.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn status_update_on_the_wire() {
        let (mut stream, mut server) = stream_over_pipe();
        stream
            .send_status_update(Lsn(0x10), Lsn(0x20), Lsn(0x30), true)
            .await
            .unwrap();
        let sent = client_sent(&mut server, 39).await;
        assert_eq!(&sent[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(
            &sent[6..30],
            &[
                [0u8; 7].as_slice(),
                &[0x10],
                &[0; 7],
                &[0x20],
                &[0; 7],
                &[0x30]
            ]
            .concat()[..]
        );
        let clock = i64::from_be_bytes(sent[30..38].try_into().unwrap());
        assert!(
            (clock - pg_now_micros()).abs() < 10_000_000,
            "client clock since 2000: {clock}"
        );
        assert_eq!(sent[38], 1);
    }

    #[tokio::test]
    async fn finish_sends_copy_done_drains_and_terminates() {
        let (stream, mut server) = stream_over_pipe();
        let fake_server = tokio::spawn(async move {
            // CopyDone from the client; data still in flight, then the end of the command.
            assert_eq!(client_sent(&mut server, 5).await, [b'c', 0, 0, 0, 4]);
            let mut answer = xlogdata(1, 2, 3, b"late");
            answer.extend(backend_frame(b'c', b""));
            answer.extend(backend_frame(b'C', b"START_STREAMING\0"));
            answer.extend(backend_frame(b'Z', b"I"));
            server.write_all(&answer).await.unwrap();
            // Terminate, then the client closes.
            assert_eq!(client_sent(&mut server, 5).await, [b'X', 0, 0, 0, 4]);
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        stream.finish().await.unwrap();
        fake_server.await.unwrap();
    }

    /// A one-connection fake server on loopback: reads the startup message, then sends
    /// `answer`. Returns the config to reach it.
    async fn fake_server(answer: Vec<u8>) -> ReplicationConfig {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = ReplicationConfig::new("127.0.0.1", "u");
        cfg.port = listener.local_addr().unwrap().port();
        cfg.sslmode = SslMode::Disable;
        cfg.password = Some("secret".into());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let len = socket.read_i32().await.unwrap();
            let mut startup = vec![0; usize::try_from(len).unwrap() - 4];
            socket.read_exact(&mut startup).await.unwrap();
            assert!(startup.windows(9).any(|w| w == b"database\0"));
            assert!(startup.windows(12).any(|w| w == b"replication\0"));
            socket.write_all(&answer).await.unwrap();
            // Keep the socket open until the client gives up.
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        });
        cfg
    }

    #[tokio::test]
    async fn unsupported_auth_and_malformed_frames_are_definite_errors() {
        // AuthenticationGSS.
        let cfg = fake_server(backend_frame(b'R', &7i32.to_be_bytes())).await;
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::Auth { server: None, .. }),
            "{err}"
        );
        assert!(!err.is_transient());

        // SASL offering only a mechanism we do not implement.
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0\0");
        let cfg = fake_server(backend_frame(b'R', &body)).await;
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(err.to_string().contains("SCRAM-SHA-256-PLUS"), "{err}");

        // A length field of 2 GiB - 1.
        let cfg = fake_server(vec![b'R', 0x7f, 0xff, 0xff, 0xff]).await;
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        frame::tests::assert_protocol_error_at(&err, 0);

        // A SCRAM server-first message that is not one.
        let mut answer = backend_frame(
            b'R',
            &[&10i32.to_be_bytes()[..], b"SCRAM-SHA-256\0\0"].concat(),
        );
        answer.extend(backend_frame(
            b'R',
            &[&11i32.to_be_bytes()[..], b"garbage"].concat(),
        ));
        let cfg = fake_server(answer).await;
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Auth { .. }), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[tokio::test]
    async fn connect_timeout_bounds_a_silent_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = ReplicationConfig::new("127.0.0.1", "u");
        cfg.port = listener.local_addr().unwrap().port();
        cfg.sslmode = SslMode::Prefer;
        cfg.connect_timeout = Duration::from_millis(200);
        // Accepted by the kernel's backlog, never answered.
        let err = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(
            matches!(&err, ReplicationError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(err.is_transient());
        drop(listener);
    }

    #[tokio::test]
    async fn command_complete_then_close_ends_the_stream_and_finish_is_clean() {
        // What a walsender does when the server shuts down: CommandComplete, then exit.
        let (mut stream, mut server) = stream_over_pipe();
        let mut bytes = keepalive(1, 2, false);
        bytes.extend(backend_frame(b'C', b"START_STREAMING\0"));
        server.write_all(&bytes).await.unwrap();
        drop(server);
        assert!(matches!(
            stream.next().await.unwrap(),
            Some(ReplicationMessage::Keepalive { .. })
        ));
        assert_eq!(stream.next().await.unwrap(), None);
        stream.finish().await.unwrap();
    }
}
