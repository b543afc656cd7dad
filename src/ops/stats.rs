//! What a node's workers are doing, as its diagnostics and its cluster heartbeat report it.

use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Counters the node shows in its diagnostics and cluster heartbeat.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub busy: AtomicUsize,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
}
