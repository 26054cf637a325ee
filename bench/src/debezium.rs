//! Debezium as a contender of `relay-bench`: a Kafka Connect worker running Debezium's PostgreSQL
//! connector with the Outbox Event Router, on the bench's outbox and broker.
//!
//! ```text
//!   outbox (INSERT) ──pgoutput, publication outbox_pub, slot <slot>──▶ Debezium PostgresConnector
//!        │                                                              │ Outbox Event Router:
//!        │                                                              │ key = aggregate_id,
//!        ▼                                                              ▼ value = payload (jsonb text)
//!   writer records commit time                 Kafka topic <topic_prefix><aggregate_type>
//! ```
//!
//! The worker is started through `scripts/connect up` rather than by spawning `java` here: the
//! worker's configuration (its properties, JVM options, class path, plugin path, the jar fetch)
//! then lives in one place, and a user can start the very same worker by hand to look at it. The
//! script writes the JVM's pid file into `work_dir`, so [`DebeziumRun::pid`] is the JVM itself
//! (for `/proc` CPU and RSS), not a shell.
//!
//! Each run has its own worker (distributed mode, alone in its group `bench-<slot>`, its own
//! config/offset/status topics), its own connector `bench-<slot>` and its own slot; [`stop`]
//! removes all of them. A worker per run, rather than one reused, because Connect's exactly-once
//! source support is a worker setting (`exactly.once.source.support`) that applies to every
//! source task of the worker.
//!
//! Delivery modes ([`DebeziumSettings::exactly_once`]):
//! - at-least-once: Connect's defaults (non-transactional producer, offsets flushed every 60 s).
//! - exactly-once: `exactly.once.source.support=enabled` on the worker and
//!   `exactly.once.support=required` on the connector: each batch the task polls is written with
//!   its source offsets in one Kafka transaction (`transaction.boundary=poll`, the default).
//!
//! The record value is the outbox row's `payload` as Postgres renders jsonb (Debezium hands the
//! jsonb column over as a string, and the connector's value converter is `StringConverter`), so
//! a reader finds the payload's `"seq": N` as plain JSON. Nothing here logs payloads or the
//! database password (the password goes only into the connector's configuration).
//!
//! [`stop`]: DebeziumRun::stop

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::NoTls;

/// Debezium's and Kafka Connect's versions, as `scripts/connect` fetches them.
pub const DEBEZIUM_VERSION: &str = "3.6.1.Final";
pub const CONNECT_VERSION: &str = "4.1.1";

/// How long start-up may take: the worker's JVM start and plugin scan, then the connector's.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The contender's knobs (contract item 6).
#[derive(Clone, Debug, Default)]
pub struct DebeziumSettings {
    /// Connect's exactly-once source mode; otherwise at-least-once (Connect's defaults).
    pub exactly_once: bool,
    /// Debezium's `poll.interval.ms` (how long the task waits for its queue to fill before a
    /// poll returns; Debezium's default 500). `None` leaves Debezium's default.
    pub poll_interval_ms: Option<u64>,
}

/// A running Connect worker with the Debezium connector streaming from the bench's outbox.
pub struct DebeziumRun {
    pid: u32,
    rest: String,
    connector: String,
    slot: String,
    pg_url: String,
    bootstrap: String,
    work_dir: PathBuf,
    settings: Vec<(String, String)>,
    stopped: bool,
}

/// The `scripts/connect` of this checkout (the bench runs from the repository's root, but the
/// path does not depend on it).
fn connect_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/connect")
}

/// A free loopback port for the worker's REST API, unless `RELAY_BENCH_CONNECT_PORT` names one.
fn rest_port() -> Result<u16> {
    if let Ok(p) = std::env::var("RELAY_BENCH_CONNECT_PORT") {
        return p
            .parse()
            .with_context(|| format!("RELAY_BENCH_CONNECT_PORT={p} is not a port"));
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where Debezium connects: host, port, user, password, database, from the bench's URL.
struct PgTarget {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    dbname: String,
}

fn pg_target(pg_url: &str) -> Result<PgTarget> {
    let cfg: tokio_postgres::Config = pg_url
        .parse()
        .map_err(|e| anyhow!("the Postgres URL does not parse: {e}"))?;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(_)) => bail!("Debezium connects over TCP; the Postgres URL names a socket"),
        None => "127.0.0.1".to_owned(),
    };
    let user = cfg.get_user().unwrap_or("postgres").to_owned();
    Ok(PgTarget {
        host,
        port: cfg.get_ports().first().copied().unwrap_or(5432),
        password: cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        dbname: cfg.get_dbname().unwrap_or(&user).to_owned(),
        user,
    })
}

