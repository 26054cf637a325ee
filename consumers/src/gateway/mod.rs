//! The fake payment gateway: an HTTP process that charges orders, honours `Idempotency-Key`,
//! and keeps the evidence (every request, and the ledger of charges) in Postgres.
//!
//! ```text
//!  POST /charges ──▶ request logged ──▶ [injected failure? 503, nothing charged]
//!   Idempotency-Key: k     │
//!                          ▼
//!        INSERT charge ON CONFLICT (idempotency_key) DO NOTHING
//!            new ──▶ 201 {charge}            exists ──▶ 200 {original charge}, replayed
//!                          │
//!        [injected timeout? the charge is made, then the answer comes too late]
//!
//!  GET /charges (ledger)   GET /requests (log)   GET /summary (counts)   GET /healthz
//! ```
//!
//! The request log records every request, repeats included, with its outcome, so the drills
//! count from the gateway's point of view: how many charges each order got, and how many
//! requests were answered from an existing charge. An injected timeout charges first and then
//! holds the answer back: that is the dangerous case, where the caller cannot know the charge
//! happened, and only the idempotency key keeps its retry from charging twice.

pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use relay::shutdown::Shutdown;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

/// The gateway's own schema, apart from the project's tables: it stands for a third party.
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS payment_gateway;
-- The ledger: one row per charge made. A key, when given, is unique: a repeat finds the original.
CREATE TABLE IF NOT EXISTS payment_gateway.charges (
    charge_id       text        PRIMARY KEY,
    idempotency_key text        UNIQUE,
    order_id        text        NOT NULL,
    amount_cents    bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- The request log: every POST /charges, repeats included.
--   outcome  charged | replayed | injected_failure | conflict | bad_request
CREATE TABLE IF NOT EXISTS payment_gateway.requests (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    order_id        text,
    amount_cents    bigint,
    outcome         text        NOT NULL,
    charge_id       text,
    injected_timeout boolean    NOT NULL DEFAULT false
);
";

/// Injected misbehaviour.
#[derive(Debug, Clone, Default)]
pub struct GatewayFaults {
    /// Extra latency before every request is handled, uniform in this range (milliseconds).
    pub latency_ms: (u64, u64),
    /// Probability of answering 503 without charging.
    pub fail_rate: f64,
    /// Probability of charging and then answering only after `timeout_delay` (longer than the
    /// caller's timeout: the caller sees a timeout although the charge happened).
    pub timeout_rate: f64,
    pub timeout_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
}

struct Gateway {
    db: Client,
    faults: GatewayFaults,
}

/// A charge request's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeRequest {
    pub order_id: String,
    pub amount_cents: i64,
}

/// A charge as the gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub order_id: String,
    pub amount_cents: i64,
    pub idempotency_key: Option<String>,
    /// True when this answer is the original charge, found by its idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

/// One line of the request log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestLogEntry {
    pub id: i64,
    pub idempotency_key: Option<String>,
    pub order_id: Option<String>,
    pub amount_cents: Option<i64>,
    pub outcome: String,
    pub charge_id: Option<String>,
    pub injected_timeout: bool,
}

/// Counts over the log and the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: i64,
    pub charges: i64,
    pub orders_charged: i64,
    pub orders_charged_more_than_once: i64,
    /// Charges beyond the first, over all orders.
    pub extra_charges: i64,
    pub replayed_requests: i64,
    pub injected_failures: i64,
    pub injected_timeouts: i64,
}

/// Connects to `database_url` and creates the gateway's schema when missing.
pub async fn connect(database_url: &str) -> Result<Client, GatewayError> {
    let (db, conn) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "gateway database connection ended");
        }
    });
    db.batch_execute(SCHEMA).await?;
    Ok(db)
}

/// Serves the gateway on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    database_url: &str,
    faults: GatewayFaults,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    let db = connect(database_url).await?;
    let state = Arc::new(Gateway { db, faults });
    let app = Router::new()
        .route("/charges", post(create_charge).get(list_charges))
        .route("/requests", get(list_requests))
        .route("/summary", get(summary))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "payment gateway listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.triggered().await })
        .await?;
    Ok(())
}

/// Binds `addr` and serves (for the binary).
pub async fn run(
    addr: SocketAddr,
    database_url: &str,
    faults: GatewayFaults,
    shutdown: Shutdown,
) -> Result<(), GatewayError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve(listener, database_url, faults, shutdown).await
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "null".into());
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

fn db_error(e: tokio_postgres::Error) -> Response {
    tracing::error!(error = %e, "gateway database error");
    error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
}

