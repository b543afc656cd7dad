//! The JSON bodies of the HTTP API other than the order document and the submission's reply: the error
//! body every interface shares, health and readiness, the node diagnostics and the drain's answer.
//! Each is a type, so that what a handler sends and what `GET /openapi.json` describes (their schemas
//! are derived from these types) cannot differ.

use crate::domain::order::State;
use crate::ops::cluster::NodeStatus;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// The body of every error, over HTTP and from the `orders` NATS service. Fields here, as in every
/// body of this module, are in alphabetical order, the order they are sent in.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a program: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `conflict`, `invalid_state`, `payload_too_large`, `unavailable` or
    /// `uncertain`.
    #[schema(example = "not_found")]
    pub code: String,
    /// What went wrong, for a person.
    pub error: String,
    /// The order concerned, when it may exist (`uncertain`) or its state refused the request
    /// (`invalid_state`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    /// The order's state, when it refused the request (`invalid_state`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
}

impl ErrorBody {
    pub fn new(code: &str, error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            code: code.to_owned(),
            order_id: None,
            state: None,
        }
    }
}

/// An order id in a path or a header: a UUID in lower-case hyphenated form.
#[derive(ToSchema)]
#[schema(
    value_type = String,
    pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    example = "0192f5c4-6b1e-7c3a-9d2e-8f1a2b3c4d5e"
)]
pub struct OrderIdText(#[allow(dead_code)] String);

/// A `state` of `GET /orders`: state names (as the document writes them) separated by commas, or
/// nothing (no filter from this one).
#[derive(ToSchema)]
#[schema(
    value_type = String,
    pattern = r"^[\s,]*((Queued|Running|RollingBack|Cancelling|Completed|Failed|Cancelled)\s*(,[\s,]*|$))*$",
    example = "Completed,Failed"
)]
pub struct StateNames(#[allow(dead_code)] String);

/// `GET /healthz`: the process answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `GET /readyz`: whether the node can take and work orders.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub draining: bool,
    pub nats_connected: bool,
    /// Why the shared consumer cannot be worked from, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `ready` or `not ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
}

/// `GET /diagnostic/heartbeat`: this node, now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Heartbeat {
    pub generated_at: DateTime<Utc>,
    pub http_addr: String,
    pub name: String,
    pub nats_connected: bool,
    pub node_id: String,
    pub orders_completed: u64,
    pub orders_failed: u64,
    pub started_at: DateTime<Utc>,
    /// `running` or `draining`.
    pub status: String,
    pub uptime_seconds: f64,
    pub version: String,
    pub workers_busy: usize,
    pub workers_total: usize,
}

impl Heartbeat {
    pub fn new(status: NodeStatus, nats_connected: bool) -> Heartbeat {
        Heartbeat {
            uptime_seconds: uptime(&status),
            node_id: status.node_id,
            name: status.name,
            version: status.version,
            status: status.status,
            generated_at: status.last_seen,
            started_at: status.started_at,
            http_addr: status.http_addr,
            nats_connected,
            workers_busy: status.workers_busy,
            workers_total: status.workers_total,
            orders_completed: status.orders_completed,
            orders_failed: status.orders_failed,
        }
    }
}

/// `GET /diagnostic/stats`: this node's worker counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct Stats {
    pub generated_at: DateTime<Utc>,
    /// How long ago this node last wrote its heartbeat; `null` before the first.
    pub heartbeat_age_seconds: Option<f64>,
    pub heartbeat_interval_seconds: f64,
    pub nats_connected: bool,
    pub node_id: String,
    pub orders_completed: u64,
    pub orders_failed: u64,
    pub orders_in_flight: usize,
    pub uptime_seconds: f64,
    pub workers_busy: usize,
    pub workers_total: usize,
}

impl Stats {
    pub fn new(
        status: NodeStatus,
        heartbeat_age_seconds: Option<f64>,
        heartbeat_interval_seconds: f64,
        nats_connected: bool,
    ) -> Stats {
        Stats {
            uptime_seconds: uptime(&status),
            node_id: status.node_id,
            generated_at: status.last_seen,
            orders_completed: status.orders_completed,
            orders_failed: status.orders_failed,
            orders_in_flight: status.workers_busy,
            workers_busy: status.workers_busy,
            workers_total: status.workers_total,
            heartbeat_age_seconds,
            heartbeat_interval_seconds,
            nats_connected,
        }
    }
}

/// `GET /diagnostic/cluster`: every live node, from their heartbeats.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterView {
    pub generated_at: DateTime<Utc>,
    pub node_count: usize,
    pub nodes: Vec<NodeStatus>,
    pub workers_busy: usize,
    pub workers_total: usize,
}

impl ClusterView {
    pub fn new(nodes: Vec<NodeStatus>, now: DateTime<Utc>) -> ClusterView {
        ClusterView {
            generated_at: now,
            node_count: nodes.len(),
            workers_busy: nodes.iter().map(|n| n.workers_busy).sum(),
            workers_total: nodes.iter().map(|n| n.workers_total).sum(),
            nodes,
        }
    }
}

/// `POST /admin/drain`: the node is draining.
#[derive(Debug, Serialize, ToSchema)]
pub struct Draining {
    #[schema(example = "draining")]
    pub status: &'static str,
}

fn uptime(status: &NodeStatus) -> f64 {
    (status.last_seen - status.started_at).num_milliseconds() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::PartialSchema;

    #[test]
    fn the_pattern_of_state_names_names_every_state() {
        let schema = serde_json::json!(StateNames::schema());
        let pattern = schema["pattern"].as_str().unwrap();
        let names = pattern
            .split("((")
            .nth(1)
            .and_then(|rest| rest.split(')').next());
        let names: Vec<&str> = names.unwrap().split('|').collect();
        let states: Vec<&str> = State::ALL.iter().map(|state| state.as_str()).collect();
        assert_eq!(names, states, "{pattern}");
    }
}
