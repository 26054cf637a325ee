//! The report of `relay-bench ab`: per contender and rate, the phases of all rounds pooled
//! (latency percentiles over every event, costs averaged per phase), beside the `none` baseline;
//! rendered as JSON, Markdown and a table on stdout (`mod.rs` writes the files and has `plot.rs`
//! draw the SVGs, so that this module does not import its plots).

use super::{Kind, Opts, Phase};
use crate::support::{histogram_quantile, percentile};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The machine the run was measured on, and what else was running when it started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_mb: u64,
    pub kernel: String,
    pub loadavg_at_start: String,
    /// `ps` at the start: the busiest processes (other agents' builds and stacks show here).
    pub top_processes_at_start: Vec<String>,
}

pub fn machine_info() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mem_total_mb = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    let top = std::process::Command::new("ps")
        .args(["-eo", "pcpu,rss,comm", "--sort=-pcpu"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(12)
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_total_mb,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        loadavg_at_start: read("/proc/loadavg").trim().to_owned(),
        top_processes_at_start: top,
    }
}

/// The stages of `relay_stage_seconds` (contract item 5), p50 and p99 in ms; empty when the
/// relay does not export the histogram.
pub fn stage_quantiles(metrics: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    for stage in [
        "received",
        "batch_closed",
        "produced",
        "delivered",
        "committed",
    ] {
        let l = format!("stage=\"{stage}\"");
        let q = |q| histogram_quantile(metrics, "relay_stage_seconds", &[&l], q);
        if let (Some(a), Some(b)) = (q(0.5), q(0.99)) {
            out.insert(stage.to_owned(), (a * 1000.0, b * 1000.0));
        }
    }
    out
}

