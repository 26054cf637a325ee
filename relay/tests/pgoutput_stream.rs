//! Issue 3 end to end: the native replication client, the pgoutput decoder and the transaction
//! assembler against the real Postgres.
//!
//! Every test has a database of its own with its own tables and a publication `p` on them. It
//! creates a slot, runs its SQL, writes a sentinel (a transaction holding only the transactional
//! logical message `sentinel`), then streams from the slot through [`Assembler`] until the
//! sentinel's Commit arrives, within a timeout. Nothing is confirmed to Postgres unless a test
//! says so, so a slot can be streamed again (the binary-mode and redelivery tests rely on it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use relay::replication::assembler::{
    AssembledTxn, Assembler, AssemblerConfig, Change, NonTxnMessage, TxnEvent,
};
use relay::replication::conn::{
    sqlstate, ReplicationClient, ReplicationConfig, ReplicationMessage, ReplicationStream,
    SnapshotAction, SslMode, StartOptions,
};
use relay::replication::pgoutput::{Column, OldTuple, OldTupleKind, TupleData};
use relay::replication::Lsn;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, NoTls};

use crate::support::pg::{self, TestDb};
use crate::support::process::PgCluster;
use crate::support::unique_name;

/// The prefix of the logical message that ends every test's stream.
const SENTINEL: &str = "sentinel";

/// How long a (small) test waits for its sentinel.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Settings that fix how values are rendered as text. They are applied to the walsender's
/// session (its output functions render text-mode values) and to the SQL session that
/// compares with `col::text`, so both render alike.
const SESSION_SETTINGS: [&str; 4] = [
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, MDY'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
];

/// Replication settings for `url` without TLS (loopback).
fn replication_config(url: &str) -> ReplicationConfig {
    let mut cfg = ReplicationConfig::from_url(url).expect("a valid URL");
    cfg.sslmode = SslMode::Disable;
    cfg.application_name = "pgoutput_stream_test".into();
    cfg
}

/// Protocol 1 in text mode, with logical messages, over publication `p`.
fn text_v1() -> StartOptions {
    StartOptions::new(vec!["p".to_owned()])
}

/// What a streaming session saw besides the events.
#[derive(Debug, Default)]
struct Stats {
    /// XLogData payloads by pgoutput tag (`'S'` Stream Start, `'E'` Stream Stop, ...).
    tags: BTreeMap<char, usize>,
    /// The most [`Assembler::buffered_bytes`] ever showed, checked after every feed and event.
    peak_buffered: usize,
    /// The most streamed transactions that were spilled to disk at once.
    peak_spilled: usize,
    /// From `START_REPLICATION` to the sentinel's Commit.
    elapsed: Duration,
}

impl Stats {
    fn observe(&mut self, asm: &Assembler) {
        self.peak_buffered = self.peak_buffered.max(asm.buffered_bytes());
        self.peak_spilled = self.peak_spilled.max(asm.streamed_transactions().1);
    }

    fn tag(&self, tag: char) -> usize {
        self.tags.get(&tag).copied().unwrap_or(0)
    }
}

/// A logical slot with pgoutput, created through the replication client, and the settings to
/// stream it.
struct Source {
    cfg: ReplicationConfig,
    slot: String,
}

