//! `relay-bench ab`: the relays side by side on the same outbox, one attached at a time, with
//! what each costs the database, measured by Postgres itself.
//!
//! ```text
//!  for each round, for each rate:  none ─▶ contender A ─▶ contender B ─▶ …
//!
//!  one phase:  TRUNCATE outbox, reset pg_stat_statements
//!              (fresh slot) ─▶ start the contender in its namespace ─▶ reader at the topic's end
//!              writers, open loop at the rate, for --duration   ─▶  seq + commit time per event
//!              wait until the reader has every seq (bounded: --drain-timeout)
//!              read: backends' CPU, relay CPU/RSS, broker and machine CPU, WAL, /metrics
//!              stop the contender, drop its slot; read the table's counters and pg_stat_statements
//! ```
//!
//! The `none` phase (writers, no relay) is the baseline of the writers' own commit latency and of
//! the WAL the writers write: what a relay adds on top is the difference. `--ceiling` raises the
//! rate per contender until it falls behind, beside the rate Postgres alone commits;
//! `--sweep-poll-interval` runs the polling relay at one rate across `poll.interval` values.
//! Everything goes to `--out` as `report.json`, `report.md` and SVG plots.

mod contender;
mod pgstats;
mod plot;
pub mod reader;
mod report;
mod writer;

pub use contender::Contender;

use crate::support::{
    bootstrap, connect, kafka_pid, machine_cpu, now_us, percentile, pg_url, proc_usage,
};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The aggregate type of every bench event: topics are `ab.<namespace>.BenchEvent`.
pub const AGGREGATE_TYPE: &str = "BenchEvent";

/// Parses `30s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(format!("not a duration: {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `relay-bench ab` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Contenders, attached one at a time in this order in each round: cdc, poll, cdc-alo,
    /// cdc-unpaced, cdc-wire, cdc-wire-v1, debezium, debezium-tuned, debezium-eos, debezium-eos-tuned.
    #[arg(long, value_delimiter = ',', default_value = "cdc,poll")]
    pub contenders: Vec<Contender>,
    /// Offered event rates (events/s).
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
    pub rates: Vec<u32>,
    /// Writing time of each phase (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Rounds: each runs every rate with `none` and every contender.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Outbox rows per writer transaction.
    #[arg(long, default_value_t = 1)]
    pub rows_per_tx: u32,
    /// Bytes of JSON payload per event.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// Distinct aggregate ids (Kafka keys).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Writer connections.
    #[arg(long, default_value_t = 8)]
    pub writers: u32,
    /// Extra environment for the relay contenders, repeated: --relay-env RELAY_BATCH__MAX_DELAY=10ms.
    #[arg(long = "relay-env", value_parser = parse_kv)]
    pub relay_env: Vec<(String, String)>,
    /// Output directory.
    #[arg(long, default_value = "bench/out/ab")]
    pub out: PathBuf,
    /// The relay binary (cargo build --release -p relay).
    #[arg(long, default_value = "target/release/relay")]
    pub relay_bin: PathBuf,
    /// Postgres server URL without a database (default: the stack's, from STACK_PG_*). The bench
    /// creates its own database on it and drops it at the end.
    #[arg(long)]
    pub pg_url: Option<String>,
    /// Kafka bootstrap servers (default: STACK_KAFKA_BOOTSTRAP).
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// The Kafka broker's pid, for its CPU (default: $STACK_DIR/run/kafka.pid).
    #[arg(long)]
    pub kafka_pid: Option<u32>,
    /// How long to wait for the last events after the writers stop before counting the rest lost.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Writing time of the warm-up at the start of every phase with a contender: events written
    /// at the phase's rate and awaited, not measured. A contender starts fresh in every phase,
    /// and a JVM's (Debezium's) first seconds run interpreted code; without a warm-up its
    /// figures would be its start-up's. 0s turns it off.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Skip the fixed-rate phases (run only --ceiling and/or the sweep).
    #[arg(long)]
    pub skip_fixed: bool,
    /// Also raise the rate per contender until it falls behind.
    #[arg(long)]
    pub ceiling: bool,
    /// First rate of the ceiling search.
    #[arg(long, default_value_t = 1000)]
    pub ceiling_start: u32,
    /// Factor between ceiling steps.
    #[arg(long, default_value_t = 1.5)]
    pub ceiling_factor: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 100_000)]
    pub ceiling_max: u32,
    /// Writing time of each ceiling step.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub ceiling_duration: Duration,
    /// A contender has fallen behind when its backlog is not drained this long after the writers stop.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ceiling_drain: Duration,
    /// poll.interval values for the polling relay (e.g. 1ms,5ms,20ms,100ms).
    #[arg(long, value_delimiter = ',')]
    pub sweep_poll_interval: Vec<String>,
    /// The rate of the sweep (default: the first of --rates).
    #[arg(long)]
    pub sweep_rate: Option<u32>,
}

