//! How orders come in and are read: intake (shared by every interface), cancel and retry, listing,
//! the HTTP API (with its limits, its bearer tokens, the watch of an order and node control) and the `orders` NATS
//! service.

pub mod admin;
pub mod auth;
pub mod bodies;
mod connection;
pub mod control;
pub mod http;
pub mod intake;
pub mod limits;
pub mod list;
pub mod openapi;
pub mod service;
pub mod watch;
