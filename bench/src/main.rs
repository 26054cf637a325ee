//! `relay-bench`: measures the relays on the project's stack with a real workload.
//!
//! `relay-bench cdc` runs, against the stack of `scripts/stack up`:
//!
//! 1. **Postgres alone**: writers commit single-row outbox transactions as fast as they can for
//!    the phase's duration, with no slot and no relay: the commit rate this machine sustains.
//! 2. **Fixed rates** (default 1,000 and 5,000 events/s): a fresh slot and `relay cdc` (the
//!    release binary), writers paced at the rate, and a `read_committed` consumer that measures,
//!    per event, the time from the Postgres commit (the record's `commit_ts` header) to its
//!    arrival. The relay's own `relay_commit_to_kafka_seconds` histogram (commit to Kafka commit)
//!    is read from its `/metrics`. The relay's CPU seconds and peak RSS come from `/proc`.
//! 3. **Unthrottled**: writers as fast as they can with the relay running; the relay keeps up if
//!    the backlog drains right after the writers stop.
//!
//! Figures are printed and written as JSON under `bench/out/`. The machine is shared by Postgres,
//! Kafka, the relay and the writers (2 cores here): read the figures as ratios and orders of
//! magnitude, not as absolute throughput of a dedicated deployment.

mod ab;
mod debezium;
mod debezium_check;
mod drill;
mod support;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{
    bootstrap, connect, histogram_quantile, http_get, kafka_pid, now_us, percentile, pg_url,
    proc_usage,
};

#[derive(Parser)]
#[command(
    name = "relay-bench",
    about = "Measure the outbox relays on the local stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Postgres alone, then `relay cdc` at fixed rates, then unthrottled.
    Cdc {
        /// Event rates (events/s, one single-row transaction each) to measure latency at.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u32>,
        /// Length of each phase, seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Writer connections.
        #[arg(long, default_value_t = 8)]
        writers: u32,
        /// The relay binary (build it with cargo build --release -p relay).
        #[arg(long, default_value = "target/release/relay")]
        relay_bin: PathBuf,
        /// Payload bytes per event (JSON).
        #[arg(long, default_value_t = 300)]
        payload_bytes: usize,
        /// Only the fixed rates: no "Postgres alone" and no "unthrottled" phase (lever A/B runs).
        #[arg(long)]
        rates_only: bool,
        /// Extra environment for the relay, `NAME=VALUE`, repeatable (lever experiments).
        #[arg(long = "relay-env", value_parser = parse_env_pair)]
        relay_env: Vec<(String, String)>,
    },
    /// The relays side by side (one attached at a time): latency, loss and what each costs the
    /// database, per rate; writes report.json, report.md and SVG plots under --out.
    Ab(Box<ab::Opts>),
    /// Debezium (scripts/connect) on a fresh slot: writes N events, counts them under
    /// read_committed (delivered, lost, duplicated) and times commit -> visible.
    DebeziumCheck {
        /// Connect's exactly-once source mode (otherwise at-least-once, Connect's defaults).
        #[arg(long)]
        exactly_once: bool,
        /// Debezium's poll.interval.ms (default: Debezium's own, 500).
        #[arg(long)]
        poll_interval_ms: Option<u64>,
        #[arg(long, default_value_t = 5000)]
        events: u64,
        /// Events written and awaited first, not measured (the JVM's JIT warm-up).
        #[arg(long, default_value_t = 5000)]
        warmup_events: u64,
        /// Events per second, all writers together (0: as fast as they can).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 4)]
        writers: u32,
        /// How long to wait for the last events after the writers finished, seconds.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
    /// Operational drills against the local stack.
    Drill {
        #[command(subcommand)]
        drill: Drill,
    },
}

