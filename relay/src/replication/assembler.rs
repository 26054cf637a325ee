//! The transaction assembler: turns decoded pgoutput messages into the events of *committed*
//! transactions, checking the transaction structure on the way.
//!
//! ```text
//!  feed(wal_start, XLogData payload)
//!        │
//!        ▼
//!   pgoutput::Decoder ──▶ LogicalMessage
//!        │
//!        ├─ Begin / change / Commit (not streamed) ──────────────────▶ pending ──▶ next_event()
//!        │     checked: no nested Begin, no change outside a txn,        queue       Begin
//!        │     Commit LSN = Begin's final LSN                                        Change …
//!        │                                                                           Commit
//!        ├─ non-transactional Message ───────────────────────────────▶ pending       NonTxnMessage
//!        │
//!        └─ Stream Start … changes … Stream Stop (protocol 2)
//!              │  per top-level xid, tagged with the (sub)xid of each change
//!              ▼
//!          memory buffer ──(over budget)──▶ spill file (length-prefixed raw pgoutput)
//!              │                                   │
//!              │ Stream Abort: drop the xid, or only one subtransaction's changes
//!              │ Stream Commit: Begin, replay (one change at a time), Commit ──▶ pending
//! ```
//!
//! Call [`Assembler::feed`] with each XLogData payload, then [`Assembler::next_event`] until it
//! returns `None`, before feeding the next one.
//!
//! # Memory bound, and when a change may precede its Commit
//!
//! Without streaming, Postgres decodes a transaction only once its commit record is in the WAL:
//! everything between Begin and Commit belongs to a transaction that *has already committed*, so it
//! can never be rolled back. The assembler therefore passes each change through as soon as it is
//! decoded, without buffering: memory stays bounded by one message whatever the size of the
//! transaction. A [`TxnEvent::Change`] may thus reach the caller before the [`TxnEvent::Commit`]
//! that ends its transaction has been received. The relay writes such changes into an open Kafka
//! transaction and commits Kafka only at Commit; if the connection drops in between, it aborts the
//! Kafka transaction and Postgres sends the whole transaction again, because its end LSN was never
//! confirmed.
//!
//! With protocol 2 and `streaming = on`, Postgres sends blocks of a transaction that is *still
//! running* once it exceeds `logical_decoding_work_mem`; the transaction may still abort, in whole
//! or one subtransaction at a time. A streamed change is therefore **never** emitted before Stream
//! Commit: the assembler keeps each streamed transaction's changes in memory until all streamed
//! transactions together exceed [`AssemblerConfig::memory_budget`], then moves the largest one to
//! an anonymous temporary file (deleted by the OS once closed, even after a crash). Stream Abort
//! drops the changes; Stream Commit replays them from memory or from the file, one message at a
//! time, framed by a Begin and a Commit event exactly like a non-streamed transaction. Memory in
//! use is thus at most the budget plus one message, plus the decoded schema of the relations.
//!
//! The budget counts the length of each buffered message plus a fixed overhead. The decoded
//! change holds slices of the XLogData buffer it came from, so the count is exact when each XLogData
//! payload is its own allocation (as produced by the replication client); if payloads were slices
//! of a larger read buffer, that buffer would stay alive as long as any change cut from it.
//!
//! # Subtransactions
//!
//! Inside a stream block, every change carries the xid of the subtransaction that made it, and
//! Postgres sends a Stream Abort with `subxid != xid` for each aborted subtransaction (and for each
//! of its children). The assembler drops exactly those changes: from memory at once, and from the
//! spill file by remembering the aborted subxids and skipping their records on replay.
//!
//! # Relations of spilled changes
//!
//! A spilled change is stored as its raw pgoutput bytes and decoded again on replay. Its relation
//! may have been re-announced with another shape since, so the spill file also stores the
//! relation each change was decoded against (re-encoded as a Relation message) whenever it differs
//! from the last one written for that oid; the replay decoder reads them in order and resolves
//! each change exactly as it was resolved the first time.
//!
//! # After an error
//!
//! Every [`AssemblerError`] means the stream is not what Postgres sends (or the spill file could
//! not be used). The assembler's state is then undefined: drop it, reconnect and restart
//! from the last confirmed LSN.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::mem;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::pgoutput::{
    DecodeError, Decoder, Delete, Insert, LogicalMessage, Message, PgTimestamp, Relation,
    StreamCommit, Truncate, UnsupportedProtocolVersion, Update,
};
use super::Lsn;

/// A change of a transaction, with its relation resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    /// A transactional logical decoding message (`pg_logical_emit_message(true, …)`).
    Message(Message),
}

impl Change {
    /// The (sub)transaction xid carried by a streamed change; `None` outside stream blocks.
    pub fn xid(&self) -> Option<u32> {
        match self {
            Change::Insert(c) => c.xid,
            Change::Update(c) => c.xid,
            Change::Delete(c) => c.xid,
            Change::Truncate(c) => c.xid,
            Change::Message(c) => c.xid,
        }
    }

    /// The change carried by a decoded message, or the message back if it is none.
    fn from_message(msg: LogicalMessage) -> Result<Change, LogicalMessage> {
        match msg {
            LogicalMessage::Insert(c) => Ok(Change::Insert(c)),
            LogicalMessage::Update(c) => Ok(Change::Update(c)),
            LogicalMessage::Delete(c) => Ok(Change::Delete(c)),
            LogicalMessage::Truncate(c) => Ok(Change::Truncate(c)),
            LogicalMessage::Message(m) if m.transactional => Ok(Change::Message(m)),
            other => Err(other),
        }
    }

