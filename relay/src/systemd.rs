//! systemd integration: readiness, status, stopping, and the watchdog (`Type=notify`).
//!
//! ```text
//!  start ─▶ connect ─▶ ready(status) ──READY=1──▶ systemd: unit "active"
//!  loop  ─▶ every watchdog_interval(): watchdog_ping() ──WATCHDOG=1──▶ (missed: SIGABRT, restart)
//!  stop  ─▶ stopping() ──STOPPING=1──▶ drain ─▶ exit
//! ```
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset (not under systemd, or in a
//! container), so callers need no special case. Errors sending to the socket are logged, not
//! returned: losing a status line must never stop the relay.
//!
//! The pings come from a small task in `main.rs`, but that task pings only while
//! [`Health::watchdog_ok`](crate::health::Health::watchdog_ok) holds: the relay loop marks its
//! progress on every iteration, so a loop stuck in one step for a whole interval starves the
//! watchdog (a task pinging unconditionally would keep a wedged relay alive).

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(states: &[NotifyState<'_>]) {
    // unset_env = false: the relay may notify many times, and child processes are not spawned.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd the service is up (`READY=1`) with a human-readable status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line shown by `systemctl status` (e.g. "streaming from 0/16B3748").
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Tells systemd the service is shutting down (`STOPPING=1`).
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Tells systemd the service is alive (`WATCHDOG=1`).
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC` (systemd's advice, leaving a whole
/// half-period of slack), or `None` when the watchdog is off or meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn no_ops_without_notify_socket() {
        // The test runner is not a notify service; none of these may fail or panic.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            ready("test");
            status("test");
            stopping("test");
            watchdog_ping();
        }
    }

    /// `systemd-analyze verify` exits 0 even on unknown keys, so the test asserts it prints
    /// nothing. `ExecStart`'s binary is not installed here and verify reports a missing one, so
    /// the unit is verified from a copy whose `ExecStart` points at this test binary; every other
    /// line is the shipped file's.
    #[test]
    fn unit_file_verifies_cleanly() {
        let unit =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/outbox-relay.service");
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(text
            .contains("ExecStart=/usr/local/bin/relay --config /etc/outbox-relay/relay.toml cdc"));
        // Not skipped when the tool is missing: a check that silently does not run proves
        // nothing. `.ci/run` installs it (Debian's `systemd` package).
        if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
            panic!("systemd-analyze cannot run ({e}): install Debian's systemd package");
        }
        let exe = std::env::current_exe().unwrap();
        let copy_dir = std::env::temp_dir().join(format!("relay-unit-{}", std::process::id()));
        std::fs::create_dir_all(&copy_dir).unwrap();
        let copy = copy_dir.join("outbox-relay.service");
        let text = text.replace("/usr/local/bin/relay", &exe.display().to_string());
        std::fs::write(&copy, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&copy_dir);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && printed.trim().is_empty(),
            "systemd-analyze verify:\n{printed}"
        );
    }
}