#[derive(Subcommand)]
enum Drill {
    /// The stall-consumer drill: freeze relay cdc while writers write; a real Prometheus with
    /// alerts/ fires the slot alerts; the slot goes unreserved, then lost at
    /// max_slot_wal_keep_size (lowered for the drill, restored after) while pg_wal stays
    /// bounded; the relay refuses the lost slot, recovers it from the table, and every event is
    /// counted. Writes bench/out/drill-stall-slot.{json,svg}.
    StallSlot {
        /// The relay binary (cargo build --release -p relay).
        #[arg(long, default_value = "target/release/relay")]
        relay_bin: PathBuf,
        /// The Prometheus server (Debian's `prometheus` package).
        #[arg(long, default_value = "/usr/bin/prometheus")]
        prometheus_bin: PathBuf,
        /// max_slot_wal_keep_size during the drill, MB.
        #[arg(long, default_value_t = 128)]
        keep_mb: u64,
        /// Filler WAL per second (another table's writes), MB.
        #[arg(long, default_value_t = 4)]
        filler_mb_per_s: u64,
        /// Outbox events per second.
        #[arg(long, default_value_t = 50)]
        events_per_s: u64,
        /// Give up waiting for the invalidation after this many seconds.
        #[arg(long, default_value_t = 300)]
        max_stall_s: u64,
    },
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// Writers committing single-row outbox transactions, paced at `rate` (0: unthrottled).
async fn write_load(
    url: &str,
    writers: u32,
    rate: u32,
    duration: Duration,
    payload_bytes: usize,
    topic_type: &str,
) -> Result<u64> {
    let committed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = connect(url).await?;
        let committed = committed.clone();
        let agg_type = topic_type.to_owned();
        let pad = "x".repeat(payload_bytes.saturating_sub(60));
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
                     VALUES (gen_random_uuid(), $1, $2, 'BenchEvent', $3)",
                )
                .await?;
            let mut k: u64 = 0;
            while start.elapsed() < duration {
                if rate > 0 {
                    // Event number k*writers+w is due at that many rate-intervals after start.
                    let due = Duration::from_secs_f64((k * u64::from(writers) + u64::from(w)) as f64 / f64::from(rate));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let agg = format!("a{}", (k * u64::from(writers) + u64::from(w)) % 1000);
                let payload = serde_json::json!({"n": k, "writer": w, "pad": pad});
                client.execute(&stmt, &[&agg_type, &agg, &payload]).await?;
                committed.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(committed.load(Ordering::Relaxed))
}

/// A read_committed consumer recording, per record, commit-to-arrival latency in µs.
struct LatencyReader {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<i64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LatencyReader {
    fn start(topic: &str) -> Result<LatencyReader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", format!("bench-{}", rand::random::<u32>()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            // Only what the relay committed; latency is to visibility under read_committed.
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .set("topic.metadata.refresh.interval.ms", "500")
            .set("allow.auto.create.topics", "true")
            .create()?;
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let arrived = now_us();
                    let ts = m.headers().and_then(|h| {
                        h.iter()
                            .find(|x| x.key == "commit_ts")
                            .and_then(|x| x.value)
                            .and_then(|b| std::str::from_utf8(b).ok())
                            .and_then(|t| t.parse::<i64>().ok())
                    });
                    if let Some(ts) = ts {
                        if let Ok(mut v) = v.lock() {
                            v.push(arrived - ts);
                        }
                    }
                }
            }
        });
        Ok(LatencyReader {
            stop,
            samples,
            thread: Some(thread),
        })
    }

    fn count(&self) -> usize {
        self.samples.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn finish(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct RelayRun {
    child: std::process::Child,
    http: String,
}

impl RelayRun {
    async fn start(
        bin: &PathBuf,
        db: &str,
        slot: &str,
        prefix: &str,
        extra_env: &[(String, String)],
    ) -> Result<RelayRun> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let http = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(format!("bench/out/relay-{slot}.log"))?;
        let child = std::process::Command::new(bin)
            .arg("cdc")
            .env("RELAY_POSTGRES__URL", pg_url(db))
            .env("RELAY_KAFKA__BOOTSTRAP_SERVERS", bootstrap())
            .env("RELAY_CDC__SLOT", slot)
            .env(
                "RELAY_KAFKA__CHECKPOINT_TOPIC",
                format!("{prefix}.checkpoints"),
            )
            .env(
                "RELAY_OUTBOX__TOPIC_TEMPLATE",
                format!("{prefix}.{{aggregate_type}}"),
            )
            .env("RELAY_HTTP__LISTEN", &http)
            .env("RELAY_LOG__FORMAT", "json")
            .envs(extra_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (build it: cargo build --release -p relay)",
                    bin.display()
                )
            })?;
        let run = RelayRun { child, http };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(&run.http, "/readyz").await {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!("relay not ready after 60 s; see bench/out/relay-{slot}.log");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> String {
        http_get(&self.http, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// The label of the CDC relay's series in its /metrics.
const CDC: &[&str] = &["relay=\"cdc\""];

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let (rates, seconds, writers, relay_bin, payload_bytes, rates_only, relay_env) =
        match cli.command {
            Cmd::Cdc {
                rates,
                seconds,
                writers,
                relay_bin,
                payload_bytes,
                rates_only,
                relay_env,
            } => (
                rates,
                seconds,
                writers,
                relay_bin,
                payload_bytes,
                rates_only,
                relay_env,
            ),
            Cmd::Ab(opts) => return ab::run(*opts).await,
            Cmd::DebeziumCheck {
                exactly_once,
                poll_interval_ms,
                events,
                warmup_events,
                rate,
                writers,
                wait_s,
            } => {
                return debezium_check::run(debezium_check::Opts {
                    exactly_once,
                    poll_interval_ms,
                    events,
                    warmup: warmup_events,
                    rate,
                    writers,
                    wait: Duration::from_secs(wait_s),
                })
                .await;
            }
            Cmd::Drill {
                drill:
                    Drill::StallSlot {
                        relay_bin,
                        prometheus_bin,
                        keep_mb,
                        filler_mb_per_s,
                        events_per_s,
                        max_stall_s,
                    },
            } => {
                return drill::stall_slot(drill::Opts {
                    relay_bin,
                    prometheus_bin,
                    keep_mb,
                    filler_mb_per_s,
                    events_per_s,
                    max_stall: Duration::from_secs(max_stall_s),
                })
                .await;
            }
        };
    std::fs::create_dir_all("bench/out")?;
    let duration = Duration::from_secs(seconds);
    let db = format!("bench_{:08x}", rand::random::<u32>());
    connect(&pg_url("postgres"))
        .await?
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    relay::migrate::run(&pg_url(&db)).await?;
    let admin = connect(&pg_url(&db)).await?;
    let mut report = serde_json::Map::new();

    if !rates_only {
        println!("== Postgres alone: {writers} writers, single-row transactions, {seconds} s");
        let n = write_load(&pg_url(&db), writers, 0, duration, payload_bytes, "alone").await?;
        let pg_rate = n as f64 / duration.as_secs_f64();
        println!("   {n} commits: {pg_rate:.0} commits/s");
        report.insert("postgres_alone_commits_per_s".into(), pg_rate.into());
    }
    if !relay_env.is_empty() {
        println!("   relay env: {relay_env:?}");
        report.insert("relay_env".into(), format!("{relay_env:?}").into());
    }

    let mut phases: Vec<(String, u32)> = rates.iter().map(|r| (format!("rate_{r}"), *r)).collect();
    if !rates_only {
        phases.push(("unthrottled".into(), 0));
    }
    for (name, rate) in phases {
        let slot = format!("bench_{}_{:06x}", name, rand::random::<u32>() & 0xffffff);
        let prefix = format!("bench.{slot}");
        admin
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        let relay = RelayRun::start(&relay_bin, &db, &slot, &prefix, &relay_env).await?;
        let pid = relay.child.id();
        let topic = format!("{prefix}.{name}");
        let reader = LatencyReader::start(&topic)?;
        let (cpu0, _) = proc_usage(pid).unwrap_or((0.0, 0));
        let broker = kafka_pid();
        let broker0 = broker.and_then(proc_usage).map(|(c, _)| c);
        let label = if rate > 0 {
            format!("{rate} events/s")
        } else {
            "as fast as the writers can".into()
        };
        println!("== relay cdc at {label}: {seconds} s");
        let started = Instant::now();
        let n = write_load(&pg_url(&db), writers, rate, duration, payload_bytes, &name).await?;
        let write_secs = started.elapsed().as_secs_f64();
        // Drain: wait until every written event has been read.
        let drain_start = Instant::now();
        while (reader.count() as u64) < n && drain_start.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drain = drain_start.elapsed().as_secs_f64();
        let metrics = relay.metrics().await;
        let (cpu1, rss) = proc_usage(pid).unwrap_or((0.0, 0));
        let broker1 = broker.and_then(proc_usage).map(|(c, _)| c);
        relay.stop();
        let mut lat = reader.finish();
        lat.sort_unstable();
        let delivered = lat.len();
        let (p50, p99, max) = (
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
        );
        let h50 = histogram_quantile(&metrics, "relay_commit_to_kafka_seconds", CDC, 0.5)
            .map(|s| s * 1000.0);
        let h99 = histogram_quantile(&metrics, "relay_commit_to_kafka_seconds", CDC, 0.99)
            .map(|s| s * 1000.0);
        let k50 = histogram_quantile(&metrics, "relay_kafka_commit_seconds", CDC, 0.5)
            .map(|s| s * 1000.0);
        let k99 = histogram_quantile(&metrics, "relay_kafka_commit_seconds", CDC, 0.99)
            .map(|s| s * 1000.0);
        let cpu_per_100k = if delivered > 0 {
            (cpu1 - cpu0) / delivered as f64 * 100_000.0
        } else {
            f64::NAN
        };
        // The broker's CPU over the same window (writes and drain), per 100k events delivered.
        let broker_per_100k = match (broker0, broker1) {
            (Some(a), Some(b)) if delivered > 0 => (b - a) / delivered as f64 * 100_000.0,
            _ => f64::NAN,
        };
        let offered = n as f64 / write_secs;
        println!("   written {n} ({offered:.0}/s), delivered {delivered}, drained in {drain:.2} s after the writers stopped");
        println!("   commit -> consumer (read_committed): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
        println!(
            "   commit -> Kafka commit (relay histogram, interpolated): p50 {} ms, p99 {} ms",
            h50.map_or("-".into(), |v| format!("{v:.1}")),
            h99.map_or("-".into(), |v| format!("{v:.1}"))
        );
        println!(
            "   of which one Kafka commit (relay histogram, interpolated): p50 {} ms, p99 {} ms",
            k50.map_or("-".into(), |v| format!("{v:.1}")),
            k99.map_or("-".into(), |v| format!("{v:.1}"))
        );
        println!(
            "   relay CPU {:.2} s per 100,000 events, peak RSS {:.1} MB",
            cpu_per_100k,
            rss as f64 / 1e6
        );
        println!("   broker CPU {broker_per_100k:.2} s per 100,000 events");
        // Kafka transactions the relay committed (heartbeats and idle checkpoints included).
        let txns = metrics
            .lines()
            .find(|l| {
                l.starts_with("relay_kafka_transactions_total")
                    && l.contains("relay=\"cdc\"")
                    && l.contains("outcome=\"committed\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        println!(
            "   {txns:.0} Kafka transactions ({:.0}/s, {:.1} events each)",
            txns / write_secs,
            delivered as f64 / txns
        );
        let stages: Vec<String> = [
            "received",
            "batch_closed",
            "produced",
            "delivered",
            "committed",
        ]
        .iter()
        .filter_map(|st| {
            let stage = format!("stage=\"{st}\"");
            let labels = [CDC[0], stage.as_str()];
            let p50 = histogram_quantile(&metrics, "relay_stage_seconds", &labels, 0.5)?;
            let p99 = histogram_quantile(&metrics, "relay_stage_seconds", &labels, 0.99)?;
            Some(format!("{st} {:.1}/{:.1}", p50 * 1e3, p99 * 1e3))
        })
        .collect();
        if !stages.is_empty() {
            println!(
                "   stages from the Postgres commit, p50/p99 ms: {}",
                stages.join(", ")
            );
        }
        report.insert(
            name.clone(),
            serde_json::json!({
                "target_rate": rate, "written": n, "offered_per_s": offered, "delivered": delivered,
                "drain_s": drain, "e2e_p50_ms": p50, "e2e_p99_ms": p99, "e2e_max_ms": max,
                "relay_hist_p50_ms": h50, "relay_hist_p99_ms": h99,
                "kafka_commit_p50_ms": k50, "kafka_commit_p99_ms": k99,
                "relay_cpu_s_per_100k": cpu_per_100k, "relay_peak_rss_bytes": rss,
                "broker_cpu_s_per_100k": broker_per_100k, "kafka_transactions": txns,
                "stages_p50_p99_ms": stages,
            }),
        );
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ok();
    }
    drop(admin);
    connect(&pg_url("postgres"))
        .await?
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    let path = format!("bench/out/cdc-{}.json", now_us() / 1_000_000);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::Value::Object(report))?,
    )?;
    println!("== report: {path}");
    Ok(())
}
