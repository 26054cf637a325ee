//! The process's exit codes: what a supervisor (systemd, Kubernetes, an operator's script) should
//! do when the relay stops.
//!
//! | code | meaning | supervisor |
//! |---|---|---|
//! | 0 | stopped on request (SIGTERM/SIGINT), the open transaction finished or aborted | nothing |
//! | 1 | failed; restarting may help once the cause is gone (Postgres or Kafka down for long, fenced, a server setting) | restart with backoff |
//! | 2 | the configuration is invalid (`check-config` lists every problem) | do not restart: fix the configuration |
//! | 3 | refused to resume: doing so could skip or misplace events (dropped, lost or moved slot, another cluster, another timeline). Restarting refuses again | do not restart: an operator decides (RUNBOOK.md) |
//! | 130 | forced: a second SIGTERM/SIGINT during the drain; the open Kafka transaction aborts, nothing is lost | nothing |
//!
//! The unit file (`deploy/systemd/outbox-relay.service`) names 2 and 3 in
//! `RestartPreventExitStatus=`. This module sits beside `main.rs`: it maps the relays' errors to
//! codes, and nothing below imports it.

use crate::cdc::{CdcError, Disposition};
use crate::pipeline::SessionError;
use crate::poll::PollError;

/// Why the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on request.
    Stopped,
    /// Failed; a restart may help.
    Failed,
    /// The configuration is invalid.
    InvalidConfig,
    /// Refused to resume to protect events: an operator must act.
    Refused,
    /// A second signal cut the drain short.
    Forced,
}

impl Exit {
    /// The numeric exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Stopped => 0,
            Exit::Failed => 1,
            Exit::InvalidConfig => 2,
            Exit::Refused => 3,
            Exit::Forced => 130,
        }
    }

    /// The exit of `relay cdc` after `e`.
    pub fn of_cdc(e: &CdcError) -> Exit {
        match e.disposition() {
            Disposition::Refuse => Exit::Refused,
            Disposition::Retry | Disposition::Fatal => Exit::Failed,
        }
    }

    /// The exit of `relay poll` after `e`.
    pub fn of_poll(e: &PollError) -> Exit {
        match e.disposition() {
            Disposition::Refuse => Exit::Refused,
            Disposition::Retry | Disposition::Fatal => Exit::Failed,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Lsn;

    #[test]
    fn codes_are_distinct_and_match_the_shutdown_handler() {
        let all = [
            Exit::Stopped,
            Exit::Failed,
            Exit::InvalidConfig,
            Exit::Refused,
            Exit::Forced,
        ];
        let codes: std::collections::HashSet<u8> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(
            i32::from(Exit::Forced.code()),
            crate::shutdown::FORCED_EXIT_CODE
        );
    }

    #[test]
    fn data_safety_refusals_exit_3_and_the_rest_1() {
        let refused = [
            CdcError::SlotDropped {
                slot: "s".into(),
                checkpoint: Lsn(1),
            },
            CdcError::SlotAhead {
                slot: "s".into(),
                slot_lsn: Lsn(2),
                checkpoint: Lsn(1),
            },
            CdcError::SlotLost("s".into()),
            CdcError::SystemMismatch {
                checkpoint: 1,
                server: 2,
            },
            CdcError::Timeline(crate::replication::timeline::TimelineError::Forked {
                checkpoint: Lsn(2),
                checkpoint_timeline: 1,
                server_timeline: 2,
                switchpoint: Lsn(1),
            }),
        ];
        for e in &refused {
            assert_eq!(Exit::of_cdc(e).code(), 3, "{e}");
        }
        let failed = [
            CdcError::WalLevel("replica".into()),
            CdcError::SlotMissing("s".into()),
            CdcError::StreamEnded,
        ];
        for e in &failed {
            assert_eq!(Exit::of_cdc(e).code(), 1, "{e}");
        }
    }
}