/// Kafka transactions the relay committed, and one commit's p50 and p99 in ms, from its /metrics.
pub fn kafka_transactions(metrics: &str) -> (Option<f64>, Option<(f64, f64)>) {
    let committed = metrics
        .lines()
        .filter(|l| {
            l.starts_with("relay_kafka_transactions_total{") && l.contains("outcome=\"committed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b);
    let q = |q| histogram_quantile(metrics, "relay_kafka_commit_seconds", &[], q);
    let commit = match (q(0.5), q(0.99)) {
        (Some(a), Some(b)) => Some((a * 1000.0, b * 1000.0)),
        _ => None,
    };
    (committed, commit)
}

/// One line per finished phase, above the progress bar.
pub fn phase_line(p: &Phase) -> String {
    let rate = if p.target_rate == 0 {
        "max".to_owned()
    } else {
        p.target_rate.to_string()
    };
    let mut s = format!(
        "{:<8} {:<10} {:>6}/s r{}: wrote {} ({:.0}/s, commit p99 {:.1} ms)",
        format!("{:?}", p.kind.unwrap_or(Kind::Fixed)).to_lowercase(),
        p.contender,
        rate,
        p.round,
        p.written,
        p.offered_per_s,
        p.commit_p99_ms
    );
    if p.contender != "none" {
        let _ = write!(
            s,
            ", delivered {} lost {} dup {}, p50 {:.1} p99 {:.1} ms, db cpu {:.2} s, relay cpu {:.2} s",
            p.delivered,
            p.lost,
            p.duplicated,
            p.latency_p50_ms,
            p.latency_p99_ms,
            p.db_backend_cpu_s,
            p.relay_cpu_s
        );
    }
    if let Some(v) = &p.variant {
        let _ = write!(s, " [poll.interval={v}]");
    }
    s
}

/// Where the ceiling search stopped for one contender.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub contender: String,
    /// The highest rate at which it kept up (None: not even the first step).
    pub highest_kept_up: Option<u32>,
    pub stopped: String,
    /// Events/s the writers commit unthrottled with no relay attached.
    pub postgres_alone_per_s: f64,
}

/// Phases of one contender at one rate (and variant), pooled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub contender: String,
    pub variant: Option<String>,
    pub rate: u32,
    pub phases: usize,
    pub written: u64,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub drained: bool,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    /// Mean per phase: the serving backend's CPU as % of one core.
    pub db_backend_cpu_pct: f64,
    pub db_backend_cpu_s_per_100k: f64,
    /// Every backend of the contender, % of one core.
    pub db_backends_cpu_pct: f64,
    pub relay_cpu_pct: f64,
    pub relay_cpu_s_per_100k: f64,
    pub relay_peak_rss_mb: f64,
    pub broker_cpu_pct: f64,
    pub broker_cpu_s_per_100k: f64,
    /// The whole machine, % of all cores.
    pub machine_busy_pct: f64,
    pub wal_bytes_per_event: f64,
    pub tuples_read_per_event: f64,
    pub table_end_mb: f64,
    pub index_end_mb: f64,
    pub dead_tuples_end: i64,
    pub poll_calls_per_s: Option<f64>,
    pub poll_exec_ms_per_s: Option<f64>,
    pub poll_blks_hit: Option<i64>,
    pub poll_blks_read: Option<i64>,
    pub stages: BTreeMap<String, (f64, f64)>,
    /// Events per committed Kafka transaction.
    pub events_per_kafka_tx: Option<f64>,
    /// One Kafka commit, p50 / p99 ms, averaged over the phases.
    pub kafka_commit_p50_ms: Option<f64>,
    pub kafka_commit_p99_ms: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn pool(ps: &[&Phase]) -> Row {
    let first = ps[0];
    let mut lat: Vec<i64> = ps
        .iter()
        .flat_map(|p| p.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut cl: Vec<i64> = ps
        .iter()
        .flat_map(|p| p.commit_latencies_us.iter().copied())
        .collect();
    cl.sort_unstable();
    let written: u64 = ps.iter().map(|p| p.written).sum();
    let per_100k = |f: &dyn Fn(&Phase) -> f64| {
        ps.iter().map(|p| f(p)).sum::<f64>() / (written.max(1) as f64) * 100_000.0
    };
    let pct =
        |f: &dyn Fn(&Phase) -> f64| mean(ps.iter().map(|p| f(p) / p.phase_s.max(1e-9) * 100.0));
    let pq = |f: &dyn Fn(&super::pgstats::PollQuery) -> f64| {
        first.poll_query.as_ref()?;
        Some(mean(ps.iter().filter_map(|p| {
            p.poll_query.as_ref().map(|q| f(q) / p.phase_s.max(1e-9))
        })))
    };
    Row {
        contender: first.contender.clone(),
        variant: first.variant.clone(),
        rate: first.target_rate,
        phases: ps.len(),
        written,
        offered_per_s: mean(ps.iter().map(|p| p.offered_per_s)),
        achieved_per_s: mean(ps.iter().map(|p| p.achieved_per_s)),
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p90_ms: percentile(&lat, 0.9),
        latency_p99_ms: percentile(&lat, 0.99),
        latency_max_ms: percentile(&lat, 1.0),
        lost: ps.iter().map(|p| p.lost).sum(),
        duplicated: ps.iter().map(|p| p.duplicated).sum(),
        drained: ps.iter().all(|p| p.drained),
        commit_p50_ms: percentile(&cl, 0.5),
        commit_p99_ms: percentile(&cl, 0.99),
        db_backend_cpu_pct: pct(&|p| p.db_backend_cpu_s),
        db_backend_cpu_s_per_100k: per_100k(&|p| p.db_backend_cpu_s),
        db_backends_cpu_pct: pct(&|p| p.db_backends_cpu_s),
        relay_cpu_pct: pct(&|p| p.relay_cpu_s),
        relay_cpu_s_per_100k: per_100k(&|p| p.relay_cpu_s),
        relay_peak_rss_mb: ps
            .iter()
            .map(|p| p.relay_peak_rss_bytes as f64 / 1e6)
            .fold(0.0, f64::max),
        broker_cpu_pct: pct(&|p| p.broker_cpu_s),
        broker_cpu_s_per_100k: per_100k(&|p| p.broker_cpu_s),
        machine_busy_pct: mean(
            ps.iter()
                .map(|p| p.machine_busy_s / p.machine_total_s.max(1e-9) * 100.0),
        ),
        wal_bytes_per_event: ps.iter().map(|p| p.wal_bytes as f64).sum::<f64>()
            / written.max(1) as f64,
        tuples_read_per_event: ps.iter().map(|p| p.tuples_read as f64).sum::<f64>()
            / written.max(1) as f64,
        table_end_mb: mean(ps.iter().map(|p| p.table_end.table_bytes as f64 / 1e6)),
        index_end_mb: mean(ps.iter().map(|p| p.table_end.index_bytes as f64 / 1e6)),
        dead_tuples_end: ps.iter().map(|p| p.table_end.n_dead_tup).max().unwrap_or(0),
        poll_calls_per_s: pq(&|q| q.calls as f64),
        poll_exec_ms_per_s: pq(&|q| q.total_ms),
        poll_blks_hit: first.poll_query.as_ref().map(|_| {
            ps.iter()
                .filter_map(|p| p.poll_query.as_ref())
                .map(|q| q.shared_blks_hit)
                .sum()
        }),
        poll_blks_read: first.poll_query.as_ref().map(|_| {
            ps.iter()
                .filter_map(|p| p.poll_query.as_ref())
                .map(|q| q.shared_blks_read)
                .sum()
        }),
        stages: ps.last().map(|p| p.stages.clone()).unwrap_or_default(),
        events_per_kafka_tx: {
            let txs: f64 = ps.iter().filter_map(|p| p.kafka_transactions).sum();
            (txs > 0.0).then(|| written as f64 / txs)
        },
        kafka_commit_p50_ms: first
            .kafka_commit_ms
            .map(|_| mean(ps.iter().filter_map(|p| p.kafka_commit_ms).map(|k| k.0))),
        kafka_commit_p99_ms: first
            .kafka_commit_ms
            .map(|_| mean(ps.iter().filter_map(|p| p.kafka_commit_ms).map(|k| k.1))),
    }
}

/// CDC/poll at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub rate: u32,
    pub p99_cdc_over_poll: f64,
    pub db_cpu_cdc_over_poll: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_unix_us: i64,
    pub machine: Machine,
    pub options: BTreeMap<String, String>,
    /// Per contender: the settings it ran with beyond the binary's defaults.
    pub contender_settings: BTreeMap<String, Vec<(String, String)>>,
    /// Fixed-rate phases, one row per contender and rate.
    pub rows: Vec<Row>,
    /// The `none` phases (writers only) per rate.
    pub baseline: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub sweep: Vec<Row>,
    pub ceilings: Vec<Ceiling>,
    pub phases: Vec<Phase>,
}

fn grouped(phases: &[Phase], kind: Kind) -> Vec<Row> {
    let mut groups: BTreeMap<(String, u32, Option<String>), Vec<&Phase>> = BTreeMap::new();
    let mut order = Vec::new();
    for p in phases.iter().filter(|p| p.kind == Some(kind)) {
        let k = (p.contender.clone(), p.target_rate, p.variant.clone());
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(p);
    }
    order.iter().map(|k| pool(&groups[k])).collect()
}

impl Report {
    pub fn build(
        o: &Opts,
        machine: super::report::Machine,
        started: i64,
        phases: Vec<Phase>,
        ceilings: Vec<Ceiling>,
    ) -> Report {
        let all = grouped(&phases, Kind::Fixed);
        let (baseline, mut rows): (Vec<Row>, Vec<Row>) =
            all.into_iter().partition(|r| r.contender == "none");
        rows.sort_by(|a, b| (&a.contender, a.rate).cmp(&(&b.contender, b.rate)));
        let mut sweep = grouped(&phases, Kind::Sweep);
        sweep.extend(grouped(&phases, Kind::Ceiling));
        let ratios = o
            .rates
            .iter()
            .filter_map(|&rate| {
                let f = |c: &str| rows.iter().find(|r| r.contender == c && r.rate == rate);
                let (c, p) = (f("cdc")?, f("poll")?);
                Some(Ratio {
                    rate,
                    p99_cdc_over_poll: c.latency_p99_ms / p.latency_p99_ms,
                    db_cpu_cdc_over_poll: c.db_backend_cpu_pct / p.db_backend_cpu_pct,
                })
            })
            .collect();
        let mut contender_settings = BTreeMap::new();
        for p in phases
            .iter()
            .filter(|p| p.contender != "none" && p.kind == Some(Kind::Fixed))
        {
            contender_settings
                .entry(p.contender.clone())
                .or_insert_with(|| p.settings.clone());
        }
        let mut options = BTreeMap::new();
        for (k, v) in [
            (
                "contenders",
                o.contenders
                    .iter()
                    .map(|c| c.label())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "rates",
                o.rates
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("duration", format!("{:?}", o.duration)),
            ("rounds", o.rounds.to_string()),
            ("rows_per_tx", o.rows_per_tx.to_string()),
            ("payload_bytes", o.payload_bytes.to_string()),
            ("keys", o.keys.to_string()),
            ("writers", o.writers.to_string()),
            ("relay_bin", o.relay_bin.display().to_string()),
            ("drain_timeout", format!("{:?}", o.drain_timeout)),
            ("ceiling", o.ceiling.to_string()),
            ("sweep_poll_interval", o.sweep_poll_interval.join(",")),
        ] {
            options.insert(k.to_owned(), v);
        }
        Report {
            started_unix_us: started,
            machine,
            options,
            contender_settings,
            rows,
            baseline,
            ratios,
            sweep,
            ceilings,
            phases,
        }
    }

    /// The Markdown report, with links to the plots written beside it (`(title, file)`).
    pub fn markdown(&self, plots: &[(&str, &str)]) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "# relay-bench ab\n");
        let opts: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(m, "Options: `{}`\n", opts.join(" "));
        let _ = writeln!(
            m,
            "## Latency and delivery (commit returned → visible under read_committed)\n"
        );
        m.push_str(&self.latency_table());
        let _ = writeln!(m, "\n## Cost\n");
        let _ = writeln!(m, "CPU as % of one core, averaged over each phase (writers' start to the end of the drain). \
            DB backend: the walsender (cdc) or the polling session (poll); all backends adds the relay's other sessions (slot watcher). \
            Writers' commit latency beside the same rate with no relay attached (`none`).\n");
        let _ = writeln!(m, "| contender | rate/s | DB backend CPU % | DB CPU s/100k | all backends % | relay CPU % | relay CPU s/100k | relay RSS MB | broker CPU % | broker s/100k | machine busy % | commit p50/p99 ms | none p50/p99 ms |");
        let _ = writeln!(
            m,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.rows {
            let b = self.baseline.iter().find(|b| b.rate == r.rate);
            let _ = writeln!(
                m,
                "| {} | {} | {:.2} | {:.3} | {:.2} | {:.1} | {:.2} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} / {:.2} | {} |",
                r.contender, r.rate, r.db_backend_cpu_pct, r.db_backend_cpu_s_per_100k, r.db_backends_cpu_pct,
                r.relay_cpu_pct, r.relay_cpu_s_per_100k, r.relay_peak_rss_mb, r.broker_cpu_pct, r.broker_cpu_s_per_100k,
                r.machine_busy_pct, r.commit_p50_ms, r.commit_p99_ms,
                b.map_or("-".into(), |b| format!("{:.2} / {:.2}", b.commit_p50_ms, b.commit_p99_ms)),
            );
        }
        if self.rows.iter().any(|r| r.events_per_kafka_tx.is_some()) {
            let _ = writeln!(m, "\n## The relay's Kafka transactions\n");
            let _ = writeln!(m, "From the relay's /metrics: `relay_kafka_transactions_total` (committed) and `relay_kafka_commit_seconds` (interpolated in its buckets).\n");
            let _ = writeln!(m, "| contender | rate/s | events per Kafka transaction | one Kafka commit p50 / p99 ms |\n|---|---:|---:|---:|");
            for r in &self.rows {
                let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} / {} |",
                    r.contender,
                    r.rate,
                    o(r.events_per_kafka_tx),
                    o(r.kafka_commit_p50_ms),
                    o(r.kafka_commit_p99_ms)
                );
            }
        }
        let _ = writeln!(m, "\n## Database side\n");
        let _ = writeln!(m, "WAL per event over the phase (everything Postgres wrote), and what the relay adds beyond the `none` phase at the same rate. \
            Tuples read: seq_tup_read + idx_tup_fetch on the outbox. Size and dead tuples at the end of a phase (each phase starts from an emptied table).\n");
        let _ = writeln!(m, "| contender | rate/s | WAL B/event | relay's extra WAL B/event | tuples read/event | poll calls/s | poll exec ms/s | poll blks hit / read | table MB | index MB | dead tuples |");
        let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in self.rows.iter().chain(&self.baseline) {
            let b = self.baseline.iter().find(|b| b.rate == r.rate);
            let extra = b.map_or("-".into(), |b| {
                format!("{:.0}", r.wal_bytes_per_event - b.wal_bytes_per_event)
            });
            let o = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            let blks = match (r.poll_blks_hit, r.poll_blks_read) {
                (Some(h), Some(rd)) => format!("{h} / {rd}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                m,
                "| {} | {} | {:.0} | {} | {:.2} | {} | {} | {} | {:.1} | {:.1} | {} |",
                r.contender,
                r.rate,
                r.wal_bytes_per_event,
                if r.contender == "none" {
                    "-".into()
                } else {
                    extra
                },
                r.tuples_read_per_event,
                o(r.poll_calls_per_s),
                o(r.poll_exec_ms_per_s),
                blks,
                r.table_end_mb,
                r.index_end_mb,
                r.dead_tuples_end,
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(m, "\n## CDC / poll\n");
            let _ = writeln!(
                m,
                "| rate/s | p99 latency cdc/poll | DB backend CPU cdc/poll |"
            );
            let _ = writeln!(m, "|---:|---:|---:|");
            for r in &self.ratios {
                let _ = writeln!(
                    m,
                    "| {} | {:.2} | {:.2} |",
                    r.rate, r.p99_cdc_over_poll, r.db_cpu_cdc_over_poll
                );
            }
        }
        let stages: Vec<&Row> = self.rows.iter().filter(|r| !r.stages.is_empty()).collect();
        if !stages.is_empty() {
            let _ = writeln!(
                m,
                "\n## Relay stages (relay_stage_seconds, p50 / p99 ms, last phase of each row)\n"
            );
            let _ = writeln!(
                m,
                "| contender | rate/s | stage | p50 | p99 |\n|---|---:|---|---:|---:|"
            );
            for r in stages {
                for (s, (a, b)) in &r.stages {
                    let _ = writeln!(
                        m,
                        "| {} | {} | {s} | {a:.1} | {b:.1} |",
                        r.contender, r.rate
                    );
                }
            }
        }
        let sweep: Vec<&Row> = self.sweep.iter().filter(|r| r.variant.is_some()).collect();
        if !sweep.is_empty() {
            let _ = writeln!(m, "\n## poll.interval sweep\n");
            let _ = writeln!(m, "| poll.interval | rate/s | p50 ms | p99 ms | DB backend CPU % | poll calls/s | lost | dup |\n|---|---:|---:|---:|---:|---:|---:|---:|");
            for r in sweep {
                let _ = writeln!(
                    m,
                    "| {} | {} | {:.1} | {:.1} | {:.2} | {} | {} | {} |",
                    r.variant.as_deref().unwrap_or(""),
                    r.rate,
                    r.latency_p50_ms,
                    r.latency_p99_ms,
                    r.db_backend_cpu_pct,
                    r.poll_calls_per_s.map_or("-".into(), |v| format!("{v:.0}")),
                    r.lost,
                    r.duplicated
                );
            }
        }
        if !self.ceilings.is_empty() {
            let _ = writeln!(m, "\n## Ceiling\n");
            let _ = writeln!(m, "| contender | highest rate kept up (events/s) | stopped because | Postgres alone (events/s, no relay) |\n|---|---:|---|---:|");
            for c in &self.ceilings {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {:.0} |",
                    c.contender,
                    c.highest_kept_up.map_or("-".into(), |r| r.to_string()),
                    c.stopped,
                    c.postgres_alone_per_s
                );
            }
            let steps: Vec<&Row> = self.sweep.iter().filter(|r| r.variant.is_none()).collect();
            if !steps.is_empty() {
                let _ = writeln!(m, "\n| contender | step rate/s | offered/s | achieved/s | p99 ms | lost (not drained within the bound) |\n|---|---:|---:|---:|---:|---:|");
                for r in steps {
                    let _ = writeln!(
                        m,
                        "| {} | {} | {:.0} | {:.0} | {:.1} | {} |",
                        r.contender,
                        r.rate,
                        r.offered_per_s,
                        r.achieved_per_s,
                        r.latency_p99_ms,
                        r.lost
                    );
                }
            }
        }
        for (title, file) in plots {
            let _ = writeln!(m, "\n## {title}\n\n![{title}]({file})");
        }
        let _ = writeln!(m, "\n## Settings\n");
        for (c, s) in &self.contender_settings {
            let s: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                m,
                "- `{c}`: {}",
                if s.is_empty() {
                    "the relay's defaults (besides its own namespace, transactional id and, for cdc, a fresh slot)".to_owned()
                } else {
                    format!("`{}`, otherwise defaults", s.join(" "))
                }
            );
        }
        let mc = &self.machine;
        let _ = writeln!(m, "\n## Machine\n");
        let _ = writeln!(
            m,
            "{} CPUs ({}), {} MB RAM, Linux {}; load average at the start: {}. \
            Postgres, Kafka, the relay, the writers and the reader share these cores.\n",
            mc.cpus, mc.cpu_model, mc.mem_total_mb, mc.kernel, mc.loadavg_at_start
        );
        let _ = writeln!(
            m,
            "Busiest processes at the start (`ps -eo pcpu,rss,comm --sort=-pcpu`):\n\n```"
        );
        for l in &mc.top_processes_at_start {
            let _ = writeln!(m, "{l}");
        }
        let _ = writeln!(m, "```");
        m
    }

    fn latency_table(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "| contender | rate/s | phases | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | max ms | lost | dup |");
        let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                r.contender,
                r.rate,
                r.phases,
                r.offered_per_s,
                r.achieved_per_s,
                r.latency_p50_ms,
                r.latency_p90_ms,
                r.latency_p99_ms,
                r.latency_max_ms,
                r.lost,
                r.duplicated
            );
        }
        m
    }

    /// The summary printed at the end of a run.
    pub fn stdout_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<10} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>5} {:>4} {:>7} {:>7} {:>13}",
            "contender",
            "rate",
            "offered",
            "achieved",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "dup",
            "DB cpu%",
            "relay%",
            "commit p99"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<10} {:>6} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>5} {:>4} {:>7.2} {:>7.1} {:>10.2} ms",
                r.contender, r.rate, r.offered_per_s, r.achieved_per_s, r.latency_p50_ms, r.latency_p99_ms,
                r.latency_max_ms, r.lost, r.duplicated, r.db_backend_cpu_pct, r.relay_cpu_pct, r.commit_p99_ms
            );
        }
        for b in &self.baseline {
            let _ = writeln!(
                s,
                "{:<10} {:>6} {:>9.0} {:>67} {:>10.2} ms",
                "none", b.rate, b.offered_per_s, "", b.commit_p99_ms
            );
        }
        for r in &self.ratios {
            let _ = writeln!(
                s,
                "cdc/poll at {}/s: p99 x{:.2}, DB backend CPU x{:.2}",
                r.rate, r.p99_cdc_over_poll, r.db_cpu_cdc_over_poll
            );
        }
        for c in &self.ceilings {
            let _ = writeln!(
                s,
                "ceiling {}: kept up to {} ({}); Postgres alone {:.0}/s",
                c.contender,
                c.highest_kept_up.map_or("-".into(), |r| format!("{r}/s")),
                c.stopped,
                c.postgres_alone_per_s
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_quantiles_come_from_the_stage_histogram() {
        let m = "\
# TYPE relay_stage_seconds histogram
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"received\",le=\"0.01\"} 50
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"received\",le=\"0.1\"} 100
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"received\",le=\"+Inf\"} 100
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"committed\",le=\"0.1\"} 0
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"committed\",le=\"1\"} 10
relay_stage_seconds_bucket{relay=\"cdc\",stage=\"committed\",le=\"+Inf\"} 10
relay_stage_seconds_sum{relay=\"cdc\",stage=\"received\"} 1
";
        let q = stage_quantiles(m);
        let (p50, p99) = q["received"];
        assert!((p50 - 10.0).abs() < 1e-6, "{p50}");
        assert!(p99 > 10.0 && p99 <= 100.0, "{p99}");
        assert!(q["committed"].0 > 100.0, "{q:?}");
        assert!(!q.contains_key("produced"));
        assert!(stage_quantiles("garbage {{{ le=\"x\"").is_empty());
    }
}
