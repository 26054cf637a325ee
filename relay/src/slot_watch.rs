//! Slot safety: the slot metrics, read on an interval over a connection of their own, and the
//! start-up checks of the server and the slot.
//!
//! ```text
//!                 ┌─ every slot_watch.interval ─────────────────────────────────┐
//!  Postgres  ◀────┤ ordinary session (no walsender): pg_replication_slots,      │──▶ Metrics (relay_slot_*)
//!  (primary)      │ max_slot_wal_keep_size                                       │──▶ Health note (/readyz)
//!                 └──────────────────────────────────────────────────────────────┘
//!  relay cdc ──▶ preflight(): wal_level, max_slot_wal_keep_size, walsender and slot headroom,
//!                publication (and the outbox table in it), the slot's plugin and state,
//!                wal_sender_timeout, idle_replication_slot_timeout (Postgres 18)
//! ```
//!
//! A stalled slot retains WAL until the primary's disk fills, and the moments that matter most
//! are those when the relay cannot stream: Postgres refuses it, Kafka is down, another process
//! holds the slot. So the watcher is its own task, started next to the relay loop (not inside it), on
//! an ordinary session: it takes no walsender slot (`max_wal_senders`) and keeps exporting while
//! the relay reconnects. A failed read sets `relay_slot_watch_success` to 0 and the connection
//! is made again at the next interval; the last readings stay exported (their age is visible
//! from the success gauge), except that a slot found missing loses its value series.
//!
//! A relay process that is frozen (stopped, hung) exports nothing, its watcher included: for
//! slot alerts that do not depend on the relay process, `relay watch-slots` runs the watcher
//! alone, with the same endpoints (scrape it as a job of its own; it is ready while its reads
//! succeed). A stall drill that freezes the relay (SIGSTOP) watches the slot this way.
//!
//! ## What the metrics mean
//!
//! - `relay_slot_retained_wal_bytes`: `pg_current_wal_lsn() - restart_lsn`, the WAL the slot
//!   keeps on the primary's disk. This, not the confirmed lag, is what fills the disk.
//! - `relay_slot_confirmed_lag_bytes`: `pg_current_wal_lsn() - confirmed_flush_lsn`, what the
//!   relay has not confirmed (it confirms only after the Kafka commit).
//! - `relay_slot_safe_wal_size_bytes`: Postgres's `safe_wal_size`, the WAL that can still be
//!   written before the slot is in danger; absent when `max_slot_wal_keep_size` is unlimited.
//! - `relay_slot_wal_status{wal_status}`: `reserved` → `extended` → `unreserved` → `lost`.
//!   `unreserved` means the slot is past `max_slot_wal_keep_size` and will be invalidated at the
//!   next checkpoint unless its reader catches up; `lost` means it was.
//! - `relay_slot_confirmed_age_seconds`: seconds since `confirmed_flush_lsn` last moved, counted
//!   only while the slot is behind the server's WAL end: a slot with nothing to confirm is idle,
//!   not stalled. With heartbeats on, a healthy relay keeps it near zero.
//!
//! See [pg_replication_slots](https://www.postgresql.org/docs/current/view-pg-replication-slots.html).

use crate::cdc::{quote_ident, quote_literal, CdcError, CdcSettings};
use crate::health::{Health, NoteSource};
use crate::metrics::{InvalidationReason, Metrics, SlotReading, WalStatus};
use crate::replication::conn::{ReplicationClient, ReplicationConfig, ReplicationError};
use crate::replication::Lsn;
use crate::shutdown::Shutdown;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the watcher reads, and how often.
#[derive(Clone, Debug)]
pub struct SlotWatchSettings {
    /// The relay's connection settings (same URL, TLS and password); the session is ordinary.
    pub postgres: ReplicationConfig,
    /// The relay's own slot (`cdc.slot`).
    pub slot: String,
    pub interval: Duration,
    /// Every slot of the database and the physical slots too.
    pub all_slots: bool,
    /// The watcher runs alone (`relay watch-slots`) and owns readiness: ready while its reads
    /// succeed. Next to the relay loop (false), readiness is the loop's.
    pub owns_readiness: bool,
}

