//! `relay-bench debezium-check`: proves the Debezium contender end to end on the stack, and gives
//! a first figure of its latency and of the Connect JVM's cost.
//!
//! A fresh database with the project's migrations, a [`DebeziumRun`] on a fresh slot, a warm-up
//! (`--warmup-events`, awaited, not measured), then writers committing `--events` single-row
//! outbox transactions (payload `{"seq": i, "pad": …}`, the
//! commit-returned time of each recorded in µs), and a `read_committed` reader of the routed
//! topic that finds each record's `seq` in its value. Events are counted by seq: delivered
//! (distinct seqs seen), lost (written, never seen), duplicated (seen more than once).
//! Latency is commit-returned to first arrival, both clocks of this process.

use crate::ab::reader::parse_seq;
use crate::debezium::{DebeziumRun, DebeziumSettings};
use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Opts {
    pub exactly_once: bool,
    pub poll_interval_ms: Option<u64>,
    pub events: u64,
    /// Events written and awaited before the measured ones (their seqs follow the measured
    /// ones'): a fresh JVM interprets and JIT-compiles for its first tens of seconds.
    pub warmup: u64,
    pub rate: u32,
    pub writers: u32,
    pub wait: Duration,
}

/// The 1-minute load average: on a shared 2-core machine the latency figures mean little when it
/// is well above 2, so the check prints it beside them.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Resident and peak resident memory of a process, bytes (`VmRSS`, `VmHWM`).
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some((kb("VmRSS:")?, kb("VmHWM:")?))
}

/// Per seq: how often it arrived, when it first did (µs since the epoch), and that record's
/// Kafka timestamp (ms; the Outbox Event Router sets it to the change event's `ts_ms`, when
/// Debezium handled the change), which splits the latency into Debezium's part and the rest.
struct Arrivals {
    count: Vec<u32>,
    first: Vec<i64>,
    record_ts_ms: Vec<i64>,
    foreign: u64,
}

fn start_reader(
    topic: &str,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Result<(Arc<Mutex<Arrivals>>, std::thread::JoinHandle<()>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", crate::bootstrap())
        .set("group.id", format!("dbz-check-{}", rand::random::<u32>()))
        .set("enable.auto.commit", "false")
        // Only what the producer committed: in the exactly-once mode, what Connect's
        // transactions made visible.
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let arrivals = Arc::new(Mutex::new(Arrivals {
        count: vec![0; n],
        first: vec![0; n],
        record_ts_ms: vec![0; n],
        foreign: 0,
    }));
    let a = arrivals.clone();
    let thread = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let now = crate::now_us();
            let seq = m.payload().and_then(parse_seq);
            let Ok(mut a) = a.lock() else { return };
            match seq.and_then(|s| usize::try_from(s).ok()).filter(|&s| s < n) {
                Some(s) => {
                    if a.count[s] == 0 {
                        a.first[s] = now;
                        a.record_ts_ms[s] = m.timestamp().to_millis().unwrap_or(0);
                    }
                    a.count[s] += 1;
                }
                None => a.foreign += 1,
            }
        }
    });
    Ok((arrivals, thread))
}

