//! The database's side of a phase, read from Postgres itself: the CPU of the backends serving the
//! contender (`/proc/<pid>/stat`: Postgres runs on this machine), the poll query in
//! `pg_stat_statements`, the outbox's tuple counters, size and dead tuples, and WAL written.

use crate::support::{connect, proc_usage};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The outbox table's counters and size at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableStats {
    pub seq_scan: i64,
    pub seq_tup_read: i64,
    pub idx_scan: i64,
    pub idx_tup_fetch: i64,
    pub n_live_tup: i64,
    pub n_dead_tup: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
}

pub async fn table_stats(c: &tokio_postgres::Client) -> Result<TableStats> {
    // The statistics of the current transaction are cached; read fresh ones.
    c.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let r = c
        .query_one(
            "SELECT coalesce(seq_scan, 0), coalesce(seq_tup_read, 0), coalesce(idx_scan, 0), \
             coalesce(idx_tup_fetch, 0), n_live_tup, n_dead_tup, \
             pg_relation_size('outbox'), pg_indexes_size('outbox') \
             FROM pg_stat_user_tables WHERE relname = 'outbox'",
            &[],
        )
        .await?;
    Ok(TableStats {
        seq_scan: r.get(0),
        seq_tup_read: r.get(1),
        idx_scan: r.get(2),
        idx_tup_fetch: r.get(3),
        n_live_tup: r.get(4),
        n_dead_tup: r.get(5),
        table_bytes: r.get(6),
        index_bytes: r.get(7),
    })
}

/// The WAL insert position, in bytes.
pub async fn wal_lsn(c: &tokio_postgres::Client) -> Result<i64> {
    let r = c
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
            &[],
        )
        .await?;
    Ok(r.get(0))
}

/// The polling relay's query in `pg_stat_statements` since the last reset.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PollQuery {
    pub calls: i64,
    pub total_ms: f64,
    pub rows: i64,
    pub shared_blks_hit: i64,
    pub shared_blks_read: i64,
}

pub async fn reset_statements(c: &tokio_postgres::Client) -> Result<()> {
    c.batch_execute("SELECT pg_stat_statements_reset()").await?;
    Ok(())
}

/// Every statement that reads the outbox below the visibility horizon: the poll query.
pub async fn poll_query(c: &tokio_postgres::Client) -> Result<PollQuery> {
    let r = c
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8, coalesce(sum(total_exec_time), 0)::float8, \
             coalesce(sum(rows), 0)::int8, coalesce(sum(shared_blks_hit), 0)::int8, \
             coalesce(sum(shared_blks_read), 0)::int8 FROM pg_stat_statements \
             WHERE query LIKE '%pg_snapshot_xmin(pg_current_snapshot())%' \
             AND query LIKE '%ORDER BY o.txid%' AND dbid = (SELECT oid FROM pg_database \
             WHERE datname = current_database())",
            &[],
        )
        .await?;
    Ok(PollQuery {
        calls: r.get(0),
        total_ms: r.get(1),
        rows: r.get(2),
        shared_blks_hit: r.get(3),
        shared_blks_read: r.get(4),
    })
}

/// CPU seconds of one backend over the phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendCpu {
    pub pid: i32,
    pub application_name: String,
    pub backend_type: String,
    pub cpu_s: f64,
}

/// Samples the CPU of every backend of one contender (by `application_name` prefix, plus the
/// slot's walsender) until stopped. A backend first seen mid-phase counts from zero: it was
/// started during the phase.
pub struct BackendSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<BackendCpu>>,
}

impl BackendSampler {
    pub async fn start(url: &str, tag: &str, slot: Option<&str>) -> Result<BackendSampler> {
        let c = connect(url).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, tag, slot) = (
            stop.clone(),
            format!("{tag}%"),
            slot.unwrap_or("").to_owned(),
        );
        // (first, last) CPU seconds per backend pid.
        let mut seen: BTreeMap<i32, (String, String, f64, f64)> = BTreeMap::new();
        sample(&c, &tag, &slot, &mut seen, true).await;
        let task = tokio::spawn(async move {
            loop {
                let last_round = s.load(Ordering::Relaxed);
                sample(&c, &tag, &slot, &mut seen, false).await;
                if last_round {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            seen.into_iter()
                .map(|(pid, (name, kind, first, last))| BackendCpu {
                    pid,
                    application_name: name,
                    backend_type: kind,
                    cpu_s: last - first,
                })
                .collect()
        });
        Ok(BackendSampler { stop, task })
    }

    /// Takes a last reading and returns the CPU seconds of every backend seen.
    pub async fn finish(self) -> Vec<BackendCpu> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

async fn sample(
    c: &tokio_postgres::Client,
    tag: &str,
    slot: &str,
    seen: &mut BTreeMap<i32, (String, String, f64, f64)>,
    initial: bool,
) {
    let Ok(rows) = c
        .query(
            "SELECT pid, coalesce(application_name, ''), coalesce(backend_type, '') \
             FROM pg_stat_activity WHERE application_name LIKE $1 \
             OR pid = (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $2)",
            &[&tag, &slot],
        )
        .await
    else {
        return;
    };
    for r in rows {
        let pid: i32 = r.get(0);
        let Some((cpu, _)) = u32::try_from(pid).ok().and_then(proc_usage) else {
            continue;
        };
        let e = seen
            .entry(pid)
            .or_insert_with(|| (r.get(1), r.get(2), if initial { cpu } else { 0.0 }, cpu));
        e.3 = cpu;
    }
}
