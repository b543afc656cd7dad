//! The `ORDERS_INDEX` stream: which order is in which state, in the order the states were reached, so
//! that a page of orders in a state is found without reading every document. Each entry is one small
//! message on `orders.index.<order id>.<state>`; the stream's sequence is the order of the entries, so
//! the newest are at its end. The store writes an entry before the document write that reaches the
//! state and, once that write succeeded, purges the order's older entries; a listing walks the stream
//! backwards from its end in windows, with the server filtering by subject. The document stays the
//! authority: a listing checks each entry against it, and removes entries with no order behind them
//! and messages that are not entries (see `OrderStore::list`).

use crate::domain::order::{CurrentStep, Order, State};
use crate::error::{with_cause, BoxError};
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// Name of the stream (`nats stream info ORDERS_INDEX`).
pub const STREAM: &str = "ORDERS_INDEX";
/// Entries are published on `orders.index.<order id>.<state>`.
pub const PREFIX: &str = "orders.index";
/// How many entries one request to the server returns at most.
const BATCH: u64 = 256;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How many `(order, revision, state)` facts a store remembers to tell a state change from a write
/// that keeps the state; past this it forgets them all and writes an entry on the next write of each.
const REMEMBERED: usize = 65_536;

/// The subject of the entry that lists `order_id` under `state`.
pub fn subject(order_id: Uuid, state: State) -> String {
    format!("{PREFIX}.{order_id}.{}", state.as_str())
}

/// The subject filter of the entries under `state`, or of every entry.
pub fn filter(state: Option<&str>) -> String {
    format!("{PREFIX}.*.{}", state.unwrap_or("*"))
}

#[derive(Debug, thiserror::Error)]
#[error("order index unavailable: {}", with_cause(context, source.as_deref()))]
pub struct IndexError {
    context: String,
    #[source]
    source: Option<BoxError>,
}

impl IndexError {
    fn new(context: impl Into<String>, source: Option<BoxError>) -> IndexError {
        IndexError {
            context: context.into(),
            source,
        }
    }
}

/// What an entry says: the list item as it was when the entry was written, and the revision of the
/// document the write that reached this state replaced (0 for a create).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub order_id: Uuid,
    pub state: State,
    pub current_step: CurrentStep,
    pub start_time: DateTime<Utc>,
    pub complete_time: Option<DateTime<Utc>>,
    pub base: u64,
}

/// A message found in the stream, with its sequence and the time the server stored it. `entry` is
/// `None` for a message that is not an entry: a body that does not parse as one, or a subject that is
/// not the one its order and state give (anyone who may publish on `orders.index.>` can put such a
/// message there).
#[derive(Debug, Clone)]
pub struct Found {
    pub seq: u64,
    pub stored: Option<DateTime<Utc>>,
    pub entry: Option<Entry>,
}

impl Found {
    /// Whether the server stored this message more than `age` ago by this node's clock; `false` when
    /// its time is unknown.
    pub fn older_than(&self, age: Duration, now: DateTime<Utc>) -> bool {
        let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        self.stored.is_some_and(|stored| stored + age < now)
    }
}

/// The index, as one store writes and reads it.
#[derive(Clone)]
pub struct OrderIndex {
    js: jetstream::Context,
    /// The state of revisions this store read or wrote, by order: a write over a known revision that
    /// keeps its state writes no entry.
    known: Arc<Mutex<HashMap<Uuid, (u64, State)>>>,
}

impl OrderIndex {
    pub fn new(js: jetstream::Context) -> OrderIndex {
        OrderIndex {
            js,
            known: Arc::default(),
        }
    }

