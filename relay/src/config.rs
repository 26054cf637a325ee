//! The daemon's configuration: one optional file (TOML or YAML) plus `RELAY_*` environment
//! variables, the environment winning.
//!
//! ```text
//!  built-in defaults  ◀──  --config relay.toml | relay.yaml  ◀──  RELAY_KAFKA__BOOTSTRAP_SERVERS=…
//!                                   (file)                          (env: `__` nests, wins)
//!          │
//!          ▼
//!  unknown keys?  ──▶  typed sections (serde)  ──▶  validate()  ──▶  RelayConfig
//!  (every one named)    (every bad value named)     (every rule broken named)
//! ```
//!
//! Every problem is reported as `<dotted.key>: <what is wrong>` so an operator can find the line,
//! and all problems are collected before returning: fixing a config one error per restart is the
//! kind of loop an on-call engineer should not be put through at 3 a.m.
//!
//! Durations are humantime strings (`"250ms"`, `"10s"`). Options for librdkafka that the typed
//! settings do not cover go in `kafka.librdkafka`; from the environment, their dots stay dots
//! (`RELAY_KAFKA__LIBRDKAFKA__LINGER.MS=5`, which `env`, systemd and Kubernetes accept even though
//! most shells' `export` does not).
//!
//! Secrets: the Postgres password may sit in `postgres.url`, but `postgres.password_file` (e.g. a
//! systemd credential) is preferred. Neither `Debug` nor the `Serialize` output used by
//! `relay check-config` ever shows a password: the URL's password and any librdkafka option whose
//! name contains `password` or `secret` (and `ssl.key.pem`, `sasl.oauthbearer.config`) are
//! replaced by `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use config::{Source, Value, ValueKind};

use crate::replication::conn::{ReplicationConfig, ReplicationError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What replaces a secret in every rendering of the configuration.
const REDACTED: &str = "***";

/// Environment variables with this prefix are configuration; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "RELAY_";
const ENV_SEPARATOR: &str = "__";
/// The CLI's own `--config` variable: it names the file and is not itself a configuration key.
pub const ENV_CONFIG_FILE: &str = "RELAY_CONFIG";

/// librdkafka options that a typed setting owns. Setting them through the passthrough map would
/// let the two disagree, and some (idempotence, isolation, auto-commit) carry the exactly-once
/// guarantee, so they are not the operator's to flip by accident.
const OWNED_LIBRDKAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.bootstrap_servers instead"),
    ("transactional.id", "set kafka.transactional_id instead"),
    (
        "transaction.timeout.ms",
        "set kafka.transaction_timeout instead",
    ),
    ("enable.idempotence", "always on: transactions need it"),
    (
        "isolation.level",
        "always read_committed: exactly-once readers need it",
    ),
    (
        "enable.auto.commit",
        "always off: the relay commits its own progress",
    ),
];

/// The broker's default `transaction.max.timeout.ms` (15 minutes): a producer asking for more
/// fails in `init_transactions`, so the check belongs here, before anything connects.
const MAX_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Which relay a setting or metric belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayKind {
    /// The logical-replication relay (`relay cdc`).
    Cdc,
    /// The table-polling relay (`relay poll`).
    Poll,
}

impl RelayKind {
    /// Both relays, for pre-initialising labelled metrics.
    pub const ALL: [RelayKind; 2] = [RelayKind::Cdc, RelayKind::Poll];

    /// The label value and subcommand name.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Cdc => "cdc",
            RelayKind::Poll => "poll",
        }
    }
}

/// One thing wrong with the configuration, named by its dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending key, e.g. `batch.max_events`; empty if no key applies.
    pub key: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why the configuration could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (I/O error or syntax error with its position).
        message: String,
    },
    /// The configuration was read but is wrong; every problem found is listed.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
    /// `postgres.password_file` names a file that cannot be read.
    #[error("postgres.password_file: cannot read {}: {source}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The individual problems (one for the variants that are not [`ConfigError::Invalid`]).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole configuration of the daemon. See `deploy/relay.example.toml` for every key.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// What the relays promise: `exactly_once` (the default: events and checkpoint in one Kafka
    /// transaction) or `at_least_once` (idempotent producer, checkpoint written after the
    /// events are acknowledged; a crash may repeat the unconfirmed tail). See `sink::kafka`.
    pub delivery: Delivery,
    /// Where the outbox lives.
    pub postgres: PostgresConfig,
    /// The logical-replication relay.
    pub cdc: CdcConfig,
    /// The outbox table and how its rows become Kafka records.
    pub outbox: OutboxConfig,
    /// Where events go.
    pub kafka: KafkaConfig,
    /// When a Kafka transaction closes.
    pub batch: BatchConfig,
    /// The polling relay.
    pub poll: PollConfig,
    /// The metrics and health endpoint.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Slot metrics read from `pg_replication_slots` (CDC).
    pub slot_watch: SlotWatchConfig,
}

/// `[postgres]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style URL, `postgres://user:pass@host:port/db?sslmode=...`. Required.
    pub url: DatabaseUrl,
    /// A file holding the password (e.g. a systemd credential); overrides the URL's password.
    pub password_file: Option<PathBuf>,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: DatabaseUrl::default(),
            password_file: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the path of the password file is shown: its contents are never read into this
        // struct, so they cannot leak through it.
        f.debug_struct("PostgresConfig")
            .field("url", &self.url)
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl PostgresConfig {
    /// The connection settings every Postgres connection of the relay uses (replication and
    /// SQL): the URL parsed by the code that connects, the password from `password_file` when
    /// set (trailing newline trimmed, as editors and `echo` add one), the connect timeout.
    ///
    /// Reads the password file on every call, so a rotated credential is picked up on reconnect.
    pub fn connection(&self) -> Result<ReplicationConfig, ConfigError> {
        let mut cfg = ReplicationConfig::from_url(self.url.expose())
            .map_err(|e| ConfigError::Invalid(vec![url_problem(&e)]))?;
        if let Some(path) = &self.password_file {
            let password =
                std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            cfg.password = Some(password.trim_end_matches(['\r', '\n']).to_owned());
        }
        cfg.connect_timeout = self.connect_timeout;
        Ok(cfg)
    }
}

/// A `postgres.url` the connection code refuses. Its messages name the bad part, never a value
/// that could be a secret.
fn url_problem(e: &ReplicationError) -> Problem {
    let what = match e {
        ReplicationError::Config(what) => what.clone(),
        other => other.to_string(),
    };
    Problem::new("postgres.url", what)
}

