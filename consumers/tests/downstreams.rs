//! The order pipeline's other downstreams, each its own consumer group on one order topic that
//! carries every order once plus redelivered duplicates: each effect happens once per order.

use std::collections::HashMap;
use std::time::Duration;

use consumers::downstream::{
    FraudAudit, Inventory, Loyalty, Notification, Recommendations, Warehouse,
};

use crate::support::kafka::create_topic;
use crate::support::pg::TestDb;
use crate::support::{orders, produce, runtime, unique_name};

const ORDERS: usize = 200;
const DUPLICATES: usize = 40;
const STOCK_PER_SKU: i64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_downstream_applies_each_order_once_under_redelivery() {
    let db = TestDb::create().await;
    let c = db.client().await;
    for s in 0..5 {
        c.execute(
            "INSERT INTO inventory_stock (sku, quantity) VALUES ($1, $2)",
            &[&format!("sku-{s}"), &STOCK_PER_SKU],
        )
        .await
        .unwrap();
    }
    let topic = unique_name("orders");
    create_topic(&topic, 4).await;
    let orders = orders::orders(ORDERS);
    let mut events: Vec<_> = orders.iter().map(orders::event).collect();
    // Redeliveries: the first 40 events again, same event ids, after the rest.
    events.extend(events[..DUPLICATES].to_vec());
    produce::send(&topic, &events).await;

    let start = |name: &str| runtime::config(&unique_name(name), &[&topic], &db.url());
    let mut warehouse = start("warehouse");
    warehouse.batch_max_records = 500;
    warehouse.batch_window = Duration::from_millis(200);
    let runs = vec![
        ("inventory", runtime::start(start("inventory"), Inventory)),
        (
            "notification",
            runtime::start(start("notification"), Notification),
        ),
        ("loyalty", runtime::start(start("loyalty"), Loyalty)),
        (
            "recommendations",
            runtime::start(start("recommendations"), Recommendations),
        ),
        ("warehouse", runtime::start(warehouse, Warehouse)),
        (
            "fraud-audit",
            runtime::start(
                start("fraud"),
                FraudAudit {
                    flag_above_cents: 15_000,
                },
            ),
        ),
    ];
    for (_, r) in &runs {
        r.drain(&topic, Duration::from_secs(90)).await;
    }
    println!("downstreams: {ORDERS} orders + {DUPLICATES} redelivered duplicates");
    println!("| consumer | applied | dedup hits |");
    println!("|---|---|---|");
    for (name, r) in &runs {
        println!(
            "| {name} | {} | {} |",
            r.metrics.processed.get(),
            r.metrics.dedup_hits.get()
        );
        assert_eq!(
            r.metrics.processed.get(),
            ORDERS as u64,
            "{name}: each order once"
        );
        assert_eq!(
            r.metrics.dedup_hits.get(),
            DUPLICATES as u64,
            "{name}: each duplicate caught"
        );
    }

    let n = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // Inventory: never negative, never twice; what left the shelf is what was reserved.
    let items: usize = orders.iter().map(|o| o.items.len()).sum();
    assert_eq!(
        n("SELECT count(*) FROM inventory_reservations").await,
        items as i64
    );
    for s in 0..5 {
        let sku = format!("sku-{s}");
        let row = c
            .query_one(
                "SELECT (SELECT quantity FROM inventory_stock WHERE sku = $1), \
                        (SELECT coalesce(sum(quantity), 0)::bigint FROM inventory_reservations \
                         WHERE sku = $1 AND status = 'reserved')",
                &[&sku],
            )
            .await
            .unwrap();
        let (left, reserved): (i64, i64) = (row.get(0), row.get(1));
        assert!(left >= 0, "{sku}: stock never negative");
        assert_eq!(
            STOCK_PER_SKU - left,
            reserved,
            "{sku}: decremented exactly what was reserved"
        );
    }
    let rejected = n("SELECT count(*) FROM inventory_reservations WHERE status = 'rejected'").await;
    assert!(
        rejected > 0,
        "demand exceeded stock, and the excess was rejected, not applied"
    );

    assert_eq!(n("SELECT count(*) FROM notifications").await, ORDERS as i64);

    let mut points: HashMap<String, i64> = HashMap::new();
    let mut signals: HashMap<(String, String), i64> = HashMap::new();
    for o in &orders {
        *points.entry(o.customer_id.clone()).or_default() += o.amount_cents / 100;
        for i in &o.items {
            *signals
                .entry((o.customer_id.clone(), i.sku.clone()))
                .or_default() += i.quantity;
        }
    }
    for r in c
        .query("SELECT customer_id, points FROM loyalty_points", &[])
        .await
        .unwrap()
    {
        assert_eq!(points.get(r.get::<_, &str>(0)), Some(&r.get::<_, i64>(1)));
    }
    assert_eq!(
        n("SELECT count(*) FROM loyalty_points").await,
        points.len() as i64
    );
    for r in c
        .query(
            "SELECT customer_id, sku, weight FROM recommendation_signals",
            &[],
        )
        .await
        .unwrap()
    {
        let k = (r.get::<_, String>(0), r.get::<_, String>(1));
        assert_eq!(signals.get(&k), Some(&r.get::<_, i64>(2)));
    }
    assert_eq!(
        n("SELECT count(*) FROM recommendation_signals").await,
        signals.len() as i64
    );

    assert_eq!(
        n("SELECT count(*) FROM warehouse_picks").await,
        ORDERS as i64
    );
    let batches = n("SELECT count(DISTINCT batch_id) FROM warehouse_picks").await;
    assert!(
        batches < ORDERS as i64 / 4,
        "warehouse writes in batches ({batches} for {ORDERS})"
    );

    assert_eq!(
        n("SELECT count(DISTINCT event_id) FROM fraud_audit_log").await,
        ORDERS as i64
    );
    assert_eq!(
        n("SELECT count(*) FROM fraud_audit_log").await,
        ORDERS as i64
    );
    let flagged = n("SELECT count(*) FROM fraud_audit_log WHERE flagged").await;
    let want = orders.iter().filter(|o| o.amount_cents > 15_000).count() as i64;
    assert_eq!(flagged, want);
    let rewrite = c
        .execute("UPDATE fraud_audit_log SET flagged = false", &[])
        .await;
    assert!(rewrite.is_err(), "the audit log is append-only");
    let delete = c.execute("DELETE FROM fraud_audit_log", &[]).await;
    assert!(delete.is_err(), "the audit log is append-only");
    println!(
        "inventory: {rejected} item reservations rejected for lack of stock, none negative; warehouse: {ORDERS} picks in {batches} batches"
    );
    for (_, r) in runs {
        r.stop().await;
    }
}