    /// Remembers that revision `revision` of the order is in `state`; a terminal order is forgotten,
    /// since it is rarely written again.
    pub(crate) fn saw(&self, order_id: Uuid, revision: u64, state: State) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        if state.is_terminal() {
            known.remove(&order_id);
            return;
        }
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(order_id, (revision, state));
    }

    /// Whether a write of `state` over revision `base` may change the state the index shows: yes
    /// unless `base` is known to be in `state` already.
    pub(crate) fn changes(&self, order_id: Uuid, base: u64, state: State) -> bool {
        let known = self
            .known
            .lock()
            .ok()
            .and_then(|k| k.get(&order_id).copied());
        known != Some((base, state))
    }

    /// Writes the entry that lists `order` under its state, for a write over revision `base`, and
    /// returns its sequence.
    pub(crate) async fn announce(&self, order: &Order, base: u64) -> Result<u64, IndexError> {
        let entry = Entry {
            order_id: order.order_id,
            state: order.state,
            current_step: order.current_step,
            start_time: order.start_time,
            complete_time: order.complete_time,
            base,
        };
        let body = serde_json::to_vec(&entry).map_err(|e| IndexError::new("", Some(e.into())))?;
        let ack = self
            .js
            .publish(subject(order.order_id, order.state), body.into())
            .await
            .map_err(|e| IndexError::new("cannot write an entry", Some(e.into())))?;
        let stored = ack
            .await
            .map_err(|e| IndexError::new("entry not confirmed", Some(e.into())))?;
        Ok(stored.sequence)
    }

    /// Removes the order's entries older than `seq`, the entry of a write that succeeded. Done in the
    /// background: an entry left behind is dropped, and removed, by the next listing that meets it.
    pub(crate) fn settle(&self, order_id: Uuid, seq: u64) {
        if let Some(request) = purge_below(order_id, seq) {
            self.background(format!("STREAM.PURGE.{STREAM}"), request, Some(order_id));
        }
    }

    /// Removes entry `seq`, written for a write that was refused or found stale by a listing.
    pub(crate) fn withdraw(&self, order_id: Uuid, seq: u64) {
        let request = serde_json::json!({ "seq": seq, "no_erase": true });
        self.background(
            format!("STREAM.MSG.DELETE.{STREAM}"),
            request,
            Some(order_id),
        );
    }

    /// Removes message `seq`, which a listing found is not an entry at all.
    pub(crate) fn discard(&self, seq: u64) {
        let request = serde_json::json!({ "seq": seq, "no_erase": true });
        self.background(format!("STREAM.MSG.DELETE.{STREAM}"), request, None);
    }

    fn background(&self, api: String, request: serde_json::Value, order_id: Option<Uuid>) {
        let js = self.js.clone();
        tokio::spawn(async move {
            let answer: Result<serde_json::Value, _> = js.request(api, &request).await;
            match answer {
                Ok(reply) if reply.get("error").is_none() => {}
                Ok(reply) => {
                    tracing::debug!(order.id = ?order_id, reply = %reply, "index entry not removed")
                }
                Err(e) => {
                    tracing::debug!(order.id = ?order_id, error = %e, "index entry not removed")
                }
            }
        });
    }

    /// The last sequence in the stream (0 when it is empty).
    pub async fn last_seq(&self) -> Result<u64, IndexError> {
        let stream = self
            .js
            .get_stream_no_info(STREAM)
            .await
            .map_err(|e| IndexError::new("", Some(e.into())))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| IndexError::new("cannot read the stream", Some(e.into())))?;
        Ok(info.state.last_sequence)
    }

    /// The entries on `filter` with sequences in `from..=to`, oldest first, in requests of at most
    /// [`BATCH`] entries each filtered by the server.
    pub async fn range(&self, filter: &str, from: u64, to: u64) -> Result<Vec<Found>, IndexError> {
        let mut found = Vec::new();
        let mut next = from;
        while next <= to {
            let batch = BATCH.min(to - next + 1);
            let got = self.batch(filter, next, batch).await?;
            let full = got.len() as u64 == batch;
            let last = got.last().map(|f| f.seq);
            found.extend(got.into_iter().filter(|f| f.seq <= to));
            match last {
                Some(last) if full && last < to => next = last + 1,
                _ => break,
            }
        }
        Ok(found)
    }

    /// One direct get of up to `batch` entries on `filter` from sequence `from` on.
    async fn batch(&self, filter: &str, from: u64, batch: u64) -> Result<Vec<Found>, IndexError> {
        let request = serde_json::json!({ "seq": from, "next_by_subj": filter, "batch": batch });
        let replies = self.direct(request, batch).await?;
        Ok(replies.iter().filter_map(parse).collect())
    }

    /// The sequence of the newest entry on each of `subjects` that has one: an entry that is not the
    /// newest on its subject is an older copy of the same fact.
    pub async fn newest_on(&self, subjects: &[String]) -> Result<HashMap<String, u64>, IndexError> {
        if subjects.is_empty() {
            return Ok(HashMap::new());
        }
        let count = subjects.len() as u64;
        let request = serde_json::json!({ "multi_last": subjects, "batch": count });
        let replies = self.direct(request, count).await?;
        Ok(replies
            .iter()
            .filter_map(|reply| {
                let headers = reply.headers.as_ref()?;
                let subject = headers.get("Nats-Subject")?.as_str().to_owned();
                let seq = headers.get("Nats-Sequence")?.as_str().parse().ok()?;
                Some((subject, seq))
            })
            .collect())
    }

    /// The messages a batched direct get answers, at most `most`.
    async fn direct(
        &self,
        request: serde_json::Value,
        most: u64,
    ) -> Result<Vec<async_nats::Message>, IndexError> {
        let client = self.js.client();
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| IndexError::new("cannot subscribe", Some(e.into())))?;
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{STREAM}"),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| IndexError::new("cannot ask for entries", Some(e.into())))?;
        let mut found = Vec::new();
        while (found.len() as u64) < most {
            let reply = tokio::time::timeout(REQUEST_TIMEOUT, replies.next())
                .await
                .map_err(|_| IndexError::new("no answer to a direct get", None))?
                .ok_or_else(|| IndexError::new("the connection closed", None))?;
            match reply.status.map(|s| s.as_u16()) {
                None | Some(200) => found.push(reply),
                // 204: the end of the batch; 404: nothing on the filter from there on.
                Some(204) | Some(404) => break,
                Some(status) => {
                    let why = reply.description.unwrap_or_default();
                    return Err(IndexError::new(format!("direct get: {status} {why}"), None));
                }
            }
        }
        Ok(found)
    }
}

