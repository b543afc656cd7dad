//! How orders come in and are read: intake (shared by every interface), listing, the HTTP API and the
//! `orders` NATS service.

pub mod http;
pub mod intake;
pub mod list;
pub mod service;
