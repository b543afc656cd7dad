//! Everything Orderly keeps in NATS, set up idempotently at every start: the `ORDERS` work-queue
//! stream, the `workers` pull consumer shared by every node, the `orders` bucket, the `ORDERS_INDEX`
//! stream of the order index and the `orderly-nodes` bucket.
//!
//! The same definitions live as JSON under `nats/` for operators who create them with the `nats` CLI;
//! a test keeps the two equal.

use async_nats::jetstream::{self, consumer, kv, stream};
use std::time::Duration;

pub const STREAM: &str = "ORDERS";
/// Work messages are published on `orders.submit.<order id>`.
pub const SUBMIT_PREFIX: &str = "orders.submit";
pub const CONSUMER: &str = "workers";
/// Header on a work message published by a node's intake: the interface the order came in through
/// (`http` or `nats`). A message without it was published straight into the stream.
pub const VIA_HEADER: &str = "Orderly-Submitted-Via";
pub const NODES_BUCKET: &str = "orderly-nodes";
/// Subject of `nats req orders.create '{...}'`.
pub const CREATE_SUBJECT: &str = "orders.create";
/// Subject of `nats req orders.get <id>`.
pub const GET_SUBJECT: &str = "orders.get";
/// Subject of `nats req orders.cancel <id>`.
pub const CANCEL_SUBJECT: &str = "orders.cancel";
/// Subject of `nats req orders.retry <id>`.
pub const RETRY_SUBJECT: &str = "orders.retry";
/// A node listens on `orders.interrupt.<node id>` for the ids of orders whose running step a cancel
/// should interrupt (core NATS; the document stays the authority).
pub const INTERRUPT_PREFIX: &str = "orders.interrupt";
/// Header on the work message of a retry: the retry's number (the document's `retries` once it runs).
pub const RETRY_HEADER: &str = "Orderly-Retry";
/// Subject of `nats req orders.list '{"state":["Failed"],"limit":2}'`.
pub const LIST_SUBJECT: &str = "orders.list";
/// How long a repeated submission of the same order id is recognised as the same order.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Revisions of each order kept in the bucket (`nats kv history orders <id>`).
pub const ORDER_HISTORY: i64 = 32;
/// Largest message the stream stores; the worker enforces the 64 KiB payload limit itself.
pub const MAX_MSG_SIZE: i32 = 1024 * 1024;
/// The consumer's cap on unacknowledged messages across all nodes.
pub const MAX_ACK_PENDING: i64 = 20_000;

/// The message id of the work message of retry `number` of `order_id`, asked for with `key`.
pub fn retry_message_id(order_id: &uuid::Uuid, number: u32, key: &str) -> String {
    format!("{order_id}.retry.{number}.{key}")
}

/// Whether a work message with the retry header `number` and the id `message_id` is the one of the
/// retry `order` asks for (`retry_request`). The header alone proves nothing: anyone who may publish
/// a work message can add it.
pub fn is_asked_retry(
    order: &crate::domain::order::Order,
    number: u32,
    message_id: Option<&str>,
) -> bool {
    order.retry_request.as_ref().is_some_and(|asked| {
        asked.retry == number
            && message_id == Some(&retry_message_id(&order.order_id, asked.retry, &asked.key))
    })
}

pub fn submit_subject(order_id: &uuid::Uuid) -> String {
    format!("{SUBMIT_PREFIX}.{order_id}")
}

pub fn interrupt_subject(node_id: &str) -> String {
    format!("{INTERRUPT_PREFIX}.{node_id}")
}

/// What the node needs to know about the JetStream objects it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub replicas: u8,
    pub ack_wait: Duration,
}

pub fn stream_config(layout: Layout) -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        description: Some("Orderly work queue: one message per accepted order".into()),
        subjects: vec![format!("{SUBMIT_PREFIX}.*")],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        duplicate_window: DUPLICATE_WINDOW,
        max_message_size: MAX_MSG_SIZE,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The consumer's redelivery windows, one per delivery (the last repeats): the ack wait for the first
/// two deliveries, then twice and four times as long, so that an order whose node keeps dying with it
/// is retried ever more slowly. The server takes `backoff[0]` as the ack wait.
pub fn backoff(ack_wait: Duration) -> Vec<Duration> {
    vec![ack_wait, ack_wait, ack_wait * 2, ack_wait * 4]
}

/// The consumer's own delivery limit: none. The server would stop delivering a message after its
/// limit and leave it in the work-queue stream for nobody, whatever the cause (a store outage, a
/// server restart, a node that died), and the only word of it is an advisory any client can forge.
/// Orderly counts deliveries itself (`ORDERLY_MAX_DELIVER`) and ends an order that used them all up
/// under the lease of the delivery after the last.
pub const CONSUMER_MAX_DELIVER: i64 = -1;