/// A Postgres connection URL whose password is never displayed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The URL with its password: only for handing to a Postgres client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl Serialize for DatabaseUrl {
    /// Serialises redacted: serialised configuration is for people to read (`check-config`).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Replaces the password in a URL's user info (`user:pw@`) and in a `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL: there is no safe way to find a password in it, so show nothing.
        return if url.is_empty() {
            String::new()
        } else {
            REDACTED.to_owned()
        };
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            let user_info = &authority[..at];
            match user_info.find(':') {
                Some(colon) => {
                    out.push_str(&user_info[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(user_info),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_len..];
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}={REDACTED}")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// `[cdc]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdcConfig {
    /// Logical replication slot name.
    pub slot: String,
    /// Publication the slot streams.
    pub publication: String,
    /// Create the slot at start-up if it does not exist.
    pub create_slot: bool,
    /// `pg_logical_emit_message` prefix whose messages are relayed as events.
    pub message_prefix: String,
    /// How often to emit a heartbeat message; zero disables heartbeats.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// `pg_logical_emit_message` prefix of heartbeats (never relayed).
    pub heartbeat_prefix: String,
    /// How often to send a standby status update when nothing else prompts one.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// pgoutput `proto_version`.
    pub proto_version: u32,
    /// Bytes of streamed (`proto_version` 2) transactions held in memory until they commit;
    /// past it the largest is spilled to a temporary file.
    pub stream_memory_budget: usize,
    /// Directory of those spill files; the system's temporary directory when unset.
    pub spill_dir: Option<PathBuf>,
    /// On the first start (no checkpoint yet), publish the outbox rows that already exist
    /// (`all`), or only what commits after the slot (`none`). A slot sees only what commits
    /// after it was created; without the backfill, rows written before are never relayed.
    pub initial_backfill: InitialBackfill,
    /// When the slot was lost or dropped while a checkpoint exists, recover instead of refusing:
    /// a new slot, and the outbox rows the checkpoint does not prove delivered published from
    /// the table (RUNBOOK.md, 'Lost slot'). Also `relay cdc --recover-lost-slot`.
    pub recover_lost_slot: bool,
}

/// `cdc.initial_backfill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitialBackfill {
    /// Every row of the outbox table as of the first start.
    #[default]
    All,
    /// None: only what commits after the slot exists.
    None,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            slot: "outbox_relay".to_owned(),
            publication: "outbox_pub".to_owned(),
            create_slot: true,
            message_prefix: "outbox".to_owned(),
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_prefix: "outbox_relay_heartbeat".to_owned(),
            status_interval: Duration::from_secs(10),
            proto_version: 1,
            stream_memory_budget: 16 << 20,
            spill_dir: None,
            initial_backfill: InitialBackfill::All,
            recover_lost_slot: false,
        }
    }
}

impl CdcConfig {
    /// The heartbeat interval, `None` when heartbeats are disabled (configured as zero).
    pub fn heartbeat(&self) -> Option<Duration> {
        (!self.heartbeat_interval.is_zero()).then_some(self.heartbeat_interval)
    }
}

pub use crate::outbox::{ColumnNames, ColumnSet, AGGREGATE_TYPE_PLACEHOLDER};

/// Declares the string form of a config enum, with an error message that lists the choices
/// (the config crate's own one names Rust types, which means nothing to an operator).
macro_rules! string_enum {
    ($ty:ty, $( $variant:path => $name:literal ),+ $(,)?) => {
        impl $ty {
            /// The configuration spelling.
            pub fn as_str(self) -> &'static str {
                match self { $( $variant => $name, )+ }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $name => Ok($variant), )+
                    other => Err(format!(
                        "expected one of {}, got `{other}`",
                        [$( concat!("`", $name, "`") ),+].join(", ")
                    )),
                }
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    };
}

string_enum!(ColumnSet, ColumnSet::Native => "native", ColumnSet::Debezium => "debezium");
string_enum!(KafkaClient, KafkaClient::Librdkafka => "librdkafka", KafkaClient::Wire => "wire");

/// `kafka.client`: which Kafka client the sink produces with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaClient {
    /// librdkafka (rust-rdkafka): TLS, SASL, compression, poison-record isolation.
    #[default]
    Librdkafka,
    /// Experimental: the relay's own Kafka protocol client (`sink::wire`), one produce request
    /// per broker and transactions v2; TLS and SASL PLAIN/SCRAM, exactly-once, uncompressed.
    Wire,
}

string_enum!(Delivery, Delivery::ExactlyOnce => "exactly_once", Delivery::AtLeastOnce => "at_least_once");

/// `delivery`: the guarantee the relays give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Every event once: events and the checkpoint commit in one Kafka transaction.
    #[default]
    ExactlyOnce,
    /// Every event at least once: no Kafka transactions; the checkpoint is written after the
    /// events are acknowledged (acks=all), so a crash repeats what followed the last one.
    AtLeastOnce,
}
string_enum!(InitialBackfill, InitialBackfill::All => "all", InitialBackfill::None => "none");

/// `[outbox]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table, `schema.table` or `table`.
    pub table: String,
    /// Which column names the table uses.
    pub columns: ColumnSet,
    /// Topic name template; `{aggregate_type}` is replaced by the row's aggregate type.
    pub topic_template: String,
    /// Partitions of topics the relay creates.
    pub topic_partitions: u32,
    /// Create missing topics at start-up.
    pub create_topics: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            table: "public.outbox".to_owned(),
            columns: ColumnSet::Native,
            topic_template: "outbox.event.{aggregate_type}".to_owned(),
            topic_partitions: 6,
            create_topics: true,
        }
    }
}

impl OutboxConfig {
    /// The topic for an aggregate type.
    pub fn topic_for(&self, aggregate_type: &str) -> String {
        self.topic_template
            .replace(AGGREGATE_TYPE_PLACEHOLDER, aggregate_type)
    }
}

/// `[kafka]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`. Required.
    pub bootstrap_servers: String,
    /// Stable per relay instance; see [`RelayConfig::transactional_id`] for the default.
    pub transactional_id: Option<String>,
    /// The compacted, single-partition topic holding the relays' checkpoints.
    pub checkpoint_topic: String,
    /// Where outbox rows and messages that cannot be mapped to an event go (with the reason in a
    /// header), inside the same transaction: a poison row never blocks the relay nor is dropped.
    pub dlq_topic: String,
    /// librdkafka `transaction.timeout.ms`.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Exactly-once only: transactional producers used in turn, 1 or 2. With 2, a transaction
    /// never starts on the producer whose commit markers the broker is still writing (the
    /// second one's transactional id is `<transactional_id>.alt`); see `sink::kafka`.
    pub transactional_producers: u8,
    /// `librdkafka` (default) or `wire` (experimental; see `sink::wire`).
    pub client: KafkaClient,
    /// With `client = "wire"`: the transactions protocol, 1 or 2; 0 (default) = 2 when the
    /// cluster finalized `transaction.version` 2, else 1.
    pub wire_transaction_version: u8,
    /// Other librdkafka options, passed through unchanged.
    pub librdkafka: LibrdkafkaOptions,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: String::new(),
            transactional_id: None,
            checkpoint_topic: "outbox.relay.checkpoints".to_owned(),
            dlq_topic: "outbox.relay.dlq".to_owned(),
            transaction_timeout: Duration::from_secs(60),
            transactional_producers: 2,
            client: KafkaClient::default(),
            wire_transaction_version: 0,
            librdkafka: LibrdkafkaOptions::default(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("transactional_id", &self.transactional_id)
            .field("checkpoint_topic", &self.checkpoint_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("transactional_producers", &self.transactional_producers)
            .field("client", &self.client)
            .field("wire_transaction_version", &self.wire_transaction_version)
            .field("librdkafka", &self.librdkafka)
            .finish()
    }
}

/// Passthrough librdkafka options (`name -> value`).
///
/// Accepts the values as strings, numbers or booleans, and nested tables, which it flattens with
/// dots: the environment source splits `LINGER.MS` into `linger` / `ms`, and a TOML author may
/// write `[kafka.librdkafka.queue.buffering]`; both mean the same option.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LibrdkafkaOptions(BTreeMap<String, String>);

impl LibrdkafkaOptions {
    /// The options with their real values, for building the client.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets an option (tests and programmatic configuration).
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    fn redacted(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(k, v)| {
                // Besides passwords and secrets: an inline private key, and the OAUTHBEARER
                // configuration string, which may carry credentials.
                let secret = k.contains("password")
                    || k.contains("secret")
                    || matches!(k.as_str(), "ssl.key.pem" | "sasl.oauthbearer.config");
                (k.as_str(), if secret { REDACTED } else { v.as_str() })
            })
            .collect()
    }
}

