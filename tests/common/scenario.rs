//! What the fault scenarios share: audited nodes, orders published straight into the work stream, and
//! the final check that every order ended once with no overlapping leases (see [`super::audit`]).

use super::audit::{self, Outside, Report};
use super::*;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use uuid::Uuid;

/// Where the nodes of one scenario write their audits.
pub struct Audits {
    dir: TempDir,
}

impl Audits {
    pub fn new() -> Audits {
        Audits {
            dir: crate::common::temp_dir("audits"),
        }
    }

    pub fn path(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.audit.jsonl"))
    }

    /// A node of this scenario: 200 ms steps, 5 % failures, 2 s ack wait, audited.
    pub fn node(&self, nats_url: &str, id: &str) -> NodeBuilder {
        Node::builder(nats_url)
            .id(id)
            .env("ORDERLY_ACK_WAIT", "2s")
            .env("ORDERLY_STEP_DURATION", "200ms")
            .env("ORDERLY_FAILURE_RATE", "0.05")
            .env("ORDERLY_SHUTDOWN_GRACE", "3s")
            .env("ORDERLY_AUDIT_LOG", self.path(id).display())
    }

    pub fn lines(&self) -> Vec<Value> {
        let paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("audit dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        audit::read(&refs)
    }

    /// Orders `node` holds now: claimed, and the interval not ended.
    pub fn held_by(&self, node: &str) -> Vec<Uuid> {
        let lines = audit::read(&[self.path(node).as_path()]);
        let key = |l: &Value| (l["order_id"].to_string(), l["delivery"].as_u64());
        let ended: std::collections::HashSet<_> = lines
            .iter()
            .filter(|l| l["event"] == "lease_end")
            .map(key)
            .collect();
        lines
            .iter()
            .filter(|l| l["event"] == "claim" && !ended.contains(&key(l)))
            .filter_map(|l| l["order_id"].as_str()?.parse().ok())
            .collect()
    }

    /// The lines `node` wrote about `order`.
    pub fn of(&self, node: &str, order: Uuid) -> Vec<Value> {
        audit::read(&[self.path(node).as_path()])
            .into_iter()
            .filter(|l| l["order_id"] == order.to_string())
            .collect()
    }
}

/// Publishes `n` orders straight into the work stream, all at once, and returns their ids.
pub async fn publish_orders(js: &jetstream::Context, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = Uuid::now_v7();
        let ack = js
            .publish(format!("orders.submit.{id}"), r#"{"fault":"test"}"#.into())
            .await
            .expect("publish");
        ids.push(id);
        acks.push(ack);
    }
    for ack in acks {
        ack.await.expect("the stream stores the order");
    }
    ids
}

pub async fn in_flight(node: &Node) -> f64 {
    match reqwest::get(format!("{}/metrics", node.http)).await {
        Ok(response) => metric_sum(
            &response.text().await.unwrap_or_default(),
            "orderly_orders_in_flight",
        ),
        Err(_) => 0.0,
    }
}

/// Waits until `node` works on at least `n` orders.
pub async fn wait_busy(node: &Node, n: f64) {
    wait_until(
        &format!("node {} to work on {n} orders", node.id),
        Duration::from_secs(30),
        || async { (in_flight(node).await >= n).then_some(()) },
    )
    .await;
}

/// Keeps a fault in place until `duration` has passed since `since`. The fault's length is part of
/// the scenario; nothing waits on it for synchronisation.
pub async fn hold_fault(since: Instant, duration: Duration) {
    tokio::time::sleep_until((since + duration).into()).await;
}

pub async fn orders_bucket(js: &jetstream::Context) -> jetstream::kv::Store {
    wait_until("the orders bucket", Duration::from_secs(30), || async {
        js.get_key_value("orders").await.ok()
    })
    .await
}

/// Waits until the work stream is empty, panicking with what is left in it after `timeout`.
pub async fn wait_stream_empty(js: &jetstream::Context, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while stream_messages(js).await != Some(0) {
        if Instant::now() >= deadline {
            let kv = orders_bucket(js).await;
            panic!(
                "timed out after {timeout:?} waiting for the work stream to be empty\n{}",
                queue_report(js, &kv).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for every order to be terminal and the work stream to be empty, then checks the guarantees.
/// Waits until every order is terminal, checks them all against the audits, and prints the report of
/// `scenario`.
pub async fn settle_and_check(
    scenario: &str,
    js: &jetstream::Context,
    ids: &[Uuid],
    audits: &Audits,
    outside: &Outside,
    timeout: Duration,
) -> Report {
    let kv = orders_bucket(js).await;
    let docs = wait_all_terminal(&kv, ids, timeout).await;
    for doc in &docs {
        if doc["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("simulated"))
            || matches!(doc["state"].as_str(), Some("Completed" | "Cancelled"))
        {
            check_terminal_document(doc);
        }
    }
    wait_stream_empty(js, timeout).await;
    let report = audit::check(&kv, ids, &audits.lines(), outside).await;
    print_report(scenario, &report);
    report
}

/// What is left in the work queue: the stream and consumer state, and each message left with its
/// order's state.
pub async fn queue_report(js: &jetstream::Context, kv: &jetstream::kv::Store) -> String {
    let mut report = String::new();
    let Ok(mut stream) = js.get_stream("ORDERS").await else {
        return "stream ORDERS unavailable".into();
    };
    let Ok(info) = stream.info().await else {
        return "stream info unavailable".into();
    };
    let state = info.state.clone();
    report.push_str(&format!("stream: {state:?}\n"));
    if let Ok(mut consumer) = stream
        .get_consumer::<jetstream::consumer::pull::Config>("workers")
        .await
    {
        if let Ok(info) = consumer.info().await {
            report.push_str(&format!(
                "consumer: pending {} ack pending {} redelivered {} delivered {:?} ack floor {:?}\n",
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
                info.delivered,
                info.ack_floor
            ));
        }
    }
    // The first 20 messages still there, with the headers that mean something to a node.
    let mut shown = 0;
    for seq in state.first_sequence..=state.last_sequence {
        if shown == 20 {
            break;
        }
        if let Ok(message) = stream.get_raw_message(seq).await {
            shown += 1;
            let id = message
                .subject
                .trim_start_matches("orders.submit.")
                .to_owned();
            let doc = match id.parse::<Uuid>() {
                Ok(id) => document(kv, id).await.map(|d| d["state"].to_string()),
                Err(_) => None,
            };
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            report.push_str(&format!(
                "message {seq} {} (Nats-Msg-Id {:?}, Orderly-Retry {:?}): order {doc:?}\n",
                message.subject,
                header("Nats-Msg-Id"),
                header("Orderly-Retry"),
            ));
        }
    }
    report
}

pub fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

pub fn print_report(scenario: &str, report: &Report) {
    println!(
        "[{scenario}] {} orders ({} completed, {} failed, {} cancelled), {} lease intervals, {} handovers, {} steps re-run, {} given up, {} unanswered writes applied ({} after their sender fenced)",
        report.orders,
        report.completed,
        report.failed,
        report.cancelled,
        report.intervals,
        report.handovers.len(),
        report.steps_rerun,
        report.given_up,
        report.unconfirmed_applied,
        report.unconfirmed_applied_late
    );
}

/// Waits up to `timeout` for every order to be terminal. Returns their documents, or a list of the
/// orders still not terminal and their states, so that the caller can print its figures first.
pub async fn terminal_within(
    kv: &jetstream::kv::Store,
    ids: &[Uuid],
    timeout: Duration,
) -> Result<Vec<Value>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut docs = Vec::with_capacity(ids.len());
        let mut unfinished = Vec::new();
        for id in ids {
            match document(kv, *id).await {
                Some(doc) if is_terminal(&doc) => docs.push(doc),
                doc => unfinished.push(format!(
                    "{id}: {}",
                    doc.map_or("no document".into(), |d| d["state"].to_string())
                )),
            }
        }
        if unfinished.is_empty() {
            return Ok(docs);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {} orders not terminal after {timeout:?}: {}",
                unfinished.len(),
                ids.len(),
                unfinished.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of a metric over the scrapes of `nodes`.
pub async fn metric_over(nodes: &[&Node], name: &str) -> f64 {
    let mut sum = 0.0;
    for node in nodes {
        sum += metric_sum(&node.metrics().await, name);
    }
    sum
}
