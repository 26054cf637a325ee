//! Payment: charges each placed order through the gateway, then records the charge.
//!
//! The gateway call cannot join the database transaction, so it is made idempotent on its own:
//! the `Idempotency-Key` is derived from the order id, so every redelivery of the order (after
//! a crash, a timeout, a rebalance) asks for the same charge and gets the original back. With
//! keys off (the drill's naive mode) each delivery is a new charge.

use async_trait::async_trait;

use super::{OrderPlaced, ORDER_PLACED};
use crate::gateway::client::GatewayClient;
use crate::gateway::ChargeRequest;
use crate::handler::{Effect, Handler, HandlerError};
use crate::record::Record;

pub struct Payment {
    pub gateway: GatewayClient,
    /// Send `Idempotency-Key: order-<order id>` (the hardened setting).
    pub idempotency_keys: bool,
}

/// The idempotency key of an order's payment: stable across every delivery of the order.
pub fn idempotency_key(order_id: &str) -> String {
    format!("order-{order_id}")
}

#[async_trait]
impl Handler for Payment {
    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        if record.event_type() != ORDER_PLACED {
            return Ok(());
        }
        let order: OrderPlaced = record.json()?;
        let key = self
            .idempotency_keys
            .then(|| idempotency_key(&order.order_id));
        let charge = self
            .gateway
            .charge(
                &ChargeRequest {
                    order_id: order.order_id.clone(),
                    amount_cents: order.amount_cents,
                },
                key.as_deref(),
            )
            .await?;
        cx.external_call_done();
        cx.tx
            .execute(
                "INSERT INTO payments (order_id, charge_id, amount_cents, consumer) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &order.order_id,
                    &charge.charge_id,
                    &charge.amount_cents,
                    &cx.consumer,
                ],
            )
            .await?;
        Ok(())
    }
}
