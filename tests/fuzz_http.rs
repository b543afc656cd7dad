//! Hostile HTTP input against a real node: bodies at and around the size limit, bytes that are not
//! UTF-8, deep nesting, garbage request heads, oversized and slow headers, and thousands of idle
//! connections. Every answer is a documented status with the JSON error body, the node stays
//! reachable, and orders submitted meanwhile complete. The inputs come from a seeded generator:
//! `ORDERLY_FUZZ_SEED=<seed>` replays a run.

mod common;

use common::{wait_until, NatsServer, Node};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: usize = 64 * 1024;
/// Statuses the API documents for what this test sends.
const DOCUMENTED: [u16; 8] = [200, 202, 400, 404, 408, 413, 414, 431];

/// As many idle connections as fit in this process's open-files limit, up to 2 000.
fn idle_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives for the call.
    let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur as usize,
        _ => 1024,
    };
    soft.saturating_sub(256).clamp(16, 2_000)
}

fn seed() -> u64 {
    std::env::var("ORDERLY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// One hostile request, and the statuses it may be answered with.
struct Case {
    kind: &'static str,
    bytes: Vec<u8>,
    expected: &'static [u16],
    /// Sent a few bytes at a time, slower than the header timeout allows.
    slow: bool,
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /orders HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A JSON object of exactly `size` bytes (at least 8).
fn object_of(size: usize) -> Vec<u8> {
    let mut body = b"{\"a\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', size - 8));
    body.extend_from_slice(b"\"}");
    body
}

fn cases(rng: &mut StdRng) -> Vec<Case> {
    let mut cases = Vec::new();
    // Every size around the limit, then sizes anywhere from half of it to twice it.
    let mut sizes: Vec<usize> = (LIMIT - 4..=LIMIT + 4).collect();
    sizes.extend((0..40).map(|_| rng.random_range(LIMIT / 2..LIMIT * 2)));
    for size in sizes {
        let expected: &[u16] = if size <= LIMIT { &[202] } else { &[413] };
        cases.push(Case {
            kind: "size limit",
            bytes: post(&object_of(size)),
            expected,
            slow: false,
        });
    }
    for _ in 0..300 {
        let mut body = object_of(rng.random_range(16..4096));
        // Bytes that cannot appear in UTF-8, inside the string.
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(6..body.len() - 2);
            body[at] = [0xff, 0xfe, 0xc0, 0x80][rng.random_range(0..4)];
        }
        cases.push(Case {
            kind: "not UTF-8",
            bytes: post(&body),
            expected: &[400],
            slow: false,
        });
    }
    // The object itself is one level: 119 arrays inside it is the deepest allowed.
    for depth in [119, 120, 127, 200, 1_000, 10_000, 30_000] {
        let expected: &[u16] = if depth < 120 { &[202] } else { &[400] };
        let mut body = b"{\"a\":".to_vec();
        body.extend(std::iter::repeat_n(b'[', depth));
        body.extend(std::iter::repeat_n(b']', depth));
        body.push(b'}');
        cases.push(Case {
            kind: "deep nesting",
            bytes: post(&body),
            expected,
            slow: false,
        });
    }
    for _ in 0..500 {
        let mut head: Vec<u8> = (0..rng.random_range(1..2048))
            .map(|_| rng.random())
            .collect();
        head.extend_from_slice(b"\r\n\r\n");
        cases.push(Case {
            kind: "garbage head",
            bytes: head,
            // Random bytes may happen to form a request for a path that does not exist.
            expected: &[400, 404, 414, 431],
            slow: false,
        });
    }
    for _ in 0..20 {
        let size = rng.random_range(64 * 1024..1024 * 1024);
        let mut head =
            b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'h', size));
        head.extend_from_slice(b"\r\n\r\n");
        cases.push(Case {
            kind: "oversized header",
            bytes: head,
            expected: &[200, 431],
            slow: false,
        });
    }
    for _ in 0..5 {
        cases.push(Case {
            kind: "slow header",
            bytes: b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n".to_vec(),
            expected: &[408],
            slow: true,
        });
    }
    cases
}

