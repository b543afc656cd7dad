//! How large an order's document may grow, and what keeps it there: every text that goes into it is
//! bounded, and a retry keeps only as much of the order's history as leaves room for one more attempt.
//! A document that fits every write an attempt can make is never stuck behind a write that cannot fit
//! in a NATS message.

/// The largest document the store writes, in bytes: well under NATS's default 1 MiB message limit,
/// with room for the KV headers. A larger one is refused by the store, never retried.
pub const DOCUMENT_LIMIT: usize = 768 * 1024;

/// The largest output a step may answer with, in bytes of JSON: it is stored in the order's document.
pub const MAX_OUTPUT: usize = 16 * 1024;

/// What one attempt can add to a document at most: four step outputs of [`MAX_OUTPUT`] bytes, a cancel's and a failure's reason, step records and
/// waits, with room to spare. A retry leaves at least this much below [`DOCUMENT_LIMIT`].
pub const ATTEMPT_ROOM: usize = 192 * 1024;

/// Earlier attempts a document keeps in `history` at most; older ones are dropped first.
pub const HISTORY_KEPT: usize = 20;

/// The longest reason (a cancel's, a failure's, a wait's) a document keeps, in characters; a longer
/// failure reason is cut there, a longer cancel reason is refused when it is asked for.
pub const MAX_REASON: usize = 1000;

/// `reason` cut to [`MAX_REASON`] characters, marked `…` where it was cut.
pub fn bounded_reason(reason: String) -> String {
    match reason.char_indices().nth(MAX_REASON) {
        None => reason,
        Some((end, _)) => {
            let mut cut = reason[..end].to_owned();
            cut.push('…');
            cut
        }
    }
}

// An attempt's largest additions fit in its room: four outputs, and three reasons of at most 6 bytes
// a character once escaped (`\u0001`), with 16 KiB for the step records; and a new order leaves room
// for two attempts.
const _: () = assert!(4 * MAX_OUTPUT + 3 * 6 * MAX_REASON + 16 * 1024 < ATTEMPT_ROOM);
const _: () = assert!(crate::domain::payload::MAX_PAYLOAD + 2 * ATTEMPT_ROOM < DOCUMENT_LIMIT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(bounded_reason("short".into()), "short");
        let exact = "é".repeat(MAX_REASON);
        assert_eq!(bounded_reason(exact.clone()), exact);
        let long = "é".repeat(MAX_REASON + 5);
        let cut = bounded_reason(long);
        assert_eq!(cut.chars().count(), MAX_REASON + 1);
        assert!(cut.ends_with('…'));
    }
}
