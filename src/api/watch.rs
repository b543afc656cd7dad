//! A live watch of one order, `GET /orders/{id}/events`: Server-Sent Events driven by the order's key
//! in the `orders` bucket, so that what a client sees is what was stored, in revision order (the core
//! NATS events on `orders.events.<id>` are at most once). Each event's `id` is the KV revision, its
//! `event` the change (named as on `orders.events.<id>`), its `data` that event's JSON plus `document`,
//! the whole document at that revision. The first event is the current document (`snapshot`); the
//! stream ends after a terminal state. A client that reconnects with `Last-Event-ID: r` gets every
//! revision after r, one event each, from the revisions the bucket keeps (the last 32 of each order);
//! if r is older than those, it gets the current document as a snapshot instead, which carries the
//! order's whole history (every step's and rollback's times). A KV watcher that ends or fails (its
//! consumer deleted, NATS lost) is reopened after the last revision sent, and the log says so; if it
//! cannot be, the stream ends with an `error` event.

use crate::api::intake::{bounded_read, IntakeError};
use crate::domain::order::{parse_order_id, Order};
use crate::ops::events::Event;
use crate::store::StoreError;
use async_nats::jetstream::kv;
use axum::http::HeaderValue;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use std::convert::Infallible;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// How often an idle stream sends a comment, so that proxies and clients keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The name of the first event of a stream: the document as it is now.
const SNAPSHOT: &str = "snapshot";

/// The revision in a `Last-Event-ID` header, if there is one.
pub fn last_event_id(header: Option<&HeaderValue>) -> Result<Option<u64>, IntakeError> {
    let Some(header) = header else {
        return Ok(None);
    };
    // A revision is a stream sequence; the document gives it as a non-negative int64.
    let revision = header
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|revision| u64::try_from(revision).ok());
    match revision {
        Some(revision) => Ok(Some(revision)),
        None => Err(IntakeError::BadRequest(
            "Last-Event-ID is not a revision (the id of an event this stream sent)".into(),
        )),
    }
}

/// The changes of order `id` in `bucket` (read on `client`) after revision `last_seen`, or from its
/// current document without one, until it is terminal or `stop` fires (the node drains).
pub async fn open(
    bucket: &kv::Store,
    client: &async_nats::Client,
    id: &str,
    last_seen: Option<u64>,
    stop: CancellationToken,
) -> Result<impl Stream<Item = Result<sse::Event, Infallible>> + Send + 'static, IntakeError> {
    let order_id = parse_order_id(id).map_err(|e| IntakeError::BadRequest(e.to_string()))?;
    let key = order_id.to_string();
    let read = async { bucket.entry(&key).await.map_err(unavailable) };
    let entry = bounded_read(client, read)
        .await?
        .filter(|entry| entry.operation == kv::Operation::Put)
        .ok_or(IntakeError::NotFound(order_id))?;
    let current = decode(&entry)?;
    // A client that saw revision `seen` gets every change after it, one by one, from the revisions
    // the bucket keeps (the last 32 of each order); older than those, it gets a snapshot.
    // Revisions start at 1: a client that saw revision 0 saw nothing, and gets a snapshot.
    let replay_from = match last_seen {
        Some(seen) if seen > 0 && seen < entry.revision => {
            bounded_read(client, revision_of(bucket, &key, seen))
                .await?
                .filter(|old| !old.is_terminal())
        }
        _ => None,
    };
    let (first, previous, from) = match (replay_from, last_seen) {
        (Some(seen_order), Some(seen)) => (None, seen_order, seen + 1),
        (None, Some(seen)) if seen == entry.revision => (None, current, entry.revision + 1),
        _ => (
            Some(snapshot(&current, &entry)),
            current,
            entry.revision + 1,
        ),
    };
    let following = if previous.is_terminal() {
        None
    } else {
        let watch = async {
            bucket
                .watch_from_revision(&key, from)
                .await
                .map_err(unavailable)
        };
        let watcher = bounded_read(client, watch).await?;
        Some(Following {
            bucket: bucket.clone(),
            key,
            watcher,
            seen: from - 1,
            reopened: 0,
            previous,
            stop,
        })
    };
    let rest = futures::stream::unfold(following, |following| async {
        let (event, next) = following?.next().await?;
        Some((Ok(event), next))
    });
    Ok(futures::stream::iter(first.map(Ok)).chain(rest))
}

