//! The sweep: finds work messages that no node can ever receive, and puts their orders back in the
//! queue in a form that can be received.
//!
//! Any NATS client can publish into `ORDERS`, headers included, and the server stores a header block
//! that the node's NATS client (async-nats 0.51) cannot read:
//! - a block that does not parse (a line without `:`, bytes that are not UTF-8, no `NATS/1.0`) makes
//!   the client drop the whole connection, and with it every lease the node holds, each time the
//!   message is delivered;
//! - a block with a status (`NATS/1.0 408`) is taken for a message from the server about the pull,
//!   so the order is never run.
//!
//! The sweep reads each message the consumer has delivered through the stream's `MSG.GET` API, which
//! answers with JSON (the header block base64-encoded inside), so reading a bad block harms nothing.
//! A message whose block the client could not read is published again on the same subject with the
//! same payload and no headers, then deleted: nobody can hold a lease on a message nobody can
//! receive, and the copy is an ordinary work message that goes through the usual checks (its id, its
//! payload, a second message for the same order).
//!
//! The sweep also removes a message whose order ended long ago: an acked message whose removal the
//! server lost (seen when a cluster's stream leader is killed), which nothing would remove otherwise.
//!
//! A node sweeps right after its fetch connection was lost (a bad block may have caused it: it then
//! costs one reconnect of one node's fetch connection, and no lease) and every [`EVERY`], one node of
//! the cluster at a time.

use crate::domain::order::{parse_order_id, Order};
use crate::engine::connection::Connection;
use crate::engine::window::Windows;
use crate::ops::metrics as m;
use crate::ops::rate::RateLimited;
use crate::queue::setup::{is_asked_retry, CONSUMER, RETRY_HEADER, STREAM, SUBMIT_PREFIX};
use crate::store::OrderStore;
use crate::task::Task;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, kv, stream::Stream};
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often one node of the cluster sweeps.
pub const EVERY: Duration = Duration::from_secs(10);
/// Header naming the copy of a message the sweep replaced, so that two nodes sweeping at once
/// publish one copy.
const REQUEUE_ID_PREFIX: &str = "orderly-requeue-";

/// Why a header block cannot be received as a work message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHeaders {
    /// The client drops its connection on it.
    Malformed,
    /// The client takes the message for a status from the server.
    Status,
}

impl BadHeaders {
    pub fn as_str(self) -> &'static str {
        match self {
            BadHeaders::Malformed => "malformed_headers",
            BadHeaders::Status => "status_headers",
        }
    }
}

/// Checks a header block as async-nats 0.51 reads one (`Connection::try_read_op`, `HMSG`): UTF-8, a
/// first line `NATS/1.0` with nothing after it but white space, then `name: value` lines whose name
/// is printable ASCII without `:`, each optionally continued by lines that start with white space.
pub fn check_header_block(block: &[u8]) -> Result<(), BadHeaders> {
    let text = std::str::from_utf8(block).map_err(|_| BadHeaders::Malformed)?;
    let mut lines = text.lines().peekable();
    let version = lines.next().ok_or(BadHeaders::Malformed)?;
    let rest = version
        .strip_prefix("NATS/1.0")
        .ok_or(BadHeaders::Malformed)?
        .trim();
    if !rest.is_empty() {
        let status = rest
            .split_once(' ')
            .map_or(rest, |(status, _)| status.trim());
        return match status.parse::<u16>() {
            Ok(100..=999) if status.len() == 3 => Err(BadHeaders::Status),
            _ => Err(BadHeaders::Malformed),
        };
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, _) = line.split_once(':').ok_or(BadHeaders::Malformed)?;
        if name.contains(|c: char| !c.is_ascii_graphic()) {
            return Err(BadHeaders::Malformed);
        }
        while lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    Ok(())
}

