//! A writer of outbox transactions, and the tally that proves exactly-once by counting.
//!
//! Writers commit transactions of 1 to 4 outbox rows, about one in ten rolled back. Each writer
//! owns its aggregate ids (`w<writer>-<n>`) and numbers each aggregate's events with `seq` in the
//! order it commits them, so per-key commit order is known. The expected set is what the outbox
//! table holds at the end (authoritative even when a commit's outcome was unknown to the writer
//! because Postgres restarted under it).

use super::kafka::{self, Isolation, Record};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::NoTls;

pub const AGGREGATE_TYPES: [&str; 3] = ["order", "payment", "shipment"];

#[derive(Clone, Default)]
pub struct LoadState {
    pub stop: Arc<AtomicBool>,
    pub committed_txns: Arc<AtomicU64>,
    pub rolled_back: Arc<Mutex<Vec<uuid::Uuid>>>,
}

/// What else a writer's transactions do, beside 1 to 4 rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// About one transaction in three also inserts rows inside a savepoint and rolls back to
    /// it: those rows must never be delivered.
    pub savepoints: bool,
    /// Every `big_every`-th transaction also inserts `big_rows` rows for one aggregate, enough
    /// to be streamed before it commits (protocol 2, a small logical_decoding_work_mem), so
    /// large transactions interleave with the small ones of the other writers.
    pub big_every: u32,
    pub big_rows: u32,
}

/// Writes until `state.stop` is set. Reconnects when Postgres goes away.
pub async fn writer(url: String, writer_id: u32, state: LoadState, pause: Duration) {
    writer_shaped(url, writer_id, state, pause, Shape::default()).await
}