/// The connector's configuration, without the password: every entry is reported by `settings`.
fn connector_config(
    s: &DebeziumSettings,
    pg: &PgTarget,
    slot: &str,
    topic_prefix: &str,
) -> Vec<(String, String)> {
    let mut c: Vec<(String, String)> = [
        (
            "connector.class",
            "io.debezium.connector.postgresql.PostgresConnector",
        ),
        ("tasks.max", "1"),
        ("database.hostname", pg.host.as_str()),
        ("database.dbname", pg.dbname.as_str()),
        ("database.user", pg.user.as_str()),
        // Debezium's logical name: it prefixes only topics this run does not use (heartbeats,
        // transaction metadata, schema changes), so the slot's unique name serves.
        ("topic.prefix", slot),
        ("plugin.name", "pgoutput"),
        ("slot.name", slot),
        ("publication.name", "outbox_pub"),
        ("publication.autocreate.mode", "disabled"),
        ("table.include.list", "public.outbox"),
        // Only rows committed after the slot exists, as the relay's contenders see them.
        ("snapshot.mode", "no_data"),
        // The key is aggregate_id as text and the value the payload's jsonb text, unwrapped.
        (
            "key.converter",
            "org.apache.kafka.connect.storage.StringConverter",
        ),
        (
            "value.converter",
            "org.apache.kafka.connect.storage.StringConverter",
        ),
        ("transforms", "outbox"),
        (
            "transforms.outbox.type",
            "io.debezium.transforms.outbox.EventRouter",
        ),
        ("transforms.outbox.table.field.event.id", "event_id"),
        ("transforms.outbox.table.field.event.key", "aggregate_id"),
        ("transforms.outbox.table.field.event.type", "event_type"),
        ("transforms.outbox.table.field.event.payload", "payload"),
        ("transforms.outbox.route.by.field", "aggregate_type"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    c.push(("database.port".into(), pg.port.to_string()));
    c.push((
        "transforms.outbox.route.topic.replacement".into(),
        format!("{topic_prefix}${{routedByValue}}"),
    ));
    if let Some(ms) = s.poll_interval_ms {
        c.push(("poll.interval.ms".into(), ms.to_string()));
    }
    if s.exactly_once {
        c.push(("exactly.once.support".into(), "required".into()));
    }
    c
}

/// One HTTP/1.0 request to the worker's REST API: HTTP/1.0 so the body is never chunked and ends
/// when the connection does. Returns the status code and the body.
async fn rest(addr: &str, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow!("{method} http://{addr}{path}: no answer within 30 s"))?
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    Ok(crate::support::http_response(&String::from_utf8_lossy(
        &buf,
    )))
}

/// Runs `scripts/connect` with `args`; on failure the error carries the script's own message.
async fn script(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(connect_script())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("run {}", connect_script().display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "scripts/connect {} failed ({}):\n{}",
            args.first().unwrap_or(&""),
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connect to Postgres")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Whether the slot exists and a walsender streams from it.
async fn slot_active(pg: &tokio_postgres::Client, slot: &str) -> Result<bool> {
    let row = pg
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, bool>(0)).unwrap_or(false))
}

/// The connector's and its task's states, and the first line of a failed one's trace (a Java
/// exception message; Debezium's messages name tables and positions, not row contents).
fn states(status: &Value) -> (String, String, Option<String>) {
    let connector = status["connector"]["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let task = &status["tasks"][0];
    let task_state = task["state"].as_str().unwrap_or("NONE").to_owned();
    let trace = task["trace"]
        .as_str()
        .or(status["connector"]["trace"].as_str())
        .and_then(|t| t.lines().next())
        .map(str::to_owned);
    (connector, task_state, trace)
}

impl DebeziumRun {
    /// Starts a Kafka Connect worker (own process, loopback, own REST port) with the Debezium
    /// Postgres connector + Outbox Event Router on the bench's outbox, slot `slot` (created
    /// fresh by the connector), topics `<topic_prefix><aggregate_type>`. Returns once the
    /// connector and its task are RUNNING and the slot is active (a walsender streams from it).
    ///
    /// `work_dir` receives the worker's properties, pid file and log (`connect.log`). On failure
    /// the worker is stopped again and the slot dropped.
    pub async fn start(
        s: &DebeziumSettings,
        pg_url: &str,
        bootstrap: &str,
        slot: &str,
        topic_prefix: &str,
        work_dir: &Path,
    ) -> Result<DebeziumRun> {
        if slot.is_empty()
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            bail!("slot {slot:?}: Postgres slot names are lower-case letters, digits and '_'");
        }
        let pg = pg_target(pg_url)?;
        std::fs::create_dir_all(work_dir)
            .with_context(|| format!("create {}", work_dir.display()))?;
        let work_dir = work_dir.canonicalize()?;
        let port = rest_port()?;
        let group = format!("bench-{slot}");
        let mut settings: Vec<(String, String)> = vec![
            ("debezium.version".into(), DEBEZIUM_VERSION.into()),
            ("connect.version".into(), CONNECT_VERSION.into()),
            ("worker.mode".into(), "distributed, one worker".into()),
            ("worker.group.id".into(), group.clone()),
            (
                "worker.exactly.once.source.support".into(),
                if s.exactly_once {
                    "enabled"
                } else {
                    "disabled"
                }
                .into(),
            ),
            ("worker.plugin.discovery".into(), "service_load".into()),
            (
                "worker.heap".into(),
                std::env::var("CONNECT_HEAP_OPTS").unwrap_or_else(|_| "-Xms256M -Xmx2G".into()),
            ),
        ];
        let config = connector_config(s, &pg, slot, topic_prefix);
        settings.extend(
            config
                .iter()
                .map(|(k, v)| (format!("connector.{k}"), v.clone())),
        );

        let port_arg = port.to_string();
        let dir_arg = work_dir.to_string_lossy().into_owned();
        let mut args = vec![
            "up",
            "--dir",
            &dir_arg,
            "--rest-port",
            &port_arg,
            "--group",
            &group,
            "--bootstrap",
            bootstrap,
        ];
        if s.exactly_once {
            args.push("--exactly-once");
        }
        script(&args).await?;
        let pid: u32 = std::fs::read_to_string(work_dir.join("connect.pid"))
            .context("read the worker's pid file")?
            .trim()
            .parse()
            .context("the worker's pid file holds no pid")?;
        let mut run = DebeziumRun {
            pid,
            rest: format!("127.0.0.1:{port}"),
            connector: format!("bench-{slot}"),
            slot: slot.to_owned(),
            pg_url: pg_url.to_owned(),
            bootstrap: bootstrap.to_owned(),
            work_dir,
            settings,
            stopped: false,
        };
        match run.register(config, &pg).await {
            Ok(()) => Ok(run),
            Err(e) => {
                run.stopped = true;
                if let Err(stop) = run.teardown().await {
                    return Err(e.context(format!("and stopping the worker failed too: {stop:#}")));
                }
                Err(e)
            }
        }
    }

    /// Creates the connector and waits for it, its task and the slot.
    async fn register(&self, config: Vec<(String, String)>, pg: &PgTarget) -> Result<()> {
        let mut body: serde_json::Map<String, Value> = config
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        if let Some(p) = &pg.password {
            body.insert("database.password".into(), Value::String(p.clone()));
        }
        let path = format!("/connectors/{}/config", self.connector);
        let (code, answer) = rest(&self.rest, "PUT", &path, Some(&Value::Object(body))).await?;
        if code != 200 && code != 201 {
            // Connect's answer names the invalid setting; it echoes no password.
            bail!("Connect refused the connector ({code}): {}", answer.trim());
        }
        let db = pg_connect(&self.pg_url).await?;
        let deadline = Instant::now() + START_TIMEOUT;
        let status_path = format!("/connectors/{}/status", self.connector);
        loop {
            let (code, body) = rest(&self.rest, "GET", &status_path, None).await?;
            if code == 200 {
                let status: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let (connector, task, trace) = states(&status);
                if connector == "FAILED" || task == "FAILED" {
                    bail!(
                        "the Debezium connector failed (connector {connector}, task {task}): {} \
                         (worker log: {})",
                        trace.unwrap_or_default(),
                        self.work_dir.join("connect.log").display()
                    );
                }
                if connector == "RUNNING"
                    && task == "RUNNING"
                    && slot_active(&db, &self.slot).await?
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the Debezium connector was not streaming after {} s (worker log: {})",
                    START_TIMEOUT.as_secs(),
                    self.work_dir.join("connect.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Connect worker's JVM (for its CPU and RSS in `/proc`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Every setting that differs from Debezium's and Connect's defaults (and the versions), for
    /// the report. The database password is not among them.
    pub fn settings(&self) -> Vec<(String, String)> {
        self.settings.clone()
    }

    /// Deletes the connector, stops the worker, deletes its topics and drops the slot. Every step
    /// is tried; the first failure is returned.
    pub async fn stop(mut self) -> Result<()> {
        self.stopped = true;
        let path = format!("/connectors/{}", self.connector);
        let deleted = match rest(&self.rest, "DELETE", &path, None).await {
            Ok((204 | 200 | 404, _)) => Ok(()),
            Ok((code, body)) => Err(anyhow!(
                "deleting the connector answered {code}: {}",
                body.trim()
            )),
            Err(e) => Err(e),
        };
        let rest = self.teardown().await;
        deleted.and(rest)
    }

    /// Stops the worker (deleting its topics) and drops the slot once no walsender holds it.
    async fn teardown(&self) -> Result<()> {
        let dir_arg = self.work_dir.to_string_lossy().into_owned();
        let down = script(&[
            "down",
            "--dir",
            &dir_arg,
            "--bootstrap",
            &self.bootstrap,
            "--delete-topics",
        ])
        .await;
        let dropped = self.drop_slot().await;
        down.and(dropped)
    }

    async fn drop_slot(&self) -> Result<()> {
        let db = pg_connect(&self.pg_url).await?;
        // The walsender ends shortly after the worker does; a slot is droppable once inactive.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = db
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await?;
            match row.map(|r| r.get::<_, bool>(0)) {
                None => return Ok(()),
                Some(false) => {
                    db.execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                        .await
                        .with_context(|| format!("drop slot {}", self.slot))?;
                    return Ok(());
                }
                Some(true) if Instant::now() > deadline => {
                    bail!(
                        "slot {} is still active 30 s after the worker stopped",
                        self.slot
                    )
                }
                Some(true) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for DebeziumRun {
    /// A run dropped without `stop` (an error or a panic in the bench) must not leave a JVM
    /// running: stop it through the script, synchronously. The slot and topics stay; the
    /// script's `down` and `pg_drop_replication_slot` remove them by hand.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let _ = std::process::Command::new(connect_script())
            .arg("down")
            .arg("--dir")
            .arg(&self.work_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_gives_host_port_user_password_and_database() {
        let t = pg_target("postgres://alice:s3cret@127.0.0.1:55452/bench_1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str(), t.dbname.as_str()),
            ("127.0.0.1", 55452, "alice", "bench_1")
        );
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        let t = pg_target("postgres://postgres@localhost/").unwrap();
        assert_eq!(
            (t.port, t.dbname.as_str(), t.password),
            (5432, "postgres", None)
        );
    }

    #[test]
    fn the_connector_routes_by_aggregate_type_and_reports_no_password() {
        let t = pg_target("postgres://u:pw@127.0.0.1:1/d").unwrap();
        let c = connector_config(
            &DebeziumSettings {
                exactly_once: true,
                poll_interval_ms: Some(10),
            },
            &t,
            "s_1",
            "ab.debezium_eos_tuned.",
        );
        let get = |k: &str| c.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("transforms.outbox.route.topic.replacement"),
            Some("ab.debezium_eos_tuned.${routedByValue}")
        );
        assert_eq!(get("poll.interval.ms"), Some("10"));
        assert_eq!(get("exactly.once.support"), Some("required"));
        assert_eq!(get("slot.name"), Some("s_1"));
        assert!(c.iter().all(|(k, v)| !k.contains("password") && v != "pw"));
        let c = connector_config(&DebeziumSettings::default(), &t, "s_1", "p.");
        assert!(c
            .iter()
            .all(|(k, _)| k != "poll.interval.ms" && k != "exactly.once.support"));
    }

    #[test]
    fn states_read_a_failed_task_and_a_missing_one() {
        let s: Value = serde_json::from_str(
            r#"{"connector":{"state":"RUNNING"},"tasks":[{"id":0,"state":"FAILED","trace":"org.x.E: bad\n\tat y"}]}"#,
        )
        .unwrap();
        assert_eq!(
            states(&s),
            (
                "RUNNING".into(),
                "FAILED".into(),
                Some("org.x.E: bad".into())
            )
        );
        let s: Value =
            serde_json::from_str(r#"{"connector":{"state":"RUNNING"},"tasks":[]}"#).unwrap();
        assert_eq!(states(&s), ("RUNNING".into(), "NONE".into(), None));
    }
}
