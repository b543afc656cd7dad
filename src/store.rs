//! The `orders` KV bucket: one key per order, its value the order's JSON document. Every write after
//! the first is a compare-and-set on the revision the writer last saw, so a writer that lost the order
//! to someone else finds out instead of overwriting.

use crate::domain::order::Order;
use crate::error::{with_cause, BoxError};
use crate::ops::audit::Audit;
use async_nats::jetstream::kv;
use bytes::Bytes;
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
    /// NATS did not answer or refused for a reason that may pass: try again later.
    #[error("order store unavailable: {}", with_cause(context, source.as_deref()))]
    Unavailable {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
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

#[derive(Clone)]
pub struct OrderStore {
    kv: kv::Store,
    audit: Audit,
}

impl OrderStore {
    /// The store on bucket `kv`; documents it creates are recorded in `audit`.
    pub fn new(kv: kv::Store, audit: Audit) -> OrderStore {
        OrderStore { kv, audit }
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
        let value = encode(order);
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
    pub async fn update(&self, order: &Order, expected: u64) -> Result<Versioned, StoreError> {
        let value = encode(order);
        let key = order.order_id.to_string();
        match self.kv.update(&key, value.clone(), expected).await {
            Ok(revision) => Ok(Versioned {
                order: order.clone(),
                revision,
            }),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                metrics::counter!(crate::ops::metrics::KV_CONFLICTS).increment(1);
                Err(StoreError::Conflict {
                    order_id: order.order_id,
                    expected,
                })
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::TimedOut => {
                self.resolve_ambiguous(order, &key, &value, expected).await
            }
            Err(e) => Err(StoreError::unavailable("", e)),
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
