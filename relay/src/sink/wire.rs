//! An experimental transactional producer that speaks Kafka's protocol itself
//! (`kafka.client = "wire"`), to measure what librdkafka's way of producing costs the broker.
//!
//! librdkafka (the default client, [`super::kafka`]) speaks transactions v1 only and sends one
//! ProduceRequest per partition: a transaction touching the six partitions of an event topic
//! and the checkpoint partition costs the broker seven requests, each verified against the
//! transaction coordinator on its own (KIP-890 part 1). The Java producer sends one request
//! per broker instead. This client does what the sink needs and nothing more:
//!
//! - records of the open transaction are held in memory and partitioned as the Java client
//!   does (murmur2 of the key); a transaction past 4 MiB (a large WAL transaction, which is one
//!   Kafka transaction) has its records produced as they come, so memory stays bounded;
//! - at commit, **one ProduceRequest per leader broker** carries one record batch per
//!   partition, the checkpoint's included; then EndTxn;
//! - **transactions v2** (KIP-890 part 2) when the cluster finalized `transaction.version` 2
//!   (Kafka 4.0 and later, by default): no AddPartitionsToTxn, the partition leader adds the
//!   partition as it appends (Produce v12), and EndTxn v5 bumps the producer epoch (sequence
//!   numbers start again at 0). On older clusters, or with
//!   `kafka.wire_transaction_version = 1`, it speaks v1: one AddPartitionsToTxn per
//!   transaction for all its partitions, Produce v11, EndTxn v4;
//! - two producers in turn (`<id>` and `<id>.alt`) with `kafka.transactional_producers = 2`,
//!   as in [`super::kafka`]; both ids are fenced at `open` whatever the setting, so a switch
//!   from either client to the other never waits for a transaction left open;
//! - a batch answered with a retriable error (`CONCURRENT_TRANSACTIONS` while the previous
//!   commit's markers are written, a leader change) is sent again unchanged: same sequence
//!   numbers, so the broker drops one it already has.
//!
//! Exactly-once rests on the same three points as with librdkafka: the checkpoint record is in
//! the transaction; `open` calls InitProducerId, which fences older producers with the same
//! transactional id and aborts their open transaction, before the checkpoint is read
//! (read_committed, by the librdkafka backend's reader); after any error the backend is
//! dropped and a new one does the same.
//!
//! TLS (`security.protocol = ssl | sasl_ssl`) is rustls: the broker's certificate is verified
//! against `ssl.ca.location` (or the WebPKI roots) and must name the host connected to. SASL
//! logins: PLAIN, and SCRAM-SHA-256/512 (`super::scram`, the server's signature checked).
//!
//! What it does not do (and the configuration refuses): OAUTHBEARER and GSSAPI, client
//! certificates, skipping the name check, at-least-once delivery, compression, and the librdkafka backend's isolation of poison records by delivery report
//! (a record larger than its topic's `max.message.bytes` is refused before it is sent and goes
//! to the DLQ; any other refusal by the broker fails the transaction and is fatal, with the
//! broker's error).

use super::kafka::{topic_not_ready, KafkaBackend, KafkaSettings};
use super::scram::{self, Scram};
use super::{Backend, Returned, SinkError};
use crate::checkpoint::Checkpoint;
use crate::outbox::OutRecord;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    add_partitions_to_txn_request::{AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction},
    metadata_request::MetadataRequestTopic,
    produce_request::{PartitionProduceData, TopicProduceData},
    AddPartitionsToTxnRequest, ApiVersionsRequest, EndTxnRequest, FindCoordinatorRequest,
    InitProducerIdRequest, MetadataRequest, ProduceRequest, ProducerId, RequestHeader,
    ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest, TopicName, TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use kafka_protocol::ResponseError;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Timeout of one request, and of a retried call as a whole.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted (a produce or metadata response is a few kB).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// Backoff between retries of a coordinator call the broker answered "not yet"
/// (`CONCURRENT_TRANSACTIONS`: the previous transaction's markers are being written).
const RETRY_BACKOFF: Duration = Duration::from_millis(2);
/// The broker's default `max.message.bytes`, used until a topic's own is known.
const DEFAULT_MAX_BATCH: usize = 1_048_588;
/// Held bytes past which the open transaction's records are produced before its commit.
const FLUSH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of a v2 record batch's header (up to and including the record count).
const BATCH_HEADER: usize = 61;

/// Kafka error codes this client acts on.
mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const RECORD_LIST_TOO_LARGE: i16 = 18;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const CONCURRENT_TRANSACTIONS: i16 = 51;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const INVALID_RECORD: i16 = 87;
    pub const PRODUCER_FENCED: i16 = 90;
}

fn error_name(c: i16) -> String {
    match ResponseError::try_from_code(c) {
        Some(e) => format!("{e} ({c})"),
        None => "NONE".to_owned(),
    }
}

/// Whether the broker's answer means another producer with our transactional id took over.
fn fenced(c: i16) -> bool {
    matches!(
        c,
        code::PRODUCER_FENCED
            | code::INVALID_PRODUCER_EPOCH
            | code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    )
}

/// Whether a produce answered with `c` may be sent again unchanged: the batch was not
/// appended, or (appended, not yet replicated) the broker drops it as a duplicate.
fn retriable_produce(c: i16) -> bool {
    matches!(
        c,
        code::CONCURRENT_TRANSACTIONS
            | code::COORDINATOR_LOAD_IN_PROGRESS
            | code::COORDINATOR_NOT_AVAILABLE
            | code::NOT_COORDINATOR
            | code::LEADER_NOT_AVAILABLE
            | code::NOT_LEADER_OR_FOLLOWER
            | code::UNKNOWN_TOPIC_OR_PARTITION
            | code::REQUEST_TIMED_OUT
            | code::NOT_ENOUGH_REPLICAS
            | code::NOT_ENOUGH_REPLICAS_AFTER_APPEND
            | code::KAFKA_STORAGE_ERROR
    )
}

/// What a transaction coordinator's answer `c` to `what` means: `Ok(true)` done, `Ok(false)`
/// ask again after a backoff (the coordinator is busy or loading, and `deadline` is not past),
/// or the error: fenced is fatal, anything else `otherwise` (the caller's class). NOT_COORDINATOR
/// is not retried here: the coordinator moved, and a new backend looks it up again.
fn coordinator_answer(
    what: &str,
    c: i16,
    deadline: Instant,
    otherwise: fn(String) -> SinkError,
) -> Result<bool, SinkError> {
    match c {
        code::NONE => Ok(true),
        c if fenced(c) => Err(SinkError::Fatal(format!("{what}: {}", error_name(c)))),
        c if retriable_coordinator(c)
            && c != code::NOT_COORDINATOR
            && Instant::now() < deadline =>
        {
            Ok(false)
        }
        c => Err(otherwise(format!("{what}: {}", error_name(c)))),
    }
}