/// Writers committing one single-row transaction per seq of `seqs`, paced at `rate` in total;
/// `commit[i]` is set to the time event i's COMMIT returned.
async fn write(
    url: &str,
    o: &Opts,
    seqs: std::ops::Range<u64>,
    commit: Arc<Vec<AtomicI64>>,
) -> Result<()> {
    let start = Instant::now();
    let pad = "x".repeat(240);
    let mut tasks = Vec::new();
    for w in 0..u64::from(o.writers) {
        let client = crate::connect(url).await?;
        let (commit, pad, writers, rate, seqs) = (
            commit.clone(),
            pad.clone(),
            u64::from(o.writers),
            o.rate,
            seqs.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare(
                    "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
                     VALUES (gen_random_uuid(), 'BenchEvent', $1, 'BenchEvent', $2)",
                )
                .await?;
            let mut i = seqs.start + w;
            while i < seqs.end {
                if rate > 0 {
                    let due =
                        Duration::from_secs_f64((i - seqs.start) as f64 / f64::from(rate));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let payload = serde_json::json!({"seq": i, "pad": pad});
                client
                    .execute(&stmt, &[&format!("a{}", i % 1000), &payload])
                    .await?;
                if let Some(c) = usize::try_from(i).ok().and_then(|i| commit.get(i)) {
                    c.store(crate::now_us(), Ordering::Relaxed);
                }
                i += writers;
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub async fn run(o: Opts) -> Result<()> {
    std::fs::create_dir_all("bench/out")?;
    let id = format!("{:08x}", rand::random::<u32>());
    let db = format!("bench_dbz_{id}");
    let slot = format!("dbz_check_{id}");
    let prefix = format!("bench.dbzcheck_{id}.");
    let topic = format!("{prefix}BenchEvent");
    let work_dir = PathBuf::from(format!("bench/out/debezium-{slot}"));
    let n = usize::try_from(o.events)?;
    crate::connect(&crate::pg_url("postgres"))
        .await?
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    relay::migrate::run(&crate::pg_url(&db)).await?;

    // The topic exists before the reader assigns its partition, so the reader starts from its
    // very first record.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", crate::bootstrap())
        .create()?;
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;

    let settings = DebeziumSettings {
        exactly_once: o.exactly_once,
        poll_interval_ms: o.poll_interval_ms,
    };
    let mode = if o.exactly_once {
        "exactly-once source"
    } else {
        "at-least-once"
    };
    println!(
        "== Debezium {} ({mode}, poll.interval.ms {}): starting the Connect worker",
        crate::debezium::DEBEZIUM_VERSION,
        o.poll_interval_ms
            .map_or("default".to_owned(), |v| v.to_string())
    );
    let started = Instant::now();
    let run = DebeziumRun::start(
        &settings,
        &crate::pg_url(&db),
        &crate::bootstrap(),
        &slot,
        &prefix,
        &work_dir,
    )
    .await?;
    let pid = run.pid();
    println!(
        "   streaming after {:.1} s (worker pid {pid}, log {}/connect.log)",
        started.elapsed().as_secs_f64(),
        work_dir.display()
    );
    let csv_path = format!("bench/out/debezium-check-{id}.csv");
    let result = measure(&o, &db, &topic, n, pid, &csv_path).await;
    let (cpu_total, _) = crate::proc_usage(pid).unwrap_or((f64::NAN, 0));
    let settings_list = run.settings();
    let stopped = run.stop().await;
    crate::connect(&crate::pg_url("postgres"))
        .await?
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .ok();
    let mut report = result?;
    stopped.context("stopping Debezium")?;
    println!("   JVM CPU since its start (start-up included): {cpu_total:.2} s");
    report.insert("jvm_cpu_s_since_start".into(), cpu_total.into());
    report.insert(
        "settings".into(),
        settings_list
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    );
    println!("   settings:");
    for (k, v) in &settings_list {
        println!("     {k} = {v}");
    }
    let path = format!("bench/out/debezium-check-{id}.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::Value::Object(report))?,
    )?;
    println!("== report: {path} (per event: {csv_path})");
    Ok(())
}

/// Writes, reads, counts; the JVM's CPU over the writes and the drain, and its memory.
async fn measure(
    o: &Opts,
    db: &str,
    topic: &str,
    n: usize,
    pid: u32,
    csv_path: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let stop = Arc::new(AtomicBool::new(false));
    let warmup = usize::try_from(o.warmup)?;
    let total = n + warmup;
    let (arrivals, reader) = start_reader(topic, total, stop.clone())?;
    let commit: Arc<Vec<AtomicI64>> = Arc::new((0..total).map(|_| AtomicI64::new(0)).collect());
    let distinct = |seqs: std::ops::Range<usize>| {
        arrivals
            .lock()
            .map(|a| a.count[seqs].iter().filter(|&&c| c > 0).count())
            .unwrap_or(0)
    };
    if warmup > 0 {
        println!("== warm-up: {warmup} events at {}/s", o.rate);
        let t = Instant::now();
        write(
            &crate::pg_url(db),
            o,
            o.events..o.events + o.warmup,
            commit.clone(),
        )
        .await?;
        while distinct(n..total) < warmup && t.elapsed() < o.wait + Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "   {} of {warmup} visible after {:.1} s",
            distinct(n..total),
            t.elapsed().as_secs_f64()
        );
    }
    let (cpu0, _) = crate::proc_usage(pid).unwrap_or((f64::NAN, 0));
    println!(
        "== writing {} events at {}/s from {} writers",
        o.events, o.rate, o.writers
    );
    let load0 = loadavg();
    let t0 = Instant::now();
    write(&crate::pg_url(db), o, 0..o.events, commit.clone()).await?;
    let write_s = t0.elapsed().as_secs_f64();
    let drain = Instant::now();
    while distinct(0..n) < n && drain.elapsed() < o.wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain.elapsed().as_secs_f64();
    // A moment more, for duplicates that arrive after the last new event.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu1, _) = crate::proc_usage(pid).unwrap_or((f64::NAN, 0));
    let (rss_now, rss_peak) = rss(pid).unwrap_or((0, 0));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let a = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    let delivered = a.count[..n].iter().filter(|&&c| c > 0).count();
    let duplicated: u64 = a.count[..n]
        .iter()
        .map(|&c| u64::from(c.saturating_sub(1)))
        .sum();
    let latencies = |from: usize| {
        let mut lat: Vec<i64> = (from..n)
            .filter(|&i| a.count[i] > 0)
            .map(|i| a.first[i] - commit[i].load(Ordering::Relaxed))
            .collect();
        lat.sort_unstable();
        lat
    };
    let lat = latencies(0);
    // Per event, for plots and for looking into a run: seq, commit and first arrival (µs).
    let mut csv = String::from("seq,commit_us,first_arrival_us,count,record_ts_ms\n");
    for i in 0..n {
        let c = commit[i].load(Ordering::Relaxed);
        csv.push_str(&format!(
            "{i},{c},{},{},{}\n",
            a.first[i], a.count[i], a.record_ts_ms[i]
        ));
    }
    std::fs::write(csv_path, csv)?;
    // The second half alone: the JVM's JIT warms up during the first seconds of a run.
    let late = latencies(n / 2);
    let (late50, late99) = (
        crate::percentile(&late, 0.5),
        crate::percentile(&late, 0.99),
    );
    let mean = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().map(|&v| v as f64).sum::<f64>() / lat.len() as f64 / 1000.0
    };
    let (p50, p99, max) = (
        crate::percentile(&lat, 0.5),
        crate::percentile(&lat, 0.99),
        crate::percentile(&lat, 1.0),
    );
    let cpu = cpu1 - cpu0;
    println!(
        "   written {n} in {write_s:.1} s; delivered {delivered}, lost {}, duplicated {duplicated}, \
         foreign {} (drained {drain_s:.2} s after the last commit)",
        n - delivered,
        a.foreign
    );
    println!(
        "   commit -> visible (read_committed): mean {mean:.1} ms, p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
    let load1 = loadavg();
    println!("   machine load average (1 min) before / after the writes: {load0:.1} / {load1:.1} (2 cores)");
    println!("   second half of the events only: p50 {late50:.1} ms, p99 {late99:.1} ms");
    println!(
        "   Connect JVM: {cpu:.2} CPU s over writes + drain ({:.2} s per 100,000 events), RSS {:.0} MB, peak {:.0} MB",
        cpu / delivered.max(1) as f64 * 100_000.0,
        rss_now as f64 / 1e6,
        rss_peak as f64 / 1e6
    );
    let mut report = serde_json::Map::new();
    for (k, v) in [
        ("exactly_once", serde_json::json!(o.exactly_once)),
        ("poll_interval_ms", serde_json::json!(o.poll_interval_ms)),
        ("events", serde_json::json!(n)),
        ("warmup_events", serde_json::json!(warmup)),
        ("rate", serde_json::json!(o.rate)),
        ("writers", serde_json::json!(o.writers)),
        ("delivered", serde_json::json!(delivered)),
        ("lost", serde_json::json!(n - delivered)),
        ("duplicated", serde_json::json!(duplicated)),
        ("foreign", serde_json::json!(a.foreign)),
        ("drain_s", serde_json::json!(drain_s)),
        ("latency_mean_ms", serde_json::json!(mean)),
        ("latency_p50_ms", serde_json::json!(p50)),
        ("latency_p99_ms", serde_json::json!(p99)),
        ("latency_max_ms", serde_json::json!(max)),
        ("second_half_p50_ms", serde_json::json!(late50)),
        ("second_half_p99_ms", serde_json::json!(late99)),
        ("loadavg_before", serde_json::json!(load0)),
        ("loadavg_after", serde_json::json!(load1)),
        ("jvm_cpu_s_writes_and_drain", serde_json::json!(cpu)),
        ("jvm_rss_bytes", serde_json::json!(rss_now)),
        ("jvm_peak_rss_bytes", serde_json::json!(rss_peak)),
    ] {
        report.insert(k.to_owned(), v);
    }
    Ok(report)
}
