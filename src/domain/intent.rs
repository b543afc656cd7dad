//! Intents: requests from outside (a cancel; later, others) recorded in the order's document for the
//! node that owns the order.
//!
//! Anyone may write an intent into the document with a compare-and-set, while a node holds the order.
//! The owner's next write is then refused; it reads the document again, and if the only difference is
//! the intent, the owner's change goes on top of it: a recorded intent is never taken for a takeover,
//! and a takeover (any other change, a new owner above all) is never taken for an intent.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What was asked of the order's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    /// Stop the order: roll back what is done and end it.
    Cancel,
}

/// An intent as the document records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub kind: IntentKind,
    pub requested_at: DateTime<Utc>,
    /// Who asked (a node id, a user); free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
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
            seen_by: None,
            seen_at: None,
        }
    }
}

/// Whether `stored` is `mine` with an intent recorded (or replaced) and nothing else changed.
pub fn only_intent_added(mine: &super::order::Order, stored: &super::order::Order) -> bool {
    if stored.intent.is_none() || stored.intent == mine.intent {
        return false;
    }
    let without = |order: &super::order::Order| {
        let mut value = serde_json::to_value(order).expect("an order always serializes");
        if let Some(fields) = value.as_object_mut() {
            fields.remove("intent");
        }
        value
    };
    without(mine) == without(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::{Interface, Order, Owner};
    use serde_json::value::RawValue;

    fn owned() -> Order {
        let now = Utc::now();
        let payload = RawValue::from_string("{}".into()).expect("json");
        let mut order = Order::queued(uuid::Uuid::now_v7(), payload, Interface::Http, now);
        order
            .claim(Owner {
                node: "a".into(),
                delivery: 1,
                stream_seq: 7,
                claimed_at: now,
            })
            .expect("claim");
        order
    }

    #[test]
    fn an_intent_is_told_from_a_takeover() {
        let mine = owned();
        let mut asked = mine.clone();
        asked.intent = Some(Box::new(Intent::new(IntentKind::Cancel, None, Utc::now())));
        assert!(only_intent_added(&mine, &asked));
        // The same intent seen twice is no news.
        assert!(!only_intent_added(&asked, &asked));
        // Another owner, with or without an intent, is a takeover.
        let mut taken = asked.clone();
        taken.owner.as_mut().expect("owner").delivery = 2;
        assert!(!only_intent_added(&mine, &taken));
        let mut moved = mine.clone();
        moved.attempt += 1;
        assert!(!only_intent_added(&mine, &moved));
    }
}
