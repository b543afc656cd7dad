//! Orderly: order processing on NATS JetStream.
//!
//! An order is accepted into the `ORDERS` work-queue stream and the `orders` bucket, then runs through
//! four steps on one of N nodes sharing one pull consumer. The order's document in the bucket is the
//! authority on its progress and its owner; every write to it is a compare-and-set.

pub mod audit;
pub mod cluster;
pub mod config;
pub mod events;
pub mod follow;
pub mod give_up;
pub mod http;
pub mod intake;
pub mod lease;
pub mod metrics;
pub mod nats;
pub mod node;
pub mod order;
pub mod pipeline;
pub mod store;
pub mod sweep;
pub mod worker;
