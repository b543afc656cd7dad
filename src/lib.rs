//! Orderly: order processing on NATS JetStream.
//!
//! An order is accepted into the `ORDERS` work-queue stream and the `orders` bucket, then runs through
//! four steps on one of N nodes sharing one pull consumer. The order's document in the bucket is the
//! authority on its progress and its owner; every write to it is a compare-and-set.

pub mod api;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod error;
pub mod node;
pub mod ops;
pub mod queue;
pub mod store;