/// The document of `key` at `revision`, if that revision is a write of this key that the bucket
/// still keeps. A revision of another key (a `Last-Event-ID` naming another order's revision) is
/// none: nothing of that order is read, printed or sent.
async fn revision_of(
    bucket: &kv::Store,
    key: &str,
    revision: u64,
) -> Result<Option<Order>, IntakeError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let subject = format!("{}{key}", bucket.prefix);
    // The first message on this key's subject from `revision` on: the revision itself only if it is
    // this key's.
    let message = match bucket
        .stream
        .direct_get_next_for_subject(subject, Some(revision))
        .await
    {
        Ok(message) => message,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable(e)),
    };
    let put = message
        .headers
        .get("KV-Operation")
        .is_none_or(|operation| operation.as_str() == "PUT");
    if message.sequence != revision || !put {
        return Ok(None);
    }
    Ok(serde_json::from_slice(&message.payload).ok())
}

/// The changes as an SSE response, with keep-alive comments.
pub fn respond(
    changes: impl Stream<Item = Result<sse::Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(changes)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// A watch on one order's key, after the revision last sent.
struct Following {
    bucket: kv::Store,
    key: String,
    watcher: kv::Watch,
    /// The last revision sent, or the one the client had seen.
    seen: u64,
    /// Times the KV watcher was reopened since the last change it gave.
    reopened: u32,
    previous: Order,
    stop: CancellationToken,
}

/// Times in a row a watch reopens its KV watcher before it gives up.
const REOPENS: u32 = 3;

/// How long the reopening of a KV watcher may take.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(5);

impl Following {
    /// The next change, and what follows it: `None` after a terminal state. `None` when the watch
    /// ends: the node drains, or the key is deleted. A KV watcher that ends or fails (its consumer
    /// deleted by an operator, NATS lost) is reopened after the last revision sent; when that fails
    /// [`REOPENS`] times in a row, the stream ends with an `error` event (the client reconnects with
    /// `Last-Event-ID` and resumes).
    async fn next(mut self) -> Option<(sse::Event, Option<Following>)> {
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return None,
                next = self.watcher.next() => next,
            };
            let entry = match next {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => match self.reopen(&e.to_string()).await {
                    Ok(()) => continue,
                    Err(event) => return Some((event, None)),
                },
                None => match self.reopen("the KV watcher ended").await {
                    Ok(()) => continue,
                    Err(event) => return Some((event, None)),
                },
            };
            if entry.operation != kv::Operation::Put {
                return None;
            }
            self.reopened = 0;
            self.seen = entry.revision;
            let order = match decode(&entry) {
                Ok(order) => order,
                Err(e) => {
                    tracing::warn!(error = %e, "order watch ended");
                    return None;
                }
            };
            let node = holder(Some(&self.previous), &order);
            let event = Event::transition(&self.previous, &order, node);
            let sent = to_sse(event, &entry);
            if order.is_terminal() {
                return Some((sent, None));
            }
            self.previous = order;
            return Some((sent, Some(self)));
        }
    }

    /// Opens the KV watcher again after the last revision sent, or says why the stream ends.
    async fn reopen(&mut self, why: &str) -> Result<(), sse::Event> {
        let from = self.seen + 1;
        while self.reopened < REOPENS && !self.stop.is_cancelled() {
            self.reopened += 1;
            let watch = self.bucket.watch_from_revision(&self.key, from);
            match tokio::time::timeout(REOPEN_TIMEOUT, watch).await {
                Ok(Ok(watcher)) => {
                    tracing::warn!(
                        order.id = %self.key, reason = why, from_revision = from,
                        "order watch: the KV watcher ended; reopened it"
                    );
                    self.watcher = watcher;
                    return Ok(());
                }
                Ok(Err(e)) => {
                    tracing::warn!(order.id = %self.key, reason = why, error = %e, "order watch: cannot reopen the KV watcher")
                }
                Err(_) => {
                    tracing::warn!(order.id = %self.key, reason = why, "order watch: cannot reopen the KV watcher in time")
                }
            }
        }
        tracing::warn!(
            order.id = %self.key, reason = why, last_revision = self.seen,
            "order watch ended with an error event: the KV watcher ended and could not be reopened"
        );
        let body = serde_json::json!({
            "error": format!("the watch of the order was interrupted ({why}): reconnect with Last-Event-ID to resume"),
            "code": "watch_interrupted",
        });
        Err(sse::Event::default().event("error").data(body.to_string()))
    }
}

