//! The HTTP endpoint for operators and orchestrators: `/metrics`, `/healthz`, `/readyz`.
//!
//! ```text
//!  relay loop ──set_ready / set_healthy──▶ Health (atomics) ◀──read── GET /healthz, /readyz
//!  relay loop ──counters──▶ Metrics ◀──render── GET /metrics (also sets relay_up / relay_ready)
//! ```
//!
//! - `/healthz` (liveness): 200 while the process runs its loop; 503 once the loop has reported
//!   itself unhealthy (a state it cannot leave without a restart). A liveness probe failing here
//!   should restart the process.
//! - `/readyz` (readiness): 200 only while connected to Postgres and Kafka and streaming; 503 at
//!   start-up, while reconnecting and while draining on shutdown. Not-ready is normal for short
//!   spells and must not restart the process. The body says why: `not ready` followed by the
//!   notes components leave (the relay loop's last error while reconnecting, the slot watcher's
//!   findings such as a lost slot or a slot held by another process), one per line.
//!
//! The server stops accepting when [`Shutdown`] triggers and finishes in-flight requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;

use crate::metrics::{self, Metrics};
use crate::shutdown::Shutdown;

/// Liveness and readiness flags, set by the relay loop. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Flags>,
}

#[derive(Debug)]
struct Flags {
    healthy: AtomicBool,
    ready: AtomicBool,
    /// When the relay loop last went round, in milliseconds since `born`.
    progress_ms: AtomicU64,
    born: Instant,
    /// Why the relay may not be ready, by the component that says so (see [`Health::set_note`]).
    notes: Mutex<BTreeMap<NoteSource, String>>,
}

/// Who left a note on [`Health`]: each component replaces only its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoteSource {
    /// The relay loop (why it is reconnecting).
    Relay,
    /// The slot watcher (the slot's state, or that it cannot read it).
    Slot,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Healthy (the process is starting its loop) and not ready (nothing connected yet).
    pub fn new() -> Self {
        Health {
            inner: Arc::new(Flags {
                healthy: AtomicBool::new(true),
                ready: AtomicBool::new(false),
                progress_ms: AtomicU64::new(0),
                born: Instant::now(),
                notes: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Connected to Postgres and Kafka and streaming (true), or not (false: starting,
    /// reconnecting, draining).
    pub fn set_ready(&self, ready: bool) {
        // Relaxed: the flags are independent and only read for display; no other memory is
        // published through them.
        self.inner.ready.store(ready, Ordering::Relaxed);
        if ready {
            // Streaming again: the loop's reason for not being ready is over.
            self.set_note(NoteSource::Relay, None);
        }
    }

    /// Replaces `source`'s note (`None` removes it): one line saying what is wrong, shown by
    /// `/readyz`. Never put secrets or payloads in it.
    pub fn set_note(&self, source: NoteSource, note: Option<String>) {
        // A poisoned lock only means a panic elsewhere while holding it; the map is still valid.
        let mut notes = self.inner.notes.lock().unwrap_or_else(|e| e.into_inner());
        match note {
            Some(n) => notes.insert(source, n),
            None => notes.remove(&source),
        };
    }

    /// The notes, one per line, in a fixed order (relay loop first).
    pub fn notes(&self) -> Vec<String> {
        let notes = self.inner.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.values().cloned().collect()
    }

    /// The loop is working (true) or stuck in a state only a restart fixes (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.inner.healthy.store(healthy, Ordering::Relaxed);
    }

    /// See [`Health::set_ready`].
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// See [`Health::set_healthy`].
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// The relay loop went round once (it handled a message, a commit, a tick). Called on
    /// every iteration of a streaming loop, so a loop wedged inside one step stops calling it.
    pub fn progress(&self) {
        let ms = self.inner.born.elapsed().as_millis() as u64;
        self.inner.progress_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop last went round (since start-up if it never did).
    pub fn since_progress(&self) -> Duration {
        let now = self.inner.born.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.inner.progress_ms.load(Ordering::Relaxed)))
    }

    /// Whether the systemd watchdog may be fed: the relay is healthy and, while streaming
    /// (ready), its loop went round within `interval`. While not ready (connecting, backing off,
    /// draining) every step is bounded by its own timeout, so only an unhealthy relay starves
    /// the watchdog there; a streaming loop stuck in one step (a hung call, a deadlock) does.
    pub fn watchdog_ok(&self, interval: Duration) -> bool {
        self.is_healthy() && (!self.is_ready() || self.since_progress() < interval)
    }
}

/// The address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("http.listen: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The I/O error (address in use, permission denied, …).
    pub source: std::io::Error,
}

/// A running HTTP server.
#[derive(Debug)]
pub struct Server {
    /// The address actually bound (differs from the requested one for port 0).
    pub local_addr: SocketAddr,
    /// Completes when the server has stopped after shutdown; `Err` if it failed while serving.
    pub task: JoinHandle<std::io::Result<()>>,
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// Binds `addr` and serves the endpoints until `shutdown` triggers.
///
/// Binding happens before this returns, so a taken port is reported at start-up, naming the
/// address, rather than from a background task later.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> Result<Server, BindError> {
    let bind_error = |source| BindError { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .await
    });
    tracing::info!(%local_addr, "serving /metrics, /healthz, /readyz");
    Ok(Server { local_addr, task })
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .set_up_and_ready(state.health.is_healthy(), state.health.is_ready());
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    flag_response(state.health.is_healthy(), "ok\n", "unhealthy\n")
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let ready = state.health.is_ready();
    let mut body = if ready { "ready\n" } else { "not ready\n" }.to_owned();
    for note in state.health.notes() {
        body.push_str(&note);
        body.push('\n');
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

fn flag_response(ok: bool, yes: &'static str, no: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, yes)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, no)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 request over a real TCP connection; returns (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_follow_the_flags() {
        let metrics = Metrics::new().unwrap();
        let health = Health::new();
        let shutdown = Shutdown::new();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr;

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("relay_ready 0"), "{body}");
        assert!(body.contains("relay_up 1"), "{body}");

        health.set_note(NoteSource::Slot, Some("slot s: wal_status is lost".into()));
        health.set_note(
            NoteSource::Relay,
            Some("reconnecting after: refused".into()),
        );
        assert_eq!(
            get(addr, "/readyz").await,
            (
                503,
                "not ready\nreconnecting after: refused\nslot s: wal_status is lost\n".to_owned()
            )
        );
        health.set_note(NoteSource::Slot, None);
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
        assert!(get(addr, "/metrics").await.1.contains("relay_ready 1"));

        health.set_healthy(false);
        assert_eq!(get(addr, "/healthz").await.0, 503);
        assert!(get(addr, "/metrics").await.1.contains("relay_up 0"));
        assert_eq!(get(addr, "/nope").await.0, 404);

        shutdown.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), server.task)
            .await
            .expect("server did not stop on shutdown")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(
            addr,
            Metrics::new().unwrap(),
            Health::new(),
            Shutdown::new(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("http.listen: cannot listen on {addr}: ")),
            "{err}"
        );
    }
}
