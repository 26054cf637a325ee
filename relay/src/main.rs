//! `relay`: the daemon's entry point. Thin: the library does the work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay::config::{RelayConfig, RelayKind};
use relay::health::Health;
use relay::metrics::Metrics;
use relay::shutdown::Shutdown;
use std::time::Duration;

/// Exit code of `check-config` for an invalid configuration (the scheme is in `relay::exit`).
const EXIT_INVALID_CONFIG: u8 = relay::exit::Exit::InvalidConfig.code();

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "Transactional-outbox relay: PostgreSQL to Kafka, exactly once",
    long_about = "Transactional-outbox relay: PostgreSQL to Kafka, exactly once.\n\n\
        Configuration comes from an optional file (--config) and RELAY_* environment variables, \
        which win: RELAY_ + the dotted key in upper case with __ between levels, e.g. \
        RELAY_KAFKA__BOOTSTRAP_SERVERS=broker:9092. See deploy/relay.example.toml for every key."
)]
struct Cli {
    /// Configuration file, TOML (.toml) or YAML (.yaml, .yml). Optional: the environment alone
    /// may configure everything.
    #[arg(long, global = true, env = "RELAY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CDC relay: stream the outbox from a logical replication slot into Kafka,
    /// exactly once (Kafka transactions carrying the checkpoint; the slot is confirmed only
    /// after the Kafka commit).
    ///
    /// Runs until SIGTERM/SIGINT (exit 0 after committing or aborting the open transaction;
    /// 130 on a second signal) or a fatal error: exit 1 when a restart may help (fenced by
    /// another instance, a server setting...), exit 3 when resuming could skip events and an
    /// operator must decide (dropped, lost or moved slot, another cluster, another timeline past
    /// its fork point; see RUNBOOK.md). Serves
    /// /metrics, /healthz and /readyz on http.listen; notifies systemd (Type=notify) when
    /// streaming.
    Cdc {
        /// When the slot was lost (invalidated) or dropped while a checkpoint exists: create a
        /// new slot and publish from the outbox table the rows the checkpoint does not prove
        /// delivered, marked `replay: recovered`, then stream (same as cdc.recover_lost_slot =
        /// true). See RUNBOOK.md, 'Lost slot'.
        #[arg(long)]
        recover_lost_slot: bool,
    },
    /// Run the polling relay: read the outbox table below the visibility horizon
    /// (`txid < pg_snapshot_xmin(pg_current_snapshot())`, cursor `(txid, id)`) into Kafka,
    /// exactly once (the cursor is the checkpoint in each Kafka transaction). Needs no
    /// replication slot.
    ///
    /// Same plumbing as `cdc`: exit 0 on SIGTERM/SIGINT after committing what is complete, 1 on
    /// a failure a restart may help, 3 when resuming could skip rows (the server lost
    /// transactions the relay published, another cluster); /metrics, /healthz, /readyz on
    /// http.listen; systemd notify.
    Poll,
    /// Load and validate the configuration, then print it as it will be used (secrets redacted).
    ///
    /// Exits 0 when valid, printing the effective configuration as JSON on stdout; exits 2 when
    /// not, printing every problem found on stderr, one per line, each naming its key.
    CheckConfig,

    /// Move the CDC relay's checkpoint to the replication slot's confirmed position, creating
    /// the slot if it is missing. For recovery only, with the relay stopped (a running relay is
    /// fenced and exits 1).
    ///
    /// `relay cdc` refuses to start when its slot was dropped while a checkpoint exists, when
    /// the slot is confirmed past the checkpoint, when the checkpoint comes from another
    /// Postgres cluster, or when it lies in WAL this server does not have (another timeline past
    /// its fork point, a restored snapshot): in each case events may be missing and only the
    /// operator can decide.
    /// This command records that decision: events committed between the old checkpoint and the
    /// slot's position are not relayed from WAL. It prints both positions and the old
    /// checkpoint's time; re-publish the outbox rows created since then (see RUNBOOK.md, 'Lost
    /// slot'; consumers deduplicate on event_id).
    ResetCheckpoint,

