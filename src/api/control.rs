//! Acting on an order from outside, shared by every interface: cancel (`POST /orders/{id}/cancel`,
//! `orders.cancel`) and retry (`POST /orders/{id}/retry`, `orders.retry`).
//!
//! Every answer is final, because it is decided by the compare-and-set that records the request in
//! the order's document: a cancel recorded there is acted on by whichever node holds (or next takes)
//! the order, and a refused one changed nothing. See docs/api.md, "Cancelling".

use crate::api::intake::{connected, Intake, IntakeError};
use crate::clock::now;
use crate::domain::intent::{Intent, IntentKind};
use crate::domain::order::{parse_order_id, CancelAnswer, Interface, Order, State};
use crate::engine::intent::{self, Cancel, Retry, RetryAsked};
use crate::ops::metrics as m;
use crate::queue::setup::{
    interrupt_subject, retry_message_id, submit_subject, RETRY_HEADER, VIA_HEADER,
};
use crate::store::Versioned;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use std::time::Duration;
use uuid::Uuid;

pub use crate::domain::limits::MAX_REASON;
/// How many times a retry asks again with a new key when its message id was taken.
const TAKEN_KEYS: usize = 3;
/// How long a request may take before it is answered `503` (ask again: both requests are safe to
/// repeat).
const PATIENCE: Duration = Duration::from_secs(5);

/// A document, with whether the request is done (`200`) or accepted and under way (`202`).
#[derive(Debug)]
pub struct Answer {
    pub done: bool,
    pub order: Box<Order>,
}

/// Cancels and retries orders, for the node `node_id`.
#[derive(Clone)]
pub struct Control {
    intake: Intake,
    node_id: String,
}

impl Control {
    pub fn new(intake: Intake, node_id: String) -> Control {
        Control { intake, node_id }
    }

    /// Cancels order `id`: done when it is `Cancelled`, accepted when it is `Cancelling` (it will end
    /// `Cancelled`); refused (`409`) when it ended otherwise or is rolling back after a failure.
    pub async fn cancel(
        &self,
        id: &str,
        reason: Option<String>,
        via: Interface,
    ) -> Result<Answer, IntakeError> {
        let order_id = parse_order_id(id).map_err(|e| IntakeError::BadRequest(e.to_string()))?;
        if let Some(reason) = reason.as_ref().filter(|r| r.chars().count() > MAX_REASON) {
            return Err(IntakeError::BadRequest(format!(
                "reason is {} characters long; at most {MAX_REASON} are allowed",
                reason.chars().count()
            )));
        }
        connected(&self.intake.jetstream().client())?;
        let intent = Intent::new(IntentKind::Cancel, Some(self.node_id.clone()), now())
            .with_request(via, reason);
        let recorded = patiently(intent::cancel(self.intake.store(), order_id, intent)).await?;
        let (answer, order, before) = match recorded {
            Cancel::NotFound => {
                count("cancel", "not_found");
                return Err(IntakeError::NotFound(order_id));
            }
            Cancel::Refused(refused, _) => {
                count("cancel", "refused");
                return Err(IntakeError::Refused { order_id, refused });
            }
            Cancel::Answered {
                answer,
                order,
                before,
            } => (answer, order, before),
        };
        if let Some(before) = before {
            self.intake.events().transition(&before, &order.order).await;
            self.interrupt_owner(&order).await;
            if order.order.state == State::Cancelled {
                // Nobody had picked it up: it ended here, not on a worker.
                metrics::counter!(m::ORDERS_FINISHED, "outcome" => "cancelled").increment(1);
            }
            tracing::info!(order.id = %order_id, state = %order.order.state, via = via.as_str(), "cancel accepted");
        }
        let done = answer == CancelAnswer::Cancelled;
        count("cancel", if done { "done" } else { "accepted" });
        Ok(Answer {
            done,
            order: Box::new(order.order),
        })
    }

    /// Tells the node running the order, if any, to interrupt its step now rather than at its end.
    async fn interrupt_owner(&self, order: &Versioned) {
        let Some(owner) = order.order.owner.as_ref() else {
            return;
        };
        let client = self.intake.jetstream().client();
        let subject = interrupt_subject(&owner.node);
        let id = Bytes::from(order.order.order_id.to_string());
        if let Err(e) = client.publish(subject, id).await {
            tracing::debug!(error = %e, "cannot send the interrupt; the owner sees the cancel at its next write");
        }
    }

