//! Attacks and faults from outside the fault model's crashes: malformed and status-like header blocks
//! from a raw client, forged advisories, a message id taken by another subject, a full store, a live
//! ack-wait change and a deleted consumer. Each runs real nats-servers and real `orderly` processes,
//! then checks what a user would notice and the guarantees (see `common::audit`).
//!
//! The scenarios run one at a time: each loads both cores on its own.

mod common;

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::Utc;
use common::audit::Outside;
use common::faults::{fill_store, FILLER};
use common::hostile::{hpub_order, status_block, Barrage, MALFORMED, NO_COLON};
use common::scenario::*;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MALLORY: &[u8] = br#"{"customer":"mallory"}"#;

/// An audited node of these scenarios: 200 ms steps, no simulated failures, 2 s ack wait.
fn calm(audits: &Audits, url: &str, id: &str) -> NodeBuilder {
    audits.node(url, id).env("ORDERLY_FAILURE_RATE", "0")
}

/// A nats-server and two calm nodes, `<name>-a` and `<name>-b`, with their audits.
struct Pair {
    server: NatsServer,
    audits: Audits,
    a: Node,
    b: Node,
    js: jetstream::Context,
}

async fn pair(name: &str) -> Pair {
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let a = calm(&audits, &server.url, &format!("{name}-a"))
        .start()
        .await;
    let b = calm(&audits, &server.url, &format!("{name}-b"))
        .start()
        .await;
    let js = server.js().await;
    Pair {
        server,
        audits,
        a,
        b,
        js,
    }
}