    /// The relations whose schema this change was decoded against.
    fn relations(&self) -> &[Arc<Relation>] {
        match self {
            Change::Insert(c) => std::slice::from_ref(&c.relation),
            Change::Update(c) => std::slice::from_ref(&c.relation),
            Change::Delete(c) => std::slice::from_ref(&c.relation),
            Change::Truncate(c) => &c.relations,
            Change::Message(_) => &[],
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Change::Insert(_) => "Insert",
            Change::Update(_) => "Update",
            Change::Delete(_) => "Delete",
            Change::Truncate(_) => "Truncate",
            Change::Message(_) => "transactional Message",
        }
    }
}

/// A non-transactional logical decoding message, delivered as soon as decoded whatever became
/// of the transaction that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonTxnMessage {
    /// The start LSN of the XLogData that carried it.
    pub wal_start: Lsn,
    pub message: Message,
}

/// What the assembler yields, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnEvent {
    /// A committed transaction starts. `final_lsn` is its commit LSN.
    Begin {
        xid: u32,
        final_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    Change(Change),
    /// The transaction ends. Confirm `end_lsn` to Postgres once its events are durable downstream.
    Commit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    NonTxnMessage(NonTxnMessage),
}

/// The transaction stream is not what Postgres sends, or a spill file failed.
#[derive(Debug, thiserror::Error)]
pub enum AssemblerError {
    #[error(transparent)]
    UnsupportedProtocolVersion(#[from] UnsupportedProtocolVersion),
    #[error("cannot decode the pgoutput message at {wal_start}: {source}")]
    Decode {
        wal_start: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("Begin of xid {xid} at {wal_start} inside the still open transaction {open_xid}")]
    NestedTransaction {
        wal_start: Lsn,
        xid: u32,
        open_xid: u32,
    },
    #[error(
        "invalid transaction {xid}: Commit LSN {commit_lsn} differs from the final LSN \
         {final_lsn} announced by its Begin"
    )]
    CommitLsnMismatch {
        xid: u32,
        final_lsn: Lsn,
        commit_lsn: Lsn,
    },
    #[error("Commit {commit_lsn} at {wal_start} without a Begin")]
    CommitWithoutBegin { wal_start: Lsn, commit_lsn: Lsn },
    #[error("{kind} at {wal_start} outside any transaction")]
    ChangeOutsideTransaction { wal_start: Lsn, kind: &'static str },
    #[error("{what} at {wal_start} is not allowed {state}")]
    UnexpectedMessage {
        wal_start: Lsn,
        what: &'static str,
        state: &'static str,
    },
    #[error("Stream Commit at {wal_start} for xid {xid}, which never streamed a block")]
    UnknownStreamedTransaction { wal_start: Lsn, xid: u32 },
    #[error("spill file of streamed transaction {xid}: {source}")]
    Spill {
        xid: u32,
        #[source]
        source: io::Error,
    },
    #[error("spill file of streamed transaction {xid} is corrupt: {source}")]
    CorruptSpill {
        xid: u32,
        #[source]
        source: DecodeError,
    },
}

/// How the assembler bounds the memory of streamed transactions.
#[derive(Clone, Debug)]
pub struct AssemblerConfig {
    /// Bytes of streamed, uncommitted changes kept in memory across all transactions before the
    /// largest transaction is spilled to disk. Zero spills every streamed change.
    pub memory_budget: usize,
    /// Where to create spill files; the system's temporary directory if `None`.
    pub spill_dir: Option<PathBuf>,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            memory_budget: 64 * 1024 * 1024,
            spill_dir: None,
        }
    }
}

/// Bookkeeping per buffered change, added to its message length in the budget.
const BUFFERED_OVERHEAD: usize = 64;

/// A streamed change kept in memory: the decoded change, and the raw bytes it was decoded from in
/// case it must be spilled (the change's values are slices of those bytes, so keeping both costs
/// nothing extra).
#[derive(Debug)]
struct Buffered {
    subxid: u32,
    raw: Bytes,
    change: Change,
}

impl Buffered {
    fn cost(&self) -> usize {
        self.raw.len() + BUFFERED_OVERHEAD
    }
}

/// Spill record kinds: a relation the following changes were decoded against (as announced
/// outside a stream block, or inside one with its xid), or a change.
const RECORD_RELATION: u8 = b'R';
const RECORD_STREAM_RELATION: u8 = b'r';
const RECORD_CHANGE: u8 = b'C';
/// Kind (1) + subxid (4) + length (4).
const RECORD_HEADER: usize = 9;

#[derive(Debug)]
struct SpillWriter {
    file: BufWriter<File>,
    /// The relation last written per oid, compared by pointer: a re-announced relation is a new
    /// `Arc` and gets written again.
    relations: HashMap<u32, Arc<Relation>>,
}

impl SpillWriter {
    fn record(&mut self, kind: u8, subxid: u32, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 4 GiB"))?;
        self.file.write_all(&[kind])?;
        self.file.write_all(&subxid.to_be_bytes())?;
        self.file.write_all(&len.to_be_bytes())?;
        self.file.write_all(bytes)
    }

    fn write(&mut self, b: &Buffered) -> io::Result<()> {
        for rel in b.change.relations() {
            let known = self.relations.get(&rel.oid);
            if known.is_none_or(|k| !Arc::ptr_eq(k, rel)) {
                let encoded = LogicalMessage::Relation(Arc::clone(rel)).to_bytes();
                let kind = match rel.xid {
                    Some(_) => RECORD_STREAM_RELATION,
                    None => RECORD_RELATION,
                };
                self.record(kind, b.subxid, &encoded)?;
                self.relations.insert(rel.oid, Arc::clone(rel));
            }
        }
        self.record(RECORD_CHANGE, b.subxid, &b.raw)
    }
}

/// A streamed transaction not yet committed or aborted.
#[derive(Debug, Default)]
struct StreamedTxn {
    buffered: Vec<Buffered>,
    /// Bytes of `buffered` counted against the budget.
    mem: usize,
    spill: Option<SpillWriter>,
    /// Subtransactions aborted after some of their changes were spilled.
    aborted_subxids: HashSet<u32>,
}