/// The document as it is, as the first event.
fn snapshot(order: &Order, entry: &kv::Entry) -> sse::Event {
    let event = Event {
        order_id: order.order_id,
        change: SNAPSHOT,
        changes: vec![SNAPSHOT],
        from: order.state,
        to: order.state,
        from_step: order.current_step,
        step: order.current_step,
        node: holder(None, order),
        attempt: order.attempt,
        time: order.updated_at,
    };
    to_sse(event, entry)
}

/// The node that held the order at this revision, or released it; empty while nobody has held it.
fn holder<'a>(before: Option<&'a Order>, after: &'a Order) -> &'a str {
    after
        .owner
        .as_ref()
        .or_else(|| before.and_then(|b| b.owner.as_ref()))
        .map_or("", |owner| owner.node.as_str())
}

/// The `data` of an event: the change, and the whole document at its revision.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = WatchEventData)]
struct Data<'a> {
    #[serde(flatten)]
    event: Event<'a>,
    #[schema(value_type = Order)]
    document: &'a RawValue,
}

/// One event of the stream, for the OpenAPI document: `id` (the revision), `event` (the change) and
/// `data` (JSON: [`Data`]). In OpenAPI 3.1 a `text/event-stream` response's schema describes each
/// event, and `contentMediaType` with `contentSchema` describe the JSON inside `data`.
pub struct SentEvent;

impl utoipa::PartialSchema for SentEvent {
    fn schema() -> RefOr<Schema> {
        let text = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
        };
        let data = text("The change and the whole document, as JSON")
            .content_media_type("application/json")
            .content_schema(Some(Ref::from_schema_name(Data::name())));
        ObjectBuilder::new()
            .property("id", text("The revision of the order's document"))
            .property(
                "event",
                text("The change: `snapshot` first, then as on `orders.events.<id>`"),
            )
            .property("data", data)
            .required("id")
            .required("event")
            .required("data")
            .into()
    }
}

impl utoipa::ToSchema for SentEvent {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Data::name().into(), Data::schema()));
        <Data as utoipa::ToSchema>::schemas(schemas);
    }
}

fn to_sse(event: Event<'_>, entry: &kv::Entry) -> sse::Event {
    let change = event.change;
    let data = match serde_json::from_slice::<&RawValue>(&entry.value) {
        Ok(document) => serde_json::to_string(&Data { event, document }),
        Err(e) => Err(e),
    };
    sse::Event::default()
        .id(entry.revision.to_string())
        .event(change)
        .data(data.unwrap_or_default())
}

fn decode(entry: &kv::Entry) -> Result<Order, StoreError> {
    serde_json::from_slice(&entry.value).map_err(|e| StoreError::Corrupt {
        order_id: entry.key.parse().unwrap_or_default(),
        revision: entry.revision,
        reason: e.to_string(),
    })
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> IntakeError {
    IntakeError::Unavailable {
        context: "cannot read the order".into(),
        source: Some(Box::new(e)),
    }
}
