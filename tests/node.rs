//! The node as a process: its JetStream setup, the embedded nats-server, configuration errors and
//! shutdown.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// The JetStream API's view of an object's configuration (what `nats stream info --json` shows).
async fn server_config(client: &async_nats::Client, api: &str) -> Value {
    let reply = client
        .request(api.to_owned(), "".into())
        .await
        .expect("JetStream API answers");
    let info: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    info["config"].clone()
}

/// A node with no NATS_URL, whose embedded nats-server listens on `port`.
fn embedded(port: u16) -> NodeBuilder {
    Node::builder("unused")
        .env("NATS_URL", "")
        .env("ORDERLY_EMBEDDED_NATS_ADDR", format!("127.0.0.1:{port}"))
}

async fn wait_port_closed(port: u16, what: &str) {
    wait_until(what, Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_json_definitions_match_what_the_node_creates() {
    let server = NatsServer::start().await;
    let _node = Node::builder(&server.url).start().await;
    let client = server.client().await;
    for (file, api) in [
        ("orders-stream.json", "$JS.API.STREAM.INFO.ORDERS"),
        (
            "workers-consumer.json",
            "$JS.API.CONSUMER.INFO.ORDERS.workers",
        ),
        ("kv-orders.json", "$JS.API.STREAM.INFO.KV_orders"),
        (
            "orders-index-stream.json",
            "$JS.API.STREAM.INFO.ORDERS_INDEX",
        ),
        (
            "kv-orderly-nodes.json",
            "$JS.API.STREAM.INFO.KV_orderly-nodes",
        ),
    ] {
        let path = format!("{}/nats/{file}", env!("CARGO_MANIFEST_DIR"));
        let wanted: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let actual = server_config(&client, api).await;
        let wanted = wanted.as_object().unwrap();
        assert!(wanted.len() >= 10, "{file} defines the whole object");
        for (key, value) in wanted {
            assert_eq!(
                actual.get(key),
                Some(value),
                "nats/{file}: {key} differs from what the node created"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_refuses_to_start_against_a_conflicting_consumer() {
    let server = NatsServer::start().await;
    let _first = Node::builder(&server.url)
        .env("ORDERLY_ACK_WAIT", "30s")
        .start()
        .await;
    let mut second = Node::builder(&server.url)
        .env("ORDERLY_ACK_WAIT", "10s")
        .spawn();
    let status = second
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the node exits");
    assert!(!status.success());
    let logs = second.logs();
    assert!(
        logs.contains("consumer ORDERS/workers exists with a different configuration"),
        "{logs}"
    );
    assert!(logs.contains("ack_wait"), "{logs}");
}

/// A consumer an earlier Orderly created had a delivery limit, and the server stops delivering a
/// message after it, leaving it in the stream for nobody. A node started against such a consumer
/// removes the limit (nothing else differs), and the order the limit stranded runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_with_a_delivery_limit_is_upgraded_and_its_stranded_order_runs() {
    let server = NatsServer::start().await;
    let js = server.js().await;
    let (_stream, consumer) = orders_with_delivery_limit(&js, Duration::from_secs(1), 2).await;

    // Both deliveries go to a worker that dies with them: the limit strands the order.
    let id = uuid::Uuid::now_v7();
    publish_order(&js, id).await;
    take_unsettled(&consumer, 2, Duration::from_secs(5)).await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_ACK_WAIT", "1s")
        .env("ORDERLY_STEP_DURATION", "50ms")
        .env("ORDERLY_FAILURE_RATE", "0")
        .start()
        .await;
    let config = server_config(
        &server.client().await,
        "$JS.API.CONSUMER.INFO.ORDERS.workers",
    )
    .await;
    assert_eq!(config["max_deliver"], -1, "{config}");
    let kv = js.get_key_value("orders").await.expect("bucket");
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed", "{}", docs[0]);
    assert!(
        node.logs().contains("had a delivery limit"),
        "{}",
        node.logs()
    );
}

/// `nats consumer edit ORDERS workers --max-deliver 5` while nodes run: a limit would strand orders
/// again, so the node takes no work and says why until the consumer is put right.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_edited_into_something_the_node_cannot_work_with_makes_it_not_ready() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let js = server.js().await;
    let stream = js.get_stream("ORDERS").await.expect("stream");
    let readyz = |node: &Node| {
        let url = format!("{}/readyz", node.http);
        async move {
            let response = reqwest::get(url).await.expect("readyz answers");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    };
    let edit = |max_deliver: i64| {
        let stream = stream.clone();
        async move {
            use async_nats::jetstream::consumer::{pull, FromConsumer, PullConsumer};
            let consumer: PullConsumer = stream.get_consumer("workers").await.expect("consumer");
            let mut config =
                pull::Config::try_from_consumer_config(consumer.cached_info().config.clone())
                    .expect("a pull consumer");
            config.max_deliver = max_deliver;
            stream
                .update_consumer(config)
                .await
                .expect("edit the consumer");
        }
    };
    edit(5).await;
    let body = wait_until(
        "the node to report not ready",
        Duration::from_secs(10),
        || async {
            let (status, body) = readyz(&node).await;
            (status == 503).then_some(body)
        },
    )
    .await;
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("max_deliver is 5"), "{body}");
    edit(-1).await;
    wait_until(
        "the node to be ready again",
        Duration::from_secs(10),
        || async { (readyz(&node).await.0 == 200).then_some(()) },
    )
    .await;
}

/// `nats stream edit KV_orders --max-age=30d`: an operator bounds how long finished orders are kept,
/// and nodes started afterwards keep that setting and work with it.
#[tokio::test(flavor = "multi_thread")]
async fn an_operators_retention_on_the_orders_bucket_is_kept() {
    let server = NatsServer::start().await;
    let mut first = Node::builder(&server.url).start().await;
    first.signal("TERM");
    first
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits");

    let js = server.js().await;
    let thirty_days = Duration::from_secs(30 * 24 * 3600);
    let mut config = js
        .get_stream("KV_orders")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_age = thirty_days;
    js.update_stream(config)
        .await
        .expect("the stream update is accepted");

    let node = Node::builder(&server.url).start().await;
    let id = submit(&reqwest::Client::new(), &node, json!({ "customer": "ada" })).await;
    let kv = js.get_key_value("orders").await.unwrap();
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed");
    let mut stream = js.get_stream("KV_orders").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.max_age, thirty_days);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_settings_stop_the_node_naming_the_setting() {
    for (key, value, says) in [
        ("ORDERLY_STEP_DURATION", "fast", "--step-duration"),
        ("ORDERLY_FAILURE_RATE", "Shipping=0.5", "--failure-rate"),
        ("ORDERLY_WORKERS", "0", "--workers"),
        ("ORDERLY_HTTP_ADDR", "localhost", "--http-addr"),
    ] {
        let mut node = Node::builder("nats://127.0.0.1:1").env(key, value).spawn();
        let status = node
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("the node exits at once");
        assert_eq!(status.code(), Some(2), "{key}={value}");
        let logs = node.logs();
        assert!(
            logs.contains(says) && logs.contains(key),
            "{key}={value}: {logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_nats_url_the_node_runs_its_own_nats_server() {
    let nats_port = free_port();
    let mut node = embedded(nats_port).spawn();
    node.wait_ready().await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "dave" })).await;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await.unwrap());
    let kv = js.get_key_value("orders").await.unwrap();
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed");

    node.signal("TERM");
    let status = node
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the node exits on SIGTERM");
    assert!(status.success(), "{}", node.logs());
    wait_port_closed(nats_port, "the embedded server to stop with the node").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_nats_url_the_node_uses_a_server_already_listening() {
    let server = NatsServer::start().await;
    let node = embedded(server.port).start().await;
    assert!(
        node.logs()
            .contains("using the nats-server already listening"),
        "{}",
        node.logs()
    );
    let js = server.js().await;
    js.get_stream("ORDERS")
        .await
        .expect("the node set up the existing server");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_server_dies_with_a_killed_node() {
    let nats_port = free_port();
    let mut node = embedded(nats_port).spawn();
    node.wait_ready().await;
    node.signal("KILL");
    node.wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    wait_port_closed(nats_port, "the embedded server to die with the node").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_nats_server_binary_says_how_to_install_one() {
    let mut node = embedded(free_port())
        .env("ORDERLY_NATS_SERVER", "/nonexistent/nats-server")
        .spawn();
    let status = node
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the node exits");
    assert!(!status.success());
    let logs = node.logs();
    assert!(logs.contains("bash scripts/run"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_orders_back_and_another_node_finishes_them() {
    let (mut first, scenario) = DrainScenario::start(10).await;
    first.signal("TERM");
    scenario
        .exits_and_another_node_finishes(&mut first, "")
        .await;
}

/// A node with `n` orders running (1 s steps, 5 s grace), for the ways of draining it.
struct DrainScenario {
    server: NatsServer,
    kv: async_nats::jetstream::kv::Store,
    ids: Vec<uuid::Uuid>,
}

impl DrainScenario {
    async fn start(n: usize) -> (Node, DrainScenario) {
        let server = NatsServer::start().await;
        let first = Node::builder(&server.url)
            .env("ORDERLY_STEP_DURATION", "1s")
            .env("ORDERLY_SHUTDOWN_GRACE", "5s")
            .start()
            .await;
        let http = reqwest::Client::new();
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(submit(&http, &first, json!({ "n": i })).await);
        }
        let kv = server.js().await.get_key_value("orders").await.unwrap();
        wait_until("every order to be running", Duration::from_secs(10), || {
            let (kv, ids) = (&kv, &ids);
            async move {
                for id in ids {
                    if document(kv, *id).await?["state"] != "Running" {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        (first, DrainScenario { server, kv, ids })
    }

    /// The draining node exits within its grace period with status 0, having handed every order
    /// back (and logged `logged`), and a second node finishes them all.
    async fn exits_and_another_node_finishes(&self, first: &mut Node, logged: &str) {
        let status = first
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("exits within the grace period");
        assert!(status.success(), "{}", first.logs());
        let logs = first.logs();
        assert!(logs.contains(logged), "{logs}");
        assert!(logs.contains("handing the order back"), "{logs}");
        for id in &self.ids {
            let doc = document(&self.kv, *id).await.unwrap();
            assert!(doc["owner"].is_null(), "released: {doc}");
        }
        let second = Node::builder(&self.server.url).start().await;
        let docs = wait_all_terminal(&self.kv, &self.ids, Duration::from_secs(30)).await;
        for doc in &docs {
            assert_eq!(doc["state"], "Completed");
            check_terminal_document(doc);
            let continued = doc["steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["node"] == second.id.as_str());
            assert!(continued, "the second node continued it: {doc}");
        }
    }
}

/// An in-progress ack that no consumer takes is not confirmed. With the consumer gone (or, on a
/// cluster, between two consumer leaders) the server answers the ack with a "no responders" status,
/// which async-nats's own `double_ack_with` takes for the consumer's answer: a lease renewed by it
/// would outlive the server's window. Orderly's `confirm` reports it as an error.
#[tokio::test(flavor = "multi_thread")]
async fn an_ack_no_consumer_takes_is_not_confirmed() {
    use async_nats::jetstream::AckKind;
    use futures::StreamExt;
    use orderly::engine::lease::confirm;
    let server = NatsServer::start().await;
    let js = server.js().await;
    let layout = orderly::queue::setup::Layout {
        replicas: 1,
        ack_wait: Duration::from_secs(30),
    };
    let setup = orderly::queue::setup::setup(&js, layout)
        .await
        .expect("JetStream set up");
    publish_order(&js, uuid::Uuid::now_v7()).await;
    let mut batch = setup
        .consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    let message = batch.next().await.expect("a delivery").expect("a message");
    confirm(&message, AckKind::Progress)
        .await
        .expect("the consumer answers an in-progress ack");

    js.delete_consumer_from_stream(orderly::queue::setup::CONSUMER, "ORDERS")
        .await
        .expect("the consumer is deleted");
    message
        .double_ack_with(AckKind::Progress)
        .await
        .expect("async-nats takes the no-responders status for an answer (the defect)");
    let err = confirm(&message, AckKind::Progress)
        .await
        .expect_err("no consumer took the ack");
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{err}"
    );
}

/// Sends a request to the node's HTTP API and returns the status, the JSON body (null if there is
/// none) and how long the answer took.
async fn timed(request: reqwest::RequestBuilder) -> (u16, Value, Duration) {
    let started = std::time::Instant::now();
    let response = request.send().await.expect("the node answers");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, started.elapsed())
}

/// Asserts a 503 with the JSON error body of an unavailable service, within the 2 s a user waits.
fn assert_unavailable_in_time(what: &str, (status, body, took): (u16, Value, Duration)) {
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(body["code"], "unavailable", "{what}: {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
    assert!(
        took < Duration::from_secs(2),
        "{what} answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_and_submissions_answer_503_within_2s_while_nats_is_away() {
    let mut server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    let order = format!("{}/orders/{id}", node.http);
    let cluster = format!("{}/diagnostic/cluster", node.http);
    let (status, body, _) = timed(http.get(&order)).await;
    assert_eq!(status, 200, "GET {order}: {body}");

    // A stopped server keeps its connections open: the node cannot tell it is away.
    server.signal("STOP");
    assert_unavailable_in_time(
        "GET /orders/{id}, server stopped",
        timed(http.get(&order)).await,
    );
    assert_unavailable_in_time(
        "GET /diagnostic/cluster, server stopped",
        timed(http.get(&cluster)).await,
    );
    server.signal("CONT");
    wait_until(
        "the node to read the order again",
        Duration::from_secs(20),
        || async { (timed(http.get(&order)).await.0 == 200).then_some(()) },
    )
    .await;

    // A killed server closes them: the node knows, and says so at once.
    server.kill();
    assert_unavailable_in_time(
        "GET /orders/{id}, server killed",
        timed(http.get(&order)).await,
    );
    assert_unavailable_in_time(
        "GET /diagnostic/cluster, server killed",
        timed(http.get(&cluster)).await,
    );
    wait_until(
        "the node to see its connections lost",
        Duration::from_secs(10),
        || async {
            let scrape = node.metrics().await;
            (metric_sum(&scrape, "orderly_nats_connected") == 0.0).then_some(())
        },
    )
    .await;
    let post = http
        .post(format!("{}/orders", node.http))
        .json(&json!({ "customer": "bob" }));
    assert_unavailable_in_time("POST /orders, server killed", timed(post).await);
}

/// The `orders.get` endpoint's error count in the service statistics (`nats micro stats orders`).
async fn get_errors(client: &async_nats::Client) -> (u64, Value) {
    let reply = client
        .request("$SRV.STATS.orders", "".into())
        .await
        .expect("the service answers $SRV.STATS");
    let stats: Value = serde_json::from_slice(&reply.payload).expect("JSON statistics");
    let get = stats["endpoints"]
        .as_array()
        .expect("endpoints[]")
        .iter()
        .find(|e| e["subject"] == "orders.get")
        .unwrap_or_else(|| panic!("an orders.get endpoint in {stats}"))
        .clone();
    (get["num_errors"].as_u64().expect("num_errors"), get)
}

#[tokio::test(flavor = "multi_thread")]
async fn service_error_replies_are_counted_and_keep_their_json_body() {
    let server = NatsServer::start().await;
    let _node = Node::builder(&server.url).start().await;
    let client = server.client().await;
    // The service registers on its own connection, next to the HTTP API that answers /readyz.
    wait_until(
        "the orders service answers",
        Duration::from_secs(10),
        || async {
            client
                .request("$SRV.STATS.orders", "".into())
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let (before, _) = get_errors(&client).await;
    let missing = uuid::Uuid::now_v7();
    for (request, status, code) in [
        ("not-an-id".to_owned(), "400", "bad_request"),
        (missing.to_string(), "404", "not_found"),
    ] {
        let reply = client
            .request("orders.get", request.clone().into())
            .await
            .expect("orders.get answers");
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.to_string())
        };
        assert_eq!(
            header("Nats-Service-Error-Code").as_deref(),
            Some(status),
            "orders.get {request}"
        );
        assert!(header("Nats-Service-Error").is_some_and(|e| !e.is_empty()));
        let body: Value = serde_json::from_slice(&reply.payload).expect("a JSON error body");
        assert_eq!(body["code"], code, "orders.get {request}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let (after, endpoint) = get_errors(&client).await;
    assert_eq!(after, before + 2, "two error replies counted: {endpoint}");
    assert!(
        endpoint["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("404:")),
        "the last error is the 404: {endpoint}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_names_the_node_and_a_reconnect_is_logged_once() {
    let mut server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_LOG_FORMAT", "json")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "customer": "ada" })).await;
    let kv = server
        .js()
        .await
        .get_key_value("orders")
        .await
        .expect("orders bucket");
    wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;

    server.restart().await;
    let message = |line: &Value| line["fields"]["message"].as_str().unwrap_or("").to_owned();
    let lines = || -> Vec<Value> {
        node.logs()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("a JSON line ({e}): {line}"))
            })
            .collect()
    };
    wait_until(
        "the node's three connections to reconnect",
        Duration::from_secs(20),
        || async {
            let reconnected = lines()
                .iter()
                .filter(|l| message(l) == "reconnected to NATS")
                .count();
            (reconnected >= 3).then_some(())
        },
    )
    .await;
    let lines = lines();
    for line in &lines {
        assert_eq!(
            line["node_id"],
            node.id.as_str(),
            "a line without the node id: {line}"
        );
    }
    for event in [
        "connected to NATS",
        "disconnected from NATS; reconnecting",
        "reconnected to NATS",
    ] {
        for connection in ["work", "fetch", "public"] {
            let count = lines
                .iter()
                .filter(|l| message(l) == event && l["fields"]["connection"] == connection)
                .count();
            assert_eq!(count, 1, "{event:?} on the {connection} connection");
        }
    }
    let client_events: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("async_nats"))
        })
        .filter(|l| message(l).starts_with("event:") || message(l) == "connected successfully")
        .collect();
    assert!(
        client_events.is_empty(),
        "logged again by the client: {client_events:?}"
    );
}

/// `POST /admin/drain`, for operators who cannot send signals, drains the node as SIGTERM does.
#[tokio::test(flavor = "multi_thread")]
async fn post_admin_drain_hands_orders_back_and_another_node_finishes_them() {
    let (mut first, scenario) = DrainScenario::start(5).await;
    let http = reqwest::Client::new();
    let drain = format!("{}/admin/drain", first.http);
    let response = http.post(&drain).send().await.expect("the node answers");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("a JSON reply");
    assert_eq!(body, json!({ "status": "draining" }));
    scenario
        .exits_and_another_node_finishes(&mut first, "drain requested over HTTP")
        .await;
}
