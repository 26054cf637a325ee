//! Feeds arbitrary bytes through the pgoutput decoder (protocols 1 and 2, inside and outside a
//! stream block) and through the transaction assembler. Any panic, overflow or hang is a bug:
//! both must turn every input into messages or typed errors.
//!
//! Input layout: the first byte picks the protocol version and the spill budget; the rest is split
//! into messages at each 0xFF 0xFE pair (an arbitrary separator: libFuzzer finds it quickly, and
//! valid messages rarely contain it), so one input can build up state (a Relation, a Stream
//! Start) before the message that exercises it.
//!
//! Run from `relay/fuzz` (needs nightly): `cargo +nightly fuzz run pgoutput_decode --
//! -max_total_time=300`. A good seed corpus is the PG15 captures in
//! `relay/src/replication/testdata/`, hex-decoded and joined with the separator, behind a mode byte.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay::replication::assembler::{Assembler, AssemblerConfig};
use relay::replication::pgoutput::Decoder;
use relay::replication::Lsn;

fn split(data: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xFF && data[i + 1] == 0xFE {
            out.push(Bytes::copy_from_slice(&data[start..i]));
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    out.push(Bytes::copy_from_slice(&data[start.min(data.len())..]));
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let proto = if mode & 1 == 0 { 1 } else { 2 };
    let messages = split(rest);

    // The decoder alone keeps going after errors (a failed decode must leave its state intact).
    let mut decoder = Decoder::new(proto).expect("version 1 or 2");
    for m in &messages {
        let _ = decoder.decode(m.clone());
    }

    // The assembler, with a budget small enough to spill now and then; stop at the first error,
    // as the relay does.
    let config = AssemblerConfig {
        memory_budget: usize::from(mode >> 1) * 16,
        spill_dir: None,
    };
    let mut asm = Assembler::new(proto, config).expect("version 1 or 2");
    for (i, m) in messages.into_iter().enumerate() {
        if asm.feed(Lsn(i as u64), m).is_err() {
            return;
        }
        loop {
            match asm.next_event() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
