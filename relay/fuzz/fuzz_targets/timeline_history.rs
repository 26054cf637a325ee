//! Feeds arbitrary bytes to the timeline history parser (the content `TIMELINE_HISTORY` returns)
//! and judges a checkpoint against whatever it accepted. Any panic or overflow is a bug: every
//! input must become a history or a typed error.
//!
//! Run from `relay/fuzz` (needs nightly): `cargo +nightly fuzz run timeline_history --
//! -max_total_time=300`. A good seed is a real history file: `1\t0/3000060\tno recovery target
//! specified\n`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::replication::timeline::{judge, TimelineHistory};
use relay::replication::Lsn;

fuzz_target!(|data: &[u8]| {
    if let Ok(history) = TimelineHistory::parse(data) {
        for e in history.entries() {
            let _ = judge(Some(&history), e.switchpoint, e.timeline, u32::MAX, Lsn(u64::MAX));
            let next = Lsn(e.switchpoint.0.wrapping_add(1));
            let _ = judge(Some(&history), next, e.timeline, e.timeline, e.switchpoint);
        }
    }
});
