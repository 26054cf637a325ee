//! Logging: `tracing` events to stderr, as JSON (journald, containers) or pretty (a terminal).
//!
//! The level comes from `log.level`, an `EnvFilter` directive (`info`, `relay=debug,rdkafka=warn`);
//! `RUST_LOG`, when set and not empty, overrides it so an operator can turn up one module without
//! editing the file.
//!
//! The rule for every log line in this project: **never log payloads or secrets.** Payloads are
//! customers' data and can be large; log event ids, LSNs, xids, topics, partitions and counts
//! instead. Secrets (passwords, URLs with passwords, SASL options) never go in a field; use
//! [`DatabaseUrl::redacted`](crate::config::DatabaseUrl::redacted) when a URL must appear.
//! Long-lived tasks carry a span with `slot`, `lsn`, `xid` fields; per-event logging on the hot
//! path is `trace` at most, per-batch is `debug`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The level directive (from `log.level` or `RUST_LOG`) does not parse.
    #[error("{source_name}: not a valid filter directive: {source}")]
    Filter {
        /// `log.level` or `RUST_LOG`.
        source_name: &'static str,
        /// The parse error.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(format: LogFormat, level: &str) -> Result<(), TelemetryError> {
    let filter = filter(level, std::env::var("RUST_LOG").ok().as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        // Spans' fields go in every line so a log search by slot or lsn finds them.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))
}

/// The filter: `RUST_LOG` if set and not empty, else the configured level.
fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    match rust_log.filter(|s| !s.trim().is_empty()) {
        Some(env) => EnvFilter::try_new(env).map_err(|source| TelemetryError::Filter {
            source_name: "RUST_LOG",
            source,
        }),
        None => EnvFilter::try_new(level).map_err(|source| TelemetryError::Filter {
            source_name: "log.level",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_overrides_level() {
        assert_eq!(filter("info", None).unwrap().to_string(), "info");
        assert_eq!(filter("info", Some("")).unwrap().to_string(), "info");
        assert_eq!(
            filter("info", Some("relay=debug")).unwrap().to_string(),
            "relay=debug"
        );
        let err = filter("info", Some("relay=loud")).unwrap_err();
        assert!(err.to_string().starts_with("RUST_LOG: "), "{err}");
        let err = filter("relay=loud", None).unwrap_err();
        assert!(err.to_string().starts_with("log.level: "), "{err}");
    }
}