impl SlotWatchSettings {
    /// The watcher's settings for the CDC relay configured by `cfg`.
    pub fn from_config(cfg: &crate::config::RelayConfig, cdc: &CdcSettings) -> SlotWatchSettings {
        let mut postgres = cdc.postgres.clone();
        // Its own name in pg_stat_activity, so an operator can tell it from the relay's stream.
        postgres.application_name = format!("{}-slot-watch", postgres.application_name);
        SlotWatchSettings {
            postgres,
            slot: cdc.slot.clone(),
            interval: cfg.slot_watch.interval,
            all_slots: cfg.slot_watch.all_slots,
            owns_readiness: false,
        }
    }
}

/// One row of `pg_replication_slots`, as the watcher and `relay status` read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotRow {
    pub name: String,
    /// `None` for a physical slot.
    pub plugin: Option<String>,
    pub slot_type: String,
    /// `None` for a physical slot.
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i64>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub retained_bytes: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub safe_wal_size: Option<i64>,
    pub wal_status: Option<String>,
    /// Postgres 17+ only (`None` before, and for a valid slot).
    pub invalidation_reason: Option<String>,
}

impl SlotRow {
    /// Whether Postgres has invalidated the slot (lost WAL, or a reason on Postgres 17+).
    pub fn is_invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// What one read of the server returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotsSnapshot {
    /// The watched slots, by name.
    pub slots: Vec<SlotRow>,
    /// `max_slot_wal_keep_size` in bytes, -1 when unlimited.
    pub max_slot_wal_keep_size: i64,
    /// `pg_current_wal_lsn()`.
    pub current_wal_lsn: Option<Lsn>,
}

impl SlotsSnapshot {
    /// The row of `slot`, if it exists.
    pub fn slot(&self, slot: &str) -> Option<&SlotRow> {
        self.slots.iter().find(|r| r.name == slot)
    }
}

/// `server_version_num`, e.g. 150008 for 15.8.
pub async fn server_version_num(sql: &mut ReplicationClient) -> Result<u32, CdcError> {
    let v = one_value(sql, "SHOW server_version_num").await?;
    v.parse()
        .map_err(|_| CdcError::Unexpected(format!("server_version_num is {v:?}")))
}

/// Reads `slot` (and, with `all_slots`, every slot of the current database and the physical
/// slots) and `max_slot_wal_keep_size`. `version` is `server_version_num`: Postgres 17 added
/// `invalidation_reason`. Works on ordinary and `replication=database` sessions alike. Not
/// cancellation safe (see [`ReplicationClient`]).
pub async fn read_slots(
    sql: &mut ReplicationClient,
    slot: &str,
    all_slots: bool,
    version: u32,
) -> Result<SlotsSnapshot, ReplicationError> {
    let reason = if version >= 170000 {
        "invalidation_reason"
    } else {
        "NULL"
    };
    let filter = if all_slots {
        format!(
            "slot_name = {} OR database = current_database() OR database IS NULL",
            quote_literal(slot)
        )
    } else {
        format!("slot_name = {}", quote_literal(slot))
    };
    let rows = sql
        .simple_query(&format!(
            "SELECT slot_name, plugin, slot_type, database, active, active_pid, restart_lsn, \
             confirmed_flush_lsn, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, wal_status, \
             safe_wal_size, {reason} FROM pg_replication_slots WHERE {filter} ORDER BY slot_name"
        ))
        .await?;
    let slots = rows.iter().filter_map(|r| parse_slot_row(r)).collect();
    let rows = sql
        .simple_query(
            "SELECT setting, unit, pg_current_wal_lsn() FROM pg_settings \
             WHERE name = 'max_slot_wal_keep_size'",
        )
        .await?;
    let row = rows.first();
    let cell = |i: usize| row.and_then(|r| r.get(i)).cloned().flatten();
    let max_keep = match (cell(0), cell(1)) {
        (Some(setting), unit) => setting_bytes(&setting, unit.as_deref().unwrap_or("")),
        _ => None,
    };
    Ok(SlotsSnapshot {
        slots,
        max_slot_wal_keep_size: max_keep.unwrap_or(-1),
        current_wal_lsn: cell(2).and_then(|v| v.parse().ok()),
    })
}

