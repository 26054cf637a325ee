//! The order pipeline's other downstreams: inventory, notification, loyalty, recommendations,
//! warehouse (batched) and the fraud audit log.

use async_trait::async_trait;

use super::{OrderPlaced, ORDER_PLACED};
use crate::handler::{Effect, Handler, HandlerError};
use crate::record::Record;

/// The order, or `None` for event types the downstreams ignore.
fn placed(record: &Record) -> Result<Option<OrderPlaced>, HandlerError> {
    if record.event_type() != ORDER_PLACED {
        return Ok(None);
    }
    record.json().map(Some)
}

/// Inventory: decrements stock per item, never below zero, never twice for one order.
///
/// The reservation row is inserted first (primary key order id + SKU): if it exists, the order
/// was already handled and nothing is decremented. The decrement is conditional on enough
/// stock; without it the reservation stays `rejected`. The table's CHECK is a last guard.
pub struct Inventory;

#[async_trait]
impl Handler for Inventory {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let Some(order) = placed(record)? else {
            return Ok(());
        };
        for item in &order.items {
            if item.quantity <= 0 {
                return Err(HandlerError::permanent(
                    "bad_payload",
                    "an item quantity is not positive",
                ));
            }
            let new = cx
                .tx
                .execute(
                    "INSERT INTO inventory_reservations (order_id, sku, quantity, status) \
                     VALUES ($1, $2, $3, 'rejected') ON CONFLICT DO NOTHING",
                    &[&order.order_id, &item.sku, &item.quantity],
                )
                .await?;
            if new == 0 {
                continue;
            }
            let taken = cx
                .tx
                .execute(
                    "UPDATE inventory_stock SET quantity = quantity - $2 \
                     WHERE sku = $1 AND quantity >= $2",
                    &[&item.sku, &item.quantity],
                )
                .await?;
            if taken == 1 {
                cx.tx
                    .execute(
                        "UPDATE inventory_reservations SET status = 'reserved' \
                         WHERE order_id = $1 AND sku = $2",
                        &[&order.order_id, &item.sku],
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// Notification: one message per order, recorded in the `notifications` outbox (its primary key
/// is the order id) for a sender to deliver.
pub struct Notification;

#[async_trait]
impl Handler for Notification {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let Some(order) = placed(record)? else {
            return Ok(());
        };
        cx.tx
            .execute(
                "INSERT INTO notifications (order_id, customer_id, template) \
                 VALUES ($1, $2, 'order_confirmation') ON CONFLICT DO NOTHING",
                &[&order.order_id, &order.customer_id],
            )
            .await?;
        Ok(())
    }
}

/// Loyalty: one point per whole currency unit ordered. Additive: only the dedup row stands
/// between a redelivery and double points.
pub struct Loyalty;

#[async_trait]
impl Handler for Loyalty {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let Some(order) = placed(record)? else {
            return Ok(());
        };
        let points = order.amount_cents / 100;
        cx.tx
            .execute(
                "INSERT INTO loyalty_points (customer_id, points) VALUES ($1, $2) \
                 ON CONFLICT (customer_id) DO UPDATE \
                 SET points = loyalty_points.points + EXCLUDED.points, updated_at = now()",
                &[&order.customer_id, &points],
            )
            .await?;
        Ok(())
    }
}

/// Recommendations: how often each customer ordered each SKU.
pub struct Recommendations;

#[async_trait]
impl Handler for Recommendations {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let Some(order) = placed(record)? else {
            return Ok(());
        };
        for item in &order.items {
            cx.tx
                .execute(
                    "INSERT INTO recommendation_signals (customer_id, sku, weight) \
                     VALUES ($1, $2, $3) ON CONFLICT (customer_id, sku) DO UPDATE \
                     SET weight = recommendation_signals.weight + EXCLUDED.weight",
                    &[&order.customer_id, &item.sku, &item.quantity],
                )
                .await?;
        }
        Ok(())
    }
}

/// Warehouse: a pick request per order, written in batches (run it with
/// `batch_max_records` > 1 and `batch_window` of about 200 ms: one transaction per batch).
pub struct Warehouse;

#[async_trait]
impl Handler for Warehouse {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let Some(order) = placed(record)? else {
            return Ok(());
        };
        cx.tx
            .execute(
                "INSERT INTO warehouse_picks (order_id, batch_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&order.order_id, &cx.batch_id],
            )
            .await?;
        Ok(())
    }
}

/// Fraud audit: every order event, appended to `fraud_audit_log` (the table refuses UPDATE and
/// DELETE). Orders above the threshold are flagged.
pub struct FraudAudit {
    pub flag_above_cents: i64,
}

#[async_trait]
impl Handler for FraudAudit {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let event_id = record.event_id()?;
        let order_id = record
            .key_str()
            .ok_or_else(|| HandlerError::permanent("bad_key", "the key is not UTF-8"))?;
        let amount = placed(record)?.map(|o| o.amount_cents);
        let flagged = amount.is_some_and(|a| a > self.flag_above_cents);
        cx.tx
            .execute(
                "INSERT INTO fraud_audit_log (event_id, order_id, event_type, amount_cents, flagged) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&event_id, &order_id, &record.event_type(), &amount, &flagged],
            )
            .await?;
        Ok(())
    }
}