impl fmt::Debug for LibrdkafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl Serialize for LibrdkafkaOptions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.redacted().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for LibrdkafkaOptions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = BTreeMap::new();
        deserializer.deserialize_map(FlattenVisitor {
            prefix: String::new(),
            out: &mut out,
        })?;
        Ok(LibrdkafkaOptions(out))
    }
}

/// Visits one table of librdkafka options, adding `prefix.key = value` for every leaf.
struct FlattenVisitor<'a> {
    prefix: String,
    out: &'a mut BTreeMap<String, String>,
}

/// A value in the options table: a leaf rendered as a string, or a nested table already flattened.
struct Leaf(Option<String>);

struct LeafSeed<'a> {
    prefix: String,
    out: &'a mut BTreeMap<String, String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for LeafSeed<'_> {
    type Value = Leaf;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Leaf, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for LeafSeed<'_> {
    type Value = Leaf;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number, boolean or table of librdkafka options")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Leaf, E> {
        Ok(Leaf(Some(v.to_owned())))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Leaf, E> {
        Ok(Leaf(Some(v)))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Leaf, E> {
        Ok(Leaf(Some(v.to_string())))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Leaf, E> {
        Ok(Leaf(Some(v.to_string())))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Leaf, E> {
        Ok(Leaf(Some(v.to_string())))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Leaf, E> {
        Ok(Leaf(Some(v.to_string())))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Leaf, A::Error> {
        FlattenVisitor {
            prefix: self.prefix,
            out: self.out,
        }
        .visit_map(map)?;
        Ok(Leaf(None))
    }
}

impl<'de> serde::de::Visitor<'de> for FlattenVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table of librdkafka options")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let name = if self.prefix.is_empty() {
                key
            } else {
                format!("{}.{key}", self.prefix)
            };
            let seed = LeafSeed {
                prefix: name.clone(),
                out: self.out,
            };
            if let Leaf(Some(value)) = map.next_value_seed(seed)? {
                self.out.insert(name, value);
            }
        }
        Ok(())
    }
}

/// `[batch]`: a Kafka transaction closes when any limit is reached (whole WAL transactions are
/// never split, so a single large one may exceed the count or byte limit).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Close after this many events.
    pub max_events: usize,
    /// Close after this many payload bytes.
    pub max_bytes: usize,
    /// Close this long after the first event.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Kafka transactions a second the relay stays under on average (0: unpaced); above it
    /// batches grow instead of closing more often. See `pipeline::Pacing`.
    pub max_commit_rate: f64,
    /// Commits allowed back to back after a quiet spell before the rate applies (at least 1).
    pub commit_burst: u32,
}

impl BatchConfig {
    /// The time between two commits at `max_commit_rate`: `None` when unpaced (0), not a
    /// positive number, or so small a rate that the interval is beyond any `Duration`. The one
    /// place the rate becomes an interval: the validation below and `pipeline::Pacing` use it.
    pub fn commit_interval(rate: f64) -> Option<Duration> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        Duration::try_from_secs_f64(1.0 / rate).ok()
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_events: 1000,
            max_bytes: 1024 * 1024,
            max_delay: Duration::from_millis(1),
            // Measured in docs/eos-levers.md (Lever 5): at 1,000 events/s the broker's CPU per
            // event falls to ~40 % of the unpaced relay's (26-29 against 68 s per 100k events),
            // for 25-32 ms more at p50.
            max_commit_rate: 20.0,
            commit_burst: 4,
        }
    }
}

/// `[poll]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    /// Pause after a poll that found fewer rows than `batch_size` (one that found a full batch
    /// is followed by the next poll at once).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// While polls find nothing, the pause doubles from `interval` up to this.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Rows per query.
    pub batch_size: u32,
    /// Instance name: part of the transactional id and the checkpoint key.
    pub name: String,
    /// Delete delivered rows (below this relay's committed cursor) older than
    /// `janitor_retention`. Off by default; enable it only on a polling relay that is the only
    /// one reading its table (other polling relays' cursors are not known to it).
    pub janitor: bool,
    /// Delivered rows younger than this are kept (the window a CDC lost-slot recovery, or a
    /// re-publication, reads from the table).
    #[serde(with = "humantime_serde")]
    pub janitor_retention: Duration,
    /// Pause between janitor rounds.
    #[serde(with = "humantime_serde")]
    pub janitor_interval: Duration,
    /// Rows one janitor DELETE removes at most (small, so locks and WAL bursts stay small).
    pub janitor_batch: u32,
    /// LISTEN on this channel: a `NOTIFY` from the writers starts the next poll at once. Off
    /// when unset.
    pub notify_channel: Option<String>,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            interval: Duration::from_millis(50),
            max_interval: Duration::from_millis(500),
            batch_size: 1000,
            name: "default".to_owned(),
            janitor: false,
            janitor_retention: Duration::from_secs(3600),
            janitor_interval: Duration::from_secs(10),
            janitor_batch: 500,
            notify_channel: None,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`. Loopback by default: metrics are not for the
    /// internet; containers set `0.0.0.0:9187`.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9187)),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for journald/Loki/etc.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

string_enum!(LogFormat, LogFormat::Json => "json", LogFormat::Pretty => "pretty");

impl Default for LogFormat {
    /// Pretty for a person at a terminal, JSON for everything else (journald, containers).
    fn default() -> Self {
        if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG`, when set, overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: "info".to_owned(),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long the relay may take to finish its open Kafka transaction and exit.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout: Duration::from_secs(15),
        }
    }
}

/// `[slot_watch]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotWatchConfig {
    /// How often `pg_replication_slots` is read for the slot metrics.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Also watch every other slot of the database, and the physical slots: one forgotten slot
    /// fills the same disk.
    pub all_slots: bool,
}

impl Default for SlotWatchConfig {
    fn default() -> Self {
        SlotWatchConfig {
            interval: Duration::from_secs(10),
            all_slots: false,
        }
    }
}

