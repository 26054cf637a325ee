//! A sink that keeps nothing: for benchmarks of the reading side, and unit tests of the loop.
//! Its "checkpoint topic" is memory, so a restart starts from scratch.

use super::{Backend, SinkError};
use crate::checkpoint::Checkpoint;
use crate::outbox::OutRecord;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts what it was given; committed records and commits are visible through the shared counters.
#[derive(Clone, Debug, Default)]
pub struct NullBackend {
    pub committed_records: Arc<AtomicU64>,
    pub commits: Arc<AtomicU64>,
    pending: u64,
    last: Option<Checkpoint>,
}

impl Backend for NullBackend {
    fn open(&mut self, _key: &str) -> Result<Option<Checkpoint>, SinkError> {
        Ok(self.last.clone())
    }
    fn begin(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    fn send(&mut self, _record: OutRecord) -> Result<(), SinkError> {
        self.pending += 1;
        Ok(())
    }
    fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), SinkError> {
        self.committed_records
            .fetch_add(std::mem::take(&mut self.pending), Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.last = Some(checkpoint.clone());
        Ok(())
    }
    fn abort(&mut self) -> Result<(), SinkError> {
        self.pending = 0;
        Ok(())
    }
}
