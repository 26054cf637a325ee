//! `relay-bench drill stall-slot`: the stall-consumer drill, end to end on the local stack.
//!
//! ```text
//!  writers (outbox rows + filler WAL) ─▶ Postgres ─▶ slot ─▶ relay cdc (SIGSTOP'd) ─▶ Kafka
//!                                          │                relay watch-slots ──┐
//!                                          └─ pg_wal size, wal_status (sampled)  ▼
//!                                                              Prometheus (alerts/, 1 s scrape)
//! ```
//!
//! With writers running, the drill freezes `relay cdc` (SIGSTOP). WAL piles up behind the slot;
//! a real Prometheus server scraping `relay watch-slots` (the slot watcher alone, which keeps
//! exporting while the relay is frozen) evaluates the project's own rules, with their `for:`
//! durations and rate windows scaled down so the drill takes minutes, not hours. The slot goes
//! unreserved, then lost at `max_slot_wal_keep_size` (lowered for the drill and restored after),
//! while `pg_wal` stays bounded. The relay is resumed: it refuses the lost slot (exit 3); `relay
//! cdc --recover-lost-slot` recovers it from the table; the drill then counts every outbox row in
//! Kafka. It prints and writes (`bench/out/drill-stall-slot.{json,svg}`) the timeline: alert
//! pending and firing times from Prometheus's API, slot state changes, `pg_wal` size, and the
//! margin between the first alert and the invalidation.

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the drill is run with.
#[derive(Debug, Clone)]
pub struct Opts {
    pub relay_bin: PathBuf,
    pub prometheus_bin: PathBuf,
    /// `max_slot_wal_keep_size` during the drill, MB.
    pub keep_mb: u64,
    /// Filler WAL written per second, MB (a busy primary's other tables).
    pub filler_mb_per_s: u64,
    /// Outbox events per second.
    pub events_per_s: u64,
    /// Give up waiting for the invalidation after this long.
    pub max_stall: Duration,
}

struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// [`Proc::wait_exit`] for async code: polls without blocking the executor.
    async fn exited(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Blocking: for `Drop` only.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("CONT");
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(15)).is_none() {
                eprintln!("{} did not stop; killing it", self.name);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One sample of the timeline.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    t: f64,
    pg_wal_bytes: i64,
    retained_bytes: i64,
    wal_status: String,
    /// Alert name -> state (pending, firing), for the relay's slot alerts.
    alerts: BTreeMap<String, String>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Timeline {
    stalled_at: f64,
    /// First time each (alert, state) was seen, seconds since the start.
    alert_first: BTreeMap<String, f64>,
    /// First time each wal_status was seen.
    status_first: BTreeMap<String, f64>,
    samples: Vec<Sample>,
}

fn relay_env(cmd: &mut Command, url: &str, slot: &str, prefix: &str, http: &str) {
    cmd.env("RELAY_POSTGRES__URL", url)
        .env("RELAY_KAFKA__BOOTSTRAP_SERVERS", crate::bootstrap())
        .env("RELAY_CDC__SLOT", slot)
        .env("RELAY_CDC__HEARTBEAT_INTERVAL", "1s")
        .env("RELAY_CDC__STATUS_INTERVAL", "1s")
        .env("RELAY_SLOT_WATCH__INTERVAL", "1s")
        .env(
            "RELAY_KAFKA__CHECKPOINT_TOPIC",
            format!("{prefix}.checkpoints"),
        )
        .env("RELAY_KAFKA__TRANSACTIONAL_ID", format!("{prefix}-txn"))
        .env("RELAY_KAFKA__DLQ_TOPIC", format!("{prefix}.dlq"))
        .env(
            "RELAY_OUTBOX__TOPIC_TEMPLATE",
            format!("{prefix}.{{aggregate_type}}"),
        )
        .env("RELAY_HTTP__LISTEN", http)
        .env("RELAY_LOG__FORMAT", "json");
}

fn spawn(bin: &Path, args: &[&str], log: &Path, setup: impl FnOnce(&mut Command)) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    setup(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("start {}", bin.display()))
}

