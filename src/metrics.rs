//! Prometheus metrics: the names the node exports, and the recorder behind `GET /metrics`.
//!
//! Names start with `orderly_`, use base units, counters end in `_total`; labels are low-cardinality
//! (step, outcome, interface, route) and never an order id.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;

pub const ORDERS_SUBMITTED: &str = "orderly_orders_submitted_total";
pub const ORDERS_FINISHED: &str = "orderly_orders_finished_total";
pub const ORDERS_IN_FLIGHT: &str = "orderly_orders_in_flight";
pub const ORDER_DURATION: &str = "orderly_order_duration_seconds";
pub const QUEUE_WAIT: &str = "orderly_queue_wait_seconds";
pub const STEP_DURATION: &str = "orderly_step_duration_seconds";
pub const STEP_FAILURES: &str = "orderly_step_failures_total";
pub const ROLLBACKS: &str = "orderly_rollbacks_total";
pub const WORKERS_BUSY: &str = "orderly_workers_busy";
pub const WORKERS_TOTAL: &str = "orderly_workers_total";
pub const MESSAGES_ACKED: &str = "orderly_messages_acked_total";
pub const MESSAGES_NAKED: &str = "orderly_messages_nakked_total";
pub const MESSAGES_TERMINATED: &str = "orderly_messages_terminated_total";
pub const REDELIVERIES: &str = "orderly_redeliveries_total";
pub const LEASES_LOST: &str = "orderly_leases_lost_total";
pub const SELF_FENCES: &str = "orderly_self_fences_total";
pub const KV_CONFLICTS: &str = "orderly_kv_cas_conflicts_total";
pub const NATS_CONNECTED: &str = "orderly_nats_connected";
pub const NATS_RECONNECTS: &str = "orderly_nats_reconnects_total";
pub const HTTP_REQUESTS: &str = "orderly_http_requests_total";
pub const HTTP_DURATION: &str = "orderly_http_request_duration_seconds";
pub const INFO: &str = "orderly_node_info";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const ORDER_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0, 120.0, 300.0,
    600.0,
];
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
];

/// Installs the global recorder and returns the handle that renders the scrape. In a process where a
/// recorder is installed already, the handle still renders but records nothing new.
pub fn install(node_id: &str) -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ORDER_DURATION.into()), ORDER_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), ORDER_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STEP_DURATION.into()), STEP_BUCKETS))
        .expect("bucket lists are not empty")
        .add_global_label("node", node_id);
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was installed already; this node's metrics go there");
    }
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    metrics::gauge!(INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ORDERS_SUBMITTED,
        "Orders accepted, by interface (http, nats)."
    );
    describe_counter!(
        ORDERS_FINISHED,
        "Orders that reached a terminal state on this node, by outcome."
    );
    describe_gauge!(ORDERS_IN_FLIGHT, "Orders this node is working on.");
    describe_histogram!(
        ORDER_DURATION,
        Unit::Seconds,
        "From submission to terminal state."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "From submission to the first pickup by a worker."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "How long each step took, by step."
    );
    describe_counter!(STEP_FAILURES, "Steps that failed, by step.");
    describe_counter!(ROLLBACKS, "Steps rolled back, by step.");
    describe_gauge!(WORKERS_BUSY, "Workers holding an order.");
    describe_gauge!(WORKERS_TOTAL, "Workers on this node.");
    describe_counter!(
        MESSAGES_ACKED,
        "Work messages acknowledged after their order's terminal state was written."
    );
    describe_counter!(
        MESSAGES_NAKED,
        "Work messages handed back for redelivery, by reason."
    );
    describe_counter!(
        MESSAGES_TERMINATED,
        "Work messages that can never be processed, terminated, by reason."
    );
    describe_counter!(
        REDELIVERIES,
        "Work messages received on a second or later delivery."
    );
    describe_counter!(
        LEASES_LOST,
        "Orders this node stopped working on because another writer took them."
    );
    describe_counter!(
        SELF_FENCES,
        "Orders this node stopped working on because it could not confirm its lease in time."
    );
    describe_counter!(
        KV_CONFLICTS,
        "Compare-and-set writes refused because the order had changed."
    );
    describe_gauge!(NATS_CONNECTED, "1 while connected to NATS.");
    describe_counter!(NATS_RECONNECTS, "Reconnections to NATS.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status.");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by route."
    );
    describe_gauge!(INFO, "Always 1; labels carry the node's version.");
}
