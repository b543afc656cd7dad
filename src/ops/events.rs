//! Order events: every transition written to an order's document is also published, as JSON, on
//! `orders.events.<order id>`, so `nats sub 'orders.events.>'` follows every order. Events are a core
//! NATS publish (at most once): the document in the `orders` bucket stays the record.

use crate::domain::order::{CurrentStep, Order, State, StepStatus};
use chrono::{DateTime, Utc};
use serde::Serialize;

pub const SUBJECT_PREFIX: &str = "orders.events";

/// A change of an order, as published on `orders.events.<id>`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OrderEvent)]
pub struct Event<'a> {
    pub order_id: uuid::Uuid,
    /// What happened: `created`, `claimed`, `released`, `step_started`, `step_completed`,
    /// `step_failed`, `rollback_started`, `rollback_completed`, `cancel_requested`, `intent_seen`,
    /// `completed`, `failed`, `cancelled` or `retried`.
    pub change: &'static str,
    pub from: State,
    pub to: State,
    pub from_step: CurrentStep,
    pub step: CurrentStep,
    pub node: &'a str,
    pub attempt: u32,
    pub time: DateTime<Utc>,
}

impl<'a> Event<'a> {
    /// The event of the change from `before` to `after`, as `node` reports it.
    pub fn transition(before: &Order, after: &Order, node: &'a str) -> Event<'a> {
        Event {
            order_id: after.order_id,
            change: change(before, after),
            from: before.state,
            to: after.state,
            from_step: before.current_step,
            step: after.current_step,
            node,
            attempt: after.attempt,
            time: after.updated_at,
        }
    }
}

#[derive(Clone)]
pub struct Events {
    client: async_nats::Client,
    node_id: String,
}

impl Events {
    pub fn new(client: async_nats::Client, node_id: String) -> Events {
        Events { client, node_id }
    }

    /// Publishes the change from `before` to `after`.
    pub async fn transition(&self, before: &Order, after: &Order) {
        self.publish(&Event::transition(before, after, &self.node_id))
            .await;
    }

    /// Publishes the creation of `order`.
    pub async fn created(&self, order: &Order) {
        let event = Event {
            order_id: order.order_id,
            change: if order.state == State::Failed {
                "failed"
            } else {
                "created"
            },
            from: order.state,
            to: order.state,
            from_step: order.current_step,
            step: order.current_step,
            node: &self.node_id,
            attempt: order.attempt,
            time: order.updated_at,
        };
        self.publish(&event).await;
    }

    async fn publish(&self, event: &Event<'_>) {
        let subject = format!("{SUBJECT_PREFIX}.{}", event.order_id);
        let body = serde_json::to_vec(event).expect("an event always serializes");
        if let Err(e) = self.client.publish(subject, body.into()).await {
            tracing::debug!(error = %e, "cannot publish order event");
        }
    }
}

/// Names the change from `before` to `after`, two successive versions of one order's document.
pub fn change(before: &Order, after: &Order) -> &'static str {
    if after.state != before.state {
        match after.state {
            State::Completed => return "completed",
            State::Failed => return "failed",
            State::Cancelled => return "cancelled",
            State::Cancelling => return "cancel_requested",
            State::Queued if before.state.is_terminal() => return "retried",
            _ => {}
        }
    }
    let changed = after
        .steps
        .iter()
        .enumerate()
        .find(|(i, record)| before.steps.get(*i) != Some(*record));
    match changed.map(|(_, record)| record.status) {
        Some(StepStatus::Running) => "step_started",
        Some(StepStatus::Completed) => "step_completed",
        Some(StepStatus::Failed) => "step_failed",
        Some(StepStatus::RollingBack) => "rollback_started",
        Some(StepStatus::RolledBack) => "rollback_completed",
        None if before.intent != after.intent => "intent_seen",
        None if after.owner.is_some() => "claimed",
        None => "released",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::{Interface, Owner, Step};
    use chrono::TimeZone;

    #[test]
    fn changes_are_named() {
        let t = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        let payload = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let queued = Order::queued(uuid::Uuid::now_v7(), payload, Interface::Http, t(0));
        let mut claimed = queued.clone();
        claimed
            .claim(Owner {
                node: "n".into(),
                delivery: 1,
                stream_seq: 1,
                claimed_at: t(1),
            })
            .unwrap();
        assert_eq!(change(&queued, &claimed), "claimed");
        let mut started = claimed.clone();
        started.start_step(Step::Scheduling, "n", t(2)).unwrap();
        assert_eq!(change(&claimed, &started), "step_started");
        let mut done = started.clone();
        done.complete_step(None, t(3)).unwrap();
        assert_eq!(change(&started, &done), "step_completed");
        let mut next = done.clone();
        next.start_step(Step::PreProcessing, "n", t(4)).unwrap();
        let mut failed = next.clone();
        failed.fail_step("boom".into(), t(5)).unwrap();
        assert_eq!(change(&next, &failed), "step_failed");
        let mut rolling = failed.clone();
        rolling
            .start_rollback(Step::PreProcessing, "n", t(6))
            .unwrap();
        assert_eq!(change(&failed, &rolling), "rollback_started");
        let mut rolled = rolling.clone();
        rolled.complete_rollback(Step::PreProcessing, t(7)).unwrap();
        assert_eq!(change(&rolling, &rolled), "rollback_completed");
        let mut released = rolled.clone();
        released.release(t(8));
        assert_eq!(change(&rolled, &released), "released");
        let mut ended = rolled.clone();
        ended.start_rollback(Step::Scheduling, "n", t(9)).unwrap();
        ended.complete_rollback(Step::Scheduling, t(10)).unwrap();
        let before = ended.clone();
        ended.finish(t(11)).unwrap();
        assert_eq!(change(&before, &ended), "failed");
        let mut retried = ended.clone();
        retried.retry(t(12)).unwrap();
        assert_eq!(change(&ended, &retried), "retried");
        let mut cancelling = claimed.clone();
        let intent = crate::domain::intent::Intent::new(
            crate::domain::intent::IntentKind::Cancel,
            None,
            t(13),
        );
        cancelling.request_cancel(intent.clone()).unwrap();
        assert_eq!(change(&claimed, &cancelling), "cancel_requested");
        let mut cancelled = queued.clone();
        cancelled.request_cancel(intent).unwrap();
        assert_eq!(change(&queued, &cancelled), "cancelled");
    }
}
