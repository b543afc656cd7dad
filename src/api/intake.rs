//! Submission and lookup, shared by the HTTP API and the NATS service (`orders.create`, `orders.get`).
//!
//! A submission is accepted once JetStream has stored its work message: the message is published
//! first (with the order id as `Nats-Msg-Id`, so a repeat is one order), then the order's document is
//! created so that it can be queried at once. If the document cannot be written, the worker creates it
//! from the message; if the message cannot be stored, nothing was created and the caller gets an error.

use crate::api::bodies::ErrorBody;
use crate::clock::now;
use crate::domain::order::{parse_order_id, Interface, Order};
use crate::domain::payload::validate_payload;
use crate::error::{with_cause, BoxError};
use crate::ops::events::Events;
use crate::ops::metrics as m;
use crate::queue::setup::{submit_subject, DUPLICATE_WINDOW, VIA_HEADER};
use crate::store::{OrderStore, StoreError};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

/// How long a read waits for NATS before the caller is told the service is unavailable. A read takes
/// milliseconds when NATS is there; a user looking an order up while NATS is away hears so within 2 s
/// instead of after the client's request timeout (10 s).
pub const READ_TIMEOUT: Duration = Duration::from_millis(1500);

/// Runs `read` on `client` unless the client is not connected, and gives up after [`READ_TIMEOUT`]:
/// an `Unavailable` error at once when NATS is known to be away, or as soon as the wait is over when
/// it does not answer (a stopped server keeps its connection open).
pub async fn bounded_read<T, E>(
    client: &async_nats::Client,
    read: impl Future<Output = Result<T, E>>,
) -> Result<T, IntakeError>
where
    E: Into<IntakeError>,
{
    connected(client)?;
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(IntakeError::Unavailable {
            context: format!(
                "NATS did not answer within {}",
                humantime::format_duration(READ_TIMEOUT)
            ),
            source: None,
        }),
    }
}

/// `Unavailable` while `client` is not connected to NATS.
pub(crate) fn connected(client: &async_nats::Client) -> Result<(), IntakeError> {
    if client.connection_state() == async_nats::connection::State::Connected {
        Ok(())
    } else {
        Err(IntakeError::Unavailable {
            context: "not connected to NATS".into(),
            source: None,
        })
    }
}

/// Header with a client-chosen order id that makes a submission safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The reply to a submission.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Submitted {
    pub order_id: Uuid,
    pub start_time: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The request is wrong; sending it again will not help.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("no order {0}")]
    NotFound(Uuid),
    /// The id is taken by something that is not this order; submitting again will not help.
    #[error("{0}")]
    Conflict(String),
    /// The order's state does not allow the request; the body names the state.
    #[error("order {order_id}: {refused}")]
    Refused {
        order_id: Uuid,
        refused: crate::domain::order::Refused,
    },
    /// NATS could not take or give the order now; the caller may retry.
    #[error("order service unavailable: {}", with_cause(context, source.as_deref()))]
    Unavailable {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The work message was sent but its storage was not confirmed: the order may exist. The caller
    /// should look it up before submitting again.
    #[error("order {order_id} may or may not have been accepted ({reason}); query it before submitting again")]
    Uncertain { order_id: Uuid, reason: String },
}

impl IntakeError {
    /// A status code shared by HTTP and the NATS service error header.
    pub fn status(&self) -> u16 {
        match self {
            IntakeError::BadRequest(_) => 400,
            IntakeError::NotFound(_) => 404,
            IntakeError::Conflict(_) | IntakeError::Refused { .. } => 409,
            IntakeError::TooLarge(_) => 413,
            IntakeError::Unavailable { .. } | IntakeError::Uncertain { .. } => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            IntakeError::BadRequest(_) => "bad_request",
            IntakeError::NotFound(_) => "not_found",
            IntakeError::Conflict(_) => "conflict",
            IntakeError::Refused { .. } => "invalid_state",
            IntakeError::TooLarge(_) => "payload_too_large",
            IntakeError::Unavailable { .. } => "unavailable",
            IntakeError::Uncertain { .. } => "uncertain",
        }
    }

    /// The JSON error body: `{"error": ..., "code": ...}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!(self.error_body())
    }

    /// The error body, with the order's id when the order may exist, and its state when the state
    /// refused the request.
    pub fn error_body(&self) -> ErrorBody {
        let mut body = ErrorBody::new(self.code(), self.to_string());
        match self {
            IntakeError::Uncertain { order_id, .. } => body.order_id = Some(*order_id),
            IntakeError::Refused { order_id, refused } => {
                body.order_id = Some(*order_id);
                body.state = Some(refused.state);
            }
            _ => {}
        }
        body
    }
}

impl From<StoreError> for IntakeError {
    fn from(e: StoreError) -> Self {
        IntakeError::unavailable("", e)
    }
}