/// Replays a committed streamed transaction one change at a time.
#[derive(Debug)]
enum Replay {
    Memory(std::vec::IntoIter<Buffered>),
    Spill {
        xid: u32,
        reader: BufReader<File>,
        decoder: Box<Decoder>,
        aborted: HashSet<u32>,
    },
}

impl Replay {
    fn next(&mut self) -> Result<Option<Change>, AssemblerError> {
        match self {
            Replay::Memory(it) => Ok(it.next().map(|b| b.change)),
            Replay::Spill {
                xid,
                reader,
                decoder,
                aborted,
            } => loop {
                let xid = *xid;
                let spill_err = |source| AssemblerError::Spill { xid, source };
                let mut header = [0u8; RECORD_HEADER];
                match reader.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(spill_err(e)),
                }
                let [kind, s0, s1, s2, s3, l0, l1, l2, l3] = header;
                let subxid = u32::from_be_bytes([s0, s1, s2, s3]);
                let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
                let mut raw = vec![0u8; len];
                reader.read_exact(&mut raw).map_err(spill_err)?;
                let corrupt = |source| AssemblerError::CorruptSpill { xid, source };
                if kind == RECORD_RELATION || kind == RECORD_STREAM_RELATION {
                    // Into the replay decoder's main cache, or the overlay of this stream: changes
                    // are decoded in the stream's state below and look in both, as they did live.
                    decoder.set_stream_xid((kind == RECORD_STREAM_RELATION).then_some(xid));
                    decoder.decode(Bytes::from(raw)).map_err(corrupt)?;
                    continue;
                }
                if aborted.contains(&subxid) {
                    continue;
                }
                decoder.set_stream_xid(Some(xid));
                let msg = decoder.decode(Bytes::from(raw)).map_err(corrupt)?;
                match Change::from_message(msg) {
                    Ok(change) => return Ok(Some(change)),
                    Err(_) => {
                        return Err(corrupt(DecodeError::StreamState {
                            tag: super::pgoutput::Tag(kind),
                            offset: 0,
                            problem: "spilled record is not a change",
                        }))
                    }
                }
            },
        }
    }
}

#[derive(Debug)]
enum Pending {
    Event(TxnEvent),
    Replay(Box<Replay>),
}

/// Where in the transaction structure the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    InTxn {
        xid: u32,
        final_lsn: Lsn,
    },
    /// Between Stream Start and Stream Stop of the top-level `xid`.
    InStream {
        xid: u32,
    },
}

/// Validates the transaction structure and yields the events of committed transactions (see the
/// module documentation).
#[derive(Debug)]
pub struct Assembler {
    decoder: Decoder,
    config: AssemblerConfig,
    state: State,
    streams: HashMap<u32, StreamedTxn>,
    /// Sum of `StreamedTxn::mem`.
    stream_mem: usize,
    pending: VecDeque<Pending>,
}

impl Assembler {
    pub fn new(proto_version: u32, config: AssemblerConfig) -> Result<Self, AssemblerError> {
        Ok(Assembler {
            decoder: Decoder::new(proto_version)?,
            config,
            state: State::Idle,
            streams: HashMap::new(),
            stream_mem: 0,
            pending: VecDeque::new(),
        })
    }

    /// The decoder, for its relation cache.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The xid of the non-streamed transaction between its Begin and Commit, if any. While it is
    /// open, a keepalive's LSN must not be confirmed. Streamed transactions still buffered do not
    /// count: their commit lies after any position confirmed now, so Postgres streams them again
    /// in full after a restart.
    pub fn open_transaction(&self) -> Option<u32> {
        match self.state {
            State::InTxn { xid, .. } => Some(xid),
            State::Idle | State::InStream { .. } => None,
        }
    }

    /// Bytes of streamed, uncommitted changes held in memory.
    pub fn buffered_bytes(&self) -> usize {
        self.stream_mem
    }

    /// How many streamed transactions are open, and how many of them are spilled to disk.
    pub fn streamed_transactions(&self) -> (usize, usize) {
        let spilled = self.streams.values().filter(|t| t.spill.is_some()).count();
        (self.streams.len(), spilled)
    }

