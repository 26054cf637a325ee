//! Schema migrations (`migrations/` at the repository root), applied in order with sqlx.
//!
//! The migrations are embedded in the binary, so `relay migrate` needs no files on disk.
//! sqlx records what it applied in `_sqlx_migrations`; running it again is a no-op.

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

/// The project's migrations, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Applies every migration not yet applied to the database at `database_url`.
/// Returns how many were applied by this call.
pub async fn run(database_url: &str) -> Result<usize, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let before = applied(&pool).await.unwrap_or(0);
    MIGRATOR.run(&pool).await?;
    let after = applied(&pool).await?;
    pool.close().await;
    Ok(after.saturating_sub(before))
}

async fn applied(pool: &sqlx::PgPool) -> Result<usize, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await?;
    Ok(usize::try_from(n).unwrap_or(0))
}