    /// Print, for on-call, the CDC relay's slot (state, retained WAL, lag), its last checkpoint
    /// in Kafka (position and time) and what a restart of `relay cdc` would do.
    ///
    /// Safe while the relay runs: the checkpoint is read by a plain consumer (read_committed),
    /// never by the relay's transactional producer, so the running relay is not fenced. Exits 0
    /// when a restart would stream, 3 when it would refuse to start (operator action needed, the
    /// reason is printed), 1 when Postgres or the checkpoint cannot be read.
    Status,

    /// Export the slot metrics (relay_slot_*) alone, without streaming: the slot watcher of
    /// `relay cdc` with the same /metrics, /healthz and /readyz (ready while the slot can be
    /// read), for slot alerts that do not depend on the relay process (a frozen relay exports
    /// nothing). Scrape it as a job of its own. Runs until SIGTERM/SIGINT (exit 0).
    WatchSlots,

    /// Apply the schema migrations (outbox, publication, dedup table, demo orders). Idempotent.
    Migrate {
        /// Postgres connection URL, e.g. postgres://user@127.0.0.1:55432/db
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig => Ok(check_config(cli.config.as_deref())),
        Command::Cdc { recover_lost_slot } => {
            run_cdc(cli.config.as_deref(), recover_lost_slot).await
        }
        Command::Poll => run_poll(cli.config.as_deref()).await,
        Command::ResetCheckpoint => reset_checkpoint(cli.config.as_deref()).await,
        Command::Status => status(cli.config.as_deref()).await,
        Command::WatchSlots => watch_slots(cli.config.as_deref()).await,
        Command::Migrate { database_url } => {
            let n = relay::migrate::run(&database_url).await?;
            println!("applied {n} migration(s)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_config(path: Option<&Path>) -> ExitCode {
    match RelayConfig::load(path) {
        Ok(config) => match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                println!("{json}");
                eprintln!(
                    "configuration is valid (transactional ids: cdc {}, poll {})",
                    config.transactional_id(RelayKind::Cdc),
                    config.transactional_id(RelayKind::Poll)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            for problem in e.problems() {
                eprintln!("error: {problem}");
            }
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

/// Loads the configuration, printing every problem (exit 2) if it is invalid.
fn load_config(path: Option<&Path>) -> Result<RelayConfig, ExitCode> {
    RelayConfig::load(path).map_err(|e| {
        for problem in e.problems() {
            eprintln!("error: {problem}");
        }
        ExitCode::from(EXIT_INVALID_CONFIG)
    })
}

/// What both relays run around their loop: telemetry, metrics, the HTTP endpoints, signals,
/// systemd readiness and watchdog.
struct Daemon {
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
    server: relay::health::Server,
}

impl Daemon {
    async fn start(cfg: &RelayConfig) -> anyhow::Result<Daemon> {
        relay::telemetry::init(cfg.log.format, &cfg.log.level)?;
        let metrics = Metrics::new()?;
        let health = Health::new();
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals()?;
        let server = relay::health::serve(
            cfg.http.listen,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )
        .await?;
        tracing::info!(listen = %server.local_addr, "serving /metrics, /healthz, /readyz");
        // systemd: READY=1 once the relay first reports ready; the watchdog is pinged every half
        // WatchdogSec while the relay is healthy and its loop makes progress (a relay that gave
        // up, or whose loop is wedged, stops pinging and systemd restarts it).
        let (h, s) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut notified = false;
            let watchdog = relay::systemd::watchdog_interval();
            let mut tick = tokio::time::interval(
                watchdog
                    .unwrap_or(Duration::from_millis(200))
                    .min(Duration::from_millis(200)),
            );
            let mut last_ping = std::time::Instant::now();
            while !s.is_triggered() {
                tick.tick().await;
                if !notified && h.is_ready() {
                    relay::systemd::ready("streaming");
                    notified = true;
                }
                if let Some(every) = watchdog {
                    // Fed only while the loop makes progress (see Health::watchdog_ok): a
                    // streaming loop wedged for the whole interval is restarted by systemd.
                    if last_ping.elapsed() >= every && h.watchdog_ok(every) {
                        relay::systemd::watchdog_ping();
                        last_ping = std::time::Instant::now();
                    }
                }
            }
            relay::systemd::stopping("draining");
        });
        Ok(Daemon {
            metrics,
            health,
            shutdown,
            server,
        })
    }

    /// The metrics, health and shutdown handles a relay runs with.
    fn handles(&self) -> (Metrics, Health, Shutdown) {
        (
            self.metrics.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        )
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server.task).await;
    }
}

async fn reset_checkpoint(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    relay::telemetry::init(cfg.log.format, &cfg.log.level)?;
    let settings = relay::cdc::CdcSettings::from_config(&cfg)?;
    let metrics = Metrics::new()?;
    match relay::cdc::reset_checkpoint(&settings, &metrics).await {
        Ok(reset) => {
            if reset.created_slot {
                println!("created replication slot {}", settings.slot);
            }
            match &reset.previous {
                Some(p) => println!(
                    "checkpoint {} moved from {} (system {}, written at {}) to {}",
                    reset.current.relay,
                    p.end_lsn(),
                    p.system_id,
                    relay::status::written_at(p.written_at_us),
                    reset.current.end_lsn()
                ),
                None => println!(
                    "checkpoint {} written at {} (there was none)",
                    reset.current.relay,
                    reset.current.end_lsn()
                ),
            }
            println!(
                "events committed before {} and not relayed by then are not read from WAL: \
                 re-publish the outbox rows created since the old checkpoint's time",
                reset.current.end_lsn()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn status(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    relay::telemetry::init(cfg.log.format, &cfg.log.level)?;
    let settings = relay::cdc::CdcSettings::from_config(&cfg)?;
    match relay::status::gather(&settings).await {
        Ok(status) => {
            print!("{status}");
            Ok(ExitCode::from(status.restart().exit_code()))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn watch_slots(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let settings = relay::cdc::CdcSettings::from_config(&cfg)?;
    let daemon = Daemon::start(&cfg).await?;
    let mut watch = relay::slot_watch::SlotWatchSettings::from_config(&cfg, &settings);
    watch.owns_readiness = true;
    relay::slot_watch::run(
        watch,
        daemon.metrics.clone(),
        daemon.health.clone(),
        daemon.shutdown.clone(),
    )
    .await;
    daemon.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn run_cdc(path: Option<&Path>, recover_lost_slot: bool) -> anyhow::Result<ExitCode> {
    let mut cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    cfg.cdc.recover_lost_slot |= recover_lost_slot;
    let settings = relay::cdc::CdcSettings::from_config(&cfg)?;
    let daemon = Daemon::start(&cfg).await?;
    let backstop = daemon.shutdown.backstop(cfg.shutdown.timeout);
    daemon.health.set_note(
        relay::health::NoteSource::Relay,
        Some("starting: checking Postgres, reading the checkpoint from Kafka".to_owned()),
    );
    // The slot metrics come from a task of their own, so they keep being exported while the
    // relay loop cannot stream (that is when they matter most).
    let watch = tokio::spawn(relay::slot_watch::run(
        relay::slot_watch::SlotWatchSettings::from_config(&cfg, &settings),
        daemon.metrics.clone(),
        daemon.health.clone(),
        daemon.shutdown.clone(),
    ));
    let result = relay::cdc::run(
        settings,
        daemon.metrics.clone(),
        daemon.health.clone(),
        daemon.shutdown.clone(),
    )
    .await;
    backstop.abort();
    daemon.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), watch).await;
    Ok(exit_after(result.map_err(|e| {
        (relay::exit::Exit::of_cdc(&e), e.to_string())
    })))
}

/// The exit code after a relay's run, its error logged and printed.
fn exit_after(result: Result<(), (relay::exit::Exit, String)>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((exit, e)) => {
            tracing::error!(error = %e, exit_code = exit.code(), "exiting");
            eprintln!("error: {e}");
            exit.into()
        }
    }
}

async fn run_poll(path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // Before the daemon: a password file that cannot be read fails at once.
    cfg.postgres.connection()?;
    let settings = relay::poll::PollSettings::from_config(&cfg);
    let daemon = Daemon::start(&cfg).await?;
    let backstop = daemon.shutdown.backstop(cfg.shutdown.timeout);
    let (metrics, health, shutdown) = daemon.handles();
    let result = relay::poll::run(settings, metrics, health, shutdown).await;
    backstop.abort();
    daemon.stop().await;
    Ok(exit_after(result.map_err(|e| {
        (relay::exit::Exit::of_poll(&e), e.to_string())
    })))
}
