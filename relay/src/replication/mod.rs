//! Postgres knowledge only, no Kafka: the streaming-replication protocol client, the pgoutput
//! decoder, the transaction assembler and slot management.
//!
//! ```text
//!  ReplicationClient (conn)      pgoutput::decode           assembler
//!  CopyBoth 'w' XLogData  ──▶  Begin/Relation/Insert/…  ──▶  whole committed transactions
//!           'k' keepalive                                   (xid, commit LSN, end LSN, time)
//!  ◀── 'r' standby status (flush = what the caller says is durable downstream)
//! ```

pub mod assembler;
pub mod conn;
pub mod lsn;
pub mod pgoutput;

pub use lsn::Lsn;
