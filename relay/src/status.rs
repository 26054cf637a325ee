//! `relay status`: for on-call, the CDC relay's slot, its state and lag, the last checkpoint in
//! Kafka, and what a restart of the relay would do, read without disturbing a running relay.
//!
//! ```text
//!  Postgres ──IDENTIFY_SYSTEM, pg_replication_slots──▶ ┐
//!                                                     ├─▶ plan (the relay's start-up rules) ─▶ stdout
//!  Kafka ──checkpoint topic, read_committed, ─────────▶ ┘
//!          consumer only (no init_transactions: the running relay is not fenced)
//! ```
//!
//! The plan applies the rules `relay cdc` applies on start (see `cdc.rs`, `slot_position`, and
//! `slot_watch::preflight`): a checkpoint of another cluster, a lost slot, a slot of another
//! plugin, a slot confirmed past the checkpoint, or a dropped slot with a checkpoint are refused;
//! otherwise streaming resumes at the later of the checkpoint and the slot's confirmed position.

use crate::cdc::{CdcError, CdcSettings};
use crate::checkpoint::{self, Checkpoint};
use crate::replication::conn::ReplicationClient;
use crate::replication::Lsn;
use crate::slot_watch::{self, pretty_bytes, SlotRow, SlotsSnapshot};
use std::fmt;
use std::time::Duration;

/// What `relay status` found.
#[derive(Clone, Debug)]
pub struct Status {
    pub slot: String,
    pub create_slot: bool,
    pub server_version_num: u32,
    pub system_id: u64,
    pub timeline: u32,
    pub snapshot: SlotsSnapshot,
    pub checkpoint_topic: String,
    pub checkpoint_key: String,
    /// The last committed checkpoint, or why it could not be read.
    pub checkpoint: Result<Option<Checkpoint>, String>,
}

/// What a restart of `relay cdc` would do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Stream from `from`; transactions committed before `skip_below` are already in Kafka and
    /// are dropped.
    Resume { from: Lsn, skip_below: Option<Lsn> },
    /// The slot is held by another process (a running relay: this status was taken while it
    /// streams); a second relay would wait for it.
    Held { pid: i64, from: Lsn },
    /// Create the slot and stream from its consistent point (no checkpoint, no slot yet).
    CreateSlot,
    /// Refuse to start: the operator must act. The text is the relay's own error message.
    Refuse(String),
    /// Cannot tell: the checkpoint could not be read.
    Unknown(String),
}

impl Restart {
    /// The exit code of `relay status`: 0 when a restart would stream, 3 when it would refuse,
    /// 1 when it cannot be told.
    pub fn exit_code(&self) -> u8 {
        match self {
            Restart::Resume { .. } | Restart::Held { .. } | Restart::CreateSlot => 0,
            Restart::Refuse(_) => 3,
            Restart::Unknown(_) => 1,
        }
    }
}

impl Status {
    /// The relay's slot, if it exists.
    pub fn slot_row(&self) -> Option<&SlotRow> {
        self.snapshot.slot(&self.slot)
    }

    /// What a restart would do, by the relay's start-up rules.
    pub fn restart(&self) -> Restart {
        let cp = match &self.checkpoint {
            Ok(cp) => cp.as_ref(),
            Err(e) => return Restart::Unknown(format!("the checkpoint cannot be read: {e}")),
        };
        let slot = self.slot.clone();
        if let Some(cp) = cp {
            if cp.system_id != self.system_id {
                return Restart::Refuse(
                    CdcError::SystemMismatch {
                        checkpoint: cp.system_id,
                        server: self.system_id,
                    }
                    .to_string(),
                );
            }
        }
        let Some(row) = self.slot_row() else {
            return match cp {
                Some(cp) => Restart::Refuse(
                    CdcError::SlotDropped {
                        slot,
                        checkpoint: cp.end_lsn(),
                    }
                    .to_string(),
                ),
                None if self.create_slot => Restart::CreateSlot,
                None => Restart::Refuse(CdcError::SlotMissing(slot).to_string()),
            };
        };
        if row.plugin.as_deref() != Some("pgoutput") {
            return Restart::Refuse(
                CdcError::SlotPlugin {
                    slot,
                    plugin: row.plugin.clone().unwrap_or_default(),
                }
                .to_string(),
            );
        }
        if let Some(e) = slot_watch::invalidation_error(
            &slot,
            row.wal_status.as_deref().unwrap_or_default(),
            row.invalidation_reason.as_deref(),
        ) {
            return Restart::Refuse(e.to_string());
        }
        let confirmed = row.confirmed_flush_lsn.unwrap_or(Lsn::INVALID);
        if let Some(cp) = cp {
            if confirmed > cp.end_lsn() {
                return Restart::Refuse(
                    CdcError::SlotAhead {
                        slot,
                        slot_lsn: confirmed,
                        checkpoint: cp.end_lsn(),
                    }
                    .to_string(),
                );
            }
        }
        let from = cp.map_or(confirmed, |cp| cp.end_lsn().max(confirmed));
        match row.active_pid {
            Some(pid) if row.active => Restart::Held { pid, from },
            _ => Restart::Resume {
                from,
                skip_below: cp.map(Checkpoint::end_lsn),
            },
        }
    }
}