    /// Decodes one XLogData payload (`wal_start` is the XLogData's start LSN) and queues its events;
    /// take them with [`next_event`](Self::next_event) before feeding the next payload, so that
    /// memory stays bounded.
    pub fn feed(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), AssemblerError> {
        let raw = data.clone();
        let msg = self
            .decoder
            .decode(data)
            .map_err(|source| AssemblerError::Decode { wal_start, source })?;
        let unexpected =
            |what: &'static str, state: &'static str| AssemblerError::UnexpectedMessage {
                wal_start,
                what,
                state,
            };
        let msg = match Change::from_message(msg) {
            Ok(change) => return self.change(wal_start, raw, change),
            Err(msg) => msg,
        };
        match (msg, self.state) {
            (LogicalMessage::Message(message), _) => {
                // Non-transactional (transactional ones are changes): delivered at once.
                self.emit(TxnEvent::NonTxnMessage(NonTxnMessage {
                    wal_start,
                    message,
                }));
            }
            (
                LogicalMessage::Relation(_) | LogicalMessage::Type(_) | LogicalMessage::Origin(_),
                _,
            ) => {
                // Schema and origin information: the decoder keeps what changes need.
            }
            (LogicalMessage::Begin(b), State::Idle) => {
                self.state = State::InTxn {
                    xid: b.xid,
                    final_lsn: b.final_lsn,
                };
                self.emit(TxnEvent::Begin {
                    xid: b.xid,
                    final_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                });
            }
            (LogicalMessage::Begin(b), State::InTxn { xid, .. }) => {
                return Err(AssemblerError::NestedTransaction {
                    wal_start,
                    xid: b.xid,
                    open_xid: xid,
                })
            }
            (LogicalMessage::Commit(c), State::InTxn { xid, final_lsn }) => {
                if c.commit_lsn != final_lsn {
                    return Err(AssemblerError::CommitLsnMismatch {
                        xid,
                        final_lsn,
                        commit_lsn: c.commit_lsn,
                    });
                }
                self.state = State::Idle;
                self.emit(TxnEvent::Commit {
                    xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                });
            }
            (LogicalMessage::Commit(c), State::Idle) => {
                return Err(AssemblerError::CommitWithoutBegin {
                    wal_start,
                    commit_lsn: c.commit_lsn,
                })
            }
            (LogicalMessage::StreamStart(s), State::Idle) => {
                self.state = State::InStream { xid: s.xid };
                self.streams.entry(s.xid).or_default();
            }
            (LogicalMessage::StreamStop, State::InStream { .. }) => self.state = State::Idle,
            (LogicalMessage::StreamCommit(c), State::Idle) => self.stream_commit(wal_start, c)?,
            (LogicalMessage::StreamAbort(a), State::Idle) => self.stream_abort(a.xid, a.subxid),
            (LogicalMessage::Begin(_), State::InStream { .. }) => {
                return Err(unexpected("Begin", "inside a stream block"))
            }
            (LogicalMessage::Commit(_), State::InStream { .. }) => {
                return Err(unexpected("Commit", "inside a stream block"))
            }
            (LogicalMessage::StreamStart(_), _) => {
                return Err(unexpected("Stream Start", "inside a transaction"))
            }
            (LogicalMessage::StreamStop, _) => {
                return Err(unexpected("Stream Stop", "outside a stream block"))
            }
            (LogicalMessage::StreamCommit(_), _) => {
                return Err(unexpected(
                    "Stream Commit",
                    "inside a transaction or stream block",
                ))
            }
            (LogicalMessage::StreamAbort(_), _) => {
                return Err(unexpected(
                    "Stream Abort",
                    "inside a transaction or stream block",
                ))
            }
            (
                LogicalMessage::Insert(_)
                | LogicalMessage::Update(_)
                | LogicalMessage::Delete(_)
                | LogicalMessage::Truncate(_),
                _,
            ) => {
                // `Change::from_message` took every one of these above.
            }
        }
        Ok(())
    }

    /// The next event, or `None` when everything fed so far has been yielded. Replaying a spilled
    /// transaction reads its file one record at a time here.
    pub fn next_event(&mut self) -> Result<Option<TxnEvent>, AssemblerError> {
        loop {
            match self.pending.front_mut() {
                None => return Ok(None),
                Some(Pending::Replay(replay)) => match replay.next()? {
                    Some(change) => return Ok(Some(TxnEvent::Change(change))),
                    None => {
                        self.pending.pop_front();
                    }
                },
                Some(Pending::Event(_)) => {
                    if let Some(Pending::Event(ev)) = self.pending.pop_front() {
                        return Ok(Some(ev));
                    }
                }
            }
        }
    }

    /// Feeds one payload and returns all its events. Convenient for tests; it holds a whole
    /// replayed streamed transaction in memory, which the relay must not do.
    pub fn feed_collect(
        &mut self,
        wal_start: Lsn,
        data: Bytes,
    ) -> Result<Vec<TxnEvent>, AssemblerError> {
        self.feed(wal_start, data)?;
        let mut out = Vec::new();
        while let Some(ev) = self.next_event()? {
            out.push(ev);
        }
        Ok(out)
    }

    fn emit(&mut self, ev: TxnEvent) {
        self.pending.push_back(Pending::Event(ev));
    }

    fn change(&mut self, wal_start: Lsn, raw: Bytes, change: Change) -> Result<(), AssemblerError> {
        match self.state {
            State::InTxn { .. } => {
                self.emit(TxnEvent::Change(change));
                Ok(())
            }
            State::InStream { xid } => {
                let subxid = change.xid().unwrap_or(xid);
                let b = Buffered {
                    subxid,
                    raw,
                    change,
                };
                let Some(txn) = self.streams.get_mut(&xid) else {
                    // Stream Start always creates the entry; be total anyway.
                    return Err(AssemblerError::UnknownStreamedTransaction { wal_start, xid });
                };
                match &mut txn.spill {
                    Some(spill) => spill
                        .write(&b)
                        .map_err(|source| AssemblerError::Spill { xid, source })?,
                    None => {
                        txn.mem += b.cost();
                        self.stream_mem += b.cost();
                        txn.buffered.push(b);
                    }
                }
                self.enforce_budget()
            }
            State::Idle => Err(AssemblerError::ChangeOutsideTransaction {
                wal_start,
                kind: change.kind(),
            }),
        }
    }

    /// Spills the largest in-memory streamed transactions until the budget holds.
    fn enforce_budget(&mut self) -> Result<(), AssemblerError> {
        while self.stream_mem > self.config.memory_budget {
            let largest = self
                .streams
                .iter()
                .filter(|(_, t)| t.mem > 0)
                .max_by_key(|(_, t)| t.mem)
                .map(|(&xid, _)| xid);
            let Some(xid) = largest else { break };
            self.spill(xid)
                .map_err(|source| AssemblerError::Spill { xid, source })?;
        }
        Ok(())
    }

    fn spill(&mut self, xid: u32) -> io::Result<()> {
        let Some(txn) = self.streams.get_mut(&xid) else {
            return Ok(());
        };
        if txn.spill.is_none() {
            let file = match &self.config.spill_dir {
                Some(dir) => tempfile::tempfile_in(dir)?,
                None => tempfile::tempfile()?,
            };
            tracing::debug!(
                xid,
                "streamed transaction over the memory budget, spilling to disk"
            );
            txn.spill = Some(SpillWriter {
                file: BufWriter::new(file),
                relations: HashMap::new(),
            });
        }
        let buffered = mem::take(&mut txn.buffered);
        self.stream_mem -= mem::take(&mut txn.mem);
        if let Some(spill) = &mut txn.spill {
            for b in &buffered {
                spill.write(b)?;
            }
        }
        Ok(())
    }