/// A row of the query in [`read_slots`]; `None` when it has no slot name (never, in practice).
/// Parses leniently: a value that does not parse is treated as NULL rather than failing the
/// whole reading, since these are server-produced text values.
fn parse_slot_row(r: &[Option<String>]) -> Option<SlotRow> {
    let cell = |i: usize| r.get(i).cloned().flatten();
    let int = |i: usize| cell(i).and_then(|v| v.parse::<i64>().ok());
    let lsn = |i: usize| cell(i).and_then(|v| v.parse::<Lsn>().ok());
    Some(SlotRow {
        name: cell(0)?,
        plugin: cell(1),
        slot_type: cell(2).unwrap_or_default(),
        database: cell(3),
        active: cell(4).as_deref() == Some("t"),
        active_pid: int(5),
        restart_lsn: lsn(6),
        confirmed_flush_lsn: lsn(7),
        retained_bytes: int(8),
        lag_bytes: int(9),
        wal_status: cell(10),
        safe_wal_size: int(11),
        invalidation_reason: cell(12),
    })
}

/// A `pg_settings` size (`setting` in `unit`: `B`, `kB`, `MB`, `GB`, `TB`, or `8kB` blocks) in
/// bytes; negative settings (-1: unlimited) are returned as they are.
pub fn setting_bytes(setting: &str, unit: &str) -> Option<i64> {
    let value: i64 = setting.trim().parse().ok()?;
    if value < 0 {
        return Some(value);
    }
    let digits = unit.bytes().take_while(u8::is_ascii_digit).count();
    let (count, suffix) = unit.split_at(digits);
    let count: i64 = if count.is_empty() {
        1
    } else {
        count.parse().ok()?
    };
    let scale: i64 = match suffix {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    value.checked_mul(count)?.checked_mul(scale)
}

/// A `pg_settings` duration (`setting` in `unit`: `ms`, `s`, `min`, `h`, `d`); `None` for 0 or
/// a negative value (disabled) and for a unit this relay does not know.
pub fn setting_duration(setting: &str, unit: &str) -> Option<Duration> {
    let value: u64 = setting.trim().parse().ok().filter(|v| *v > 0)?;
    let ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(value.checked_mul(ms)?))
}

/// Bytes for people: `1.5 GiB`, `512 B`.
pub fn pretty_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// When each slot's confirmed position last moved (or the slot was caught up).
#[derive(Debug, Default)]
struct ConfirmedAges {
    seen: HashMap<String, (Option<Lsn>, Instant)>,
}

impl ConfirmedAges {
    /// Seconds since `row`'s confirmed position last moved, counted only while it is behind.
    fn age(&mut self, row: &SlotRow, now: Instant) -> f64 {
        let behind = row.lag_bytes.is_some_and(|l| l > 0);
        let entry = self
            .seen
            .entry(row.name.clone())
            .or_insert((row.confirmed_flush_lsn, now));
        if entry.0 != row.confirmed_flush_lsn || !behind {
            *entry = (row.confirmed_flush_lsn, now);
        }
        now.duration_since(entry.1).as_secs_f64()
    }

    fn forget_missing(&mut self, present: &[SlotRow]) {
        self.seen
            .retain(|name, _| present.iter().any(|r| &r.name == name));
    }
}

/// The metric reading of a row.
fn reading(row: &SlotRow, age: f64, with_reason: bool) -> SlotReading {
    SlotReading {
        active: row.active,
        active_pid: row.active_pid.unwrap_or(0),
        retained_wal_bytes: row.retained_bytes,
        confirmed_lag_bytes: row.lag_bytes,
        safe_wal_size_bytes: row.safe_wal_size,
        wal_status: row.wal_status.as_deref().and_then(WalStatus::parse),
        confirmed_age_seconds: age,
        invalidation_reason: with_reason.then(|| {
            row.invalidation_reason
                .as_deref()
                .map(InvalidationReason::parse)
        }),
    }
}