/// Reads the slot over a `replication=database` session (for `IDENTIFY_SYSTEM`: the system id
/// the checkpoint must match; it takes one walsender for a moment) and the checkpoint with a
/// read-only consumer.
pub async fn gather(s: &CdcSettings) -> Result<Status, CdcError> {
    let mut sql = ReplicationClient::connect(&s.postgres).await?;
    let ident = sql.identify_system().await?;
    let version = slot_watch::server_version_num(&mut sql).await?;
    let snapshot = slot_watch::read_slots(&mut sql, &s.slot, false, version).await?;
    sql.close().await;
    let key = checkpoint::cdc_key(&s.slot);
    let (kafka, k) = (s.kafka.clone(), key.clone());
    let runtime = tokio::runtime::Handle::current();
    let checkpoint = tokio::task::spawn_blocking(move || {
        crate::sink::kafka::read_checkpoint_read_only(kafka, &k, runtime)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    Ok(Status {
        slot: s.slot.clone(),
        create_slot: s.create_slot,
        server_version_num: version,
        system_id: ident.system_id,
        timeline: ident.timeline,
        snapshot,
        checkpoint_topic: s.kafka.checkpoint_topic.clone(),
        checkpoint_key: key,
        checkpoint,
    })
}

/// A checkpoint's `written_at_us` as RFC 3339 UTC.
pub fn written_at(us: i64) -> String {
    match u64::try_from(us) {
        Ok(us) => {
            let t = std::time::UNIX_EPOCH + Duration::from_micros(us);
            humantime_serde::re::humantime::format_rfc3339_micros(t).to_string()
        }
        Err(_) => format!("{us} µs since the epoch"),
    }
}

fn opt_lsn(l: Option<Lsn>) -> String {
    l.map_or("-".to_owned(), |l| l.to_string())
}

fn opt_bytes(b: Option<i64>) -> String {
    b.map_or("-".to_owned(), pretty_bytes)
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = &self.snapshot;
        let keep = if snap.max_slot_wal_keep_size < 0 {
            "unlimited (-1)".to_owned()
        } else {
            pretty_bytes(snap.max_slot_wal_keep_size)
        };
        writeln!(
            f,
            "server: system {} timeline {}, server_version_num {}, current WAL {}, \
             max_slot_wal_keep_size {keep}",
            self.system_id,
            self.timeline,
            self.server_version_num,
            opt_lsn(snap.current_wal_lsn)
        )?;
        match self.slot_row() {
            None => writeln!(f, "slot {}: does not exist", self.slot)?,
            Some(r) => {
                writeln!(
                    f,
                    "slot {}: plugin {}, database {}",
                    r.name,
                    r.plugin.as_deref().unwrap_or("-"),
                    r.database.as_deref().unwrap_or("-")
                )?;
                let reason = r
                    .invalidation_reason
                    .as_deref()
                    .map(|x| format!(", invalidation_reason {x}"))
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  state: wal_status {}{reason}, {}",
                    r.wal_status.as_deref().unwrap_or("-"),
                    match (r.active, r.active_pid) {
                        (true, Some(pid)) => format!("active (process {pid})"),
                        _ => "inactive".to_owned(),
                    }
                )?;
                writeln!(
                    f,
                    "  restart_lsn {}: retains {} of WAL",
                    opt_lsn(r.restart_lsn),
                    opt_bytes(r.retained_bytes)
                )?;
                writeln!(
                    f,
                    "  confirmed_flush_lsn {}: lag {}",
                    opt_lsn(r.confirmed_flush_lsn),
                    opt_bytes(r.lag_bytes)
                )?;
                writeln!(f, "  safe_wal_size {}", opt_bytes(r.safe_wal_size))?;
            }
        }
        match &self.checkpoint {
            Ok(None) => writeln!(
                f,
                "checkpoint {} (topic {}): none",
                self.checkpoint_key, self.checkpoint_topic
            )?,
            Ok(Some(cp)) => writeln!(
                f,
                "checkpoint {} (topic {}): end_lsn {}, commit_lsn {}, written at {}, \
                 {} events, system {} timeline {}",
                self.checkpoint_key,
                self.checkpoint_topic,
                cp.end_lsn(),
                cp.commit_lsn(),
                written_at(cp.written_at_us),
                cp.events_total,
                cp.system_id,
                cp.timeline
            )?,
            Err(e) => writeln!(
                f,
                "checkpoint {} (topic {}): cannot be read: {e}",
                self.checkpoint_key, self.checkpoint_topic
            )?,
        }
        match self.restart() {
            Restart::Resume { from, skip_below } => {
                write!(f, "restart: would resume streaming at {from}")?;
                if let Some(floor) = skip_below {
                    write!(
                        f,
                        ", dropping transactions committed before {floor} (already in Kafka)"
                    )?;
                }
                writeln!(f)
            }
            Restart::Held { pid, from } => writeln!(
                f,
                "restart: the slot is held by process {pid} (the running relay, or another \
                 reader); a relay started now would wait for it (slot in use), then resume at {from}"
            ),
            Restart::CreateSlot => writeln!(
                f,
                "restart: would create slot {} and stream from its consistent point (rows \
                 committed before the slot exists are not in its stream)",
                self.slot
            ),
            Restart::Refuse(why) => writeln!(f, "restart: would refuse to start: {why}"),
            Restart::Unknown(why) => writeln!(f, "restart: unknown: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(slot: Option<SlotRow>, cp: Option<Checkpoint>) -> Status {
        Status {
            slot: "s".into(),
            create_slot: true,
            server_version_num: 150008,
            system_id: 7,
            timeline: 1,
            snapshot: SlotsSnapshot {
                slots: slot.into_iter().collect(),
                max_slot_wal_keep_size: 1 << 30,
                current_wal_lsn: Some(Lsn(0x3000)),
            },
            checkpoint_topic: "cp".into(),
            checkpoint_key: "cdc/s".into(),
            checkpoint: Ok(cp),
        }
    }

    fn slot(confirmed: u64) -> SlotRow {
        SlotRow {
            name: "s".into(),
            plugin: Some("pgoutput".into()),
            wal_status: Some("reserved".into()),
            confirmed_flush_lsn: Some(Lsn(confirmed)),
            ..SlotRow::default()
        }
    }

    fn cp(end: u64, system_id: u64) -> Checkpoint {
        Checkpoint {
            relay: "cdc/s".into(),
            system_id,
            end_lsn: end,
            ..Checkpoint::default()
        }
    }

    #[test]
    fn restart_follows_the_relays_start_up_rules() {
        assert_eq!(
            status(Some(slot(0x100)), Some(cp(0x200, 7))).restart(),
            Restart::Resume {
                from: Lsn(0x200),
                skip_below: Some(Lsn(0x200))
            }
        );
        assert_eq!(
            status(Some(slot(0x100)), None).restart(),
            Restart::Resume {
                from: Lsn(0x100),
                skip_below: None
            }
        );
        let held = SlotRow {
            active: true,
            active_pid: Some(9),
            ..slot(0x200)
        };
        assert_eq!(
            status(Some(held), Some(cp(0x200, 7))).restart(),
            Restart::Held {
                pid: 9,
                from: Lsn(0x200)
            }
        );
        assert_eq!(status(None, None).restart(), Restart::CreateSlot);
        let refusals = [
            (status(None, Some(cp(0x200, 7))), "does not exist, but"),
            (status(Some(slot(0x300)), Some(cp(0x200, 7))), "past the"),
            (status(Some(slot(0x100)), Some(cp(0x200, 8))), "system 8"),
            (
                status(
                    Some(SlotRow {
                        wal_status: Some("lost".into()),
                        ..slot(0x100)
                    }),
                    None,
                ),
                "invalidated",
            ),
            (
                status(
                    Some(SlotRow {
                        wal_status: Some("lost".into()),
                        invalidation_reason: Some("idle_timeout".into()),
                        ..slot(0x100)
                    }),
                    None,
                ),
                "invalidation_reason = idle_timeout",
            ),
            (
                status(
                    Some(SlotRow {
                        plugin: Some("test_decoding".into()),
                        ..slot(0x100)
                    }),
                    None,
                ),
                "test_decoding",
            ),
        ];
        for (st, needle) in refusals {
            let r = st.restart();
            assert_eq!(r.exit_code(), 3, "{r:?}");
            assert!(
                matches!(&r, Restart::Refuse(why) if why.contains(needle)),
                "{r:?} lacks {needle}"
            );
        }
        let mut unknown = status(None, None);
        unknown.checkpoint = Err("broker down".into());
        assert_eq!(unknown.restart().exit_code(), 1);
        let text = status(Some(slot(0x100)), Some(cp(0x200, 7))).to_string();
        assert!(
            text.contains("restart: would resume streaming at 0/200"),
            "{text}"
        );
        assert!(text.contains("slot s: plugin pgoutput"), "{text}");
    }
}
