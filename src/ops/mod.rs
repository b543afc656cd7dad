//! What operators see: metrics, the audit log of lease intervals, order events, the cluster view and
//! the node's counters.

pub mod audit;
pub mod cluster;
pub(crate) mod events;
pub(crate) mod metrics;
pub(crate) mod rate;
pub mod stats;
