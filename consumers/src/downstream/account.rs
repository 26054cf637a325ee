//! Account balance: credit and debit events with a per-account version.
//!
//! Each event carries its delta (`amount_cents`, signed by `kind`) and the balance after it
//! (`balance_after_cents`), and the account's version. Two ways to apply them, which tolerate
//! different disorders (the account test shows both):
//!
//! | mode | applies | duplicates | reordering within an account |
//! |---|---|---|---|
//! | `LastWriteWins` + version guard | set balance = balance_after if newer | skipped (guard) | older ones skipped: converges |
//! | `LastWriteWins`, no guard | set balance = balance_after | harmless | the last to arrive wins: wrong |
//! | `Delta`, dedup, no guard | balance += delta | skipped (dedup) | commutative: converges |
//! | `Delta` + version guard | balance += delta if newer | skipped | older deltas are lost: wrong |

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::handler::{Effect, EntityVersion, Handler, HandlerError};
use crate::record::Record;

/// The payload of an account event (aggregate `account`, key = account id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountEvent {
    pub account_id: String,
    pub version: i64,
    /// `credit` or `debit`.
    pub kind: String,
    pub amount_cents: i64,
    pub balance_after_cents: i64,
}

impl AccountEvent {
    pub fn delta(&self) -> Result<i64, HandlerError> {
        match self.kind.as_str() {
            "credit" => Ok(self.amount_cents),
            "debit" => Ok(-self.amount_cents),
            _ => Err(HandlerError::permanent(
                "bad_payload",
                "kind is neither credit nor debit",
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccountMode {
    /// Set the balance to the event's `balance_after_cents`.
    LastWriteWins,
    /// Add the event's delta.
    Delta,
}

pub struct Accounts {
    pub mode: AccountMode,
}

#[async_trait]
impl Handler for Accounts {
    fn version(&self, record: &Record) -> Result<Option<EntityVersion>, HandlerError> {
        let e: AccountEvent = record.json()?;
        Ok(Some(EntityVersion {
            entity: e.account_id,
            version: e.version,
        }))
    }

    async fn apply(&self, cx: &Effect<'_>, record: &Record) -> Result<(), HandlerError> {
        let e: AccountEvent = record.json()?;
        let delta = e.delta()?;
        match self.mode {
            AccountMode::LastWriteWins => {
                cx.tx
                    .execute(
                        "INSERT INTO account_balances (account_id, balance_cents, applied_events) \
                         VALUES ($1, $2, 1) ON CONFLICT (account_id) DO UPDATE \
                         SET balance_cents = EXCLUDED.balance_cents, \
                             applied_events = account_balances.applied_events + 1, \
                             updated_at = now()",
                        &[&e.account_id, &e.balance_after_cents],
                    )
                    .await?
            }
            AccountMode::Delta => {
                cx.tx
                    .execute(
                        "INSERT INTO account_balances (account_id, balance_cents, applied_events) \
                         VALUES ($1, $2, 1) ON CONFLICT (account_id) DO UPDATE \
                         SET balance_cents = account_balances.balance_cents + EXCLUDED.balance_cents, \
                             applied_events = account_balances.applied_events + 1, \
                             updated_at = now()",
                        &[&e.account_id, &delta],
                    )
                    .await?
            }
        };
        Ok(())
    }
}