pub fn consumer_config(layout: Layout) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.into()),
        description: Some("Shared by every Orderly node".into()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: layout.ack_wait,
        max_deliver: CONSUMER_MAX_DELIVER,
        backoff: backoff(layout.ack_wait),
        max_ack_pending: MAX_ACK_PENDING,
        filter_subject: format!("{SUBMIT_PREFIX}.*"),
        ..Default::default()
    }
}

pub fn orders_bucket_config(layout: Layout) -> kv::Config {
    kv::Config {
        bucket: crate::store::BUCKET.into(),
        description: "Orderly order documents, one key per order id".into(),
        history: ORDER_HISTORY,
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        ..Default::default()
    }
}

/// The order index (`crate::index`): limits retention, so entries stay until the store purges them;
/// direct gets, so a listing's reads are answered by any replica with the server's subject filter.
pub fn index_stream_config(layout: Layout) -> stream::Config {
    stream::Config {
        name: crate::index::STREAM.into(),
        description: Some("Orderly order index: one entry per order, under its state".into()),
        subjects: vec![format!("{}.*.*", crate::index::PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

pub fn nodes_bucket_config(layout: Layout) -> kv::Config {
    kv::Config {
        bucket: NODES_BUCKET.into(),
        description: "Orderly node heartbeats".into(),
        history: 1,
        max_age: Duration::from_secs(60),
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what} exists with a different configuration: {differences}. Align this node's settings with it, or change it with the nats CLI (see nats/README.md)")]
    Conflict { what: String, differences: String },
    #[error("cannot set up {what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
}

fn nats_err(what: &str) -> impl FnOnce(async_nats::Error) -> SetupError + '_ {
    move |source| SetupError::Nats {
        what: what.to_owned(),
        source,
    }
}

/// Handles to the JetStream objects, once they are known to exist with the expected configuration.
#[derive(Clone)]
pub struct Setup {
    pub stream: stream::Stream,
    pub consumer: consumer::PullConsumer,
    pub orders: kv::Store,
    pub nodes: kv::Store,
}

/// Creates whatever is missing and checks that what exists matches `layout`.
pub async fn setup(js: &jetstream::Context, layout: Layout) -> Result<Setup, SetupError> {
    let mut stream = work_stream(js, layout).await?;
    let consumer = work_consumer(&mut stream, layout).await?;
    let orders = bucket(js, orders_bucket_config(layout)).await?;
    let nodes = bucket(js, nodes_bucket_config(layout)).await?;
    index_stream(js, layout).await?;
    Ok(Setup {
        stream,
        consumer,
        orders,
        nodes,
    })
}

/// The `ORDERS` stream, created if it is missing; an existing one must match what Orderly needs.
async fn work_stream(
    js: &jetstream::Context,
    layout: Layout,
) -> Result<stream::Stream, SetupError> {
    let wanted = stream_config(layout);
    let stream = match js.get_stream(STREAM).await {
        Ok(stream) => stream,
        Err(_) => js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| nats_err("stream ORDERS")(e.into()))?,
    };
    let mut stream = stream;
    let diffs = stream_differences(&mut stream, &wanted, "stream ORDERS", "replicas").await?;
    conflict("stream ORDERS", diffs)?;
    Ok(stream)
}

/// How the existing `stream` differs from `wanted` in what Orderly relies on: subjects, retention,
/// storage and replicas (named `replicas` in the list).
async fn stream_differences(
    stream: &mut stream::Stream,
    wanted: &stream::Config,
    what: &str,
    replicas: &str,
) -> Result<Vec<String>, SetupError> {
    let actual = stream
        .info()
        .await
        .map_err(|e| nats_err(what)(e.into()))?
        .config
        .clone();
    let mut diffs = Vec::new();
    differ(&mut diffs, "subjects", &wanted.subjects, &actual.subjects);
    differ(
        &mut diffs,
        "retention",
        &wanted.retention,
        &actual.retention,
    );
    differ(&mut diffs, "storage", &wanted.storage, &actual.storage);
    differ(
        &mut diffs,
        replicas,
        &wanted.num_replicas,
        &actual.num_replicas,
    );
    Ok(diffs)
}

/// The `ORDERS_INDEX` stream, created if it is missing; an existing one must match.
async fn index_stream(js: &jetstream::Context, layout: Layout) -> Result<(), SetupError> {
    let wanted = index_stream_config(layout);
    let what = format!("stream {}", wanted.name);
    let mut stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| nats_err(&what)(e.into()))?;
    let mut diffs =
        stream_differences(&mut stream, &wanted, &what, "replicas (ORDERLY_REPLICAS)").await?;
    let actual = stream.cached_info().config.clone();
    differ(
        &mut diffs,
        "allow_direct",
        &wanted.allow_direct,
        &actual.allow_direct,
    );
    conflict(&what, diffs)
}

/// The `workers` consumer, created if it is missing (and upgraded if an earlier Orderly gave it a
/// delivery limit); an existing one must match what Orderly needs.
async fn work_consumer(
    stream: &mut stream::Stream,
    layout: Layout,
) -> Result<consumer::PullConsumer, SetupError> {
    let wanted = consumer_config(layout);
    let mut consumer: consumer::PullConsumer = match stream.get_consumer(CONSUMER).await {
        Ok(consumer) => consumer,
        Err(_) => stream
            .get_or_create_consumer(CONSUMER, wanted.clone())
            .await
            .map_err(|e| nats_err("consumer ORDERS/workers")(e.into()))?,
    };
    if let Some(upgraded) = without_delivery_limit(consumer.cached_info(), &wanted) {
        let limit = consumer.cached_info().config.max_deliver;
        consumer = stream
            .update_consumer(upgraded)
            .await
            .map_err(|e| nats_err("consumer ORDERS/workers")(e.into()))?;
        tracing::warn!(
            limit,
            "the consumer {CONSUMER} had a delivery limit (an earlier Orderly created it); Orderly counts deliveries itself now, so it was removed. A message the limit had already stranded stays in the stream (see nats/README.md)"
        );
    }
    let actual = &consumer.cached_info().config;
    let mut diffs = Vec::new();
    differ(
        &mut diffs,
        "ack_policy",
        &wanted.ack_policy,
        &actual.ack_policy,
    );
    differ(
        &mut diffs,
        "ack_wait (ORDERLY_ACK_WAIT)",
        &humantime::format_duration(wanted.ack_wait).to_string(),
        &humantime::format_duration(actual.ack_wait).to_string(),
    );
    differ(
        &mut diffs,
        "max_deliver (Orderly counts deliveries itself: the consumer must have no limit, -1)",
        &wanted.max_deliver,
        &actual.max_deliver,
    );
    let windows = |list: &[Duration]| {
        list.iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    differ(
        &mut diffs,
        "backoff (from ORDERLY_ACK_WAIT)",
        &windows(&wanted.backoff),
        &windows(&actual.backoff),
    );
    differ(
        &mut diffs,
        "filter_subject",
        &wanted.filter_subject,
        &actual.filter_subject,
    );
    conflict("consumer ORDERS/workers", diffs)?;
    Ok(consumer)
}

/// The configuration that upgrades a consumer an earlier Orderly created (with a delivery limit, and
/// its backoff cut to that many entries) to today's, if that is the only difference.
fn without_delivery_limit(
    info: &consumer::Info,
    wanted: &consumer::pull::Config,
) -> Option<consumer::pull::Config> {
    let actual = &info.config;
    let earlier = actual.max_deliver != wanted.max_deliver
        && actual.ack_wait == wanted.ack_wait
        && wanted.backoff.starts_with(&actual.backoff);
    if !earlier {
        return None;
    }
    use consumer::FromConsumer;
    let mut upgraded = consumer::pull::Config::try_from_consumer_config(actual.clone()).ok()?;
    upgraded.max_deliver = wanted.max_deliver;
    upgraded.backoff = wanted.backoff.clone();
    Some(upgraded)
}

async fn bucket(js: &jetstream::Context, wanted: kv::Config) -> Result<kv::Store, SetupError> {
    let what = format!("bucket {}", wanted.bucket);
    let store = match js.get_key_value(&wanted.bucket).await {
        Ok(store) => store,
        Err(_) => match js.create_key_value(wanted.clone()).await {
            Ok(store) => store,
            // Another node may have created it a moment ago.
            Err(create) => js
                .get_key_value(&wanted.bucket)
                .await
                .map_err(|_| nats_err(&what)(create.into()))?,
        },
    };
    let mut stream = js
        .get_stream(format!("KV_{}", wanted.bucket))
        .await
        .map_err(|e| nats_err(&what)(e.into()))?;
    let actual = stream
        .info()
        .await
        .map_err(|e| nats_err(&what)(e.into()))?
        .config
        .clone();
    let mut diffs = Vec::new();
    differ(
        &mut diffs,
        "history",
        &wanted.history,
        &actual.max_messages_per_subject,
    );
    differ(
        &mut diffs,
        "replicas (ORDERLY_REPLICAS)",
        &wanted.num_replicas,
        &actual.num_replicas,
    );
    differ(&mut diffs, "storage", &wanted.storage, &actual.storage);
    conflict(&what, diffs)?;
    Ok(store)
}

fn differ<T: PartialEq + std::fmt::Debug>(
    diffs: &mut Vec<String>,
    field: &str,
    wanted: &T,
    actual: &T,
) {
    if wanted != actual {
        diffs.push(format!("{field} is {actual:?}, this node wants {wanted:?}"));
    }
}

fn conflict(what: &str, diffs: Vec<String>) -> Result<(), SetupError> {
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(SetupError::Conflict {
            what: what.to_owned(),
            differences: diffs.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_windows_grow_and_fit_max_deliver() {
        let w = Duration::from_secs(30);
        assert_eq!(backoff(w), [w, w, w * 2, w * 4]);
    }
}