/// A stored message as `MSG.GET` returns it.
#[derive(Debug, Deserialize)]
struct StoredMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    data: String,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    time: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Deserialize)]
struct MsgGetReply {
    message: Option<StoredMessage>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// What a `MSG.GET` found.
pub struct Found {
    pub subject: String,
    pub seq: u64,
    pub payload: Bytes,
    /// The raw header block, if the message has one.
    pub headers: Option<Vec<u8>>,
    /// When the stream stored the message, to the millisecond (as a worker records it).
    pub stored: Option<chrono::DateTime<chrono::Utc>>,
}

/// The value of header `name` in a raw header block, if it has one.
fn header<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(block).ok()?;
    text.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The retry number a raw header block carries (`Orderly-Retry: <n>`), if any.
fn retry_number(block: &[u8]) -> Option<u32> {
    header(block, RETRY_HEADER)?.parse().ok()
}

/// Whether a message with the raw header block `block` carries the next attempt of `order`: the work
/// message of a retry the order asks for and has not recorded yet. A message with the retry header
/// that the order does not ask for carries nothing, whatever number it claims.
fn carries_awaited_retry(block: &[u8], order: &Order) -> bool {
    retry_number(block).is_some_and(|number| {
        number > order.retries
            && is_asked_retry(order, number, header(block, NATS_MESSAGE_ID.as_ref()))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("cannot read message from stream {STREAM}: {0}")]
    Request(#[from] jetstream::context::RequestError),
    #[error("stream {STREAM} refused to return a message: {0}")]
    Refused(String),
    #[error("stream {STREAM} returned a message that cannot be decoded: {0}")]
    Decode(#[from] base64::DecodeError),
}

/// The first work message at or after `seq`, read as JSON, without parsing its header block.
pub async fn peek(js: &jetstream::Context, seq: u64) -> Result<Option<Found>, PeekError> {
    let request = serde_json::json!({ "seq": seq, "next_by_subj": format!("{SUBMIT_PREFIX}.>") });
    peek_request(js, &request).await
}

/// The message with sequence `seq` exactly, read as JSON, without parsing its header block.
pub async fn peek_exact(js: &jetstream::Context, seq: u64) -> Result<Option<Found>, PeekError> {
    peek_request(js, &serde_json::json!({ "seq": seq })).await
}

async fn peek_request(
    js: &jetstream::Context,
    request: &serde_json::Value,
) -> Result<Option<Found>, PeekError> {
    let reply: MsgGetReply = js
        .request(format!("STREAM.MSG.GET.{STREAM}"), request)
        .await?;
    if let Some(error) = reply.error {
        // 10037: no message found.
        return if error.err_code == 10037 {
            Ok(None)
        } else {
            Err(PeekError::Refused(error.description))
        };
    }
    let Some(message) = reply.message else {
        return Ok(None);
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let headers = match message.hdrs {
        Some(h) if !h.is_empty() => Some(engine.decode(h)?),
        _ => None,
    };
    Ok(Some(Found {
        subject: message.subject,
        seq: message.seq,
        payload: engine.decode(message.data)?.into(),
        headers,
        stored: message
            .time
            .map(|t| chrono::SubsecRound::trunc_subsecs(t, 3)),
    }))
}

/// The sweep of one node.
pub struct Sweep {
    js: jetstream::Context,
    stream: Stream,
    store: OrderStore,
    windows: watch::Receiver<Windows>,
    nodes: kv::Store,
    node_id: String,
    /// The fetch connection: a bad header block drops it.
    connection: Connection,
    /// Messages already read and found receivable (messages never change).
    checked: BTreeSet<u64>,
}

impl Sweep {
    pub fn new(
        js: jetstream::Context,
        stream: Stream,
        store: OrderStore,
        windows: watch::Receiver<Windows>,
        nodes: kv::Store,
        node_id: String,
        connection: Connection,
    ) -> Sweep {
        Sweep {
            js,
            stream,
            store,
            windows,
            nodes,
            node_id,
            connection,
            checked: BTreeSet::new(),
        }
    }

    /// One node of the cluster sweeps in each period: the one that creates the period's key.
    async fn my_turn(&self) -> bool {
        let slot = chrono::Utc::now().timestamp() as u64 / EVERY.as_secs().max(1);
        self.nodes
            .create(format!("sweep.{slot}"), Bytes::from(self.node_id.clone()))
            .await
            .is_ok()
    }

    /// Reads every message the consumer has delivered and replaces those no node can receive.
    pub async fn sweep(&mut self) -> anyhow::Result<usize> {
        let info = self.stream.consumer_info(CONSUMER).await?;
        let delivered = info.delivered.stream_sequence;
        let mut replaced = 0;
        let mut seq = 1;
        // Rebuilt as the walk goes, so that messages acked meanwhile are forgotten.
        let mut still_there = BTreeSet::new();
        while seq <= delivered {
            let Some(found) = peek(&self.js, seq).await? else {
                break;
            };
            if found.seq > delivered {
                break;
            }
            seq = found.seq + 1;
            if self.checked.contains(&found.seq) {
                // Still there a sweep later: perhaps its order ended and the ack was lost.
                if !self.remove_if_left_over(&found).await? {
                    still_there.insert(found.seq);
                }
                continue;
            }
            match found.headers.as_deref().map(check_header_block) {
                Some(Err(bad)) => {
                    self.requeue(&found, bad).await?;
                    replaced += 1;
                }
                _ => {
                    still_there.insert(found.seq);
                }
            }
        }
        self.checked = still_there;
        Ok(replaced)
    }

    /// Deletes a message whose order ended long enough ago that its ack should have removed it: the
    /// server can lose the removal of an acked message (seen when a cluster's stream leader is
    /// killed), and the consumer then never delivers it again. An order that ended is never written
    /// again, so removing its message is safe whoever may still hold it.
    async fn remove_if_left_over(&self, found: &Found) -> anyhow::Result<bool> {
        let key = found
            .subject
            .strip_prefix(SUBMIT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_default();
        let Ok(order_id) = parse_order_id(key) else {
            return Ok(false);
        };
        let Ok(Some(order)) = self.store.get(order_id).await else {
            return Ok(false);
        };
        if found
            .headers
            .as_deref()
            .is_some_and(|block| carries_awaited_retry(block, &order.order))
        {
            return Ok(false);
        }
        let grace = self.windows.borrow().longest() * 2;
        let ended_long_ago = order.order.is_terminal()
            && order.order.complete_time.is_some_and(|done| {
                (chrono::Utc::now() - done).to_std().unwrap_or_default() > grace
            });
        if !ended_long_ago {
            return Ok(false);
        }
        if let Err(e) = self.stream.delete_message(found.seq).await {
            if peek_exact(&self.js, found.seq).await?.is_some() {
                return Err(e.into());
            }
        }
        metrics::counter!(m::LEFTOVERS_REMOVED).increment(1);
        tracing::warn!(
            msg.stream_seq = found.seq,
            order.id = %order_id,
            state = %order.order.state,
            "removed a work message whose order ended long ago (its ack was lost)"
        );
        Ok(true)
    }

    /// Publishes a copy of `found` without its headers, then deletes it. The copy's id makes two
    /// nodes' sweeps of the same message one copy; an id that another message took first (anyone can
    /// publish with it: the sequence is no secret) is given up for one nobody can know, so that the
    /// original is never deleted without a copy stored.
    async fn requeue(&self, found: &Found, bad: BadHeaders) -> anyhow::Result<()> {
        let id = format!("{REQUEUE_ID_PREFIX}{}", found.seq);
        let mut stored = self.publish_copy(found, &id).await?;
        if stored.duplicate && !self.is_copy_of(found, stored.sequence).await? {
            tracing::warn!(
                msg.stream_seq = found.seq,
                taken_by = stored.sequence,
                "the id of a work message's copy was taken by another message; publishing the copy under a new id"
            );
            let id = format!("{id}-{}", uuid::Uuid::new_v4().simple());
            stored = self.publish_copy(found, &id).await?;
        }
        if let Err(e) = self.stream.delete_message(found.seq).await {
            // Another node may have replaced it a moment ago; otherwise the next sweep tries again
            // (its copy is published once: the duplicate window recognises it).
            if peek_exact(&self.js, found.seq).await?.is_some() {
                return Err(e.into());
            }
        }
        metrics::counter!(m::MESSAGES_REQUEUED, "reason" => bad.as_str()).increment(1);
        tracing::warn!(
            msg.stream_seq = found.seq,
            subject = %found.subject,
            reason = bad.as_str(),
            copy.stream_seq = stored.sequence,
            "work message with a header block no node can receive: published again without headers"
        );
        Ok(())
    }
}

impl Sweep {
    async fn publish_copy(
        &self,
        found: &Found,
        id: &str,
    ) -> anyhow::Result<jetstream::publish::PublishAck> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        Ok(self
            .js
            .publish_with_headers(found.subject.clone(), headers, found.payload.clone())
            .await?
            .await?)
    }

    /// Whether the message at `seq` is a copy of `found` (same subject and payload); `false` also
    /// when it is gone, since then nobody can tell.
    async fn is_copy_of(&self, found: &Found, seq: u64) -> anyhow::Result<bool> {
        Ok(peek_exact(&self.js, seq)
            .await?
            .is_some_and(|copy| copy.subject == found.subject && copy.payload == found.payload))
    }
}

impl Task for Sweep {
    const NAME: &'static str = "sweep";

    async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut errors = RateLimited::new(Duration::from_secs(30));
        let mut seen_losses = self.connection.losses();
        loop {
            let lost = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = self.connection.wait_loss_after(seen_losses) => true,
                _ = tokio::time::sleep(EVERY) => false,
            };
            if lost {
                seen_losses = self.connection.losses();
                // Wait for the connection to come back before reading.
                let client = self.js.client();
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wait_connected(&client) => {}
                }
            } else if !self.my_turn().await {
                continue;
            }
            if let Err(e) = self.sweep().await {
                if let Some(skipped) = errors.allow() {
                    tracing::warn!(error = %e, skipped, "cannot sweep the work queue; trying again later");
                }
            }
        }
    }
}

async fn wait_connected(client: &async_nats::Client) {
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::Interface;
    use crate::queue::setup::retry_message_id;

    #[test]
    fn a_retry_message_is_recognised_by_its_header() {
        let block = b"NATS/1.0\r\nNats-Msg-Id: x.retry.2\r\nOrderly-Retry: 2\r\n\r\n";
        assert_eq!(retry_number(block), Some(2));
        assert_eq!(retry_number(b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"), None);
    }

    #[test]
    fn only_the_retry_an_ended_order_asks_for_keeps_its_message_from_removal() {
        let now = chrono::Utc::now();
        let payload = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let mut order = Order::queued(uuid::Uuid::now_v7(), payload, Interface::Http, now);
        order.state = crate::domain::order::State::Failed;
        let block = |id: &str, number: u32| {
            format!("NATS/1.0\r\nNats-Msg-Id: {id}\r\nOrderly-Retry: {number}\r\n\r\n")
        };
        let id = order.order_id;
        // Anyone may publish a work message with the retry header: the order asks for nothing.
        let forged = block(&format!("{id}.retry.1.forged"), 1);
        assert!(!carries_awaited_retry(forged.as_bytes(), &order));

        let number = order.request_retry("key".into(), now).unwrap();
        let asked = block(&retry_message_id(&id, number, "key"), number);
        assert!(carries_awaited_retry(asked.as_bytes(), &order));
        assert!(!carries_awaited_retry(forged.as_bytes(), &order));
        let other_number = block(&retry_message_id(&id, number + 1, "key"), number + 1);
        assert!(!carries_awaited_retry(other_number.as_bytes(), &order));

        // Once recorded, the retry's message carries nothing more than any other of the order.
        order.retry(now).unwrap();
        order.state = crate::domain::order::State::Completed;
        assert!(!carries_awaited_retry(asked.as_bytes(), &order));
    }

    #[test]
    fn header_blocks_are_judged_as_the_client_reads_them() {
        assert_eq!(check_header_block(b"NATS/1.0\r\n\r\n"), Ok(()));
        assert_eq!(
            check_header_block(b"NATS/1.0\r\nNats-Msg-Id: a\r\nX-Long: one\r\n two\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check_header_block(b"NATS/1.0\r\nGarbage\r\n\r\n"),
            Err(BadHeaders::Malformed)
        );
        assert_eq!(
            check_header_block(b"NATS/1.0\r\nK\xff: v\r\n\r\n"),
            Err(BadHeaders::Malformed)
        );
        assert_eq!(
            check_header_block(b"HTTP/1.1\r\n\r\n"),
            Err(BadHeaders::Malformed)
        );
        assert_eq!(
            check_header_block(b"NATS/1.0\r\nbad name: v\r\n\r\n"),
            Err(BadHeaders::Malformed)
        );
        for status in ["100", "408", "409 Leadership Change", "503"] {
            let block = format!("NATS/1.0 {status}\r\n\r\n");
            assert_eq!(
                check_header_block(block.as_bytes()),
                Err(BadHeaders::Status),
                "{status}"
            );
        }
        assert_eq!(
            check_header_block(b"NATS/1.0 abc\r\n\r\n"),
            Err(BadHeaders::Malformed)
        );
    }
}
