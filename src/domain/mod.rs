//! The order and its rules, with no I/O: what a document holds, which transitions it allows, what a
//! payload may be, how large a document may grow.

pub mod intent;
pub mod limits;
pub mod order;
pub mod payload;
