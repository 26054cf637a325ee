//! `relay`: the daemon's entry point. Thin: the library does the work.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "Transactional-outbox relay: PostgreSQL to Kafka, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schema migrations (outbox, publication, dedup table, demo orders). Idempotent.
    Migrate {
        /// Postgres connection URL, e.g. postgres://user@127.0.0.1:55432/db
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate { database_url } => {
            let n = relay::migrate::run(&database_url).await?;
            println!("applied {n} migration(s)");
        }
    }
    Ok(())
}
