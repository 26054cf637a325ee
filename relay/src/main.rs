//! `relay`: the daemon's entry point. Thin: the library does the work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay::config::{RelayConfig, RelayKind};

/// Exit code of `check-config` for an invalid configuration (1 is any other failure).
const EXIT_INVALID_CONFIG: u8 = 2;

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
    // The relays' subcommands go here: `Cdc` (logical replication) and `Poll` (table polling),
    // each loading the configuration with `load_config` and wiring config, telemetry, metrics,
    // health, shutdown and systemd around its loop.
    /// Load and validate the configuration, then print it as it will be used (secrets redacted).
    ///
    /// Exits 0 when valid, printing the effective configuration as JSON on stdout; exits 2 when
    /// not, printing every problem found on stderr, one per line, each naming its key.
    CheckConfig,

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