/// The project's rules with their `for:` durations and range windows scaled for a drill that
/// lasts minutes: `for: Nm` becomes 5 s, `[30m]` and `[15m]` windows 1 min.
fn drill_rules(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(indent);
            out.push_str("for: 5s");
        } else {
            out.push_str(&line.replace("[30m]", "[1m]").replace("[15m]", "[1m]"));
        }
        out.push('\n');
    }
    out
}

async fn prometheus_alerts(addr: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok((200, body)) = crate::http_get(addr, "/api/v1/alerts").await else {
        return out;
    };
    let Some(v) = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .or_else(|| serde_json::from_str(&dechunk(&body)?).ok())
    else {
        return out;
    };
    for a in v["data"]["alerts"].as_array().into_iter().flatten() {
        let name = a["labels"]["alertname"].as_str().unwrap_or_default();
        let state = a["state"].as_str().unwrap_or_default();
        if name.starts_with("RelaySlot") {
            // Firing wins over pending when an alert has several series.
            let e = out.entry(name.to_owned()).or_insert_with(String::new);
            if e.as_str() != "firing" {
                *e = state.to_owned();
            }
        }
    }
    out
}

/// The body of a `Transfer-Encoding: chunked` response (Prometheus answers larger bodies that
/// way): hexadecimal size lines, each followed by that many bytes. `None` if it is not one.
fn dechunk(body: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, tail) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(tail.get(..size)?);
        rest = tail.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Every event id in `topic` (read_committed, from the beginning to the end).
fn read_event_ids(topic: &str) -> Result<HashMap<String, usize>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", crate::bootstrap())
        .set("group.id", format!("drill-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut remaining: std::collections::HashSet<i32> = parts.into_iter().collect();
    let mut ids = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !remaining.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Ok(m)) => {
                if let Some(h) = m.headers() {
                    if let Some(v) = h.iter().find(|h| h.key == "event_id").and_then(|h| h.value) {
                        *ids.entry(String::from_utf8_lossy(v).into_owned())
                            .or_insert(0) += 1;
                    }
                }
            }
            _ => {}
        }
    }
    if !remaining.is_empty() {
        bail!("reading {topic} did not reach the end");
    }
    Ok(ids)
}

/// Runs the drill. Needs the local stack and the release binary of the relay.
pub async fn stall_slot(o: Opts) -> Result<()> {
    std::fs::create_dir_all("bench/out")?;
    let n = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let db = format!("drill_{n}");
    let (slot, prefix) = (format!("drill_{n}"), format!("drill_{n}"));
    let admin = crate::connect(&crate::pg_url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = crate::pg_url(&db);
    let old_keep: String = admin
        .query_one("SHOW max_slot_wal_keep_size", &[])
        .await?
        .get(0);
    // ALTER SYSTEM cannot run in a transaction block: one statement per call.
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET max_slot_wal_keep_size = '{}MB'",
            o.keep_mb
        ))
        .await
        .context("ALTER SYSTEM SET max_slot_wal_keep_size (the drill needs a superuser)")?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    let result = run(&o, &admin, &db, &url, &slot, &prefix).await;
    // Put the stack back as it was, whatever happened.
    let _ = admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET max_slot_wal_keep_size = '{old_keep}'"
        ))
        .await;
    let _ = admin.batch_execute("SELECT pg_reload_conf()").await;
    let _ = admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await;
    result
}

