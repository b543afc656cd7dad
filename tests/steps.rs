//! A library user's own steps: `orderly::node::run_with` runs a node whose steps are the user's code,
//! on a real nats-server, and the order's document records what that code decided.

mod common;

use clap::Parser;
use common::*;
use futures::future::BoxFuture;
use futures::StreamExt;
use orderly::config::Config;
use orderly::domain::order::{Step, StepOutput};
use orderly::engine::steps::{StepCall, StepOutcome, Steps};
use serde_json::json;
use serde_json::value::RawValue;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Steps that find the goods out of stock at Processing, and keep a list of what they were asked.
#[derive(Default)]
struct OutOfStock {
    calls: Mutex<Vec<String>>,
    /// The (attempt, run, fence) of each call.
    callers: Mutex<Vec<(u32, u32, u64)>>,
}

impl OutOfStock {
    fn called(&self, what: String) {
        self.calls.lock().expect("not poisoned").push(what);
    }
}

impl Steps for OutOfStock {
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            let step = call.step;
            self.called(format!("run {step} of {}", call.order.payload.get()));
            let caller = (call.attempt, call.run, call.fence);
            self.callers.lock().expect("not poisoned").push(caller);
            match step {
                Step::Processing => StepOutcome::Failed {
                    reason: "out of stock".into(),
                },
                Step::Scheduling => StepOutcome::Done {
                    output: Some(StepOutput(
                        RawValue::from_string(r#"{"slot":"tomorrow"}"#.into()).expect("valid JSON"),
                    )),
                },
                _ => StepOutcome::done(),
            }
        })
    }

    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(async move {
            self.called(format!("roll back {}", call.step));
            StepOutcome::done()
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_runs_the_steps_it_is_given() {
    let server = NatsServer::start().await;
    let data = temp_dir("steps");
    let http_addr = format!("127.0.0.1:{}", free_port());
    let config = Config::try_parse_from([
        "orderly",
        "--nats-url",
        server.url.as_str(),
        "--http-addr",
        http_addr.as_str(),
        "--node-id",
        "own-steps",
        "--data-dir",
        data.path().to_str().expect("a UTF-8 path"),
    ])
    .expect("a valid configuration");
    let steps = Arc::new(OutOfStock::default());
    let stop = CancellationToken::new();
    let node = tokio::spawn(orderly::node::run_with(
        config,
        steps.clone(),
        stop.clone().cancelled_owned(),
    ));

    let http = reqwest::Client::new();
    let url = format!("http://{http_addr}");
    wait_until("the node is ready", Duration::from_secs(20), || async {
        let ready = http.get(format!("{url}/readyz")).send().await;
        ready.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;
    let reply: serde_json::Value = http
        .post(format!("{url}/orders"))
        .json(&json!({ "sku": "A-1" }))
        .send()
        .await
        .expect("POST /orders answers")
        .json()
        .await
        .expect("a JSON reply");
    let id: uuid::Uuid = reply["order_id"]
        .as_str()
        .expect("an order id")
        .parse()
        .expect("a UUID");
    let kv = server
        .js()
        .await
        .get_key_value("orders")
        .await
        .expect("the orders bucket");
    let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(20))
        .await
        .remove(0);

    assert_eq!(doc["state"], "Failed");
    assert_eq!(doc["failed_step"], "Processing");
    assert_eq!(doc["failure_reason"], "out of stock");
    let statuses: Vec<&str> = doc["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["status"].as_str().expect("a status"))
        .collect();
    // The failed step is undone too (it may have done part of its work), then the ones before it.
    assert_eq!(statuses, ["RolledBack", "RolledBack", "RolledBack"]);
    let calls = steps.calls.lock().expect("not poisoned").clone();
    assert_eq!(
        calls,
        [
            r#"run Scheduling of {"sku":"A-1"}"#,
            r#"run Pre-Processing of {"sku":"A-1"}"#,
            r#"run Processing of {"sku":"A-1"}"#,
            "roll back Processing",
            "roll back Pre-Processing",
            "roll back Scheduling",
        ]
    );
    // What the step's code answered is kept in its record.
    assert_eq!(doc["steps"][0]["output"], json!({ "slot": "tomorrow" }));
    assert!(doc["steps"][1].get("output").is_none());
    // Every call came from the one claim of the order: first attempt, first run, and the fence is
    // the revision at which the node claimed the order.
    let claim = first_claim_revision(&kv, id).await;
    let callers = steps.callers.lock().expect("not poisoned").clone();
    assert_eq!(callers, [(1, 1, claim); 3]);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), node)
        .await
        .expect("the node stops when told to")
        .expect("the node task does not panic")
        .expect("the node stops cleanly");
}

/// The revision of the order's first document that names an owner: its claim.
async fn first_claim_revision(kv: &async_nats::jetstream::kv::Store, id: uuid::Uuid) -> u64 {
    let mut history = kv
        .history(id.to_string())
        .await
        .expect("the order's history");
    while let Some(entry) = history.next().await {
        let entry = entry.expect("a history entry");
        let doc: serde_json::Value = serde_json::from_slice(&entry.value).expect("a document");
        if !doc["owner"].is_null() {
            return entry.revision;
        }
    }
    panic!("the order was never claimed");
}
