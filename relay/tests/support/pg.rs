//! Postgres side: an admin connection to the stack's cluster and a fresh, migrated database per test.

use super::{env_or, unique_name};
use tokio_postgres::{Client, NoTls};

pub fn host() -> String {
    env_or("STACK_PG_HOST", "127.0.0.1")
}

pub fn port() -> u16 {
    env_or("STACK_PG_PORT", "55432")
        .parse()
        .expect("STACK_PG_PORT is a port number")
}

pub fn superuser() -> String {
    env_or("STACK_PG_USER", "postgres")
}

/// The URL of database `db` on the stack's cluster, as the superuser (trust on loopback).
pub fn url(db: &str) -> String {
    format!("postgres://{}@{}:{}/{db}", superuser(), host(), port())
}

/// A plain (non-replication) connection to database `db`.
pub async fn connect(db: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(&url(db), NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to Postgres at {}: {e}. Is the stack up? Run: scripts/stack up",
                url(db)
            )
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test, with the project's migrations applied (outbox table,
/// `outbox_pub` publication, dedup table, orders). Dropped, with its replication slots, when the
/// value is dropped, including when the test panics.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let db = Self::create_empty().await;
        relay::migrate::run(&db.url())
            .await
            .expect("migrations apply to a fresh database");
        db
    }

    /// A fresh database without the migrations.
    pub async fn create_empty() -> TestDb {
        let name = unique_name("t");
        let admin = connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb { name }
    }

    pub fn url(&self) -> String {
        url(&self.name)
    }

    pub async fn client(&self) -> Client {
        connect(&self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee (maybe during a panic): use a thread with a
        // runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(rt) = rt else { return };
            rt.block_on(async move {
                let Ok((admin, conn)) = tokio_postgres::connect(&url("postgres"), NoTls).await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                // Slots pin a database; drop them first (terminating any walsender still on them).
                let _ = admin
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE database = '{name}' AND active_pid IS NOT NULL"
                    ))
                    .await;
                for _ in 0..50 {
                    let dropped = admin
                        .batch_execute(&format!(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                             WHERE database = '{name}'"
                        ))
                        .await;
                    if dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// A path from the environment, or the stack's default location under the main checkout (where
/// `scripts/stack up` puts it when `STACK_DIR` is not set).
fn stack_path(var: &str, default_below_stack_dir: &str) -> std::path::PathBuf {
    match std::env::var_os(var) {
        Some(path) => path.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.stack")
            .join(default_below_stack_dir),
    }
}

/// The directory of the cluster's Unix socket (`STACK_PG_SOCKET_DIR`).
pub fn socket_dir() -> std::path::PathBuf {
    stack_path("STACK_PG_SOCKET_DIR", "pg/run")
}

/// The server's self-signed TLS certificate (`STACK_PG_CERT`): CN=localhost, SAN localhost and
/// 127.0.0.1. Use it as the root certificate for `sslmode=verify-full`.
pub fn server_cert() -> std::path::PathBuf {
    stack_path("STACK_PG_CERT", "pg/data/server.crt")
}

/// Roles for password authentication over TCP (see `scripts/stack`): all have REPLICATION and
/// SUPERUSER; pg_hba.conf gives each its method.
pub const SCRAM_USER: (&str, &str) = ("relay_scram", "scram-secret");
pub const MD5_USER: (&str, &str) = ("relay_md5", "md5-secret");
pub const CLEARTEXT_USER: (&str, &str) = ("relay_clear", "clear-secret");
