//! Prometheus metrics: the names the node exports, and the recorder behind `GET /metrics`.
//!
//! Names start with `orderly_`, use base units, counters end in `_total`; labels are low-cardinality
//! (step, outcome, interface, route) and never an order id.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;

pub const ORDERS_SUBMITTED: &str = "orderly_orders_submitted_total";
pub const ORDERS_FINISHED: &str = "orderly_orders_finished_total";
pub const ORDER_REQUESTS: &str = "orderly_order_requests_total";
pub const ORDERS_GIVEN_UP: &str = "orderly_orders_given_up_total";
pub const ORDERS_IN_FLIGHT: &str = "orderly_orders_in_flight";
pub const ORDER_DURATION: &str = "orderly_order_duration_seconds";
pub const QUEUE_WAIT: &str = "orderly_queue_wait_seconds";
pub const STEP_DURATION: &str = "orderly_step_duration_seconds";
pub const STEP_FAILURES: &str = "orderly_step_failures_total";
pub const ROLLBACKS: &str = "orderly_rollbacks_total";
pub const STEP_UNAVAILABLE: &str = "orderly_step_unavailable_total";
pub const STEP_TIMEOUTS: &str = "orderly_step_timeouts_total";
pub const WORKERS_BUSY: &str = "orderly_workers_busy";
pub const WORKERS_TOTAL: &str = "orderly_workers_capacity";
pub const MESSAGES_ACKED: &str = "orderly_messages_acked_total";
pub const MESSAGES_NAKED: &str = "orderly_messages_nakked_total";
pub const MESSAGES_TERMINATED: &str = "orderly_messages_terminated_total";
pub const REDELIVERIES: &str = "orderly_redeliveries_total";
pub const LEASES_LOST: &str = "orderly_leases_lost_total";
pub const SELF_FENCES: &str = "orderly_self_fences_total";
pub const HEARTBEATS_UNCONFIRMED: &str = "orderly_heartbeats_unconfirmed_total";
pub const KV_CONFLICTS: &str = "orderly_kv_cas_conflicts_total";
pub const NATS_CONNECTED: &str = "orderly_nats_connected";
pub const NATS_RECONNECTS: &str = "orderly_nats_reconnects_total";
pub const NATS_AUTH_REFUSED: &str = "orderly_nats_auth_refused_total";
pub const HTTP_REQUESTS: &str = "orderly_http_requests_total";
pub const HTTP_DURATION: &str = "orderly_http_request_duration_seconds";
pub const HTTP_CONNECTIONS_REFUSED: &str = "orderly_http_connections_refused_total";
pub const HTTP_CONNECTIONS_EVICTED: &str = "orderly_http_connections_evicted_total";
pub const HTTP_WATCHES_REFUSED: &str = "orderly_http_watches_refused_total";
pub const HTTP_HEADER_TIMEOUTS: &str = "orderly_http_header_timeouts_total";
pub const HTTP_REQUEST_TIMEOUTS: &str = "orderly_http_request_timeouts_total";
pub const INFO: &str = "orderly_node_info";
pub const QUEUE_PENDING: &str = "orderly_queue_pending_messages";
pub const QUEUE_ACK_PENDING: &str = "orderly_queue_ack_pending_messages";
pub const QUEUE_MAX_ACK_PENDING: &str = "orderly_queue_max_ack_pending";
pub const QUEUE_REDELIVERED: &str = "orderly_queue_redelivered_messages";
pub const QUEUE_WAITING_PULLS: &str = "orderly_queue_waiting_pulls";
pub const STREAM_MESSAGES: &str = "orderly_stream_messages";
pub const QUEUE_POLL_ERRORS: &str = "orderly_queue_poll_errors_total";
pub const UP_SINCE: &str = "orderly_node_start_time_seconds";
pub const STORE_RETRIES: &str = "orderly_store_retries_total";
pub const MESSAGES_REQUEUED: &str = "orderly_messages_requeued_total";
pub const LEFTOVERS_REMOVED: &str = "orderly_leftover_messages_removed_total";
pub const RETRY_IDS_TAKEN: &str = "orderly_retry_ids_taken_total";
pub const WORKER_PANICS: &str = "orderly_worker_panics_total";

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
    describe_orders();
    describe_messages();
    describe_node();
    zero_counters();
    metrics::gauge!(UP_SINCE).set(chrono::Utc::now().timestamp() as f64);
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