impl Source {
    /// Creates the slot: transactions committing after this are streamed.
    async fn create(cfg: ReplicationConfig) -> Source {
        let mut client = ReplicationClient::connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("connect with {cfg:?}: {e}"));
        let slot = unique_name("slot");
        client
            .create_logical_slot(&slot, "pgoutput", false, SnapshotAction::NoExport)
            .await
            .expect("create the slot");
        client.close().await;
        Source { cfg, slot }
    }

    /// `START_REPLICATION` from 0/0, i.e. from the slot's confirmed position.
    async fn start(&self, options: StartOptions) -> ReplicationStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = ReplicationClient::connect(&self.cfg)
                .await
                .expect("connect for streaming");
            for sql in SESSION_SETTINGS {
                client.simple_query(sql).await.expect(sql);
            }
            match client
                .start_replication(&self.slot, Lsn::INVALID, options.clone())
                .await
            {
                Ok(stream) => return stream,
                // The walsender of a stream that just finished releases the slot a moment later.
                Err(e)
                    if e.sqlstate() == Some(sqlstate::OBJECT_IN_USE)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("START_REPLICATION on {}: {e}", self.slot),
            }
        }
    }

    /// Streams until the sentinel's Commit, handing every event (the sentinel's too) and the
    /// assembler to `visit`. Keepalives that ask for a reply get `confirmed` (0/0 confirms
    /// nothing). Returns the stream, not finished, the sentinel's end LSN and the stats.
    async fn stream(
        &self,
        options: StartOptions,
        asm_config: AssemblerConfig,
        confirmed: Lsn,
        timeout: Duration,
        mut visit: impl FnMut(&TxnEvent, &Assembler),
    ) -> (ReplicationStream, Lsn, Stats) {
        let mut asm = Assembler::new(options.proto_version, asm_config).expect("assembler");
        let mut stream = self.start(options).await;
        let mut stats = Stats::default();
        let started = Instant::now();
        let run = async {
            let mut in_sentinel = false;
            loop {
                let message = stream
                    .next()
                    .await
                    .expect("no stream error")
                    .expect("the stream does not end before the sentinel");
                let (wal_start, data) = match message {
                    ReplicationMessage::XLogData {
                        wal_start, data, ..
                    } => (wal_start, data),
                    ReplicationMessage::Keepalive {
                        reply_requested, ..
                    } => {
                        if reply_requested {
                            stream
                                .send_status_update(confirmed, confirmed, confirmed, false)
                                .await
                                .expect("status update");
                        }
                        continue;
                    }
                };
                let tag = data.first().map_or('?', |&b| char::from(b));
                *stats.tags.entry(tag).or_default() += 1;
                asm.feed(wal_start, data)
                    .expect("the assembler accepts what Postgres sends");
                stats.observe(&asm);
                while let Some(event) = asm.next_event().expect("replay") {
                    stats.observe(&asm);
                    visit(&event, &asm);
                    match event {
                        TxnEvent::Change(Change::Message(m)) if m.prefix == SENTINEL => {
                            in_sentinel = true
                        }
                        TxnEvent::Commit { end_lsn, .. } if in_sentinel => return end_lsn,
                        _ => {}
                    }
                }
            }
        };
        let sentinel_end = tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| panic!("the sentinel arrives within {timeout:?}"));
        stats.elapsed = started.elapsed();
        (stream, sentinel_end, stats)
    }

    /// Streams until the sentinel and keeps every event; the stream is left open.
    async fn collect_open(&self, options: StartOptions) -> (Capture, ReplicationStream) {
        let mut events = Vec::new();
        let (stream, sentinel_end, _) = self
            .stream(
                options,
                AssemblerConfig::default(),
                Lsn::INVALID,
                TIMEOUT,
                |event, _| events.push(event.clone()),
            )
            .await;
        (Capture::new(events, sentinel_end), stream)
    }

    /// Streams until the sentinel, keeps every event and finishes the stream.
    async fn collect(&self, options: StartOptions) -> Capture {
        let (capture, stream) = self.collect_open(options).await;
        stream.finish().await.expect("finish the stream");
        capture
    }
}

/// Everything streamed before the sentinel.
struct Capture {
    /// The events in order, without the sentinel transaction.
    events: Vec<TxnEvent>,
    transactions: Vec<AssembledTxn>,
    non_txn_messages: Vec<NonTxnMessage>,
    sentinel_end: Lsn,
}

impl Capture {
    fn new(mut events: Vec<TxnEvent>, sentinel_end: Lsn) -> Capture {
        assert!(events.len() >= 3, "{events:?}");
        let sentinel = events.split_off(events.len() - 3);
        assert!(
            matches!(
                &sentinel[..],
                [
                    TxnEvent::Begin { .. },
                    TxnEvent::Change(Change::Message(_)),
                    TxnEvent::Commit { .. }
                ]
            ),
            "the sentinel transaction is Begin, Message, Commit: {sentinel:?}"
        );
        let assembled = relay::replication::assembler::Assembled::from_events(events.clone());
        Capture {
            events,
            transactions: assembled.transactions,
            non_txn_messages: assembled.non_txn_messages,
            sentinel_end,
        }
    }

    /// Each transaction's changes, described (see [`describe`]).
    fn described(&self) -> Vec<Vec<String>> {
        self.transactions
            .iter()
            .map(|t| t.changes.iter().map(describe).collect())
            .collect()
    }
}

/// A value as a short string: text as is, `null`, `toast` (unchanged TOAST), `b:<hex>` (binary).
fn value(column: &Column) -> String {
    match column {
        Column::Null => "null".into(),
        Column::UnchangedToast => "toast".into(),
        Column::Text(b) => String::from_utf8(b.to_vec()).expect("text values are UTF-8"),
        Column::Binary(b) => format!("b:{}", hex::encode(b)),
    }
}