/// What `/readyz` should say about the relay's own slot, if anything is wrong with it.
/// `relay_ready`: whether the relay is streaming (if it is not, an active slot is held by some
/// other process).
pub fn slot_note(
    slot: &str,
    row: Option<&SlotRow>,
    max_keep: i64,
    relay_ready: bool,
) -> Option<String> {
    let Some(row) = row else {
        return Some(format!("slot {slot} does not exist"));
    };
    let retained = row.retained_bytes.map(pretty_bytes).unwrap_or("?".into());
    if row.is_invalidated() {
        let reason = row
            .invalidation_reason
            .as_deref()
            .map(|r| format!(", invalidation_reason = {r}"))
            .unwrap_or_default();
        return Some(format!(
            "slot {slot} is invalidated (wal_status = {}{reason}): see RUNBOOK.md, 'Lost slot'",
            row.wal_status.as_deref().unwrap_or("?")
        ));
    }
    if row.wal_status.as_deref() == Some("unreserved") {
        return Some(format!(
            "slot {slot} is unreserved: it retains {retained}, past max_slot_wal_keep_size ({}); \
             Postgres invalidates it at its next checkpoint unless the relay catches up",
            pretty_bytes(max_keep)
        ));
    }
    if row.active && !relay_ready {
        return Some(format!(
            "slot {slot} is held by process {} (not this relay's stream: another reader, or the \
             walsender of this relay's previous session until wal_sender_timeout)",
            row.active_pid.unwrap_or(0)
        ));
    }
    None
}

/// Runs the watcher until `shutdown`: reads the slots every `interval`, exports them, and
/// leaves a note on `health` when the relay's slot is missing, lost, unreserved or held by
/// another process, or when it cannot be read.
pub async fn run(
    settings: SlotWatchSettings,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) {
    let s = &settings;
    // The relay's own slot's series exist from the first scrape, even before Postgres answers.
    metrics.init_slot_series(&s.slot, true, false);
    metrics.set_slot_watch_success(false);
    let mut client: Option<(ReplicationClient, u32)> = None;
    let mut ages = ConfirmedAges::default();
    let mut known: Vec<String> = Vec::new();
    let mut last_status: HashMap<String, Option<String>> = HashMap::new();
    let mut failing = false;
    // A read that does not answer within this is abandoned with its connection.
    let limit = s.interval.max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.triggered() => break,
            _ = tick.tick() => {}
        }
        let result = tokio::time::timeout(limit, async {
            if client.is_none() {
                let mut c = ReplicationClient::connect_ordinary(&s.postgres).await?;
                let version = server_version_num(&mut c).await?;
                client = Some((c, version));
            }
            let Some((c, version)) = client.as_mut() else {
                return Err(CdcError::Unexpected("no slot watch connection".into()));
            };
            let version = *version;
            let snapshot = read_slots(c, &s.slot, s.all_slots, version).await?;
            Ok((snapshot, version))
        })
        .await
        .unwrap_or(Err(CdcError::Timeout("slot metrics query", limit)));
        match result {
            Ok((snapshot, version)) => {
                if failing {
                    tracing::info!(slot = %s.slot, "slot metrics readable again");
                    failing = false;
                }
                let with_reason = version >= 170000;
                let now = Instant::now();
                metrics.set_max_slot_wal_keep_size_bytes(snapshot.max_slot_wal_keep_size);
                for row in &snapshot.slots {
                    let own = row.name == s.slot;
                    if !known.contains(&row.name) {
                        known.push(row.name.clone());
                    }
                    metrics.init_slot_series(&row.name, own, with_reason);
                    let age = ages.age(row, now);
                    metrics.set_slot(&row.name, &reading(row, age, with_reason));
                    let previous = last_status.insert(row.name.clone(), row.wal_status.clone());
                    if previous.is_some_and(|p| p != row.wal_status) {
                        tracing::warn!(
                            slot = %row.name,
                            wal_status = row.wal_status.as_deref().unwrap_or("NULL"),
                            retained_bytes = row.retained_bytes.unwrap_or(-1),
                            safe_wal_size = row.safe_wal_size.unwrap_or(-1),
                            invalidation_reason = row.invalidation_reason.as_deref().unwrap_or(""),
                            "slot wal_status changed"
                        );
                    }
                }
                ages.forget_missing(&snapshot.slots);
                // Slots gone since the last reading: the relay's own keeps its series (exists 0),
                // the others' are removed, so the number of series stays bounded.
                known.retain(|name| {
                    let present = snapshot.slot(name).is_some();
                    if !present {
                        last_status.remove(name);
                        if name != &s.slot {
                            metrics.remove_slot_series(name);
                        }
                    }
                    present
                });
                if snapshot.slot(&s.slot).is_none() {
                    metrics.set_slot_missing(&s.slot);
                }
                metrics.set_slot_watch_success(true);
                if s.owns_readiness {
                    health.set_ready(true);
                }
                // Alone, the watcher cannot tell the relay's stream from another reader.
                let relay_streaming = s.owns_readiness || health.is_ready();
                health.set_note(
                    NoteSource::Slot,
                    slot_note(
                        &s.slot,
                        snapshot.slot(&s.slot),
                        snapshot.max_slot_wal_keep_size,
                        relay_streaming,
                    ),
                );
            }
            Err(e) => {
                // The connection may be mid-answer: start over at the next interval.
                client = None;
                metrics.set_slot_watch_success(false);
                if s.owns_readiness {
                    health.set_ready(false);
                }
                if !failing {
                    tracing::warn!(slot = %s.slot, error = %e, "cannot read the slot metrics; retrying every interval");
                    failing = true;
                }
                health.set_note(
                    NoteSource::Slot,
                    Some(format!(
                        "slot metrics: cannot read pg_replication_slots: {e}"
                    )),
                );
            }
        }
    }
    if let Some((c, _)) = client {
        c.close().await;
    }
}

