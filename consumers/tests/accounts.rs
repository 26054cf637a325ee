//! Account balances under duplicates and reordering within keys, and a DLQ replay of stale
//! events: with the version guard the last-write-wins balances converge to the in-order ones;
//! without it they do not. The delta (credit/debit) design is compared beside it: commutative,
//! it tolerates reordering but needs dedup for duplicates, and the guard breaks it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use consumers::dlq::{self, DlqWriter, Failure, Selection};
use consumers::downstream::{AccountEvent, AccountMode, Accounts};
use consumers::{Defences, HandlerError, Record};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::kafka::{bootstrap, create_topic};
use crate::support::pg::TestDb;
use crate::support::produce::{self, TestEvent};
use crate::support::{runtime, unique_name};

const ACCOUNTS: usize = 20;
const EVENTS_PER_ACCOUNT: i64 = 12;

struct Variant {
    name: &'static str,
    mode: AccountMode,
    dedup: bool,
    guard: bool,
}

struct Result {
    converged: usize,
    applied: u64,
    guard_skips: u64,
    dedup_hits: u64,
}

/// Every account's events in version order, and the balance they end at.
fn history(rng: &mut StdRng) -> (Vec<Vec<TestEvent>>, HashMap<String, i64>) {
    let mut all = Vec::new();
    let mut finals = HashMap::new();
    for a in 0..ACCOUNTS {
        let account = format!("acct-{a}");
        let mut balance = 0i64;
        let mut events = Vec::new();
        for version in 1..=EVENTS_PER_ACCOUNT {
            let amount = rng.random_range(1..=1000);
            let credit = balance < amount || rng.random_bool(0.6);
            balance += if credit { amount } else { -amount };
            let e = AccountEvent {
                account_id: account.clone(),
                version,
                kind: if credit { "credit" } else { "debit" }.into(),
                amount_cents: amount,
                balance_after_cents: balance,
            };
            events.push(TestEvent::new(
                "account",
                &account,
                if credit {
                    "AccountCredited"
                } else {
                    "AccountDebited"
                },
                serde_json::to_value(&e).unwrap(),
            ));
        }
        finals.insert(account, balance);
        all.push(events);
    }
    (all, finals)
}

/// What the test producer writes: per account, adjacent events swapped at random (and the last
/// two always, for every other account), and two events repeated later with their event ids;
/// accounts interleaved.
fn disorder(rng: &mut StdRng, history: &[Vec<TestEvent>]) -> (Vec<TestEvent>, usize) {
    let mut per_account = Vec::new();
    let mut duplicates = 0;
    for (a, events) in history.iter().enumerate() {
        let mut seq = events.clone();
        let n = seq.len();
        for i in 0..n - 2 {
            if rng.random_bool(0.3) {
                seq.swap(i, i + 1);
            }
        }
        if a % 2 == 0 {
            seq.swap(n - 2, n - 1);
        }
        for _ in 0..2 {
            let dup = events[rng.random_range(0..n)].clone();
            let at = rng.random_range(0..=seq.len());
            seq.insert(at, dup);
            duplicates += 1;
        }
        per_account.push(seq);
    }
    let mut out = Vec::new();
    let longest = per_account.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for seq in &per_account {
            if let Some(e) = seq.get(i) {
                out.push(e.clone());
            }
        }
    }
    (out, duplicates)
}

