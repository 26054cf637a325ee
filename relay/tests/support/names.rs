//! Unique names and environment settings for tests (shared with the consumers' tests).

use std::sync::atomic::{AtomicU64, Ordering};

/// A name no other test (in this run or an earlier one) uses: `<prefix>_<pid>_<n>_<random>`.
/// Lowercase letters, digits and underscores only, so it is valid as a database, slot, topic
/// or transactional id.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!("{prefix}_{}_{n}_{r:08x}", std::process::id())
}

/// `name` from the environment, or `default`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}
