//! A consumer killed after its database commit but before its offset commit gets the record
//! again; the dedup row turns the redelivery into a rollback, counted by the dedup-hit metric.

use std::time::Duration;

use crate::support::kafka::{bootstrap, create_topic};
use crate::support::pg::TestDb;
use crate::support::procs::{self, Proc};
use crate::support::{offsets, orders, produce, unique_name, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_db_commit_and_offset_commit_is_absorbed_by_the_dedup_row() {
    let db = TestDb::create().await;
    let topic = unique_name("orders");
    create_topic(&topic, 1).await;
    let orders = orders::orders(20);
    produce::send(
        &topic,
        &orders.iter().map(orders::event).collect::<Vec<_>>(),
    )
    .await;
    let group = unique_name("loyalty");
    let dir = std::env::temp_dir().join(unique_name("dedup"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("consumer.log");
    let port = crate::support::free_port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let args: Vec<String> = [
        "run",
        "loyalty",
        "--bootstrap",
        &bootstrap(),
        "--database-url",
        &db.url(),
        "--topics",
        &topic,
        "--group",
        &group,
        "--instance-id",
        &format!("{group}-0"),
        "--metrics-listen",
        &metrics_addr.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // First life: the fault point after the DB commit fires on the first record.
    let mut first = Proc::spawn(
        &args,
        &[("CONSUMER_FAULTS", "after_db_commit=1".to_owned())],
        &log,
    );
    let status = wait_for("the first consumer aborts", Duration::from_secs(60), || {
        let s = first.exited();
        async move { s }
    })
    .await;
    assert!(!status.success(), "the process aborted: {status:?}");
    assert_eq!(procs::faults_fired(&log), [0, 0, 1]);
    let client = db.client().await;
    let count = |sql: &'static str| {
        let c = &client;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM processed_events").await,
        1,
        "the first record's effect committed"
    );
    assert_eq!(offsets::lag(&group, &topic).await, 20, "but no offset did");

    // Second life, no faults: the first record comes again and is recognised.
    let second = Proc::spawn(&args, &[], &log);
    wait_for("the group drains", Duration::from_secs(60), || {
        let (g, t) = (group.clone(), topic.clone());
        async move { (offsets::lag(&g, &t).await == 0).then_some(()) }
    })
    .await;
    let hits = procs::scrape(metrics_addr, "consumer_dedup_hits_total")
        .await
        .expect("dedup hits exported");
    let processed = procs::scrape(metrics_addr, "consumer_processed_total")
        .await
        .expect("processed exported");
    assert_eq!(hits, 1.0, "the redelivered record was a dedup hit");
    assert_eq!(
        processed, 19.0,
        "the other 19 took effect in the second life"
    );
    assert_eq!(count("SELECT count(*) FROM processed_events").await, 20);
    // Points: each order counted once (one point per 100 cents), whatever the crash.
    let want: i64 = orders.iter().map(|o| o.amount_cents / 100).sum();
    assert_eq!(
        count("SELECT coalesce(sum(points), 0)::bigint FROM loyalty_points").await,
        want
    );
    assert!(second.stop().success(), "graceful stop");
    println!("dedup: 1 crash after the DB commit, 1 redelivery, dedup hits 1, points exact");
}
