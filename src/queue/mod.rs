//! The work queue: the JetStream objects and connections, the pull loop that turns work messages into
//! leased orders, settling each message, ending orders whose deliveries are exhausted, following the
//! consumer's configuration and sweeping messages no node can receive.

pub(crate) mod connect;
pub(crate) mod credentials;
pub(crate) mod delivery;
pub(crate) mod embedded;
pub(crate) mod follow;
pub(crate) mod give_up;
pub(crate) mod process;
pub(crate) mod pull;
pub(crate) mod settle;
pub mod setup;
pub(crate) mod sweep;
pub(crate) mod wake;
