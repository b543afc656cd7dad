//! Order events: every transition written to an order's document is also published, as JSON, on
//! `orders.events.<order id>`, so `nats sub 'orders.events.>'` follows every order. Events are a core
//! NATS publish (at most once): the document in the `orders` bucket stays the record.

use crate::domain::order::{CurrentStep, Order, State, StepRecord, StepStatus};
use chrono::{DateTime, Utc};
use serde::Serialize;

pub const SUBJECT_PREFIX: &str = "orders.events";

/// A write of an order's document, as published on `orders.events.<id>`. One write can make more
/// than one change (a step completes and the next one starts): `changes` lists them in the order
/// they happened, and `change` is the last of them, the one that says where the order is now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = OrderEvent)]
pub struct Event<'a> {
    pub order_id: uuid::Uuid,
    /// The last change the write made: `created`, `claimed`, `released`, `step_started`,
    /// `step_completed`, `step_failed`, `rollback_started`, `rollback_completed`,
    /// `cancel_requested`, `intent_seen`, `completed`, `failed`, `cancelled` or `retried`.
    pub change: &'static str,
    /// Every change the write made, in order; `change` is the last.
    pub changes: Vec<&'static str>,
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
        let changes = changes(before, after);
        Event {
            order_id: after.order_id,
            change: changes.last().copied().unwrap_or(RELEASED),
            changes,
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
        let change = if order.state == State::Failed {
            "failed"
        } else {
            "created"
        };
        let event = Event {
            order_id: order.order_id,
            change,
            changes: vec![change],
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

const RELEASED: &str = "released";

/// Names the changes from `before` to `after`, two successive versions of one order's document, in
/// the order they were made: the claim, an intent seen, what ended (a step completed or failed, a
/// rollback completed), what started (a step, a rollback), then a change of state. A write that
/// only gives the order back is `released`.
pub fn changes(before: &Order, after: &Order) -> Vec<&'static str> {
    let mut changes = Vec::with_capacity(2);
    if after.owner.is_some() && after.owner != before.owner {
        changes.push("claimed");
    }
    let seen = |order: &Order| order.intent.as_ref().and_then(|i| i.seen_at);
    if after.intent.is_some() && seen(after) != seen(before) {
        changes.push("intent_seen");
    }
    // The step records the write changed (a step run again is a new run: `runs` went up), with the
    // status each had before.
    let records: Vec<(Option<StepStatus>, &StepRecord)> = after
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, record)| {
            let was = before.steps.get(i).filter(|was| was.runs == record.runs);
            (was != Some(record)).then_some((was.map(|w| w.status), record))
        })
        .collect();
    // What ended, then what started.
    for &(was, record) in &records {
        match record.status {
            StepStatus::Completed => changes.push("step_completed"),
            StepStatus::Failed => changes.push("step_failed"),
            StepStatus::RolledBack => changes.push("rollback_completed"),
            // Failed and rolling back in one write (a step left running by a cancel has no
            // complete time: it was interrupted, not failed).
            StepStatus::RollingBack
                if was == Some(StepStatus::Running) && record.step_complete_time.is_some() =>
            {
                changes.push("step_failed")
            }
            _ => {}
        }
    }
    for &(_, record) in &records {
        match record.status {
            StepStatus::Running => changes.push("step_started"),
            StepStatus::RollingBack => changes.push("rollback_started"),
            _ => {}
        }
    }
    if after.state != before.state {
        match after.state {
            State::Completed => changes.push("completed"),
            State::Failed => changes.push("failed"),
            State::Cancelled => changes.push("cancelled"),
            State::Cancelling => changes.push("cancel_requested"),
            State::Queued if before.state.is_terminal() => changes.push("retried"),
            _ => {}
        }
    }
    if changes.is_empty() {
        changes.push(RELEASED);
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::{Interface, Owner, Step};
    use chrono::TimeZone;

    fn change(before: &Order, after: &Order) -> &'static str {
        Event::transition(before, after, "n").change
    }

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

    #[test]
    fn a_write_that_begins_the_next_transition_names_both_changes() {
        let t = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        let payload = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let queued = Order::queued(uuid::Uuid::now_v7(), payload, Interface::Http, t(0));
        let owner = Owner {
            node: "n".into(),
            delivery: 1,
            stream_seq: 1,
            claimed_at: t(1),
        };
        let names = |before: &Order, after: &Order| Event::transition(before, after, "n").changes;
        let mut claimed = queued.clone();
        claimed.claim(owner).unwrap();
        claimed.start_step(Step::Scheduling, "n", t(1)).unwrap();
        assert_eq!(names(&queued, &claimed), ["claimed", "step_started"]);
        let mut next = claimed.clone();
        next.complete_step(None, t(2)).unwrap();
        next.start_step(Step::PreProcessing, "n", t(2)).unwrap();
        assert_eq!(names(&claimed, &next), ["step_completed", "step_started"]);
        let mut completed = next.clone();
        for (at, step) in [(3, Step::Processing), (4, Step::PostProcessing)] {
            completed.complete_step(None, t(at)).unwrap();
            completed.start_step(step, "n", t(at)).unwrap();
        }
        let before = completed.clone();
        completed.complete_step(None, t(5)).unwrap();
        completed.finish(t(5)).unwrap();
        assert_eq!(names(&before, &completed), ["step_completed", "completed"]);
        assert_eq!(change(&before, &completed), "completed");

        let mut failing = next.clone();
        failing.fail_step("boom".into(), t(3)).unwrap();
        failing
            .start_rollback(Step::PreProcessing, "n", t(3))
            .unwrap();
        assert_eq!(names(&next, &failing), ["step_failed", "rollback_started"]);
        let mut rolling = failing.clone();
        rolling
            .complete_rollback(Step::PreProcessing, t(4))
            .unwrap();
        rolling.start_rollback(Step::Scheduling, "n", t(4)).unwrap();
        assert_eq!(
            names(&failing, &rolling),
            ["rollback_completed", "rollback_started"]
        );
        let mut failed = rolling.clone();
        failed.complete_rollback(Step::Scheduling, t(5)).unwrap();
        failed.finish(t(5)).unwrap();
        assert_eq!(names(&rolling, &failed), ["rollback_completed", "failed"]);

        // A step that its previous owner left running starts again: a new run, not a change of it.
        let mut resumed = claimed.clone();
        resumed.release(t(6));
        let before = resumed.clone();
        resumed
            .claim(Owner {
                node: "m".into(),
                delivery: 2,
                stream_seq: 1,
                claimed_at: t(7),
            })
            .unwrap();
        resumed.start_step(Step::Scheduling, "m", t(7)).unwrap();
        assert_eq!(resumed.steps[0].runs, 2);
        assert_eq!(names(&before, &resumed), ["claimed", "step_started"]);
    }
}
