//! Timelines: whether a WAL position recorded on one timeline still names the same WAL on the
//! server's current timeline.
//!
//! An LSN means something only on its timeline. When a standby is promoted, or a cluster is
//! restored to a point in time, Postgres starts a new timeline that shares the old one's WAL up
//! to the *switch point* (the fork) and then goes its own way: past the switch point the same
//! LSN names different WAL on the two timelines. The old primary may also have written WAL past
//! the switch point that the new timeline never received.
//!
//! ```text
//!   timeline 1   ──────────────┬──────────── X (old primary; checkpoint here: refuse)
//!                              │ switch point S (from 00000002.history: "1  S  reason")
//!   timeline 2                 └───────────── (promoted standby)
//!                 checkpoint here (≤ S): valid on timeline 2 too, resume
//! ```
//!
//! So before resuming from a checkpoint written on another timeline than the server's, the relay
//! reads the server timeline's history file (`TIMELINE_HISTORY`) and finds where the checkpoint's
//! timeline ended. A checkpoint at or before that switch point lies in the shared WAL: streaming
//! may resume there, and the next checkpoint records the new timeline. A checkpoint past it was
//! taken on WAL the new timeline does not have: resuming would skip every transaction the new
//! timeline committed between the switch point and the checkpoint, so the relay refuses and the
//! operator decides (RUNBOOK.md, 'Failover and restore'). A checkpoint whose timeline is not in
//! the history at all (a later timeline than the server's, or another branch) is refused too, and
//! so is a checkpoint on the server's own timeline that lies past the server's flushed WAL (a disk
//! snapshot or data directory restored: WAL lost without a timeline switch).
//!
//! The history file is external input: [`TimelineHistory::parse`] checks every line and never
//! panics. Its format (Postgres's `timeline.c`): one line per ancestor timeline,
//! `<timeline>\t<switch point>\t<reason>`, in increasing timeline order; blank lines and lines
//! starting with `#` are ignored. See the
//! [replication protocol](https://www.postgresql.org/docs/15/protocol-replication.html)
//! (`TIMELINE_HISTORY`) and [WAL internals](https://www.postgresql.org/docs/15/continuous-archiving.html#BACKUP-TIMELINES).

use crate::replication::conn::{ReplicationClient, ReplicationError};
use crate::replication::Lsn;

/// One line of a history file: `timeline` ended at `switchpoint`, where the next timeline of
/// this history forked from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: u32,
    pub switchpoint: Lsn,
}

/// The ancestors of a timeline, oldest first, each with the position where it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineHistory {
    entries: Vec<HistoryEntry>,
}

/// A history file that does not parse. `line` counts from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistoryError {
    #[error("timeline history line {line}: expected a numeric timeline ID")]
    Timeline { line: usize },
    #[error("timeline history line {line}: expected a switch point such as 0/3000000")]
    Switchpoint { line: usize },
    #[error("timeline history line {line}: timeline {timeline} does not follow {previous} (timeline IDs must increase)")]
    NotIncreasing {
        line: usize,
        timeline: u32,
        previous: u32,
    },
    #[error("timeline history line {line}: switch point {switchpoint} lies before the previous one, {previous}")]
    SwitchpointDecreases {
        line: usize,
        switchpoint: Lsn,
        previous: Lsn,
    },
}

