//! Outbox rows and logical messages to event envelopes, and topic routing.
//!
//! Both relays (and the consumers and the bench) share this mapping, so a record looks the same
//! whichever relay wrote it:
//!
//! - topic: `topic_template` with `{aggregate_type}` replaced (default
//!   `outbox.event.{aggregate_type}`, Debezium's default);
//! - key: `aggregate_id` bytes (the unit of order); value: `payload` JSON bytes, unchanged;
//! - headers: `event_id`, `event_type`, `aggregate_type`, the source position (`lsn` and `xid`
//!   for CDC, `txid` and `id` for polling), `commit_ts` (microseconds since the Unix epoch),
//!   then the row's own `headers` object (its keys may not replace the ones above).

use bytes::Bytes;
use std::sync::Arc;

pub use crate::config::{ColumnNames, ColumnSet};

/// Where an event was read from; becomes headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// CDC: the LSN of the row's change (or the logical message) and the writing transaction.
    Wal { lsn: u64, xid: u32 },
    /// Polling: the row's transaction id and outbox id.
    Table { txid: u64, id: i64 },
}

/// One event, ready to be written to Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: Bytes,
    pub event_type: String,
    pub payload: Bytes,
    /// Extra headers from the row's `headers` object.
    pub headers: Vec<(String, String)>,
    pub source: Source,
    /// Commit time of the writing transaction, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
}

/// Header names the relay owns; a row's `headers` object cannot replace them.
pub const RESERVED_HEADERS: &[&str] = &[
    "event_id",
    "event_type",
    "aggregate_type",
    "lsn",
    "xid",
    "txid",
    "id",
    "commit_ts",
    "replay",
];

/// A Kafka record as the sink writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: Arc<str>,
    pub key: Bytes,
    pub value: Bytes,
    pub headers: Vec<(&'static str, Bytes)>,
    /// Extra headers with owned names (the row's `headers` object).
    pub extra_headers: Vec<(String, Bytes)>,
}

impl OutRecord {
    /// Bytes this record puts on the wire, roughly: key, value and headers.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self
                .extra_headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Topic routing: `aggregate_type` through the template.
#[derive(Clone, Debug)]
pub struct TopicRouter {
    prefix: String,
    suffix: String,
    cache: std::collections::HashMap<String, Arc<str>>,
}

use crate::config::AGGREGATE_TYPE_PLACEHOLDER;

impl TopicRouter {
    /// `template` must contain `{aggregate_type}` once (checked by the config's validation;
    /// without it every aggregate goes to the one topic the template names).
    pub fn new(template: &str) -> TopicRouter {
        let (prefix, suffix) = template
            .split_once(AGGREGATE_TYPE_PLACEHOLDER)
            .unwrap_or((template, ""));
        TopicRouter {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
            cache: Default::default(),
        }
    }

    /// The topic of `aggregate_type`. Characters Kafka does not allow in topic names become `_`.
    pub fn topic(&mut self, aggregate_type: &str) -> Arc<str> {
        if let Some(t) = self.cache.get(aggregate_type) {
            return t.clone();
        }
        let mut name =
            String::with_capacity(self.prefix.len() + aggregate_type.len() + self.suffix.len());
        name.push_str(&self.prefix);
        name.extend(aggregate_type.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        }));
        name.push_str(&self.suffix);
        name.truncate(249);
        let t: Arc<str> = name.into();
        // A bounded cache: aggregate types are few; a flood of distinct ones is not cached.
        if self.cache.len() < 10_000 {
            self.cache.insert(aggregate_type.to_owned(), t.clone());
        }
        t
    }
}

impl Event {
    /// The Kafka record of this event on `topic`.
    pub fn into_record(self, topic: Arc<str>) -> OutRecord {
        let mut headers: Vec<(&'static str, Bytes)> = Vec::with_capacity(7);
        headers.push(("event_id", Bytes::from(self.event_id)));
        headers.push(("event_type", Bytes::from(self.event_type)));
        headers.push(("aggregate_type", Bytes::from(self.aggregate_type)));
        match self.source {
            Source::Wal { lsn, xid } => {
                headers.push(("lsn", Bytes::from(crate::replication::Lsn(lsn).to_string())));
                headers.push(("xid", Bytes::from(xid.to_string())));
            }
            Source::Table { txid, id } => {
                headers.push(("txid", Bytes::from(txid.to_string())));
                headers.push(("id", Bytes::from(id.to_string())));
            }
        }
        headers.push(("commit_ts", Bytes::from(self.commit_ts_us.to_string())));
        let extra_headers = self
            .headers
            .into_iter()
            .filter(|(k, _)| !RESERVED_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect();
        OutRecord {
            topic,
            key: self.aggregate_id,
            value: self.payload,
            headers,
            extra_headers,
        }
    }
}

/// The row's `headers` column could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadersError {
    #[error("the headers column is not valid JSON: {0}")]
    Json(String),
    #[error("the headers column must be a JSON object of strings, found {0}")]
    NotAnObject(&'static str),
}

/// Parses a `headers` jsonb value: an object whose values are strings (other scalars are
/// rendered as JSON text; nested values too).
pub fn parse_headers(text: &[u8]) -> Result<Vec<(String, String)>, HeadersError> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| HeadersError::Json(e.to_string()))?;
    match v {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Object(map) => Ok(header_strings(map)),
        serde_json::Value::Array(_) => Err(HeadersError::NotAnObject("an array")),
        _ => Err(HeadersError::NotAnObject("a scalar")),
    }
}

