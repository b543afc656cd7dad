//! Giving up: an order that used up every delivery Orderly allows (`ORDERLY_MAX_DELIVER`) ends
//! `Failed`, with a reason that says so, instead of being retried forever.
//!
//! The consumer itself has no delivery limit (a server-side limit strands the message in the stream
//! for nobody, and its only trace is an advisory any client can publish). Orderly counts deliveries
//! instead, and ends an order only under a lease:
//! - the delivery after the last one allowed ends the order at once (its holders kept dying or losing
//!   it), and terminates the message;
//! - the last delivery allowed ends it when the order is at fault (its stored document is unreadable).
//!
//! A failure of the store, however long, ends nothing: the holder keeps the order and tries again.

use crate::clock::now;
use crate::domain::order::Order;
use crate::domain::payload::shown_payload;
use crate::ops::metrics as m;
use crate::store::{OrderStore, StoreError, Versioned};
use uuid::Uuid;

/// How an order ends as failed.
pub enum Ending {
    /// It is terminal already: nothing to do.
    Terminal,
    /// It had no document; a failed one was created.
    Created(Versioned),
    /// Write `after` over revision `revision`, which holds `before` (`None` when the stored document
    /// is unreadable).
    Replace {
        revision: u64,
        before: Option<Order>,
        after: Order,
    },
}

/// How to end order `order_id` as failed with `reason`. An order without a document gets one at once.
pub async fn ending(
    store: &OrderStore,
    order_id: Uuid,
    payload: &[u8],
    reason: &str,
) -> Result<Ending, StoreError> {
    match store.get(order_id).await {
        Ok(Some(versioned)) if versioned.order.is_terminal() => Ok(Ending::Terminal),
        Ok(Some(Versioned { order, revision })) => {
            let mut after = order.clone();
            after
                .abandon(reason.to_owned(), now())
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(Ending::Replace {
                revision,
                before: Some(order),
                after,
            })
        }
        Err(StoreError::Corrupt {
            revision,
            reason: unreadable,
            ..
        }) => Ok(Ending::Replace {
            revision,
            before: None,
            after: Order::rejected(
                order_id,
                shown_payload(payload),
                if reason.contains(&unreadable) {
                    reason.to_owned()
                } else {
                    format!("{reason} (the stored document was unreadable: {unreadable})")
                },
                now(),
            ),
        }),
        Ok(None) => {
            let order = Order::rejected(order_id, shown_payload(payload), reason.to_owned(), now());
            match store.create(&order).await {
                Ok(created) => Ok(Ending::Created(created)),
                Err(StoreError::Exists(_)) => Ok(Ending::Terminal),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Counts and logs an order that ended because its deliveries are exhausted.
pub fn record_given_up(path: &'static str, reason: &str) {
    metrics::counter!(m::ORDERS_GIVEN_UP, "path" => path).increment(1);
    metrics::counter!(m::ORDERS_FINISHED, "outcome" => "failed").increment(1);
    tracing::error!(%reason, path, "order ended as failed: its deliveries are exhausted");
}