/// What a contender needs to start in one phase.
pub struct PhaseEnv<'a> {
    pub contender: Contender,
    /// The bench database's URL.
    pub pg_url: &'a str,
    pub bootstrap: &'a str,
    pub relay_bin: &'a Path,
    /// The phase's fresh replication slot (created by the bench for relay contenders).
    pub slot: &'a str,
    /// Unique per phase: application_name, poll.name, transactional id, log file name.
    pub tag: &'a str,
    pub extra_env: &'a [(String, String)],
    pub work_dir: &'a Path,
}

/// Which part of the run a phase belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Fixed,
    Alone,
    Ceiling,
    Sweep,
}

#[derive(Debug, Clone)]
struct PhaseSpec {
    kind: Kind,
    contender: Option<Contender>,
    round: u32,
    rate: u32,
    duration: Duration,
    extra_env: Vec<(String, String)>,
    drain_bound: Duration,
    /// For the sweep: the poll.interval.
    variant: Option<String>,
}

/// One measured phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub kind: Option<Kind>,
    /// The contender's label, `none` without relay.
    pub contender: String,
    pub variant: Option<String>,
    pub round: u32,
    pub target_rate: u32,
    pub settings: Vec<(String, String)>,
    pub written: u64,
    pub failed_txs: u64,
    pub offered_per_s: f64,
    pub writer_max_behind_ms: f64,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub foreign: u64,
    pub unparsed: u64,
    pub drained: bool,
    pub drain_s: f64,
    pub achieved_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Seconds from the writers' start to the end of the drain.
    pub phase_s: f64,
    /// The walsender (CDC) or the polling session (poll).
    pub db_backend_cpu_s: f64,
    /// Every backend of the contender (also the slot watcher and other sessions).
    pub db_backends_cpu_s: f64,
    pub backends: Vec<pgstats::BackendCpu>,
    pub poll_query: Option<pgstats::PollQuery>,
    pub table_start: pgstats::TableStats,
    pub table_end: pgstats::TableStats,
    /// seq_tup_read + idx_tup_fetch on the outbox during the phase (writers and relay).
    pub tuples_read: i64,
    pub wal_bytes: i64,
    pub relay_cpu_s: f64,
    pub relay_peak_rss_bytes: u64,
    pub broker_cpu_s: f64,
    pub machine_busy_s: f64,
    pub machine_total_s: f64,
    /// relay_stage_seconds per stage: (p50, p99) in ms, when the relay exports it.
    pub stages: BTreeMap<String, (f64, f64)>,
    /// Kafka transactions the relay committed (`relay_kafka_transactions_total`), when exported.
    pub kafka_transactions: Option<f64>,
    /// One Kafka transaction's commit (`relay_kafka_commit_seconds`): (p50, p99) in ms.
    pub kafka_commit_ms: Option<(f64, f64)>,
    #[serde(skip)]
    pub latencies_us: Vec<i64>,
    #[serde(skip)]
    pub commit_latencies_us: Vec<i64>,
}

struct Ctx {
    opts: Opts,
    db_url: String,
    admin: tokio_postgres::Client,
    bootstrap: String,
    kafka_pid: Option<u32>,
    run_id: String,
    next_seq: u64,
    phase_no: u32,
    topics: HashSet<String>,
    work_dir: PathBuf,
}

