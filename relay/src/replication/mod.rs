//! Postgres knowledge only, no Kafka: the streaming-replication protocol client, the pgoutput
//! decoder, the transaction assembler and slot management.
//!
//! ```text
//!  ReplicationClient (conn)      pgoutput::Decoder              assembler::Assembler
//!  CopyBoth 'w' XLogData  ──▶  Begin/Relation/Insert/…  ──▶  TxnEvent: Begin, Change…, Commit
//!           'k' keepalive      (relation cache, stream       of committed transactions only
//!                               block state)                 (xid, commit LSN, end LSN, time);
//!                                                            NonTxnMessage; streamed txns
//!                                                            buffered/spilled until Stream Commit
//!  ◀── 'r' standby status (flush = what the caller says is durable downstream)
//! ```
//!
//! `timeline` decides whether a position recorded on one timeline may be resumed from on the
//! server's current one (after a promotion or a point-in-time restore), from `TIMELINE_HISTORY`.

pub mod assembler;
pub mod conn;
pub mod lsn;
pub mod pgoutput;
pub mod snapshot;
pub mod timeline;

pub use lsn::Lsn;
