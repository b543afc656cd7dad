//! One node on a real nats-server: submit, process, roll back, query, and refuse bad input.

mod common;

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The step's number, 1 to 4.
fn step_number(step: &str) -> usize {
    [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
    ]
    .iter()
    .position(|s| *s == step)
    .expect("a step name")
        + 1
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_orders_with_seeded_failures_all_end_terminal() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_FAILURE_RATE", "0.05")
        .env("ORDERLY_SEED", 7)
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(submit(&http, &node, json!({ "customer": "ada", "n": i })).await);
    }
    let kv = server.orders().await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(60)).await;
    let mut completed = 0;
    for (id, doc) in ids.iter().zip(&docs) {
        assert_eq!(doc["order_id"], id.to_string());
        check_terminal_document(doc);
        assert_eq!(
            terminal_revisions(&kv, *id).await,
            1,
            "order {id} ended exactly once"
        );
        // Each write records a transition and begins the next: a completed order is created and
        // written 5 times; one whose k-th step failed, 2k + 2 times (k starts, k rollbacks).
        let writes = match doc["failed_step"].as_str() {
            None => 6,
            Some(step) => 2 * (step_number(step) + 1),
        };
        assert_eq!(revisions(&kv, *id).await, writes, "writes of {doc}");
        if doc["state"] == "Completed" {
            completed += 1;
        }
        assert!(doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["node"] == node.id.as_str()));
        assert_eq!(doc["payload"]["customer"], "ada");
    }
    // P(step fails) = 0.05, so about 81 % of orders complete; both outcomes must show up in 100.
    assert!(
        (50..100).contains(&completed),
        "{completed} of 100 completed"
    );
    // The message is acked, and counted, just after the terminal write.
    wait_until(
        "100 finished and 100 acked",
        Duration::from_secs(10),
        || async {
            let scrape = node.metrics().await;
            let finished = metric_sum(&scrape, "orderly_orders_finished_total");
            let acked = metric_sum(&scrape, "orderly_messages_acked_total");
            (finished == 100.0 && acked == 100.0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_always_fails_rolls_back_in_reverse_order() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_FAILURE_RATE", "Processing=1.0")
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(submit(&http, &node, json!({ "customer": "bob" })).await);
    }
    let kv = server.orders().await;
    for doc in wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await {
        check_terminal_document(&doc);
        assert_eq!(doc["state"], "Failed");
        assert_eq!(doc["failed_step"], "Processing");
        let steps: Vec<&str> = doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step_name"].as_str().unwrap())
            .collect();
        assert_eq!(steps, ["Scheduling", "Pre-Processing", "Processing"]);
        // Rolled back Processing, then Pre-Processing, then Scheduling.
        let mut rollbacks: Vec<(chrono::DateTime<chrono::Utc>, &str)> = doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    time(&s["rollback_start_time"]),
                    s["step_name"].as_str().unwrap(),
                )
            })
            .collect();
        rollbacks.sort();
        let order: Vec<&str> = rollbacks.iter().map(|(_, name)| *name).collect();
        assert_eq!(order, ["Processing", "Pre-Processing", "Scheduling"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_published_while_no_node_runs_are_processed_when_one_starts() {
    let server = NatsServer::start().await;
    let js = server.js().await;
    // An operator creates the stream and consumer from nats/*.json, as `nats stream add --config` does.
    let stream: jetstream::stream::Config =
        serde_json::from_str(include_str!("../nats/orders-stream.json")).expect("stream JSON");
    let stream = js.create_stream(stream).await.expect("create stream");
    let consumer: jetstream::consumer::pull::Config =
        serde_json::from_str(include_str!("../nats/workers-consumer.json")).expect("consumer JSON");
    stream
        .create_consumer(consumer)
        .await
        .expect("create consumer");

    // `nats pub orders.submit.<id> '{...}' -H Nats-Msg-Id:<id>`: a core publish with a header.
    let client = server.client().await;
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.to_string().as_str());
        let body = json!({ "customer": "carol" }).to_string();
        client
            .publish_with_headers(
                format!("orders.submit.{id}"),
                headers.clone(),
                body.clone().into(),
            )
            .await
            .unwrap();
        // A repeat within the duplicate window is the same order.
        client
            .publish_with_headers(format!("orders.submit.{id}"), headers, body.into())
            .await
            .unwrap();
    }
    // A node's intake publishes first and writes the document after; if it dies in between, the
    // worker writes the document with the interface the message names.
    let from_http = Uuid::now_v7();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", from_http.to_string().as_str());
    headers.insert("Orderly-Submitted-Via", "http");
    client
        .publish_with_headers(format!("orders.submit.{from_http}"), headers, "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    wait_until("21 stored messages", Duration::from_secs(10), || async {
        (stream_messages(&js).await? == 21).then_some(())
    })
    .await;

    let node = Node::builder(&server.url).start().await;
    let kv = server.orders().await;
    let doc = &wait_all_terminal(&kv, &[from_http], Duration::from_secs(30)).await[0];
    assert_eq!(doc["submitted_via"], "http");
    for doc in wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await {
        assert_eq!(doc["state"], "Completed");
        assert_eq!(doc["submitted_via"], "stream");
        assert_eq!(doc["payload"]["customer"], "carol");
        check_terminal_document(&doc);
    }
    for id in &ids {
        assert_eq!(terminal_revisions(&kv, *id).await, 1);
    }
    // Intake counts the orders it accepts, so the worker counts only those published directly.
    let scrape = node.metrics().await;
    let submitted = "orderly_orders_submitted_total";
    assert_eq!(
        metric_with(&scrape, submitted, "interface=\"stream\""),
        20.0
    );
    assert_eq!(metric_with(&scrape, submitted, "interface=\"http\""), 0.0);
    wait_until(
        "the work queue to be empty",
        Duration::from_secs(10),
        || async { (stream_messages(&js).await? == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_never_holds_more_unacked_orders_than_workers() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_WORKERS", 50)
        .env("ORDERLY_STEP_DURATION", "200ms")
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(submit(&http, &node, json!({ "n": i })).await);
    }
    let js = server.js().await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_consumer("workers")
        .await
        .unwrap();
    let kv = server.orders().await;
    let mut max_ack_pending = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = consumer.info().await.expect("consumer info");
        max_ack_pending = max_ack_pending.max(info.num_ack_pending);
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "work queue not drained: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(10)).await;
    assert!(docs.iter().all(|d| d["state"] == "Completed"));
    assert!(
        max_ack_pending <= 50,
        "ack pending reached {max_ack_pending}"
    );
    assert!(
        max_ack_pending >= 25,
        "the workers ran concurrently (ack pending peaked at {max_ack_pending})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_http_input_gets_a_clear_4xx() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| http.post(format!("{}/orders", node.http)).body(body).send();

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"customer=ada".to_vec(), 400, "not valid JSON"),
        (b"[1,2,3]".to_vec(), 400, "JSON object"),
        (b"".to_vec(), 400, "not valid JSON"),
        (vec![b' '; 1024 * 1024], 413, "larger than"),
    ];
    for (body, status, says) in cases {
        let response = post(body).await.unwrap();
        assert_eq!(response.status(), status);
        if status == 413 {
            // The unread rest of the body leaves the connection unusable; the client is told.
            assert_eq!(response.headers()["connection"], "close");
        }
        let error: Value = response.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(says), "{error}");
    }
    let response = http
        .get(format!("{}/orders/not-an-id", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("invalid order id"));
    let response = http
        .get(format!("{}/orders/{}", node.http, Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "not_found");
    let response = http
        .get(format!("{}/no/such/route", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = http
        .delete(format!("{}/orders", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "method_not_allowed"
    );
    // Nothing was created by the refused submissions.
    let info = server
        .js()
        .await
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_the_stream_is_terminated_and_the_node_keeps_working() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let bad_payload_id = Uuid::now_v7();
    for (subject, body) in [
        ("orders.submit.not-a-uuid".to_owned(), b"{}".to_vec()),
        (
            format!("orders.submit.{bad_payload_id}"),
            b"\x00garbage".to_vec(),
        ),
        (
            format!("orders.submit.{}", Uuid::now_v7()),
            vec![b'x'; 70 * 1024],
        ),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let kv = server.orders().await;
    let doc = wait_until(
        "the bad payload's order to be recorded",
        Duration::from_secs(10),
        || {
            let kv = &kv;
            async move { document(kv, bad_payload_id).await }
        },
    )
    .await;
    assert_eq!(doc["state"], "Failed");
    assert!(
        doc["failure_reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{doc}"
    );

    wait_until("three terminated messages", Duration::from_secs(10), || {
        let node = &node;
        async move {
            (metric_sum(&node.metrics().await, "orderly_messages_terminated_total") == 3.0)
                .then_some(())
        }
    })
    .await;
    wait_until(
        "the poison messages to leave the stream",
        Duration::from_secs(10),
        || async { (stream_messages(&js).await? == 0).then_some(()) },
    )
    .await;
    assert!(node.logs().contains("poison message"));

    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "after": "garbage" })).await;
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(10)).await;
    assert_eq!(docs[0]["state"], "Completed");
    let stream = js.get_stream("ORDERS").await.unwrap();
    let consumer = stream.consumer_info("workers").await.unwrap();
    assert_eq!(consumer.num_redelivered, 0, "nothing is redelivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn http_nats_and_kv_show_the_same_order() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "300ms")
        .start()
        .await;
    let client = server.client().await;
    let mut events = client.subscribe("orders.events.>").await.unwrap();

    // `nats req orders.create '{"customer":"ada"}'`
    let reply = client
        .request(
            "orders.create",
            json!({ "customer": "ada" }).to_string().into(),
        )
        .await
        .unwrap();
    assert!(reply.headers.is_none(), "no error headers");
    let created: Value = serde_json::from_slice(&reply.payload).unwrap();
    let id: Uuid = created["order_id"].as_str().unwrap().parse().unwrap();
    time(&created["start_time"]);

    // Queryable at once, from every interface, with the same document.
    let http = reqwest::Client::new();
    let from_http: Value = get_json(&http, &format!("{}/orders/{id}", node.http)).await;
    assert_eq!(from_http["order_id"], id.to_string());
    assert_eq!(from_http["start_time"], created["start_time"]);
    assert_eq!(from_http["submitted_via"], "nats");

    let kv = server.js().await.get_key_value("orders").await.unwrap();
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    let from_kv = &docs[0];
    let from_http: Value = get_json(&http, &format!("{}/orders/{id}", node.http)).await;
    // `nats req orders.get <id>`
    let reply = client
        .request("orders.get", id.to_string().into())
        .await
        .unwrap();
    let from_nats: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(&from_http, from_kv);
    assert_eq!(&from_nats, from_kv);
    assert_eq!(from_kv["state"], "Completed");

    // Errors come back as service errors with a JSON body.
    let reply = client.request("orders.create", "[1]".into()).await.unwrap();
    let headers = reply.headers.expect("error headers");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(body["error"].as_str().unwrap().contains("JSON object"));
    let reply = client
        .request("orders.get", Uuid::now_v7().to_string().into())
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers
            .unwrap()
            .get("Nats-Service-Error-Code")
            .unwrap()
            .as_str(),
        "404"
    );

    // Every transition was published; the last says Completed.
    let mut seen = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await
    {
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        if event["order_id"] == id.to_string() {
            seen.push(event);
        }
        if seen.last().is_some_and(|e| e["to"] == "Completed") {
            break;
        }
    }
    // The creation is published by the node that accepted the order, on its public connection; the
    // rest by the node that runs it, on its work connection: the creation can arrive after the claim.
    // In the order of their times it comes first.
    seen.sort_by_key(|e| {
        (
            e["time"].as_str().unwrap().to_owned(),
            e["change"] != "created",
        )
    });
    assert_eq!(seen.first().unwrap()["to"], "Queued");
    // One write can make two changes (a step completes and the next starts): `changes` has them all.
    let changes: Vec<&str> = seen
        .iter()
        .flat_map(|e| e["changes"].as_array().unwrap())
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(changes.first(), Some(&"created"));
    assert_eq!(changes.last(), Some(&"completed"));
    assert_eq!(
        changes.iter().filter(|c| **c == "step_started").count(),
        4,
        "{changes:?}"
    );
    assert_eq!(
        changes.iter().filter(|c| **c == "step_completed").count(),
        4,
        "{changes:?}"
    );
    assert_eq!(seen.last().unwrap()["to"], "Completed");
    assert_eq!(seen.last().unwrap()["node"], node.id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnostics_describe_the_node() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", node.http)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let heartbeat: Value = get("/diagnostic/heartbeat")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(heartbeat["node_id"], node.id.as_str());
    assert_eq!(heartbeat["name"], "orderly");
    assert_eq!(heartbeat["status"], "running");
    assert_eq!(heartbeat["version"], env!("CARGO_PKG_VERSION"));
    time(&heartbeat["generated_at"]);
    let cluster: Value = wait_until(
        "the node in the cluster view",
        Duration::from_secs(10),
        || {
            let get = &get;
            async move {
                let cluster: Value = get("/diagnostic/cluster").await.ok()?.json().await.ok()?;
                (cluster["node_count"] == 1).then_some(cluster)
            }
        },
    )
    .await;
    let me = &cluster["nodes"][0];
    assert_eq!(me["node_id"], node.id.as_str());
    assert_eq!(me["workers_total"], 50);
    assert_eq!(me["http_addr"], node.http.trim_start_matches("http://"));
    let scrape = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(scrape.contains("orderly_workers_capacity"), "{scrape}");

    // Without NATS the node is alive but not ready, and a submission fails cleanly.
    drop(server);
    wait_until("readyz to report 503", Duration::from_secs(15), || async {
        let response = get("/readyz").await.ok()?;
        (response.status() == 503).then_some(())
    })
    .await;
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let response = http
        .post(format!("{}/orders", node.http))
        .body(r#"{"customer":"ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "unavailable"
    );

    // And it still stops promptly on SIGTERM.
    let mut node = node;
    node.signal("TERM");
    let status = node
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits on SIGTERM with NATS gone");
    assert!(status.success(), "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_keep_an_order_longer_than_ack_wait_on_its_first_delivery() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_ACK_WAIT", "1s")
        .env("ORDERLY_STEP_DURATION", "700ms")
        .env("ORDERLY_LOG_FORMAT", "json")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "slow" })).await;
    let kv = server.orders().await;
    let doc = &wait_all_terminal(&kv, &[id], Duration::from_secs(30)).await[0];
    // Four steps of 700 ms each, under a 1 s ack wait: only in-progress acks kept the message.
    assert_eq!(doc["state"], "Completed");
    assert_eq!(doc["attempt"], 1, "never redelivered: {doc}");
    assert!(doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["runs"] == 1 && s["attempt"] == 1));
    let js = server.js().await;
    let stream = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(
        stream
            .consumer_info("workers")
            .await
            .unwrap()
            .num_redelivered,
        0
    );
    assert_eq!(
        metric_sum(&node.metrics().await, "orderly_self_fences_total"),
        0.0
    );

    // JSON logs: one object per line, the order's lines carrying its span.
    let logs = node.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["span"]["order.id"] == id.to_string()
            && l["fields"]["message"] == "step completed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_makes_a_repeated_submission_the_same_order() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let key = Uuid::now_v7().to_string();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let response = http
            .post(format!("{}/orders", node.http))
            .header("Idempotency-Key", &key)
            .body(r#"{"customer":"ada"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        replies.push(response.json::<Value>().await.unwrap());
    }
    assert_eq!(replies[0], replies[1]);
    assert_eq!(replies[0]["order_id"], key.as_str());
    // Over NATS, the same key is the same order too.
    let client = server.client().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Idempotency-Key", key.as_str());
    let reply = client
        .request_with_headers("orders.create", headers, r#"{"customer":"ada"}"#.into())
        .await
        .unwrap();
    let from_nats: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(from_nats, replies[0]);

    let kv = server.orders().await;
    let docs = wait_all_terminal(&kv, &[key.parse().unwrap()], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed");
    let js = server.js().await;
    let info = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(
        info.state.last_sequence, 1,
        "one work message for three submissions"
    );

    let response = http
        .post(format!("{}/orders", node.http))
        .header("Idempotency-Key", "not-a-uuid")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_message_for_a_running_order_is_terminated_not_run() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "500ms")
        .start()
        .await;
    let js = server.js().await;
    let id = Uuid::now_v7();
    // Two messages for one order, as after a resubmission past the duplicate window.
    publish_order(&js, id).await;
    let kv = server.orders().await;
    wait_until("the order to run", Duration::from_secs(10), || async {
        (document(&kv, id).await?["state"] == "Running").then_some(())
    })
    .await;
    publish_order(&js, id).await;
    let doc = &wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await[0];
    assert_eq!(doc["state"], "Completed");
    assert!(
        doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["runs"] == 1),
        "{doc}"
    );
    assert_eq!(terminal_revisions(&kv, id).await, 1);
    wait_until(
        "both messages to be gone",
        Duration::from_secs(10),
        || async { (stream_messages(&js).await? == 0).then_some(()) },
    )
    .await;
    let terminated = "orderly_messages_terminated_total";
    let scrape = wait_until(
        "one message terminated",
        Duration::from_secs(10),
        || async {
            let scrape = node.metrics().await;
            (metric_sum(&scrape, terminated) == 1.0).then_some(scrape)
        },
    )
    .await;
    assert_eq!(
        metric_with(&scrape, terminated, r#"reason="duplicate""#),
        1.0,
        "as a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resubmitted_order_whose_message_is_gone_is_continued() {
    let server = NatsServer::start().await;
    let mut first = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    let js = server.js().await;
    let id = Uuid::now_v7();
    let ack = publish_order(&js, id).await;
    let kv = server.orders().await;
    wait_until(
        "the first step to start",
        Duration::from_secs(10),
        || async { (document(&kv, id).await?["steps"][0]["status"] == "Running").then_some(()) },
    )
    .await;
    // The node dies, and an operator removes the stranded message and submits the order again.
    first.signal("KILL");
    first
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    let stream = js.get_stream("ORDERS").await.unwrap();
    stream.delete_message(ack.sequence).await.unwrap();
    publish_order(&js, id).await;

    let second = Node::builder(&server.url).start().await;
    let doc = &wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await[0];
    assert_eq!(doc["state"], "Completed");
    check_terminal_document(doc);
    // The step the first node was running when it died ran again, from its start, on the second.
    assert_eq!(doc["steps"][0]["runs"], 2, "{doc}");
    assert_eq!(doc["steps"][0]["node"], second.id.as_str());
    assert_ne!(first.id, second.id);
    assert_eq!(terminal_revisions(&kv, id).await, 1);
}