async fn create_charge(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let (lo, hi) = g.faults.latency_ms;
    if hi > 0 {
        let ms = if hi > lo {
            rand::random_range(lo..=hi)
        } else {
            hi
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let req: ChargeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            let _ = log(&g.db, key.as_deref(), None, "bad_request", None, false).await;
            return error(
                StatusCode::BAD_REQUEST,
                "body must be {order_id, amount_cents}",
            );
        }
    };
    if g.faults.fail_rate > 0.0 && rand::random::<f64>() < g.faults.fail_rate {
        let _ = log(
            &g.db,
            key.as_deref(),
            Some(&req),
            "injected_failure",
            None,
            false,
        )
        .await;
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected failure");
    }
    let timeout = g.faults.timeout_rate > 0.0 && rand::random::<f64>() < g.faults.timeout_rate;
    let charge_id = format!("ch_{}", uuid::Uuid::new_v4().simple());
    let inserted = g
        .db
        .query_opt(
            "INSERT INTO payment_gateway.charges (charge_id, idempotency_key, order_id, amount_cents) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING RETURNING charge_id",
            &[&charge_id, &key, &req.order_id, &req.amount_cents],
        )
        .await;
    let (status, outcome, charge) = match inserted {
        Err(e) => return db_error(e),
        Ok(Some(_)) => (
            StatusCode::CREATED,
            "charged",
            Charge {
                charge_id,
                order_id: req.order_id.clone(),
                amount_cents: req.amount_cents,
                idempotency_key: key.clone(),
                replayed: false,
            },
        ),
        Ok(None) => {
            // The key exists: answer with the original charge.
            let row = match g
                .db
                .query_one(
                    "SELECT charge_id, order_id, amount_cents FROM payment_gateway.charges \
                     WHERE idempotency_key = $1",
                    &[&key],
                )
                .await
            {
                Ok(r) => r,
                Err(e) => return db_error(e),
            };
            let original = Charge {
                charge_id: row.get(0),
                order_id: row.get(1),
                amount_cents: row.get(2),
                idempotency_key: key.clone(),
                replayed: true,
            };
            if original.order_id != req.order_id || original.amount_cents != req.amount_cents {
                let _ = log(&g.db, key.as_deref(), Some(&req), "conflict", None, false).await;
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency key reused with different parameters",
                );
            }
            (StatusCode::OK, "replayed", original)
        }
    };
    if let Err(e) = log(
        &g.db,
        key.as_deref(),
        Some(&req),
        outcome,
        Some(&charge.charge_id),
        timeout,
    )
    .await
    {
        return db_error(e);
    }
    if timeout {
        // The charge is made and logged; the answer arrives after the caller has given up.
        tokio::time::sleep(g.faults.timeout_delay).await;
    }
    let mut resp = json(status, &charge);
    if charge.replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    resp
}

async fn log(
    db: &Client,
    key: Option<&str>,
    req: Option<&ChargeRequest>,
    outcome: &str,
    charge_id: Option<&str>,
    injected_timeout: bool,
) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        "INSERT INTO payment_gateway.requests \
         (idempotency_key, order_id, amount_cents, outcome, charge_id, injected_timeout) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &key,
            &req.map(|r| r.order_id.as_str()),
            &req.map(|r| r.amount_cents),
            &outcome,
            &charge_id,
            &injected_timeout,
        ],
    )
    .await
}

async fn list_charges(State(g): State<Arc<Gateway>>) -> Response {
    let rows = match g
        .db
        .query(
            "SELECT charge_id, order_id, amount_cents, idempotency_key \
             FROM payment_gateway.charges ORDER BY created_at, charge_id",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return db_error(e),
    };
    let charges: Vec<Charge> = rows
        .iter()
        .map(|r| Charge {
            charge_id: r.get(0),
            order_id: r.get(1),
            amount_cents: r.get(2),
            idempotency_key: r.get(3),
            replayed: false,
        })
        .collect();
    json(StatusCode::OK, &charges)
}

async fn list_requests(State(g): State<Arc<Gateway>>) -> Response {
    let rows = match g
        .db
        .query(
            "SELECT id, idempotency_key, order_id, amount_cents, outcome, charge_id, injected_timeout \
             FROM payment_gateway.requests ORDER BY id",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return db_error(e),
    };
    let log: Vec<RequestLogEntry> = rows
        .iter()
        .map(|r| RequestLogEntry {
            id: r.get(0),
            idempotency_key: r.get(1),
            order_id: r.get(2),
            amount_cents: r.get(3),
            outcome: r.get(4),
            charge_id: r.get(5),
            injected_timeout: r.get(6),
        })
        .collect();
    json(StatusCode::OK, &log)
}

async fn summary(State(g): State<Arc<Gateway>>) -> Response {
    let row = match g
        .db
        .query_one(
            "WITH per_order AS (SELECT order_id, count(*) AS n FROM payment_gateway.charges GROUP BY order_id) \
             SELECT (SELECT count(*) FROM payment_gateway.requests), \
                    (SELECT count(*) FROM payment_gateway.charges), \
                    (SELECT count(*) FROM per_order), \
                    (SELECT count(*) FROM per_order WHERE n > 1), \
                    (SELECT coalesce(sum(n - 1), 0)::bigint FROM per_order), \
                    (SELECT count(*) FROM payment_gateway.requests WHERE outcome = 'replayed'), \
                    (SELECT count(*) FROM payment_gateway.requests WHERE outcome = 'injected_failure'), \
                    (SELECT count(*) FROM payment_gateway.requests WHERE injected_timeout)",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return db_error(e),
    };
    json(
        StatusCode::OK,
        &Summary {
            requests: row.get(0),
            charges: row.get(1),
            orders_charged: row.get(2),
            orders_charged_more_than_once: row.get(3),
            extra_charges: row.get(4),
            replayed_requests: row.get(5),
            injected_failures: row.get(6),
            injected_timeouts: row.get(7),
        },
    )
}