fn row(tuple: &TupleData) -> String {
    tuple
        .columns
        .iter()
        .map(value)
        .collect::<Vec<_>>()
        .join("|")
}

fn old_row(old: &OldTuple) -> String {
    let kind = match old.kind {
        OldTupleKind::Key => "K",
        OldTupleKind::Full => "O",
    };
    format!("{kind}:{}", row(&old.tuple))
}

/// A change as one line, e.g. `update t K:2|null -> 3|two`, after checking that each tuple has
/// one value per column of the relation it was decoded against.
fn describe(change: &Change) -> String {
    let check = |relation: &relay::replication::pgoutput::Relation, tuple: &TupleData| {
        assert_eq!(
            tuple.columns.len(),
            relation.columns.len(),
            "one value per column of {}: {tuple:?}",
            relation.name
        );
    };
    match change {
        Change::Insert(i) => {
            check(&i.relation, &i.new);
            format!("insert {} {}", i.relation.name, row(&i.new))
        }
        Change::Update(u) => {
            check(&u.relation, &u.new);
            let old = match &u.old {
                Some(old) => {
                    check(&u.relation, &old.tuple);
                    format!("{} ", old_row(old))
                }
                None => String::new(),
            };
            format!("update {} {old}-> {}", u.relation.name, row(&u.new))
        }
        Change::Delete(d) => {
            check(&d.relation, &d.old.tuple);
            format!("delete {} {}", d.relation.name, old_row(&d.old))
        }
        Change::Truncate(t) => {
            let names: Vec<&str> = t.relations.iter().map(|r| r.name.as_str()).collect();
            format!("truncate {}", names.join(","))
        }
        Change::Message(m) => format!(
            "message {}: {}",
            m.prefix,
            String::from_utf8_lossy(&m.content)
        ),
    }
}

/// Runs each statement (its own transaction unless it says otherwise), then the sentinel.
async fn run_sql(client: &Client, statements: &[&str]) {
    for sql in statements {
        client.batch_execute(sql).await.unwrap_or_else(|e| {
            panic!("{sql}: {e}");
        });
    }
    client
        .batch_execute(&format!(
            "SELECT pg_logical_emit_message(true, '{SENTINEL}', '')"
        ))
        .await
        .expect("sentinel");
}

/// A fresh database with `schema` (its tables and `CREATE PUBLICATION p`), a slot on it, then
/// `statements` and the sentinel.
async fn scenario(schema: &str, statements: &[&str]) -> (TestDb, Client, Source) {
    let db = TestDb::create_empty().await;
    let admin = db.client().await;
    admin.batch_execute(schema).await.expect("schema");
    let source = Source::create(replication_config(&db.url())).await;
    run_sql(&admin, statements).await;
    (db, admin, source)
}

#[tokio::test]
async fn insert_update_delete_truncate_with_old_keys_and_full_rows() {
    let (_db, _admin, source) = scenario(
        "CREATE TABLE t (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE f (id int PRIMARY KEY, name text);
         ALTER TABLE f REPLICA IDENTITY FULL;
         CREATE PUBLICATION p FOR TABLE t, f;",
        &[
            "INSERT INTO t VALUES (1, 'one', 10), (2, 'two', NULL)",
            "UPDATE t SET qty = 11 WHERE id = 1",
            "UPDATE t SET id = 3 WHERE id = 2",
            "DELETE FROM t WHERE id = 1",
            "INSERT INTO f VALUES (1, 'a')",
            "UPDATE f SET name = 'b' WHERE id = 1",
            "DELETE FROM f WHERE id = 1",
            "TRUNCATE t, f",
        ],
    )
    .await;
    let capture = source.collect(text_v1()).await;
    let expected: Vec<Vec<&str>> = vec![
        vec!["insert t 1|one|10", "insert t 2|two|null"],
        // The key did not change: no old tuple.
        vec!["update t -> 1|one|11"],
        // The key changed: the old key, other columns null.
        vec!["update t K:2|null|null -> 3|two|null"],
        vec!["delete t K:1|null|null"],
        vec!["insert f 1|a"],
        // REPLICA IDENTITY FULL: the whole old row.
        vec!["update f O:1|a -> 1|b"],
        vec!["delete f O:1|b"],
        vec!["truncate t,f"],
    ];
    assert_eq!(capture.described(), expected);
    assert!(capture.non_txn_messages.is_empty());

    let Change::Update(u) = &capture.transactions[2].changes[0] else {
        panic!("an update")
    };
    let key: Vec<bool> = u.relation.columns.iter().map(|c| c.is_key()).collect();
    assert_eq!(key, [true, false, false], "id is t's key");
    let Change::Truncate(t) = &capture.transactions[7].changes[0] else {
        panic!("a truncate")
    };
    assert!(!t.cascade() && !t.restart_identity());
}