/// Whether a coordinator call may be retried as it is.
fn retriable_coordinator(c: i16) -> bool {
    matches!(
        c,
        code::CONCURRENT_TRANSACTIONS
            | code::COORDINATOR_LOAD_IN_PROGRESS
            | code::COORDINATOR_NOT_AVAILABLE
            | code::NOT_COORDINATOR
    )
}

// ---------------------------------------------------------------------------------------------
// Record batches (magic 2), written here: Kafka's format, with header names kept in order and
// repeated names kept (a map would merge them).

fn put_varint(buf: &mut BytesMut, v: i64) {
    // Zig-zag, then base-128 little-endian groups.
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

fn varint_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_varint(buf, b.len() as i64);
    buf.put_slice(b);
}

/// A topic and a partition of it.
type Partition = (Arc<str>, i32);
/// Batches of one produce request: by topic, (partition, batch).
type ByTopic = BTreeMap<Arc<str>, Vec<(i32, Bytes)>>;

/// One record as held until the commit.
#[derive(Clone, Debug)]
struct Held {
    key: Bytes,
    value: Bytes,
    /// The record's fixed headers (borrowed names), then its row's own (owned names).
    headers: Vec<(Cow<'static, str>, Bytes)>,
    timestamp: i64,
}

impl Held {
    /// `r` as held: moved, header names not copied.
    fn from_out(r: OutRecord, timestamp: i64) -> Held {
        let mut headers: Vec<(Cow<'static, str>, Bytes)> =
            Vec::with_capacity(r.headers.len() + r.extra_headers.len());
        headers.extend(r.headers.into_iter().map(|(k, v)| (Cow::Borrowed(k), v)));
        headers.extend(r.extra_headers.into_iter().map(|(k, v)| (Cow::Owned(k), v)));
        Held {
            key: r.key,
            value: r.value,
            headers,
            timestamp,
        }
    }

    /// The record again, for handing it back with a refusal (the inverse of `from_out`).
    fn into_out(self, topic: Arc<str>) -> OutRecord {
        let mut headers = Vec::new();
        let mut extra_headers = Vec::new();
        for (k, v) in self.headers {
            match k {
                Cow::Borrowed(k) => headers.push((k, v)),
                Cow::Owned(k) => extra_headers.push((k, v)),
            }
        }
        OutRecord {
            topic,
            key: self.key,
            value: self.value,
            headers,
            extra_headers,
        }
    }

    /// The record's body (everything after its length), with `delta`s relative to the batch.
    fn body_len(&self, offset_delta: i32, timestamp_delta: i64) -> usize {
        1 + varint_len(timestamp_delta)
            + varint_len(i64::from(offset_delta))
            + varint_len(self.key.len() as i64)
            + self.key.len()
            + varint_len(self.value.len() as i64)
            + self.value.len()
            + varint_len(self.headers.len() as i64)
            + self
                .headers
                .iter()
                .map(|(k, v)| {
                    varint_len(k.len() as i64) + k.len() + varint_len(v.len() as i64) + v.len()
                })
                .sum::<usize>()
    }

    /// Bytes this record adds to a batch (its length prefix included), at worst-case deltas.
    fn encoded_len(&self) -> usize {
        let body = self.body_len(i32::MAX, i64::from(i32::MAX));
        varint_len(body as i64) + body
    }

    fn put(&self, buf: &mut BytesMut, offset_delta: i32, timestamp_delta: i64) {
        let body = self.body_len(offset_delta, timestamp_delta);
        put_varint(buf, body as i64);
        buf.put_u8(0); // attributes: unused
        put_varint(buf, timestamp_delta);
        put_varint(buf, i64::from(offset_delta));
        put_bytes(buf, &self.key);
        put_bytes(buf, &self.value);
        put_varint(buf, self.headers.len() as i64);
        for (k, v) in &self.headers {
            put_bytes(buf, k.as_bytes());
            put_bytes(buf, v);
        }
    }
}

/// Who writes a batch: the producer id, epoch and the batch's first sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Writer {
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
}

/// Encodes `records` as one transactional record batch (magic 2, uncompressed, CreateTime).
fn encode_batch(records: &[Held], w: Writer) -> Bytes {
    let base_ts = records.first().map_or(0, |r| r.timestamp);
    let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(base_ts);
    let size: usize = BATCH_HEADER + records.iter().map(Held::encoded_len).sum::<usize>();
    let mut buf = BytesMut::with_capacity(size);
    buf.put_i64(0); // base offset: the broker assigns offsets
    buf.put_i32(0); // batch length, filled in below
    buf.put_i32(-1); // partition leader epoch
    buf.put_i8(2); // magic
    let crc_at = buf.len();
    buf.put_u32(0); // CRC-32C of what follows, filled in below
    buf.put_i16(0x10); // attributes: transactional, no compression, CreateTime
    buf.put_i32(records.len().saturating_sub(1) as i32); // last offset delta
    buf.put_i64(base_ts);
    buf.put_i64(max_ts);
    buf.put_i64(w.producer_id);
    buf.put_i16(w.epoch);
    buf.put_i32(w.base_sequence);
    buf.put_i32(records.len() as i32);
    for (i, r) in records.iter().enumerate() {
        r.put(&mut buf, i as i32, r.timestamp - base_ts);
    }
    let batch_len = (buf.len() - 12) as i32;
    buf[8..12].copy_from_slice(&batch_len.to_be_bytes());
    let crc = crc32c::crc32c(&buf[crc_at + 4..]);
    buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    buf.freeze()
}

/// The partition of `key` among `partitions`, as Kafka's Java producer (and librdkafka's
/// `murmur2_random`, which the librdkafka backend sets) choose it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        if let Some(&b) = rest.get(2) {
            h ^= u32::from(b) << 16;
        }
        if let Some(&b) = rest.get(1) {
            h ^= u32::from(b) << 8;
        }
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

// ---------------------------------------------------------------------------------------------
// Connections.

#[derive(Debug, thiserror::Error)]
enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
    /// The TLS handshake or the SASL login failed (a certificate that does not verify, a
    /// refused password): retrying does not help, the configuration must change.
    #[error("{0}")]
    Refused(String),
}

