//! Cancel and retry, as a customer and an operator use them: over HTTP and NATS, against a real
//! nats-server and real node processes.

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

const STEPS: [&str; 4] = [
    "Scheduling",
    "Pre-Processing",
    "Processing",
    "Post-Processing",
];

/// `POST <node>/orders/<id>/<action>` with `body`; the status and the JSON answer.
async fn act(
    http: &reqwest::Client,
    node: &Node,
    id: &str,
    action: &str,
    body: &str,
) -> (u16, Value) {
    let response = http
        .post(format!("{}/orders/{id}/{action}", node.http))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("the node answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{action} answered {status} with {content_type}"
    );
    (status, response.json().await.expect("a JSON answer"))
}

/// Waits until the order's document satisfies `check`, and returns it.
async fn wait_doc(
    kv: &async_nats::jetstream::kv::Store,
    id: Uuid,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(30), || async {
        document(kv, id).await.filter(|doc| check(doc))
    })
    .await
}

fn running_step(doc: &Value, step: &str) -> bool {
    doc["state"] == "Running"
        && doc["steps"]
            .as_array()
            .and_then(|steps| steps.last())
            .is_some_and(|last| last["step_name"] == step && last["status"] == "Running")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_order_is_cancelled_at_once_and_never_runs() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_WORKERS", "1")
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let busy = submit(&http, &node, json!({ "customer": "ada" })).await;
    wait_doc(&kv, busy, "the only worker is busy", |d| {
        d["state"] == "Running"
    })
    .await;
    let queued = submit(&http, &node, json!({ "customer": "bob" })).await;
    // Nothing to retry yet.
    let (status, body) = act(&http, &node, &queued.to_string(), "retry", "").await;
    assert_eq!((status, &body["state"]), (409, &json!("Queued")), "{body}");

    let (status, doc) = act(
        &http,
        &node,
        &queued.to_string(),
        "cancel",
        r#"{"reason":"ordered twice"}"#,
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["state"], "Cancelled");
    assert_eq!(doc["current_step"], "Cancelled");
    assert_eq!(doc["steps"], json!([]));
    assert_eq!(doc["intent"]["via"], "http");
    assert_eq!(doc["intent"]["reason"], "ordered twice");
    assert_eq!(doc["complete_time"], doc["intent"]["requested_at"]);
    // Asking again gives the same answer.
    let (status, again) = act(&http, &node, &queued.to_string(), "cancel", "").await;
    assert_eq!((status, &again["state"]), (200, &json!("Cancelled")));

    // The worker gets to its message later, and leaves the order as it is.
    wait_all_terminal(&kv, &[busy], Duration::from_secs(20)).await;
    let js = server.js().await;
    wait_until(
        "the cancelled order's message is settled",
        Duration::from_secs(20),
        || async { (stream_messages(&js).await == Some(0)).then_some(()) },
    )
    .await;
    let doc = document(&kv, queued).await.expect("the document");
    assert_eq!(doc["state"], "Cancelled");
    assert_eq!(doc["steps"], json!([]), "no step ran: {doc}");
    check_terminal_document(&doc);
    let scrape = node.metrics().await;
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_orders_finished_total",
            r#"outcome="cancelled""#
        ),
        1.0
    );
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_order_requests_total",
            r#"request="cancel",answer="done""#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_order_is_interrupted_at_any_step_and_rolled_back() {
    let server = NatsServer::start().await;
    // Long steps: a cancel that did not interrupt the step would let it complete.
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "4s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let client = server.client().await;
    let mut ids = Vec::new();
    for _ in STEPS {
        ids.push(submit(&http, &node, json!({ "customer": "ada" })).await);
    }
    let cancels = ids.iter().zip(STEPS).map(|(&id, step)| {
        let (http, kv, node, client) = (&http, &kv, &node, &client);
        async move {
            let mut events = client
                .subscribe(format!("orders.events.{id}"))
                .await
                .expect("subscribe");
            wait_doc(kv, id, &format!("{id} runs {step}"), |d| {
                running_step(d, step)
            })
            .await;
            let (status, doc) = act(http, node, &id.to_string(), "cancel", "").await;
            assert_eq!(status, 202, "{doc}");
            assert_eq!(doc["state"], "Cancelling");
            let mut changes = Vec::new();
            while let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_secs(30), events.next()).await
            {
                let event: Value = serde_json::from_slice(&event.payload).expect("JSON event");
                changes.extend(
                    event["changes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| c.as_str().unwrap_or_default().to_owned()),
                );
                if event["change"] == "cancelled" {
                    break;
                }
            }
            let after: Vec<&str> = changes
                .iter()
                .map(String::as_str)
                .skip_while(|c| *c != "cancel_requested")
                .collect();
            assert_eq!(after.first(), Some(&"cancel_requested"), "{changes:?}");
            assert_eq!(after.last(), Some(&"cancelled"), "{changes:?}");
            assert!(!after.contains(&"step_started"), "{changes:?}");
            (id, step)
        }
    });
    let cancelled = futures::future::join_all(cancels).await;
    for (k, (id, step)) in cancelled.into_iter().enumerate() {
        let doc = &wait_all_terminal(&kv, &[id], Duration::from_secs(30)).await[0];
        assert_eq!(doc["state"], "Cancelled", "{doc}");
        check_terminal_document(doc);
        let steps = doc["steps"].as_array().expect("steps");
        assert_eq!(steps.len(), k + 1, "no step after {step} ran: {doc}");
        let last = &steps[k];
        assert_eq!(last["step_name"], step);
        assert!(
            last["step_complete_time"].is_null(),
            "the running step was interrupted, not completed: {doc}"
        );
        assert_eq!(doc["intent"]["seen_by"], node.id.as_str());
        assert_eq!(doc["attempt"], 1, "the first delivery did it all: {doc}");
    }
    let scrape = node.metrics().await;
    assert_eq!(metric_sum(&scrape, "orderly_leases_lost_total"), 0.0);
    assert_eq!(
        metric_with(
            &scrape,
            "orderly_orders_finished_total",
            r#"outcome="cancelled""#
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_is_refused_once_the_outcome_is_decided() {
    let server = NatsServer::start().await;
    // Scheduling always fails, and its rollback takes a while: the order is RollingBack for 2 s.
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "2s")
        .env("ORDERLY_FAILURE_RATE", "Scheduling=1")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    wait_doc(&kv, id, "the rollback runs", |d| {
        d["state"] == "RollingBack"
    })
    .await;
    let (status, body) = act(&http, &node, &id.to_string(), "cancel", "").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["state"], "RollingBack");
    assert_eq!(body["code"], "invalid_state");
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("RollingBack")));
    let doc = &wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await[0];
    assert_eq!(
        doc["state"], "Failed",
        "a refused cancel changes nothing: {doc}"
    );
    assert!(doc.get("intent").is_none(), "{doc}");
    let (status, body) = act(&http, &node, &id.to_string(), "cancel", "").await;
    assert_eq!((status, &body["state"]), (409, &json!("Failed")));

    let (status, body) = act(&http, &node, &Uuid::now_v7().to_string(), "cancel", "").await;
    assert_eq!((status, &body["code"]), (404, &json!("not_found")));
    let (status, body) = act(&http, &node, "not-an-id", "cancel", "").await;
    assert_eq!((status, &body["code"]), (400, &json!("bad_request")));
    for bad in [r#"{"reason": 5}"#, r#"{"why":"x"}"#, "[1]", "{"] {
        let (status, body) = act(&http, &node, &id.to_string(), "cancel", bad).await;
        assert_eq!(
            (status, &body["code"]),
            (400, &json!("bad_request")),
            "{bad}"
        );
    }
    let long = json!({ "reason": "x".repeat(1001) }).to_string();
    let (status, _) = act(&http, &node, &id.to_string(), "cancel", &long).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn over_nats_cancel_and_retry_answer_as_http_does() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "3s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let client = server.client().await;
    let error_code = |reply: &async_nats::Message| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str().to_owned())
    };

    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    wait_doc(&kv, id, "the order runs", |d| running_step(d, "Scheduling")).await;
    // `nats req orders.cancel '{"order_id":"<id>","reason":"..."}'`
    let request = json!({ "order_id": id, "reason": "customer called" }).to_string();
    let reply = client
        .request("orders.cancel", request.into())
        .await
        .expect("a reply");
    assert_eq!(error_code(&reply), None);
    let doc: Value = serde_json::from_slice(&reply.payload).expect("the document");
    assert_eq!(doc["state"], "Cancelling");
    assert_eq!(doc["intent"]["via"], "nats");
    assert_eq!(doc["intent"]["reason"], "customer called");
    let done = &wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await[0];
    assert_eq!(done["state"], "Cancelled");
    // `nats req orders.cancel <id>` once it is cancelled: the document again.
    let reply = client
        .request("orders.cancel", id.to_string().into())
        .await
        .expect("a reply");
    let doc: Value = serde_json::from_slice(&reply.payload).expect("the document");
    assert_eq!(
        (error_code(&reply), &doc["state"]),
        (None, &json!("Cancelled"))
    );

    // `nats req orders.retry <id>`: the cancelled order runs again, to the end.
    let reply = client
        .request("orders.retry", id.to_string().into())
        .await
        .expect("a reply");
    assert_eq!(error_code(&reply), None, "{:?}", reply.payload);
    let doc: Value = serde_json::from_slice(&reply.payload).expect("the document");
    assert_eq!(doc["retries"], 1);
    let done = &wait_all_terminal(&kv, &[id], Duration::from_secs(30)).await[0];
    assert_eq!(done["state"], "Completed", "{done}");
    assert_eq!(done["history"][0]["state"], "Cancelled");

    for (subject, body, code) in [
        ("orders.cancel", id.to_string(), "409"),
        ("orders.retry", id.to_string(), "409"),
        ("orders.cancel", Uuid::now_v7().to_string(), "404"),
        ("orders.retry", "nope".to_owned(), "400"),
        ("orders.cancel", r#"{"id":1}"#.to_owned(), "400"),
    ] {
        let reply = client
            .request(subject, body.clone().into())
            .await
            .expect("a reply");
        assert_eq!(
            error_code(&reply).as_deref(),
            Some(code),
            "{subject} {body}"
        );
        let error: Value = serde_json::from_slice(&reply.payload).expect("a JSON error");
        assert!(error["error"].is_string(), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_order_is_retried_as_a_new_attempt_and_keeps_the_old_one() {
    let server = NatsServer::start().await;
    let failing = Node::builder(&server.url)
        .env("ORDERLY_FAILURE_RATE", "Processing=1")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let id = submit(&http, &failing, json!({ "customer": "ada" })).await;
    let failed = wait_all_terminal(&kv, &[id], Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(failed["state"], "Failed");
    drop(failing);

    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    let (status, doc) = act(&http, &node, &id.to_string(), "retry", "").await;
    assert_eq!(status, 202, "{doc}");
    assert_eq!(doc["retries"], 1);
    // Queued, or already Running when a node got the retry's message before the request recorded it.
    assert!(
        matches!(doc["state"].as_str(), Some("Queued" | "Running")),
        "{doc}"
    );
    assert!(doc["history"][0]["state"] == "Failed", "{doc}");
    // While it runs again, neither another retry nor a cancel of what is not there is allowed.
    wait_doc(&kv, id, "the retry runs", |d| d["state"] == "Running").await;
    let (status, body) = act(&http, &node, &id.to_string(), "retry", "").await;
    assert_eq!((status, &body["state"]), (409, &json!("Running")));

    let done = wait_all_terminal(&kv, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(done["state"], "Completed", "{done}");
    check_terminal_document(&done);
    let earlier = &done["history"][0];
    assert_eq!(earlier["retry"], 0);
    assert_eq!(earlier["state"], "Failed");
    assert_eq!(earlier["steps"], failed["steps"]);
    assert_eq!(earlier["failed_step"], "Processing");
    assert_eq!(earlier["start_time"], failed["start_time"]);
    let (status, body) = act(&http, &node, &id.to_string(), "retry", "").await;
    assert_eq!((status, &body["state"]), (409, &json!("Completed")));
    let (status, _) = act(&http, &node, &Uuid::now_v7().to_string(), "retry", "").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_written_while_a_node_runs_the_order_is_not_taken_for_a_takeover() {
    use orderly::domain::intent::{Intent, IntentKind};
    use orderly::engine::intent::{cancel, Cancel};

    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    let kv = server.orders().await;
    wait_doc(&kv, id, "the order runs", |d| {
        d["state"] == "Running" && d["owner"].is_object()
    })
    .await;

    // Straight into the document, as any node taking the request does, with no wake-up sent: the
    // owner meets it at its next write.
    let store = orderly::store::OrderStore::new(
        kv.clone(),
        orderly::index::OrderIndex::new(server.js().await),
        orderly::ops::audit::Audit::off(),
    );
    let intent = Intent::new(
        IntentKind::Cancel,
        Some("a test".into()),
        chrono::Utc::now(),
    );
    let recorded = cancel(&store, id, intent.clone())
        .await
        .expect("the store answers");
    assert!(matches!(recorded, Cancel::Answered { .. }), "{recorded:?}");

    let doc = wait_all_terminal(&kv, &[id], Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(doc["state"], "Cancelled");
    assert_eq!(doc["attempt"], 1);
    assert_eq!(doc["intent"]["requested_by"], "a test");
    assert_eq!(doc["intent"]["seen_by"], node.id.as_str());
    check_terminal_document(&doc);
    let scrape = node.metrics().await;
    assert!(metric_sum(&scrape, "orderly_kv_cas_conflicts_total") >= 1.0);
    assert_eq!(metric_sum(&scrape, "orderly_leases_lost_total"), 0.0);
    assert_eq!(metric_sum(&scrape, "orderly_redeliveries_total"), 0.0);
    assert!(matches!(
        cancel(&store, id, intent).await.expect("the store answers"),
        Cancel::Answered { before: None, .. }
    ));
}
