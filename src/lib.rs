//! Orderly: order processing on NATS JetStream.
//!
//! An order is accepted into the `ORDERS` work-queue stream and the `orders` bucket, then runs through
//! four steps on one of N nodes sharing one pull consumer. The order's document in the bucket is the
//! authority on its progress and its owner; every write to it is a compare-and-set made under the
//! lease the node holds on the order's work message.
//!
//! The layout, from the top down (each layer uses only the ones below it; `docs/architecture.md` has
//! the whole map and the mechanisms):
//!
//! - [`node`]: wires a node from its parts, runs its tasks, drains it; [`config`] is its settings.
//! - `api`: intake (shared by every interface), the HTTP API, the `orders` NATS service.
//! - [`queue`]: the JetStream objects and connections, the pull loop, one delivery from arrival to
//!   outcome, settling (the one way to ack, nak or terminate), giving up, following the consumer, the
//!   sweep.
//! - [`engine`]: the lease, writing under it (the one lease-guarded compare-and-set), the pipeline over
//!   steps and rollbacks, the [`Steps`] seam and its runners (simulated, step handlers over NATS),
//!   intents.
//! - [`store`]: the `orders` bucket, and the order index it keeps ([`index`]).
//! - [`ops`]: metrics, the lease audit, order events, the cluster view.
//! - [`domain`]: the order, its payload and its intents: pure.
//! - [`bench`]: `orderly bench`, which measures nodes against the floor of their NATS operations.
//! - [`cli`]: the terminal client (`orderly submit | get | list | cancel | retry | watch`), over the
//!   HTTP API.
//!
//! A library user runs a node with steps of their own through [`run_with`].

mod api;
pub mod bench;
pub mod cli;
mod clock;
pub mod config;
pub mod domain;
pub mod engine;
mod error;
pub mod index;
pub mod node;
pub mod ops;
pub mod queue;
pub mod store;
mod task;

pub use config::Config;
pub use domain::order::{Order, State, Step, StepOutput};
pub use engine::nats_steps::NatsSteps;
pub use engine::steps::{Simulated, StepCall, StepOutcome, Steps};
pub use node::{run, run_with};