impl TimelineHistory {
    /// Parses the content of a timeline history file. Lines are split on ASCII whitespace (the
    /// reason, free text, may contain anything and is not read); bytes that are not UTF-8 in
    /// the reason are harmless. Never panics.
    pub fn parse(content: &[u8]) -> Result<TimelineHistory, HistoryError> {
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in content.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let mut fields = raw
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty());
            let Some(first) = fields.next() else {
                continue;
            };
            if first.first() == Some(&b'#') {
                continue;
            }
            let timeline = std::str::from_utf8(first)
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or(HistoryError::Timeline { line })?;
            let switchpoint = fields
                .next()
                .and_then(|f| std::str::from_utf8(f).ok())
                .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'/'))
                .and_then(|s| s.parse::<Lsn>().ok())
                .ok_or(HistoryError::Switchpoint { line })?;
            if let Some(prev) = entries.last() {
                if timeline <= prev.timeline {
                    return Err(HistoryError::NotIncreasing {
                        line,
                        timeline,
                        previous: prev.timeline,
                    });
                }
                // A timeline begins where its parent ended, so a descendant cannot end before
                // its ancestor did: a file saying so is corrupt, and no position is judged by it.
                if switchpoint < prev.switchpoint {
                    return Err(HistoryError::SwitchpointDecreases {
                        line,
                        switchpoint,
                        previous: prev.switchpoint,
                    });
                }
            }
            entries.push(HistoryEntry {
                timeline,
                switchpoint,
            });
        }
        Ok(TimelineHistory { entries })
    }

    /// The ancestors, oldest first.
    pub fn entries(&self) -> &[HistoryEntry] {
        &self.entries
    }

    /// The timeline that wrote the WAL at `lsn`, for a server on timeline `current` whose history
    /// this is: each ancestor wrote the WAL up to its switch point, `current` what follows.
    pub fn timeline_at(&self, lsn: Lsn, current: u32) -> u32 {
        self.entries
            .iter()
            .find(|e| lsn < e.switchpoint)
            .map_or(current, |e| e.timeline)
    }

    /// Where `timeline` ended in this history (where the line leading to the history's own
    /// timeline forked from it), or `None` if `timeline` is not one of its ancestors.
    pub fn switchpoint(&self, timeline: u32) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.timeline == timeline)
            .map(|e| e.switchpoint)
    }
}

/// The checkpoint's position cannot be trusted on the server's timeline, or the history could
/// not be had.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("the history file of timeline {timeline} does not parse: {source}")]
    History {
        timeline: u32,
        #[source]
        source: HistoryError,
    },
    #[error("the relay's checkpoint is at {checkpoint} on timeline {checkpoint_timeline}, but this server's timeline {server_timeline} forked from timeline {checkpoint_timeline} at {switchpoint}: WAL past {switchpoint} differs between the two timelines (a promoted standby or a point-in-time restore). Events the new timeline committed between {switchpoint} and {checkpoint} would be skipped, and events relayed from timeline {checkpoint_timeline} past {switchpoint} do not exist on this server. Refusing to resume. See RUNBOOK.md, 'Failover and restore'")]
    Forked {
        checkpoint: Lsn,
        checkpoint_timeline: u32,
        server_timeline: u32,
        switchpoint: Lsn,
    },
    #[error("the relay's checkpoint is at {checkpoint} on timeline {timeline}, but this server's WAL on that timeline ends at {server_end}: the server has lost WAL the relay had read (restored from a disk snapshot or a copy of the data directory, which keeps the timeline). Events committed since the restore up to {checkpoint} would be skipped. Refusing to resume. See RUNBOOK.md, 'Failover and restore'")]
    AheadOfServer {
        checkpoint: Lsn,
        timeline: u32,
        server_end: Lsn,
    },
    #[error("the relay's checkpoint is at {checkpoint} on timeline {checkpoint_timeline}, which is not an ancestor of this server's timeline {server_timeline} (ancestors: {ancestors}): its positions name other WAL here (a restore to an older point, or another branch of a failover). Refusing to resume. See RUNBOOK.md, 'Failover and restore'")]
    NotAncestor {
        checkpoint: Lsn,
        checkpoint_timeline: u32,
        server_timeline: u32,
        ancestors: String,
    },
}

impl TimelineError {
    /// Only a failure to talk to the server is worth a retry; the rest needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, TimelineError::Replication(e) if e.is_transient())
    }
}

/// What [`check_resume`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The checkpoint is on the server's timeline.
    SameTimeline,
    /// The checkpoint is on an ancestor timeline, at or before the switch point: it names the
    /// same WAL on the server's timeline.
    Ancestor { switchpoint: Lsn },
}