impl WireError {
    /// A refusal explained by `f` (which adds who was refused); other errors as they are.
    fn map_refusal(self, f: impl FnOnce(String) -> WireError) -> WireError {
        match self {
            WireError::Refused(m) => f(m),
            e => e,
        }
    }
}

impl From<WireError> for SinkError {
    fn from(e: WireError) -> SinkError {
        match e {
            WireError::Refused(m) => SinkError::Config(format!("Kafka (wire client): {m}")),
            e => SinkError::Unavailable(format!("Kafka (wire client): {e}")),
        }
    }
}

/// A broker connection's bytes: plaintext, or TLS (`security.protocol = ssl`).
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The TLS client configuration for `security.protocol = ssl` (None for plaintext): the
/// broker's certificate is verified against `ssl.ca.location` (PEM), or the WebPKI roots
/// without it, and must name the host the relay connects to.
pub fn tls_config(
    settings: &KafkaSettings,
) -> Result<Option<Arc<rustls::ClientConfig>>, SinkError> {
    let opt = |k: &str| settings.librdkafka.get(k).map(String::as_str);
    if !opt("security.protocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("ssl") || p.eq_ignore_ascii_case("sasl_ssl"))
    {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match opt("ssl.ca.location") {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let unreadable = |e: &dyn std::fmt::Display| {
                SinkError::Config(format!("cannot read ssl.ca.location {path}: {e}"))
            };
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| unreadable(&e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable(&e))?;
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(SinkError::Config(format!(
                    "no usable certificate in ssl.ca.location {path}"
                )));
            }
            roots
        }
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SinkError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// SASL credentials (`sasl.mechanism` PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512). The password
/// is never printed.
#[derive(Clone)]
pub struct Sasl {
    /// None: PLAIN.
    scram: Option<Scram>,
    username: String,
    password: String,
}

impl Sasl {
    fn mechanism(&self) -> &'static str {
        self.scram.map_or("PLAIN", Scram::name)
    }
}

impl std::fmt::Debug for Sasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism())
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// The SASL login for `security.protocol = sasl_ssl | sasl_plaintext` (None otherwise).
pub fn sasl_config(settings: &KafkaSettings) -> Result<Option<Sasl>, SinkError> {
    let opt = |k: &str| settings.librdkafka.get(k).map(String::as_str);
    let protocol = opt("security.protocol").unwrap_or("plaintext");
    if !protocol.to_ascii_lowercase().starts_with("sasl_") {
        return Ok(None);
    }
    let mechanism = opt("sasl.mechanism")
        .or(opt("sasl.mechanisms"))
        .unwrap_or("GSSAPI");
    let scram = Scram::from_mechanism(mechanism);
    if scram.is_none() && !mechanism.eq_ignore_ascii_case("plain") {
        return Err(SinkError::Config(format!(
            "the wire client logs in with sasl.mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 only (got {mechanism})"
        )));
    }
    let (Some(username), Some(password)) = (opt("sasl.username"), opt("sasl.password")) else {
        return Err(SinkError::Config(format!(
            "SASL {mechanism} needs sasl.username and sasl.password"
        )));
    };
    Ok(Some(Sasl {
        scram,
        username: username.to_owned(),
        password: password.to_owned(),
    }))
}

/// One blocking connection to a broker; requests are sent one at a time, or several written
/// before their responses are read ([`Conn::send`], [`Conn::receive`]).
struct Conn {
    stream: Stream,
    address: String,
    client_id: StrBytes,
    correlation: i32,
    /// Highest version of each API the broker supports, by API key.
    versions: HashMap<i16, i16>,
    /// The cluster's finalized `transaction.version`.
    transaction_version: i16,
}