    fn stream_abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(txn) = self.streams.remove(&xid) {
                self.stream_mem -= txn.mem;
            }
            return;
        }
        if let Some(txn) = self.streams.get_mut(&xid) {
            txn.buffered.retain(|b| b.subxid != subxid);
            let mem: usize = txn.buffered.iter().map(Buffered::cost).sum();
            self.stream_mem -= txn.mem - mem;
            txn.mem = mem;
            if txn.spill.is_some() {
                txn.aborted_subxids.insert(subxid);
            }
        }
    }

    fn stream_commit(&mut self, wal_start: Lsn, c: StreamCommit) -> Result<(), AssemblerError> {
        let xid = c.xid;
        let Some(txn) = self.streams.remove(&xid) else {
            return Err(AssemblerError::UnknownStreamedTransaction { wal_start, xid });
        };
        self.stream_mem -= txn.mem;
        let replay = match txn.spill {
            None => Replay::Memory(txn.buffered.into_iter()),
            Some(spill) => {
                let spill_err = |source| AssemblerError::Spill { xid, source };
                let mut file = spill
                    .file
                    .into_inner()
                    .map_err(|e| spill_err(e.into_error()))?;
                file.seek(SeekFrom::Start(0)).map_err(spill_err)?;
                Replay::Spill {
                    xid,
                    reader: BufReader::new(file),
                    decoder: Box::new(Decoder::new(2)?),
                    aborted: txn.aborted_subxids,
                }
            }
        };
        self.emit(TxnEvent::Begin {
            xid,
            final_lsn: c.commit_lsn,
            commit_time: c.commit_time,
        });
        self.pending.push_back(Pending::Replay(Box::new(replay)));
        self.emit(TxnEvent::Commit {
            xid,
            commit_lsn: c.commit_lsn,
            end_lsn: c.end_lsn,
            commit_time: c.commit_time,
        });
        Ok(())
    }
}

/// A whole committed transaction, for tests and tools that can afford to hold one in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssembledTxn {
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub changes: Vec<Change>,
}

/// Everything a sequence of messages produced, grouped by transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assembled {
    pub transactions: Vec<AssembledTxn>,
    pub non_txn_messages: Vec<NonTxnMessage>,
}

impl Assembled {
    /// Groups events; changes of a transaction whose Commit has not been seen yet are left out.
    pub fn from_events(events: impl IntoIterator<Item = TxnEvent>) -> Self {
        let mut out = Assembled::default();
        let mut open: Vec<Change> = Vec::new();
        for ev in events {
            match ev {
                TxnEvent::Begin { .. } => open.clear(),
                TxnEvent::Change(c) => open.push(c),
                TxnEvent::Commit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                } => out.transactions.push(AssembledTxn {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    changes: mem::take(&mut open),
                }),
                TxnEvent::NonTxnMessage(m) => out.non_txn_messages.push(m),
            }
        }
        out
    }
}

