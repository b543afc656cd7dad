//! The give-up path: an order whose message the server will not deliver again ends `Failed`, with a
//! reason that says so, instead of sitting in the stream forever.
//!
//! The server stops delivering a message after `max_deliver` deliveries but keeps it in the work-queue
//! stream. Orderly ends such an order in one of two ways:
//! - the node holding the last delivery cannot get on with the order (the store keeps failing, the
//!   document is unreadable): it writes the order `Failed` under its lease and terminates the message;
//! - the last delivery's holder died or stopped without an outcome: when its window ends the server
//!   publishes a `MAX_DELIVERIES` advisory; every node listens, the first compare-and-set writes the
//!   order `Failed`, and the message is deleted from the stream.

use crate::audit::Audit;
use crate::events::Events;
use crate::metrics as m;
use crate::nats::{CONSUMER, STREAM, SUBMIT_PREFIX};
use crate::order::{parse_order_id, Order};
use crate::pipeline::now;
use crate::store::{OrderStore, StoreError, Versioned};
use async_nats::jetstream::stream::{self, Stream};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The subject of the server's advisory for a message whose deliveries are exhausted.
pub fn advisory_subject() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.{CONSUMER}")
}

/// The part of the advisory Orderly reads.
#[derive(Debug, Deserialize)]
struct Advisory {
    stream_seq: u64,
    deliveries: u64,
}

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

/// The payload as the document shows it: the JSON object itself if it is one, else its first 256
/// bytes as a JSON string.
pub fn shown_payload(payload: &[u8]) -> Box<RawValue> {
    if let Ok(raw) = crate::worker::validate_payload(payload) {
        return raw;
    }
    let text = String::from_utf8_lossy(&payload[..payload.len().min(256)]);
    let quoted = serde_json::to_string(&text).expect("a string always serializes");
    RawValue::from_string(quoted).expect("a JSON string is valid JSON")
}

/// Ends orders whose deliveries the server exhausted while nobody held them.
#[derive(Clone)]
pub struct Exhausted {
    pub stream: Stream,
    pub store: OrderStore,
    pub events: Events,
    pub audit: Audit,
}

impl Exhausted {
    /// Listens for the server's advisories until `stop` fires.
    pub async fn watch(
        self,
        client: async_nats::Client,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut advisories = client.subscribe(advisory_subject()).await?;
        loop {
            let advisory = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                next = advisories.next() => match next {
                    Some(advisory) => advisory,
                    None => anyhow::bail!("the advisory subscription ended"),
                },
            };
            match serde_json::from_slice::<Advisory>(&advisory.payload) {
                Ok(advisory) => self.handle(advisory.stream_seq, advisory.deliveries).await,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable MAX_DELIVERIES advisory; ignoring it")
                }
            }
        }
    }

    /// Ends the order carried by message `seq`, then deletes the message.
    pub async fn handle(&self, seq: u64, deliveries: u64) {
        let message = match self.stream.get_raw_message(seq).await {
            Ok(message) => message,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return,
            Err(e) => {
                tracing::warn!(msg.stream_seq = seq, error = %e, "cannot read a message whose deliveries are exhausted");
                return;
            }
        };
        let key = message
            .subject
            .strip_prefix(SUBMIT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(message.subject.as_str());
        let span = tracing::info_span!("order", order.id = %key, msg.stream_seq = seq);
        let _entered = span.enter();
        match parse_order_id(key) {
            Ok(order_id) => {
                let reason = format!(
                    "gave up after {deliveries} deliveries: no node finished the order within the delivery limit (ORDERLY_MAX_DELIVER)"
                );
                if !self
                    .end_order(order_id, seq, &message.payload, &reason)
                    .await
                {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "message with an invalid order id exhausted its deliveries")
            }
        }
        match self.stream.delete_message(seq).await {
            Ok(_) => metrics::counter!(m::MESSAGES_TERMINATED, "reason" => "deliveries_exhausted")
                .increment(1),
            Err(e) => {
                tracing::debug!(error = %e, "message already gone (another node deleted it)")
            }
        }
    }

    /// Writes the order `Failed` unless it is terminal. Returns whether its message may go.
    async fn end_order(&self, order_id: Uuid, seq: u64, payload: &[u8], reason: &str) -> bool {
        for _ in 0..5 {
            let (revision, before, after) = match ending(&self.store, order_id, payload, reason)
                .await
            {
                Ok(Ending::Replace {
                    revision,
                    before,
                    after,
                }) => (revision, before, after),
                Ok(Ending::Terminal) => return true,
                Ok(Ending::Created(created)) => {
                    self.audit.gave_up(order_id, created.revision, seq, reason);
                    record_given_up("advisory", reason);
                    self.events.created(&created.order).await;
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot end an order whose deliveries are exhausted");
                    return false;
                }
            };
            let carrier = before.as_ref().and_then(|o| o.message_seq);
            if let Some(carrier) = carrier.filter(|carrier| *carrier != seq) {
                if self.stream.get_raw_message(carrier).await.is_ok() {
                    // A copy of the order submitted after the duplicate window: the order is the
                    // other message's, and only this copy is spent.
                    return true;
                }
            }
            match self.store.update(&after, revision).await {
                Ok(written) => {
                    self.audit.gave_up(order_id, written.revision, seq, reason);
                    record_given_up("advisory", reason);
                    match &before {
                        Some(before) => self.events.transition(before, &written.order).await,
                        None => self.events.created(&written.order).await,
                    }
                    return true;
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot end an order whose deliveries are exhausted");
                    return false;
                }
            }
        }
        false
    }
}
