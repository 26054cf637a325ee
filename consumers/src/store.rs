//! The runtime's own rows: the dedup record and the version guard, written in the effect's
//! transaction (tables `processed_events` and `consumer_versions`, see `migrations/`).

use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

/// Inserts the dedup row `(consumer, event_id)` as the transaction's first statement.
///
/// `Ok(false)` on a unique violation: the event was already applied (by this delivery's
/// predecessor, or by a concurrent one that committed first, for which Postgres made this insert
/// wait). The transaction is then aborted and must be rolled back.
pub async fn insert_dedup(
    tx: &Transaction<'_>,
    consumer: &str,
    event_id: uuid::Uuid,
) -> Result<bool, tokio_postgres::Error> {
    match tx
        .execute(
            "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)",
            &[&consumer, &event_id],
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The batch form of [`insert_dedup`]: `ON CONFLICT DO NOTHING`, so one duplicate does not abort
/// the batch's transaction. `Ok(false)` means a duplicate; the transaction stays usable.
pub async fn insert_dedup_in_batch(
    tx: &Transaction<'_>,
    consumer: &str,
    event_id: uuid::Uuid,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&consumer, &event_id],
        )
        .await?;
    Ok(n == 1)
}

/// Advances the entity's version to `version` if it is newer than the one applied; `Ok(false)`
/// when it is older or equal (the record must be skipped). The row lock taken by the upsert
/// serialises concurrent deliveries for one entity.
pub async fn advance_version(
    tx: &Transaction<'_>,
    consumer: &str,
    entity: &str,
    version: i64,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "INSERT INTO consumer_versions AS v (consumer, entity, version) VALUES ($1, $2, $3) \
             ON CONFLICT (consumer, entity) DO UPDATE \
                 SET version = EXCLUDED.version, updated_at = now() \
                 WHERE v.version < EXCLUDED.version",
            &[&consumer, &entity, &version],
        )
        .await?;
    Ok(n == 1)
}
