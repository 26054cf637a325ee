//! The contenders of `relay-bench ab`: which relay moves the outbox to Kafka during a phase, how
//! it is started in its own namespace, and how it is stopped.
//!
//! Each contender writes to its own topics `ab.<namespace>.<aggregate_type>` (the label with `-`
//! replaced by `_`), its own checkpoint topic and transactional id, and (CDC) its own fresh slot,
//! dropped after the phase. Only one is attached at a time. Adding a kind of contender is one arm
//! in [`Contender::attach`] and one variant of [`Attached`].

use super::PhaseEnv;
use crate::debezium::{DebeziumRun, DebeziumSettings};
use crate::support::{free_port, http_get};
use anyhow::{bail, Context, Result};
use std::fmt;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// One relay under test, as named on the command line (`--contenders`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Contender {
    /// `relay cdc`, defaults.
    Cdc,
    /// `relay poll`, defaults.
    Poll,
    /// `relay cdc` with `RELAY_DELIVERY=at_least_once`.
    CdcAlo,
    /// `relay cdc` with its commit-rate pacer off (`RELAY_BATCH__MAX_COMMIT_RATE=0`).
    CdcUnpaced,
    /// `relay cdc` producing with the experimental wire client (`RELAY_KAFKA__CLIENT=wire`):
    /// one produce request per broker, transactions v2 where the cluster has it.
    CdcWire,
    /// The wire client held to transactions v1 (`RELAY_KAFKA__WIRE_TRANSACTION_VERSION=1`).
    CdcWireV1,
    /// Debezium (Kafka Connect + Outbox Event Router); `exactly_once`: Connect's exactly-once
    /// source support, `tuned`: `poll.interval.ms=10`. Started by `crate::debezium` once merged.
    Debezium { exactly_once: bool, tuned: bool },
}

impl Contender {
    /// The label, as given on the command line and shown in the report.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Cdc => "cdc",
            Contender::Poll => "poll",
            Contender::CdcAlo => "cdc-alo",
            Contender::CdcUnpaced => "cdc-unpaced",
            Contender::CdcWire => "cdc-wire",
            Contender::CdcWireV1 => "cdc-wire-v1",
            Contender::Debezium {
                exactly_once: false,
                tuned: false,
            } => "debezium",
            Contender::Debezium {
                exactly_once: false,
                tuned: true,
            } => "debezium-tuned",
            Contender::Debezium {
                exactly_once: true,
                tuned: false,
            } => "debezium-eos",
            Contender::Debezium {
                exactly_once: true,
                tuned: true,
            } => "debezium-eos-tuned",
        }
    }

    /// The label with `-` replaced by `_`: the middle part of the contender's topic names.
    pub fn namespace(self) -> String {
        self.label().replace('-', "_")
    }

    /// Topics are `<topic_prefix><aggregate_type>`.
    pub fn topic_prefix(self) -> String {
        format!("ab.{}.", self.namespace())
    }

    /// Whether the contender reads a replication slot (created fresh per phase, dropped after).
    pub fn uses_slot(self) -> bool {
        !matches!(self, Contender::Poll)
    }

    /// Starts the contender for one phase and returns once it is ready to move events.
    pub async fn attach(self, env: &PhaseEnv<'_>) -> Result<Attached> {
        match self {
            Contender::Cdc => RelayChild::start(env, "cdc", &[])
                .await
                .map(Attached::Relay),
            Contender::Poll => RelayChild::start(env, "poll", &[])
                .await
                .map(Attached::Relay),
            Contender::CdcAlo => {
                RelayChild::start(env, "cdc", &[("RELAY_DELIVERY", "at_least_once")])
                    .await
                    .map(Attached::Relay)
            }
            Contender::CdcUnpaced => {
                RelayChild::start(env, "cdc", &[("RELAY_BATCH__MAX_COMMIT_RATE", "0")])
                    .await
                    .map(Attached::Relay)
            }
            Contender::CdcWire => RelayChild::start(env, "cdc", &[("RELAY_KAFKA__CLIENT", "wire")])
                .await
                .map(Attached::Relay),
            Contender::CdcWireV1 => RelayChild::start(
                env,
                "cdc",
                &[
                    ("RELAY_KAFKA__CLIENT", "wire"),
                    ("RELAY_KAFKA__WIRE_TRANSACTION_VERSION", "1"),
                ],
            )
            .await
            .map(Attached::Relay),
            Contender::Debezium {
                exactly_once,
                tuned,
            } => {
                let settings = DebeziumSettings {
                    exactly_once,
                    poll_interval_ms: tuned.then_some(10),
                };
                DebeziumRun::start(
                    &settings,
                    env.pg_url,
                    env.bootstrap,
                    env.slot,
                    &self.topic_prefix(),
                    &env.work_dir.join(env.tag),
                )
                .await
                .map(Attached::Debezium)
            }
        }
    }
}

