//! The work queue: the JetStream objects and connections, the pull loop that turns work messages into
//! leased orders, settling each message, ending orders whose deliveries are exhausted, following the
//! consumer's configuration and sweeping messages no node can receive.

pub mod connect;
pub mod delivery;
pub mod embedded;
pub mod follow;
pub mod give_up;
pub mod process;
pub mod pull;
pub mod settle;
pub mod setup;
pub mod sweep;