#[tokio::test]
async fn transactional_and_non_transactional_logical_messages() {
    let (_db, _admin, source) = scenario(
        "CREATE TABLE m (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE m;",
        &[
            "BEGIN;
             INSERT INTO m VALUES (1);
             SELECT pg_logical_emit_message(true, 'txn', 'inside');
             SELECT pg_logical_emit_message(false, 'now', '\\x00ff01'::bytea);
             INSERT INTO m VALUES (2);
             COMMIT;",
            // A non-transactional message outlives the rollback of its transaction; a
            // transactional one does not.
            "BEGIN;
             SELECT pg_logical_emit_message(false, 'kept', 'despite rollback');
             SELECT pg_logical_emit_message(true, 'lost', 'rolled back');
             ROLLBACK;",
        ],
    )
    .await;
    let capture = source.collect(text_v1()).await;

    assert_eq!(
        capture.described(),
        [["insert m 1", "message txn: inside", "insert m 2"]]
    );
    let Change::Message(m) = &capture.transactions[0].changes[1] else {
        panic!("a message")
    };
    assert!(m.transactional);
    assert_eq!(m.prefix, "txn");
    assert_eq!(&m.content[..], b"inside");

    let messages: Vec<(&str, &[u8], bool)> = capture
        .non_txn_messages
        .iter()
        .map(|n| {
            (
                n.message.prefix.as_str(),
                &n.message.content[..],
                n.message.transactional,
            )
        })
        .collect();
    assert_eq!(
        messages,
        [
            ("now", &[0x00, 0xff, 0x01][..], false),
            ("kept", &b"despite rollback"[..], false)
        ]
    );
    // A non-transactional message is decoded when its WAL record is, before the transaction
    // around it (sent only at its commit).
    assert!(matches!(capture.events[0], TxnEvent::NonTxnMessage(_)));
    assert!(matches!(capture.events[1], TxnEvent::Begin { .. }));
    for n in &capture.non_txn_messages {
        assert!(n.wal_start.is_valid() && n.message.lsn.is_valid());
    }
}

#[tokio::test]
async fn one_transaction_over_two_relations() {
    let db = TestDb::create_empty().await;
    let mut admin = db.client().await;
    admin
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text);
             CREATE TABLE b (id int PRIMARY KEY, n bigint);
             CREATE PUBLICATION p FOR TABLE a, b;",
        )
        .await
        .unwrap();
    let source = Source::create(replication_config(&db.url())).await;
    let tx = admin.transaction().await.unwrap();
    tx.batch_execute(
        "INSERT INTO a VALUES (1, 'x');
         INSERT INTO b VALUES (10, 100);
         UPDATE a SET v = 'y' WHERE id = 1;
         DELETE FROM b WHERE id = 10;",
    )
    .await
    .unwrap();
    let xid: i64 = tx
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    run_sql(&admin, &[]).await;

    let capture = source.collect(text_v1()).await;
    assert_eq!(
        capture.described(),
        [[
            "insert a 1|x",
            "insert b 10|100",
            "update a -> 1|y",
            "delete b K:10|null"
        ]]
    );
    let (begin_xid, final_lsn) = match capture.events.first() {
        Some(TxnEvent::Begin { xid, final_lsn, .. }) => (*xid, *final_lsn),
        other => panic!("a Begin first: {other:?}"),
    };
    let (commit_xid, commit_lsn, end_lsn) = match capture.events.last() {
        Some(TxnEvent::Commit {
            xid,
            commit_lsn,
            end_lsn,
            ..
        }) => (*xid, *commit_lsn, *end_lsn),
        other => panic!("a Commit last: {other:?}"),
    };
    assert_eq!(capture.events.len(), 6, "Begin, 4 changes, Commit");
    assert_eq!(begin_xid, commit_xid);
    assert_eq!(i64::from(begin_xid), xid, "the xid txid_current() showed");
    assert_eq!(final_lsn, commit_lsn, "Begin's final LSN is the commit LSN");
    assert!(end_lsn > commit_lsn, "{end_lsn} > {commit_lsn}");
    assert!(capture.sentinel_end > end_lsn);

    // Both relations by name and oid, in the order of the changes.
    let txn = &capture.transactions[0];
    let oids = admin
        .query_one("SELECT 'a'::regclass::oid, 'b'::regclass::oid", &[])
        .await
        .unwrap();
    let (a, b): (u32, u32) = (oids.get(0), oids.get(1));
    let relations: Vec<(String, u32)> = txn
        .changes
        .iter()
        .map(|c| match c {
            Change::Insert(i) => (i.relation.name.clone(), i.relation.oid),
            Change::Update(u) => (u.relation.name.clone(), u.relation.oid),
            Change::Delete(d) => (d.relation.name.clone(), d.relation.oid),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        relations,
        [
            ("a".to_owned(), a),
            ("b".to_owned(), b),
            ("a".to_owned(), a),
            ("b".to_owned(), b)
        ]
    );
}