impl RelayConfig {
    /// Loads from the optional file and the process environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<RelayConfig, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Loads from the optional file and the given environment (only `RELAY_*` variables are
    /// considered, except `RELAY_CONFIG`), then validates. Tests pass their own environment so
    /// they never race on the process's.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RelayConfig, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(file_source(path)?);
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE)
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        );
        let merged = builder.build().map_err(|e| file_error(path, e))?;
        let mut tree = merged.collect().map_err(|e| file_error(path, e))?;

        let mut problems = unknown_keys(&mut tree);
        let config = deserialize_collecting(tree, &mut problems);
        if let Some(config) = &config {
            problems.extend(config.problems());
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }

    /// Checks every rule; `Err` lists every broken one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The transactional id for a relay: the configured one, else `relay-<slot>` for CDC and
    /// `relay-poll-<name>` for polling. It must be stable across restarts of one instance (that
    /// is what fences a zombie) and distinct between instances.
    pub fn transactional_id(&self, relay: RelayKind) -> String {
        match (&self.kafka.transactional_id, relay) {
            (Some(id), _) => id.clone(),
            (None, RelayKind::Cdc) => format!("relay-{}", self.cdc.slot),
            (None, RelayKind::Poll) => format!("relay-poll-{}", self.poll.name),
        }
    }

    fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                p.push(Problem::new(key, message));
            }
        };

        // postgres
        let url = self.postgres.url.expose();
        if url.is_empty() {
            check(false, "postgres.url", "missing".to_owned());
        } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            check(
                false,
                "postgres.url",
                "must be a postgres:// or postgresql:// URL".to_owned(),
            );
        } else if let Err(e) = ReplicationConfig::from_url(url)
            .and_then(|pg| crate::replication::conn::check_tls_settings(&pg))
        {
            // The parser and the TLS set-up the relay connects with; `sslrootcert` is read.
            let problem = url_problem(&e);
            check(false, &problem.key, problem.message);
        }
        positive(
            &mut check,
            "postgres.connect_timeout",
            self.postgres.connect_timeout,
        );

        // cdc
        let slot = &self.cdc.slot;
        check(
            !slot.is_empty()
                && slot.len() <= 63
                && slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "cdc.slot",
            format!(
                "`{slot}` is not a valid replication slot name \
                 (lowercase letters, digits and underscores, at most 63)"
            ),
        );
        non_empty(&mut check, "cdc.publication", &self.cdc.publication);
        non_empty(&mut check, "cdc.message_prefix", &self.cdc.message_prefix);
        non_empty(
            &mut check,
            "cdc.heartbeat_prefix",
            &self.cdc.heartbeat_prefix,
        );
        // Equal prefixes would relay every heartbeat to Kafka as an event.
        check(
            self.cdc.heartbeat_prefix != self.cdc.message_prefix,
            "cdc.heartbeat_prefix",
            "must differ from cdc.message_prefix (heartbeats would be relayed as events)"
                .to_owned(),
        );
        positive(&mut check, "cdc.status_interval", self.cdc.status_interval);
        check(
            (1..=2).contains(&self.cdc.proto_version),
            "cdc.proto_version",
            format!(
                "must be 1 or 2, the pgoutput versions this relay decodes (got {})",
                self.cdc.proto_version
            ),
        );
        at_least(
            &mut check,
            "cdc.stream_memory_budget",
            self.cdc.stream_memory_budget,
            1 << 20,
        );
        if let Some(dir) = &self.cdc.spill_dir {
            check(
                dir.is_dir(),
                "cdc.spill_dir",
                format!("{} is not a directory", dir.display()),
            );
        }

        // outbox: the table name is interpolated into SQL by the polling relay, so only plain
        // identifiers are accepted, never quoting.
        check(
            is_table_name(&self.outbox.table),
            "outbox.table",
            format!(
                "`{}` is not a table name (`schema.table` or `table`: letters, digits, underscores)",
                self.outbox.table
            ),
        );
        let template = &self.outbox.topic_template;
        if !template.contains(AGGREGATE_TYPE_PLACEHOLDER) {
            check(
                false,
                "outbox.topic_template",
                format!("must contain {AGGREGATE_TYPE_PLACEHOLDER} (got `{template}`)"),
            );
        } else {
            check(
                is_topic_name(&self.outbox.topic_for("x")),
                "outbox.topic_template",
                format!("`{template}` makes invalid topic names (letters, digits, `.`, `_`, `-`)"),
            );
        }
        at_least(
            &mut check,
            "outbox.topic_partitions",
            self.outbox.topic_partitions,
            1,
        );

        // kafka
        non_empty(
            &mut check,
            "kafka.bootstrap_servers",
            &self.kafka.bootstrap_servers,
        );
        if let Some(id) = &self.kafka.transactional_id {
            non_empty(&mut check, "kafka.transactional_id", id);
        }
        check(
            is_topic_name(&self.kafka.checkpoint_topic),
            "kafka.checkpoint_topic",
            format!(
                "`{}` is not a valid topic name (letters, digits, `.`, `_`, `-`, at most 249)",
                self.kafka.checkpoint_topic
            ),
        );
        check(
            is_topic_name(&self.kafka.dlq_topic),
            "kafka.dlq_topic",
            format!(
                "`{}` is not a valid topic name (letters, digits, `.`, `_`, `-`, at most 249)",
                self.kafka.dlq_topic
            ),
        );
        let timeout = self.kafka.transaction_timeout;
        check(
            timeout >= Duration::from_secs(1) && timeout <= MAX_TRANSACTION_TIMEOUT,
            "kafka.transaction_timeout",
            format!(
                "must be between 1s and 15m, the broker's default transaction.max.timeout.ms (got {})",
                humantime_serde::re::humantime::format_duration(timeout)
            ),
        );
        check(
            (1..=2).contains(&self.kafka.transactional_producers),
            "kafka.transactional_producers",
            format!(
                "must be 1 or 2 (got {})",
                self.kafka.transactional_producers
            ),
        );
        check(
            self.kafka.wire_transaction_version <= 2,
            "kafka.wire_transaction_version",
            format!(
                "must be 0 (what the cluster finalized), 1 or 2 (got {})",
                self.kafka.wire_transaction_version
            ),
        );
        if self.kafka.client == KafkaClient::Wire {
            check(
                self.delivery == Delivery::ExactlyOnce,
                "kafka.client",
                "`wire` (experimental) produces in Kafka transactions only: set delivery = \"exactly_once\" or kafka.client = \"librdkafka\"".to_owned(),
            );
            let opt = |name: &str| {
                self.kafka
                    .librdkafka
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v)
            };
            let sasl = opt("security.protocol")
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("sasl_"));
            let known = opt("sasl.mechanism")
                .or(opt("sasl.mechanisms"))
                .is_some_and(|m| {
                    ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
                        .iter()
                        .any(|k| m.eq_ignore_ascii_case(k))
                });
            check(
                !sasl || known,
                "kafka.client",
                "`wire` (experimental) logs in with sasl.mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 only (no OAUTHBEARER or GSSAPI); use kafka.client = \"librdkafka\"".to_owned(),
            );
            let client_cert = [
                "ssl.certificate.location",
                "ssl.key.location",
                "ssl.keystore.location",
            ]
            .iter()
            .any(|k| opt(k).is_some());
            let no_name_check = opt("ssl.endpoint.identification.algorithm")
                .is_some_and(|v| v.eq_ignore_ascii_case("none"));
            check(
                !client_cert && !no_name_check,
                "kafka.client",
                "`wire` (experimental) verifies the broker's certificate and name (ssl.ca.location) and presents no client certificate: remove ssl.certificate.location / ssl.key.location / ssl.keystore.location and ssl.endpoint.identification.algorithm = none, or use kafka.client = \"librdkafka\"".to_owned(),
            );
            let uncompressed = self
                .kafka
                .librdkafka
                .iter()
                .filter(|(k, _)| matches!(*k, "compression.type" | "compression.codec"))
                .all(|(_, v)| v.eq_ignore_ascii_case("none"));
            check(
                uncompressed,
                "kafka.client",
                "`wire` (experimental) does not compress: remove kafka.librdkafka.compression.type or use kafka.client = \"librdkafka\"".to_owned(),
            );
        }
        for (name, _) in self.kafka.librdkafka.iter() {
            if let Some((_, hint)) = OWNED_LIBRDKAFKA_OPTIONS.iter().find(|(o, _)| *o == name) {
                check(
                    false,
                    &format!("kafka.librdkafka.{name}"),
                    (*hint).to_owned(),
                );
            }
        }

        // batch
        at_least(&mut check, "batch.max_events", self.batch.max_events, 1);
        at_least(&mut check, "batch.max_bytes", self.batch.max_bytes, 1024);
        check(
            self.batch.max_delay < timeout,
            "batch.max_delay",
            "must be shorter than kafka.transaction_timeout".to_owned(),
        );
        let rate = self.batch.max_commit_rate;
        check(
            rate.is_finite() && rate >= 0.0,
            "batch.max_commit_rate",
            format!("must be a number of commits a second, 0 for unpaced; got {rate}"),
        );
        check(
            !(rate > 0.0 && rate.is_finite())
                || BatchConfig::commit_interval(rate).is_some_and(|i| i < timeout),
            "batch.max_commit_rate",
            "one interval (1 / rate) must be shorter than kafka.transaction_timeout".to_owned(),
        );
        at_least(&mut check, "batch.commit_burst", self.batch.commit_burst, 1);

        // poll
        positive(&mut check, "poll.interval", self.poll.interval);
        check(
            self.poll.max_interval >= self.poll.interval,
            "poll.max_interval",
            "must not be shorter than poll.interval".to_owned(),
        );
        at_least(&mut check, "poll.batch_size", self.poll.batch_size, 1);
        positive(
            &mut check,
            "poll.janitor_interval",
            self.poll.janitor_interval,
        );
        at_least(&mut check, "poll.janitor_batch", self.poll.janitor_batch, 1);
        if let Some(channel) = &self.poll.notify_channel {
            check(
                !channel.is_empty() && channel.len() <= 63,
                "poll.notify_channel",
                "must be 1 to 63 bytes (a Postgres identifier)".to_owned(),
            );
        }
        let name = &self.poll.name;
        check(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')),
            "poll.name",
            format!("`{name}` must be 1 to 64 letters, digits, `.`, `_` or `-`"),
        );

        // log
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            check(
                false,
                "log.level",
                format!("not a valid filter directive ({e})"),
            );
        }

        // shutdown
        positive(&mut check, "shutdown.timeout", self.shutdown.timeout);

        // slot_watch
        positive(&mut check, "slot_watch.interval", self.slot_watch.interval);
        p
    }
}

