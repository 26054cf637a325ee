//! `consumers`: runs one downstream, the fake payment gateway, or the DLQ tool.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use consumers::downstream::{
    AccountMode, Accounts, Downstream, FraudAudit, Inventory, Loyalty, Notification, Payment,
    Recommendations, Warehouse,
};
use consumers::fault::Faults;
use consumers::gateway::client::GatewayClient;
use consumers::gateway::GatewayFaults;
use consumers::{dlq, Defences, Handler, Metrics, RetryPolicy, Runtime, RuntimeConfig};
use relay::shutdown::Shutdown;

#[derive(Parser)]
#[command(
    name = "consumers",
    version,
    about = "Idempotent downstream consumers of the outbox events"
)]
struct Cli {
    /// Log level (an EnvFilter directive); RUST_LOG overrides it.
    #[arg(long, env = "CONSUMER_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one downstream consumer until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Run the fake payment gateway.
    Gateway(GatewayArgs),
    /// Inspect and redrive a DLQ topic.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Apply the project's migrations (the same as `relay migrate`).
    Migrate {
        // The URL may hold a password: --help must not print the variable's value.
        #[arg(long, env = "CONSUMER_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Which downstream.
    #[arg(value_enum)]
    downstream: Downstream,
    #[arg(long, env = "CONSUMER_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    // The URL may hold a password: --help must not print the variable's value.
    #[arg(long, env = "CONSUMER_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Topics to consume (default: the downstream's topic under the relay's default template).
    #[arg(long, env = "CONSUMER_TOPICS", value_delimiter = ',')]
    topics: Vec<String>,
    /// Consumer group and dedup namespace (default: the downstream's name).
    #[arg(long, env = "CONSUMER_GROUP")]
    group: Option<String>,
    /// DLQ topic (default: <group>.dlq).
    #[arg(long, env = "CONSUMER_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// group.instance.id (static membership: a restart takes the partitions back at once).
    #[arg(long, env = "CONSUMER_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Switch every defence off (dedup, version guard, offsets after the effect, retry budget
    /// and DLQ, and the payment idempotency key). For drills only.
    #[arg(long, env = "CONSUMER_NAIVE")]
    naive: bool,
    /// Attempts per record before the DLQ.
    #[arg(long, env = "CONSUMER_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    #[arg(long, env = "CONSUMER_INITIAL_BACKOFF_MS", default_value_t = 100)]
    initial_backoff_ms: u64,
    #[arg(long, env = "CONSUMER_MAX_BACKOFF_MS", default_value_t = 10_000)]
    max_backoff_ms: u64,
    #[arg(long, env = "CONSUMER_COMMIT_INTERVAL_MS", default_value_t = 200)]
    commit_interval_ms: u64,
    /// Where to serve GET /metrics (none when unset).
    #[arg(long, env = "CONSUMER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Payment: the gateway's URL.
    #[arg(
        long,
        env = "CONSUMER_GATEWAY_URL",
        default_value = "http://127.0.0.1:8089"
    )]
    gateway_url: String,
    /// Payment: the timeout of one gateway request.
    #[arg(long, env = "CONSUMER_GATEWAY_TIMEOUT_MS", default_value_t = 2_000)]
    gateway_timeout_ms: u64,
    /// Account: how events are applied.
    #[arg(
        long,
        env = "CONSUMER_ACCOUNT_MODE",
        value_enum,
        default_value = "last-write-wins"
    )]
    account_mode: AccountMode,
    /// Warehouse: records per batch (one transaction).
    #[arg(long, env = "CONSUMER_BATCH_MAX", default_value_t = 500)]
    batch_max: usize,
    /// Warehouse: how long a batch collects records.
    #[arg(long, env = "CONSUMER_BATCH_WINDOW_MS", default_value_t = 200)]
    batch_window_ms: u64,
}

