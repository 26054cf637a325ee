//! Helpers shared by the bench's subcommands: where the stack is, Postgres connections, the
//! `/proc` readings of a process, percentiles and Prometheus histograms, a minimal HTTP GET.

use anyhow::{Context, Result};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_postgres::NoTls;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn pg_url(db: &str) -> String {
    format!(
        "postgres://{}@{}:{}/{db}",
        env_or("STACK_PG_USER", "postgres"),
        env_or("STACK_PG_HOST", "127.0.0.1"),
        env_or("STACK_PG_PORT", "55432")
    )
}

pub fn bootstrap() -> String {
    env_or("STACK_KAFKA_BOOTSTRAP", "127.0.0.1:59092")
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

pub fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// CPU seconds (user + system) and peak RSS (bytes) of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state(0) ... utime(11) stime(12), in clock ticks (100/s on Linux).
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())?;
    Some((ticks / 100.0, hwm_kb * 1024))
}

/// Quantile estimate of a Prometheus histogram in a /metrics text, over the series whose labels
/// contain every one of `labels` (e.g. `relay="cdc"`), summed per bucket, interpolated linearly
/// inside a bucket.
pub fn histogram_quantile(metrics: &str, name: &str, labels: &[&str], q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{name}_bucket{{")) && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect();
    // Several series can match (a relay exports `stage` series for both of its kinds, one of them
    // empty): add their buckets up per bound, as Prometheus's `sum by (le)` does. Taken one by
    // one, an empty series' `+Inf` bucket would sort last and read as a total of zero.
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets.dedup_by(|later, first| {
        let same = later.0 == first.0;
        if same {
            first.1 += later.1;
        }
        same
    });
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    None
}

pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(http_response(&buf))
}

/// The status code (0 if unreadable) and the body of an HTTP/1.1 response read to its end
/// (`Connection: close`, no chunked encoding expected from the servers the bench talks to).
pub fn http_response(text: &str) -> (u16, String) {
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A free TCP port on 127.0.0.1 (bound and released at once).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The stack's Kafka broker process (`scripts/stack` writes its pid file), if it can be found.
pub fn kafka_pid() -> Option<u32> {
    let dir = std::env::var("STACK_DIR").ok()?;
    std::fs::read_to_string(format!("{dir}/run/kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The whole machine's CPU time from `/proc/stat`: (busy, total) seconds summed over all cores.
pub fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    Some(((total - idle) / 100.0, total / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_adds_up_every_matching_series() {
        // The relay exports the stage for both kinds; the poll series is empty here. Alone,
        // its +Inf bucket (0) used to sort last and hide the cdc series.
        let text = "\
h_bucket{relay=\"cdc\",stage=\"x\",le=\"0.01\"} 50
h_bucket{relay=\"cdc\",stage=\"x\",le=\"0.1\"} 100
h_bucket{relay=\"cdc\",stage=\"x\",le=\"+Inf\"} 100
h_bucket{relay=\"poll\",stage=\"x\",le=\"0.01\"} 0
h_bucket{relay=\"poll\",stage=\"x\",le=\"0.1\"} 0
h_bucket{relay=\"poll\",stage=\"x\",le=\"+Inf\"} 0
";
        let p50 = histogram_quantile(text, "h", &["stage=\"x\""], 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p99 = histogram_quantile(text, "h", &["stage=\"x\""], 0.99).unwrap();
        assert!(p99 > 0.09 && p99 <= 0.1, "{p99}");
        assert_eq!(
            histogram_quantile(text, "h", &["relay=\"poll\""], 0.5),
            None
        );
    }
}