impl Conn {
    fn connect(
        address: &str,
        client_id: &str,
        tls: Option<&Arc<rustls::ClientConfig>>,
        sasl: Option<&Sasl>,
    ) -> Result<Conn, WireError> {
        let addrs: Vec<_> = address.to_socket_addrs()?.collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    tcp.set_read_timeout(Some(CALL_TIMEOUT))?;
                    tcp.set_write_timeout(Some(CALL_TIMEOUT))?;
                    let stream = match tls {
                        None => Stream::Plain(tcp),
                        Some(config) => {
                            let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
                            let host = host.trim_start_matches('[').trim_end_matches(']');
                            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                                .map_err(|e| {
                                    WireError::Protocol(format!("TLS server name {host}: {e}"))
                                })?;
                            let conn = rustls::ClientConnection::new(config.clone(), name)
                                .map_err(|e| WireError::Protocol(format!("TLS: {e}")))?;
                            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
                        }
                    };
                    let mut c = Conn {
                        stream,
                        address: address.to_owned(),
                        client_id: StrBytes::from_string(client_id.to_owned()),
                        correlation: 0,
                        versions: HashMap::new(),
                        transaction_version: 0,
                    };
                    c.handshake().map_err(|e| match e {
                        WireError::Io(io)
                            if io
                                .get_ref()
                                .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some()) =>
                        {
                            WireError::Refused(format!("TLS handshake with {address}: {io}"))
                        }
                        e => e,
                    })?;
                    if let Some(sasl) = sasl {
                        c.login(sasl)?;
                    }
                    return Ok(c);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(
            || WireError::Protocol(format!("{address} resolves to no address")),
            WireError::Io,
        ))
    }

    fn handshake(&mut self) -> Result<(), WireError> {
        let mut req = ApiVersionsRequest::default();
        req.client_software_name = StrBytes::from_static_str("outbox-relay-wire");
        req.client_software_version = StrBytes::from_static_str(env!("CARGO_PKG_VERSION"));
        let resp = self.call(&req, 3)?;
        if resp.error_code != code::NONE {
            return Err(WireError::Protocol(format!(
                "ApiVersions: {}",
                error_name(resp.error_code)
            )));
        }
        self.versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.max_version))
            .collect();
        self.transaction_version = resp
            .finalized_features
            .iter()
            .find(|f| f.name.as_str() == "transaction.version")
            .map_or(0, |f| f.max_version_level);
        Ok(())
    }

    /// SASL login (SaslHandshake v1, then SaslAuthenticate: once for PLAIN, twice for SCRAM,
    /// whose server signature is checked): a refused login is a configuration error, with the
    /// broker's reason.
    fn login(&mut self, sasl: &Sasl) -> Result<(), WireError> {
        let mechanism = sasl.mechanism();
        let mut hs = SaslHandshakeRequest::default();
        hs.mechanism = StrBytes::from_static_str(mechanism);
        let v = self.version::<SaslHandshakeRequest>(1, 1)?;
        let resp = self.call(&hs, v)?;
        if resp.error_code != code::NONE {
            let offered: Vec<&str> = resp.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(WireError::Refused(format!(
                "SASL {mechanism} refused by {} ({}); it offers {offered:?}",
                self.address,
                error_name(resp.error_code)
            )));
        }
        let address = self.address.clone();
        let refused = |why: String| {
            WireError::Refused(format!(
                "SASL {mechanism} login as {} refused by {address}: {why}",
                sasl.username
            ))
        };
        match sasl.scram {
            None => {
                let mut auth = Vec::with_capacity(2 + sasl.username.len() + sasl.password.len());
                auth.push(0);
                auth.extend_from_slice(sasl.username.as_bytes());
                auth.push(0);
                auth.extend_from_slice(sasl.password.as_bytes());
                self.authenticate(auth)
                    .map_err(|e| e.map_refusal(refused))?;
            }
            Some(scram) => {
                let nonce: String = (0..24)
                    .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
                    .collect();
                let mut x = scram::Exchange::new(scram, &sasl.username, &sasl.password, &nonce);
                let server_first = self
                    .authenticate(x.client_first().into_bytes())
                    .map_err(|e| e.map_refusal(refused))?;
                let client_final = x.client_final(&server_first).map_err(refused)?;
                let server_final = self
                    .authenticate(client_final.into_bytes())
                    .map_err(|e| e.map_refusal(refused))?;
                x.verify_server_final(&server_final).map_err(refused)?;
            }
        }
        Ok(())
    }

    /// One SaslAuthenticate round trip: `auth` out, the server's bytes back. A refusal is
    /// [`WireError::Refused`] with the broker's error and message.
    fn authenticate(&mut self, auth: Vec<u8>) -> Result<Bytes, WireError> {
        let mut req = SaslAuthenticateRequest::default();
        req.auth_bytes = Bytes::from(auth);
        let v = self.version::<SaslAuthenticateRequest>(2, 0)?;
        let resp = self.call(&req, v)?;
        if resp.error_code != code::NONE {
            return Err(WireError::Refused(format!(
                "{}{}",
                error_name(resp.error_code),
                resp.error_message
                    .as_ref()
                    .map(|m| format!(": {}", m.as_str()))
                    .unwrap_or_default()
            )));
        }
        Ok(resp.auth_bytes)
    }

    /// The version of `R` to use: `want`, or the broker's highest if lower; an error below
    /// `min`.
    fn version<R: Request>(&self, want: i16, min: i16) -> Result<i16, WireError> {
        let max = self.versions.get(&R::KEY).copied().unwrap_or(-1);
        let v = want.min(max);
        if v < min {
            return Err(WireError::Protocol(format!(
                "broker {} supports API {} up to version {max}; the wire client needs {min}",
                self.address,
                R::KEY
            )));
        }
        Ok(v)
    }

    fn send<R: Request>(&mut self, req: &R, version: i16) -> Result<i32, WireError> {
        self.correlation = self.correlation.wrapping_add(1);
        let mut header = RequestHeader::default();
        header.request_api_key = R::KEY;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(self.client_id.clone());
        let mut buf = BytesMut::with_capacity(256);
        buf.put_i32(0);
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| WireError::Protocol(format!("encoding a request header: {e}")))?;
        req.encode(&mut buf, version)
            .map_err(|e| WireError::Protocol(format!("encoding request {}: {e}", R::KEY)))?;
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&buf)?;
        Ok(self.correlation)
    }

    fn receive<R: Request>(
        &mut self,
        correlation: i32,
        version: i16,
    ) -> Result<R::Response, WireError> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = i32::from_be_bytes(len);
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_RESPONSE)
            .ok_or_else(|| WireError::Protocol(format!("response length {len} out of range")))?;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| WireError::Protocol(format!("decoding a response header: {e}")))?;
        if header.correlation_id != correlation {
            return Err(WireError::Protocol(format!(
                "response {} to request {correlation}: out of step",
                header.correlation_id
            )));
        }
        R::Response::decode(&mut body, version)
            .map_err(|e| WireError::Protocol(format!("decoding response {}: {e}", R::KEY)))
    }

    fn call<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response, WireError> {
        let c = self.send(req, version)?;
        self.receive::<R>(c, version)
    }
}

// ---------------------------------------------------------------------------------------------
// The backend.

/// Partitions and their leaders of one topic.
#[derive(Clone, Debug)]
struct TopicMeta {
    /// Leader node of each partition, by partition index.
    leaders: Vec<i32>,
}

/// One transactional producer's identity and state.
#[derive(Debug)]
struct Producer {
    transactional_id: String,
    producer_id: i64,
    epoch: i16,
    /// Next sequence number of each partition.
    sequences: HashMap<Partition, i32>,
}

impl Producer {
    fn new(transactional_id: String) -> Producer {
        Producer {
            transactional_id,
            producer_id: -1,
            epoch: -1,
            sequences: HashMap::new(),
        }
    }

    fn txn_id(&self) -> TransactionalId {
        TransactionalId(StrBytes::from_string(self.transactional_id.clone()))
    }
}

pub struct WireBackend {
    settings: KafkaSettings,
    /// `kafka.wire_transaction_version`: 0 = what the cluster finalized.
    want_transaction_version: u8,
    /// Topic creation and the checkpoint read, through librdkafka (it never produces).
    admin: KafkaBackend,
    /// TLS (`security.protocol = ssl`), read from the librdkafka options at `open`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// SASL PLAIN (`security.protocol = sasl_ssl | sasl_plaintext`), read at `open`.
    sasl: Option<Sasl>,
    client_id: String,
    /// Connections by broker node id.
    conns: HashMap<i32, Conn>,
    brokers: HashMap<i32, String>,
    coordinator: Option<i32>,
    topics: HashMap<Arc<str>, Arc<TopicMeta>>,
    max_batch: HashMap<Arc<str>, usize>,
    /// The producer the next transaction runs on.
    producer: Producer,
    /// With two producers in turn (`kafka.transactional_producers = 2`), the other one.
    standby: Option<Producer>,
    /// Transactions v2 in use.
    v2: bool,
    /// Records of the open transaction, by topic and partition.
    held: BTreeMap<Partition, Vec<Held>>,
    /// Bytes of `held` (as encoded, about).
    held_bytes: usize,
    /// Transactions v1: partitions already added to the open transaction.
    added: std::collections::HashSet<Partition>,
    /// Whether the open transaction has reached the broker (records produced before the
    /// commit, a large transaction's): an abort must then end it there.
    open_at_broker: bool,
    delivered_after: Option<Duration>,
}

