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
use crate::engine::write::{Halt, StoreRetry, Writer};
use crate::ops::audit::LeaseEnd;
use crate::ops::metrics as m;
use crate::ops::stats::WorkerStats;
use crate::queue::delivery::{message_exists, Delivery};
use crate::queue::settle::{Outcome, Settlement, TermReason};
use crate::store::{OrderStore, StoreError, Versioned};
use async_nats::jetstream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Ends orders whose deliveries are exhausted, under the lease of the delivery that found them so.
pub struct GiveUp {
    writer: Writer,
    stream: jetstream::stream::Stream,
    stats: Arc<WorkerStats>,
}

/// How a give-up try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GaveUp {
    /// The order was written `Failed` (or created so): terminate the message.
    Ended,
    /// The order was terminal already: ack the message.
    AlreadyTerminal,
    /// Another message carries the order: only this copy is spent.
    Duplicate,
    /// The lease ended: nothing more may be done with the message.
    LeaseEnded,
}

impl GiveUp {
    pub fn new(
        writer: Writer,
        stream: jetstream::stream::Stream,
        stats: Arc<WorkerStats>,
    ) -> GiveUp {
        GiveUp {
            writer,
            stream,
            stats,
        }
    }

    /// The stream the work messages are in.
    pub fn stream(&self) -> &jetstream::stream::Stream {
        &self.stream
    }

    /// Ends the order `Failed` with `reason`, written under the lease, then settles its message.
    /// While the order store is unavailable it keeps the lease and tries again: the order is not
    /// left for nobody to end.
    pub async fn run(&self, settlement: Settlement, delivery: &Delivery, reason: String) {
        let mut retry = StoreRetry::default();
        let gave_up = loop {
            match self.try_once(&settlement, delivery, &reason).await {
                Ok(gave_up) => break gave_up,
                Err(e) => {
                    if !retry
                        .wait(&e, settlement.lease(), &CancellationToken::new())
                        .await
                    {
                        break GaveUp::LeaseEnded;
                    }
                }
            }
        };
        let outcome = match gave_up {
            GaveUp::AlreadyTerminal => Outcome::Ack,
            GaveUp::Duplicate => Outcome::Term(TermReason::Duplicate),
            GaveUp::Ended => Outcome::Term(TermReason::DeliveriesExhausted),
            GaveUp::LeaseEnded => Outcome::Leave,
        };
        let why = if gave_up == GaveUp::LeaseEnded {
            LeaseEnd::Fenced
        } else {
            LeaseEnd::Finished
        };
        settlement.settle(outcome, why).await;
    }

    /// One try; `Err` for a store failure that may pass.
    async fn try_once(
        &self,
        settlement: &Settlement,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<GaveUp, StoreError> {
        let payload = &settlement.message().payload;
        let ending = ending(self.writer.store(), delivery.order_id, payload, reason).await?;
        let (revision, before, after) = match ending {
            Ending::Terminal => return Ok(GaveUp::AlreadyTerminal),
            Ending::Created(created) => {
                record_given_up("last_delivery", reason);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.writer.events().created(&created.order).await;
                return Ok(GaveUp::Ended);
            }
            Ending::Replace {
                revision,
                before,
                after,
            } => (revision, before, after),
        };
        let carrier = before.as_ref().and_then(|order| order.message_seq);
        if let Some(carrier) = carrier.filter(|seq| *seq != delivery.stream_seq) {
            // Another message carries the order (it may be running under that message's lease):
            // only this copy is spent.
            if message_exists(&self.stream, carrier).await? {
                return Ok(GaveUp::Duplicate);
            }
        }
        let lease = settlement.lease();
        match self
            .writer
            .write(lease, "give_up", before.as_deref(), &after, revision)
            .await
        {
            Ok(_) => {
                record_given_up("last_delivery", reason);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Ok(GaveUp::Ended)
            }
            Err(Halt::Store(e)) => Err(e),
            Err(Halt::LeaseLost(e)) => {
                lease.end(LeaseEnd::Lost);
                metrics::counter!(m::LEASES_LOST).increment(1);
                tracing::warn!(error = %e, "another writer took the order while it was being given up; dropping it");
                Ok(GaveUp::LeaseEnded)
            }
            Err(_) => Ok(GaveUp::LeaseEnded),
        }
    }
}

/// How an order ends as failed.
pub enum Ending {
    /// It is terminal already: nothing to do.
    Terminal,
    /// It had no document; a failed one was created.
    Created(Box<Versioned>),
    /// Write `after` over revision `revision`, which holds `before` (`None` when the stored document
    /// is unreadable).
    Replace {
        revision: u64,
        before: Option<Box<Order>>,
        after: Box<Order>,
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
                .map_err(|e| StoreError::unavailable("cannot end the order", e))?;
            Ok(Ending::Replace {
                revision,
                before: Some(Box::new(order)),
                after: Box::new(after),
            })
        }
        Err(StoreError::Corrupt {
            revision,
            reason: unreadable,
            ..
        }) => Ok(Ending::Replace {
            revision,
            before: None,
            after: Box::new(Order::rejected(
                order_id,
                shown_payload(payload),
                if reason.contains(&unreadable) {
                    reason.to_owned()
                } else {
                    format!("{reason} (the stored document was unreadable: {unreadable})")
                },
                now(),
            )),
        }),
        Ok(None) => {
            let order = Order::rejected(order_id, shown_payload(payload), reason.to_owned(), now());
            match store.create(&order).await {
                Ok(created) => Ok(Ending::Created(Box::new(created))),
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
