//! The relay's progress record, stored inside the same Kafka transactions as the events.
//!
//! Every Kafka transaction the relay commits ends with one checkpoint record on the checkpoint
//! topic (one partition, compacted), keyed by the relay's name. Because the record commits or
//! aborts together with the events, the latest committed checkpoint is exactly the position up to
//! which every event is in Kafka: no more, no less. On start the relay reads the topic to its end
//! under `read_committed` (after `init_transactions` has fenced and aborted any zombie's open
//! transaction) and resumes from the latest value for its key.
//!
//! ## Which position is safe
//!
//! For CDC the checkpoint holds the last delivered transaction's `commit_lsn` and `end_lsn`. The
//! relay resumes streaming at `end_lsn` and drops any transaction whose commit LSN is below it
//! (the slot's `confirmed_flush_lsn` can lag behind the checkpoint: it is confirmed only after the
//! Kafka commit, and Postgres persists it only at checkpoints). For polling it holds the cursor
//! `(txid, id)` of the last delivered row.

use crate::replication::Lsn;
use serde::{Deserialize, Serialize};

/// Where a relay has got to. Serialized as JSON (the record value); the record key is `relay`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The relay's name, also the record key: `cdc/<slot>` or `poll/<name>`.
    pub relay: String,
    /// Postgres `system_identifier` of the cluster the positions belong to. A checkpoint of
    /// another cluster is a fatal error: its LSNs mean nothing here.
    pub system_id: u64,
    /// Timeline of the positions (CDC).
    #[serde(default)]
    pub timeline: u32,
    /// Commit LSN of the last delivered WAL transaction (CDC).
    #[serde(default)]
    pub commit_lsn: u64,
    /// End LSN of the last delivered WAL transaction, or a later position the relay was idle at
    /// (a keepalive's, when nothing was in flight): where streaming resumes (CDC).
    #[serde(default)]
    pub end_lsn: u64,
    /// Polling cursor: transaction id of the last delivered row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_txid: Option<u64>,
    /// Polling cursor: outbox id of the last delivered row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_id: Option<i64>,
    /// CDC: the outbox rows that existed when the relay first started, published from the
    /// table (see `cdc` module docs, "First start"), and how far that has got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<Backfill>,
    /// CDC: a `pg_snapshot` (text) every transaction visible in which is delivered: the
    /// snapshot a heartbeat took, recorded once the heartbeat's WAL transaction is in Kafka
    /// (a transaction visible to it committed before it, so before this checkpoint's
    /// position). A lost slot is recovered from the table with it (RUNBOOK, 'Lost slot').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_snapshot: Option<String>,
    /// Events delivered by this relay since its first checkpoint (for operators).
    #[serde(default)]
    pub events_total: u64,
    /// Wall-clock time the record was written, microseconds since the Unix epoch.
    #[serde(default)]
    pub written_at_us: i64,
}

/// The first start's backfill: every outbox row visible in `snapshot` (a `pg_snapshot` taken
/// after the slot existed) is published from the table, in `id` order; the stream then drops
/// the rows whose transaction is visible in it (they were published already).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backfill {
    /// `pg_current_snapshot()` as text: `xmin:xmax:xip,...`.
    pub snapshot: String,
    /// The last outbox `id` published.
    pub cursor: i64,
    /// Every row of the snapshot is published.
    pub done: bool,
    /// Rows published by the backfill.
    #[serde(default)]
    pub rows: u64,
    /// Lost-slot recovery: rows whose transaction is visible in this snapshot were delivered
    /// before the slot was lost, and are not published again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<String>,
    /// A lost-slot recovery (records marked `replay: recovered`), not a first start.
    #[serde(default)]
    pub recovery: bool,
}

impl Checkpoint {
    pub fn end_lsn(&self) -> Lsn {
        Lsn(self.end_lsn)
    }

    pub fn commit_lsn(&self) -> Lsn {
        Lsn(self.commit_lsn)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of plain fields cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The name under which a CDC relay on `slot` keeps its checkpoint.
pub fn cdc_key(slot: &str) -> String {
    format!("cdc/{slot}")
}

/// The name under which a polling relay called `name` keeps its checkpoint.
pub fn poll_key(name: &str) -> String {
    format!("poll/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let cp = Checkpoint {
            relay: cdc_key("s"),
            system_id: 7_345_000_000_000_000_123,
            timeline: 1,
            commit_lsn: 0x16_B374_D848,
            end_lsn: 0x16_B374_D880,
            poll_txid: None,
            poll_id: None,
            backfill: Some(Backfill {
                snapshot: "10:20:12,15".into(),
                cursor: 99,
                done: false,
                rows: 3,
                delivered: Some("5:6:".into()),
                recovery: true,
            }),
            delivered_snapshot: Some("1:2:".into()),
            events_total: 42,
            written_at_us: 1,
        };
        let back = Checkpoint::decode(&cp.encode()).unwrap();
        assert_eq!(back, cp);
        assert_eq!(back.end_lsn().to_string(), "16/B374D880");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Checkpoint::decode(b"{").is_err());
        assert!(Checkpoint::decode(b"[]").is_err());
        assert!(Checkpoint::decode(&[0xff, 0x00]).is_err());
    }
}
