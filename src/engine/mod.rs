//! Running an order: the lease a node holds on it, the one way to write under that lease, the
//! pipeline that walks the order's steps and rollbacks, and the steps themselves.

pub mod connection;
pub mod intent;
pub mod interrupt;
pub mod lease;
pub mod nats_steps;
pub(crate) mod pipeline;
pub mod steps;
pub mod window;
pub(crate) mod write;