#[derive(Args)]
struct GatewayArgs {
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Where the request log and ledger are kept (schema payment_gateway).
    #[arg(long, env = "GATEWAY_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "GATEWAY_LATENCY_MIN_MS", default_value_t = 0)]
    latency_min_ms: u64,
    #[arg(long, env = "GATEWAY_LATENCY_MAX_MS", default_value_t = 0)]
    latency_max_ms: u64,
    /// Probability of a 503 without charging.
    #[arg(long, env = "GATEWAY_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// Probability of charging and answering too late.
    #[arg(long, env = "GATEWAY_TIMEOUT_RATE", default_value_t = 0.0)]
    timeout_rate: f64,
    #[arg(long, env = "GATEWAY_TIMEOUT_DELAY_MS", default_value_t = 5_000)]
    timeout_delay_ms: u64,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per DLQ record: offset, event, error, attempts, origin.
    List(DlqArgs),
    /// Every header of one DLQ record (and its payload with --payload).
    Show {
        #[command(flatten)]
        dlq: DlqArgs,
        /// The DLQ record's offset.
        offset: i64,
        #[arg(long)]
        payload: bool,
    },
    /// Produce the selected records back to their original topics at a limited rate.
    Redrive {
        #[command(flatten)]
        dlq: DlqArgs,
        /// Only these DLQ offsets (repeatable; default all).
        #[arg(long = "offset")]
        offsets: Vec<i64>,
        /// Only these event ids (repeatable).
        #[arg(long = "event-id")]
        event_ids: Vec<String>,
        /// Only records dead-lettered by this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Records per second (token bucket).
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
}

#[derive(Args)]
struct DlqArgs {
    #[arg(long, env = "CONSUMER_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// The DLQ topic, e.g. payment.dlq.
    #[arg(long, env = "CONSUMER_DLQ_TOPIC")]
    topic: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    relay::telemetry::init(relay::config::LogFormat::Pretty, &cli.log)?;
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Gateway(args) => gateway(args).await,
        Command::Dlq { command } => dlq_command(command).await,
        Command::Migrate { database_url } => {
            let n = relay::migrate::run(&database_url).await?;
            println!("applied {n} migration(s)");
            Ok(())
        }
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let group = a
        .group
        .clone()
        .unwrap_or_else(|| a.downstream.name().to_owned());
    let topics = if a.topics.is_empty() {
        vec![a.downstream.default_topic().to_owned()]
    } else {
        a.topics.clone()
    };
    let mut cfg = RuntimeConfig::new(&group, &a.bootstrap, topics, &a.database_url);
    if let Some(t) = &a.dlq_topic {
        cfg.dlq_topic = t.clone();
    }
    cfg.instance_id = a.instance_id.clone();
    cfg.defences = if a.naive {
        Defences::naive()
    } else {
        Defences::hardened()
    };
    cfg.retry = RetryPolicy {
        max_attempts: a.max_attempts.max(1),
        initial_backoff: Duration::from_millis(a.initial_backoff_ms),
        max_backoff: Duration::from_millis(a.max_backoff_ms),
    };
    cfg.commit_interval = Duration::from_millis(a.commit_interval_ms);
    cfg.faults = Faults::from_env()?;
    if cfg.faults.enabled() {
        tracing::warn!("fault points are enabled: this process will abort itself (drill)");
    }
    let metrics = Metrics::new(&group);
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    if let Some(addr) = a.metrics_listen {
        serve_metrics(addr, metrics.clone(), shutdown.clone()).await?;
    }
    match a.downstream {
        Downstream::Payment => {
            let h = Payment {
                gateway: GatewayClient::new(
                    &a.gateway_url,
                    Duration::from_millis(a.gateway_timeout_ms),
                ),
                idempotency_keys: !a.naive,
            };
            go(cfg, h, metrics, shutdown).await
        }
        Downstream::Inventory => go(cfg, Inventory, metrics, shutdown).await,
        Downstream::Notification => go(cfg, Notification, metrics, shutdown).await,
        Downstream::Loyalty => go(cfg, Loyalty, metrics, shutdown).await,
        Downstream::Recommendations => go(cfg, Recommendations, metrics, shutdown).await,
        Downstream::Warehouse => {
            cfg.batch_max_records = a.batch_max.max(1);
            cfg.batch_window = Duration::from_millis(a.batch_window_ms);
            go(cfg, Warehouse, metrics, shutdown).await
        }
        Downstream::FraudAudit => {
            go(
                cfg,
                FraudAudit {
                    flag_above_cents: 1_000_000,
                },
                metrics,
                shutdown,
            )
            .await
        }
        Downstream::Account => {
            go(
                cfg,
                Accounts {
                    mode: a.account_mode,
                },
                metrics,
                shutdown,
            )
            .await
        }
    }
}

async fn go<H: Handler>(
    cfg: RuntimeConfig,
    handler: H,
    metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    Runtime::new(cfg, handler, metrics)
        .run(shutdown)
        .await
        .context("consumer runtime")
}

async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .await;
    });
    Ok(())
}

