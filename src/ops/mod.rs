//! What operators see: metrics, the audit log of lease intervals, order events, the cluster view and
//! the node's counters.

pub mod audit;
pub mod cluster;
pub mod events;
pub mod metrics;
pub mod rate;
pub mod stats;