/// A server setting from `pg_settings`: its raw value and unit.
#[derive(Clone, Debug, Default)]
struct Setting {
    value: String,
    unit: String,
}

/// Checks the server and the relay's slot before streaming; creates the publication where
/// missing. Returns the slot's confirmed flush LSN, or `None` if the slot does not exist.
///
/// Refuses (a [`CdcError`] naming the setting and the fix): `wal_level` other than logical, a
/// publication that does not publish the outbox table or its inserts, a slot of another plugin
/// or database, an invalidated slot; waits (retryable) for a slot in use. Warns, naming the
/// setting and the fix: unlimited `max_slot_wal_keep_size`, no walsender or slot headroom,
/// `wal_sender_timeout = 0`, a non-zero `idle_replication_slot_timeout` (Postgres 18), an
/// unreserved slot.
pub async fn preflight(
    sql: &mut ReplicationClient,
    s: &CdcSettings,
) -> Result<Option<Lsn>, CdcError> {
    let version = server_version_num(sql).await?;
    let wal_level = one_value(sql, "SHOW wal_level").await?;
    if wal_level != "logical" {
        return Err(CdcError::WalLevel(wal_level));
    }
    let settings: HashMap<String, Setting> = sql
        .simple_query(
            "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name IN \
             ('max_slot_wal_keep_size', 'max_wal_senders', 'max_replication_slots', \
             'wal_sender_timeout', 'idle_replication_slot_timeout')",
        )
        .await?
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let name = it.next().flatten()?;
            let value = it.next().flatten().unwrap_or_default();
            let unit = it.next().flatten().unwrap_or_default();
            Some((name, Setting { value, unit }))
        })
        .collect();
    let get = |name: &str| settings.get(name).cloned().unwrap_or_default();
    let int = |name: &str| get(name).value.parse::<i64>().unwrap_or(0);

    let keep = get("max_slot_wal_keep_size");
    let keep_bytes = setting_bytes(&keep.value, &keep.unit).unwrap_or(-1);
    if keep_bytes < 0 {
        tracing::warn!(
            "max_slot_wal_keep_size is unlimited (-1): a stalled slot can fill the primary's disk. \
             Set max_slot_wal_keep_size (e.g. 1GB, below the free space of pg_wal's disk; a reload \
             is enough) to cap the WAL a slot may retain (see RUNBOOK.md)"
        );
    }

    // Walsenders: this session is one; the stream needs one more.
    let walsenders: i64 = one_value(
        sql,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'",
    )
    .await?
    .parse()
    .unwrap_or(0);
    let max_senders = int("max_wal_senders");
    if walsenders >= max_senders {
        tracing::warn!(
            walsenders,
            max_wal_senders = max_senders,
            "max_wal_senders: every walsender is taken, so the relay's stream will be refused \
             (and retried) until one ends. Raise max_wal_senders (a restart of Postgres is needed)"
        );
    } else if walsenders + 1 >= max_senders {
        tracing::warn!(
            walsenders,
            max_wal_senders = max_senders,
            "max_wal_senders: no headroom left once the relay streams; a restarted relay waits for \
             its old walsender to time out, and standbys cannot connect. Raise max_wal_senders \
             (a restart of Postgres is needed)"
        );
    }

    let table = format!("{}.{}", s.table_schema, s.table_name);
    let rows = sql
        .simple_query(&format!(
            "SELECT pubinsert FROM pg_publication WHERE pubname = {}",
            quote_literal(&s.publication)
        ))
        .await?;
    match rows.first().map(|r| r.first().cloned().flatten()) {
        None => {
            tracing::info!(publication = %s.publication, table = %table, "creating publication");
            sql.simple_query(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}.{}",
                quote_ident(&s.publication),
                quote_ident(&s.table_schema),
                quote_ident(&s.table_name)
            ))
            .await?;
        }
        Some(Some(v)) if v == "f" => {
            return Err(CdcError::PublicationNoInserts {
                publication: s.publication.clone(),
            })
        }
        _ => {}
    }
    let rows = sql
        .simple_query(&format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = {} \
             AND schemaname = {} AND tablename = {}",
            quote_literal(&s.publication),
            quote_literal(&s.table_schema),
            quote_literal(&s.table_name)
        ))
        .await?;
    if first_cell(&rows).is_none_or(|v| v == "0") {
        return Err(CdcError::PublicationMissingTable {
            publication: s.publication.clone(),
            table,
        });
    }

    let sender_timeout = get("wal_sender_timeout");
    if setting_duration(&sender_timeout.value, &sender_timeout.unit).is_none() {
        tracing::warn!(
            "wal_sender_timeout = 0 (disabled): the walsender of a relay that died keeps the slot \
             until TCP notices, and a restarted relay waits on 'slot in use' meanwhile. Set \
             wal_sender_timeout (e.g. 60s; a reload is enough)"
        );
    }
    let idle = get("idle_replication_slot_timeout");
    if let Some(idle) = setting_duration(&idle.value, &idle.unit) {
        tracing::warn!(
            idle_replication_slot_timeout = %humantime_serde::re::humantime::format_duration(idle),
            "idle_replication_slot_timeout is set: a relay stopped for longer loses its slot \
             (invalidation_reason = idle_timeout). Set it to 0, or longer than the longest outage \
             you plan for"
        );
    }

    let reason = if version >= 170000 {
        "invalidation_reason"
    } else {
        "NULL"
    };
    let rows = sql
        .simple_query(&format!(
            "SELECT plugin, database, active_pid, confirmed_flush_lsn, wal_status, \
             current_database(), {reason} FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(&s.slot)
        ))
        .await?;
    let slots: i64 = one_value(sql, "SELECT count(*) FROM pg_replication_slots")
        .await?
        .parse()
        .unwrap_or(0);
    let max_slots = int("max_replication_slots");
    tracing::info!(
        server_version_num = version,
        max_slot_wal_keep_size = keep_bytes,
        walsenders,
        max_wal_senders = max_senders,
        slots,
        max_replication_slots = max_slots,
        "postgres settings checked"
    );
    if slots >= max_slots {
        let consequence = if rows.is_empty() && s.create_slot {
            "so the relay cannot create its slot"
        } else {
            "so no slot can be created (another relay, or a new slot to recover a lost one)"
        };
        tracing::warn!(
            slots,
            max_replication_slots = max_slots,
            "max_replication_slots: every slot is in use, {consequence}. Drop a slot nothing \
             reads (SELECT slot_name, active FROM pg_replication_slots) or raise \
             max_replication_slots (a restart of Postgres is needed)"
        );
    }
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let cell = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (plugin, database, active_pid, confirmed, wal_status, current_db) =
        (cell(0), cell(1), cell(2), cell(3), cell(4), cell(5));
    let invalidation_reason = row.get(6).cloned().flatten();
    if plugin != "pgoutput" {
        return Err(CdcError::SlotPlugin {
            slot: s.slot.clone(),
            plugin: if plugin.is_empty() {
                "none (a physical slot)".to_owned()
            } else {
                plugin
            },
        });
    }
    if database != current_db {
        return Err(CdcError::SlotDatabase {
            slot: s.slot.clone(),
            database,
            expected: current_db,
        });
    }
    if let Some(e) = invalidation_error(&s.slot, &wal_status, invalidation_reason.as_deref()) {
        return Err(e);
    }
    if wal_status == "unreserved" {
        tracing::warn!(
            slot = %s.slot,
            "slot is unreserved: it retains more WAL than max_slot_wal_keep_size and Postgres will \
             invalidate it at its next checkpoint unless the relay catches up first"
        );
    }
    if !active_pid.is_empty() {
        return Err(CdcError::SlotInUse {
            slot: s.slot.clone(),
            pid: active_pid,
        });
    }
    confirmed
        .parse::<Lsn>()
        .map(Some)
        .map_err(|e| CdcError::Unexpected(format!("confirmed_flush_lsn: {e}")))
}