impl IntakeError {
    pub(crate) fn unavailable(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> IntakeError {
        IntakeError::Unavailable {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }
}

#[derive(Clone)]
pub struct Intake {
    js: jetstream::Context,
    store: OrderStore,
    events: Events,
}

impl Intake {
    pub fn new(js: jetstream::Context, store: OrderStore, events: Events) -> Intake {
        Intake { js, store, events }
    }

    /// Accepts an order whose payload is `body`.
    ///
    /// With an `idempotency_key` (a UUID, lower-case and hyphenated) that key is the order id, so a
    /// submission repeated after a lost reply is the same order.
    pub async fn submit(
        &self,
        body: &[u8],
        via: Interface,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, IntakeError> {
        let payload = validate_payload(body).map_err(|reason| {
            if body.len() > crate::domain::payload::MAX_PAYLOAD {
                IntakeError::TooLarge(reason)
            } else {
                IntakeError::BadRequest(reason)
            }
        })?;
        // A publish made while disconnected would sit in the client's buffer and might be stored
        // later, after the caller was told it failed: refuse it outright instead.
        connected(&self.js.client())?;
        let order_id = match idempotency_key {
            Some(key) => parse_order_id(key.trim())
                .map_err(|e| IntakeError::BadRequest(format!("Idempotency-Key: {e}")))?,
            None => Uuid::now_v7(),
        };
        let publish = PublishMessage::build()
            .payload(Bytes::copy_from_slice(payload.get().as_bytes()))
            .message_id(order_id.to_string())
            .header(VIA_HEADER, via.as_str());
        let ack = self
            .js
            .send_publish(submit_subject(&order_id), publish)
            .await
            .map_err(|e| IntakeError::unavailable("", e))?;
        let stored = ack.await.map_err(|e| IntakeError::Uncertain {
            order_id,
            reason: e.to_string(),
        })?;
        if stored.duplicate {
            // The id was used within the duplicate window. JetStream says only that some message
            // carried it: it is the same order only if that message (or, once processed, the order's
            // document) is this order's.
            let start_time = self.existing(order_id, stored.sequence).await?;
            tracing::info!(order.id = %order_id, "repeated submission of an accepted order");
            return Ok(Submitted {
                order_id,
                start_time,
            });
        }
        metrics::counter!(m::ORDERS_SUBMITTED, "interface" => via.as_str()).increment(1);
        // The start time is the one the stream stored the message at, as a worker that creates the
        // document records it and as a repeated submission reads it: every reply for one id is the same.
        let stored_at = match crate::queue::sweep::peek_exact(&self.js, stored.sequence).await {
            Ok(Some(message)) => message.stored,
            _ => None,
        };
        let order = Order::queued(order_id, payload, via, stored_at.unwrap_or_else(now));
        let start_time = match self.store.create(&order).await {
            Ok(created) => {
                self.events.created(&created.order).await;
                order.start_time
            }
            // A worker picked the message up first and created the document from it.
            Err(StoreError::Exists(_)) => match self.store.get(order_id).await {
                Ok(Some(existing)) => existing.order.start_time,
                _ => order.start_time,
            },
            Err(e) => {
                tracing::warn!(order.id = %order_id, error = %e, "order accepted, but its document is not written yet; the worker will write it");
                order.start_time
            }
        };
        tracing::info!(order.id = %order_id, via = via.as_str(), "order accepted");
        Ok(Submitted {
            order_id,
            start_time,
        })
    }

    /// The start time of order `order_id`, which JetStream reports as already carried by message
    /// `seq`, after checking that the message or the document really is that order.
    async fn existing(&self, order_id: Uuid, seq: u64) -> Result<DateTime<Utc>, IntakeError> {
        let carrier = crate::queue::sweep::peek_exact(&self.js, seq)
            .await
            .map_err(|e| IntakeError::unavailable("", e))?;
        let document = self.store.get(order_id).await?;
        let expected = submit_subject(&order_id);
        match (carrier, document) {
            (_, Some(existing)) => Ok(existing.order.start_time),
            (Some(message), None) if message.subject == expected => {
                Ok(message.stored.unwrap_or_else(now))
            }
            (Some(message), None) => Err(IntakeError::Conflict(format!(
                "id {order_id} was used as the message id of another message ({}, stream sequence {seq}) within the last {}s; choose another Idempotency-Key",
                message.subject,
                DUPLICATE_WINDOW.as_secs()
            ))),
            (None, None) => Err(IntakeError::Conflict(format!(
                "id {order_id} was used as a message id within the last {}s, but no order {order_id} exists; choose another Idempotency-Key",
                DUPLICATE_WINDOW.as_secs()
            ))),
        }
    }

    /// The order store, for the reads and requests the rest of the API makes.
    pub fn store(&self) -> &OrderStore {
        &self.store
    }

    /// The connection reads are made on.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The `orders` bucket, as intake reads it.
    pub fn bucket(&self) -> &async_nats::jetstream::kv::Store {
        self.store.bucket()
    }

    /// The order's document as stored, byte for byte.
    pub async fn get(&self, id: &str) -> Result<Bytes, IntakeError> {
        let order_id = parse_order_id(id).map_err(|e| IntakeError::BadRequest(e.to_string()))?;
        bounded_read(&self.js.client(), self.store.get_raw(order_id))
            .await?
            .ok_or(IntakeError::NotFound(order_id))
    }
}