/// Sends `case` and returns the status of the answer, after checking its body is the JSON error
/// when the status is one.
async fn send(addr: &str, case: &Case) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("the node accepts");
    if case.slow {
        for chunk in case.bytes.chunks(4) {
            // Stops when the node closes the connection.
            if stream.write_all(chunk).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    } else {
        // The node may answer and close before it read everything (413, 431).
        let _ = stream.write_all(&case.bytes).await;
    }
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "[{}] the node never closed the connection",
        case.kind
    );
    let text = String::from_utf8_lossy(&received).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        panic!("[{}] no HTTP answer: {text:?}", case.kind);
    };
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("[{}] no status in {head:?}", case.kind));
    assert!(
        DOCUMENTED.contains(&status) && case.expected.contains(&status),
        "[{}] answered {status}, expected one of {:?}: {text:.300}",
        case.kind,
        case.expected
    );
    let json: Value = serde_json::from_str(body).unwrap_or_else(|e| {
        panic!(
            "[{}] {status} body {body:.200?} is not JSON: {e}",
            case.kind
        )
    });
    if status >= 400 {
        assert!(
            json["error"].is_string() && json["code"].is_string(),
            "[{}] {status} without the error body: {json}",
            case.kind
        );
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_is_answered_and_the_node_carries_on() {
    let seed = seed();
    println!("[fuzz http] seed {seed} (ORDERLY_FUZZ_SEED={seed} replays this run)");
    let mut rng = StdRng::seed_from_u64(seed);
    let idle_count = idle_connections();
    let nats = NatsServer::start().await;
    // Fewer connections allowed than the idle ones held: the cap is reached, and must not shut out
    // anyone.
    let node = Node::builder(&nats.url)
        .env("ORDERLY_HTTP_HEADER_TIMEOUT", "2s")
        .env("ORDERLY_HTTP_MAX_CONNECTIONS", idle_count / 2)
        .start()
        .await;
    let addr = node.http.trim_start_matches("http://").to_owned();

    // Idle connections, more than the cap, held for the whole run.
    let mut idle = Vec::with_capacity(idle_count);
    for _ in 0..idle_count {
        idle.push(TcpStream::connect(&addr).await.expect("the node accepts"));
    }

    let cases = cases(&mut rng);
    let hostile = futures::stream::iter(cases.iter())
        .map(|case| {
            let addr = addr.clone();
            async move { (case.kind, send(&addr, case).await) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();

    // Meanwhile, well-behaved users submit orders and check health.
    let http = reqwest::Client::new();
    let healthy = async {
        let mut ids = Vec::new();
        for i in 0..20 {
            let health = format!("{}/healthz", node.http);
            let response = wait_until(
                "/healthz during the attack",
                Duration::from_secs(10),
                || {
                    let request = http.get(&health).send();
                    async move { request.await.ok() }
                },
            )
            .await;
            assert_eq!(response.status(), 200);
            ids.push(common::submit(&http, &node, serde_json::json!({ "n": i })).await);
        }
        ids
    };
    let (answers, ids) = tokio::join!(hostile, healthy);

    let mut counts: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for (kind, status) in &answers {
        *counts.entry((kind, *status)).or_default() += 1;
    }
    for ((kind, status), n) in &counts {
        println!("[fuzz http] {kind}: {n} answered {status}");
    }
    println!(
        "[fuzz http] {} hostile requests, {idle_count} idle connections, {} orders meanwhile",
        answers.len(),
        ids.len()
    );
    common::wait_completed(&http, &node, &ids, "an order submitted during the attack").await;
    let scrape = node.metrics().await;
    println!(
        "[fuzz http] {} idle connections closed to make room, {} header timeouts",
        common::metric_sum(&scrape, "orderly_http_connections_evicted_total"),
        common::metric_sum(&scrape, "orderly_http_header_timeouts_total")
    );
    drop(idle);
}