async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals()?;
    let faults = GatewayFaults {
        latency_ms: (a.latency_min_ms, a.latency_max_ms),
        fail_rate: a.fail_rate,
        timeout_rate: a.timeout_rate,
        timeout_delay: Duration::from_millis(a.timeout_delay_ms),
    };
    consumers::gateway::run(a.listen, &a.database_url, faults, shutdown)
        .await
        .context("payment gateway")
}

fn epoch_seconds(ms: i64) -> String {
    // Seconds since the epoch, to the millisecond: exact and unambiguous without a date library.
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

async fn dlq_command(c: DlqCommand) -> anyhow::Result<()> {
    match c {
        DlqCommand::List(d) => {
            let entries = dlq::list(&d.bootstrap, &d.topic).await?;
            println!("offset\tevent_id\tevent_type\tconsumer\terror\tattempts\torigin\tlast_failure_epoch_s");
            for e in &entries {
                println!(
                    "{}\t{}\t{}\t{}\t{}/{}\t{}\t{}/{}/{}\t{}",
                    e.record.offset,
                    e.event_id(),
                    e.record.event_type(),
                    e.consumer,
                    e.error_class,
                    e.error_kind,
                    e.attempts,
                    e.original_topic,
                    e.original_partition,
                    e.original_offset,
                    epoch_seconds(e.last_failure_ms)
                );
            }
            eprintln!("{} record(s)", entries.len());
            Ok(())
        }
        DlqCommand::Show {
            dlq: d,
            offset,
            payload,
        } => {
            let entries = dlq::list(&d.bootstrap, &d.topic).await?;
            let e = entries
                .iter()
                .find(|e| e.record.offset == offset)
                .with_context(|| format!("no record at offset {offset} in {}", d.topic))?;
            println!(
                "dlq: {}/{}/{}",
                d.topic, e.record.partition, e.record.offset
            );
            println!("key: {}", e.record.key_str().unwrap_or("<not UTF-8>"));
            for (k, v) in &e.record.headers {
                println!("{k}: {}", String::from_utf8_lossy(v));
            }
            let size = e.record.payload.as_ref().map_or(0, Vec::len);
            println!("payload: {size} bytes");
            if payload {
                println!(
                    "{}",
                    String::from_utf8_lossy(e.record.payload.as_deref().unwrap_or_default())
                );
            }
            Ok(())
        }
        DlqCommand::Redrive {
            dlq: d,
            offsets,
            event_ids,
            consumer,
            rate,
        } => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let sel = dlq::Selection {
                offsets,
                event_ids,
                consumer,
            };
            let done = dlq::redrive(&d.bootstrap, &d.topic, &sel, rate).await?;
            for r in &done {
                println!(
                    "redriven dlq offset {} event {} -> {}/{}/{}",
                    r.dlq_offset, r.event_id, r.topic, r.partition, r.offset
                );
            }
            println!("{} record(s) redriven", done.len());
            Ok(())
        }
    }
}
