//! The downstreams of the order pipeline, each its own consumer group on the order topic, and
//! the account-balance consumer on the account topic.
//!
//! Each handler is only its effect; dedup, the version guard, retries, the DLQ and offsets are
//! the runtime's. Where an effect can also be made idempotent on its own (inventory's
//! reservation row, notification's one row per order), it is, as a second line of defence.

pub mod account;
pub mod orders;
pub mod payment;

use serde::{Deserialize, Serialize};

pub use account::{AccountEvent, AccountMode, Accounts};
pub use orders::{FraudAudit, Inventory, Loyalty, Notification, Recommendations, Warehouse};
pub use payment::Payment;

/// The event type the order downstreams act on; other order events are recorded as processed
/// and otherwise ignored.
pub const ORDER_PLACED: &str = "OrderPlaced";

/// The payload of an `OrderPlaced` event (aggregate `order`, key = order id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    #[serde(default)]
    pub items: Vec<OrderItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub sku: String,
    pub quantity: i64,
}

/// The downstreams the binary can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Downstream {
    Payment,
    Inventory,
    Notification,
    Loyalty,
    Recommendations,
    Warehouse,
    FraudAudit,
    Account,
}

impl Downstream {
    /// The default consumer group (and dedup namespace).
    pub fn name(self) -> &'static str {
        match self {
            Downstream::Payment => "payment",
            Downstream::Inventory => "inventory",
            Downstream::Notification => "notification",
            Downstream::Loyalty => "loyalty",
            Downstream::Recommendations => "recommendations",
            Downstream::Warehouse => "warehouse",
            Downstream::FraudAudit => "fraud-audit",
            Downstream::Account => "account",
        }
    }

    /// The default topic (the relay's default template applied to the aggregate type).
    pub fn default_topic(self) -> &'static str {
        match self {
            Downstream::Account => "outbox.event.account",
            _ => "outbox.event.order",
        }
    }
}
