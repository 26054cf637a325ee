//! The payment crash drill: 1,000 orders, the payment consumer killed at random fault points
//! (before the charge, after the charge before the DB commit, after the DB commit before the
//! offset commit) and the gateway timing out after charging, run naive and hardened under the
//! same chaos. Counted from the gateway's ledger and request log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumers::downstream::OrderPlaced;
use consumers::gateway::{Charge, GatewayFaults, RequestLogEntry};

use crate::support::gateway::Gateway;
use crate::support::kafka::{bootstrap, create_topic};
use crate::support::pg::TestDb;
use crate::support::procs::{self, Proc};
use crate::support::{offsets, orders, produce, unique_name};

const ORDERS: usize = 1000;
/// Per record, the probability of an abort at each fault point.
const FAULTS: &str = "before_effect=0.004,after_external_call=0.008,after_db_commit=0.008";

#[derive(Debug, Default)]
struct Outcome {
    crashes: [usize; 3],
    requests: usize,
    replayed_requests: usize,
    injected_timeouts: usize,
    injected_failures: usize,
    charges: usize,
    charged_once: usize,
    double_charged: usize,
    extra_charges: usize,
    lost: usize,
    payment_rows: i64,
    seconds: f64,
}

async fn run_drill(naive: bool, topic: &str, orders: &[OrderPlaced]) -> Outcome {
    let started = Instant::now();
    let db = TestDb::create().await;
    // The same chaos for both: 2% of requests time out after charging, 2% fail before.
    let gw = Gateway::start(
        &db.url(),
        GatewayFaults {
            latency_ms: (0, 2),
            fail_rate: 0.02,
            timeout_rate: 0.02,
            timeout_delay: Duration::from_millis(400),
        },
    )
    .await;
    let group = unique_name(if naive { "pay_naive" } else { "pay_hardened" });
    let dir = std::env::temp_dir().join(&group);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("consumer.log");
    let mut args: Vec<String> = [
        "run",
        "payment",
        "--bootstrap",
        &bootstrap(),
        "--database-url",
        &db.url(),
        "--topics",
        topic,
        "--group",
        &group,
        "--instance-id",
        &format!("{group}-0"),
        "--gateway-url",
        &gw.url(),
        "--gateway-timeout-ms",
        "150",
        "--max-attempts",
        "10",
        "--initial-backoff-ms",
        "10",
        "--max-backoff-ms",
        "100",
        "--commit-interval-ms",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if naive {
        args.push("--naive".into());
    }
    let env = [("CONSUMER_FAULTS", FAULTS.to_owned())];
    let mut proc = Proc::spawn(&args, &env, &log);
    let gclient = gw.client();
    let deadline = Instant::now() + Duration::from_secs(150);
    // Done when the group has committed the whole topic and the gateway has been quiet for a
    // second (the naive consumer commits what it polled, so its offsets can run ahead of its
    // work).
    let mut last_requests = (usize::MAX, Instant::now());
    loop {
        assert!(
            Instant::now() < deadline,
            "the drill did not finish in 150 s"
        );
        if proc.exited().is_some() {
            proc = Proc::spawn(&args, &env, &log);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if offsets::lag(&group, topic).await != 0 {
            continue;
        }
        let s = gclient.summary().await.unwrap();
        let n = usize::try_from(s.requests).unwrap();
        if n != last_requests.0 {
            last_requests = (n, Instant::now());
        } else if last_requests.1.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    assert!(proc.stop().success() || naive, "graceful stop");

    let ledger: Vec<Charge> = gclient.get_json("/charges").await.unwrap();
    let log_entries: Vec<RequestLogEntry> = gclient.get_json("/requests").await.unwrap();
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for c in &ledger {
        *per_order.entry(c.order_id.as_str()).or_default() += 1;
    }
    let count = |pred: &dyn Fn(usize) -> bool| {
        orders
            .iter()
            .filter(|o| pred(per_order.get(o.order_id.as_str()).copied().unwrap_or(0)))
            .count()
    };
    let payment_rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    Outcome {
        crashes: procs::faults_fired(&log),
        requests: log_entries.len(),
        replayed_requests: log_entries
            .iter()
            .filter(|e| e.outcome == "replayed")
            .count(),
        injected_timeouts: log_entries.iter().filter(|e| e.injected_timeout).count(),
        injected_failures: log_entries
            .iter()
            .filter(|e| e.outcome == "injected_failure")
            .count(),
        charges: ledger.len(),
        charged_once: count(&|n| n == 1),
        double_charged: count(&|n| n > 1),
        extra_charges: orders
            .iter()
            .map(|o| {
                per_order
                    .get(o.order_id.as_str())
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(1)
            })
            .sum(),
        lost: count(&|n| n == 0),
        payment_rows,
        seconds: started.elapsed().as_secs_f64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_crash_drill_naive_vs_hardened() {
    let topic = unique_name("orders");
    create_topic(&topic, 4).await;
    let orders = orders::orders(ORDERS);
    produce::send(
        &topic,
        &orders.iter().map(orders::event).collect::<Vec<_>>(),
    )
    .await;

    // Both consumers read the same topic (each its own group, database and gateway).
    let (naive, hardened) = tokio::join!(
        run_drill(true, &topic, &orders),
        run_drill(false, &topic, &orders)
    );
    println!("payment crash drill, {ORDERS} orders, faults {FAULTS}, gateway 2% timeouts after charging + 2% 503s");
    println!("| | naive | hardened |");
    println!("|---|---|---|");
    let row = |name: &str, a: String, b: String| println!("| {name} | {a} | {b} |");
    row(
        "crashes (before effect / after charge / after DB commit)",
        format!("{:?}", naive.crashes),
        format!("{:?}", hardened.crashes),
    );
    for (name, a, b) in [
        ("gateway requests", naive.requests, hardened.requests),
        (
            "  answered from the original charge (same key)",
            naive.replayed_requests,
            hardened.replayed_requests,
        ),
        (
            "  injected timeouts (charged, answered late)",
            naive.injected_timeouts,
            hardened.injected_timeouts,
        ),
        (
            "  injected 503s (not charged)",
            naive.injected_failures,
            hardened.injected_failures,
        ),
        ("charges in the ledger", naive.charges, hardened.charges),
        (
            "orders charged exactly once",
            naive.charged_once,
            hardened.charged_once,
        ),
        (
            "orders charged more than once",
            naive.double_charged,
            hardened.double_charged,
        ),
        ("extra charges", naive.extra_charges, hardened.extra_charges),
        ("orders never charged (lost)", naive.lost, hardened.lost),
    ] {
        row(name, a.to_string(), b.to_string());
    }
    row(
        "rows in payments",
        naive.payment_rows.to_string(),
        hardened.payment_rows.to_string(),
    );
    row(
        "wall time (s)",
        format!("{:.1}", naive.seconds),
        format!("{:.1}", hardened.seconds),
    );

    // Hardened: exactly one charge per order, none lost, whatever the crashes; the log shows the
    // repeated requests that the key turned into the original charge.
    assert!(
        hardened.crashes.iter().sum::<usize>() > 0,
        "the drill crashed the consumer"
    );
    assert_eq!(hardened.charged_once, ORDERS);
    assert_eq!((hardened.double_charged, hardened.lost), (0, 0));
    assert_eq!(hardened.charges, ORDERS);
    assert_eq!(
        hardened.payment_rows, ORDERS as i64,
        "one payment row per order (dedup)"
    );
    assert!(
        hardened.replayed_requests > 0,
        "repeats were answered from the original charge"
    );
    // Naive: the same chaos charges orders twice.
    assert!(naive.crashes.iter().sum::<usize>() > 0);
    assert!(
        naive.double_charged > 0,
        "naive mode double-charges under this chaos"
    );
}