fn assert_all_completed(docs: &[Value]) {
    let not: Vec<String> = docs
        .iter()
        .filter(|d| d["state"] != "Completed" || !d["failure_reason"].is_null())
        .map(|d| format!("{} {} ({})", d["order_id"], d["state"], d["failure_reason"]))
        .collect();
    assert!(
        not.is_empty(),
        "{} of {} orders did not complete: {}",
        not.len(),
        docs.len(),
        not.join("; ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_on_service_subjects_end_no_lease() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Pair {
        server,
        audits,
        a,
        b,
        js,
    } = pair("mal").await;

    let barrage = Barrage::start(
        &server.url,
        Duration::from_millis(500),
        &["orders.create", "orders.get", "$SRV.PING"],
        &MALFORMED,
        MALLORY,
    );
    // Orders keep arriving while the attack goes on.
    let mut ids = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..30 {
        pace.tick().await;
        ids.extend(publish_orders(&js, 1).await);
    }
    let kv = orders_bucket(&js).await;
    let finished = terminal_within(&kv, &ids, Duration::from_secs(20)).await;
    let shots = barrage.stop().await;
    assert_eq!(shots.missed, 0, "the server took every hostile message");
    let sent = shots.taken;
    let fences = metric_over(&[&a, &b], "orderly_self_fences_total").await;
    let reconnects = metric_over(&[&a, &b], "orderly_nats_reconnects_total").await;
    println!("[malformed headers] {sent} hostile messages, {fences} self-fences, {reconnects} reconnects over both nodes");
    assert_all_completed(&finished.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        fences, 0.0,
        "malformed headers on service subjects made the nodes fence leases"
    );
    settle_and_check(
        "malformed headers",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_work_message_costs_at_most_one_reconnect() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Pair {
        server,
        audits,
        a,
        b,
        js,
    } = pair("poisoned").await;

    let poisoned = Uuid::now_v7();
    hpub_order(&server.url, poisoned, NO_COLON, MALLORY).await;
    let mut ids = publish_orders(&js, 20).await;
    ids.push(poisoned);
    let kv = orders_bucket(&js).await;
    let finished = terminal_within(&kv, &ids, Duration::from_secs(20)).await;
    let reconnects = [
        metric_sum(&a.metrics().await, "orderly_nats_reconnects_total"),
        metric_sum(&b.metrics().await, "orderly_nats_reconnects_total"),
    ];
    let poisoned_doc = document(&kv, poisoned).await;
    println!(
        "[poisoned work message] reconnects: {} on {}, {} on {}; the poisoned order: {}",
        reconnects[0],
        a.id,
        reconnects[1],
        b.id,
        poisoned_doc
            .as_ref()
            .map_or("no document".into(), |d| format!(
                "{} {}",
                d["state"], d["failure_reason"]
            ))
    );
    let docs = finished.unwrap_or_else(|e| panic!("{e}"));
    assert_all_completed(&docs);
    wait_stream_empty(&js, Duration::from_secs(10)).await;
    assert!(
        reconnects.iter().sum::<f64>() <= 2.0,
        "one poisoned message cost {reconnects:?} reconnects"
    );
    settle_and_check(
        "poisoned work message",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_max_deliveries_advisories_fail_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let slow = |id: &str| calm(&audits, &server.url, id).env("ORDERLY_STEP_DURATION", "500ms");
    let a = slow("forged-a").start().await;
    let _b = slow("forged-b").start().await;
    let js = server.js().await;
    let ids = publish_orders(&js, 40).await;
    wait_busy(&a, 1.0).await;

    let client = server.client().await;
    let subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ORDERS.workers";
    let mut pace = tokio::time::interval(Duration::from_millis(400));
    for _ in 0..4 {
        pace.tick().await;
        for seq in 1..=80 {
            let advisory = json!({
                "type": "io.nats.jetstream.advisory.v1.max_deliver",
                "id": Uuid::new_v4().simple().to_string(),
                "timestamp": Utc::now(),
                "stream": "ORDERS",
                "consumer": "workers",
                "stream_seq": seq,
                "deliveries": 10,
            });
            client
                .publish(subject, advisory.to_string().into())
                .await
                .expect("publish");
        }
        client.flush().await.expect("flush");
    }

    let kv = orders_bucket(&js).await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;
    assert_all_completed(&docs);
    settle_and_check(
        "forged advisories",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msg_id_taken_by_another_subject_is_a_conflict_not_an_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "200ms")
        .start()
        .await;
    let js = server.js().await;
    let client = server.client().await;
    let http = reqwest::Client::new();
    let post = |key: Uuid| {
        http.post(format!("{}/orders", node.http))
            .header("Idempotency-Key", key.to_string())
            .body(r#"{"customer":"eve"}"#)
            .send()
    };
    let status_of = |id: Uuid| {
        let request = http.get(format!("{}/orders/{id}", node.http)).send();
        async move { request.await.expect("GET answers").status() }
    };
    let publish_with_id = |subject: String, msg_id: Uuid| {
        let message = PublishMessage::build()
            .payload("{}".into())
            .message_id(msg_id.to_string());
        let js = js.clone();
        async move {
            let ack = js.send_publish(subject, message).await.expect("publish");
            let ack = ack.await.expect("the stream stores it");
            assert!(!ack.duplicate, "a fresh message id");
        }
    };

    // Order A's message carries B as its deduplication id.
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    publish_with_id(format!("orders.submit.{a}"), b).await;
    let response = post(b).await.expect("POST answers");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 409, "POST with the taken key {b}: {body}");
    assert_eq!(body["code"], "conflict", "{body}");
    assert_eq!(status_of(b).await, 404, "no order {b} was made");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Idempotency-Key", b.to_string().as_str());
    let reply = client
        .request_with_headers("orders.create", headers, r#"{"customer":"eve"}"#.into())
        .await
        .expect("orders.create answers");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    assert_eq!(
        code.as_deref(),
        Some("409"),
        "orders.create with the taken key: {}",
        String::from_utf8_lossy(&reply.payload)
    );

    // A message that is no order at all takes C.
    let c = Uuid::now_v7();
    publish_with_id("orders.submit.not-an-id".into(), c).await;
    let status = post(c).await.expect("POST answers").status();
    assert_eq!(
        status, 409,
        "POST with the key {c} a non-order message took"
    );

    // A genuine repeat is still the same order.
    let d = Uuid::now_v7();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let response = post(d).await.expect("POST answers");
        assert_eq!(response.status(), 202, "POST with the fresh key {d}");
        replies.push(response.json::<Value>().await.expect("a JSON reply"));
    }
    assert_eq!(replies[0]["order_id"], d.to_string());
    assert_eq!(replies[0], replies[1]);
    let kv = orders_bucket(&js).await;
    let docs = wait_all_terminal(&kv, &[d], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed");
    assert_eq!(status_of(b).await, 404, "still no order {b}");
    assert_eq!(status_of(c).await, 404, "no order {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_strands_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start_with_config("max_file_store: 8MB").await;
    let audits = Audits::new();
    let node = |id: &str| {
        calm(&audits, &server.url, id)
            .env("ORDERLY_MAX_DELIVER", 4)
            .env("ORDERLY_STEP_DURATION", "1s")
    };
    let a = node("full-a").start().await;
    let _b = node("full-b").start().await;
    let js = server.js().await;
    let ids = publish_orders(&js, 40).await;
    wait_busy(&a, 1.0).await;

    let stored = fill_store(&js, 1).await;
    let full = Instant::now();
    println!("[full store] the store refused writes after {stored} more bytes");
    hold_fault(full, Duration::from_secs(30)).await;
    js.delete_stream(FILLER)
        .await
        .expect("stream FILLER is deleted");

    let kv = orders_bucket(&js).await;
    let docs = terminal_within(&kv, &ids, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gave_up: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["failure_reason"]
                .as_str()
                .is_some_and(|r| r.contains("gave up"))
        })
        .collect();
    assert!(
        gave_up.is_empty(),
        "{} orders given up while the store was full, for example {}",
        gave_up.len(),
        gave_up[0]
    );
    assert_all_completed(&docs);
    settle_and_check(
        "full store",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_ack_wait_change_is_safe() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let node = |id: &str| {
        calm(&audits, &server.url, id)
            .env("ORDERLY_STEP_DURATION", "1s")
            .env("ORDERLY_WORKERS", 5)
    };
    let mut old_a = node("wait-old-a")
        .env("ORDERLY_ACK_WAIT", "8s")
        .start()
        .await;
    let mut old_b = node("wait-old-b")
        .env("ORDERLY_ACK_WAIT", "8s")
        .start()
        .await;
    let js = server.js().await;
    // Enough work that the old nodes (5 workers each) are still busy when the change is done.
    let ids = publish_orders(&js, 60).await;
    wait_busy(&old_a, 1.0).await;
    wait_busy(&old_b, 1.0).await;
    let began = Instant::now();

    // A node that is paused through the whole change (a frozen VM) must not be caught out by it.
    old_b.signal("STOP");
    old_b.wait_stopped().await;

    // (a) Announce the new window: `nats consumer edit ORDERS workers --metadata orderly_window:2s`.
    // Running nodes shorten every lease to it at once; the server still waits 8 s (up to 32 s on a
    // fourth delivery).
    let stream = js.get_stream("ORDERS").await.expect("stream ORDERS");
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("workers").await.expect("consumer");
    let mut config = consumer.info().await.expect("consumer info").config.clone();
    config
        .metadata
        .insert("orderly_window".to_owned(), "2s".to_owned());
    stream
        .update_consumer(config.clone())
        .await
        .expect("the window is announced");
    let announced = Instant::now();
    // (b) Wait out the longest window in force (4 x the old ack wait) and a second: every lease taken
    // before the announcement has ended by then, or was renewed by a node that knows the new window.
    // The wait is the procedure's, not the test's.
    let secs = Duration::from_secs;
    tokio::time::sleep_until((announced + secs(4 * 8 + 1)).into()).await;
    // (c) `nats consumer edit ORDERS workers --config ...`: the windows become 2 s, 2 s, 4 s, 8 s.
    config.ack_wait = secs(2);
    config.backoff = vec![secs(2), secs(2), secs(4), secs(8)];
    stream
        .update_consumer(config)
        .await
        .expect("the consumer is edited in place");

    // An old node dies: the server hands its orders out again under the new window.
    old_a.signal("KILL");
    old_a
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the killed node exits");
    let died = Utc::now();
    // (b) the new node joins and works alongside the old one for a while, (c) the old one stops.
    let new = calm(&audits, &server.url, "wait-new")
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    wait_until(
        "the new node to finish an order",
        Duration::from_secs(30),
        || async {
            let lines = common::audit::read(&[audits.path(&new.id).as_path()]);
            lines.iter().any(common::audit::finishes).then_some(())
        },
    )
    .await;
    // The paused node wakes after others took its orders over: its leases ended long ago.
    old_b.signal("CONT");
    old_b.signal("TERM");
    old_b
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the old node stops within its grace period");

    let outside = Outside {
        died: [(old_a.id.clone(), vec![died])].into(),
        ..Outside::default()
    };
    let timeout = secs(90).saturating_sub(began.elapsed());
    let report = settle_and_check("ack wait change", &js, &ids, &audits, &outside, timeout).await;
    let mut takeovers: Vec<f64> = report
        .handovers_after("died")
        .iter()
        .map(|h| seconds(died, h.to.start))
        .collect();
    let (median, max) = common::audit::median_max(&mut takeovers);
    println!(
        "[ack wait change] {} orders of the killed node taken over: median {median:.3}s, max {max:.3}s after the kill (old ack wait 8s)",
        takeovers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_recreated_without_a_storm_of_logs() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Pair {
        server: _server,
        audits,
        a,
        b,
        js,
    } = pair("deleted").await;
    let ids = publish_orders(&js, 60).await;
    wait_busy(&a, 1.0).await;

    // Warnings and errors: a node logs a line or two for each lease the deletion ends, and must not
    // log one per failed pull (thousands a second before).
    let lines = |node: &Node| {
        node.logs()
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .count()
    };
    let before = [lines(&a), lines(&b)];
    let stream = js.get_stream("ORDERS").await.expect("stream ORDERS");
    // nats-server can refuse a delete while it writes the consumer's state ("unlinkat ...: directory
    // not empty"); an operator asks again, and so does the test.
    wait_until(
        "the consumer is deleted",
        Duration::from_secs(10),
        || async {
            match stream.delete_consumer("workers").await {
                Ok(_) => Some(()),
                Err(e) if e.to_string().contains("not empty") => None,
                Err(e) => panic!("the consumer cannot be deleted: {e}"),
            }
        },
    )
    .await;
    let deleted = Instant::now();
    hold_fault(deleted, Duration::from_secs(5)).await;
    let grown = [lines(&a) - before[0], lines(&b) - before[1]];
    println!(
        "[deleted consumer] warnings in the 5 s after the deletion: {} on {}, {} on {}",
        grown[0], a.id, grown[1], b.id
    );
    assert!(
        grown.iter().all(|n| *n < 2 * ids.len() + 20),
        "the nodes logged {grown:?} warnings in 5 s for {} orders",
        ids.len()
    );
    settle_and_check(
        "deleted consumer",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_like_header_blocks_in_work_messages_are_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    // The nodes run until the end of the test.
    let Pair {
        server,
        audits,
        js,
        a: _a,
        b: _b,
    } = pair("status").await;

    let mut ids = Vec::new();
    for code in [408, 100, 409, 503] {
        let id = Uuid::now_v7();
        hpub_order(&server.url, id, &status_block(code), MALLORY).await;
        ids.push(id);
    }
    let kv = orders_bucket(&js).await;
    let finished = terminal_within(&kv, &ids, Duration::from_secs(15)).await;
    for (code, id) in [408, 100, 409, 503].iter().zip(&ids) {
        let state = document(&kv, *id).await.map(|d| d["state"].clone());
        println!("[status-like headers] NATS/1.0 {code}: order {id} is {state:?}");
    }
    finished.unwrap_or_else(|e| panic!("{e}"));
    wait_stream_empty(&js, Duration::from_secs(10)).await;
    settle_and_check(
        "status-like headers",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(10),
    )
    .await;
}