/// Runs `relay-bench ab`.
pub async fn run(opts: Opts) -> Result<()> {
    if opts.contenders.is_empty() {
        bail!("--contenders is empty");
    }
    if !opts.relay_bin.exists() {
        bail!(
            "{} not found: cargo build --release -p relay (or pass --relay-bin)",
            opts.relay_bin.display()
        );
    }
    let started = now_us();
    let machine = report::machine_info();
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let server = opts
        .pg_url
        .clone()
        .map(|u| u.trim_end_matches('/').to_owned());
    let url_for = |db: &str| match &server {
        Some(s) => format!("{s}/{db}"),
        None => pg_url(db),
    };
    let db = format!("bench_ab_{run_id}");
    connect(&url_for("postgres"))
        .await?
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let db_url = url_for(&db);
    let result = run_in(opts.clone(), db_url.clone(), run_id, machine, started).await;
    // The database goes whatever happened; slots were dropped phase by phase.
    if let Ok(c) = connect(&url_for("postgres")).await {
        let _ = c
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
    result
}

async fn run_in(
    opts: Opts,
    db_url: String,
    run_id: String,
    machine: report::Machine,
    started: i64,
) -> Result<()> {
    relay::migrate::run(&db_url)
        .await
        .context("apply the relay's migrations")?;
    let admin = connect(&db_url).await?;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .context("pg_stat_statements (shared_preload_libraries must list it; scripts/postgres.conf does)")?;
    let work_dir = opts.out.join("logs");
    std::fs::create_dir_all(&work_dir)?;
    // The relays' logs are for debugging a run, not part of a report committed under docs/.
    std::fs::write(work_dir.join(".gitignore"), "*\n")?;
    let mut ctx = Ctx {
        bootstrap: opts.bootstrap.clone().unwrap_or_else(bootstrap),
        kafka_pid: opts.kafka_pid.or_else(kafka_pid),
        opts,
        db_url,
        admin,
        run_id,
        next_seq: 0,
        phase_no: 0,
        topics: HashSet::new(),
        work_dir,
    };
    let o = ctx.opts.clone();
    let specs = plan(&o);
    let bar = ProgressBar::new(specs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut phases: Vec<Phase> = Vec::new();
    for spec in specs.iter().filter(|s| s.kind != Kind::Ceiling) {
        bar.set_message(describe(spec));
        let p = run_phase(&mut ctx, spec).await?;
        say(&bar, report::phase_line(&p));
        phases.push(p);
        bar.inc(1);
        // A partial report after every phase: a run that fails late keeps what it measured.
        write_report(
            &report::Report::build(&o, machine.clone(), started, phases.clone(), vec![]),
            &o.out,
        )?;
    }
    // The ceiling: per contender, ×factor until it falls behind, or until the writers cannot
    // commit the rate with it attached: then Postgres on this machine is the limit, not the relay
    // (its own CPU and the walsender's may be part of why, which the cost table shows).
    let mut ceilings = Vec::new();
    if o.ceiling {
        let alone = PhaseSpec {
            kind: Kind::Alone,
            contender: None,
            round: 1,
            rate: 0,
            duration: o.ceiling_duration,
            extra_env: vec![],
            drain_bound: o.ceiling_drain,
            variant: None,
        };
        bar.set_message(describe(&alone));
        let p = run_phase(&mut ctx, &alone).await?;
        say(&bar, report::phase_line(&p));
        let alone_rate = p.offered_per_s;
        phases.push(p);
        for c in &o.contenders {
            let mut rate = o.ceiling_start.max(1);
            let mut last_ok = None;
            let why;
            loop {
                let spec = PhaseSpec {
                    kind: Kind::Ceiling,
                    contender: Some(*c),
                    round: 1,
                    rate,
                    duration: o.ceiling_duration,
                    extra_env: o.relay_env.clone(),
                    drain_bound: o.ceiling_drain,
                    variant: None,
                };
                bar.set_message(describe(&spec));
                let p = run_phase(&mut ctx, &spec).await?;
                say(&bar, report::phase_line(&p));
                let writers_short = p.offered_per_s < 0.95 * f64::from(rate);
                let behind = !p.drained || p.achieved_per_s < 0.95 * p.offered_per_s;
                phases.push(p);
                if behind {
                    why = format!("fell behind at {rate}/s");
                    break;
                }
                if writers_short {
                    why = format!("writers could not commit {rate}/s with it attached");
                    break;
                }
                last_ok = Some(rate);
                let next = (f64::from(rate) * o.ceiling_factor).round() as u32;
                if next > o.ceiling_max {
                    why = format!("reached --ceiling-max {}", o.ceiling_max);
                    break;
                }
                rate = next;
            }
            ceilings.push(report::Ceiling {
                contender: c.label().to_owned(),
                highest_kept_up: last_ok,
                stopped: why,
                postgres_alone_per_s: alone_rate,
            });
        }
    }
    bar.finish_and_clear();
    let rep = report::Report::build(&o, machine, started, phases, ceilings);
    write_report(&rep, &o.out)?;
    println!("{}", rep.stdout_table());
    println!("report: {}", o.out.join("report.md").display());
    Ok(())
}

/// Writes `report.json`, the SVG plots and `report.md` (which links them) under `out`. Here, not
/// in `report.rs`: the plots draw the report's rows, and the report must not import its plots.
fn write_report(rep: &report::Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(rep)?)?;
    let mut plots = Vec::new();
    if !rep.rows.is_empty() {
        plot::by_rate(
            &out.join("latency.svg"),
            "commit → visible (read_committed), ms: p50 dashed, p99 solid",
            &rep.rows,
            &[
                (|r: &report::Row| r.latency_p50_ms, true),
                (|r: &report::Row| r.latency_p99_ms, false),
            ],
        )?;
        plot::by_rate(
            &out.join("db_cpu.svg"),
            "database backend serving the relay, % of one core",
            &rep.rows,
            &[(|r: &report::Row| r.db_backend_cpu_pct, false)],
        )?;
        plots.push(("Latency by rate", "latency.svg"));
        plots.push(("Database CPU by rate", "db_cpu.svg"));
    }
    let sweep: Vec<report::Row> = rep
        .sweep
        .iter()
        .filter(|r| r.variant.is_some())
        .cloned()
        .collect();
    if !sweep.is_empty() {
        plot::sweep(&out.join("sweep.svg"), &sweep)?;
        plots.push(("poll.interval sweep", "sweep.svg"));
    }
    std::fs::write(out.join("report.md"), rep.markdown(&plots))?;
    Ok(())
}

/// A line above the progress bar, or on stderr when there is no terminal to draw the bar on.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Every phase except the ceiling's (which depends on what it finds), in order.
fn plan(o: &Opts) -> Vec<PhaseSpec> {
    let mut v = Vec::new();
    let spec = |kind, contender, round, rate, extra_env, variant| PhaseSpec {
        kind,
        contender,
        round,
        rate,
        duration: o.duration,
        extra_env,
        drain_bound: o.drain_timeout,
        variant,
    };
    if !o.skip_fixed {
        for round in 1..=o.rounds.max(1) {
            for &rate in &o.rates {
                v.push(spec(Kind::Fixed, None, round, rate, vec![], None));
                for c in &o.contenders {
                    v.push(spec(
                        Kind::Fixed,
                        Some(*c),
                        round,
                        rate,
                        o.relay_env.clone(),
                        None,
                    ));
                }
            }
        }
    }
    let sweep_rate = o.sweep_rate.or(o.rates.first().copied()).unwrap_or(1000);
    for iv in &o.sweep_poll_interval {
        let mut env = o.relay_env.clone();
        env.push(("RELAY_POLL__INTERVAL".into(), iv.clone()));
        v.push(spec(
            Kind::Sweep,
            Some(Contender::Poll),
            1,
            sweep_rate,
            env,
            Some(iv.clone()),
        ));
    }
    if o.ceiling {
        // Placeholders for the progress bar's length: the search has at least the alone phase
        // and one step per contender.
        v.push(spec(Kind::Ceiling, None, 1, 0, vec![], None));
        for c in &o.contenders {
            v.push(spec(Kind::Ceiling, Some(*c), 1, 0, vec![], None));
        }
    }
    v
}

fn describe(s: &PhaseSpec) -> String {
    let who = s.contender.map_or("none", |c| c.label());
    let rate = if s.rate == 0 {
        "unthrottled".to_owned()
    } else {
        format!("{}/s", s.rate)
    };
    let v = s
        .variant
        .as_ref()
        .map(|v| format!(" poll.interval={v}"))
        .unwrap_or_default();
    format!("{:?} round {} {who} {rate}{v}", s.kind, s.round).to_lowercase()
}

/// Writes the warm-up events and waits until the contender has delivered every one of them
/// (its reader starts at the topic's end, so the measured phase's reader sees none of them).
async fn warm_up(
    ctx: &mut Ctx,
    topic: &str,
    warm: &writer::WriteSpec,
    bound: Duration,
) -> Result<()> {
    let r = reader::Reader::start(&ctx.bootstrap, topic, warm.base, warm.capacity())?;
    let w = writer::write(&ctx.db_url, warm, AGGREGATE_TYPE).await?;
    ctx.next_seq = warm.base + w.commit_us.len() as u64 + 1;
    let start = Instant::now();
    while r.distinct() < w.events && start.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (got, want) = (r.distinct(), w.events);
    r.finish();
    if got < want {
        bail!("warm-up: {got} of {want} events delivered within {bound:?}; the contender is not moving events");
    }
    Ok(())
}

async fn run_phase(ctx: &mut Ctx, spec: &PhaseSpec) -> Result<Phase> {
    ctx.phase_no += 1;
    let label = spec.contender.map_or("none".to_owned(), |c| c.namespace());
    let tag = format!("ab_{}_{}_{label}", ctx.run_id, ctx.phase_no);
    // Every phase starts from an empty outbox: the polling relay starts from the table's
    // beginning, and table size and dead tuples are then comparable between phases.
    ctx.admin.batch_execute("TRUNCATE outbox").await?;
    pgstats::reset_statements(&ctx.admin).await?;
    let mut wspec = writer::WriteSpec {
        rate: spec.rate,
        duration: spec.duration,
        rows_per_tx: ctx.opts.rows_per_tx.max(1),
        payload_bytes: ctx.opts.payload_bytes,
        keys: ctx.opts.keys,
        writers: ctx.opts.writers,
        base: ctx.next_seq,
    };
    let capacity = if spec.rate > 0 { wspec.capacity() } else { 0 };
    let mut attached = None;
    let mut reader = None;
    let mut slot = None;
    if let Some(c) = spec.contender {
        let topic = format!("{}{AGGREGATE_TYPE}", c.topic_prefix());
        if ctx.topics.insert(topic.clone()) {
            reader::ensure_topic(&ctx.bootstrap, &topic).await?;
        }
        if c.uses_slot() && !matches!(c, Contender::Debezium { .. }) {
            ctx.admin
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&tag],
                )
                .await
                .context("create the phase's replication slot")?;
        }
        if c.uses_slot() {
            slot = Some(tag.clone());
        }
        let env = PhaseEnv {
            contender: c,
            pg_url: &ctx.db_url,
            bootstrap: &ctx.bootstrap,
            relay_bin: &ctx.opts.relay_bin,
            slot: &tag,
            tag: &tag,
            extra_env: &spec.extra_env,
            work_dir: &ctx.work_dir,
        };
        let a = match c.attach(&env).await {
            Ok(a) => a,
            Err(e) => {
                drop_slot(&ctx.admin, slot.as_deref()).await;
                return Err(e);
            }
        };
        attached = Some(a);
        if !ctx.opts.warmup.is_zero() {
            let warm = writer::WriteSpec {
                duration: ctx.opts.warmup,
                // Unthrottled phases warm up at a modest rate: the point is a warm contender.
                rate: if spec.rate > 0 { spec.rate } else { 1000 },
                ..wspec.clone()
            };
            let warmed = warm_up(ctx, &topic, &warm, spec.drain_bound).await;
            if let Err(e) = warmed {
                if let Some(a) = attached.take() {
                    let _ = a.stop().await;
                }
                drop_slot(&ctx.admin, slot.as_deref()).await;
                return Err(e);
            }
            wspec.base = ctx.next_seq;
        }
        reader = Some(reader::Reader::start(
            &ctx.bootstrap,
            &topic,
            wspec.base,
            capacity,
        )?);
    }
    let sampler = match &attached {
        Some(_) => Some(pgstats::BackendSampler::start(&ctx.db_url, &tag, slot.as_deref()).await?),
        None => None,
    };
    let table_start = pgstats::table_stats(&ctx.admin).await?;
    let wal0 = pgstats::wal_lsn(&ctx.admin).await?;
    let relay0 = attached.as_ref().and_then(|a| proc_usage(a.pid()));
    let broker0 = ctx.kafka_pid.and_then(proc_usage);
    let machine0 = machine_cpu();
    let t0 = Instant::now();

    let w = writer::write(&ctx.db_url, &wspec, AGGREGATE_TYPE).await?;
    ctx.next_seq = wspec.base + w.commit_us.len() as u64 + 1;

    let drain_start = Instant::now();
    if let Some(r) = &reader {
        while r.distinct() < w.events && drain_start.elapsed() < spec.drain_bound {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let phase_s = t0.elapsed().as_secs_f64();
    let wal1 = pgstats::wal_lsn(&ctx.admin).await?;
    let relay1 = attached.as_ref().and_then(|a| proc_usage(a.pid()));
    let broker1 = ctx.kafka_pid.and_then(proc_usage);
    let machine1 = machine_cpu();
    let backends = match sampler {
        Some(s) => s.finish().await,
        None => vec![],
    };
    let mut stages = BTreeMap::new();
    let mut settings = vec![];
    let mut kafka = (None, None);
    if let Some(a) = attached {
        settings = a.settings();
        if let Some(m) = a.metrics().await {
            // Kept beside the relay's log (ignored by git): what the figures were read from.
            let _ = std::fs::write(ctx.work_dir.join(format!("{tag}.metrics")), &m);
            stages = report::stage_quantiles(&m);
            kafka = report::kafka_transactions(&m);
        }
        let stopped = a.stop().await;
        drop_slot(&ctx.admin, slot.as_deref()).await;
        stopped?;
    }
    // A short grace for duplicates arriving after the last new event (none expected).
    if reader.is_some() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = reader.map(|r| r.finish()).unwrap_or_default();
    // The relay's backend has exited by now and flushed its table statistics.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let table_end = pgstats::table_stats(&ctx.admin).await?;
    let poll_query = match spec.contender {
        Some(Contender::Poll) => Some(pgstats::poll_query(&ctx.admin).await?),
        _ => None,
    };

    let mut p = Phase {
        kind: Some(spec.kind),
        contender: spec.contender.map_or("none".into(), |c| c.label().into()),
        variant: spec.variant.clone(),
        round: spec.round,
        target_rate: spec.rate,
        settings,
        written: w.events,
        failed_txs: w.failed_txs,
        offered_per_s: w.events as f64 / w.elapsed.as_secs_f64().max(1e-9),
        writer_max_behind_ms: w.max_behind_ms,
        phase_s,
        drain_s,
        wal_bytes: wal1 - wal0,
        tuples_read: (table_end.seq_tup_read + table_end.idx_tup_fetch)
            - (table_start.seq_tup_read + table_start.idx_tup_fetch),
        table_start,
        table_end,
        poll_query,
        stages,
        kafka_transactions: kafka.0,
        kafka_commit_ms: kafka.1,
        ..Phase::default()
    };
    let mut cl = w.commit_latency_us.clone();
    cl.sort_unstable();
    p.commit_p50_ms = percentile(&cl, 0.5);
    p.commit_p99_ms = percentile(&cl, 0.99);
    p.commit_latencies_us = cl;
    if let (Some(a), Some(b)) = (relay0, relay1) {
        p.relay_cpu_s = b.0 - a.0;
        p.relay_peak_rss_bytes = b.1;
    }
    if let (Some(a), Some(b)) = (broker0, broker1) {
        p.broker_cpu_s = b.0 - a.0;
    }
    if let (Some(a), Some(b)) = (machine0, machine1) {
        p.machine_busy_s = b.0 - a.0;
        p.machine_total_s = b.1 - a.1;
    }
    p.db_backends_cpu_s = backends.iter().map(|b| b.cpu_s).sum();
    p.db_backend_cpu_s = backends
        .iter()
        .filter(|b| b.backend_type == "walsender" || b.application_name == tag)
        .map(|b| b.cpu_s)
        .sum();
    p.backends = backends;
    if spec.contender.is_some() {
        let mut lat = Vec::with_capacity(w.events as usize);
        let mut last = 0i64;
        for (i, &commit) in w.commit_us.iter().enumerate() {
            if commit == 0 {
                continue;
            }
            match seen.count.get(i).copied().unwrap_or(0) {
                0 => p.lost += 1,
                n => {
                    p.delivered += 1;
                    p.duplicated += u64::from(n - 1);
                    let at = seen.first_us[i];
                    last = last.max(at);
                    lat.push(at - commit);
                }
            }
        }
        p.foreign = seen.foreign;
        p.unparsed = seen.unparsed;
        p.drained = p.lost == 0;
        lat.sort_unstable();
        p.latency_p50_ms = percentile(&lat, 0.5);
        p.latency_p90_ms = percentile(&lat, 0.9);
        p.latency_p99_ms = percentile(&lat, 0.99);
        p.latency_max_ms = percentile(&lat, 1.0);
        p.latencies_us = lat;
        let span = (last - w.started_us) as f64 / 1e6;
        p.achieved_per_s = if span > 0.0 {
            p.delivered as f64 / span
        } else {
            0.0
        };
    }
    Ok(p)
}

/// Drops the phase's slot once its walsender has let go of it (bounded; a leftover slot is named
/// in the error output rather than retried forever).
async fn drop_slot(c: &tokio_postgres::Client, slot: Option<&str>) {
    let Some(slot) = slot else { return };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        if r.is_ok() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("could not drop replication slot {slot}: {r:?}; drop it by hand");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("").is_err());
    }
}