/// The error of an invalidated slot, `None` for a valid one: [`CdcError::SlotLost`] for WAL
/// removed past `max_slot_wal_keep_size` (the only reason before Postgres 17), otherwise
/// [`CdcError::SlotInvalidated`] naming Postgres's `invalidation_reason` (e.g. `idle_timeout`).
pub fn invalidation_error(slot: &str, wal_status: &str, reason: Option<&str>) -> Option<CdcError> {
    match reason {
        Some(r) if r != "wal_removed" => Some(CdcError::SlotInvalidated {
            slot: slot.to_owned(),
            reason: r.to_owned(),
        }),
        Some(_) => Some(CdcError::SlotLost(slot.to_owned())),
        None if wal_status == "lost" => Some(CdcError::SlotLost(slot.to_owned())),
        None => None,
    }
}

pub(crate) async fn one_value(
    sql: &mut ReplicationClient,
    query: &str,
) -> Result<String, CdcError> {
    let rows = sql.simple_query(query).await?;
    first_cell(&rows).ok_or_else(|| CdcError::Unexpected(format!("{query} returned no value")))
}

fn first_cell(rows: &[Vec<Option<String>>]) -> Option<String> {
    rows.first().and_then(|r| r.first()).cloned().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[Option<&str>]) -> Vec<Option<String>> {
        cells.iter().map(|c| c.map(str::to_owned)).collect()
    }

    #[test]
    fn sizes_and_durations_from_pg_settings() {
        assert_eq!(setting_bytes("1024", "MB"), Some(1 << 30));
        assert_eq!(setting_bytes("-1", "MB"), Some(-1));
        assert_eq!(setting_bytes("16", "8kB"), Some(16 * 8192));
        assert_eq!(setting_bytes("7", ""), Some(7));
        assert_eq!(setting_bytes("x", "MB"), None);
        assert_eq!(setting_bytes("1", "parsecs"), None);
        assert_eq!(setting_bytes("9223372036854775807", "MB"), None);
        assert_eq!(
            setting_duration("60000", "ms"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(setting_duration("2", "min"), Some(Duration::from_secs(120)));
        assert_eq!(setting_duration("0", "ms"), None);
        assert_eq!(setting_duration("-1", "s"), None);
        assert_eq!(pretty_bytes(512), "512 B");
        assert_eq!(pretty_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn slot_rows_parse_leniently() {
        let r = parse_slot_row(&row(&[
            Some("s"),
            Some("pgoutput"),
            Some("logical"),
            Some("db"),
            Some("t"),
            Some("4242"),
            Some("0/1000"),
            Some("0/2000"),
            Some("8192"),
            Some("4096"),
            Some("unreserved"),
            Some("-100"),
            None,
        ]))
        .unwrap();
        assert_eq!(r.name, "s");
        assert!(r.active);
        assert_eq!(r.active_pid, Some(4242));
        assert_eq!(r.confirmed_flush_lsn, Some(Lsn(0x2000)));
        assert_eq!(r.safe_wal_size, Some(-100));
        assert!(!r.is_invalidated());
        // A physical slot, short row, garbage: no panic, NULLs.
        let p = parse_slot_row(&row(&[
            Some("phys"),
            None,
            Some("physical"),
            None,
            Some("f"),
        ]))
        .unwrap();
        assert_eq!(p.plugin, None);
        assert_eq!(p.lag_bytes, None);
        let g = parse_slot_row(&row(&[
            Some("g"),
            None,
            None,
            None,
            Some("yes"),
            Some("pid"),
            Some("not an lsn"),
        ]))
        .unwrap();
        assert!(!g.active);
        assert_eq!(g.active_pid, None);
        assert_eq!(g.restart_lsn, None);
        assert!(parse_slot_row(&[]).is_none());
    }

    #[test]
    fn notes_say_what_is_wrong_with_the_slot() {
        let ok = SlotRow {
            name: "s".into(),
            wal_status: Some("reserved".into()),
            retained_bytes: Some(1 << 20),
            ..SlotRow::default()
        };
        assert_eq!(slot_note("s", Some(&ok), 1 << 30, true), None);
        assert_eq!(
            slot_note("s", None, 1 << 30, false).as_deref(),
            Some("slot s does not exist")
        );
        let unreserved = SlotRow {
            wal_status: Some("unreserved".into()),
            ..ok.clone()
        };
        let n = slot_note("s", Some(&unreserved), 1 << 30, true).unwrap();
        assert!(n.contains("unreserved") && n.contains("1.0 GiB"), "{n}");
        let lost = SlotRow {
            wal_status: Some("lost".into()),
            invalidation_reason: Some("wal_removed".into()),
            ..ok.clone()
        };
        let n = slot_note("s", Some(&lost), 1 << 30, false).unwrap();
        assert!(n.contains("invalidation_reason = wal_removed"), "{n}");
        let held = SlotRow {
            active: true,
            active_pid: Some(77),
            ..ok.clone()
        };
        assert_eq!(slot_note("s", Some(&held), 1 << 30, true), None);
        assert!(slot_note("s", Some(&held), 1 << 30, false)
            .unwrap()
            .contains("held by process 77"));
    }

    #[test]
    fn confirmed_age_counts_only_while_behind_and_still() {
        let mut ages = ConfirmedAges::default();
        let t0 = Instant::now();
        let mut r = SlotRow {
            name: "s".into(),
            confirmed_flush_lsn: Some(Lsn(10)),
            lag_bytes: Some(100),
            ..SlotRow::default()
        };
        assert_eq!(ages.age(&r, t0), 0.0);
        assert_eq!(ages.age(&r, t0 + Duration::from_secs(30)), 30.0);
        r.confirmed_flush_lsn = Some(Lsn(20));
        assert_eq!(ages.age(&r, t0 + Duration::from_secs(40)), 0.0);
        assert_eq!(ages.age(&r, t0 + Duration::from_secs(45)), 5.0);
        // Caught up: nothing to confirm is not a stall.
        r.lag_bytes = Some(0);
        assert_eq!(ages.age(&r, t0 + Duration::from_secs(100)), 0.0);
        ages.forget_missing(&[]);
        assert!(ages.seen.is_empty());
    }
}
