//! How a request from outside reaches the node that owns an order, without being taken for a lost
//! lease and without weakening fencing.
//!
//! 1. The requester records the intent in the order's document ([`record`]): a compare-and-set on the
//!    revision it read, like every write. It needs no lease: it changes nothing the owner decides.
//! 2. The owner's next write under its lease is refused (the revision moved). The `Writer` reads the
//!    document again; if the only difference is the intent, it applies its change on top and writes
//!    again, still under the lease and before its deadline. Any other difference (another owner, more
//!    progress) is a lost lease, as before.
//! 3. The pipeline checks the document at each commit. An intent it has not seen yet is marked seen
//!    (`intent.seen_by`, `intent.seen_at`), so the requester can tell that the owner got it.

use crate::domain::intent::Intent;
use crate::store::{OrderStore, StoreError, Versioned};
use uuid::Uuid;

/// What recording an intent came to.
#[derive(Debug)]
pub enum Recorded {
    /// The intent is in the document (it may have been there already, from an earlier request).
    Recorded(Box<Versioned>),
    /// The order is terminal: nobody will act on an intent any more.
    Terminal(Box<Versioned>),
    /// No such order.
    NotFound,
}

/// How often a requester reads and writes again when the owner wrote in between.
const TRIES: usize = 10;

/// Records `intent` in the document of order `order_id`, unless it holds an intent of the same kind
/// already or the order is terminal.
pub async fn record(
    store: &OrderStore,
    order_id: Uuid,
    intent: Intent,
) -> Result<Recorded, StoreError> {
    for _ in 0..TRIES {
        let Some(current) = store.get(order_id).await? else {
            return Ok(Recorded::NotFound);
        };
        if current.order.is_terminal() {
            return Ok(Recorded::Terminal(Box::new(current)));
        }
        if current
            .order
            .intent
            .as_ref()
            .is_some_and(|recorded| recorded.kind == intent.kind)
        {
            return Ok(Recorded::Recorded(Box::new(current)));
        }
        let mut next = current.order.clone();
        next.intent = Some(Box::new(intent.clone()));
        match store.update(&next, current.revision).await {
            Ok(written) => return Ok(Recorded::Recorded(Box::new(written))),
            // The owner wrote in between: read again.
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::unavailable_because(format!(
        "order {order_id} changed {TRIES} times while an intent was being recorded"
    )))
}
