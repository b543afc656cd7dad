//! The promises at the edges of retry, cancel and the document: a retry whose message id someone took
//! first, a work message that claims to be a retry, a document that cancels and retries would grow
//! without end, and payloads that no JSON value can hold. Real nats-server, real node processes.

mod common;

use async_nats::HeaderMap;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;

/// `POST <node>/orders/<id>/<action>` with `body`; the status and the JSON answer.
async fn act(
    http: &reqwest::Client,
    node: &Node,
    id: Uuid,
    action: &str,
    body: Value,
) -> (u16, Value) {
    let response = http
        .post(format!("{}/orders/{id}/{action}", node.http))
        .json(&body)
        .send()
        .await
        .expect("the node answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// Waits until the order's document satisfies `check`, and returns it.
async fn wait_doc(
    kv: &async_nats::jetstream::kv::Store,
    id: Uuid,
    what: &str,
    within: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, within, || async {
        document(kv, id).await.filter(|doc| check(doc))
    })
    .await
}

/// An order that ended `Failed` on a node that fails every `Processing`, which is then stopped.
async fn failed_order(server: &NatsServer, http: &reqwest::Client) -> Uuid {
    let failing = Node::builder(&server.url)
        .env("ORDERLY_FAILURE_RATE", "Processing=1")
        .start()
        .await;
    let id = submit(http, &failing, json!({ "customer": "ada" })).await;
    let kv = server.orders().await;
    let failed = wait_all_terminal(&kv, &[id], Duration::from_secs(20))
        .await
        .remove(0);
    assert_eq!(failed["state"], "Failed");
    id
}

/// Publishes a work message for `id` with `headers`, as any client with publish rights on
/// `orders.submit.>` can.
async fn publish_with(
    js: &async_nats::jetstream::Context,
    subject: String,
    headers: &[(&str, &str)],
) {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    js.publish_with_headers(subject, map, "{}".into())
        .await
        .expect("publish")
        .await
        .expect("the stream stores it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_runs_whatever_message_ids_others_took_first() {
    let server = NatsServer::start().await;
    let http = reqwest::Client::new();
    let id = failed_order(&server, &http).await;
    let js = server.js().await;
    // Every id a retry of this order used to have, taken first by messages of other orders.
    for n in 1..=3 {
        let other = format!("orders.submit.{}", Uuid::now_v7());
        let taken = format!("{id}.retry.{n}");
        publish_with(&js, other, &[("Nats-Msg-Id", taken.as_str())]).await;
    }
    let node = Node::builder(&server.url).start().await;
    let kv = server.orders().await;
    let (status, doc) = act(&http, &node, id, "retry", Value::Null).await;
    assert_eq!(status, 202, "{doc}");
    assert_eq!(doc["retries"], 1);
    let done = wait_doc(&kv, id, "the retry ran", Duration::from_secs(30), |d| {
        d["retries"] == 1 && is_terminal(d)
    })
    .await;
    assert_eq!(done["state"], "Completed", "{done}");
    assert!(done.get("retry_request").is_none(), "{done}");
    let scrape = node.metrics().await;
    assert_eq!(metric_sum(&scrape, "orderly_retry_ids_taken_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_work_message_that_claims_to_be_a_retry_starts_nothing() {
    let server = NatsServer::start().await;
    let http = reqwest::Client::new();
    let id = failed_order(&server, &http).await;
    let js = server.js().await;
    let kv = server.orders().await;
    let before = document(&kv, id).await.expect("the failed order");
    // What a client allowed to submit, but not to retry, can publish.
    let subject = format!("orders.submit.{id}");
    let forged_id = format!("{id}.retry.1");
    publish_with(
        &js,
        subject.clone(),
        &[("Nats-Msg-Id", forged_id.as_str()), ("Orderly-Retry", "1")],
    )
    .await;
    publish_with(&js, subject, &[("Orderly-Retry", "1")]).await;
    let node = Node::builder(&server.url).start().await;
    wait_until(
        "the forged messages are consumed",
        Duration::from_secs(30),
        || async { (stream_messages(&js).await == Some(0)).then_some(()) },
    )
    .await;
    let after = document(&kv, id).await.expect("the failed order");
    assert_eq!(after["state"], "Failed", "{after}");
    assert!(after.get("retries").is_none(), "{after}");
    assert_eq!(after, before);
    assert!(
        node.logs().contains("did not ask for"),
        "the node says why it ignored them"
    );
    // The real retry still runs.
    let (status, doc) = act(&http, &node, id, "retry", Value::Null).await;
    assert_eq!(status, 202, "{doc}");
    let done = wait_doc(&kv, id, "the retry ran", Duration::from_secs(30), |d| {
        d["retries"] == 1 && is_terminal(d)
    })
    .await;
    assert_eq!(done["state"], "Completed", "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancels_and_retries_without_end_keep_the_document_within_its_limit() {
    let server = NatsServer::start().await;
    // Steps that never end by themselves, rollbacks that take no time: each cycle is a claim, an
    // interrupted step, a rollback and a retry.
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "1h")
        .env("ORDERLY_ROLLBACK_DURATION", "0s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    // The longest reason a cancel may carry, in characters that each take 6 bytes once escaped.
    let reason = "\u{1}".repeat(1000);
    const CYCLES: u32 = 170;
    for cycle in 1..=CYCLES {
        let (status, doc) = act(&http, &node, id, "cancel", json!({ "reason": reason })).await;
        assert!(
            matches!(status, 200 | 202),
            "cycle {cycle}: cancel answered {status}: {doc}"
        );
        wait_doc(
            &kv,
            id,
            "the cancel ends the order",
            Duration::from_secs(30),
            |d| d["state"] == "Cancelled",
        )
        .await;
        let (status, doc) = act(&http, &node, id, "retry", Value::Null).await;
        assert_eq!(status, 202, "cycle {cycle}: retry answered {status}: {doc}");
    }
    let raw = server
        .orders()
        .await
        .get(id.to_string())
        .await
        .expect("get")
        .expect("the document");
    assert!(
        raw.len() <= 768 * 1024 - 192 * 1024,
        "the document is {} bytes after {CYCLES} retries",
        raw.len()
    );
    let doc: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(doc["retries"], CYCLES);
    let kept = doc["history"].as_array().expect("history").len() as u32;
    assert!(kept <= 20, "{kept} attempts kept");
    assert_eq!(
        doc["history_dropped"].as_u64(),
        Some(u64::from(CYCLES - kept))
    );
    // The newest attempts are the ones kept.
    assert_eq!(doc["history"][kept as usize - 1]["retry"], CYCLES - 1);
    // And the order still answers: one more cancel ends it.
    let (status, doc) = act(&http, &node, id, "cancel", json!({ "reason": reason })).await;
    assert!(matches!(status, 200 | 202), "{status}: {doc}");
    wait_doc(&kv, id, "the last cancel", Duration::from_secs(30), |d| {
        d["state"] == "Cancelled"
    })
    .await;
    assert!(!node.logs().contains("panicked"));
}

/// Waits until the order's document says `state`. The document is read as text: its payload may
/// hold what a JSON value cannot, and the order's own `state` comes before it.
async fn wait_state(
    kv: &async_nats::jetstream::kv::Store,
    id: Uuid,
    state: &str,
    within: Duration,
) {
    let wanted = format!("\"state\":\"{state}\"");
    wait_until(&format!("order {id} is {state}"), within, || async {
        let raw = kv.get(id.to_string()).await.ok().flatten()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        text.find("\"state\":\"")
            .filter(|at| text[*at..].starts_with(&wanted))
            .map(drop)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_of_an_order_whose_payload_no_json_value_can_hold_ends_it_at_once() {
    let server = NatsServer::start().await;
    // The ack wait is long: a worker that died with the order would leave it for that long.
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "1h")
        .env("ORDERLY_ROLLBACK_DURATION", "0s")
        .env("ORDERLY_ACK_WAIT", "60s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let kv = server.orders().await;
    let deepest = format!("{{\"a\":{}{}}}", "[".repeat(119), "]".repeat(119));
    for payload in [r#"{"a":1e400}"#, r#"{"a":"\ud800"}"#, deepest.as_str()] {
        let response = http
            .post(format!("{}/orders", node.http))
            .header("content-type", "application/json")
            .body(payload.to_owned())
            .send()
            .await
            .expect("POST /orders answers");
        assert_eq!(response.status(), 202, "{payload}");
        let body: Value = response.json().await.expect("JSON");
        let id: Uuid = body["order_id"]
            .as_str()
            .expect("id")
            .parse()
            .expect("uuid");
        wait_state(&kv, id, "Running", Duration::from_secs(30)).await;
        // The answer carries the payload as submitted, which a JSON value cannot hold: its status.
        let status = http
            .post(format!("{}/orders/{id}/cancel", node.http))
            .send()
            .await
            .expect("the node answers")
            .status();
        assert_eq!(status, 202, "{payload}");
        wait_state(&kv, id, "Cancelled", Duration::from_secs(15)).await;
    }
    let scrape = node.metrics().await;
    assert_eq!(metric_sum(&scrape, "orderly_worker_panics_total"), 0.0);
    // One level deeper than allowed is refused at the door.
    let deeper = format!("{{\"a\":{}{}}}", "[".repeat(120), "]".repeat(120));
    let response = http
        .post(format!("{}/orders", node.http))
        .header("content-type", "application/json")
        .body(deeper)
        .send()
        .await
        .expect("POST /orders answers");
    assert_eq!(response.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_work_message_is_requeued_whatever_id_its_copy_would_have_had() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let js = server.js().await;
    let mut stream = js.get_stream("ORDERS").await.expect("the stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    // Another order's message takes the id the sweep will give the copy of the next message...
    let taken = format!("orderly-requeue-{}", last + 2);
    publish_with(
        &js,
        format!("orders.submit.{}", Uuid::now_v7()),
        &[("Nats-Msg-Id", taken.as_str())],
    )
    .await;
    // ... which has a header block no node can receive: it is swept and published again.
    let poisoned = Uuid::now_v7();
    common::hostile::hpub_order(&server.url, poisoned, common::hostile::NO_COLON, b"{}").await;
    let kv = server.orders().await;
    let done = wait_all_terminal(&kv, &[poisoned], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(done["state"], "Completed", "{done}");
    assert!(node.logs().contains("was taken by another message"));
}
