//! Decoding speed of the pgoutput decoder on the relay's hot path: Insert messages of an
//! outbox-like relation (9 columns as in `migrations/`, a ~300-byte jsonb payload).
//!
//! Run: `cargo bench -p relay --bench decode -- --warm-up-time 1 --measurement-time 5`.
//! Criterion prints time per batch and the throughput in messages/s (`elements`) and bytes/s.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use relay::replication::assembler::{Assembler, AssemblerConfig};
use relay::replication::pgoutput::{
    Begin, Column, Commit, Decoder, Insert, LogicalMessage, PgTimestamp, RelColumn, Relation,
    ReplicaIdentity, TupleData,
};
use relay::replication::Lsn;

const BATCH: usize = 1000;

fn outbox_relation() -> Arc<Relation> {
    let col = |flags, name: &str, type_oid| RelColumn {
        flags,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    Arc::new(Relation {
        xid: None,
        oid: 16385,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col(1, "id", 20),
            col(0, "event_id", 2950),
            col(0, "aggregate_type", 25),
            col(0, "aggregate_id", 25),
            col(0, "event_type", 25),
            col(0, "payload", 3802),
            col(0, "headers", 3802),
            col(0, "created_at", 1184),
            col(0, "txid", 5069),
        ],
    })
}

fn payload(i: usize) -> String {
    let mut p = format!(
        r#"{{"order_id": "o-{i}", "customer": {{"id": "c-{}", "tier": "gold"}}, "currency": "EUR", "items": [{{"sku": "sku-1", "qty": 2, "price": 1999}}, {{"sku": "sku-2", "qty": 1, "price": 4999}}], "total": 8997, "note": ""#,
        i % 977
    );
    while p.len() < 298 {
        p.push('x');
    }
    p.push_str("\"}");
    p
}

fn text(s: &str) -> Column {
    Column::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// `BATCH` encoded Insert messages, each its own buffer as the replication client delivers them.
fn inserts(rel: &Arc<Relation>) -> Vec<Bytes> {
    (0..BATCH)
        .map(|i| {
            LogicalMessage::Insert(Insert {
                xid: None,
                relation: Arc::clone(rel),
                new: TupleData {
                    columns: vec![
                        text(&(1_000_000 + i).to_string()),
                        text("6f1c2b9e-3a5d-4e7f-8a9b-0c1d2e3f4a5b"),
                        text("order"),
                        text(&format!("o-{i}")),
                        text("OrderPlaced"),
                        text(&payload(i)),
                        Column::Null,
                        text("2026-11-23 14:12:29.951921+00"),
                        text(&(727 + i).to_string()),
                    ],
                },
            })
            .to_bytes()
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let rel = outbox_relation();
    let messages = inserts(&rel);
    let total_bytes: usize = messages.iter().map(Bytes::len).sum();
    let announce = LogicalMessage::Relation(Arc::clone(&rel)).to_bytes();
    let mut decoder = Decoder::new(1).expect("v1");
    decoder.decode(announce.clone()).expect("relation");

    let mut group = c.benchmark_group("decode_insert_outbox");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("messages", |b| {
        b.iter(|| {
            for m in &messages {
                black_box(decoder.decode(m.clone()).expect("insert"));
            }
        })
    });
    group.throughput(Throughput::Bytes(total_bytes as u64));
    group.bench_function("bytes", |b| {
        b.iter(|| {
            for m in &messages {
                black_box(decoder.decode(m.clone()).expect("insert"));
            }
        })
    });
    group.finish();

    // The relay's real path: decode, check the transaction structure, yield the event.
    let mut group = c.benchmark_group("assemble_insert_outbox");
    group.throughput(Throughput::Elements(BATCH as u64));
    let begin = LogicalMessage::Begin(Begin {
        final_lsn: Lsn(1 << 40),
        commit_time: PgTimestamp(0),
        xid: 7,
    })
    .to_bytes();
    let commit = LogicalMessage::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn(1 << 40),
        end_lsn: Lsn((1 << 40) + 48),
        commit_time: PgTimestamp(0),
    })
    .to_bytes();
    group.bench_function("messages", |b| {
        b.iter_batched_ref(
            || {
                let mut asm = Assembler::new(1, AssemblerConfig::default()).expect("v1");
                asm.feed(Lsn(1), announce.clone()).expect("relation");
                asm
            },
            |asm| {
                asm.feed(Lsn(2), begin.clone()).expect("begin");
                while let Some(ev) = asm.next_event().expect("event") {
                    black_box(ev);
                }
                for m in &messages {
                    asm.feed(Lsn(3), m.clone()).expect("insert");
                    while let Some(ev) = asm.next_event().expect("event") {
                        black_box(ev);
                    }
                }
                asm.feed(Lsn(4), commit.clone()).expect("commit");
                while let Some(ev) = asm.next_event().expect("event") {
                    black_box(ev);
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
