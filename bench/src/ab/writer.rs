//! The open-loop writer: outbox transactions due at a fixed rate, whatever the relay or Postgres
//! does, each event carrying a sequence number and the time its COMMIT returned.
//!
//! Transaction `j` of a phase is due `j * rows_per_tx / rate` seconds after the start; the writer
//! connections take the next due transaction from a shared ticket counter, so a slow commit on
//! one connection does not hold back the schedule of the others. A transaction is never skipped
//! for being late; lateness is reported (`max_behind_ms`). Event `seq` is `base + j *
//! rows_per_tx + row`, and the payload is `{"seq": N, "pad": "…"}` (contract item 1).

use crate::support::{connect, now_us};
use anyhow::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the writers do in one phase.
#[derive(Debug, Clone)]
pub struct WriteSpec {
    /// Events per second; 0: as fast as the connections commit.
    pub rate: u32,
    pub duration: Duration,
    pub rows_per_tx: u32,
    pub payload_bytes: usize,
    /// Distinct aggregate ids (Kafka keys), round robin.
    pub keys: u64,
    pub writers: u32,
    /// The first sequence number of the phase.
    pub base: u64,
}

impl WriteSpec {
    /// The most events this phase can write at a fixed rate (the reader's table size).
    pub fn capacity(&self) -> u64 {
        let r = u64::from(self.rows_per_tx.max(1));
        let txs = (f64::from(self.rate) * self.duration.as_secs_f64() / r as f64).ceil() as u64;
        txs * r + r
    }
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct Written {
    /// Events committed; their seqs are `base .. base + events` except the gaps of failed
    /// transactions (none unless `failed > 0`).
    pub events: u64,
    pub failed_txs: u64,
    /// Per event (index `seq - base`): µs since the epoch when its COMMIT returned; 0 if not
    /// committed.
    pub commit_us: Vec<i64>,
    /// Per transaction: µs from sending the statement to its COMMIT returning.
    pub commit_latency_us: Vec<i64>,
    /// Wall time from the first due transaction to the last commit.
    pub elapsed: Duration,
    /// The worst lateness of a transaction against its schedule.
    pub max_behind_ms: f64,
    pub started_us: i64,
}

/// One INSERT of `rows` rows: `$1` the aggregate type, then per row its key and JSON payload.
fn insert_sql(rows: u32) -> String {
    let values: Vec<String> = (0..rows)
        .map(|i| {
            format!(
                "(gen_random_uuid(), $1, ${}, 'BenchEvent', ${}::text::jsonb)",
                2 + 2 * i,
                3 + 2 * i
            )
        })
        .collect();
    format!(
        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) VALUES {}",
        values.join(", ")
    )
}

/// The JSON payload of event `seq`, about `bytes` long.
pub fn payload(seq: u64, bytes: usize) -> String {
    let pad = "x".repeat(bytes.saturating_sub(32));
    format!(r#"{{"seq": {seq}, "pad": "{pad}"}}"#)
}

/// Runs the writers of one phase against `url` and returns what they committed.
pub async fn write(url: &str, spec: &WriteSpec, aggregate_type: &str) -> Result<Written> {
    let r = spec.rows_per_tx.max(1);
    let ticket = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..spec.writers.max(1) {
        let c = connect(url).await?;
        let stmt = c.prepare(&insert_sql(r)).await?;
        clients.push((c, stmt));
    }
    let start = Instant::now();
    let started_us = now_us();
    let mut tasks = Vec::new();
    for (client, stmt) in clients {
        let (ticket, spec, agg) = (ticket.clone(), spec.clone(), aggregate_type.to_owned());
        tasks.push(tokio::spawn(async move {
            // (j, commit µs, latency µs) per transaction; failures counted, not fatal: a
            // phase reports them instead of aborting the whole run.
            let mut done: Vec<(u64, i64, i64)> = Vec::new();
            let (mut failed, mut behind) = (0u64, 0f64);
            let mut keys: Vec<String> = Vec::with_capacity(r as usize);
            let mut bodies: Vec<String> = Vec::with_capacity(r as usize);
            loop {
                let j = ticket.fetch_add(1, Ordering::Relaxed);
                if spec.rate > 0 {
                    let due =
                        Duration::from_secs_f64((j * u64::from(r)) as f64 / f64::from(spec.rate));
                    if due >= spec.duration {
                        break;
                    }
                    match due.checked_sub(start.elapsed()) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => behind = behind.max((start.elapsed() - due).as_secs_f64()),
                    }
                } else if start.elapsed() >= spec.duration {
                    break;
                }
                keys.clear();
                bodies.clear();
                for row in 0..u64::from(r) {
                    let seq = spec.base + j * u64::from(r) + row;
                    keys.push(format!("k{}", seq % spec.keys.max(1)));
                    bodies.push(payload(seq, spec.payload_bytes));
                }
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    Vec::with_capacity(1 + 2 * r as usize);
                params.push(&agg);
                for (k, b) in keys.iter().zip(&bodies) {
                    params.push(k);
                    params.push(b);
                }
                let sent = Instant::now();
                match client.execute(&stmt, &params).await {
                    Ok(_) => {
                        let committed = now_us();
                        done.push((j, committed, sent.elapsed().as_micros() as i64));
                    }
                    Err(_) => failed += 1,
                }
            }
            (done, failed, behind)
        }));
    }
    let mut out = Written {
        started_us,
        ..Written::default()
    };
    let mut all = Vec::new();
    for t in tasks {
        let (done, failed, behind) = t.await?;
        out.failed_txs += failed;
        out.max_behind_ms = out.max_behind_ms.max(behind * 1000.0);
        all.extend(done);
    }
    out.elapsed = start.elapsed();
    let max_j = all.iter().map(|d| d.0 + 1).max().unwrap_or(0);
    out.commit_us = vec![0; (max_j * u64::from(r)) as usize];
    for (j, at, lat) in all {
        for row in 0..u64::from(r) {
            out.commit_us[(j * u64::from(r) + row) as usize] = at;
        }
        out.commit_latency_us.push(lat);
        out.events += u64::from(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_has_two_parameters_per_row() {
        let s = insert_sql(3);
        assert!(s.contains("$7::text::jsonb"), "{s}");
        assert!(!s.contains("$8"), "{s}");
    }

    #[test]
    fn payload_is_json_with_its_seq() {
        let p = payload(42, 300);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["seq"], 42);
        assert!((290..=310).contains(&p.len()), "{}", p.len());
    }
}
