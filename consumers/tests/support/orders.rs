//! Order events as the demo service writes them (`OrderPlaced`, aggregate `order`).

use super::produce::TestEvent;
use consumers::downstream::{OrderItem, OrderPlaced};

/// `n` orders of customers `c-0..c-9`, with 1-2 items of SKUs `sku-0..sku-4`.
pub fn orders(n: usize) -> Vec<OrderPlaced> {
    (0..n)
        .map(|i| {
            let mut items = vec![OrderItem {
                sku: format!("sku-{}", i % 5),
                quantity: 1 + (i % 3) as i64,
            }];
            if i % 4 == 0 {
                items.push(OrderItem {
                    sku: format!("sku-{}", (i + 2) % 5),
                    quantity: 1,
                });
            }
            OrderPlaced {
                order_id: uuid::Uuid::new_v4().to_string(),
                customer_id: format!("c-{}", i % 10),
                amount_cents: 500 + (i as i64 * 37) % 20_000,
                items,
            }
        })
        .collect()
}

pub fn event(o: &OrderPlaced) -> TestEvent {
    TestEvent::new(
        "order",
        &o.order_id,
        "OrderPlaced",
        serde_json::to_value(o).expect("order serialises"),
    )
}
