//! The HTTP server's limits, against a real node: slow and idle connections are closed, idle
//! connections over the cap do not keep a health check out, every error hyper or axum answers itself
//! is the documented JSON, and every reply for one `Idempotency-Key` is the same.

mod common;

use common::{wait_until, NatsServer, Node};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads `stream` until the node closes it, failing after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    match read {
        Ok(Ok(_)) | Ok(Err(_)) => String::from_utf8_lossy(&received).into_owned(),
        Err(_) => panic!(
            "the node did not close the connection within {within:?}; received {:?}",
            String::from_utf8_lossy(&received)
        ),
    }
}

/// The status and JSON body of one raw HTTP/1.1 response.
fn parse_response(raw: &str) -> (u16, Value) {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "not JSON: {head}"
    );
    let body: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?} is not JSON: {e}"));
    assert!(body["error"].is_string(), "no error in {body}");
    assert!(body["code"].is_string(), "no code in {body}");
    (status, body)
}

async fn connect(node: &Node) -> TcpStream {
    let addr = node.http.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("the node accepts")
}

/// Sends `request` on a new connection and reads the answer until the node closes the connection.
async fn exchange(node: &Node, request: &[u8]) -> String {
    let mut stream = connect(node).await;
    stream
        .write_all(request)
        .await
        .expect("the request is sent");
    read_until_closed(&mut stream, Duration::from_secs(20)).await
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_HEADER_TIMEOUT", "1s")
        .env("ORDERLY_HTTP_IDLE_TIMEOUT", "2s")
        .start()
        .await;

    // Connected, and never a byte: closed after the idle timeout, with nothing to say.
    let mut silent = connect(&node).await;
    let said = read_until_closed(&mut silent, Duration::from_secs(20)).await;
    assert_eq!(said, "", "a silent connection is closed without an answer");

    // Half a request head: a 408 with the JSON body, then closed.
    let answer = exchange(&node, b"GET /healthz HTTP/1.1\r\nHost: node\r\n").await;
    let (status, body) = parse_response(&answer);
    assert_eq!(status, 408, "{answer}");
    assert_eq!(body["code"], "request_timeout");

    // A keep-alive connection that answered a request is closed once it sits idle.
    let mut kept = connect(&node).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        .await
        .expect("the request is sent");
    let answered = read_until_closed(&mut kept, Duration::from_secs(20)).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.contains("\"ok\""), "{answered}");

    let scrape = node.metrics().await;
    assert!(common::metric_sum(&scrape, "orderly_http_header_timeouts_total") >= 1.0);
}

#[tokio::test]
async fn idle_connections_over_the_cap_do_not_keep_health_checks_out() {
    let nats = NatsServer::start().await;
    let cap = 4;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", cap)
        .env("ORDERLY_HTTP_HEADER_TIMEOUT", "10m")
        .env("ORDERLY_HTTP_IDLE_TIMEOUT", "10m")
        .start()
        .await;
    // Twice the cap of idle connections and of half-sent heads, none of which will ever finish.
    let mut held = Vec::new();
    for i in 0..(2 * cap) {
        let mut stream = connect(&node).await;
        if i % 2 == 1 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                .await
                .expect("half a head is sent");
        }
        held.push(stream);
    }
    let http = reqwest::Client::new();
    let health = format!("{}/healthz", node.http);
    for _ in 0..cap {
        let response = wait_until("/healthz to answer", Duration::from_secs(10), || async {
            http.get(&health).send().await.ok()
        })
        .await;
        assert_eq!(response.status(), 200);
    }
    let scrape = node.metrics().await;
    assert!(
        common::metric_sum(&scrape, "orderly_http_connections_evicted_total") >= cap as f64,
        "idle connections were closed to make room"
    );
    drop(held);
}