/// A headers object as (name, value) strings: strings as they are, other values as JSON text.
fn header_strings(map: serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect()
}

/// The content of a `pg_logical_emit_message(true, '<prefix>', <json>)` event: a JSON object
/// with `aggregate_type`, `aggregate_id`, `event_type`, `payload` (any JSON) and optionally
/// `event_id` (a UUID) and `headers` (an object).
#[derive(Debug, serde::Deserialize)]
pub struct MessageEvent {
    pub event_id: Option<uuid::Uuid>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Box<serde_json::value::RawValue>,
    #[serde(default)]
    pub headers: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A logical message whose content is not a valid event.
#[derive(Debug, thiserror::Error)]
#[error("logical message is not an outbox event ({0}); expected a JSON object with aggregate_type, aggregate_id, event_type and payload")]
pub struct MessageEventError(String);

impl MessageEvent {
    pub fn parse(content: &[u8]) -> Result<MessageEvent, MessageEventError> {
        serde_json::from_slice(content).map_err(|e| MessageEventError(e.to_string()))
    }

    /// The event. Without an `event_id` in the message, one is derived from the cluster, the
    /// timeline that wrote it and the message's LSN (see [`wal_event_id`]), so a replay of the
    /// same WAL yields the same id (consumers dedup on it), on whichever timeline it is read.
    pub fn into_event(
        self,
        system_id: u64,
        timeline: u32,
        lsn: u64,
        xid: u32,
        commit_ts_us: i64,
    ) -> Event {
        let event_id = self
            .event_id
            .unwrap_or_else(|| wal_event_id(system_id, timeline, lsn))
            .to_string();
        let headers = header_strings(self.headers.unwrap_or_default());
        Event {
            event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: Bytes::from(self.aggregate_id),
            event_type: self.event_type,
            payload: Bytes::from(self.payload.get().to_owned()),
            headers,
            source: Source::Wal { lsn, xid },
            commit_ts_us,
        }
    }
}

/// The namespace of [`wal_event_id`]'s name-based (version 5) UUIDs.
pub const WAL_EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f1c_2a4e_8d3b_4f7a_9e05_b2c1_d4e3_f6a7);

