//! The `read_committed` reader of one contender's topic during one phase: for each event of the
//! phase (by the `seq` in its value, contract item 1) when it became visible, and how often.
//!
//! It is assigned every partition at the high watermark taken before the writers start, so it
//! reads exactly what is published from then on without a consumer-group rebalance. Records whose
//! `seq` falls outside the phase's range are counted as `foreign` (an earlier phase's event
//! published again would show up there), records without a readable `seq` as `unparsed`.

use crate::support::now_us;
use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The relay's default `outbox.topic_partitions`; the bench creates the topics itself so that the
/// first events of a phase do not wait for a topic to be created.
pub const PARTITIONS: i32 = 6;

/// The number after the payload's `seq` key, in a record value that is the payload's JSON text or
/// that text as a JSON-escaped string (`{\"seq\": 5}`): the first `seq` in quotes, then optional
/// blanks, a colon, blanks, and digits. `None` when there is none or it does not fit a u64. Reads
/// external bytes: it never panics.
pub fn parse_seq(value: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"seq";
    let mut from = 0;
    while let Some(at) = value
        .get(from..)?
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|p| p + from)
    {
        from = at + KEY.len();
        // A key: a quote right before it and one right after it, that one maybe escaped.
        let mut i = from;
        if value.get(i) == Some(&b'\\') {
            i += 1;
        }
        if at == 0 || value.get(at - 1) != Some(&b'"') || value.get(i) != Some(&b'"') {
            continue;
        }
        i += 1;
        while value.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
            i += 1;
        }
        if value.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        while value.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
            i += 1;
        }
        let digits = value
            .get(i..)?
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let text = std::str::from_utf8(value.get(i..i + digits)?).ok()?;
        return text.parse().ok();
    }
    None
}

/// Creates `topic` with the relay's partition count if it does not exist, and waits until the
/// broker's metadata lists all its partitions.
pub async fn ensure_topic(bootstrap: &str, topic: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    // "Already exists" is the common answer after the first run; anything else shows up below
    // as a topic that never gets its partitions.
    let _ = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if n > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has no partitions 30 s after creating it");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the reader saw, per event of the phase (index `seq - base`).
#[derive(Debug, Default)]
pub struct Seen {
    /// How many times each event arrived (saturating).
    pub count: Vec<u16>,
    /// µs since the epoch of each event's first arrival (0: never).
    pub first_us: Vec<i64>,
    pub foreign: u64,
    pub unparsed: u64,
}

/// A running reader; [`Reader::finish`] stops it.
pub struct Reader {
    stop: Arc<AtomicBool>,
    distinct: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

impl Reader {
    /// Positions a consumer at the end of every partition of `topic` and starts reading events
    /// `base .. base + capacity`.
    pub fn start(bootstrap: &str, topic: &str, base: u64, capacity: u64) -> Result<Reader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "group.id",
                format!("relay-bench-ab-{}", rand::random::<u32>()),
            )
            .set("enable.auto.commit", "false")
            // Only what the relay committed: latency is to visibility under read_committed.
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if parts.is_empty() {
            bail!("topic {topic} has no partitions");
        }
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("watermarks of {topic}/{p}"))?;
            tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let distinct = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), distinct.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Seen {
                count: vec![0; capacity as usize],
                first_us: vec![0; capacity as usize],
                ..Seen::default()
            };
            while !s.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let at = now_us();
                let Some(seq) = m.payload().and_then(parse_seq) else {
                    seen.unparsed += 1;
                    continue;
                };
                let Some(i) = seq.checked_sub(base).filter(|i| *i < capacity) else {
                    seen.foreign += 1;
                    continue;
                };
                let i = i as usize;
                if seen.count[i] == 0 {
                    seen.first_us[i] = at;
                    d.fetch_add(1, Ordering::Relaxed);
                }
                seen.count[i] = seen.count[i].saturating_add(1);
            }
            seen
        });
        Ok(Reader {
            stop,
            distinct,
            thread: Some(thread),
        })
    }

    /// Distinct events of the phase seen so far.
    pub fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_found_in_jsonb_text_and_in_an_escaped_string() {
        assert_eq!(parse_seq(br#"{"pad": "xx", "seq": 42}"#), Some(42));
        assert_eq!(parse_seq(br#"{"seq":7,"pad":"x"}"#), Some(7));
        assert_eq!(parse_seq(br#""{\"pad\": \"xx\", \"seq\": 42}""#), Some(42));
        assert_eq!(parse_seq(br#"{"seqs": 1, "seq": 3}"#), Some(3));
        assert_eq!(parse_seq(br#"{"pad": "seq", "seq": 9}"#), Some(9));
        assert_eq!(parse_seq(br#"{"pad": "x", "seq": 123}"#), Some(123));
        assert_eq!(parse_seq(br#"{"seq":7,"pad":"y"}"#), Some(7));
        assert_eq!(
            parse_seq(br#"{"payload":"{\"pad\": \"x\", \"seq\": 98765}"}"#),
            Some(98765)
        );
        // A key that merely contains "seq" is skipped.
        assert_eq!(parse_seq(br#"{"seqx": "a", "seq": 5}"#), Some(5));
    }

    #[test]
    fn seq_is_none_when_absent_truncated_or_too_large() {
        for v in [
            &b""[..],
            b"seq",
            b"\"seq\"",
            b"{\"seq\":",
            b"{\"seq\": \"5\"}",
            b"{\"seq\": 99999999999999999999999}",
            b"{\"pad\": 1}",
            b"\\",
            b"seq: 99999999999999999999999",
            b"no number",
        ] {
            assert_eq!(parse_seq(v), None, "{:?}", String::from_utf8_lossy(v));
        }
        // Whatever these give, they give it without a panic.
        for v in [&b"seq:"[..], b"\"seq\"\\", b"{\"seq\": -1}"] {
            let _ = parse_seq(v);
        }
    }

    #[test]
    fn parse_seq_never_panics_on_any_prefix_of_a_value() {
        let v = br#""{\"pad\": \"xx\", \"seq\": 1234}""#;
        for end in 0..=v.len() {
            let _ = parse_seq(&v[..end]);
            let _ = parse_seq(&v[end..]);
        }
    }
}