async fn balances(db: &TestDb) -> HashMap<String, i64> {
    db.client()
        .await
        .query(
            "SELECT account_id, balance_cents FROM account_balances",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_converge_with_the_version_guard_and_not_without() {
    let mut rng = StdRng::seed_from_u64(20261201);
    let (history, finals) = history(&mut rng);
    let (delivered, duplicates) = disorder(&mut rng, &history);
    let topic = unique_name("accounts");
    create_topic(&topic, 4).await;
    produce::send(&topic, &delivered).await;

    let variants = [
        Variant {
            name: "last-write-wins + guard (+ dedup)",
            mode: AccountMode::LastWriteWins,
            dedup: true,
            guard: true,
        },
        Variant {
            name: "last-write-wins, no guard (+ dedup)",
            mode: AccountMode::LastWriteWins,
            dedup: true,
            guard: false,
        },
        Variant {
            name: "delta + dedup, no guard",
            mode: AccountMode::Delta,
            dedup: true,
            guard: false,
        },
        Variant {
            name: "delta + guard (+ dedup)",
            mode: AccountMode::Delta,
            dedup: true,
            guard: true,
        },
        Variant {
            name: "delta, no dedup, no guard",
            mode: AccountMode::Delta,
            dedup: false,
            guard: false,
        },
    ];
    let mut dbs = Vec::new();
    let mut runs = Vec::new();
    for v in &variants {
        let db = TestDb::create().await;
        let mut cfg = runtime::config(&unique_name("acct"), &[&topic], &db.url());
        cfg.defences = Defences {
            dedup: v.dedup,
            version_guard: v.guard,
            ..Defences::hardened()
        };
        runs.push(runtime::start(cfg, Accounts { mode: v.mode }));
        dbs.push(db);
    }
    for r in &runs {
        r.drain(&topic, Duration::from_secs(60)).await;
    }

    // A DLQ replay: version 1 of five accounts, dead-lettered long ago, redriven now.
    let replay_dlq = unique_name("acct_dlq");
    consumers::runtime::ensure_topic(&bootstrap(), &replay_dlq)
        .await
        .unwrap();
    let writer = DlqWriter::new(&bootstrap(), &replay_dlq, "account").unwrap();
    for events in history.iter().take(5) {
        let r = events[0].record(&topic);
        let record = Record {
            topic: topic.clone(),
            partition: 0,
            offset: 0,
            key: Some(r.key.to_vec()),
            payload: Some(r.value.to_vec()),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            timestamp_ms: None,
        };
        let failure = Failure {
            error: HandlerError::retryable("db", "the database was down"),
            attempts: 5,
            first_failure: SystemTime::now(),
            last_failure: SystemTime::now(),
        };
        writer.write(&record, &failure).await.unwrap();
    }
    let redriven = dlq::redrive(&bootstrap(), &replay_dlq, &Selection::default(), 100.0)
        .await
        .unwrap();
    assert_eq!(redriven.len(), 5);
    for r in &runs {
        r.drain(&topic, Duration::from_secs(60)).await;
    }

    let mut results = Vec::new();
    for (db, run) in dbs.iter().zip(&runs) {
        let got = balances(db).await;
        let converged = finals
            .iter()
            .filter(|(a, b)| got.get(*a) == Some(*b))
            .count();
        let m = &run.metrics;
        results.push(Result {
            converged,
            applied: m.processed.get(),
            guard_skips: m.guard_skips.get(),
            dedup_hits: m.dedup_hits.get(),
        });
    }
    let total = delivered.len() + 5;
    println!(
        "account balances: {ACCOUNTS} accounts x {EVENTS_PER_ACCOUNT} events, {total} deliveries ({duplicates} duplicates, 5 DLQ replays, reordered within keys)"
    );
    println!("| design | accounts converged | applied | guard skips | dedup hits |");
    println!("|---|---|---|---|---|");
    for (v, r) in variants.iter().zip(&results) {
        println!(
            "| {} | {}/{ACCOUNTS} | {} | {} | {} |",
            v.name, r.converged, r.applied, r.guard_skips, r.dedup_hits
        );
    }
    for r in &results {
        assert_eq!(
            r.applied + r.guard_skips + r.dedup_hits,
            total as u64,
            "every delivery counted once"
        );
    }
    assert_eq!(
        results[0].converged, ACCOUNTS,
        "guarded last-write-wins converges"
    );
    assert!(results[0].guard_skips > 0 && results[0].dedup_hits == (duplicates + 5) as u64);
    // Unguarded last-write-wins ends on whichever event was applied last: exactly the accounts
    // whose last first-delivery (duplicates are dedup hits) is their newest version converge.
    let mut seen = std::collections::HashSet::new();
    let mut last_applied: HashMap<String, i64> = HashMap::new();
    for e in &delivered {
        if seen.insert(e.event_id) {
            last_applied.insert(
                e.aggregate_id.clone(),
                e.payload["version"].as_i64().unwrap(),
            );
        }
    }
    let ends_on_newest = last_applied
        .values()
        .filter(|v| **v == EVENTS_PER_ACCOUNT)
        .count();
    assert!(ends_on_newest < ACCOUNTS);
    assert_eq!(
        results[1].converged, ends_on_newest,
        "unguarded last-write-wins ends on whichever event came last"
    );
    assert_eq!(
        results[2].converged, ACCOUNTS,
        "deltas commute; dedup absorbs duplicates"
    );
    assert!(
        results[3].converged < ACCOUNTS,
        "the guard drops reordered deltas"
    );
    assert!(
        results[4].converged < ACCOUNTS,
        "without dedup, duplicates apply twice"
    );
    for r in runs {
        r.stop().await;
    }
}