/// The purge of the order's entries below sequence `seq`; none below the first sequence. The server
/// takes a purge "below 1" for a purge with no bound, which would remove the order's newer entries
/// too (nats-server 2.12.2).
fn purge_below(order_id: Uuid, seq: u64) -> Option<serde_json::Value> {
    (seq > 1).then(|| serde_json::json!({ "filter": format!("{PREFIX}.{order_id}.*"), "seq": seq }))
}

/// A walk over the entries on one filter, from a sequence down to the stream's start, a window at a
/// time: the window grows while it finds too few entries and shrinks when it finds many more than a
/// page, so a page costs a few requests whatever the stream holds below it.
pub struct Walk {
    filter: String,
    /// The highest sequence not yet looked at; 0 when the walk reached the start.
    top: u64,
    window: u64,
    want: u64,
    /// Entries found and not yet taken, newest first.
    ahead: std::collections::VecDeque<Found>,
}

impl Walk {
    /// A walk over `filter` from sequence `top` down, for pages of `want` entries.
    pub fn new(filter: String, top: u64, want: usize) -> Walk {
        let want = want.max(1) as u64;
        Walk {
            filter,
            top,
            window: want * 2,
            want,
            ahead: Default::default(),
        }
    }

    /// The newest entry not yet taken, looking further down the stream if needed.
    async fn head(&mut self, index: &OrderIndex) -> Result<Option<u64>, IndexError> {
        while self.ahead.is_empty() && self.top > 0 {
            let from = self.top.saturating_sub(self.window - 1).max(1);
            let found = index.range(&self.filter, from, self.top).await?;
            let count = found.len() as u64;
            self.ahead.extend(found.into_iter().rev());
            self.top = from - 1;
            if count < self.want {
                self.window = self.window.saturating_mul(4);
            } else if count > self.want * 4 {
                self.window = (self.window / 2).max(self.want);
            }
        }
        Ok(self.ahead.front().map(|f| f.seq))
    }

    /// The next `count` entries of all `walks` together, newest first.
    pub async fn merged(
        walks: &mut [Walk],
        index: &OrderIndex,
        count: usize,
    ) -> Result<Vec<Found>, IndexError> {
        let mut taken = Vec::with_capacity(count);
        while taken.len() < count {
            let mut newest: Option<(usize, u64)> = None;
            for (i, walk) in walks.iter_mut().enumerate() {
                if let Some(seq) = walk.head(index).await? {
                    if newest.is_none_or(|(_, best)| seq > best) {
                        newest = Some((i, seq));
                    }
                }
            }
            let Some((i, _)) = newest else { break };
            taken.extend(walks[i].ahead.pop_front());
        }
        Ok(taken)
    }
}

/// A message from a direct get's reply, with its entry if it is one; `None` for a reply without a
/// sequence.
fn parse(reply: &async_nats::Message) -> Option<Found> {
    let headers = reply.headers.as_ref()?;
    let seq = headers.get("Nats-Sequence")?.as_str().parse().ok()?;
    let stored = headers
        .get("Nats-Time-Stamp")
        .and_then(|time| DateTime::parse_from_rfc3339(time.as_str()).ok())
        .map(|time| time.with_timezone(&Utc));
    let on = headers.get("Nats-Subject").map(|s| s.as_str());
    let entry = serde_json::from_slice::<Entry>(&reply.payload)
        .ok()
        .filter(|entry| on == Some(subject(entry.order_id, entry.state).as_str()));
    Some(Found { seq, stored, entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_order_then_the_state() {
        let id = Uuid::nil();
        assert_eq!(
            subject(id, State::RollingBack),
            format!("orders.index.{id}.RollingBack")
        );
        assert_eq!(filter(Some("Failed")), "orders.index.*.Failed");
        assert_eq!(filter(None), "orders.index.*.*");
    }

    #[test]
    fn nothing_is_purged_below_the_first_entry() {
        let id = Uuid::nil();
        assert_eq!(purge_below(id, 1), None);
        let purge = purge_below(id, 2).unwrap();
        assert_eq!(purge["seq"], 2);
        assert_eq!(purge["filter"], format!("orders.index.{id}.*"));
    }
}