/// Any value in its binary (send) format, as a normal query returns it.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The columns of the type test, with their type oids.
const TYPED_COLUMNS: [(&str, &str, u32); 15] = [
    ("c_int2", "int2", 21),
    ("c_int4", "int4", 23),
    ("c_int8", "int8", 20),
    ("c_numeric", "numeric", 1700),
    ("c_text", "text", 25),
    ("c_varchar", "varchar(20)", 1043),
    ("c_bool", "bool", 16),
    ("c_jsonb", "jsonb", 3802),
    ("c_uuid", "uuid", 2950),
    ("c_ts", "timestamptz", 1184),
    ("c_date", "date", 1082),
    ("c_bytea", "bytea", 17),
    ("c_float8", "float8", 701),
    ("c_int4arr", "int4[]", 1007),
    ("c_textarr", "text[]", 1009),
];

#[tokio::test]
async fn every_common_type_in_text_and_binary_mode() {
    let columns: Vec<String> = TYPED_COLUMNS
        .iter()
        .map(|(name, ty, _)| format!("{name} {ty}"))
        .collect();
    let (_db, admin, source) = scenario(
        &format!(
            "CREATE TABLE ty (id int PRIMARY KEY, {});
             CREATE PUBLICATION p FOR TABLE ty;",
            columns.join(", ")
        ),
        &[
            "INSERT INTO ty VALUES (1, -32768, 123456789, -9000000000000000000,
                 '-12345.678900', 'tab\there \"quoted\" é', 'varchar ✓', true,
                 '{\"b\": [1, 2.5, null], \"a\": \"x\"}',
                 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29 13:14:15.123456+02',
                 '2000-01-02', '\\x00ff10', 1.5e-10, '{1,NULL,-3}', '{a,\"b c\",NULL,\"\"}')",
            // All NULL but the key.
            "INSERT INTO ty (id) VALUES (2)",
        ],
    )
    .await;
    for sql in SESSION_SETTINGS {
        admin.batch_execute(sql).await.unwrap();
    }
    let names: Vec<&str> = TYPED_COLUMNS.iter().map(|(name, _, _)| *name).collect();
    // The text a text-format result carries is the type's output function, what pgoutput sends
    // in text mode. (`col::text` is the same for every type here but bool: the cast says `true`,
    // the output function `t`.)
    let text_rows: Vec<Vec<Option<String>>> = admin
        .simple_query(&format!(
            "SELECT id, {} FROM ty ORDER BY id",
            names.join(", ")
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    let binary_rows = admin
        .query(
            &format!("SELECT id, {} FROM ty ORDER BY id", names.join(", ")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(text_rows.len(), 2);

    // Text mode: every value as Postgres renders `col::text`.
    let capture = source.collect(text_v1()).await;
    let inserts = inserts_of(&capture);
    assert_eq!(inserts.len(), 2);
    for (insert, expected) in inserts.iter().zip(&text_rows) {
        let oids: Vec<u32> = insert.relation.columns.iter().map(|c| c.type_oid).collect();
        let want_oids: Vec<u32> = [23]
            .into_iter()
            .chain(TYPED_COLUMNS.iter().map(|(_, _, oid)| *oid))
            .collect();
        assert_eq!(oids, want_oids, "type oids in the Relation message");
        for (i, column) in insert.new.columns.iter().enumerate() {
            let want = expected[i].clone();
            let got = match column {
                Column::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
                Column::Null => None,
                other => panic!("column {i} in text mode: {other:?}"),
            };
            assert_eq!(got, want, "column {}", insert.relation.columns[i].name);
        }
    }
    assert!(inserts[1].new.columns[1..]
        .iter()
        .all(|c| *c == Column::Null));

    // Binary mode from the same slot (nothing was confirmed): every value is what the type's
    // send function produces, the format a binary query result carries.
    let capture = source
        .collect(StartOptions {
            binary: true,
            ..text_v1()
        })
        .await;
    let inserts = inserts_of(&capture);
    assert_eq!(inserts.len(), 2);
    for (insert, expected) in inserts.iter().zip(&binary_rows) {
        for (i, column) in insert.new.columns.iter().enumerate() {
            let want: Option<Raw> = expected.get(i);
            let got = match column {
                Column::Binary(b) => Some(b.to_vec()),
                Column::Null => None,
                other => panic!("column {i} in binary mode: {other:?}"),
            };
            assert_eq!(
                got,
                want.map(|r| r.0),
                "column {}",
                insert.relation.columns[i].name
            );
        }
    }
    // A few layouts checked by hand, not only against Postgres.
    let first = &inserts[0];
    let binary = |name: &str| -> Vec<u8> {
        let i = first.relation.column_index(name).expect(name);
        first.new.columns[i].bytes().expect(name).to_vec()
    };
    assert_eq!(binary("id"), 1i32.to_be_bytes());
    assert_eq!(binary("c_int2"), (-32768i16).to_be_bytes());
    assert_eq!(binary("c_int4"), 123456789i32.to_be_bytes());
    assert_eq!(binary("c_int8"), (-9000000000000000000i64).to_be_bytes());
    assert_eq!(binary("c_bool"), [1]);
    assert_eq!(
        binary("c_uuid"),
        hex::decode("a0eebc999c0b4ef8bb6d6bb9bd380a11").unwrap()
    );
    assert_eq!(binary("c_float8"), 1.5e-10f64.to_be_bytes());
    assert_eq!(binary("c_bytea"), [0x00, 0xff, 0x10]);
    // Days since 2000-01-01.
    assert_eq!(binary("c_date"), 1i32.to_be_bytes());
    // Microseconds since 2000-01-01 00:00 UTC.
    let ts = admin
        .query_one(
            "SELECT (extract(epoch FROM c_ts - '2000-01-01 00:00:00+00') * 1000000)::int8 \
             FROM ty WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(binary("c_ts"), ts.to_be_bytes());
    // jsonb: version 1, then the text.
    assert_eq!(binary("c_jsonb")[0], 1);
    // int4[]: 1 dimension, has nulls, element type int4, 3 elements from index 1, then
    // length-prefixed elements (-1 for NULL).
    let mut array = Vec::new();
    for word in [1i32, 1, 23, 3, 1, 4, 1, -1, 4, -3] {
        array.extend_from_slice(&word.to_be_bytes());
    }
    assert_eq!(binary("c_int4arr"), array);
}

/// The Inserts of a capture, in order.
fn inserts_of(capture: &Capture) -> Vec<&relay::replication::pgoutput::Insert> {
    capture
        .transactions
        .iter()
        .flat_map(|t| &t.changes)
        .map(|c| match c {
            Change::Insert(i) => i,
            other => panic!("only inserts: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn unchanged_toast_column_is_not_sent_on_update() {
    let (_db, admin, source) = scenario(
        "CREATE TABLE doc (id int PRIMARY KEY, big text, n int);
         -- Out of line and uncompressed whatever the data.
         ALTER TABLE doc ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE PUBLICATION p FOR TABLE doc;",
        &[
            "INSERT INTO doc SELECT 1, string_agg(md5(i::text), ''), 0 FROM generate_series(1, 400) i",
            "UPDATE doc SET n = 1 WHERE id = 1",
            "UPDATE doc SET big = 'small now', n = 2 WHERE id = 1",
        ],
    )
    .await;
    let big: String = admin
        .query_one(
            "SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 12_800, "well over the 8 kB page");
    let capture = source.collect(text_v1()).await;
    assert_eq!(capture.transactions.len(), 3);
    let changes: Vec<&Change> = capture
        .transactions
        .iter()
        .flat_map(|t| &t.changes)
        .collect();
    let [Change::Insert(insert), Change::Update(toast), Change::Update(changed)] = changes[..]
    else {
        panic!("insert, update, update: {changes:?}")
    };
    assert_eq!(insert.new.columns[1], Column::Text(big.into()));
    assert_eq!(
        toast.new.columns,
        [
            Column::Text("1".into()),
            Column::UnchangedToast,
            Column::Text("1".into())
        ]
    );
    assert!(toast.old.is_none());
    assert_eq!(
        describe(&Change::Update(changed.clone())),
        "update doc -> 1|small now|2"
    );
}

#[tokio::test]
async fn relation_altered_mid_stream() {
    let (_db, _admin, source) = scenario(
        "CREATE TABLE t (id int PRIMARY KEY, a text);
         CREATE PUBLICATION p FOR TABLE t;",
        &[
            "INSERT INTO t VALUES (1, 'x')",
            "ALTER TABLE t ADD COLUMN b int DEFAULT 7",
            "INSERT INTO t VALUES (2, 'y', 8)",
            // Altered inside the transaction that uses both shapes.
            "BEGIN;
             INSERT INTO t VALUES (3, 'z', 9);
             ALTER TABLE t DROP COLUMN a;
             INSERT INTO t VALUES (4, 10);
             COMMIT;",
        ],
    )
    .await;
    let capture = source.collect(text_v1()).await;
    assert_eq!(
        capture.described(),
        [
            vec!["insert t 1|x"],
            vec!["insert t 2|y|8"],
            vec!["insert t 3|z|9", "insert t 4|10"]
        ]
    );
    let inserts = inserts_of(&capture);
    let shapes: Vec<Vec<&str>> = inserts
        .iter()
        .map(|i| i.relation.columns.iter().map(|c| c.name.as_str()).collect())
        .collect();
    assert_eq!(
        shapes,
        [
            vec!["id", "a"],
            vec!["id", "a", "b"],
            vec!["id", "a", "b"],
            vec!["id", "b"]
        ]
    );
    assert!(inserts
        .iter()
        .all(|i| i.relation.oid == inserts[0].relation.oid));
}

#[tokio::test]
async fn rolled_back_transactions_never_appear() {
    let (_db, _admin, source) = scenario(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE t;",
        &[
            "BEGIN; INSERT INTO t VALUES (1); ROLLBACK;",
            "INSERT INTO t VALUES (2)",
            "BEGIN;
             INSERT INTO t VALUES (3);
             SAVEPOINT s;
             INSERT INTO t VALUES (4);
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO t VALUES (5);
             COMMIT;",
            "BEGIN; INSERT INTO t VALUES (6); ROLLBACK;",
        ],
    )
    .await;
    let capture = source.collect(text_v1()).await;
    assert_eq!(
        capture.described(),
        [vec!["insert t 2"], vec!["insert t 3", "insert t 5"]]
    );
}

const LARGE_ROWS: i32 = 100_000;

/// Streams the single large transaction of `LARGE_ROWS` inserts and checks, event by event,
/// that the inserts arrive in order, all inside one Begin..Commit, and that the assembler's
/// buffered bytes stay at most `budget` (`check_buffered` is called with them after each
/// event). Returns the stats.
async fn stream_large(
    source: &Source,
    options: StartOptions,
    budget: usize,
    check_buffered: impl Fn(usize),
) -> Stats {
    let mut inserts = 0i32;
    let mut commits = 0;
    let mut xids = Vec::new();
    let (stream, _, stats) = source
        .stream(
            options,
            AssemblerConfig {
                memory_budget: budget,
                spill_dir: None,
            },
            Lsn::INVALID,
            Duration::from_secs(300),
            |event, asm| {
                check_buffered(asm.buffered_bytes());
                match event {
                    TxnEvent::Begin { xid, .. } => xids.push(*xid),
                    TxnEvent::Change(Change::Insert(i)) => {
                        inserts += 1;
                        assert_eq!(
                            i.new.columns[0],
                            Column::Text(inserts.to_string().into()),
                            "inserts in order"
                        );
                    }
                    TxnEvent::Commit { .. } => commits += 1,
                    _ => {}
                }
            },
        )
        .await;
    stream.finish().await.unwrap();
    assert_eq!(inserts, LARGE_ROWS);
    assert_eq!(commits, 2, "the large transaction and the sentinel");
    assert_eq!(xids.len(), 2);
    stats
}

/// The large transaction: `LARGE_ROWS` inserts in one statement, on a table of publication `p`.
const LARGE_SCHEMA: &str = "CREATE TABLE big (id int PRIMARY KEY, pad text);
                            CREATE PUBLICATION p FOR TABLE big;";
const LARGE_INSERT: &str =
    "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 100000) g ORDER BY g";

#[tokio::test]
async fn large_transaction_passes_through_without_buffering() {
    let (_db, _admin, source) = scenario(LARGE_SCHEMA, &[LARGE_INSERT]).await;
    // Protocol 1: Postgres sends the transaction only once committed, so the assembler passes
    // each change through and buffers nothing.
    let stats = stream_large(&source, text_v1(), 0, |buffered| assert_eq!(buffered, 0)).await;
    assert_eq!(stats.peak_buffered, 0);
    assert_eq!(stats.tag('I'), LARGE_ROWS as usize);
    assert_eq!(stats.tag('S'), 0);
    println!(
        "proto 1, {LARGE_ROWS} inserts in one transaction: decoded in {:.2?}, peak buffered {} bytes",
        stats.elapsed, stats.peak_buffered
    );
}

#[tokio::test]
async fn large_streamed_transaction_is_spilled_within_budget() {
    // logical_decoding_work_mem is lowered cluster-wide, so on a private cluster.
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = cluster.url("postgres");
    let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(LARGE_SCHEMA)
        .await
        .expect("large schema");
    admin
        .batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let source = Source::create(replication_config(&url)).await;
    run_sql(&admin, &[LARGE_INSERT]).await;

    const BUDGET: usize = 1024 * 1024;
    let options = StartOptions {
        proto_version: 2,
        streaming: true,
        ..text_v1()
    };
    let stats = stream_large(&source, options, BUDGET, |buffered| {
        assert!(buffered <= BUDGET, "{buffered} buffered bytes > {BUDGET}")
    })
    .await;
    // Streamed in blocks, committed once, spilled by the assembler.
    assert!(stats.tag('S') >= 2, "stream blocks: {:?}", stats.tags);
    assert_eq!(stats.tag('S'), stats.tag('E'), "{:?}", stats.tags);
    assert_eq!(stats.tag('c'), 1, "one Stream Commit: {:?}", stats.tags);
    assert_eq!(stats.tag('I'), LARGE_ROWS as usize);
    assert!(stats.peak_buffered <= BUDGET);
    assert!(stats.peak_buffered > 0);
    assert_eq!(stats.peak_spilled, 1, "the transaction went to disk");
    println!(
        "proto 2 streaming, {LARGE_ROWS} inserts in {} stream blocks: decoded and replayed in \
         {:.2?}, peak buffered {} bytes (budget {BUDGET})",
        stats.tag('S'),
        stats.elapsed,
        stats.peak_buffered
    );
}

#[tokio::test]
async fn scram_replication_connection_streams_a_transaction() {
    let db = TestDb::create_empty().await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE PUBLICATION p FOR TABLE t;",
        )
        .await
        .unwrap();
    let (user, password) = pg::SCRAM_USER;
    let mut cfg = ReplicationConfig::new(pg::host(), user);
    cfg.port = pg::port();
    cfg.dbname = db.name.clone();
    cfg.password = Some(password.to_owned());
    cfg.sslmode = SslMode::Disable;
    let source = Source::create(cfg).await;
    run_sql(&admin, &["INSERT INTO t VALUES (1, 'scram')"]).await;
    let capture = source.collect(text_v1()).await;
    assert_eq!(capture.described(), [["insert t 1|scram"]]);
}

/// The slot's `confirmed_flush_lsn`.
async fn confirmed_flush(admin: &Client, slot: &str) -> Lsn {
    let lsn: String = admin
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    lsn.parse().unwrap()
}

#[tokio::test]
async fn only_confirmed_transactions_are_skipped_on_reconnect() {
    let (_db, admin, source) = scenario(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE PUBLICATION p FOR TABLE t;",
        &["INSERT INTO t VALUES (1), (2)"],
    )
    .await;
    let created_at = confirmed_flush(&admin, &source.slot).await;

    // Streamed, never confirmed: the slot stays where it was and sends it all again.
    let first = source.collect(text_v1()).await;
    assert_eq!(first.described(), [["insert t 1", "insert t 2"]]);
    assert_eq!(confirmed_flush(&admin, &source.slot).await, created_at);
    let (again, mut stream) = source.collect_open(text_v1()).await;
    assert_eq!(again.described(), first.described());
    assert_eq!(again.transactions[0].end_lsn, first.transactions[0].end_lsn);
    assert_eq!(again.sentinel_end, first.sentinel_end);

    // Confirm the transaction's end LSN (not the sentinel's): only the sentinel comes again.
    let end_lsn = again.transactions[0].end_lsn;
    stream
        .send_status_update(end_lsn, end_lsn, end_lsn, false)
        .await
        .unwrap();
    stream.finish().await.unwrap();
    assert_eq!(confirmed_flush(&admin, &source.slot).await, end_lsn);
    let after = source.collect(text_v1()).await;
    assert!(after.transactions.is_empty(), "{:?}", after.described());
    assert!(after.events.is_empty());
    assert_eq!(after.sentinel_end, first.sentinel_end);
}
