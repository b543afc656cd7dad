//! How a request from outside reaches the node that owns an order, without being taken for a lost
//! lease and without weakening fencing.
//!
//! 1. The requester records the intent in the order's document ([`cancel`]): a compare-and-set on the
//!    revision it read, like every write. It needs no lease: it changes nothing the owner decides.
//! 2. The owner's next write under its lease is refused (the revision moved). The `Writer` reads the
//!    document again; if the only difference is the intent, it applies its change on top and writes
//!    again, still under the lease and before its deadline. Any other difference (another owner, more
//!    progress) is a lost lease, as before.
//! 3. The pipeline checks the document at each commit. An intent it has not seen yet is marked seen
//!    (`intent.seen_by`, `intent.seen_at`), so the requester can tell that the owner got it.

use crate::domain::intent::Intent;
use crate::domain::order::{CancelAnswer, Order, Refused};
use crate::store::{OrderStore, StoreError, Versioned};
use uuid::Uuid;

/// What a cancel request came to.
#[derive(Debug)]
pub enum Cancel {
    /// The answer is final: the order is (or will be) `Cancelled`. `before` is the document this
    /// request changed, `None` when it changed nothing (the cancel was there already).
    Answered {
        answer: CancelAnswer,
        order: Box<Versioned>,
        before: Option<Box<Order>>,
    },
    /// The order's state does not allow a cancel: it will not be cancelled.
    Refused(Refused, Box<Versioned>),
    /// No such order.
    NotFound,
}

/// How often a requester reads and writes again when the owner wrote in between.
const TRIES: usize = 10;

/// Records a cancel of order `order_id` in its document, if its state allows one
/// ([`Order::request_cancel`] decides, from the document alone).
pub async fn cancel(
    store: &OrderStore,
    order_id: Uuid,
    intent: Intent,
) -> Result<Cancel, StoreError> {
    for _ in 0..TRIES {
        let Some(current) = store.get(order_id).await? else {
            return Ok(Cancel::NotFound);
        };
        let mut next = current.order.clone();
        // Requested now, when the document it is decided on was read: every step it shows started
        // before.
        let intent = Intent {
            requested_at: crate::clock::now(),
            ..intent.clone()
        };
        let answer = match next.request_cancel(intent) {
            Err(refused) => return Ok(Cancel::Refused(refused, Box::new(current))),
            Ok((answer, false)) => {
                return Ok(Cancel::Answered {
                    answer,
                    order: Box::new(current),
                    before: None,
                })
            }
            Ok((answer, true)) => answer,
        };
        match store.update(&next, current.revision).await {
            Ok(written) => {
                return Ok(Cancel::Answered {
                    answer,
                    order: Box::new(written),
                    before: Some(Box::new(current.order)),
                })
            }
            // The owner wrote in between: read again, and decide again.
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::unavailable_because(format!(
        "order {order_id} changed {TRIES} times while a cancel was being recorded"
    )))
}

/// A retry asked for in an order's document ([`request_retry`]).
#[derive(Debug)]
pub enum RetryAsked {
    /// The document asks for retry `number`; its work message's id carries `key`. `fresh` when this
    /// request wrote the key (no message can carry it yet), not when it found it there.
    Asked {
        current: Box<Versioned>,
        number: u32,
        key: String,
        fresh: bool,
    },
    /// The order's state does not allow a retry.
    Refused(Refused),
    /// No such order.
    NotFound,
}

/// Records in the document of order `order_id` that its next retry is asked for, with a new random
/// key, unless the document asks for that retry already with a key other than `taken` (then that
/// request is joined: its message goes out with the same id, which makes both one message).
pub async fn request_retry(
    store: &OrderStore,
    order_id: Uuid,
    taken: Option<&str>,
) -> Result<RetryAsked, StoreError> {
    for _ in 0..TRIES {
        let Some(current) = store.get(order_id).await? else {
            return Ok(RetryAsked::NotFound);
        };
        let mut next = current.order.clone();
        let key = Uuid::new_v4().simple().to_string();
        let number = match next.request_retry(key.clone(), crate::clock::now()) {
            Err(refused) => return Ok(RetryAsked::Refused(refused)),
            Ok(number) => number,
        };
        if let Some(asked) = current
            .order
            .retry_request
            .as_ref()
            .filter(|asked| asked.retry == number && Some(asked.key.as_str()) != taken)
        {
            let key = asked.key.clone();
            return Ok(RetryAsked::Asked {
                current: Box::new(current),
                number,
                key,
                fresh: false,
            });
        }
        match store
            .update_in_state(&next, current.revision, current.order.state)
            .await
        {
            Ok(written) => {
                return Ok(RetryAsked::Asked {
                    current: Box::new(written),
                    number,
                    key,
                    fresh: true,
                })
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::unavailable_because(format!(
        "order {order_id} changed {TRIES} times while a retry was being asked for"
    )))
}

/// What recording retry `number` of an order came to.
#[derive(Debug)]
pub enum Retry {
    /// The document holds the retry: written now (`before` is the document it replaced), or
    /// earlier by someone else (`before` is `None`).
    Recorded {
        order: Box<Versioned>,
        before: Option<Box<Order>>,
    },
    /// The order's state does not allow a retry.
    Refused(Refused),
    /// The document is on another retry than `number` (a message of an older retry, or one ahead
    /// of it).
    Other,
    /// No such order.
    NotFound,
}

/// Records retry `number` of the order whose document is `current`, unless it is recorded already:
/// the requester and a node that gets the retry's work message first both call it, and whichever
/// writes first, the other finds the retry there.
pub async fn retry(
    store: &OrderStore,
    mut current: Versioned,
    number: u32,
) -> Result<Retry, StoreError> {
    let order_id = current.order.order_id;
    for _ in 0..TRIES {
        if current.order.retries >= number {
            return Ok(Retry::Recorded {
                order: Box::new(current),
                before: None,
            });
        }
        let mut next = current.order.clone();
        if let Err(refused) = next.retry(crate::clock::now()) {
            return Ok(Retry::Refused(refused));
        }
        if next.retries != number {
            return Ok(Retry::Other);
        }
        match store.update(&next, current.revision).await {
            Ok(written) => {
                return Ok(Retry::Recorded {
                    order: Box::new(written),
                    before: Some(Box::new(current.order)),
                })
            }
            // Written in between (perhaps the retry itself, by the other party): read again.
            Err(e) if e.is_conflict() => match store.get(order_id).await? {
                Some(stored) => current = stored,
                None => return Ok(Retry::NotFound),
            },
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::unavailable_because(format!(
        "order {order_id} changed {TRIES} times while a retry was being recorded"
    )))
}
