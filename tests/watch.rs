//! `GET /orders/{id}/events`: a client watching an order over Server-Sent Events sees every stored
//! change, in revision order, up to a terminal state, and a client that reconnects with
//! `Last-Event-ID` misses nothing. The node runs in-process with steps that wait for the test to let
//! each one finish, so what the client sees does not depend on timing.

mod common;

use clap::Parser;
use common::*;
use futures::future::BoxFuture;
use orderly::config::Config;
use orderly::engine::steps::{StepCall, StepOutcome, Steps};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Steps that each finish only when the test releases one.
struct Gated {
    gate: Semaphore,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            gate: Semaphore::new(0),
        })
    }

    /// Lets `n` more steps finish.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    fn pass<'a>(&'a self, cancel: CancellationToken) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            tokio::select! {
                permit = self.gate.acquire() => {
                    permit.expect("the gate stays open").forget();
                    StepOutcome::done()
                }
                _ = cancel.cancelled() => StepOutcome::NotNow { reason: "stopped".into() },
            }
        })
    }
}

impl Steps for Gated {
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        self.pass(call.cancel)
    }

    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        self.pass(call.cancel)
    }
}

/// A node running in this process on `server`, with gated steps.
struct InProcess {
    url: String,
    steps: Arc<Gated>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

impl InProcess {
    /// A node whose drain waits up to `grace` for a step to finish.
    async fn start(server: &NatsServer, grace: &str) -> InProcess {
        let data = temp_dir("watch");
        let http_addr = format!("127.0.0.1:{}", free_port());
        let config = Config::try_parse_from([
            "orderly",
            "--nats-url",
            server.url.as_str(),
            "--http-addr",
            http_addr.as_str(),
            "--node-id",
            "watch-node",
            "--data-dir",
            data.path().to_str().expect("a UTF-8 path"),
            "--shutdown-grace",
            grace,
        ])
        .expect("a valid configuration");
        let steps = Gated::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(orderly::node::run_with(
            config,
            steps.clone(),
            stop.clone().cancelled_owned(),
        ));
        let url = format!("http://{http_addr}");
        let http = reqwest::Client::new();
        wait_until("the node is ready", Duration::from_secs(20), || async {
            let ready = http.get(format!("{url}/readyz")).send().await;
            ready.is_ok_and(|r| r.status() == 200).then_some(())
        })
        .await;
        InProcess {
            url,
            steps,
            stop,
            task,
            _data: data,
        }
    }