    /// Runs order `id` again from `Scheduling` as a new attempt, if it ended `Failed` or
    /// `Cancelled`; the attempt that ended stays in the document's `history`.
    ///
    /// The document first records that the retry is asked for (`retry_request`, with a random key),
    /// then the retry's work message goes out, with the retry's number and an id that carries the
    /// key, then the document records the retry. A node that gets the message before the document
    /// changed records the retry itself, if the document asks for it with that key: the order runs
    /// exactly once whichever comes first, a work message that the document did not ask for starts
    /// nothing, and a retry whose message could not be sent left the order as it was (it can be
    /// asked for again).
    pub async fn retry(&self, id: &str, via: Interface) -> Result<Answer, IntakeError> {
        let order_id = parse_order_id(id).map_err(|e| IntakeError::BadRequest(e.to_string()))?;
        connected(&self.intake.jetstream().client())?;
        let answer = patiently(self.retry_order(order_id, via)).await?;
        match answer {
            Ok(order) => {
                count("retry", "accepted");
                tracing::info!(order.id = %order_id, retry = order.retries, via = via.as_str(), "retry accepted");
                Ok(Answer {
                    done: false,
                    order: Box::new(order),
                })
            }
            Err(e) => {
                count(
                    "retry",
                    match e {
                        IntakeError::NotFound(_) => "not_found",
                        _ => "refused",
                    },
                );
                Err(e)
            }
        }
    }

    /// Asks for the retry in the document, publishes its work message, then records the retry. A
    /// message id that someone else's message took first (the id is only known once the document
    /// holds it, so this takes a reader racing the request) is given up for a new key.
    async fn retry_order(
        &self,
        order_id: Uuid,
        via: Interface,
    ) -> Result<Result<Order, IntakeError>, IntakeError> {
        let store = self.intake.store();
        let mut taken: Option<String> = None;
        for _ in 0..TAKEN_KEYS {
            let (current, number, key, fresh) =
                match intent::request_retry(store, order_id, taken.as_deref()).await? {
                    RetryAsked::Asked {
                        current,
                        number,
                        key,
                        fresh,
                    } => (current, number, key, fresh),
                    RetryAsked::Refused(refused) => {
                        return Ok(Err(IntakeError::Refused { order_id, refused }))
                    }
                    RetryAsked::NotFound => return Ok(Err(IntakeError::NotFound(order_id))),
                };
            let duplicate = self
                .publish_retry(&current.order, number, &key, via)
                .await?;
            if duplicate && fresh {
                tracing::warn!(order.id = %order_id, retry = number, "the retry's message id was taken by another message; asking again with a new key");
                metrics::counter!(m::RETRY_IDS_TAKEN).increment(1);
                taken = Some(key);
                continue;
            }
            return match intent::retry(store, *current, number).await? {
                Retry::Recorded { order, before } => {
                    if let Some(before) = before {
                        let events = self.intake.events();
                        events.transition(&before, &order.order).await;
                    }
                    // Recorded here, by a node that got the message first, or by a concurrent
                    // request.
                    Ok(Ok(order.order))
                }
                Retry::Refused(refused) => Ok(Err(IntakeError::Refused { order_id, refused })),
                Retry::NotFound => Ok(Err(IntakeError::NotFound(order_id))),
                Retry::Other => Err(IntakeError::Unavailable {
                    context: format!("order {order_id} was retried again meanwhile; ask again"),
                    source: None,
                }),
            };
        }
        Err(IntakeError::Unavailable {
            context: format!(
                "the message id of the retry of order {order_id} was taken {TAKEN_KEYS} times; ask again"
            ),
            source: None,
        })
    }

    /// Publishes the work message of retry `number` of `order`, asked for with `key`; returns
    /// whether the stream took it for a duplicate. Its message id makes a repeated request for the
    /// same retry one message.
    async fn publish_retry(
        &self,
        order: &Order,
        number: u32,
        key: &str,
        via: Interface,
    ) -> Result<bool, IntakeError> {
        let order_id = order.order_id;
        let publish = PublishMessage::build()
            .payload(Bytes::copy_from_slice(order.payload.get().as_bytes()))
            .message_id(retry_message_id(&order_id, number, key))
            .header(VIA_HEADER, via.as_str())
            .header(RETRY_HEADER, number.to_string().as_str());
        let js = self.intake.jetstream();
        let ack = js
            .send_publish(submit_subject(&order_id), publish)
            .await
            .map_err(|e| IntakeError::unavailable("cannot publish the retry", e))?;
        let ack = ack
            .await
            .map_err(|e| IntakeError::unavailable("the retry's message was not confirmed", e))?;
        Ok(ack.duplicate)
    }
}

/// Waits for `request` at most [`PATIENCE`]; after that the answer is unknown (`503`), and the
/// request, being safe to repeat, can be made again.
async fn patiently<T, E: Into<IntakeError>>(
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, IntakeError> {
    match tokio::time::timeout(PATIENCE, request).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(IntakeError::Unavailable {
            context: format!(
                "no answer within {}; the request may or may not have been recorded: ask again",
                humantime::format_duration(PATIENCE)
            ),
            source: None,
        }),
    }
}

fn count(request: &'static str, answer: &'static str) {
    metrics::counter!(m::ORDER_REQUESTS, "request" => request, "answer" => answer).increment(1);
}