impl WireBackend {
    pub fn new(
        settings: KafkaSettings,
        transaction_version: u8,
        runtime: tokio::runtime::Handle,
    ) -> WireBackend {
        let admin = KafkaBackend::new(settings.clone(), runtime);
        let settings_id = settings.transactional_id.clone();
        WireBackend {
            client_id: format!("{}-wire", settings.transactional_id),
            settings,
            want_transaction_version: transaction_version,
            admin,
            tls: None,
            sasl: None,
            conns: HashMap::new(),
            brokers: HashMap::new(),
            coordinator: None,
            topics: HashMap::new(),
            max_batch: HashMap::new(),
            producer: Producer::new(settings_id.clone()),
            standby: None,
            v2: false,
            held: BTreeMap::new(),
            held_bytes: 0,
            added: std::collections::HashSet::new(),
            open_at_broker: false,
            delivered_after: None,
        }
    }

    /// The cluster's transactions version this backend speaks (after `open`).
    pub fn transaction_version(&self) -> u8 {
        if self.v2 {
            2
        } else {
            1
        }
    }

    /// A connection to any bootstrap server.
    fn bootstrap(&mut self) -> Result<i32, SinkError> {
        if let Some(&id) = self.conns.keys().next() {
            return Ok(id);
        }
        let mut last = String::new();
        for addr in self.settings.bootstrap_servers.split(',').map(str::trim) {
            match Conn::connect(addr, &self.client_id, self.tls.as_ref(), self.sasl.as_ref()) {
                Ok(c) => {
                    // Bootstrap connections are keyed below any node id until metadata names
                    // the broker; -1 is never a node id.
                    self.conns.insert(-1, c);
                    return Ok(-1);
                }
                // A certificate that does not verify will not verify on the next server
                // either: a configuration error, at once.
                Err(e @ WireError::Refused(_)) => return Err(e.into()),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(SinkError::Unavailable(format!(
            "no bootstrap server reachable (wire client); last: {last}"
        )))
    }

    fn conn(&mut self, node: i32) -> Result<&mut Conn, SinkError> {
        if !self.conns.contains_key(&node) {
            let addr = self.brokers.get(&node).cloned().ok_or_else(|| {
                SinkError::Unavailable(format!("broker {node} is not in the metadata"))
            })?;
            let c = Conn::connect(
                &addr,
                &self.client_id,
                self.tls.as_ref(),
                self.sasl.as_ref(),
            )?;
            self.conns.insert(node, c);
        }
        self.conns.get_mut(&node).ok_or(SinkError::Stopped)
    }

    /// Reads the metadata of `topic` until every partition has a leader.
    fn topic(&mut self, topic: &Arc<str>) -> Result<Arc<TopicMeta>, SinkError> {
        if let Some(m) = self.topics.get(topic) {
            return Ok(Arc::clone(m));
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let node = self.bootstrap()?;
            let conn = self.conn(node)?;
            let version = conn.version::<MetadataRequest>(12, 4)?;
            let mut req = MetadataRequest::default();
            let mut t = MetadataRequestTopic::default();
            t.name = Some(TopicName(StrBytes::from_string(topic.to_string())));
            req.topics = Some(vec![t]);
            req.allow_auto_topic_creation = false;
            let resp = conn.call(&req, version)?;
            for b in &resp.brokers {
                self.brokers
                    .insert(b.node_id.0, format!("{}:{}", b.host.as_str(), b.port));
            }
            let t = resp
                .topics
                .iter()
                .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(&**topic));
            let state = match t {
                None => "is not in the metadata".to_owned(),
                Some(t) if t.error_code != code::NONE => {
                    format!("is unavailable ({})", error_name(t.error_code))
                }
                Some(t) if t.partitions.is_empty() => "has no partitions".to_owned(),
                Some(t) => {
                    let mut leaders = vec![-1; t.partitions.len()];
                    for p in &t.partitions {
                        if let Some(slot) = usize::try_from(p.partition_index)
                            .ok()
                            .and_then(|i| leaders.get_mut(i))
                        {
                            *slot = if p.error_code == code::NONE {
                                p.leader_id.0
                            } else {
                                -1
                            };
                        }
                    }
                    if leaders.iter().all(|&l| l >= 0) {
                        let m = Arc::new(TopicMeta { leaders });
                        self.topics.insert(topic.clone(), Arc::clone(&m));
                        return Ok(m);
                    }
                    "has partitions without a leader".to_owned()
                }
            };
            if Instant::now() > deadline {
                let missing = t.is_none_or(|t| t.error_code == code::UNKNOWN_TOPIC_OR_PARTITION);
                return Err(topic_not_ready(&self.settings, topic, missing, &state));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The transaction coordinator's node, found once per backend.
    fn coordinator(&mut self) -> Result<i32, SinkError> {
        if let Some(c) = self.coordinator {
            return Ok(c);
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let node = self.bootstrap()?;
            let mut req = FindCoordinatorRequest::default();
            req.key_type = 1; // transaction
            req.coordinator_keys = vec![StrBytes::from_string(
                self.settings.transactional_id.clone(),
            )];
            let conn = self.conn(node)?;
            let version = conn.version::<FindCoordinatorRequest>(4, 4)?;
            let resp = conn.call(&req, version)?;
            let c = resp.coordinators.first().ok_or_else(|| {
                SinkError::Unavailable("FindCoordinator: empty answer".to_owned())
            })?;
            if c.error_code == code::NONE {
                let id = c.node_id.0;
                self.brokers
                    .insert(id, format!("{}:{}", c.host.as_str(), c.port));
                self.coordinator = Some(id);
                return Ok(id);
            }
            if !retriable_coordinator(c.error_code) || Instant::now() > deadline {
                return Err(SinkError::Unavailable(format!(
                    "FindCoordinator: {}",
                    error_name(c.error_code)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn txn_id(&self) -> TransactionalId {
        self.producer.txn_id()
    }

    /// InitProducerId for `transactional_id`: fences older producers with that id, aborts what
    /// they left open, and returns the producer id and epoch it now has.
    fn init_producer_id(&mut self, transactional_id: &str) -> Result<(i64, i16), SinkError> {
        let coordinator = self.coordinator()?;
        let mut req = InitProducerIdRequest::default();
        req.transactional_id = Some(TransactionalId(StrBytes::from_string(
            transactional_id.to_owned(),
        )));
        req.transaction_timeout_ms =
            i32::try_from(self.settings.transaction_timeout.as_millis()).unwrap_or(i32::MAX);
        req.producer_id = ProducerId(-1);
        req.producer_epoch = -1;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let conn = self.conn(coordinator)?;
            let version = conn.version::<InitProducerIdRequest>(4, 3)?;
            let resp = conn.call(&req, version)?;
            if coordinator_answer(
                "InitProducerId",
                resp.error_code,
                deadline,
                SinkError::Unavailable,
            )? {
                return Ok((resp.producer_id.0, resp.producer_epoch));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Transactions v1: adds the held partitions not yet in the transaction, in one request.
    fn add_partitions(&mut self) -> Result<(), SinkError> {
        let mut topics: BTreeMap<Arc<str>, Vec<i32>> = BTreeMap::new();
        for (t, p) in self.held.keys() {
            if !self.added.contains(&(t.clone(), *p)) {
                topics.entry(t.clone()).or_default().push(*p);
            }
        }
        if topics.is_empty() {
            return Ok(());
        }
        let mut txn = AddPartitionsToTxnTransaction::default();
        txn.transactional_id = self.txn_id();
        txn.producer_id = ProducerId(self.producer.producer_id);
        txn.producer_epoch = self.producer.epoch;
        txn.topics = topics
            .into_iter()
            .map(|(t, ps)| {
                let mut at = AddPartitionsToTxnTopic::default();
                at.name = TopicName(StrBytes::from_string(t.to_string()));
                at.partitions = ps;
                at
            })
            .collect();
        let coordinator = self.coordinator()?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let conn = self.conn(coordinator)?;
            let version = conn.version::<AddPartitionsToTxnRequest>(3, 0)?;
            // Versions up to 3 carry one transaction in the top-level (v3) fields.
            let mut req = AddPartitionsToTxnRequest::default();
            req.v3_and_below_transactional_id = txn.transactional_id.clone();
            req.v3_and_below_producer_id = txn.producer_id;
            req.v3_and_below_producer_epoch = txn.producer_epoch;
            req.v3_and_below_topics = txn.topics.clone();
            let resp = conn.call(&req, version)?;
            let mut worst = resp.error_code;
            for t in &resp.results_by_topic_v3_and_below {
                for p in &t.results_by_partition {
                    if p.partition_error_code != code::NONE {
                        worst = p.partition_error_code;
                    }
                }
            }
            if coordinator_answer("AddPartitionsToTxn", worst, deadline, SinkError::Aborted)? {
                self.added.extend(self.held.keys().cloned());
                return Ok(());
            }
            std::thread::sleep(RETRY_BACKOFF);
        }
    }

    /// Produces every held record: per leader broker one request with one batch per
    /// partition (more rounds only when a partition's records exceed its topic's batch limit).
    fn produce_held(&mut self) -> Result<(), SinkError> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        self.open_at_broker = true;
        // Split each partition's records into batches within its topic's limit.
        let mut batches: Vec<(Partition, Vec<Vec<Held>>)> = Vec::new();
        for ((topic, partition), records) in held {
            let limit = self
                .max_batch
                .get(&topic)
                .copied()
                .unwrap_or(DEFAULT_MAX_BATCH);
            let mut chunks: Vec<Vec<Held>> = Vec::new();
            let mut size = BATCH_HEADER;
            let mut cur: Vec<Held> = Vec::new();
            for r in records {
                let n = r.encoded_len();
                if !cur.is_empty() && size + n > limit {
                    chunks.push(std::mem::take(&mut cur));
                    size = BATCH_HEADER;
                }
                size += n;
                cur.push(r);
            }
            if !cur.is_empty() {
                chunks.push(cur);
            }
            batches.push(((topic, partition), chunks));
        }
        let rounds = batches.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        for round in 0..rounds {
            let mut pending: Vec<(Arc<str>, i32, Bytes)> = Vec::new();
            for ((topic, partition), chunks) in &batches {
                let Some(chunk) = chunks.get(round) else {
                    continue;
                };
                let p = &mut self.producer;
                let seq = p.sequences.entry((topic.clone(), *partition)).or_insert(0);
                let w = Writer {
                    producer_id: p.producer_id,
                    epoch: p.epoch,
                    base_sequence: *seq,
                };
                *seq = seq.wrapping_add(chunk.len() as i32) & i32::MAX;
                pending.push((topic.clone(), *partition, encode_batch(chunk, w)));
            }
            self.produce_batches(pending)?;
        }
        Ok(())
    }

    /// Sends `pending` (one batch per partition), one request per leader broker, and sends
    /// again, unchanged (same sequence numbers, so the broker drops a batch it already has),
    /// the batches the broker answered with a retriable error, until none is left.
    fn produce_batches(
        &mut self,
        mut pending: Vec<(Arc<str>, i32, Bytes)>,
    ) -> Result<(), SinkError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let version = if self.v2 { 12 } else { 11 };
        loop {
            // Leader -> topic -> (partition, batch).
            let mut by_leader: BTreeMap<i32, ByTopic> = BTreeMap::new();
            for (topic, partition, batch) in pending.drain(..) {
                let meta = self.topic(&topic)?;
                let leader = usize::try_from(partition)
                    .ok()
                    .and_then(|i| meta.leaders.get(i).copied())
                    .ok_or_else(|| {
                        SinkError::Aborted(format!("{topic}/{partition}: no such partition"))
                    })?;
                by_leader
                    .entry(leader)
                    .or_default()
                    .entry(topic)
                    .or_default()
                    .push((partition, batch));
            }
            // Write every leader's request, then read the answers.
            let mut sent = Vec::new();
            for (leader, topics) in by_leader {
                let mut req = ProduceRequest::default();
                req.transactional_id = Some(self.txn_id());
                req.acks = -1;
                req.timeout_ms = i32::try_from(CALL_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
                let mut batches: HashMap<Partition, Bytes> = HashMap::new();
                req.topic_data = topics
                    .into_iter()
                    .map(|(t, parts)| {
                        let mut td = TopicProduceData::default();
                        td.name = TopicName(StrBytes::from_string(t.to_string()));
                        td.partition_data = parts
                            .into_iter()
                            .map(|(p, b)| {
                                batches.insert((t.clone(), p), b.clone());
                                let mut pd = PartitionProduceData::default();
                                pd.index = p;
                                pd.records = Some(b);
                                pd
                            })
                            .collect();
                        td
                    })
                    .collect();
                let conn = self.conn(leader)?;
                let v = conn.version::<ProduceRequest>(version, version)?;
                let c = conn.send(&req, v)?;
                sent.push((leader, c, v, batches));
            }
            let mut retry_reason = String::new();
            for (leader, c, v, mut batches) in sent {
                let resp = self.conn(leader)?.receive::<ProduceRequest>(c, v)?;
                for t in &resp.responses {
                    let topic: Arc<str> = Arc::from(t.name.0.as_str());
                    for p in &t.partition_responses {
                        let e = p.error_code;
                        // A batch appended before (a retry after a lost answer): done.
                        if e == code::NONE || e == code::DUPLICATE_SEQUENCE_NUMBER {
                            continue;
                        }
                        let what = format!("produce to {topic}/{}: {}", p.index, error_name(e));
                        if fenced(e) {
                            return Err(SinkError::Fatal(what));
                        }
                        if matches!(
                            e,
                            code::MESSAGE_TOO_LARGE
                                | code::RECORD_LIST_TOO_LARGE
                                | code::INVALID_RECORD
                        ) {
                            return Err(SinkError::Fatal(format!(
                                "{what}: the broker refused a batch; the wire client cannot tell which record (run with kafka.client = \"librdkafka\", which isolates it)"
                            )));
                        }
                        let batch = batches.remove(&(topic.clone(), p.index));
                        match batch {
                            Some(b) if retriable_produce(e) && Instant::now() < deadline => {
                                if matches!(
                                    e,
                                    code::NOT_LEADER_OR_FOLLOWER | code::UNKNOWN_TOPIC_OR_PARTITION
                                ) {
                                    self.topics.remove(&topic);
                                }
                                retry_reason = what;
                                pending.push((topic.clone(), p.index, b));
                            }
                            _ => return Err(SinkError::Aborted(what)),
                        }
                    }
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            tracing::debug!(batches = pending.len(), error = %retry_reason, "producing again");
            std::thread::sleep(RETRY_BACKOFF);
        }
    }

    /// EndTxn: commits or aborts the open transaction (retrying while the coordinator is
    /// busy); with transactions v2 the answer carries the producer's next epoch.
    fn end_txn(&mut self, commit: bool) -> Result<(), SinkError> {
        let coordinator = self.coordinator()?;
        let mut req = EndTxnRequest::default();
        req.transactional_id = self.txn_id();
        req.producer_id = ProducerId(self.producer.producer_id);
        req.producer_epoch = self.producer.epoch;
        req.committed = commit;
        let want = if self.v2 { 5 } else { 4 };
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let conn = self.conn(coordinator)?;
            let version = conn.version::<EndTxnRequest>(want, want.min(3))?;
            let resp = conn.call(&req, version)?;
            if coordinator_answer("EndTxn", resp.error_code, deadline, SinkError::Aborted)? {
                if self.v2 {
                    // The epoch moved on: sequence numbers start again.
                    self.producer.producer_id = resp.producer_id.0;
                    self.producer.epoch = resp.producer_epoch;
                    self.producer.sequences.clear();
                }
                return Ok(());
            }
            std::thread::sleep(RETRY_BACKOFF);
        }
    }

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

impl Backend for WireBackend {
    fn open(&mut self, key: &str) -> Result<Option<Checkpoint>, SinkError> {
        self.tls = tls_config(&self.settings)?;
        self.sasl = sasl_config(&self.settings)?;
        let node = self.bootstrap()?;
        let tv = self.conn(node)?.transaction_version;
        self.v2 = match self.want_transaction_version {
            0 => tv >= 2,
            2 if tv < 2 => {
                return Err(SinkError::Config(format!(
                    "kafka.wire_transaction_version = 2, but the cluster's finalized transaction.version is {tv}"
                )))
            }
            v => v >= 2,
        };
        let topic: Arc<str> = Arc::from(self.settings.checkpoint_topic.as_str());
        self.admin.ensure_topic(&topic, 1, true)?;
        self.topic(&topic)?;
        // Both ids are fenced whatever `kafka.transactional_producers` says: a relay that ran
        // with two producers in turn (either client) used `<id>.alt` too, and a transaction
        // it left open there would hold the checkpoint topic's read_committed end back until
        // the broker timed it out.
        let two = self.settings.transactional_producers >= 2;
        let mut own = Producer::new(self.settings.transactional_id.clone());
        let mut alt = Producer::new(format!("{}.alt", self.settings.transactional_id));
        match self.init_producer_id(&alt.transactional_id.clone()) {
            Ok((id, epoch)) => (alt.producer_id, alt.epoch) = (id, epoch),
            // With one producer the relay's principal may hold an ACL for `<id>` only, and
            // then nothing can have used `<id>.alt` either.
            Err(SinkError::Fatal(e))
                if !two && e.contains(&error_name(code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)) =>
            {
                tracing::debug!(error = %e, "not allowed to fence <id>.alt; with one producer it is not used");
            }
            Err(e) => return Err(e),
        }
        (own.producer_id, own.epoch) = self.init_producer_id(&own.transactional_id.clone())?;
        self.producer = own;
        self.standby = two.then_some(alt);
        tracing::info!(
            transaction_version = self.transaction_version(),
            producer_id = self.producer.producer_id,
            producers = 1 + usize::from(self.standby.is_some()),
            "Kafka wire client ready"
        );
        self.admin.read_checkpoint(key)
    }

    fn begin(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn send(&mut self, r: OutRecord) -> Result<(), SinkError> {
        let r = self.admin.admit_topic(r)?;
        let topic = r.topic.clone();
        let meta = match self.topic(&topic) {
            Ok(m) => m,
            Err(e) => {
                self.admin.remember_refusal(&topic, &e);
                return Err(e.refusing(r));
            }
        };
        if !self.max_batch.contains_key(&topic) {
            let limit = self.admin.topic_max_message_bytes(&topic)?;
            self.max_batch.insert(topic.clone(), limit);
        }
        let limit = self
            .max_batch
            .get(&topic)
            .copied()
            .unwrap_or(DEFAULT_MAX_BATCH);
        let partition = partition_for(&r.key, meta.leaders.len() as i32);
        let held = Held::from_out(r, Self::now_ms());
        let len = held.encoded_len();
        let size = BATCH_HEADER + len;
        if size > limit {
            return Err(SinkError::Rejected {
                reason: format!(
                    "the record (about {size} bytes in a batch of its own) is larger than topic {topic}'s max.message.bytes ({limit})"
                ),
                class: "record_too_large",
                keep_value: false,
                record: Returned(Some(Box::new(held.into_out(topic)))),
            });
        }
        self.held_bytes += len;
        self.held.entry((topic, partition)).or_default().push(held);
        // A large WAL transaction is one Kafka transaction: its records go out as they come
        // once they pass FLUSH_BYTES, so memory stays bounded whatever its size.
        if self.held_bytes >= FLUSH_BYTES {
            if !self.v2 {
                self.add_partitions()?;
            }
            self.produce_held()?;
        }
        Ok(())
    }

    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError> {
        let started = Instant::now();
        let topic: Arc<str> = Arc::from(self.settings.checkpoint_topic.as_str());
        let cp = Held {
            key: Bytes::from(checkpoint.relay.clone().into_bytes()),
            value: Bytes::from(checkpoint.encode()),
            headers: Vec::new(),
            timestamp: Self::now_ms(),
        };
        self.held.entry((topic, 0)).or_default().push(cp);
        if !self.v2 {
            self.add_partitions()?;
        }
        let added = started.elapsed();
        self.produce_held()?;
        let delivered = started.elapsed();
        self.delivered_after = Some(delivered);
        self.end_txn(true)?;
        self.added.clear();
        self.open_at_broker = false;
        // The next transaction runs on the other producer, if there is one: this one's commit
        // markers are being written now (as in `sink::kafka`, "Two producers in turn").
        if let Some(standby) = self.standby.as_mut() {
            std::mem::swap(&mut self.producer, standby);
        }
        tracing::debug!(
            added_ms = added.as_secs_f64() * 1e3,
            delivered_ms = delivered.as_secs_f64() * 1e3,
            committed_ms = started.elapsed().as_secs_f64() * 1e3,
            "committed"
        );
        Ok(())
    }

    fn abort(&mut self) -> Result<(), SinkError> {
        // Usually nothing has reached the broker (records are held until the commit), and
        // there is nothing to end there. A large transaction's first records may have: end it.
        // (A commit that failed half-way leaves the backend to be dropped, and the next one's
        // InitProducerId aborts what it left open.)
        self.held.clear();
        self.held_bytes = 0;
        self.added.clear();
        if std::mem::take(&mut self.open_at_broker) {
            self.end_txn(false)?;
        }
        Ok(())
    }

    fn delivered_after(&self) -> Option<Duration> {
        self.delivered_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    #[test]
    fn murmur2_matches_kafkas_java_client() {
        // Values printed by org.apache.kafka.common.utils.Utils.murmur2 (kafka-clients 4.1.1).
        for (input, want) in VECTORS {
            assert_eq!(murmur2(input.as_bytes()), *want, "murmur2({input:?})");
        }
    }

    /// (input, Utils.murmur2(input.getBytes(UTF_8))).
    const VECTORS: &[(&str, i32)] = &[
        ("", 275646681),
        ("a", -1563381124),
        ("ab", 316155434),
        ("abc", 479470107),
        ("abcd", -1323649548),
        ("order-1", 1221710326),
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        ("ünïcödé-key", 630497715),
        ("3f2c9a4e-1b7d-4c8e-9f00-000000000042", 1057649118),
    ];

    fn held(key: &str, value: &str, headers: &[(&str, &str)], ts: i64) -> Held {
        Held {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        Cow::Owned(k.to_string()),
                        Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
            timestamp: ts,
        }
    }

    #[test]
    fn a_batch_decodes_with_an_independent_decoder() {
        let records = vec![
            held(
                "order-1",
                "{\"a\":1}",
                &[("event_id", "e1"), ("trace", "t")],
                1_700_000_000_000,
            ),
            held("order-2", "", &[], 1_700_000_000_007),
            held("", &"x".repeat(300), &[("h", "")], 1_700_000_000_003),
        ];
        let w = Writer {
            producer_id: 4242,
            epoch: 7,
            base_sequence: 11,
        };
        let mut bytes = encode_batch(&records, w);
        let predicted = BATCH_HEADER + records.iter().map(Held::encoded_len).sum::<usize>();
        assert!(bytes.len() <= predicted, "{} > {predicted}", bytes.len());
        // The decoder checks the CRC-32C and the lengths.
        let set = RecordBatchDecoder::decode(&mut bytes).unwrap();
        assert_eq!(set.records.len(), 3);
        for (i, (r, h)) in set.records.iter().zip(&records).enumerate() {
            assert!(r.transactional);
            assert!(!r.control);
            assert_eq!(r.producer_id, 4242);
            assert_eq!(r.producer_epoch, 7);
            assert_eq!(r.sequence, 11 + i as i32);
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.timestamp, h.timestamp);
            assert_eq!(r.key.as_deref(), Some(&h.key[..]));
            assert_eq!(r.value.as_deref(), Some(&h.value[..]));
            let got: Vec<(String, Vec<u8>)> = r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().unwrap_or_default().to_vec()))
                .collect();
            let want: Vec<(String, Vec<u8>)> = h
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_held_record_hands_back_the_record_it_was() {
        let r = OutRecord {
            topic: Arc::from("t"),
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            headers: vec![
                ("event_id", Bytes::from_static(b"e")),
                ("event_type", Bytes::new()),
            ],
            extra_headers: vec![("trace".to_owned(), Bytes::from_static(b"x"))],
        };
        let held = Held::from_out(r.clone(), 1);
        assert_eq!(held.headers.len(), 3);
        assert_eq!(held.into_out(Arc::from("t")), r);
    }

    #[test]
    fn varints_are_zigzag_base128() {
        for (v, want) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (63, vec![0x7e]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (300, vec![0xd8, 0x04]),
        ] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(&b[..], &want[..], "{v}");
            assert_eq!(varint_len(v), want.len(), "{v}");
        }
        for v in [i64::MIN, i64::MAX, i64::from(i32::MIN), i64::from(i32::MAX)] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn partitions_are_in_range() {
        for k in ["", "a", "order-1", "a-little-bit-long-string"] {
            for n in [1, 6, 7, 1000] {
                let p = partition_for(k.as_bytes(), n);
                assert!((0..n).contains(&p), "{k} {n} -> {p}");
            }
        }
        assert_eq!(partition_for(b"x", 0), 0);
    }
}