/// The event id of a WAL-only message without one: a name for its position in the cluster's WAL.
///
/// The same LSN names different WAL on two timelines (after a promotion or a point-in-time
/// restore the new timeline writes its own WAL past the fork), so the timeline is part of the
/// name: otherwise a message the new timeline wrote would take the id of the old timeline's
/// message at that LSN, and consumers would drop it as a duplicate. `timeline` is the timeline
/// that wrote the message (from the server's timeline history), not the one it is read on: WAL
/// before a fork is shared, and a message in it keeps its id when it is read again after a
/// failover (say after `relay reset-checkpoint` moved to a slot behind). On timeline 1 the id is
/// `Uuid::from_u64_pair(system_id, lsn)`, as before timelines were part of it, so ids of
/// clusters that never failed over do not change; on a later timeline it is the version 5 UUID
/// of the name `<system_id>:<timeline>:<lsn as X/X>` in [`WAL_EVENT_ID_NAMESPACE`] (the same as
/// Python's `uuid.uuid5(namespace, name)`). A version 5 UUID has fixed version and variant bits,
/// so it cannot equal a timeline-1 id except by a 122-bit hash coincidence.
pub fn wal_event_id(system_id: u64, timeline: u32, lsn: u64) -> uuid::Uuid {
    use sha1::{Digest, Sha1};
    if timeline <= 1 {
        return uuid::Uuid::from_u64_pair(system_id, lsn);
    }
    let name = format!("{system_id}:{timeline}:{}", crate::replication::Lsn(lsn));
    let mut hash = Sha1::new();
    hash.update(WAL_EVENT_ID_NAMESPACE.as_bytes());
    hash.update(name.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_through_the_template() {
        let mut r = TopicRouter::new("outbox.event.{aggregate_type}");
        assert_eq!(&*r.topic("order"), "outbox.event.order");
        assert_eq!(&*r.topic("Order Line/x"), "outbox.event.Order_Line_x");
        let mut r = TopicRouter::new("{aggregate_type}-events");
        assert_eq!(&*r.topic("payment"), "payment-events");
    }

    #[test]
    fn record_carries_the_envelope_headers() {
        let e = Event {
            event_id: "e1".into(),
            aggregate_type: "order".into(),
            aggregate_id: Bytes::from_static(b"o-1"),
            event_type: "OrderPlaced".into(),
            payload: Bytes::from_static(b"{\"a\":1}"),
            headers: vec![
                ("trace".into(), "t1".into()),
                ("event_id".into(), "forged".into()),
            ],
            source: Source::Wal {
                lsn: 0x1_0000_0010,
                xid: 7,
            },
            commit_ts_us: 99,
        };
        let r = e.into_record("outbox.event.order".into());
        assert_eq!(&r.key[..], b"o-1");
        assert_eq!(&r.value[..], b"{\"a\":1}");
        let h: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (*k, &v[..])).collect();
        assert!(h.contains(&("event_id", b"e1")));
        assert!(h.contains(&("lsn", b"1/10")));
        assert!(h.contains(&("xid", b"7")));
        assert!(h.contains(&("commit_ts", b"99")));
        assert_eq!(
            r.extra_headers,
            vec![("trace".to_owned(), Bytes::from_static(b"t1"))]
        );
    }

    #[test]
    fn headers_object_parses_and_rejects_non_objects() {
        assert_eq!(
            parse_headers(br#"{"a":"x","n":1}"#).unwrap(),
            vec![("a".into(), "x".into()), ("n".into(), "1".into())]
        );
        assert_eq!(parse_headers(b"null").unwrap(), vec![]);
        assert!(matches!(
            parse_headers(b"[1]"),
            Err(HeadersError::NotAnObject(_))
        ));
        assert!(matches!(parse_headers(b"{"), Err(HeadersError::Json(_))));
    }

    #[test]
    fn message_event_derives_a_stable_id() {
        let m = br#"{"aggregate_type":"order","aggregate_id":"o-9","event_type":"X","payload":{"k":[1,2]}}"#;
        let a = MessageEvent::parse(m).unwrap().into_event(1, 1, 500, 3, 0);
        let b = MessageEvent::parse(m).unwrap().into_event(1, 1, 500, 3, 0);
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(&a.payload[..], br#"{"k":[1,2]}"#);
        assert!(MessageEvent::parse(b"{\"aggregate_type\":1}").is_err());
    }

    #[test]
    fn wal_event_ids_differ_across_timelines_and_keep_timeline_1() {
        let sys = 7_345_000_000_000_000_123;
        // Timeline 1: the derivation of earlier releases, unchanged.
        assert_eq!(
            wal_event_id(sys, 1, 0x300_0060),
            uuid::Uuid::from_u64_pair(sys, 0x300_0060)
        );
        // Deterministic on one timeline, distinct across timelines and positions.
        let mut seen = std::collections::HashSet::new();
        for tl in 1..=4 {
            for lsn in [0x300_0060, 0x300_0061, 0x16_B374_D848] {
                let id = wal_event_id(sys, tl, lsn);
                assert_eq!(id, wal_event_id(sys, tl, lsn));
                assert!(seen.insert(id), "timeline {tl}, lsn {lsn:x}: {id} repeats");
            }
        }
        // The documented name: a version 5 UUID of "<system>:<timeline>:<lsn>".
        let id = wal_event_id(sys, 2, 0x300_0060);
        assert_eq!(id.get_version_num(), 5);
        let mut hash = <sha1::Sha1 as sha1::Digest>::new();
        sha1::Digest::update(&mut hash, WAL_EVENT_ID_NAMESPACE.as_bytes());
        sha1::Digest::update(&mut hash, format!("{sys}:2:0/3000060").as_bytes());
        let digest = sha1::Digest::finalize(hash);
        assert_eq!(&id.as_bytes()[..6], &digest[..6]);
        let m = br#"{"aggregate_type":"order","aggregate_id":"o-9","event_type":"X","payload":1}"#;
        let on_2 = MessageEvent::parse(m)
            .unwrap()
            .into_event(sys, 2, 500, 3, 0);
        let on_1 = MessageEvent::parse(m)
            .unwrap()
            .into_event(sys, 1, 500, 3, 0);
        assert_ne!(on_1.event_id, on_2.event_id);
    }
}