fn non_empty(check: &mut impl FnMut(bool, &str, String), key: &str, value: &str) {
    check(
        !value.is_empty(),
        key,
        if key == "kafka.bootstrap_servers" {
            "missing".to_owned()
        } else {
            "must not be empty".to_owned()
        },
    );
}

fn positive(check: &mut impl FnMut(bool, &str, String), key: &str, value: Duration) {
    check(
        !value.is_zero(),
        key,
        "must be greater than zero".to_owned(),
    );
}

fn at_least<T: PartialOrd + fmt::Display>(
    check: &mut impl FnMut(bool, &str, String),
    key: &str,
    value: T,
    min: T,
) {
    let ok = value >= min;
    check(ok, key, format!("must be at least {min} (got {value})"));
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 63
}

fn is_table_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((schema, table)) => is_identifier(schema) && is_identifier(table),
        None => is_identifier(s),
    }
}

fn is_topic_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn file_source(
    path: &Path,
) -> Result<config::File<config::FileSourceFile, config::FileFormat>, ConfigError> {
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => config::FileFormat::Toml,
        Some("yaml" | "yml") => config::FileFormat::Yaml,
        _ => {
            return Err(ConfigError::File {
                path: path.to_owned(),
                message: "unknown file type: the name must end in .toml, .yaml or .yml".to_owned(),
            })
        }
    };
    // Checked here because the config crate's "not found" message does not say which file.
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::File {
            path: path.to_owned(),
            message: e.to_string(),
        });
    }
    Ok(config::File::from(path).format(format).required(true))
}

fn file_error(path: Option<&Path>, e: config::ConfigError) -> ConfigError {
    match path {
        Some(path) => ConfigError::File {
            path: path.to_owned(),
            message: e.to_string(),
        },
        None => ConfigError::Invalid(vec![Problem::new("", e.to_string())]),
    }
}

/// The tree of every key the configuration knows, from serialising the defaults.
fn known_keys() -> Value {
    let mut defaults = RelayConfig::default();
    // Optional keys serialise as nil; give them values so they appear as leaves.
    defaults.postgres.password_file = Some(PathBuf::new());
    defaults.cdc.spill_dir = Some(PathBuf::new());
    defaults.kafka.transactional_id = Some(String::new());
    // An empty table does not serialise at all; one entry keeps `kafka.librdkafka` known.
    defaults.kafka.librdkafka.insert("placeholder", "");
    let known = config::Config::try_from(&defaults).and_then(|c| c.collect());
    Value::new(None, ValueKind::Table(known.unwrap_or_default()))
}

/// Removes, and reports, every key that is not part of the configuration.
fn unknown_keys(tree: &mut config::Map<String, Value>) -> Vec<Problem> {
    let known = known_keys();
    let mut problems = Vec::new();
    prune_unknown(tree, &known, "", &mut problems);
    problems
}

fn prune_unknown(
    tree: &mut config::Map<String, Value>,
    known: &Value,
    prefix: &str,
    problems: &mut Vec<Problem>,
) {
    let ValueKind::Table(known_table) = &known.kind else {
        return;
    };
    let mut unknown = Vec::new();
    for (key, value) in tree.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known_table.get(key) {
            // The passthrough map is free-form: its names are librdkafka's business.
            Some(_) if path == "kafka.librdkafka" => {}
            Some(known_child) => {
                if let (ValueKind::Table(child), ValueKind::Table(_)) =
                    (&mut value.kind, &known_child.kind)
                {
                    prune_unknown(child, known_child, &path, problems);
                }
            }
            None => {
                let candidates: Vec<&str> = known_table.keys().map(String::as_str).collect();
                let mut message = "unknown key".to_owned();
                if value.origin() == Some("the environment") {
                    let var = format!(
                        "{ENV_PREFIX}{}",
                        path.to_uppercase().replace('.', ENV_SEPARATOR)
                    );
                    message.push_str(&format!(" (from {var})"));
                }
                // `RELAY_KAFKA_BOOTSTRAP_SERVERS` (one underscore) is the likeliest env mistake.
                let from_env = value.origin() == Some("the environment");
                let section = candidates
                    .iter()
                    .find(|s| prefix.is_empty() && key.starts_with(&format!("{s}_")));
                if let (true, Some(section)) = (from_env, section) {
                    let rest = &key[section.len() + 1..];
                    message.push_str(&format!(
                        "; levels are separated by `__`: did you mean {ENV_PREFIX}{}{ENV_SEPARATOR}{}?",
                        section.to_uppercase(),
                        rest.to_uppercase()
                    ));
                } else if let Some(best) = closest(key, &candidates) {
                    let best_path = if prefix.is_empty() {
                        best.to_owned()
                    } else {
                        format!("{prefix}.{best}")
                    };
                    message.push_str(&format!("; did you mean {best_path}?"));
                }
                problems.push(Problem::new(path, message));
                unknown.push(key.clone());
            }
        }
    }
    for key in unknown {
        tree.remove(&key);
    }
}