/// Decides whether a checkpoint at `checkpoint` on `checkpoint_timeline` may be resumed from on
/// a server whose current timeline is `server_timeline` and whose WAL is flushed up to
/// `server_end`, given that timeline's history (`None` when it has none, as timeline 1). Pure:
/// [`check_resume`] asks the server.
///
/// On the same timeline the checkpoint can never lie past the server's flushed WAL: the relay
/// only checkpoints positions the walsender sent, and logical decoding reads flushed WAL only.
/// If it does, the server lost WAL without switching timelines (a disk snapshot or a data
/// directory copied back), and streaming from the checkpoint would skip what it writes anew.
pub fn judge(
    history: Option<&TimelineHistory>,
    checkpoint: Lsn,
    checkpoint_timeline: u32,
    server_timeline: u32,
    server_end: Lsn,
) -> Result<Resume, TimelineError> {
    if checkpoint_timeline == server_timeline {
        if checkpoint > server_end {
            return Err(TimelineError::AheadOfServer {
                checkpoint,
                timeline: server_timeline,
                server_end,
            });
        }
        return Ok(Resume::SameTimeline);
    }
    let switchpoint = history.and_then(|h| h.switchpoint(checkpoint_timeline));
    match switchpoint {
        Some(switchpoint) if checkpoint <= switchpoint => Ok(Resume::Ancestor { switchpoint }),
        Some(switchpoint) => Err(TimelineError::Forked {
            checkpoint,
            checkpoint_timeline,
            server_timeline,
            switchpoint,
        }),
        None => Err(TimelineError::NotAncestor {
            checkpoint,
            checkpoint_timeline,
            server_timeline,
            ancestors: ancestors(history),
        }),
    }
}