/// [`writer`], with transactions of `shape`.
pub async fn writer_shaped(
    url: String,
    writer_id: u32,
    state: LoadState,
    pause: Duration,
    shape: Shape,
) {
    let mut txn_no: u32 = 0;
    let mut seqs: HashMap<String, i64> = HashMap::new();
    'outer: while !state.stop.load(Ordering::Relaxed) {
        let Ok((mut client, conn)) = tokio_postgres::connect(&url, NoTls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while !state.stop.load(Ordering::Relaxed) {
            let rows = 1 + rand::random::<u32>() % 4;
            let rollback = rand::random::<u32>() % 10 == 0;
            txn_no += 1;
            let big = shape.big_every > 0 && txn_no % shape.big_every == 0;
            let savepoint = shape.savepoints && rand::random::<u32>() % 3 == 0;
            let mut undone: Vec<uuid::Uuid> = Vec::new();
            let mut ids = Vec::new();
            let result: Result<(), tokio_postgres::Error> = async {
                let tx = client.transaction().await?;
                for _ in 0..rows {
                    let agg = format!("w{writer_id}-{}", rand::random::<u32>() % 20);
                    let ty = AGGREGATE_TYPES[(rand::random::<u32>() % 3) as usize];
                    // Rows of one transaction for the same aggregate get consecutive numbers.
                    let earlier = ids.iter().filter(|(_, a)| *a == agg).count() as i64;
                    let seq = seqs.get(&agg).copied().unwrap_or(0) + 1 + earlier;
                    let id = uuid::Uuid::new_v4();
                    let payload = serde_json::json!({"seq": seq, "agg": agg, "pad": "x".repeat(200)});
                    tx.execute(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload, headers) \
                         VALUES ($1, $2, $3, 'Happened', $4, '{\"source\":\"test\"}')",
                        &[&id, &ty, &agg, &payload],
                    )
                    .await?;
                    ids.push((id, agg));
                }
                if savepoint {
                    tx.batch_execute("SAVEPOINT sp").await?;
                    let id = uuid::Uuid::new_v4();
                    tx.execute(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
                         VALUES ($1, 'order', $2, 'RolledBack', '{\"seq\": -1}')",
                        &[&id, &format!("w{writer_id}-sp")],
                    )
                    .await?;
                    undone.push(id);
                    tx.batch_execute("ROLLBACK TO SAVEPOINT sp").await?;
                }
                if big {
                    // One aggregate of its own, numbered in insert order.
                    let agg = format!("w{writer_id}-big");
                    let base = seqs.get(&agg).copied().unwrap_or(0);
                    tx.execute(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
                         SELECT gen_random_uuid(), 'shipment', $1, 'Bulk', \
                                jsonb_build_object('seq', $2::bigint + g, 'agg', $1::text, 'pad', repeat('x', 200)) \
                         FROM generate_series(1, $3::int) g",
                        &[&agg, &base, &(shape.big_rows as i32)],
                    )
                    .await?;
                    for _ in 0..shape.big_rows {
                        ids.push((uuid::Uuid::nil(), agg.clone()));
                    }
                }
                if rollback {
                    tx.rollback().await
                } else {
                    tx.commit().await
                }
            }
            .await;
            state.rolled_back.lock().unwrap().extend(undone);
            match result {
                Ok(()) if rollback => {
                    state
                        .rolled_back
                        .lock()
                        .unwrap()
                        .extend(ids.iter().map(|(id, _)| *id));
                }
                Ok(()) => {
                    state.committed_txns.fetch_add(1, Ordering::Relaxed);
                    for (_, agg) in ids {
                        *seqs.entry(agg).or_insert(0) += 1;
                    }
                }
                Err(_) => {
                    // Outcome unknown (Postgres went away). Advance the numbers anyway: a gap
                    // keeps "strictly increasing" true whichever way the commit went.
                    for (_, agg) in ids {
                        *seqs.entry(agg).or_insert(0) += 1;
                    }
                    continue 'outer;
                }
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// What the count found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Committed outbox rows.
    pub expected: usize,
    /// Records read under read_committed.
    pub delivered: usize,
    pub lost: usize,
    /// Which events were lost (for the investigation of a miss).
    pub lost_ids: Vec<uuid::Uuid>,
    pub duplicates: usize,
    pub out_of_order: usize,
    pub rolled_back_delivered: usize,
}

/// Counts the records of `topics` (read_committed from `bootstrap`) against the outbox table.
pub async fn tally(
    db_url: &str,
    bootstrap: &str,
    topics: &[String],
    rolled_back: &[uuid::Uuid],
) -> Tally {
    let (client, conn) = tokio_postgres::connect(db_url, NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let rows = client
        .query("SELECT event_id FROM outbox", &[])
        .await
        .expect("outbox");
    let expected: HashSet<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let read = || async {
        let mut records: Vec<Record> = Vec::new();
        for t in topics {
            records.extend(kafka::read_all_from(bootstrap, t, Isolation::ReadCommitted).await);
        }
        records
    };
    let mut records = read().await;
    let mut t = count(&expected, &records, rolled_back);
    if t.lost > 0 {
        // A reader can stop short (it trusts the partition-EOF events); read everything again
        // with a new reader before calling anything lost. A real loss stays lost.
        eprintln!("first read: {t:?}; reading again");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        records = read().await;
        t = count(&expected, &records, rolled_back);
    }
    if t.lost > 0 {
        // Say which, for the investigation: the lost rows and when their transactions committed.
        let seen: HashSet<String> = records
            .iter()
            .filter_map(|r| r.header("event_id").map(str::to_owned))
            .collect();
        let rows = client
            .query(
                "SELECT event_id::text, txid::text, aggregate_type || '/' || aggregate_id, \
                 coalesce(pg_xact_commit_timestamp(xmin)::text, '?') FROM outbox ORDER BY id",
                &[],
            )
            .await
            .expect("outbox rows");
        for r in rows {
            let id: String = r.get(0);
            if !seen.contains(&id) {
                eprintln!(
                    "lost: event {id} txid {} {} committed at {}",
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                );
            }
        }
    }
    t
}

pub fn count(
    expected: &HashSet<uuid::Uuid>,
    records: &[Record],
    rolled_back: &[uuid::Uuid],
) -> Tally {
    let mut seen: HashMap<uuid::Uuid, usize> = HashMap::new();
    let mut last_seq: HashMap<(String, String), i64> = HashMap::new();
    let mut out_of_order = 0;
    for r in records {
        let id: uuid::Uuid = r
            .header("event_id")
            .and_then(|s| s.parse().ok())
            .expect("every record has an event_id header");
        *seen.entry(id).or_insert(0) += 1;
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
            .expect("value is the payload JSON");
        let seq = v["seq"].as_i64().expect("payload has seq");
        let key = (
            r.header("aggregate_type").unwrap_or_default().to_owned(),
            r.key_str(),
        );
        let last = last_seq.entry(key).or_insert(0);
        if seq <= *last {
            out_of_order += 1;
        }
        *last = (*last).max(seq);
    }
    let rb: HashSet<&uuid::Uuid> = rolled_back.iter().collect();
    Tally {
        expected: expected.len(),
        delivered: records.len(),
        lost: expected.iter().filter(|id| !seen.contains_key(id)).count(),
        lost_ids: expected
            .iter()
            .filter(|id| !seen.contains_key(id))
            .copied()
            .collect(),
        duplicates: seen.values().map(|n| n - 1).sum(),
        out_of_order,
        rolled_back_delivered: seen.keys().filter(|id| rb.contains(id)).count(),
    }
}
