//! A Kafka record as the consumer runtime hands it to a handler, with the relay's envelope
//! headers (`event_id`, `event_type`, ...; see `relay::outbox`) read from it.
//!
//! Everything here reads external bytes: nothing panics, and a missing or malformed header is a
//! permanent [`HandlerError`] (the record goes to the DLQ), never a crash.

use rdkafka::message::{Headers, Message};
use serde::de::DeserializeOwned;

use crate::error::HandlerError;

/// One consumed record, owned, so it can travel from the poll thread to a partition's worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers in the order they were written (a name may repeat; [`Record::header`] takes the
    /// first).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp, milliseconds since the Unix epoch, when it has one.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// Copies a message out of librdkafka's buffers.
    pub fn from_message<M: Message>(m: &M) -> Record {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|hd| (hd.key.to_owned(), hd.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first header called `name`, when it is UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The envelope's `event_id`: the key consumers deduplicate on.
    pub fn event_id(&self) -> Result<uuid::Uuid, HandlerError> {
        let raw = self
            .header_str("event_id")
            .ok_or_else(|| HandlerError::permanent("missing_event_id", "no event_id header"))?;
        uuid::Uuid::parse_str(raw).map_err(|_| {
            HandlerError::permanent("invalid_event_id", "the event_id header is not a UUID")
        })
    }

    /// The envelope's `event_type`, or "" when it has none.
    pub fn event_type(&self) -> &str {
        self.header_str("event_type").unwrap_or_default()
    }

    /// The key as UTF-8 (the aggregate id).
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The payload parsed as JSON into `T`. The error names the type, never the payload's content.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let bytes = self
            .payload
            .as_deref()
            .ok_or_else(|| HandlerError::permanent("bad_payload", "the record has no payload"))?;
        serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's messages name a position and the expected shape, not the data.
            HandlerError::permanent(
                "bad_payload",
                format!("payload is not a valid {}: {e}", short_type_name::<T>()),
            )
        })
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(headers: Vec<(&str, &[u8])>, payload: Option<&[u8]>) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k".to_vec()),
            payload: payload.map(<[u8]>::to_vec),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_vec()))
                .collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn reads_the_envelope() {
        let id = uuid::Uuid::new_v4();
        let r = rec(
            vec![
                ("event_id", id.to_string().as_bytes()),
                ("event_type", b"OrderPlaced"),
            ],
            Some(br#"{"a":1}"#),
        );
        assert_eq!(r.event_id().unwrap(), id);
        assert_eq!(r.event_type(), "OrderPlaced");
        assert_eq!(r.key_str(), Some("k"));
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn malformed_envelopes_are_permanent_errors() {
        let r = rec(vec![("event_id", b"\xff\xfe")], Some(b"{"));
        assert_eq!(r.event_id().unwrap_err().kind, "missing_event_id");
        let r = rec(vec![("event_id", b"nope")], None);
        assert_eq!(r.event_id().unwrap_err().kind, "invalid_event_id");
        assert_eq!(
            r.json::<serde_json::Value>().unwrap_err().kind,
            "bad_payload"
        );
        let r = rec(vec![], Some(b"[1,"));
        let e = r.json::<serde_json::Value>().unwrap_err();
        assert_eq!(e.class, crate::error::ErrorClass::Permanent);
        assert!(e.message.contains("Value"));
    }
}
