//! Step handlers as NATS services (`ORDERLY_STEPS=nats`), with real processes all round: a real
//! nats-server, real `orderly` nodes and the example shop (`examples/shop_steps.py`, and once its
//! Rust twin) answering the steps. What a user would see: orders run through the handler in step
//! order, its failures roll back through it, orders wait while it is down and go on when it is back,
//! a takeover calls a step again with a higher fence while the old caller is refused, and a handler
//! that does not answer in time fails the step. What lasts: no reply is lost to a hostile client, a
//! reply lost with the connection is asked for again, and a rollback that comes while a slow run still
//! works leaves no effect standing.

mod common;

use common::hostile::{Barrage, MALFORMED, NO_COLON};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

/// A running step handler process, killed when dropped.
struct Handler {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Handler {
    /// The Python shop, with `env` (SHOP_DELAY, SHOP_SLOW_AT, SHOP_FAIL_AT).
    async fn python(nats_url: &str, env: &[(&str, &str)]) -> Handler {
        let python = steps_python();
        let script = project_dir().join("examples/shop_steps.py");
        Handler::start(Command::new(python).arg(script), nats_url, env).await
    }

    /// The Rust shop (`cargo run --example shop_steps`), built if the tests were built without it.
    async fn rust(nats_url: &str, env: &[(&str, &str)]) -> Handler {
        let test = std::env::current_exe().expect("the test's path");
        let profile_dir = test
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the profile directory");
        let binary = profile_dir.join("examples").join("shop_steps");
        if !binary.exists() {
            let target_dir = profile_dir.parent().expect("the target directory");
            let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cargo
                .args(["build", "--example", "shop_steps", "--target-dir"])
                .arg(target_dir)
                .current_dir(project_dir());
            if profile_dir.ends_with("release") {
                cargo.arg("--release");
            }
            let built = cargo.status().expect("cargo runs");
            assert!(built.success(), "cargo build --example shop_steps failed");
        }
        Handler::start(&mut Command::new(binary), nats_url, env).await
    }

    async fn start(command: &mut Command, nats_url: &str, env: &[(&str, &str)]) -> Handler {
        let dir = temp_dir("handler");
        let log = dir.path().join("handler.log");
        let out = std::fs::File::create(&log).expect("a log file");
        command.env("NATS_URL", nats_url);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdout(out.try_clone().expect("a log handle"))
            .stderr(out)
            .spawn()
            .expect("the step handler starts");
        let handler = Handler {
            child,
            log,
            _dir: dir,
        };
        wait_until("the step handler is ready", Duration::from_secs(30), || {
            let logs = std::fs::read_to_string(&handler.log).unwrap_or_default();
            async move { logs.contains("shop-steps ready").then_some(()) }
        })
        .await;
        handler
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let logs = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- step handler log ---\n{logs}");
        }
    }
}

fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The python of the example's venv, made by `scripts/install-steps-venv` if it is missing.
fn steps_python() -> String {
    let output = Command::new("bash")
        .arg(project_dir().join("scripts/install-steps-venv"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/install-steps-venv runs");
    assert!(output.status.success(), "scripts/install-steps-venv failed");
    String::from_utf8(output.stdout)
        .expect("a path")
        .trim()
        .to_owned()
}

/// A node calling step handlers over NATS.
fn nats_node(server: &NatsServer) -> NodeBuilder {
    Node::builder(&server.url).env("ORDERLY_STEPS", "nats")
}

/// The shop's records of `id` once a slow run has ended: it made `effect`, or found the rollback's
/// tombstone and dropped it.
async fn wait_slow_run(client: &async_nats::Client, id: Uuid, effect: &str) -> Value {
    wait_until(
        &format!("the slow run that makes {effect} has ended"),
        Duration::from_secs(20),
        || async {
            let records = shop_records(client, id).await;
            let ended =
                !records["dropped"].is_null() || effects(&records).iter().any(|e| e == effect);
            ended.then_some(records)
        },
    )
    .await
}

/// The shop's records of `id`: `{fence, calls: [...], effects: [...]}`.
async fn shop_records(client: &async_nats::Client, id: Uuid) -> Value {
    let reply = client
        .request("shop.records", id.to_string().into())
        .await
        .expect("the shop answers");
    let all: Value = serde_json::from_slice(&reply.payload).expect("JSON records");
    all[id.to_string()].clone()
}

/// The calls the shop took for an order, as `run Scheduling`, `rollback Processing`, ...
fn calls(records: &Value) -> Vec<String> {
    records["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["call"].as_str().unwrap_or("?"),
                c["step"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// The effects the shop made for an order, as `reserve`, `charge`, ...
fn effects(records: &Value) -> Vec<String> {
    records["effects"]
        .as_array()
        .expect("effects")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or("?").to_owned())
        .collect()
}

const STEP_NAMES: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_python_shop_runs_200_orders_on_two_nodes() {
    let server = NatsServer::start().await;
    let _shop = Handler::python(&server.url, &[]).await;
    let a = nats_node(&server).id("steps-a").start().await;
    let b = nats_node(&server).id("steps-b").start().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { &a } else { &b };
        // One order in ten is paid with a card the shop declines at charging (Pre-Processing).
        let card = if i % 10 == 3 { "declined" } else { "ok" };
        ids.push((
            submit(
                &http,
                node,
                json!({ "sku": format!("A-{i}"), "card": card }),
            )
            .await,
            card,
        ));
    }
    let kv = server.orders().await;
    let all: Vec<Uuid> = ids.iter().map(|(id, _)| *id).collect();
    let docs = wait_all_terminal(&kv, &all, Duration::from_secs(60)).await;
    let client = server.client().await;
    for ((id, card), doc) in ids.iter().zip(&docs) {
        let records = shop_records(&client, *id).await;
        if *card == "declined" {
            assert_eq!(doc["state"], "Failed", "{doc}");
            assert_eq!(doc["failed_step"], "Pre-Processing");
            assert_eq!(
                doc["failure_reason"],
                "charge refused: card declined (step handler error 422)"
            );
            assert_eq!(
                calls(&records),
                [
                    "run Scheduling",
                    "run Pre-Processing",
                    "rollback Pre-Processing",
                    "rollback Scheduling"
                ]
            );
            assert_eq!(effects(&records), ["reserve", "release"]);
        } else {
            assert_eq!(doc["state"], "Completed", "{doc}");
            assert_eq!(
                calls(&records),
                STEP_NAMES.map(|step| format!("run {step}"))
            );
            assert_eq!(effects(&records), ["reserve", "charge", "pack", "ship"]);
            // Each step's record keeps what the shop answered: the shop's own effect.
            for (step, effect) in doc["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .zip(records["effects"].as_array().expect("effects"))
            {
                assert_eq!(&step["output"], effect, "{id}");
            }
        }
        // Every call of one delivery carries the fence of its claim, the revision the shop last saw.
        let claim = doc["steps"][0]["attempt"].as_u64();
        assert_eq!(claim, Some(1), "one delivery each");
        let fences: Vec<&Value> = records["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .map(|c| &c["fence"])
            .collect();
        assert!(fences.iter().all(|f| *f == &records["fence"]), "{records}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_errors_at_processing_fails_every_order_there_and_rolls_back_through_it() {
    let server = NatsServer::start().await;
    let _shop = Handler::python(&server.url, &[("SHOP_FAIL_AT", "processing")]).await;
    let node = nats_node(&server).start().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(submit(&http, &node, json!({ "sku": format!("B-{i}") })).await);
    }
    let kv = server.orders().await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;
    let client = server.client().await;
    for (id, doc) in ids.iter().zip(&docs) {
        assert_eq!(doc["state"], "Failed", "{doc}");
        assert_eq!(doc["failed_step"], "Processing");
        assert_eq!(
            doc["failure_reason"],
            "pack refused (SHOP_FAIL_AT) (step handler error 422)"
        );
        let records = shop_records(&client, *id).await;
        assert_eq!(
            calls(&records),
            [
                "run Scheduling",
                "run Pre-Processing",
                "run Processing",
                "rollback Processing",
                "rollback Pre-Processing",
                "rollback Scheduling",
            ]
        );
        assert_eq!(
            effects(&records),
            ["reserve", "charge", "refund", "release"]
        );
    }
    let scrape = node.metrics().await;
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_step_failures_total",
            r#"step="Processing""#
        ),
        20.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_wait_while_no_handler_runs_and_complete_once_one_does() {
    let server = NatsServer::start().await;
    // Two deliveries at most: waiting for a handler must use up none of them.
    let node = nats_node(&server)
        .env("ORDERLY_MAX_DELIVER", 2)
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(submit(&http, &node, json!({ "sku": format!("C-{i}") })).await);
    }
    let kv = server.orders().await;
    for id in &ids {
        let waiting = wait_until(
            "the order says it waits",
            Duration::from_secs(20),
            || async {
                document(&kv, *id)
                    .await
                    .filter(|doc| !doc["waiting"].is_null())
            },
        )
        .await;
        assert_eq!(waiting["state"], "Running");
        assert_eq!(waiting["waiting"]["step"], "Scheduling");
        assert_eq!(
            waiting["waiting"]["reason"],
            "no step handler is answering on orders.steps.scheduling.run"
        );
    }
    // Each order is called again and again (after 1 s, then 2 s) and fails for it no more than it
    // uses up a delivery.
    wait_until(
        "three calls of each order",
        Duration::from_secs(20),
        || async {
            let scrape = node.metrics().await;
            let calls = metric_with(
                &scrape,
                "orderly_step_unavailable_total",
                r#"step="Scheduling""#,
            );
            (calls >= 30.0).then_some(())
        },
    )
    .await;
    for id in &ids {
        let doc = document(&kv, *id).await.expect("the order");
        assert!(!is_terminal(&doc), "{doc}");
        assert_eq!(doc["attempt"], 1, "{doc}");
    }

    let _shop = Handler::rust(&server.url, &[]).await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;
    for doc in &docs {
        assert_eq!(doc["state"], "Completed", "{doc}");
        assert_eq!(doc["attempt"], 1, "no delivery was used up: {doc}");
        assert!(doc.get("waiting").is_none(), "{doc}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_calls_the_step_again_with_a_higher_fence_and_the_old_caller_is_refused() {
    let server = NatsServer::start().await;
    let _shop = Handler::python(
        &server.url,
        &[("SHOP_DELAY", "3"), ("SHOP_SLOW_AT", "pre-processing")],
    )
    .await;
    let first = nats_node(&server)
        .id("first")
        .env("ORDERLY_ACK_WAIT", "3s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &first, json!({ "sku": "D-1" })).await;
    let client = server.client().await;
    // The shop is working on Pre-Processing for the first node: kill the node in the middle of it.
    let old_call = wait_until(
        "the shop works on Pre-Processing",
        Duration::from_secs(20),
        || async {
            let records = shop_records(&client, id).await;
            records["calls"].as_array().and_then(|calls| {
                calls
                    .iter()
                    .find(|c| c["step"] == "Pre-Processing")
                    .cloned()
            })
        },
    )
    .await;
    first.signal("KILL");
    let _second = nats_node(&server)
        .id("second")
        .env("ORDERLY_ACK_WAIT", "3s")
        .start()
        .await;
    let kv = server.orders().await;
    let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(40))
        .await
        .remove(0);
    assert_eq!(doc["state"], "Completed", "{doc}");
    assert_eq!(
        doc["steps"][1]["runs"], 2,
        "Pre-Processing ran again: {doc}"
    );
    assert_eq!(doc["steps"][1]["node"], "second");

    let records = shop_records(&client, id).await;
    let runs: Vec<&Value> = records["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .filter(|c| c["step"] == "Pre-Processing")
        .collect();
    assert_eq!(runs.len(), 2, "{records}");
    assert_eq!(runs[1]["run"], 2);
    let (old_fence, new_fence) = (old_call["fence"].as_u64(), runs[1]["fence"].as_u64());
    assert!(new_fence > old_fence, "{records}");
    // The old caller's request, sent again now: refused.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Orderly-Order-Id", id.to_string().as_str());
    headers.insert("Orderly-Step", "Pre-Processing");
    headers.insert("Orderly-Attempt", "1");
    headers.insert("Orderly-Run", "1");
    headers.insert("Orderly-Fence", old_call["fence"].to_string().as_str());
    let reply = client
        .request_with_headers(
            "orders.steps.pre-processing.run",
            headers,
            doc.to_string().into(),
        )
        .await
        .expect("the shop answers");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"));
    assert_eq!(code.map(|c| c.as_str()), Some("409"));
    // One effective charge, whichever of the two calls made it.
    let records = shop_records(&client, id).await;
    assert_eq!(
        effects(&records),
        ["reserve", "charge", "pack", "ship"],
        "{records}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_slower_than_the_step_timeout_fails_the_step_saying_so_and_its_late_run_leaves_no_effect(
) {
    let server = NatsServer::start().await;
    let node = nats_node(&server)
        .env("ORDERLY_STEP_TIMEOUT", "1s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let client = server.client().await;
    let slow = [("SHOP_DELAY", "4"), ("SHOP_SLOW_AT", "processing")];
    // Both example shops, one after the other.
    for (n, shop) in ["python", "rust"].into_iter().enumerate() {
        let _shop = match shop {
            "python" => Handler::python(&server.url, &slow).await,
            _ => Handler::rust(&server.url, &slow).await,
        };
        let id = submit(&http, &node, json!({ "sku": format!("E-{n}") })).await;
        let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(30))
            .await
            .remove(0);
        assert_eq!(doc["state"], "Failed", "{shop}: {doc}");
        assert_eq!(doc["failed_step"], "Processing");
        assert_eq!(
            doc["failure_reason"],
            "Processing timed out: no answer within 1s (the step timeout)"
        );
        // The node rolled Processing back while the shop still worked on it; the run, once done,
        // found the tombstone and made nothing: no order is left packed.
        let records = wait_slow_run(&client, id, "pack").await;
        assert_eq!(
            calls(&records),
            [
                "run Scheduling",
                "run Pre-Processing",
                "run Processing",
                "rollback Processing",
                "rollback Pre-Processing",
                "rollback Scheduling",
            ],
            "{shop}"
        );
        assert_eq!(
            effects(&records),
            ["reserve", "charge", "refund", "release"],
            "{shop}: every effect undone, none made after its rollback: {records}"
        );
        assert_eq!(
            records["dropped"][0]["step"], "Processing",
            "{shop}: {records}"
        );
        assert_eq!(records["dropped"][0]["action"], "pack", "{shop}: {records}");
    }
    let scrape = node.metrics().await;
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_step_timeouts_total",
            r#"step="Processing""#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_during_a_slow_charge_ends_cancelled_with_the_charge_refunded() {
    let server = NatsServer::start().await;
    let _shop = Handler::python(
        &server.url,
        &[("SHOP_DELAY", "2"), ("SHOP_SLOW_AT", "pre-processing")],
    )
    .await;
    let node = nats_node(&server).start().await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "sku": "H-1" })).await;
    let client = server.client().await;
    wait_until(
        "the shop works on the charge",
        Duration::from_secs(20),
        || async {
            let records = shop_records(&client, id).await;
            // No records until the shop sees the order.
            (!records.is_null() && calls(&records).contains(&"run Pre-Processing".to_owned()))
                .then_some(())
        },
    )
    .await;
    let answer = http
        .post(format!("{}/orders/{id}/cancel", node.http))
        .send()
        .await
        .expect("the cancel is answered");
    assert_eq!(answer.status(), 202);
    let kv = server.orders().await;
    let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(doc["state"], "Cancelled", "{doc}");
    let records = wait_slow_run(&client, id, "charge").await;
    // The node waited for the charge before it sent its rollback: charged, then refunded.
    assert_eq!(
        calls(&records),
        [
            "run Scheduling",
            "run Pre-Processing",
            "rollback Pre-Processing",
            "rollback Scheduling",
        ]
    );
    assert_eq!(
        effects(&records),
        ["reserve", "charge", "refund", "release"],
        "{records}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_on_orders_create_lose_no_step_handler_reply() {
    let server = NatsServer::start().await;
    // Each call takes a moment, so that replies are on their way all through the attack.
    let _shop = Handler::python(&server.url, &[("SHOP_DELAY", "0.05")]).await;
    // Long enough that no healthy call comes near it, short enough for a reply lost to a dropped
    // connection to fail its step within the test.
    let node = nats_node(&server)
        .env("ORDERLY_STEP_TIMEOUT", "20s")
        .start()
        .await;
    let barrage = Barrage::start(
        &server.url,
        Duration::from_millis(50),
        &["orders.create"],
        &MALFORMED,
        b"{}",
    );
    let js = server.js().await;
    let mut ids = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(150));
    for _ in 0..40 {
        pace.tick().await;
        let id = Uuid::now_v7();
        publish_order(&js, id).await;
        ids.push(id);
    }
    let kv = server.orders().await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(60)).await;
    let shots = barrage.stop().await;
    let scrape = node.metrics().await;
    let reconnects = |connection: &str| {
        metric_with(
            &scrape,
            "orderly_nats_reconnects_total",
            &format!(r#"connection="{connection}""#),
        )
    };
    println!(
        "{} hostile requests, {} reconnects of the public connection, {} of the steps connection",
        shots.taken,
        reconnects("public"),
        reconnects("steps")
    );
    let failed: Vec<String> = docs
        .iter()
        .filter(|doc| doc["state"] != "Completed")
        .map(|doc| {
            format!(
                "{} {} ({})",
                doc["order_id"], doc["state"], doc["failure_reason"]
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} orders did not complete: {}",
        failed.len(),
        docs.len(),
        failed.join("; ")
    );
    assert!(
        reconnects("public") > 0.0,
        "the attack dropped the public connection"
    );
    assert_eq!(
        reconnects("steps"),
        0.0,
        "the steps connection serves no one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_lost_with_the_steps_connection_is_asked_for_again_not_waited_out() {
    let server = NatsServer::start().await;
    // The step timeout is left at its default, 5 minutes: waiting it out would fail the test.
    let node = nats_node(&server).start().await;
    // A handler whose first reply has a header block the node's NATS client cannot read: the client
    // drops the connection it came in on, and the reply with it.
    let client = server.client().await;
    let mut requests = client
        .subscribe("orders.steps.>")
        .await
        .expect("the handler subscribes");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = tokio::spawn({
        let (seen, url, client) = (seen.clone(), server.url.clone(), client.clone());
        async move {
            while let Some(request) = requests.next().await {
                let reply = request.reply.clone().expect("a reply subject");
                let first = {
                    let mut seen = seen.lock().expect("the calls");
                    seen.push(request.subject.to_string());
                    seen.len() == 1
                };
                if first {
                    hostile::hpub(&url, &reply, NO_COLON, b"{}")
                        .await
                        .expect("the bad reply is sent");
                } else {
                    client
                        .publish(reply, "{}".into())
                        .await
                        .expect("the reply is sent");
                }
            }
        }
    });
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "sku": "I-1" })).await;
    let kv = server.orders().await;
    let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    handler.abort();
    assert_eq!(doc["state"], "Completed", "{doc}");
    assert_eq!(
        doc["steps"][0]["runs"], 1,
        "called again, not run again: {doc}"
    );
    let seen = seen.lock().expect("the calls").clone();
    assert_eq!(
        seen[..2],
        ["orders.steps.scheduling.run", "orders.steps.scheduling.run"],
        "{seen:?}"
    );
    let scrape = node.metrics().await;
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_nats_reconnects_total",
            r#"connection="steps""#
        ),
        1.0
    );
    assert_eq!(metric_sum(&scrape, "orderly_step_timeouts_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_order_can_be_cancelled_and_a_draining_node_hands_its_waiting_orders_back() {
    let server = NatsServer::start().await;
    let mut node = nats_node(&server).id("waits").start().await;
    let http = reqwest::Client::new();
    let cancelled = submit(&http, &node, json!({ "sku": "F-1" })).await;
    let handed_back = submit(&http, &node, json!({ "sku": "F-2" })).await;
    let kv = server.orders().await;
    for id in [cancelled, handed_back] {
        wait_until(
            "the order waits for a handler",
            Duration::from_secs(20),
            || async {
                document(&kv, id)
                    .await
                    .filter(|doc| !doc["waiting"].is_null())
            },
        )
        .await;
    }

    // A cancel interrupts the wait; the rollback of the interrupted step waits for a handler too.
    let answer = http
        .post(format!("{}/orders/{cancelled}/cancel", node.http))
        .send()
        .await
        .expect("the cancel is answered");
    assert_eq!(answer.status(), 202);
    let rolling_back = wait_until("the rollback waits", Duration::from_secs(20), || async {
        document(&kv, cancelled)
            .await
            .filter(|doc| doc["steps"][0]["status"] == "RollingBack" && !doc["waiting"].is_null())
    })
    .await;
    assert_eq!(rolling_back["state"], "Cancelling");
    assert_eq!(
        rolling_back["waiting"]["reason"],
        "no step handler is answering on orders.steps.scheduling.rollback"
    );

    // A drain hands the waiting orders back instead of keeping them.
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the node drains and exits"
    );
    for id in [cancelled, handed_back] {
        let doc = document(&kv, id).await.expect("the order");
        assert!(doc["owner"].is_null(), "handed back: {doc}");
        assert!(doc.get("waiting").is_none(), "{doc}");
        assert!(!is_terminal(&doc), "{doc}");
    }

    let _shop = Handler::python(&server.url, &[]).await;
    let _next = nats_node(&server).id("goes-on").start().await;
    let docs = wait_all_terminal(&kv, &[cancelled, handed_back], Duration::from_secs(40)).await;
    assert_eq!(docs[0]["state"], "Cancelled", "{}", docs[0]);
    assert_eq!(docs[0]["steps"][0]["status"], "RolledBack");
    assert_eq!(docs[1]["state"], "Completed", "{}", docs[1]);
    let client = server.client().await;
    let records = shop_records(&client, cancelled).await;
    assert_eq!(calls(&records), ["rollback Scheduling"]);
    assert!(
        effects(&records).is_empty(),
        "nothing was done, nothing undone: {records}"
    );
}

/// The user for step handlers that docs/step-handlers.md shows, as it shows it.
fn documented_handler_user() -> String {
    let docs = std::fs::read_to_string(project_dir().join("docs/step-handlers.md"))
        .expect("docs/step-handlers.md");
    let after = docs
        .split("The file has no user for step handlers")
        .nth(1)
        .expect("the docs show a user for step handlers");
    let block = after.split("```").nth(1).expect("a code block");
    block.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn step_handlers_work_on_a_server_with_the_shipped_accounts_and_the_documented_user() {
    let accounts = std::fs::read_to_string(project_dir().join("nats/accounts.conf"))
        .expect("nats/accounts.conf");
    let with_handlers = accounts.replacen(
        "users: [",
        &format!("users: [\n{}\n", documented_handler_user()),
        1,
    );
    assert_ne!(with_handlers, accounts, "the users list is found");
    let dir = temp_dir("accounts");
    let config = dir.path().join("accounts.conf");
    std::fs::write(&config, with_handlers).expect("the configuration is written");
    let passwords: Vec<(String, String)> = ["NODE", "SUBMITTER", "OPERATOR", "STEPS"]
        .iter()
        .map(|role| {
            (
                format!("ORDERLY_{role}_PASSWORD"),
                format!("pw-{role}-{}", Uuid::new_v4().simple()),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = passwords
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = secured::SecuredServer::start(&config, &[], &env).await;
    let password = |role: &str| {
        passwords
            .iter()
            .find(|(k, _)| k == &format!("ORDERLY_{role}_PASSWORD"))
            .map(|(_, v)| v.clone())
            .expect("a password")
    };
    let _shop = Handler::python(
        &server.url("nats", &format!("steps:{}", password("STEPS"))),
        &[("SHOP_FAIL_AT", "processing")],
    )
    .await;
    let node = Node::builder(&server.url("nats", &format!("node:{}", password("NODE"))))
        .env("ORDERLY_STEPS", "nats")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "sku": "G-1" })).await;
    let doc = wait_until("the order ends", Duration::from_secs(30), || async {
        let doc = get_json(&http, &format!("{}/orders/{id}", node.http)).await;
        is_terminal(&doc).then_some(doc)
    })
    .await;
    // Every step and rollback went through the handler: the failure is the handler's.
    assert_eq!(doc["state"], "Failed", "{doc}");
    assert_eq!(
        doc["failure_reason"],
        "pack refused (SHOP_FAIL_AT) (step handler error 422)"
    );
    assert!(
        doc["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .all(|s| s["status"] == "RolledBack"),
        "{doc}"
    );
    assert_eq!(server.violations("node"), Vec::<String>::new());
    assert_eq!(server.violations("steps"), Vec::<String>::new());
}
