//! The order and its rules, with no I/O: what a document holds, which transitions it allows, what a
//! payload may be.

pub mod intent;
pub mod order;
pub mod payload;