/// Registers every counter at zero, with each of its known label sets, so that rates and alerts see a
/// series from the first scrape instead of none until the first event.
fn zero_counters() {
    use crate::domain::order::Step;
    for interface in ["http", "nats", "stream"] {
        metrics::counter!(ORDERS_SUBMITTED, "interface" => interface).absolute(0);
    }
    for outcome in ["completed", "failed", "cancelled"] {
        metrics::counter!(ORDERS_FINISHED, "outcome" => outcome).absolute(0);
    }
    for step in Step::ALL {
        metrics::counter!(STEP_FAILURES, "step" => step.as_str()).absolute(0);
        metrics::counter!(ROLLBACKS, "step" => step.as_str()).absolute(0);
        metrics::counter!(STEP_UNAVAILABLE, "step" => step.as_str()).absolute(0);
        metrics::counter!(STEP_TIMEOUTS, "step" => step.as_str()).absolute(0);
    }
    metrics::counter!(ORDERS_GIVEN_UP, "path" => "last_delivery").absolute(0);
    for (request, answers) in [
        ("cancel", &["done", "accepted", "refused", "not_found"][..]),
        ("retry", &["accepted", "refused", "not_found"][..]),
    ] {
        for answer in answers {
            metrics::counter!(ORDER_REQUESTS, "request" => request, "answer" => *answer)
                .absolute(0);
        }
    }
    for reason in ["malformed_headers", "status_headers"] {
        metrics::counter!(MESSAGES_REQUEUED, "reason" => reason).absolute(0);
    }
    for name in [
        REDELIVERIES,
        LEASES_LOST,
        SELF_FENCES,
        HEARTBEATS_UNCONFIRMED,
        KV_CONFLICTS,
        QUEUE_POLL_ERRORS,
        STORE_RETRIES,
        LEFTOVERS_REMOVED,
        RETRY_IDS_TAKEN,
        WORKER_PANICS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!(ORDERS_IN_FLIGHT).set(0.0);
}

/// The metrics of orders and their steps.
fn describe_orders() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ORDERS_SUBMITTED,
        "Orders accepted, by interface (http, nats)."
    );
    describe_counter!(
        ORDERS_FINISHED,
        "Orders that reached a terminal state on this node, by outcome."
    );
    describe_counter!(
        ORDERS_GIVEN_UP,
        "Orders ended Failed because they used up the deliveries ORDERLY_MAX_DELIVER allows (path: last_delivery)."
    );
    describe_counter!(
        ORDER_REQUESTS,
        "Cancel and retry requests this node answered, by request and answer (done, accepted, refused, not_found)."
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
    describe_counter!(
        STEP_UNAVAILABLE,
        "Calls of a step or rollback its code could not take now (no step handler running), by step; the order waits and is called again."
    );
    describe_counter!(
        STEP_TIMEOUTS,
        "Calls of a step or rollback that did not answer within the step timeout (ORDERLY_STEP_TIMEOUT), by step."
    );
}

/// The metrics of work messages, leases and the order store.
fn describe_messages() {
    use metrics::{describe_counter, describe_gauge};
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
        HEARTBEATS_UNCONFIRMED,
        "In-progress acks the consumer did not answer (no consumer leader, an error): each is retried until the lease's deadline."
    );
    describe_counter!(
        KV_CONFLICTS,
        "Compare-and-set writes refused because the order had changed."
    );
}

