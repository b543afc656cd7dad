//! The time as Orderly records it.

use chrono::{DateTime, SubsecRound, Utc};

/// The wall clock, to the millisecond, as the document records it.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}