impl FromStr for Contender {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Contender> {
        let d = |exactly_once, tuned| Contender::Debezium {
            exactly_once,
            tuned,
        };
        Ok(match s.trim() {
            "cdc" => Contender::Cdc,
            "poll" => Contender::Poll,
            "cdc-alo" => Contender::CdcAlo,
            "cdc-unpaced" => Contender::CdcUnpaced,
            "cdc-wire" => Contender::CdcWire,
            "cdc-wire-v1" => Contender::CdcWireV1,
            "debezium" => d(false, false),
            "debezium-tuned" => d(false, true),
            "debezium-eos" => d(true, false),
            "debezium-eos-tuned" => d(true, true),
            other => bail!(
                "unknown contender {other:?}: cdc, poll, cdc-alo, cdc-unpaced, cdc-wire, cdc-wire-v1, debezium, \
                 debezium-tuned, debezium-eos, debezium-eos-tuned"
            ),
        })
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A started contender.
pub enum Attached {
    /// A `relay` child process.
    Relay(RelayChild),
    /// A Kafka Connect worker running the Debezium connector.
    Debezium(DebeziumRun),
}

impl Attached {
    /// The process doing the work (CPU seconds, peak RSS).
    pub fn pid(&self) -> u32 {
        match self {
            Attached::Relay(r) => r.child.id(),
            Attached::Debezium(d) => d.pid(),
        }
    }

    /// Every setting the contender runs with that is not the binary's default.
    pub fn settings(&self) -> Vec<(String, String)> {
        match self {
            Attached::Relay(r) => r.settings.clone(),
            Attached::Debezium(d) => d.settings(),
        }
    }

    /// The contender's Prometheus text, if it exports one.
    pub async fn metrics(&self) -> Option<String> {
        match self {
            Attached::Relay(r) => http_get(&r.http, "/metrics").await.ok().map(|(_, b)| b),
            // Connect exposes JMX, not Prometheus text; the bench's own figures cover it.
            Attached::Debezium(_) => None,
        }
    }

    /// Stops the contender and waits for it to exit.
    pub async fn stop(self) -> Result<()> {
        match self {
            Attached::Relay(r) => r.stop().await,
            Attached::Debezium(d) => d.stop().await,
        }
    }
}

/// `relay cdc` or `relay poll` as a child process with its own metrics port and namespace.
pub struct RelayChild {
    child: Child,
    http: String,
    settings: Vec<(String, String)>,
}

impl RelayChild {
    async fn start(env: &PhaseEnv<'_>, kind: &str, fixed: &[(&str, &str)]) -> Result<RelayChild> {
        let http = format!("127.0.0.1:{}", free_port()?);
        let prefix = env.contender.topic_prefix();
        // The application_name tags every Postgres session of this relay, so the bench finds its
        // backends in pg_stat_activity (the walsender, the polling session, the slot watcher).
        let sep = if env.pg_url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}application_name={}", env.pg_url, env.tag);
        // What defines the namespace and the phase; not shown as settings in the report.
        let plumbing: Vec<(String, String)> = vec![
            ("RELAY_POSTGRES__URL".into(), url),
            (
                "RELAY_KAFKA__BOOTSTRAP_SERVERS".into(),
                env.bootstrap.into(),
            ),
            ("RELAY_HTTP__LISTEN".into(), http.clone()),
            ("RELAY_LOG__FORMAT".into(), "json".into()),
            ("RELAY_CDC__SLOT".into(), env.slot.into()),
            ("RELAY_POLL__NAME".into(), env.tag.into()),
            (
                "RELAY_OUTBOX__TOPIC_TEMPLATE".into(),
                format!("{prefix}{{aggregate_type}}"),
            ),
            (
                "RELAY_KAFKA__CHECKPOINT_TOPIC".into(),
                format!("{prefix}checkpoints"),
            ),
            ("RELAY_KAFKA__DLQ_TOPIC".into(), format!("{prefix}dlq")),
            ("RELAY_KAFKA__TRANSACTIONAL_ID".into(), env.tag.into()),
        ];
        let settings: Vec<(String, String)> = fixed
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain(env.extra_env.iter().cloned())
            .collect();
        let log_path = env.work_dir.join(format!("{}.log", env.tag));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(env.relay_bin);
        cmd.arg(kind)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .envs(plumbing.iter().chain(settings.iter()).map(|(k, v)| (k, v)));
        let child = cmd.spawn().with_context(|| {
            format!(
                "start {} (build it: cargo build --release -p relay)",
                env.relay_bin.display()
            )
        })?;
        let mut run = RelayChild {
            child,
            http,
            settings,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(&run.http, "/readyz").await {
                return Ok(run);
            }
            if let Ok(Some(status)) = run.child.try_wait() {
                bail!(
                    "relay {kind} exited with {status} before it was ready; see {}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                let _ = run.stop().await;
                bail!(
                    "relay {kind} not ready after 60 s; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) -> Result<()> {
        // SIGTERM: the relay's graceful shutdown commits what it has and releases the slot.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("the relay did not stop within 30 s of SIGTERM; killed");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayChild {
    /// A phase that fails half-way must not leave its relay running into the next one.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip() {
        for l in [
            "cdc",
            "poll",
            "cdc-alo",
            "cdc-unpaced",
            "cdc-wire",
            "cdc-wire-v1",
            "debezium",
            "debezium-tuned",
            "debezium-eos",
            "debezium-eos-tuned",
        ] {
            let c: Contender = l.parse().unwrap();
            assert_eq!(c.label(), l);
        }
        assert_eq!(
            Contender::Debezium {
                exactly_once: true,
                tuned: true
            }
            .topic_prefix(),
            "ab.debezium_eos_tuned."
        );
        assert!("kafka".parse::<Contender>().is_err());
    }
}