/// The known key nearest to a typo, if it is near enough to be the likely intent.
fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(key, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Deserialises the tree; on a bad value, records it, drops that key (so its default applies)
/// and tries again, so one run reports every bad value rather than the first.
fn deserialize_collecting(
    mut tree: config::Map<String, Value>,
    problems: &mut Vec<Problem>,
) -> Option<RelayConfig> {
    // Each round removes one key, so this terminates; the bound is a guard against a key the
    // error names but the tree does not hold (then removing it changes nothing).
    for _ in 0..64 {
        let value = Value::new(None, ValueKind::Table(tree.clone()));
        match RelayConfig::deserialize(value) {
            Ok(config) => return Some(config),
            Err(e) => {
                let problem = problem_from(e);
                let removed = remove_path(&mut tree, &problem.key);
                problems.push(problem);
                if !removed {
                    return None;
                }
            }
        }
    }
    None
}

fn problem_from(e: config::ConfigError) -> Problem {
    match e {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => Problem::new(key, error.to_string()),
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => Problem::new(
            key,
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        config::ConfigError::NotFound(key) => Problem::new(key, "missing"),
        other => Problem::new("", other.to_string()),
    }
}

fn remove_path(tree: &mut config::Map<String, Value>, path: &str) -> bool {
    if path.is_empty() {
        return false;
    }
    // Try the whole remainder as one key first: librdkafka option names contain dots.
    if tree.remove(path).is_some() {
        return true;
    }
    let Some((head, rest)) = path.split_once('.') else {
        return false;
    };
    match tree.get_mut(head).map(|v| &mut v.kind) {
        Some(ValueKind::Table(child)) => remove_path(child, rest),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const URL: &str = "postgres://relay:s3cret@127.0.0.1:5432/app?sslmode=disable";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn required() -> Vec<(String, String)> {
        env(&[
            ("RELAY_POSTGRES__URL", URL),
            ("RELAY_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        ])
    }

    fn file(ext: &str, body: &str) -> tempfile_lite::TempFile {
        tempfile_lite::TempFile::new(ext, body)
    }

    /// A temporary file removed on drop (no tempfile dependency for one helper).
    mod tempfile_lite {
        use super::*;
        pub struct TempFile(pub PathBuf);
        impl TempFile {
            pub fn new(ext: &str, body: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "relay-config-test-{}-{}.{ext}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(body.as_bytes()).unwrap();
                TempFile(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn problems_of(result: Result<RelayConfig, ConfigError>) -> Vec<String> {
        result
            .expect_err("expected an invalid configuration")
            .problems()
    }

    #[test]
    fn defaults() {
        let c = RelayConfig::load_from(None, required()).unwrap();
        assert_eq!(c.postgres.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.postgres.password_file, None);
        assert_eq!(c.cdc.slot, "outbox_relay");
        assert_eq!(c.cdc.publication, "outbox_pub");
        assert!(c.cdc.create_slot);
        assert_eq!(c.cdc.message_prefix, "outbox");
        assert_eq!(c.cdc.heartbeat(), Some(Duration::from_secs(10)));
        assert_eq!(c.cdc.heartbeat_prefix, "outbox_relay_heartbeat");
        assert_eq!(c.cdc.status_interval, Duration::from_secs(10));
        assert_eq!(c.cdc.proto_version, 1);
        assert_eq!(c.outbox.table, "public.outbox");
        assert_eq!(c.outbox.columns, ColumnSet::Native);
        assert_eq!(c.outbox.topic_for("order"), "outbox.event.order");
        assert_eq!(c.outbox.topic_partitions, 6);
        assert!(c.outbox.create_topics);
        assert_eq!(c.kafka.checkpoint_topic, "outbox.relay.checkpoints");
        assert_eq!(c.kafka.transaction_timeout, Duration::from_secs(60));
        assert_eq!(c.transactional_id(RelayKind::Cdc), "relay-outbox_relay");
        assert_eq!(c.transactional_id(RelayKind::Poll), "relay-poll-default");
        assert_eq!(c.batch.max_events, 1000);
        assert_eq!(c.batch.max_bytes, 1 << 20);
        assert_eq!(c.batch.max_delay, Duration::from_millis(1));
        assert_eq!(c.poll.interval, Duration::from_millis(50));
        assert_eq!(c.poll.batch_size, 1000);
        assert_eq!(c.http.listen, "127.0.0.1:9187".parse().unwrap());
        assert_eq!(c.log.level, "info");
        let expected_format = if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        };
        assert_eq!(c.log.format, expected_format);
        assert_eq!(c.shutdown.timeout, Duration::from_secs(15));
    }

    #[test]
    fn file_then_env_overrides() {
        let f = file(
            "toml",
            r#"
            [postgres]
            url = "postgres://relay@db:5432/app"
            [kafka]
            bootstrap_servers = "from-file:9092"
            transactional_id = "relay-a"
            [kafka.librdkafka]
            "linger.ms" = 5
            [batch]
            max_events = 10
            max_delay = "250ms"
            [outbox]
            columns = "debezium"
            "#,
        );
        let c = RelayConfig::load_from(
            Some(&f.0),
            env(&[
                ("RELAY_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092"),
                ("RELAY_BATCH__MAX_EVENTS", "20"),
                ("RELAY_KAFKA__LIBRDKAFKA__COMPRESSION.TYPE", "zstd"),
                ("RELAY_CONFIG", "/ignored/because/it/names/the/file.toml"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "from-env:9092");
        assert_eq!(c.batch.max_events, 20);
        assert_eq!(c.batch.max_delay, Duration::from_millis(250));
        assert_eq!(c.transactional_id(RelayKind::Cdc), "relay-a");
        assert_eq!(c.outbox.columns.names().aggregate_type, "aggregatetype");
        assert_eq!(c.outbox.columns.names().headers, None);
        let opts: Vec<_> = c.kafka.librdkafka.iter().collect();
        assert_eq!(opts, [("compression.type", "zstd"), ("linger.ms", "5")]);
    }

    #[test]
    fn yaml_file() {
        let f = file(
            "yaml",
            "postgres:\n  url: postgres://u@h/db\nkafka:\n  bootstrap_servers: k:9092\ncdc:\n  slot: s1\n",
        );
        let c = RelayConfig::load_from(Some(&f.0), env(&[])).unwrap();
        assert_eq!(c.cdc.slot, "s1");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let problems = problems_of(RelayConfig::load_from(None, env(&[])));
        assert_eq!(
            problems,
            ["postgres.url: missing", "kafka.bootstrap_servers: missing"]
        );
    }

    #[test]
    fn every_validation_error_names_its_key() {
        let mut e = required();
        e.extend(env(&[
            ("RELAY_BATCH__MAX_EVENTS", "0"),
            ("RELAY_BATCH__MAX_BYTES", "100"),
            ("RELAY_BATCH__MAX_COMMIT_RATE", "-3"),
            ("RELAY_BATCH__COMMIT_BURST", "0"),
            ("RELAY_CDC__SLOT", "My-Slot"),
            ("RELAY_CDC__PROTO_VERSION", "9"),
            ("RELAY_CDC__STREAM_MEMORY_BUDGET", "4096"),
            ("RELAY_CDC__SPILL_DIR", "/nonexistent/spill"),
            ("RELAY_CDC__HEARTBEAT_PREFIX", "outbox"),
            ("RELAY_OUTBOX__TOPIC_TEMPLATE", "events"),
            ("RELAY_OUTBOX__TABLE", "public.outbox; drop table x"),
            ("RELAY_KAFKA__TRANSACTION_TIMEOUT", "1h"),
            ("RELAY_KAFKA__LIBRDKAFKA__TRANSACTIONAL.ID", "x"),
            ("RELAY_KAFKA__LIBRDKAFKA__ENABLE.IDEMPOTENCE", "false"),
            ("RELAY_POLL__NAME", "a b"),
            ("RELAY_LOG__LEVEL", "relay=loud"),
            ("RELAY_SHUTDOWN__TIMEOUT", "0s"),
        ]));
        let problems = problems_of(RelayConfig::load_from(None, e));
        let expect = [
            "batch.max_events: must be at least 1 (got 0)",
            "batch.max_bytes: must be at least 1024 (got 100)",
            "batch.max_commit_rate: must be a number of commits a second, 0 for unpaced; got -3",
            "batch.commit_burst: must be at least 1 (got 0)",
            "cdc.slot: `My-Slot` is not a valid replication slot name (lowercase letters, digits and underscores, at most 63)",
            "cdc.proto_version: must be 1 or 2, the pgoutput versions this relay decodes (got 9)",
            "cdc.stream_memory_budget: must be at least 1048576 (got 4096)",
            "cdc.spill_dir: /nonexistent/spill is not a directory",
            "cdc.heartbeat_prefix: must differ from cdc.message_prefix",
            "outbox.topic_template: must contain {aggregate_type}",
            "outbox.table: ",
            "kafka.transaction_timeout: must be between 1s and 15m",
            "kafka.librdkafka.transactional.id: set kafka.transactional_id instead",
            "kafka.librdkafka.enable.idempotence: always on",
            "poll.name: ",
            "log.level: not a valid filter directive",
            "shutdown.timeout: must be greater than zero",
        ];
        for want in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(want)),
                "no problem starting with {want:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn a_vanishing_commit_rate_is_an_error_not_a_panic() {
        // 1 / 1e-20 s is beyond any Duration: converting it unchecked would abort the relay.
        let mut e = required();
        e.extend(env(&[("RELAY_BATCH__MAX_COMMIT_RATE", "1e-20")]));
        let problems = problems_of(RelayConfig::load_from(None, e));
        assert_eq!(
            problems,
            ["batch.max_commit_rate: one interval (1 / rate) must be shorter than kafka.transaction_timeout"],
        );
        assert_eq!(BatchConfig::commit_interval(1e-20), None);
        assert_eq!(
            BatchConfig::commit_interval(20.0),
            Some(Duration::from_millis(50))
        );
    }

    #[test]
    fn the_wire_client_refuses_what_it_cannot_do() {
        let mut e = required();
        e.extend(env(&[
            ("RELAY_KAFKA__CLIENT", "wire"),
            ("RELAY_DELIVERY", "at_least_once"),
            ("RELAY_KAFKA__LIBRDKAFKA__SECURITY__PROTOCOL", "SASL_SSL"),
            ("RELAY_KAFKA__WIRE_TRANSACTION_VERSION", "3"),
            ("RELAY_KAFKA__LIBRDKAFKA__COMPRESSION__TYPE", "zstd"),
        ]));
        let problems = problems_of(RelayConfig::load_from(None, e));
        assert_eq!(
            problems,
            [
                "kafka.wire_transaction_version: must be 0 (what the cluster finalized), 1 or 2 (got 3)",
                "kafka.client: `wire` (experimental) produces in Kafka transactions only: set delivery = \"exactly_once\" or kafka.client = \"librdkafka\"",
                "kafka.client: `wire` (experimental) logs in with sasl.mechanism PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 only (no OAUTHBEARER or GSSAPI); use kafka.client = \"librdkafka\"",
                "kafka.client: `wire` (experimental) does not compress: remove kafka.librdkafka.compression.type or use kafka.client = \"librdkafka\"",
            ],
        );
        let mut e = required();
        e.extend(env(&[
            ("RELAY_KAFKA__CLIENT", "wire"),
            ("RELAY_KAFKA__LIBRDKAFKA__SECURITY__PROTOCOL", "plaintext"),
            ("RELAY_KAFKA__LIBRDKAFKA__COMPRESSION__TYPE", "none"),
        ]));
        let c = RelayConfig::load_from(None, e).unwrap();
        c.validate().unwrap();
        assert_eq!(c.kafka.client, KafkaClient::Wire);
        assert_eq!(
            RelayConfig::load_from(None, required())
                .unwrap()
                .kafka
                .client,
            KafkaClient::Librdkafka
        );
    }

    #[test]
    fn bad_values_are_all_reported_with_their_keys() {
        let mut e = required();
        e.extend(env(&[
            ("RELAY_BATCH__MAX_EVENTS", "many"),
            ("RELAY_POSTGRES__CONNECT_TIMEOUT", "soon"),
            ("RELAY_HTTP__LISTEN", "localhost"),
            ("RELAY_LOG__FORMAT", "xml"),
        ]));
        let problems = problems_of(RelayConfig::load_from(None, e));
        for key in [
            "batch.max_events: ",
            "postgres.connect_timeout: ",
            "http.listen: ",
            "log.format: expected one of `json`, `pretty`, got `xml`",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key:?} not in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 4, "{problems:#?}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = file(
            "toml",
            r#"
            bogus = 1
            [kafka]
            bootstrap_server = "typo:9092"
            [batch]
            max_event = 5
            "#,
        );
        let mut e = required();
        e.push(("RELAY_CDC__SLOTT".to_owned(), "x".to_owned()));
        e.push(("RELAY_BATCH_MAX_EVENTS".to_owned(), "5".to_owned()));
        let problems = problems_of(RelayConfig::load_from(Some(&f.0), e));
        let mut sorted = problems.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "batch.max_event: unknown key; did you mean batch.max_events?",
                "batch_max_events: unknown key (from RELAY_BATCH_MAX_EVENTS); levels are separated by `__`: did you mean RELAY_BATCH__MAX_EVENTS?",
                "bogus: unknown key",
                "cdc.slott: unknown key (from RELAY_CDC__SLOTT); did you mean cdc.slot?",
                "kafka.bootstrap_server: unknown key; did you mean kafka.bootstrap_servers?",
            ]
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        let missing = Path::new("/nonexistent/relay.toml");
        let err = RelayConfig::load_from(Some(missing), required()).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/relay.toml: "),
            "{err}"
        );
        let f = file("ini", "x=1");
        let err = RelayConfig::load_from(Some(&f.0), required()).unwrap_err();
        assert!(err.to_string().contains("must end in .toml"), "{err}");
        let f = file("toml", "[batch\nmax_events = 1");
        let err = RelayConfig::load_from(Some(&f.0), required()).unwrap_err();
        assert!(
            err.to_string().starts_with(&f.0.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn debug_and_serialize_never_show_passwords() {
        let mut e = required();
        e.push((
            "RELAY_KAFKA__LIBRDKAFKA__SASL.PASSWORD".to_owned(),
            "kafka-secret".to_owned(),
        ));
        e.push((
            "RELAY_KAFKA__LIBRDKAFKA__SSL.KEY.PEM".to_owned(),
            "-----BEGIN PRIVATE KEY----- key-bytes".to_owned(),
        ));
        e.push((
            "RELAY_KAFKA__LIBRDKAFKA__SASL.OAUTHBEARER.CONFIG".to_owned(),
            "principal=relay token-bytes".to_owned(),
        ));
        e.push((
            "RELAY_POSTGRES__PASSWORD_FILE".to_owned(),
            "/run/credentials/relay/pg".to_owned(),
        ));
        let c = RelayConfig::load_from(None, e).unwrap();
        let debug = format!("{c:?} {c:#?}");
        let json = serde_json::to_string(&c).unwrap();
        for shown in [&debug, &json] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("kafka-secret"), "{shown}");
            assert!(!shown.contains("key-bytes"), "{shown}");
            assert!(!shown.contains("token-bytes"), "{shown}");
            assert!(
                shown.contains("postgres://relay:***@127.0.0.1:5432/app"),
                "{shown}"
            );
        }
        assert_eq!(c.postgres.url.expose(), URL);
    }

    #[test]
    fn redact_url_forms() {
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h:5432"), "postgres://h:5432");
        assert_eq!(
            redact_url("postgresql://u:p:x@h/db?sslmode=require&password=p2"),
            "postgresql://u:***@h/db?sslmode=require&password=***"
        );
        assert_eq!(redact_url("host=h password=p"), "***");
    }

    #[test]
    fn password_file_overrides_url_password() {
        let secret = file("txt", "from-file\n");
        let mut e = required();
        e.push((
            "RELAY_POSTGRES__PASSWORD_FILE".to_owned(),
            secret.0.display().to_string(),
        ));
        let c = RelayConfig::load_from(None, e).unwrap();
        let pg = c.postgres.connection().unwrap();
        assert_eq!(pg.password.as_deref(), Some("from-file"));
        assert_eq!(pg.connect_timeout, Duration::from_secs(10));
        assert_eq!((pg.user.as_str(), pg.dbname.as_str()), ("relay", "app"));
    }

    #[test]
    fn the_url_is_checked_by_the_code_that_connects() {
        let problems = |url: &str| {
            let mut e = required();
            e[0].1 = url.to_owned();
            match RelayConfig::load_from(None, e) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems(),
            }
        };
        assert!(problems("postgres://u@h/db?sslmode=verify-full").is_empty());
        let missing =
            problems("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(
            missing.len() == 1
                && missing[0].contains("postgres.url")
                && missing[0].contains("/nonexistent/ca.pem"),
            "{missing:?}"
        );
        let unknown = problems("postgres://u:s3cret@h/db?sslcert=/x.pem");
        assert!(
            unknown.len() == 1 && unknown[0].contains("sslcert"),
            "{unknown:?}"
        );
        assert!(!unknown[0].contains("s3cret"), "{unknown:?}");
        let mode = problems("postgres://u@h/db?sslmode=verify-ca");
        assert!(mode.len() == 1 && mode[0].contains("verify-ca"), "{mode:?}");
    }

    #[test]
    fn example_file_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.example.toml");
        let c = RelayConfig::load_from(Some(&path), env(&[])).unwrap();
        c.validate().unwrap();
        let d = RelayConfig::load_from(None, required()).unwrap();
        // The example documents the defaults: anything it sets differently is a doc bug.
        assert_eq!(c.cdc.slot, d.cdc.slot);
        assert_eq!(c.cdc.stream_memory_budget, d.cdc.stream_memory_budget);
        assert_eq!(c.batch.max_bytes, d.batch.max_bytes);
        assert_eq!(c.kafka.transaction_timeout, d.kafka.transaction_timeout);
        assert_eq!(c.delivery, d.delivery);
        assert_eq!(
            c.kafka.transactional_producers,
            d.kafka.transactional_producers
        );
        assert_eq!(c.kafka.client, d.kafka.client);
        assert_eq!(
            c.kafka.wire_transaction_version,
            d.kafka.wire_transaction_version
        );
        assert_eq!(c.shutdown.timeout, d.shutdown.timeout);
        assert_eq!(c.http.listen, d.http.listen);
        assert_eq!(c.slot_watch.interval, d.slot_watch.interval);
        assert_eq!(c.slot_watch.all_slots, d.slot_watch.all_slots);
        assert_eq!(c.poll.interval, d.poll.interval);
        assert_eq!(c.poll.max_interval, d.poll.max_interval);
        assert_eq!(c.poll.batch_size, d.poll.batch_size);
    }

    /// `result` is invalid with one problem starting with each of `want`, and no other.
    fn exactly_these_problems(result: Result<RelayConfig, ConfigError>, want: &[&str]) {
        let problems = problems_of(result);
        for w in want {
            assert!(
                problems.iter().any(|p| p.starts_with(w)),
                "no problem starting with {w:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }

    /// `relay check-config` validates the `[poll]` section: a valid one loads with its values,
    /// and every broken rule is named by its key.
    #[test]
    fn the_poll_section_is_validated() {
        let f = file(
            "toml",
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbootstrap_servers = \"k:9092\"\n\
             [poll]\ninterval = \"20ms\"\nmax_interval = \"2s\"\nbatch_size = 500\nname = \"eu-1\"\n",
        );
        let c = RelayConfig::load_from(Some(&f.0), env(&[])).unwrap();
        assert_eq!(c.poll.interval, Duration::from_millis(20));
        assert_eq!(c.poll.max_interval, Duration::from_secs(2));
        assert_eq!(c.poll.batch_size, 500);
        assert_eq!(c.transactional_id(RelayKind::Poll), "relay-poll-eu-1");

        let f = file(
            "toml",
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbootstrap_servers = \"k:9092\"\n\
             [poll]\ninterval = \"0s\"\nmax_interval = \"0s\"\nbatch_size = 0\nname = \"\"\nwait = 1\n",
        );
        let problems = problems_of(RelayConfig::load_from(Some(&f.0), env(&[])));
        assert!(
            problems.iter().any(|p| p.starts_with("poll.wait")),
            "unknown key named: {problems:#?}"
        );
        let f = file(
            "toml",
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbootstrap_servers = \"k:9092\"\n\
             [poll]\ninterval = \"1s\"\nmax_interval = \"100ms\"\nbatch_size = 0\nname = \"a/b\"\n",
        );
        exactly_these_problems(
            RelayConfig::load_from(Some(&f.0), env(&[])),
            &[
                "poll.max_interval: must not be shorter than poll.interval",
                "poll.batch_size: must be at least 1 (got 0)",
                "poll.name: `a/b` must be 1 to 64",
            ],
        );
        assert!(!c.poll.janitor, "the janitor is off by default");
        assert_eq!(c.poll.notify_channel, None);
        let mut e = required();
        e.extend(env(&[
            ("RELAY_POLL__JANITOR_BATCH", "0"),
            ("RELAY_POLL__JANITOR_INTERVAL", "0s"),
            ("RELAY_POLL__NOTIFY_CHANNEL", ""),
        ]));
        exactly_these_problems(
            RelayConfig::load_from(None, e),
            &[
                "poll.janitor_interval: must be greater than zero",
                "poll.janitor_batch: must be at least 1",
                "poll.notify_channel: must be 1 to 63 bytes",
            ],
        );
        let mut e = required();
        e.extend(env(&[("RELAY_POLL__INTERVAL", "0s")]));
        let problems = problems_of(RelayConfig::load_from(None, e));
        assert_eq!(
            problems,
            ["poll.interval: must be greater than zero"],
            "{problems:#?}"
        );
    }

    #[test]
    fn delivery_defaults_to_exactly_once_and_is_set_by_relay_delivery() {
        let c = RelayConfig::load_from(None, required()).unwrap();
        assert_eq!(c.delivery, Delivery::ExactlyOnce);
        let mut e = required();
        e.push(("RELAY_DELIVERY".into(), "at_least_once".into()));
        let c = RelayConfig::load_from(None, e).unwrap();
        assert_eq!(c.delivery, Delivery::AtLeastOnce);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["delivery"], "at_least_once", "check-config shows it");
        let mut e = required();
        e.push(("RELAY_DELIVERY".into(), "maybe".into()));
        let problems = problems_of(RelayConfig::load_from(None, e));
        assert!(
            problems.iter().any(
                |p| p.starts_with("delivery:") && p.contains("`exactly_once`, `at_least_once`")
            ),
            "{problems:#?}"
        );
    }
}
