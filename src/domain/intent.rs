//! Intents: requests from outside (a cancel; later, others) recorded in the order's document for the
//! node that owns the order.
//!
//! Anyone may write an intent into the document with a compare-and-set, while a node holds the order.
//! The owner's next write is then refused; it reads the document again, and if the only difference is
//! the intent, the owner's change goes on top of it: a recorded intent is never taken for a takeover,
//! and a takeover (any other change, a new owner above all) is never taken for an intent.

use super::order::Interface;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What was asked of the order's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    /// Stop the order: roll back what is done and end it.
    Cancel,
}

/// An intent as the document records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Intent {
    pub kind: IntentKind,
    pub requested_at: DateTime<Utc>,
    /// Who took the request (the node that answered it); free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Through which interface the request came (`http` or `nats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Interface>,
    /// Why, as the requester put it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node that owned the order when it saw the intent, and when; unset until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<DateTime<Utc>>,
}

impl Intent {
    pub fn new(kind: IntentKind, requested_by: Option<String>, now: DateTime<Utc>) -> Intent {
        Intent {
            kind,
            requested_at: now,
            requested_by,
            via: None,
            reason: None,
            seen_by: None,
            seen_at: None,
        }
    }

    /// The same intent, saying which interface it came through and why.
    pub fn with_request(mut self, via: Interface, reason: Option<String>) -> Intent {
        self.via = Some(via);
        self.reason = reason;
        self
    }
}