/// The metrics of the node: its connections, HTTP, the queue it reads, and itself.
fn describe_node() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        NATS_CONNECTED,
        "1 while connected to NATS, by connection (work: leases and writes; fetch: work messages; public: the NATS service; steps: calls of step handlers, with ORDERLY_STEPS=nats)."
    );
    describe_counter!(
        NATS_RECONNECTS,
        "Reconnections to NATS after a disconnect, by connection (work, fetch, public, and steps when the steps run over NATS)."
    );
    describe_counter!(
        NATS_AUTH_REFUSED,
        "Times the NATS server refused the node's credentials after it had let the node in (a rotated password, a removed user), by connection; the node keeps trying."
    );
    describe_counter!(
        STORE_RETRIES,
        "Tries of an order kept while the order store was unavailable."
    );
    describe_counter!(
        LEFTOVERS_REMOVED,
        "Work messages removed by the sweep because their order had ended long before (the removal that should have followed its ack was lost)."
    );
    describe_counter!(
        RETRY_IDS_TAKEN,
        "Retries whose work message id was found taken by another message, and asked for again with a new key."
    );
    describe_counter!(
        WORKER_PANICS,
        "Deliveries whose worker panicked: the lease was ended and the message handed back (a bug: see the log)."
    );
    describe_counter!(
        MESSAGES_REQUEUED,
        "Work messages with a header block no node can receive, published again without it, by reason."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status.");
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "HTTP connections answered 503 because every allowed connection was busy with a request."
    );
    describe_counter!(
        HTTP_CONNECTIONS_EVICTED,
        "HTTP connections without a request in progress closed to make room for a new one."
    );
    describe_counter!(
        HTTP_WATCHES_REFUSED,
        "Watches of an order answered 503 because the node carried as many as it allows."
    );
    describe_counter!(
        HTTP_HEADER_TIMEOUTS,
        "HTTP connections closed with 408 because a request head was not complete in time."
    );
    describe_counter!(
        HTTP_REQUEST_TIMEOUTS,
        "HTTP requests answered 503 because they were not done within the request timeout."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by route."
    );
    describe_gauge!(INFO, "Always 1; labels carry the node's version.");
    describe_gauge!(
        QUEUE_PENDING,
        "Orders in the work queue not yet delivered to any node (consumer num_pending)."
    );
    describe_gauge!(
        QUEUE_ACK_PENDING,
        "Orders delivered to a node and not yet acknowledged (consumer num_ack_pending)."
    );
    describe_gauge!(
        QUEUE_MAX_ACK_PENDING,
        "The consumer's cap on unacknowledged orders (max_ack_pending)."
    );
    describe_gauge!(
        QUEUE_REDELIVERED,
        "Orders currently out on a second or later delivery (consumer num_redelivered)."
    );
    describe_gauge!(
        QUEUE_WAITING_PULLS,
        "Pull requests waiting at the server: idle capacity (consumer num_waiting)."
    );
    describe_gauge!(STREAM_MESSAGES, "Messages stored in the ORDERS stream.");
    describe_counter!(
        QUEUE_POLL_ERRORS,
        "Failed reads of the stream and consumer state."
    );
    describe_gauge!(
        UP_SINCE,
        Unit::Seconds,
        "When the node started, in seconds since the Unix epoch."
    );
}

/// Reads the work queue's state from JetStream every `every` and exports it as gauges, so that the
/// queue is visible even while every worker is busy.
pub struct QueueGauges {
    stream: async_nats::jetstream::stream::Stream,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    every: Duration,
}

impl QueueGauges {
    pub fn new(
        stream: async_nats::jetstream::stream::Stream,
        consumer: async_nats::jetstream::consumer::PullConsumer,
        every: Duration,
    ) -> QueueGauges {
        QueueGauges {
            stream,
            consumer,
            every,
        }
    }
}

impl crate::task::Task for QueueGauges {
    const NAME: &'static str = "queue metrics";

    async fn run(mut self, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match self.consumer.info().await {
                Ok(info) => {
                    metrics::gauge!(QUEUE_PENDING).set(info.num_pending as f64);
                    metrics::gauge!(QUEUE_ACK_PENDING).set(info.num_ack_pending as f64);
                    metrics::gauge!(QUEUE_REDELIVERED).set(info.num_redelivered as f64);
                    metrics::gauge!(QUEUE_WAITING_PULLS).set(info.num_waiting as f64);
                    metrics::gauge!(QUEUE_MAX_ACK_PENDING).set(info.config.max_ack_pending as f64);
                }
                Err(e) => {
                    metrics::counter!(QUEUE_POLL_ERRORS).increment(1);
                    tracing::debug!(error = %e, "cannot read the consumer's state");
                }
            }
            match self.stream.info().await {
                Ok(info) => metrics::gauge!(STREAM_MESSAGES).set(info.state.messages as f64),
                Err(e) => {
                    metrics::counter!(QUEUE_POLL_ERRORS).increment(1);
                    tracing::debug!(error = %e, "cannot read the stream's state");
                }
            }
        }
    }
}
