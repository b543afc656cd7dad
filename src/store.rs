//! The `orders` KV bucket: one key per order, its value the order's JSON document. Every write after
//! the first is a compare-and-set on the revision the writer last saw, so a writer that lost the order
//! to someone else finds out instead of overwriting.
//!
//! The store also keeps the order index (`crate::index`) for every writer: a write that changes an
//! order's state writes the index entry first and clears the order's older entries once it succeeded,
//! so the index holds at least the truth, and [`OrderStore::list`] checks what it finds against the
//! documents.

use crate::domain::limits::DOCUMENT_LIMIT;
use crate::domain::order::{Order, State};
use crate::error::{with_cause, BoxError};
use crate::index::{Entry, Found, IndexError, OrderIndex, Walk};
use crate::ops::audit::Audit;
use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::collections::HashSet;
use uuid::Uuid;

/// Name of the bucket (`nats kv get orders <id>`).
pub const BUCKET: &str = "orders";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else wrote the order since this writer read it: the writer no longer owns it.
    #[error("order {order_id} was changed by someone else (expected revision {expected})")]
    Conflict { order_id: Uuid, expected: u64 },
    /// An order with this id exists already.
    #[error("order {0} exists already")]
    Exists(Uuid),
    /// The stored value (revision `revision`) is not an order document.
    #[error("stored document of order {order_id} is unreadable: {reason}")]
    Corrupt {
        order_id: Uuid,
        revision: u64,
        reason: String,
    },
    /// The document would be larger than [`DOCUMENT_LIMIT`]: the write was not sent, and sending it
    /// again will not help.
    #[error(
        "order {order_id}'s document would be {size} bytes, more than the {DOCUMENT_LIMIT} allowed"
    )]
    TooLarge { order_id: Uuid, size: usize },
    /// NATS did not answer or refused for a reason that may pass: try again later.
    #[error("order store unavailable: {}", with_cause(context, source.as_deref()))]
    Unavailable {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl From<IndexError> for StoreError {
    fn from(e: IndexError) -> Self {
        StoreError::unavailable("", e)
    }
}

impl StoreError {
    /// The store failed doing `context`, because of `source`.
    pub fn unavailable(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Unavailable {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The store failed doing `context`, with no error of its own to name.
    pub fn unavailable_because(context: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            context: context.into(),
            source: None,
        }
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether the failure is the store's, not the order's, and may pass: trying again later helps.
    pub fn is_passing(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// An order as read from the bucket, with the revision a compare-and-set must name.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub order: Order,
    pub revision: u64,
}

/// An order found by a listing, with the index sequence a next page continues below.
#[derive(Debug, Clone)]
pub struct Listed {
    pub seq: u64,
    pub order: Order,
}

/// One page of a listing, newest first; `next` is the index sequence the next page continues below,
/// when older entries remain to be looked at.
#[derive(Debug, Clone)]
pub struct Page {
    pub orders: Vec<Listed>,
    pub next: Option<u64>,
}

/// How many documents a listing reads at once to check index entries.
const CHECKS_AT_ONCE: usize = 32;

/// The most index entries one page looks at. Past this, the page is answered with the orders found so
/// far (possibly none) and a cursor to continue below the last entry looked at, so that entries with
/// no order behind them cannot make a listing slow, however many there are.
pub const EXAMINED_PER_PAGE: usize = 1_000;

/// How long an index entry whose document is absent is left alone: the entry is written just before
/// the document's create, so a young one may be a create in flight. Three times the JetStream request
/// timeout (5 s) of that create. Older, the order is gone (expired, deleted) or never existed, and the
/// listing that meets the entry removes it.
pub const ENTRY_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// The most entries a listing checks in one round: rounds grow while they find nothing to list.
const MOST_IN_A_ROUND: usize = 256;

#[derive(Clone)]
pub struct OrderStore {
    kv: kv::Store,
    index: OrderIndex,
    audit: Audit,
}

impl OrderStore {
    /// The store on bucket `kv`, keeping `index`; documents it creates are recorded in `audit`.
    pub fn new(kv: kv::Store, index: OrderIndex, audit: Audit) -> OrderStore {
        OrderStore { kv, index, audit }
    }

    /// The bucket itself, for reading it in ways this type does not offer (watching a key).
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    pub async fn get(&self, order_id: Uuid) -> Result<Option<Versioned>, StoreError> {
        let entry = self
            .kv
            .entry(order_id.to_string())
            .await
            .map_err(|e| StoreError::unavailable("", e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let order = decode(order_id, entry.revision, &entry.value)?;
                self.index.saw(order_id, entry.revision, order.state);
                Ok(Some(Versioned {
                    order,
                    revision: entry.revision,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Writes a new order; fails with [`StoreError::Exists`] if the id is taken.
    pub async fn create(&self, order: &Order) -> Result<Versioned, StoreError> {
        let entry = self.index.announce(order, 0).await?;
        let created = self.create_document(order).await;
        match &created {
            // The key was free, so the order has no older entry to purge, unless a create whose
            // answer was lost wrote one: the order's next change of state purges it, and a listing
            // passes over the extra copy meanwhile.
            Ok(created) => self
                .index
                .saw(order.order_id, created.revision, order.state),
            Err(StoreError::Exists(_)) => self.index.withdraw(order.order_id, entry),
            Err(_) => {} // may have been applied: the entry stays
        }
        created
    }

    async fn create_document(&self, order: &Order) -> Result<Versioned, StoreError> {
        let value = fitting(order)?;
        let sent = crate::ops::audit::Stamp::now();
        self.audit.create_sending(order.order_id, sent);
        match self
            .kv
            .create(order.order_id.to_string(), value.clone())
            .await
        {
            Ok(revision) => {
                self.audit.created(order.order_id, revision);
                Ok(Versioned {
                    order: order.clone(),
                    revision,
                })
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // The client reports a create whose answer it missed, then found stored, as
                // "already exists": if the stored document is the one sent, this create wrote it.
                match self.kv.entry(order.order_id.to_string()).await {
                    Ok(Some(entry)) if entry.value == value => {
                        self.audit.created(order.order_id, entry.revision);
                        Ok(Versioned {
                            order: order.clone(),
                            revision: entry.revision,
                        })
                    }
                    _ => Err(StoreError::Exists(order.order_id)),
                }
            }
            Err(e) => {
                // A create needs no lease (the key was free); the audit still names every revision.
                self.audit.create_unconfirmed(order.order_id, sent);
                Err(StoreError::unavailable("", e))
            }
        }
    }

    /// Replaces the order's document if its revision is still `expected`.
    ///
    /// A write whose answer timed out may have been applied: the document is read back and the
    /// outcome decided by its content.
    ///
    /// A write that changes the state the index shows writes the order's new entry first.
    pub async fn update(&self, order: &Order, expected: u64) -> Result<Versioned, StoreError> {
        let id = order.order_id;
        let entry = if self.index.changes(id, expected, order.state) {
            Some(self.index.announce(order, expected).await?)
        } else {
            None
        };
        let written = self.compare_and_set(order, expected).await;
        match (&written, entry) {
            (Ok(written), entry) => {
                self.index.saw(id, written.revision, order.state);
                if let Some(seq) = entry {
                    self.index.settle(id, seq);
                }
            }
            (Err(Refused::Revision(_)), Some(seq)) => self.index.withdraw(id, seq),
            // Maybe applied: the entry stays, and a listing that finds it stale removes it.
            (Err(_), _) => {}
        }
        written.map_err(Refused::into_error)
    }

    /// Replaces the order's document, like [`OrderStore::update`], with one whose state is `was`,
    /// the state of the document at `expected` (a request recorded in an ended order): the index
    /// entry of that state stands, and the order does not move up the listing.
    pub async fn update_in_state(
        &self,
        order: &Order,
        expected: u64,
        was: State,
    ) -> Result<Versioned, StoreError> {
        if order.state != was {
            return self.update(order, expected).await;
        }
        let written = self.compare_and_set(order, expected).await;
        if let Ok(written) = &written {
            self.index
                .saw(order.order_id, written.revision, order.state);
        }
        written.map_err(Refused::into_error)
    }

    async fn compare_and_set(&self, order: &Order, expected: u64) -> Result<Versioned, Refused> {
        let value = fitting(order).map_err(Refused::Other)?;
        let key = order.order_id.to_string();
        match self.kv.update(&key, value.clone(), expected).await {
            Ok(revision) => Ok(Versioned {
                order: order.clone(),
                revision,
            }),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                metrics::counter!(crate::ops::metrics::KV_CONFLICTS).increment(1);
                Err(Refused::Revision(StoreError::Conflict {
                    order_id: order.order_id,
                    expected,
                }))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::TimedOut => self
                .resolve_ambiguous(order, &key, &value, expected)
                .await
                .map_err(Refused::Other),
            Err(e) => Err(Refused::Other(StoreError::unavailable("", e))),
        }
    }

    async fn resolve_ambiguous(
        &self,
        order: &Order,
        key: &str,
        value: &Bytes,
        expected: u64,
    ) -> Result<Versioned, StoreError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| StoreError::unavailable("write timed out and read-back failed", e))?;
        match entry {
            Some(entry) if entry.revision == expected => Err(StoreError::unavailable_because(
                "write timed out and was not applied",
            )),
            Some(entry) if entry.value == *value => Ok(Versioned {
                order: order.clone(),
                revision: entry.revision,
            }),
            _ => {
                metrics::counter!(crate::ops::metrics::KV_CONFLICTS).increment(1);
                Err(StoreError::Conflict {
                    order_id: order.order_id,
                    expected,
                })
            }
        }
    }

    /// The raw JSON document, exactly as stored (what `nats kv get orders <id>` prints).
    pub async fn get_raw(&self, order_id: Uuid) -> Result<Option<Bytes>, StoreError> {
        let entry = self
            .kv
            .entry(order_id.to_string())
            .await
            .map_err(|e| StoreError::unavailable("", e))?;
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| entry.value))
    }
}

impl OrderStore {
    /// A page of the orders in `states` (every state when empty), newest state change first, from
    /// the index entries below sequence `below` (from the newest when `None`), at most `limit`.
    ///
    /// Each entry is checked against the order's document: an order is listed only under the state
    /// its document shows, and once. An entry the document has moved past is removed, and so are
    /// messages that are not entries and entries whose document is absent past [`ENTRY_GRACE`]. At
    /// most [`EXAMINED_PER_PAGE`] entries are looked at: past that, the page holds what was found and
    /// `next` continues below the last entry looked at.
    pub async fn list(
        &self,
        states: &[State],
        below: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let top = match below {
            Some(below) => below.saturating_sub(1),
            None => self.index.last_seq().await?,
        };
        let want = limit + 1;
        let filters: Vec<Option<&str>> = if states.is_empty() {
            vec![None]
        } else {
            states.iter().map(|s| Some(s.as_str())).collect()
        };
        let mut walks: Vec<Walk> = filters
            .into_iter()
            .map(|f| Walk::new(crate::index::filter(f), top, want))
            .collect();
        let mut listed: Vec<Listed> = Vec::new();
        let mut seen = HashSet::new();
        let mut examined = 0;
        let mut lowest = None;
        let mut round = want;
        while listed.len() < want && examined < EXAMINED_PER_PAGE {
            let count = round
                .max(want - listed.len())
                .min(EXAMINED_PER_PAGE - examined);
            let candidates = Walk::merged(&mut walks, &self.index, count).await?;
            let Some(last) = candidates.last() else {
                lowest = None;
                break;
            };
            examined += candidates.len();
            lowest = Some(last.seq);
            let before = listed.len();
            let now = crate::clock::now();
            let mut entries = Vec::with_capacity(candidates.len());
            for found in candidates {
                match found.entry.clone() {
                    Some(entry) => entries.push((found, entry)),
                    None => self.index.discard(found.seq),
                }
            }
            let subjects: Vec<String> = entries
                .iter()
                .map(|(_, entry)| crate::index::subject(entry.order_id, entry.state))
                .collect();
            let checks = futures::stream::iter(entries)
                .map(|(found, entry)| self.check(found, entry, now))
                .buffered(CHECKS_AT_ONCE)
                .collect::<Vec<_>>();
            let (newest, checked) = tokio::join!(self.index.newest_on(&subjects), checks);
            let newest = newest?;
            for (found, subject) in checked.into_iter().zip(&subjects) {
                let Some(found) = found? else { continue };
                // An older copy of the entry (its writer died before it could remove it) is
                // passed over: the order is listed at its newest entry.
                let newest_copy = newest.get(subject).is_none_or(|seq| *seq == found.seq);
                if newest_copy && seen.insert(found.order.order_id) {
                    listed.push(found);
                }
            }
            if listed.len() == before {
                round = (round * 2).min(MOST_IN_A_ROUND);
            }
        }
        let next = if listed.len() > limit {
            listed.truncate(limit);
            listed.last().map(|last| last.seq)
        } else if examined >= EXAMINED_PER_PAGE {
            // Out of budget: the next page goes on below the last entry looked at.
            lowest.filter(|seq| *seq > 1)
        } else {
            None
        };
        Ok(Page {
            orders: listed,
            next,
        })
    }

    /// The order an index entry names, if its document shows the entry's state; an entry whose
    /// order has moved on since the write it was made for is removed, and so is one whose order has
    /// no document past [`ENTRY_GRACE`].
    async fn check(
        &self,
        found: Found,
        entry: Entry,
        now: DateTime<Utc>,
    ) -> Result<Option<Listed>, StoreError> {
        let Some(current) = self.get(entry.order_id).await? else {
            // Not written yet (a create in flight), or gone: expired, deleted, never written.
            if found.older_than(ENTRY_GRACE, now) {
                self.index.withdraw(entry.order_id, found.seq);
            }
            return Ok(None);
        };
        if current.order.state == entry.state {
            return Ok(Some(Listed {
                seq: found.seq,
                order: current.order,
            }));
        }
        if current.revision > entry.base {
            // The write this entry was made for was refused or has been followed by another
            // state: no write still in flight can make it right.
            self.index.withdraw(entry.order_id, found.seq);
        }
        Ok(None)
    }
}

/// Why a compare-and-set failed: the revision moved (the write was certainly not applied), or
/// anything else.
enum Refused {
    Revision(StoreError),
    Other(StoreError),
}

impl Refused {
    fn into_error(self) -> StoreError {
        match self {
            Refused::Revision(e) | Refused::Other(e) => e,
        }
    }
}

/// The document of `order`, if it is within [`DOCUMENT_LIMIT`].
fn fitting(order: &Order) -> Result<Bytes, StoreError> {
    let value = encode(order);
    if value.len() > DOCUMENT_LIMIT {
        return Err(StoreError::TooLarge {
            order_id: order.order_id,
            size: value.len(),
        });
    }
    Ok(value)
}

pub fn encode(order: &Order) -> Bytes {
    serde_json::to_vec(order)
        .expect("an order document always serializes")
        .into()
}

fn decode(order_id: Uuid, revision: u64, value: &[u8]) -> Result<Order, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        order_id,
        revision,
        reason: e.to_string(),
    })
}