    async fn submit(&self) -> Uuid {
        let reply: Value = reqwest::Client::new()
            .post(format!("{}/orders", self.url))
            .json(&json!({ "sku": "A-1" }))
            .send()
            .await
            .expect("POST /orders answers")
            .json()
            .await
            .expect("a JSON reply");
        reply["order_id"]
            .as_str()
            .expect("an order id")
            .parse()
            .expect("a UUID")
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the node stops when told to")
            .expect("the node task does not panic")
            .expect("the node stops cleanly");
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: u64,
    event: String,
    data: Value,
}

/// A client reading an order's event stream.
struct Watcher {
    response: reqwest::Response,
    buffer: String,
}

impl Watcher {
    async fn open(url: &str, id: Uuid, last_event_id: Option<u64>) -> Watcher {
        let mut request = reqwest::Client::new().get(format!("{url}/orders/{id}/events"));
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await.expect("the node answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap_or_default();
        assert_eq!(content_type, "text/event-stream");
        Watcher {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` once the server has closed the stream.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    return Some(event);
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("the stream sends or ends within 30s")
                .expect("the stream reads");
            self.buffer
                .push_str(std::str::from_utf8(&chunk?).expect("UTF-8"));
        }
    }

    /// Events up to and including the first that `stop` accepts.
    async fn until(&mut self, stop: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await.expect("the stream goes on");
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

fn parse(block: &str) -> Option<Sse> {
    let (mut id, mut event, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("id:") {
            id = value.trim().parse().ok();
        } else if let Some(value) = line.strip_prefix("event:") {
            event = Some(value.trim().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    Some(Sse {
        id: id?,
        event: event?,
        data: serde_json::from_str(&data).expect("data is JSON"),
    })
}

/// The status of `step` in a document, if the step has started.
fn step_status(document: &Value, step: &str) -> Option<String> {
    document["steps"]
        .as_array()?
        .iter()
        .find(|s| s["step_name"] == step)
        .map(|s| s["status"].as_str().unwrap_or_default().to_owned())
}

/// Whether the write an event shows made `change` (one write can make two: a step completes and
/// the next starts).
fn has_change(event: &Sse, change: &str) -> bool {
    event.data["changes"]
        .as_array()
        .is_some_and(|changes| changes.iter().any(|c| c == change))
}

fn completed_steps(document: &Value) -> usize {
    document["steps"].as_array().map_or(0, |steps| {
        steps.iter().filter(|s| s["status"] == "Completed").count()
    })
}

/// Every event's `data` is the change event's JSON plus the document at that revision; each
/// document extends the one before it.
fn check_consistent(events: &[Sse]) {
    for pair in events.windows(2) {
        assert!(pair[1].id > pair[0].id, "in revision order: {pair:?}");
        let (before, after) = (&pair[0].data["document"], &pair[1].data["document"]);
        assert!(
            completed_steps(after) >= completed_steps(before),
            "{pair:?}"
        );
        let earlier = before["steps"].as_array().map_or(0, Vec::len);
        assert!(after["steps"].as_array().map_or(0, Vec::len) >= earlier);
    }
    for event in events {
        assert_eq!(event.data["change"], event.event.as_str());
        assert_eq!(
            event.data["changes"].as_array().and_then(|c| c.last()),
            Some(&event.data["change"])
        );
        assert_eq!(event.data["to"], event.data["document"]["state"]);
        assert_eq!(event.data["step"], event.data["document"]["current_step"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_sees_every_change_in_order_up_to_the_terminal_state() {
    let server = NatsServer::start().await;
    let node = InProcess::start(&server, "10s").await;
    let client = server.client().await;
    let mut core = client
        .subscribe("orders.events.>")
        .await
        .expect("subscribe to the order events");
    let id = node.submit().await;

    let mut watcher = Watcher::open(&node.url, id, None).await;
    let snapshot = watcher.next().await.expect("a first event");
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["order_id"], id.to_string());
    assert_ne!(snapshot.data["document"]["state"], "Completed");
    node.steps.release(4);
    let mut events = vec![snapshot];
    while let Some(event) = watcher.next().await {
        events.push(event);
    }
    check_consistent(&events);
    // The order is the only key in the bucket: consecutive revisions mean no change was skipped.
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    let expected: Vec<u64> = (ids[0]..ids[0] + ids.len() as u64).collect();
    assert_eq!(ids, expected, "every revision, once");
    let last = events.last().expect("events");
    assert_eq!(last.event, "completed");
    assert_eq!(last.data["document"]["state"], "Completed");
    assert_eq!(completed_steps(&last.data["document"]), 4);
    for step in [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
    ] {
        // The first revision that shows the step completed names the change.
        let completed = events
            .iter()
            .find(|e| step_status(&e.data["document"], step).as_deref() == Some("Completed"))
            .unwrap_or_else(|| panic!("{step} completed in the stream"));
        assert!(has_change(completed, "step_completed"), "{completed:?}");
    }

    // The same JSON as `orders.events.<id>`, event for event, plus the document.
    let changes = events.len() - 1;
    let mut published: Vec<Value> = Vec::new();
    while published.last().is_none_or(|e| e["change"] != "completed") {
        let message =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut core))
                .await
                .expect("the completed event is published")
                .expect("the subscription is open");
        published.push(serde_json::from_slice(&message.payload).expect("JSON"));
    }
    assert!(published.len() >= changes, "{published:?}");
    for (sent, event) in published[published.len() - changes..]
        .iter()
        .zip(&events[1..])
    {
        let mut data = event.data.clone();
        data.as_object_mut().expect("an object").remove("document");
        assert_eq!(&data, sent);
    }

    // An order that does not exist, an id that is not one, a Last-Event-ID that is not a revision.
    let http = reqwest::Client::new();
    let missing = http
        .get(format!("{}/orders/{}/events", node.url, Uuid::now_v7()))
        .send()
        .await
        .expect("an answer");
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("a JSON error");
    assert_eq!(body["code"], "not_found");
    let malformed = http
        .get(format!("{}/orders/not-an-id/events", node.url))
        .send()
        .await
        .expect("an answer");
    assert_eq!(malformed.status(), 400);
    let bad_resume = http
        .get(format!("{}/orders/{id}/events", node.url))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("an answer");
    assert_eq!(bad_resume.status(), 400);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_that_reconnects_with_last_event_id_misses_nothing() {
    let server = NatsServer::start().await;
    let node = InProcess::start(&server, "10s").await;
    let kv = server
        .js()
        .await
        .get_key_value("orders")
        .await
        .expect("the orders bucket");
    let id = node.submit().await;

    // Watch until Scheduling is done, then disconnect.
    let mut watcher = Watcher::open(&node.url, id, None).await;
    let mut seen = vec![watcher.next().await.expect("a snapshot")];
    node.steps.release(1);
    seen.extend(
        watcher
            .until(|e| {
                step_status(&e.data["document"], "Scheduling").as_deref() == Some("Completed")
            })
            .await,
    );
    let last_seen = seen.last().expect("events").id;
    drop(watcher);

    // Meanwhile Pre-Processing completes and Processing starts (then waits at the gate).
    node.steps.release(1);
    let current = wait_until("Processing to start", Duration::from_secs(20), || async {
        let entry = kv.entry(id.to_string()).await.ok()??;
        let doc: Value = serde_json::from_slice(&entry.value).ok()?;
        (step_status(&doc, "Processing").as_deref() == Some("Running")).then_some(entry.revision)
    })
    .await;
    assert!(current > last_seen);

    // Reconnecting after a revision that is no longer the latest replays each revision missed, one
    // event each, up to the current one.
    let mut watcher = Watcher::open(&node.url, id, Some(last_seen)).await;
    let mut resumed = Vec::new();
    while resumed.last().is_none_or(|e: &Sse| e.id < current) {
        resumed.push(watcher.next().await.expect("a missed change"));
    }
    assert!(resumed.iter().all(|e| e.event != "snapshot"), "{resumed:?}");
    assert_eq!(resumed.last().expect("events").id, current);
    assert!(resumed.iter().any(|e| has_change(e, "step_completed")
        && step_status(&e.data["document"], "Pre-Processing").as_deref() == Some("Completed")));
    drop(watcher);

    // Reconnecting after the latest revision sends nothing again: the next event is the next change.
    let mut watcher = Watcher::open(&node.url, id, Some(current)).await;
    node.steps.release(2);
    let rest: Vec<Sse> = {
        let mut rest = Vec::new();
        while let Some(event) = watcher.next().await {
            rest.push(event);
        }
        rest
    };
    assert_eq!(rest[0].id, current + 1, "{rest:?}");
    assert_ne!(rest[0].event, "snapshot");
    let mut all = seen;
    all.extend(resumed);
    all.extend(rest);
    check_consistent(&all);
    let last = all.last().expect("events");
    assert_eq!(last.event, "completed");
    assert_eq!(completed_steps(&last.data["document"]), 4);

    // A terminal order's stream ends at once for a client that has seen its last revision.
    let mut done = Watcher::open(&node.url, id, Some(last.id)).await;
    assert!(done.next().await.is_none());
    node.stop().await;
}

/// A node that drains ends its watches at once, so that its HTTP server can stop; the client
/// reconnects to another node with `Last-Event-ID`.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_node_ends_its_watches() {
    let server = NatsServer::start().await;
    // The order's step waits at the gate, and the drain would wait for it for a minute: only the
    // drain itself can end the stream sooner.
    let node = InProcess::start(&server, "60s").await;
    let id = node.submit().await;
    let mut watcher = Watcher::open(&node.url, id, None).await;
    let snapshot = watcher.next().await.expect("a snapshot");
    assert_ne!(snapshot.data["document"]["state"], "Completed");
    node.stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while watcher.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ends when the node drains");
    node.steps.release(1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_last_event_id_of_another_order_shows_nothing_of_that_order() {
    use futures::StreamExt;
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let other = submit(&http, &node, json!({ "customer": "bob" })).await;
    let watched = submit(&http, &node, json!({ "customer": "ada" })).await;
    let kv = server.orders().await;
    wait_all_terminal(&kv, &[other, watched], Duration::from_secs(30)).await;
    // The other order's first revision, older than the watched order's last.
    let mut history = kv.history(other.to_string()).await.expect("the history");
    let revision = history
        .next()
        .await
        .expect("a first revision")
        .expect("readable")
        .revision;

    let mut watcher = Watcher::open(&node.http, watched, Some(revision)).await;
    let first = watcher.next().await.expect("an event");
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.data["order_id"], watched.to_string());
    assert!(watcher.next().await.is_none(), "the watched order is done");
    let logs = node.logs();
    assert!(
        !logs.contains(&format!("$KV.orders.{other}")) && !logs.contains("subject mismatch"),
        "the other order's key is shown: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_whose_kv_consumer_is_deleted_goes_on_to_the_end() {
    use futures::TryStreamExt;
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "2s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    let mut watcher = Watcher::open(&node.http, id, None).await;
    let first = watcher.next().await.expect("the snapshot");
    assert_eq!(first.event, "snapshot");

    // An operator deletes the consumers on the bucket's stream, the watch's among them.
    let js = server.js().await;
    let stream = js
        .get_stream("KV_orders")
        .await
        .expect("the bucket's stream");
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .expect("the consumers");
    assert!(!names.is_empty(), "the watch has a consumer");
    for name in &names {
        stream
            .delete_consumer(name)
            .await
            .expect("the consumer is deleted");
    }

    let events = watcher.until(|e| e.event == "completed").await;
    check_consistent(&events);
    assert!(
        watcher.next().await.is_none(),
        "the stream ends after the order"
    );
    // Every revision after the snapshot, once each: nothing missed across the reopening.
    let kv = server.orders().await;
    let stored: Vec<u64> = kv
        .history(id.to_string())
        .await
        .expect("the history")
        .map_ok(|entry| entry.revision)
        .try_collect::<Vec<u64>>()
        .await
        .expect("the history reads")
        .into_iter()
        .filter(|revision| *revision > first.id)
        .collect();
    let sent: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(sent, stored);
    let logs = node.logs();
    assert!(
        logs.contains("the KV watcher ended; reopened it"),
        "the log says the watcher was reopened: {logs}"
    );
}