#[tokio::test]
async fn errors_the_server_answers_itself_are_json() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_REQUEST_TIMEOUT", "1s")
        .start()
        .await;

    // A path that is not UTF-8 once decoded: axum's rejection.
    let answer = exchange(
        &node,
        b"GET /orders/%FF HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (status, body) = parse_response(&answer);
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));

    // A request line hyper cannot parse.
    let answer = exchange(&node, b"NOT A REQUEST\r\n\r\n").await;
    let (status, _) = parse_response(&answer);
    assert_eq!(status, 400, "{answer}");

    // Headers larger than hyper reads.
    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 512 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(&node, &huge).await;
    let (status, body) = parse_response(&answer);
    assert_eq!(
        (status, body["code"].as_str()),
        (431, Some("headers_too_large"))
    );

    // A URI longer than hyper takes.
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', 70 * 1024));
    long.extend_from_slice(b" HTTP/1.1\r\nHost: node\r\n\r\n");
    let answer = exchange(&node, &long).await;
    let (status, _) = parse_response(&answer);
    assert!(status == 414 || status == 431, "{answer}");

    // A body announced and never sent: the request timeout answers.
    let mut stream = connect(&node).await;
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
        .await
        .expect("half a body is sent");
    let mut received = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut received))
        .await
        .expect("the node answers a stalled body")
        .expect("the answer is readable");
    let answer = String::from_utf8_lossy(&received[..n]).into_owned();
    let (status, body) = parse_response(&answer);
    assert_eq!((status, body["code"].as_str()), (503, Some("timeout")));
}

#[tokio::test]
async fn every_reply_for_one_idempotency_key_is_the_same() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url).start().await;
    let http = reqwest::Client::new();
    let key = uuid::Uuid::new_v4().to_string();
    let replies = futures::future::join_all((0..50).map(|_| {
        let http = http.clone();
        let url = format!("{}/orders", node.http);
        let key = key.clone();
        async move {
            let response = http
                .post(url)
                .header("Idempotency-Key", key)
                .json(&serde_json::json!({ "customer": "ada" }))
                .send()
                .await
                .expect("POST /orders answers");
            let status = response.status().as_u16();
            (status, response.text().await.expect("a body"))
        }
    }))
    .await;
    let first = &replies[0];
    assert_eq!(first.0, 202, "{}", first.1);
    for reply in &replies {
        assert_eq!(reply, first, "every reply for key {key} is the same");
    }
    let body: Value = serde_json::from_str(&first.1).expect("JSON");
    assert_eq!(body["order_id"], key.as_str());
}

#[tokio::test]
async fn a_connection_over_a_cap_of_busy_ones_gets_503_json() {
    let nats = NatsServer::start().await;
    let cap = 2;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", cap)
        .env("ORDERLY_HTTP_REQUEST_TIMEOUT", "10m")
        .env("ORDERLY_STEP_DURATION", "10m")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    // Connections with a request that does not end: the watch of an order in progress (watches may
    // take half the cap), and a submission whose body never arrives (the `100 Continue` says the
    // node is reading it).
    let mut busy = vec![open_watch(&node, id).await];
    let mut stalled = connect(&node).await;
    stalled
        .write_all(b"POST /orders HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("the head is sent");
    let continued = read_head(&mut stalled).await;
    assert!(continued.starts_with("HTTP/1.1 100"), "{continued}");
    busy.push(stalled);
    let answer = exchange(
        &node,
        b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (status, body) = parse_response(&answer);
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("too_many_connections"))
    );
    // Once they end, the node answers again.
    drop(busy);
    let health = format!("{}/healthz", node.http);
    wait_until(
        "/healthz once the busy connections closed",
        Duration::from_secs(10),
        || async {
            let response = http.get(&health).send().await.ok()?;
            (response.status() == 200).then_some(())
        },
    )
    .await;
}

/// Asks for the watch of order `id` on a new keep-alive connection and reads the response head.
async fn open_watch(node: &Node, id: uuid::Uuid) -> TcpStream {
    let mut stream = connect(node).await;
    let request = format!("GET /orders/{id}/events HTTP/1.1\r\nHost: node\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the watch is asked for");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    stream
}

/// Reads a response head, byte by byte, so that nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut byte));
        read.await
            .expect("the node answers")
            .expect("the answer is readable");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads a chunked event stream up to its last chunk: the stream has ended and the connection is
