//! Order events: every transition written to an order's document is also published, as JSON, on
//! `orders.events.<order id>`, so `nats sub 'orders.events.>'` follows every order. Events are a core
//! NATS publish (at most once): the document in the `orders` bucket stays the record.

use crate::order::{CurrentStep, Order, State};
use chrono::{DateTime, Utc};
use serde::Serialize;

pub const SUBJECT_PREFIX: &str = "orders.events";

#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub order_id: uuid::Uuid,
    pub from: State,
    pub to: State,
    pub from_step: CurrentStep,
    pub step: CurrentStep,
    pub node: &'a str,
    pub attempt: u32,
    pub time: DateTime<Utc>,
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
        let event = Event {
            order_id: after.order_id,
            from: before.state,
            to: after.state,
            from_step: before.current_step,
            step: after.current_step,
            node: &self.node_id,
            attempt: after.attempt,
            time: after.updated_at,
        };
        self.publish(&event).await;
    }

    /// Publishes the creation of `order`.
    pub async fn created(&self, order: &Order) {
        let event = Event {
            order_id: order.order_id,
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