async fn run(
    o: &Opts,
    admin: &tokio_postgres::Client,
    db: &str,
    url: &str,
    slot: &str,
    prefix: &str,
) -> Result<()> {
    let status = Command::new(&o.relay_bin)
        .args(["migrate", "--database-url", url])
        .status()
        .context("relay migrate")?;
    if !status.success() {
        bail!("relay migrate failed");
    }
    let c = crate::connect(url).await?;
    c.batch_execute("CREATE TABLE drill_filler (x text)")
        .await?;
    let (relay_http, watch_http, prom_port) = (
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
        free_port()?,
    );
    let out = PathBuf::from("bench/out");
    let mut relay = Proc {
        child: spawn(&o.relay_bin, &["cdc"], &out.join("drill-relay.log"), |c| {
            relay_env(c, url, slot, prefix, &relay_http)
        })?,
        name: "relay cdc",
    };
    let _watch = Proc {
        child: spawn(
            &o.relay_bin,
            &["watch-slots"],
            &out.join("drill-watch.log"),
            |c| relay_env(c, url, slot, prefix, &watch_http),
        )?,
        name: "relay watch-slots",
    };
    // Prometheus on loopback with the project's rules, scaled for the drill.
    let dir = std::env::temp_dir().join(format!("relay-drill-{slot}"));
    std::fs::create_dir_all(dir.join("data"))?;
    let rules =
        std::fs::read_to_string("alerts/relay.rules.yml").context("alerts/relay.rules.yml")?;
    std::fs::write(dir.join("rules.yml"), drill_rules(&rules))?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: [\"{relay_http}\"]\n\
             \x20 - job_name: outbox-relay-slots\n    static_configs:\n      - targets: [\"{watch_http}\"]\n"
        ),
    )?;
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let _prom = Proc {
        child: spawn(
            &o.prometheus_bin,
            &[
                &format!("--config.file={}", dir.join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={prom_addr}"),
            ],
            &out.join("drill-prometheus.log"),
            |_| {},
        )?,
        name: "prometheus",
    };

    // Wait for the relay to stream and Prometheus to be up.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = matches!(crate::http_get(&relay_http, "/readyz").await, Ok((200, _)));
        let prom = matches!(crate::http_get(&prom_addr, "/-/ready").await, Ok((200, _)));
        if ready && prom {
            break;
        }
        if Instant::now() > deadline {
            bail!("relay or Prometheus not ready in 90 s (bench/out/drill-*.log)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("relay streaming, Prometheus up on {prom_addr}; starting the writers");

    // Writers: outbox events (counted at the end) and filler WAL of another table.
    let stop = Arc::new(AtomicBool::new(false));
    let events = {
        let (stop, url, per_s) = (stop.clone(), url.to_owned(), o.events_per_s.max(1));
        tokio::spawn(async move {
            let Ok(c) = crate::connect(&url).await else {
                return;
            };
            let every = Duration::from_micros(1_000_000 / per_s);
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let _ = c
                    .execute(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
                         VALUES (gen_random_uuid(), 'order', $1, 'Placed', jsonb_build_object('i', $2::bigint))",
                        &[&format!("o-{}", i % 100), &(i as i64)],
                    )
                    .await;
                tokio::time::sleep(every).await;
            }
        })
    };
    let filler = {
        let (stop, url, mb) = (stop.clone(), url.to_owned(), o.filler_mb_per_s);
        tokio::spawn(async move {
            let Ok(c) = crate::connect(&url).await else {
                return;
            };
            // About 1 MB of WAL per statement; a CHECKPOINT every few seconds, as the
            // checkpointer would, is when Postgres invalidates a slot past the cap.
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..mb {
                    let _ = c
                        .batch_execute(
                            "INSERT INTO drill_filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 800) g",
                        )
                        .await;
                }
                n += 1;
                if n % 3 == 0 {
                    let _ = c.batch_execute("CHECKPOINT").await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let started = Instant::now();
    let mut tl = Timeline::default();
    let sample = |tl: &mut Timeline, s: Sample| {
        for (name, state) in &s.alerts {
            tl.alert_first
                .entry(format!("{name} {state}"))
                .or_insert(s.t);
        }
        tl.status_first.entry(s.wal_status.clone()).or_insert(s.t);
        tl.samples.push(s);
    };
    let pa = prom_addr.as_str();
    let take = |t: f64| async move {
        let row = admin
            .query_opt(
                "SELECT (SELECT sum(size) FROM pg_ls_waldir())::bigint, \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, \
                 coalesce(wal_status, 'none') FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .flatten();
        let (pg_wal_bytes, retained_bytes, wal_status) = match row {
            Some(r) => (r.get(0), r.get(1), r.get(2)),
            None => (0, 0, "dropped".to_owned()),
        };
        Sample {
            t,
            pg_wal_bytes,
            retained_bytes,
            wal_status,
            alerts: prometheus_alerts(pa).await,
        }
    };
    // Warm-up: the relay keeps up.
    while started.elapsed() < Duration::from_secs(10) {
        let s = take(started.elapsed().as_secs_f64()).await;
        sample(&mut tl, s);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    relay.signal("STOP");
    tl.stalled_at = started.elapsed().as_secs_f64();
    println!("t={:.0}s: relay cdc stopped (SIGSTOP)", tl.stalled_at);
    let stall_deadline = Instant::now() + o.max_stall;
    let mut last_status = String::new();
    let mut lost = false;
    while Instant::now() < stall_deadline {
        let s = take(started.elapsed().as_secs_f64()).await;
        if s.wal_status != last_status {
            println!(
                "t={:.0}s: wal_status {} (pg_wal {} MB, retained {} MB)",
                s.t,
                s.wal_status,
                s.pg_wal_bytes >> 20,
                s.retained_bytes >> 20
            );
            last_status = s.wal_status.clone();
        }
        lost = s.wal_status == "lost";
        sample(&mut tl, s);
        if lost {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A little longer: the lost alert fires too.
    for _ in 0..8 {
        let s = take(started.elapsed().as_secs_f64()).await;
        sample(&mut tl, s);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    relay.signal("CONT");
    let refused = relay.exited(Duration::from_secs(60)).await;
    println!("relay cdc resumed; it exited with {refused:?} (3: refused the lost slot)");

    // Recovery.
    let mut recovered = Proc {
        child: spawn(
            &o.relay_bin,
            &["cdc", "--recover-lost-slot"],
            &out.join("drill-relay-recover.log"),
            |c| relay_env(c, url, slot, prefix, &relay_http),
        )?,
        name: "relay cdc --recover-lost-slot",
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = events.await;
    let _ = filler.await;
    // Caught up: the slot confirmed past everything written.
    let target: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: Option<bool> = admin
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &target],
            )
            .await?
            .map(|r| r.get(0));
        if done == Some(true) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the recovered relay did not catch up in 120 s (bench/out/drill-relay-recover.log)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    recovered.signal("TERM");
    let _ = recovered.exited(Duration::from_secs(30)).await;

    // Count.
    let c = crate::connect(url).await?;
    let rows: Vec<String> = c
        .query("SELECT event_id::text FROM outbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let topic = format!("{prefix}.order");
    let ids = tokio::task::spawn_blocking(move || read_event_ids(&topic)).await??;
    let lost_events = rows.iter().filter(|id| !ids.contains_key(*id)).count();
    let duplicated = ids.values().filter(|n| **n > 1).count();
    let _ = db;

    // Report.
    let first = |key: &str| tl.alert_first.get(key).copied();
    let lost_at = tl.status_first.get("lost").copied();
    let first_alert = tl
        .alert_first
        .iter()
        .filter(|(k, _)| k.ends_with(" firing"))
        .map(|(k, t)| (k.clone(), *t))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    println!(
        "\n== timeline (seconds since the start; relay stopped at {:.0})",
        tl.stalled_at
    );
    let mut events_list: Vec<(f64, String)> = tl
        .alert_first
        .iter()
        .map(|(k, t)| (*t, format!("alert {k}")))
        .chain(
            tl.status_first
                .iter()
                .map(|(k, t)| (*t, format!("wal_status {k}"))),
        )
        .collect();
    events_list.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, e) in &events_list {
        println!("{t:>6.0}  {e}");
    }
    let max_wal = tl.samples.iter().map(|s| s.pg_wal_bytes).max().unwrap_or(0);
    println!(
        "\npg_wal peaked at {} MB with max_slot_wal_keep_size = {} MB",
        max_wal >> 20,
        o.keep_mb
    );
    match (&first_alert, lost_at) {
        (Some((name, t)), Some(l)) => println!(
            "first alert firing: {name} at {t:.0} s; slot lost at {l:.0} s: margin {:.0} s",
            l - t
        ),
        _ => println!("alert or invalidation not observed (lost = {lost})"),
    }
    println!(
        "events: {} written, {} in Kafka, {lost_events} lost, {duplicated} duplicated (recovered rows \
         overlapping the last heartbeat window are expected duplicates; consumers dedup)",
        rows.len(),
        ids.len()
    );
    let report = serde_json::json!({
        "keep_mb": o.keep_mb,
        "filler_mb_per_s": o.filler_mb_per_s,
        "events_per_s": o.events_per_s,
        "stalled_at_s": tl.stalled_at,
        "slot_lost_at_s": lost_at,
        "first_alert_firing": first_alert,
        "unreserved_at_s": tl.status_first.get("unreserved"),
        "retained_wal_high_firing_s": first("RelaySlotRetainedWalHigh firing"),
        "retained_wal_critical_firing_s": first("RelaySlotRetainedWalCritical firing"),
        "lost_alert_firing_s": first("RelaySlotLost firing"),
        "pg_wal_peak_bytes": max_wal,
        "relay_exit_on_lost_slot": refused,
        "events_written": rows.len(),
        "events_lost": lost_events,
        "events_duplicated": duplicated,
        "timeline": tl,
    });
    std::fs::write(
        out.join("drill-stall-slot.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("drill-stall-slot.svg"), svg(&tl, o.keep_mb))?;
    println!("wrote bench/out/drill-stall-slot.json and .svg");
    if lost_events > 0 {
        bail!("{lost_events} events lost");
    }
    Ok(())
}

/// `pg_wal` and the slot's retained WAL over time, with the stall, alert and invalidation times.
fn svg(tl: &Timeline, keep_mb: u64) -> String {
    let (w, h, pad) = (800.0, 360.0, 50.0);
    let t_max = tl.samples.last().map_or(1.0, |s| s.t).max(1.0);
    let y_max = tl
        .samples
        .iter()
        .map(|s| s.pg_wal_bytes.max(s.retained_bytes) as f64 / 1048576.0)
        .fold(keep_mb as f64 * 1.2, f64::max);
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |mb: f64| h - pad - (h - 2.0 * pad) * mb / y_max;
    let line = |f: &dyn Fn(&Sample) -> f64| {
        tl.samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(f(s))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\" font-size=\"13\">Stall-consumer drill: WAL behind a stalled slot (MB) over time (s)</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    out.push_str(&format!(
        "<line x1=\"{pad}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"gray\" stroke-dasharray=\"4\"/>\
         <text x=\"{2}\" y=\"{3:.1}\">max_slot_wal_keep_size {keep_mb} MB</text>\n",
        y(keep_mb as f64),
        w - pad,
        pad + 4.0,
        y(keep_mb as f64) - 4.0
    ));
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n",
        line(&|s| s.pg_wal_bytes as f64 / 1048576.0)
    ));
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"darkorange\" stroke-width=\"2\" points=\"{}\"/>\n",
        line(&|s| s.retained_bytes as f64 / 1048576.0)
    ));
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" fill=\"steelblue\">pg_wal size</text><text x=\"{}\" y=\"{}\" fill=\"darkorange\">retained by the slot</text>\n",
        w - 190.0, pad + 10.0, w - 190.0, pad + 24.0
    ));
    let mut marks: Vec<(f64, String, &str)> =
        vec![(tl.stalled_at, "relay stopped".into(), "black")];
    for (k, t) in &tl.alert_first {
        if k.ends_with(" firing") {
            marks.push((*t, k.trim_end_matches(" firing").to_owned(), "red"));
        }
    }
    for (k, t) in &tl.status_first {
        if k == "unreserved" || k == "lost" {
            marks.push((*t, format!("slot {k}"), "purple"));
        }
    }
    for (i, (t, label, color)) in marks.iter().enumerate() {
        let xx = x(*t);
        out.push_str(&format!(
            "<line x1=\"{xx:.1}\" y1=\"{pad}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-dasharray=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{label}</text>\n",
            h - pad,
            xx + 3.0,
            pad + 40.0 + 13.0 * i as f64
        ));
    }
    out.push_str(&format!(
        "<text x=\"{pad}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\">{t_max:.0} s</text>\
         <text x=\"5\" y=\"{pad}\">{y_max:.0} MB</text>\n</svg>\n",
        h - pad + 14.0,
        w - pad - 20.0,
        h - pad + 14.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(dechunk("{\"a\":1}"), None);
        assert_eq!(dechunk("ff\r\nshort"), None);
    }

    #[test]
    fn rules_are_scaled_for_the_drill() {
        let r = "      - alert: X\n        expr: deriv(a[30m]) > 0\n        for: 10m\n";
        let d = drill_rules(r);
        assert!(d.contains("for: 5s"), "{d}");
        assert!(d.contains("a[1m]"), "{d}");
        assert!(!d.contains("10m"), "{d}");
    }
}