/// Runs `messages` (XLogData start LSN and payload) through a new assembler and groups the result.
pub fn assemble(
    proto_version: u32,
    config: AssemblerConfig,
    messages: impl IntoIterator<Item = (Lsn, Bytes)>,
) -> Result<Assembled, AssemblerError> {
    let mut asm = Assembler::new(proto_version, config)?;
    let mut events = Vec::new();
    for (lsn, data) in messages {
        events.extend(asm.feed_collect(lsn, data)?);
    }
    Ok(Assembled::from_events(events))
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::fixtures::{capture, PG15_V1, PG15_V2_STREAMING};
    use super::super::pgoutput::{
        Begin, Column, Commit, RelColumn, ReplicaIdentity, StreamAbort, StreamStart, TupleData,
    };
    use super::*;

    fn relation(oid: u32, xid: Option<u32>, columns: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            xid,
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|c| RelColumn {
                    flags: 0,
                    name: (*c).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn row(values: &[&str]) -> TupleData {
        TupleData {
            columns: values
                .iter()
                .map(|v| Column::Text(Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        }
    }

    fn insert(xid: Option<u32>, rel: &Arc<Relation>, values: &[&str]) -> LogicalMessage {
        LogicalMessage::Insert(Insert {
            xid,
            relation: Arc::clone(rel),
            new: row(values),
        })
    }

    fn begin(xid: u32, final_lsn: u64) -> LogicalMessage {
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(final_lsn),
            commit_time: PgTimestamp(1),
            xid,
        })
    }

    fn commit(commit_lsn: u64) -> LogicalMessage {
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 8),
            commit_time: PgTimestamp(1),
        })
    }

    fn start(xid: u32, first_segment: bool) -> LogicalMessage {
        LogicalMessage::StreamStart(StreamStart { xid, first_segment })
    }

    fn stream_commit(xid: u32, commit_lsn: u64) -> LogicalMessage {
        LogicalMessage::StreamCommit(StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 8),
            commit_time: PgTimestamp(2),
        })
    }

    fn abort(xid: u32, subxid: u32) -> LogicalMessage {
        LogicalMessage::StreamAbort(StreamAbort { xid, subxid })
    }

    fn message(xid: Option<u32>, transactional: bool, content: &str) -> LogicalMessage {
        LogicalMessage::Message(Message {
            xid,
            transactional,
            lsn: Lsn(77),
            prefix: "outbox".into(),
            content: Bytes::copy_from_slice(content.as_bytes()),
        })
    }

    fn budget(memory_budget: usize) -> AssemblerConfig {
        AssemblerConfig {
            memory_budget,
            spill_dir: None,
        }
    }

    /// Feeds messages (at consecutive fake LSNs) and returns every event.
    fn run(asm: &mut Assembler, msgs: &[LogicalMessage]) -> Result<Vec<TxnEvent>, AssemblerError> {
        let mut out = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            out.extend(asm.feed_collect(Lsn(i as u64 + 1), m.to_bytes())?);
        }
        Ok(out)
    }

    /// The text values of the first column of each Insert.
    fn first_values(txn: &AssembledTxn) -> Vec<String> {
        txn.changes
            .iter()
            .filter_map(|c| match c {
                Change::Insert(i) => i.new.columns.first().and_then(Column::bytes),
                _ => None,
            })
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn pg15_v1_capture_assembles_committed_transactions() {
        let messages = capture(PG15_V1);
        let commits = messages
            .iter()
            .filter(|(_, m)| m.first() == Some(&b'C'))
            .count();
        let out = assemble(1, AssemblerConfig::default(), messages).unwrap();
        assert_eq!(out.transactions.len(), commits);
        let first = out.transactions.first().unwrap();
        assert_eq!(first.xid, 0x2d7);
        assert_eq!(first.commit_lsn, "0/1535720".parse().unwrap());
        assert_eq!(first.end_lsn, "0/1535750".parse().unwrap());
        let [Change::Insert(i)] = first.changes.as_slice() else {
            panic!("{:?}", first.changes)
        };
        assert_eq!(i.relation.name, "outbox");
        // The transactional message is a change of its transaction; the other one stands alone.
        assert!(out.transactions.iter().any(|t| matches!(
            t.changes.as_slice(),
            [Change::Message(m)] if m.prefix == "outbox"
        )));
        let [hb] = out.non_txn_messages.as_slice() else {
            panic!("{:?}", out.non_txn_messages)
        };
        assert_eq!(hb.message.prefix, "heartbeat");
        assert_eq!(hb.wal_start, "0/1657238".parse().unwrap());
        // Commit LSNs ascend, as the relay's de-duplication by LSN assumes.
        assert!(out
            .transactions
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.commit_lsn < b.commit_lsn)));
    }

    /// The streamed transaction 0x2e9 committed: 700 rows, the message, the row of the later
    /// subtransaction; not the 218 rows of the aborted savepoint; 0x2ec rolled back entirely.
    fn check_pg15_streaming(out: &Assembled) {
        let xids: Vec<u32> = out.transactions.iter().map(|t| t.xid).collect();
        assert_eq!(xids, [0x2e9, 0x2ed]);
        let t = out.transactions.first().unwrap();
        assert_eq!(t.changes.len(), 702);
        let values = first_values(t);
        let expected: Vec<String> = (10001..=10700)
            .map(|i| i.to_string())
            .chain(["12000".to_string()])
            .collect();
        assert_eq!(values, expected);
        assert!(matches!(
            t.changes.get(700),
            Some(Change::Message(m)) if m.content.as_ref() == b"in-stream"
        ));
        assert_eq!(first_values(out.transactions.get(1).unwrap()), ["15000"]);
    }

    #[test]
    fn pg15_streamed_transactions_in_memory_and_spilled_agree() {
        let messages = capture(PG15_V2_STREAMING);
        let in_memory = assemble(2, AssemblerConfig::default(), messages.clone()).unwrap();
        check_pg15_streaming(&in_memory);

        for limit in [0, 4096, 40_000] {
            let mut asm = Assembler::new(2, budget(limit)).unwrap();
            let mut events = Vec::new();
            let mut spilled_seen = false;
            for (lsn, data) in messages.clone() {
                asm.feed(lsn, data).unwrap();
                // The bound holds after every message.
                assert!(
                    asm.buffered_bytes() <= limit,
                    "{} > {limit}",
                    asm.buffered_bytes()
                );
                spilled_seen |= asm.streamed_transactions().1 > 0;
                while let Some(ev) = asm.next_event().unwrap() {
                    events.push(ev);
                }
            }
            assert!(spilled_seen, "budget {limit} never spilled");
            assert_eq!(asm.streamed_transactions(), (0, 0));
            // (Not assert_eq!: a difference would print some megabytes.)
            assert!(
                Assembled::from_events(events) == in_memory,
                "budget {limit} differs"
            );
        }
    }

    #[test]
    fn non_streamed_changes_pass_through_before_commit() {
        let r = relation(1, None, &["a"]);
        let mut asm = Assembler::new(1, AssemblerConfig::default()).unwrap();
        run(&mut asm, &[LogicalMessage::Relation(Arc::clone(&r))]).unwrap();
        let ev = asm.feed_collect(Lsn(1), begin(5, 100).to_bytes()).unwrap();
        assert!(matches!(ev.as_slice(), [TxnEvent::Begin { xid: 5, .. }]));
        assert_eq!(asm.open_transaction(), Some(5));
        let ev = asm
            .feed_collect(Lsn(2), insert(None, &r, &["x"]).to_bytes())
            .unwrap();
        assert!(matches!(
            ev.as_slice(),
            [TxnEvent::Change(Change::Insert(_))]
        ));
        let ev = asm.feed_collect(Lsn(3), commit(100).to_bytes()).unwrap();
        assert_eq!(
            ev,
            [TxnEvent::Commit {
                xid: 5,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(108),
                commit_time: PgTimestamp(1)
            }]
        );
        assert_eq!(asm.open_transaction(), None);
    }

    #[test]
    fn structural_errors() {
        let r = relation(1, None, &["a"]);
        let announce = LogicalMessage::Relation(Arc::clone(&r));
        let fresh = || Assembler::new(1, AssemblerConfig::default()).unwrap();

        let e = run(&mut fresh(), &[begin(5, 100), commit(101)]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::CommitLsnMismatch {
                    xid: 5,
                    final_lsn: Lsn(100),
                    commit_lsn: Lsn(101)
                }
            ),
            "{e:?}"
        );

        let e = run(&mut fresh(), &[begin(5, 100), begin(6, 200)]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::NestedTransaction {
                    xid: 6,
                    open_xid: 5,
                    wal_start: Lsn(2)
                }
            ),
            "{e:?}"
        );

        let e = run(&mut fresh(), &[announce.clone(), insert(None, &r, &["x"])]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::ChangeOutsideTransaction {
                    kind: "Insert",
                    wal_start: Lsn(2)
                }
            ),
            "{e:?}"
        );

        let e = run(&mut fresh(), &[message(None, true, "m")]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::ChangeOutsideTransaction {
                    kind: "transactional Message",
                    ..
                }
            ),
            "{e:?}"
        );

        let e = run(&mut fresh(), &[commit(100)]).unwrap_err();
        assert!(
            matches!(e, AssemblerError::CommitWithoutBegin { .. }),
            "{e:?}"
        );

        let e = run(&mut fresh(), &[insert(None, &r, &["x"])]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::Decode {
                    source: DecodeError::UnknownRelation { oid: 1, .. },
                    ..
                }
            ),
            "{e:?}"
        );

        let v2 = || Assembler::new(2, AssemblerConfig::default()).unwrap();
        let e = run(&mut v2(), &[start(9, true), begin(9, 1)]).unwrap_err();
        assert!(
            matches!(e, AssemblerError::UnexpectedMessage { what: "Begin", .. }),
            "{e:?}"
        );
        let e = run(&mut v2(), &[begin(5, 100), start(9, true)]).unwrap_err();
        assert!(
            matches!(
                e,
                AssemblerError::UnexpectedMessage {
                    what: "Stream Start",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = run(&mut v2(), &[stream_commit(9, 100)]).unwrap_err();
        assert!(
            matches!(e, AssemblerError::UnknownStreamedTransaction { xid: 9, .. }),
            "{e:?}"
        );
        assert!(matches!(
            Assembler::new(4, AssemblerConfig::default()),
            Err(AssemblerError::UnsupportedProtocolVersion(_))
        ));
    }

    /// A streamed transaction with three subtransactions and a relation that changes shape
    /// between its blocks.
    fn streamed_script() -> Vec<LogicalMessage> {
        let r2 = relation(1, Some(10), &["a", "b"]);
        let r1 = relation(1, Some(10), &["a"]);
        vec![
            start(10, true),
            LogicalMessage::Relation(Arc::clone(&r1)),
            insert(Some(10), &r1, &["top-1"]),
            LogicalMessage::Truncate(Truncate {
                xid: Some(11),
                options: 3,
                relations: vec![Arc::clone(&r1)],
            }),
            insert(Some(11), &r1, &["sub11-1"]),
            insert(Some(12), &r1, &["sub12-1"]),
            LogicalMessage::StreamStop,
            // Another streamed transaction, interleaved, later aborted.
            start(20, true),
            LogicalMessage::Relation(relation(1, Some(20), &["zzz"])),
            insert(Some(20), &r1, &["other"]),
            LogicalMessage::StreamStop,
            start(10, false),
            message(Some(12), false, "non-transactional"),
            LogicalMessage::Relation(Arc::clone(&r2)),
            insert(Some(12), &r2, &["sub12-2", "b"]),
            insert(Some(10), &r2, &["top-2", "b"]),
            LogicalMessage::StreamStop,
            abort(10, 12),
            abort(20, 20),
            stream_commit(10, 500),
        ]
    }

    #[test]
    fn streamed_transaction_emits_nothing_before_stream_commit_and_drops_aborts() {
        for limit in [usize::MAX, 0] {
            let mut asm = Assembler::new(2, budget(limit)).unwrap();
            let script = streamed_script();
            let (before, last) = script.split_at(script.len() - 1);
            let events = run(&mut asm, before).unwrap();
            // Only the non-transactional message got out before Stream Commit.
            let [TxnEvent::NonTxnMessage(m)] = events.as_slice() else {
                panic!("{events:?}")
            };
            assert_eq!(m.message.content.as_ref(), b"non-transactional");
            assert_eq!(asm.streamed_transactions(), (1, usize::from(limit == 0)));

            let events = run(&mut asm, last).unwrap();
            assert!(matches!(
                events.first(),
                Some(TxnEvent::Begin {
                    xid: 10,
                    final_lsn: Lsn(500),
                    commit_time: PgTimestamp(2)
                })
            ));
            assert!(matches!(
                events.last(),
                Some(TxnEvent::Commit {
                    xid: 10,
                    commit_lsn: Lsn(500),
                    end_lsn: Lsn(508),
                    ..
                })
            ));
            let out = Assembled::from_events(events);
            let [t] = out.transactions.as_slice() else {
                panic!()
            };
            assert_eq!(
                first_values(t),
                ["top-1", "sub11-1", "top-2"],
                "budget {limit}"
            );
            assert!(matches!(
                t.changes.get(1),
                Some(Change::Truncate(tr)) if tr.cascade() && tr.restart_identity()
                    && tr.relations.len() == 1
            ));
            // Each change resolved against the relation as it was when sent, also after a spill.
            let widths: Vec<usize> = t
                .changes
                .iter()
                .filter_map(|c| match c {
                    Change::Insert(i) => Some(i.relation.columns.len()),
                    _ => None,
                })
                .collect();
            assert_eq!(widths, [1, 1, 2]);
            // The committed stream's relation now serves later transactions.
            assert_eq!(asm.decoder().relation(1).unwrap().columns.len(), 2);
            assert_eq!(asm.buffered_bytes(), 0);
        }
    }

    #[test]
    fn spilled_replay_is_pulled_one_event_at_a_time() {
        let r = relation(1, Some(10), &["a"]);
        let mut msgs = vec![start(10, true), LogicalMessage::Relation(Arc::clone(&r))];
        for i in 0..1000 {
            msgs.push(insert(Some(10), &r, &[&format!("{i}")]));
        }
        msgs.extend([LogicalMessage::StreamStop, stream_commit(10, 900)]);
        let mut asm = Assembler::new(2, budget(1000)).unwrap();
        for (i, m) in msgs.iter().enumerate() {
            asm.feed(Lsn(i as u64), m.to_bytes()).unwrap();
        }
        assert_eq!(asm.buffered_bytes(), 0);
        // One Begin, a lazy replay, one Commit are queued; the changes stay on disk until pulled.
        assert_eq!(asm.pending.len(), 3);
        let mut n = 0;
        while let Some(ev) = asm.next_event().unwrap() {
            if let TxnEvent::Change(Change::Insert(i)) = ev {
                assert_eq!(i.new, row(&[&n.to_string()]));
                n += 1;
            }
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn spill_dir_failure_is_a_typed_error() {
        let r = relation(1, Some(10), &["a"]);
        let mut asm = Assembler::new(
            2,
            AssemblerConfig {
                memory_budget: 0,
                spill_dir: Some("/nonexistent/spill/dir".into()),
            },
        )
        .unwrap();
        let e = run(
            &mut asm,
            &[
                start(10, true),
                LogicalMessage::Relation(Arc::clone(&r)),
                insert(Some(10), &r, &["x"]),
            ],
        )
        .unwrap_err();
        assert!(matches!(e, AssemblerError::Spill { xid: 10, .. }), "{e:?}");
    }

    /// One step of a random replication stream: `top` and `sub` pick among a few transactions.
    #[derive(Clone, Debug)]
    enum Op {
        Change { top: u32, sub: u32 },
        AbortSub { top: u32, sub: u32 },
        Abort { top: u32 },
        Commit { top: u32 },
        Plain,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..3u32, 0..3u32).prop_map(|(top, sub)| Op::Change { top, sub }),
            1 => (0..3u32, 1..3u32).prop_map(|(top, sub)| Op::AbortSub { top, sub }),
            1 => (0..3u32).prop_map(|top| Op::Abort { top }),
            2 => (0..3u32).prop_map(|top| Op::Commit { top }),
            1 => Just(Op::Plain),
        ]
    }

    /// Builds the pgoutput stream for `ops` and the committed transactions a correct assembler
    /// yields: (xid, first column of each insert).
    fn script(ops: &[Op]) -> (Vec<LogicalMessage>, Vec<(u32, Vec<String>)>) {
        let r = relation(1, None, &["v"]);
        let mut msgs = vec![LogicalMessage::Relation(Arc::clone(&r))];
        // A slot's top-level xid changes after each commit or abort: xids are never reused.
        let mut generation: HashMap<u32, u32> = HashMap::new();
        let xid_of = |top: u32, g: &HashMap<u32, u32>| 1000 + top * 100 + g.get(&top).unwrap_or(&0);
        let mut open: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
        // Live subxid per (top xid, sub slot); like xids, an aborted subxid is never reused.
        let mut subxids: HashMap<(u32, u32), u32> = HashMap::new();
        let mut next_subxid = 100_000;
        let mut expected = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let lsn = 100 + 10 * i as u64;
            match *op {
                Op::Change { top, sub } => {
                    let xid = xid_of(top, &generation);
                    let subxid = if sub == 0 {
                        xid
                    } else {
                        *subxids.entry((xid, sub)).or_insert_with(|| {
                            next_subxid += 1;
                            next_subxid
                        })
                    };
                    let first = !open.contains_key(&xid);
                    let value = format!("v{i}");
                    open.entry(xid).or_default().push((subxid, value.clone()));
                    msgs.push(start(xid, first));
                    msgs.push(insert(Some(subxid), &r, &[&value]));
                    msgs.push(LogicalMessage::StreamStop);
                }
                Op::AbortSub { top, sub } => {
                    let xid = xid_of(top, &generation);
                    if let (Some(changes), Some(subxid)) =
                        (open.get_mut(&xid), subxids.remove(&(xid, sub)))
                    {
                        changes.retain(|(s, _)| *s != subxid);
                        msgs.push(abort(xid, subxid));
                    }
                }
                Op::Abort { top } => {
                    let xid = xid_of(top, &generation);
                    if open.remove(&xid).is_some() {
                        msgs.push(abort(xid, xid));
                        *generation.entry(top).or_default() += 1;
                    }
                }
                Op::Commit { top } => {
                    let xid = xid_of(top, &generation);
                    if let Some(changes) = open.remove(&xid) {
                        msgs.push(stream_commit(xid, lsn));
                        expected.push((xid, changes.into_iter().map(|(_, v)| v).collect()));
                        *generation.entry(top).or_default() += 1;
                    }
                }
                Op::Plain => {
                    let xid = 5000 + i as u32;
                    msgs.push(begin(xid, lsn));
                    msgs.push(insert(None, &r, &[&format!("p{i}")]));
                    msgs.push(commit(lsn));
                    expected.push((xid, vec![format!("p{i}")]));
                }
            }
        }
        (msgs, expected)
    }

    proptest::proptest! {
        /// Random interleavings of streamed transactions, subtransaction aborts and plain
        /// transactions give the committed transactions of a simple model, whatever the memory
        /// budget (all in memory, always spilled, or in between).
        #[test]
        fn streamed_transactions_match_a_model(ops in proptest::collection::vec(op(), 0..60)) {
            let (msgs, expected) = script(&ops);
            for limit in [usize::MAX, 0, 300] {
                let mut asm = Assembler::new(2, budget(limit)).unwrap();
                let out = Assembled::from_events(run(&mut asm, &msgs).unwrap());
                let got: Vec<(u32, Vec<String>)> =
                    out.transactions.iter().map(|t| (t.xid, first_values(t))).collect();
                proptest::prop_assert_eq!(&got, &expected, "budget {}", limit);
                proptest::prop_assert!(asm.buffered_bytes() <= limit);
            }
        }
    }
}
