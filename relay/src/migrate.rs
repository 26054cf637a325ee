//! Schema migrations (`migrations/` at the repository root), applied in order.
//!
//! The migrations are embedded in the binary by sqlx's `migrate!` macro, so `relay migrate` needs
//! no files on disk, and they are recorded in sqlx's table `_sqlx_migrations` with sqlx's
//! checksums, so the sqlx CLI and this command agree on what was applied. They are applied over
//! the relay's own SQL connection ([`crate::replication::conn::connect_sql`]), not sqlx's: one
//! Postgres configuration (URL parser, `sslmode`, `sslrootcert`) serves every connection the
//! relay opens. Running it again is a no-op.
//!
//! As sqlx does: a session advisory lock (sqlx's key for the database) keeps two runs from
//! interleaving; each migration runs in its own transaction together with its bookkeeping row;
//! a migration recorded as failed ("dirty"), an applied migration whose file has changed, or one
//! recorded but no longer embedded stops the run before anything is applied.

use std::time::Instant;

use sqlx::migrate::Migrator;

use crate::replication::conn::{connect_sql, ReplicationConfig, ReplicationError};

/// The project's migrations, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Why migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The URL is malformed, or connecting failed.
    #[error("connecting to Postgres: {0}")]
    Connect(#[from] ReplicationError),
    /// A statement of the bookkeeping (not of a migration) failed.
    #[error("Postgres: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// A migration failed; its transaction rolled back.
    #[error("migration {version} ({description}) failed: {source}")]
    Migration {
        version: i64,
        description: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// `_sqlx_migrations` records a migration as failed (a `no_tx` migration that broke half
    /// way): an operator must repair the schema and the row.
    #[error("migration {0} is recorded as failed (dirty); repair it by hand, then delete or fix its row in _sqlx_migrations")]
    Dirty(i64),
    /// An applied migration's file differs from what was applied.
    #[error("migration {0} was applied but its file has changed since (checksum differs)")]
    Changed(i64),
    /// A migration recorded as applied is not among the embedded ones (an older binary?).
    #[error("migration {0} was applied but is unknown to this binary")]
    Unknown(i64),
}

/// Applies every migration not yet applied to the database at `database_url` (a libpq-style
/// URL, parsed and connected to like the relay's own `postgres.url`). Returns how many were
/// applied by this call.
pub async fn run(database_url: &str) -> Result<usize, MigrateError> {
    run_with(&ReplicationConfig::from_url(database_url)?).await
}

/// Applies every migration not yet applied, connecting as `cfg` says. Returns how many were
/// applied by this call.
pub async fn run_with(cfg: &ReplicationConfig) -> Result<usize, MigrateError> {
    let mut client = connect_sql(cfg).await?;
    let lock_id: i64 = {
        let row = client.query_one("SELECT current_database()", &[]).await?;
        lock_key(row.get::<_, &str>(0))
    };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock_id])
        .await?;
    let applied = apply_pending(&mut client).await;
    // The lock ends with the session anyway; unlocking is the polite way for a pooled one.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock_id])
        .await;
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<usize, MigrateError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
                version BIGINT PRIMARY KEY,
                description TEXT NOT NULL,
                installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
                success BOOLEAN NOT NULL,
                checksum BYTEA NOT NULL,
                execution_time BIGINT NOT NULL
            )",
        )
        .await?;
    if let Some(row) = client
        .query_opt(
            "SELECT version FROM _sqlx_migrations WHERE success = false ORDER BY version LIMIT 1",
            &[],
        )
        .await?
    {
        return Err(MigrateError::Dirty(row.get(0)));
    }
    let applied: Vec<(i64, Vec<u8>)> = client
        .query(
            "SELECT version, checksum FROM _sqlx_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (version, checksum) in &applied {
        match MIGRATOR.iter().find(|m| m.version == *version) {
            None => return Err(MigrateError::Unknown(*version)),
            Some(m) if m.checksum.as_ref() != checksum.as_slice() => {
                return Err(MigrateError::Changed(*version))
            }
            Some(_) => {}
        }
    }

    let mut count = 0;
    for m in MIGRATOR.iter() {
        if m.migration_type.is_down_migration() || applied.iter().any(|(v, _)| *v == m.version) {
            continue;
        }
        let start = Instant::now();
        let failed = |source| MigrateError::Migration {
            version: m.version,
            description: m.description.to_string(),
            source,
        };
        let record = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                      execution_time) VALUES ($1, $2, TRUE, $3, -1)";
        let checksum: &[u8] = &m.checksum;
        if m.no_tx {
            client.batch_execute(&m.sql).await.map_err(failed)?;
            client
                .execute(record, &[&m.version, &&*m.description, &checksum])
                .await?;
        } else {
            let tx = client.transaction().await?;
            tx.batch_execute(&m.sql).await.map_err(failed)?;
            tx.execute(record, &[&m.version, &&*m.description, &checksum])
                .await?;
            tx.commit().await?;
        }
        let nanos = i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX);
        client
            .execute(
                "UPDATE _sqlx_migrations SET execution_time = $1 WHERE version = $2",
                &[&nanos, &m.version],
            )
            .await?;
        tracing::info!(version = m.version, description = %m.description, "applied migration");
        count += 1;
    }
    Ok(count)
}

/// sqlx's advisory lock key for a database: `0x3d32ad9e * crc32(name)`, so this command and the
/// sqlx CLI exclude each other.
fn lock_key(database: &str) -> i64 {
    0x3d32_ad9e * i64::from(crc32(database.as_bytes()))
}

/// CRC-32 (IEEE 802.3, as zlib computes it), bit by bit: a few bytes, once per run.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_and_lock_key_match_sqlx() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(lock_key("123456789"), 0x3d32_ad9e * 0xcbf4_3926_i64);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn the_migrations_are_embedded_in_order() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert!(!versions.is_empty());
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    }
}