/// kept alive.
async fn read_stream_end(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        while !seen.ends_with(b"\r\n0\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert_eq!(ended, Ok(true), "the stream did not end: {seen}");
    seen
}

#[tokio::test]
async fn a_connection_whose_watch_ended_is_an_ordinary_idle_connection_again() {
    let nats = NatsServer::start().await;
    let cap = 4;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", cap)
        .env("ORDERLY_HTTP_IDLE_TIMEOUT", "2s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    common::wait_completed(&http, &node, &[id], "the order").await;

    // The watch of a completed order: its snapshot, and the stream ends; the connection stays open
    // for another request, and is closed once it has sat idle for the idle timeout.
    let mut watched = open_watch(&node, id).await;
    let events = read_stream_end(&mut watched).await;
    assert!(events.contains("\"Completed\""), "{events}");
    let said = read_until_closed(&mut watched, Duration::from_secs(20)).await;
    assert_eq!(said, "", "an idle connection is closed without an answer");
}

#[tokio::test]
async fn connections_whose_watches_ended_make_room_at_the_cap() {
    let nats = NatsServer::start().await;
    let cap = 4;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", cap)
        .env("ORDERLY_HTTP_IDLE_TIMEOUT", "10m")
        .env("ORDERLY_HTTP_HEADER_TIMEOUT", "10m")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    common::wait_completed(&http, &node, &[id], "the order").await;
    // As many keep-alive connections as the cap, each of which carried a watch that has ended.
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut watched = open_watch(&node, id).await;
        read_stream_end(&mut watched).await;
        held.push(watched);
    }
    // As many health checks, each on a connection kept open: each takes the place of one of them.
    let mut checks = Vec::new();
    for _ in 0..cap {
        let mut check = connect(&node).await;
        check
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
            .await
            .expect("the health check is sent");
        let head = read_head(&mut check).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        checks.push(check);
    }
    for mut watched in held {
        read_until_closed(&mut watched, Duration::from_secs(10)).await;
    }
    let scrape = node.metrics().await;
    assert!(
        common::metric_sum(&scrape, "orderly_http_connections_evicted_total") >= cap as f64,
        "the connections of ended watches were closed to make room"
    );
}

#[tokio::test]
async fn watches_beyond_half_the_cap_are_refused_and_health_checks_still_answer() {
    let nats = NatsServer::start().await;
    let cap = 4;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", cap)
        .env("ORDERLY_STEP_DURATION", "10m")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    let mut watches = Vec::new();
    for _ in 0..cap / 2 {
        watches.push(open_watch(&node, id).await);
    }
    let request =
        format!("GET /orders/{id}/events HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n");
    let answer = exchange(&node, request.as_bytes()).await;
    let (status, body) = parse_response(&answer);
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("too_many_watches")),
        "{body}"
    );
    let health = format!("{}/healthz", node.http);
    for _ in 0..cap {
        let response = http
            .get(&health)
            .header("Connection", "close")
            .send()
            .await
            .expect("/healthz answers");
        assert_eq!(response.status(), 200);
    }
    let scrape = node.metrics().await;
    assert!(common::metric_sum(&scrape, "orderly_http_watches_refused_total") >= 1.0);
    // A watch that ends gives its place to the next.
    drop(watches.pop());
    wait_until(
        "a watch once another closed",
        Duration::from_secs(10),
        || async {
            let mut stream = connect(&node).await;
            stream.write_all(request.as_bytes()).await.ok()?;
            read_head(&mut stream)
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_watch_outlives_the_request_and_idle_timeouts() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_STEP_DURATION", "1500ms")
        .env("ORDERLY_HTTP_REQUEST_TIMEOUT", "1s")
        .env("ORDERLY_HTTP_IDLE_TIMEOUT", "1s")
        .env("ORDERLY_HTTP_HEADER_TIMEOUT", "1s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    let mut stream = connect(&node).await;
    let request = format!("GET /orders/{id}/events HTTP/1.1\r\nHost: node\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("the watch is asked for");
    // Four steps of 1.5 s: the stream is silent for longer than the idle timeout between events, and
    // the order completes well after the request timeout.
    let mut seen = Vec::new();
    let completed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"Completed\"") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await
    .expect("the watch goes on");
    assert!(
        completed,
        "the watch ended before the order completed: {}",
        String::from_utf8_lossy(&seen)
    );
}

#[tokio::test]
async fn a_client_that_sends_a_whole_oversized_head_before_reading_gets_the_431() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url).start().await;
    for size in [1, 4, 8] {
        let mut huge = b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', size * 1024 * 1024));
        huge.extend_from_slice(b"\r\n\r\n");
        let mut stream = connect(&node).await;
        let sent = stream.write_all(&huge).await;
        assert!(
            sent.is_ok(),
            "{size} MiB: the request could not be sent: {sent:?}"
        );
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut received))
            .await
            .expect("the node closes the connection");
        assert!(read.is_ok(), "{size} MiB: {read:?}");
        let answer = String::from_utf8_lossy(&received).into_owned();
        let (status, body) = parse_response(&answer);
        assert_eq!(
            (status, body["code"].as_str()),
            (431, Some("headers_too_large")),
            "{size} MiB"
        );
    }
}