fn ancestors(history: Option<&TimelineHistory>) -> String {
    let list: Vec<String> = history
        .map(|h| {
            h.entries()
                .iter()
                .map(|e| format!("{} until {}", e.timeline, e.switchpoint))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// The history of the server's timeline `server_timeline` (`TIMELINE_HISTORY`), empty for
/// timeline 1, which has none.
pub async fn server_history(
    client: &mut ReplicationClient,
    server_timeline: u32,
) -> Result<TimelineHistory, TimelineError> {
    if server_timeline <= 1 {
        return Ok(TimelineHistory::default());
    }
    let file = client.timeline_history(server_timeline).await?;
    TimelineHistory::parse(&file.content).map_err(|source| TimelineError::History {
        timeline: server_timeline,
        source,
    })
}

/// [`judge`] with the server's flushed WAL position (`IDENTIFY_SYSTEM`). `server_timeline` is
/// the timeline the caller identified and records in its checkpoints, `history` its history
/// (from [`server_history`]).
pub async fn check_resume(
    client: &mut ReplicationClient,
    history: &TimelineHistory,
    checkpoint: Lsn,
    checkpoint_timeline: u32,
    server_timeline: u32,
) -> Result<Resume, TimelineError> {
    let server_end = client.identify_system().await?.xlogpos;
    let resume = judge(
        Some(history),
        checkpoint,
        checkpoint_timeline,
        server_timeline,
        server_end,
    )?;
    if let Resume::Ancestor { switchpoint } = resume {
        tracing::info!(
            checkpoint = %checkpoint,
            checkpoint_timeline,
            server_timeline,
            switchpoint = %switchpoint,
            "checkpoint lies before the timeline switch point: resuming on the new timeline"
        );
    }
    Ok(resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history file of a timeline 3 as Postgres 15 writes it.
    const TL3: &[u8] = b"1\t0/3000060\tno recovery target specified\n\n\
                         2\t0/5000188\tat restore point \"before upgrade\"\n";

    #[test]
    fn parses_what_postgres_writes() {
        let h = TimelineHistory::parse(TL3).unwrap();
        assert_eq!(
            h.entries(),
            &[
                HistoryEntry {
                    timeline: 1,
                    switchpoint: Lsn(0x300_0060)
                },
                HistoryEntry {
                    timeline: 2,
                    switchpoint: Lsn(0x500_0188)
                },
            ]
        );
        assert_eq!(h.switchpoint(2), Some(Lsn(0x500_0188)));
        assert_eq!(h.switchpoint(3), None);
    }

    #[test]
    fn names_the_timeline_that_wrote_a_position() {
        let h = TimelineHistory::parse(TL3).unwrap();
        assert_eq!(h.timeline_at(Lsn(0x100), 3), 1);
        assert_eq!(h.timeline_at(Lsn(0x300_005F), 3), 1);
        // The new timeline's WAL begins at the switch point.
        assert_eq!(h.timeline_at(Lsn(0x300_0060), 3), 2);
        assert_eq!(h.timeline_at(Lsn(0x500_0187), 3), 2);
        assert_eq!(h.timeline_at(Lsn(0x500_0188), 3), 3);
        assert_eq!(TimelineHistory::default().timeline_at(Lsn(0x100), 1), 1);
    }

    #[test]
    fn skips_comments_blank_lines_and_odd_reasons() {
        let text = b"# comment\n   \n\t1\t16/B374D848\n2 17/0 reason with \xff bytes\r\n";
        let h = TimelineHistory::parse(text).unwrap();
        assert_eq!(h.switchpoint(1), Some(Lsn(0x16_B374_D848)));
        assert_eq!(h.switchpoint(2), Some(Lsn(0x17_0000_0000)));
        assert_eq!(TimelineHistory::parse(b"").unwrap().entries(), &[]);
    }

    #[test]
    fn rejects_malformed_lines() {
        use HistoryError::*;
        let cases: &[(&[u8], HistoryError)] = &[
            (b"x\t0/1\n", Timeline { line: 1 }),
            (b"-1\t0/1\n", Timeline { line: 1 }),
            (b"+1\t0/1\n", Timeline { line: 1 }),
            (b"4294967296\t0/1\n", Timeline { line: 1 }),
            (b"1\n", Switchpoint { line: 1 }),
            (b"1\t0/1\n2\tnope\n", Switchpoint { line: 2 }),
            (b"1\t+0/1\n", Switchpoint { line: 1 }),
            (b"1\t0/1/2\n", Switchpoint { line: 1 }),
            (
                b"2\t0/1\n2\t0/2\n",
                NotIncreasing {
                    line: 2,
                    timeline: 2,
                    previous: 2,
                },
            ),
            (
                b"1\t0/5\n2\t0/4\n",
                SwitchpointDecreases {
                    line: 2,
                    switchpoint: Lsn(4),
                    previous: Lsn(5),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                TimelineHistory::parse(text).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn judges_checkpoints_against_the_fork() {
        let h = TimelineHistory::parse(TL3).unwrap();
        let end = Lsn(0x600_0000);
        let at = |lsn: u64, tl: u32| judge(Some(&h), Lsn(lsn), tl, 3, end);
        assert_eq!(at(0x500_0188, 3).unwrap(), Resume::SameTimeline);
        assert_eq!(at(0x600_0000, 3).unwrap(), Resume::SameTimeline);
        // Past the server's flushed WAL on the same timeline: WAL was lost.
        let e = at(0x600_0001, 3).unwrap_err();
        assert!(matches!(e, TimelineError::AheadOfServer { .. }), "{e}");
        assert!(e.to_string().contains("0/6000001") && e.to_string().contains("0/6000000"));
        // At or before where its timeline ended: the same WAL on timeline 3.
        assert_eq!(
            at(0x300_0060, 1).unwrap(),
            Resume::Ancestor {
                switchpoint: Lsn(0x300_0060)
            }
        );
        assert!(at(0x400_0000, 2).is_ok());
        assert!(at(0x100, 1).is_ok());
        // One byte past: refused, naming both positions and both timelines.
        let e = at(0x300_0061, 1).unwrap_err();
        assert!(matches!(e, TimelineError::Forked { .. }), "{e}");
        let text = e.to_string();
        for part in ["0/3000061", "timeline 1", "timeline 3", "0/3000060"] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        assert!(!e.is_transient());
        // Not an ancestor: a later timeline, another branch, or none recorded.
        for tl in [0, 4, 7] {
            let e = at(0x100, tl).unwrap_err();
            assert!(matches!(e, TimelineError::NotAncestor { .. }), "{e}");
        }
        let e = judge(None, Lsn(1), 2, 1, end).unwrap_err();
        assert!(e.to_string().contains("ancestors: none"), "{e}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn history() -> impl Strategy<Value = Vec<(u32, u64)>> {
            proptest::collection::vec((1u32..5, 0u64..1 << 40), 0..6).prop_map(|steps| {
                let (mut tl, mut lsn) = (0u32, 0u64);
                steps
                    .into_iter()
                    .map(|(dt, dl)| {
                        tl += dt;
                        lsn += dl;
                        (tl, lsn)
                    })
                    .collect()
            })
        }

        fn render(entries: &[(u32, u64)]) -> Vec<u8> {
            entries
                .iter()
                .map(|(tl, lsn)| format!("{tl}\t{}\treason\n", Lsn(*lsn)))
                .collect::<String>()
                .into_bytes()
        }

        proptest! {
            #[test]
            fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = TimelineHistory::parse(&bytes);
            }

            #[test]
            fn never_panics_on_mutated_histories(
                entries in history(),
                flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            ) {
                let mut bytes = render(&entries);
                for (at, b) in flips {
                    if !bytes.is_empty() {
                        let i = at % bytes.len();
                        bytes[i] = b;
                    }
                }
                let _ = TimelineHistory::parse(&bytes);
            }

            #[test]
            fn what_postgres_would_write_round_trips(entries in history()) {
                let h = TimelineHistory::parse(&render(&entries)).unwrap();
                let back: Vec<(u32, u64)> =
                    h.entries().iter().map(|e| (e.timeline, e.switchpoint.0)).collect();
                prop_assert_eq!(back, entries);
            }

            #[test]
            fn the_writing_timeline_follows_the_switchpoints(
                entries in history(),
                a in 0u64..1 << 43,
                b in 0u64..1 << 43,
            ) {
                let h = TimelineHistory::parse(&render(&entries)).unwrap();
                let current = entries.last().map_or(1, |e| e.0) + 1;
                let (lo, hi) = (Lsn(a.min(b)), Lsn(a.max(b)));
                // Monotonic: later WAL is never written by an earlier timeline.
                prop_assert!(h.timeline_at(lo, current) <= h.timeline_at(hi, current));
                let tl = h.timeline_at(lo, current);
                match entries.iter().find(|e| e.0 == tl) {
                    // An ancestor wrote it: it lies before that ancestor's end, and at or after
                    // the previous ancestor's end.
                    Some(&(_, end)) => prop_assert!(lo.0 < end),
                    None => {
                        prop_assert_eq!(tl, current);
                        prop_assert!(entries.last().is_none_or(|e| lo.0 >= e.1));
                    }
                }
            }

            #[test]
            fn resumes_exactly_up_to_the_switchpoint(
                entries in history(),
                pick in any::<usize>(),
                offset in -3i64..3,
            ) {
                prop_assume!(!entries.is_empty());
                let h = TimelineHistory::parse(&render(&entries)).unwrap();
                let (tl, sw) = entries[pick % entries.len()];
                let server = entries.last().map_or(1, |e| e.0) + 1;
                let cp = sw.saturating_add_signed(offset);
                let verdict = judge(Some(&h), Lsn(cp), tl, server, Lsn(u64::MAX));
                prop_assert_eq!(verdict.is_ok(), cp <= sw);
            }
        }
    }
}
