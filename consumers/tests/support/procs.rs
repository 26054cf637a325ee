//! `consumers` processes a test starts, lets crash (the drills' fault points abort them) and
//! restarts.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `consumers` binary of this build.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_consumers")
}

/// One `consumers` process, its stderr appended to `log`.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `consumers <args>` with `env` added. Core dumps are off (`ulimit -c 0`): the
    /// drills abort the process on purpose, dozens of times.
    pub fn spawn(args: &[String], env: &[(&str, String)], log: &Path) -> Proc {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the process log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("ulimit -c 0; exec \"$0\" \"$@\"")
            .arg(bin())
            .args(args)
            .env("RUST_LOG", "warn,consumers=info")
            .env_remove("CONSUMER_FAULTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn consumers");
        Proc {
            child,
            log: log.to_owned(),
        }
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGTERM, then waits (SIGKILL after 30 s).
    pub fn stop(mut self) -> ExitStatus {
        if let Some(s) = self.exited() {
            return s;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How many times each fault point fired, from the processes' logs.
pub fn faults_fired(log: &Path) -> [usize; 3] {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let count = |p: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("fault point {p} fired")))
            .count()
    };
    [
        count("before_effect"),
        count("after_external_call"),
        count("after_db_commit"),
    ]
}

/// Scrapes `GET /metrics` at `addr` and returns the value of the first sample of `name`.
pub async fn scrape(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
