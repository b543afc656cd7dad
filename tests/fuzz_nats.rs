//! Hostile NATS input against a real node: thousands of random and malformed requests on every
//! service subject, and bad messages into the work stream (bad ids, extra tokens, mismatched
//! `Nats-Msg-Id`, payloads that are not JSON objects, 1 MiB payloads, malformed header blocks). Every
//! request is answered, every message ends (the stream empties), the node carries on, and orders
//! submitted meanwhile complete. `ORDERLY_FUZZ_SEED=<seed>` replays a run.

mod common;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::hostile::{status_block, RawClient, MALFORMED};
use common::{wait_until, NatsServer, Node};
use futures::StreamExt;
use rand::distr::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

const SERVICE_SUBJECTS: [&str; 5] = [
    "orders.create",
    "orders.get",
    "orders.list",
    "orders.cancel",
    "orders.retry",
];
const REQUESTS: usize = 3_000;
/// Just under the server's 1 MiB message limit, with room for headers.
const NEARLY_ONE_MIB: usize = 1024 * 1024 - 4 * 1024;

fn seed() -> u64 {
    std::env::var("ORDERLY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn word(rng: &mut StdRng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(rng.sample(Alphanumeric)))
        .collect()
}

/// A single subject token that is not an order id.
fn bad_id(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => {
            let len = rng.random_range(1..40);
            word(rng, len)
        }
        1 => Uuid::new_v4().to_string().to_uppercase(),
        2 => format!("{}x", Uuid::new_v4()),
        3 => Uuid::new_v4().simple().to_string()[..20].to_owned(),
        _ => "-".repeat(rng.random_range(1..10)),
    }
}

/// A random, mostly malformed, request body.
fn payload(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..12) {
        0 => (0..rng.random_range(0..512)).map(|_| rng.random()).collect(),
        1 => ["[1,2]", "1", "null", "\"x\"", "true", "", "{", "}"][rng.random_range(0..8)].into(),
        2 => bad_id(rng).into_bytes(),
        3 => Uuid::new_v4().to_string().into_bytes(),
        4 => serde_json::json!({ "order_id": rng.random::<u32>() })
            .to_string()
            .into_bytes(),
        5 => serde_json::json!({ "order_id": bad_id(rng), "reason": word(rng, 8) })
            .to_string()
            .into_bytes(),
        6 => serde_json::json!({ "state": [word(rng, 6)], "limit": rng.random_range(-5i64..100_000) })
            .to_string()
            .into_bytes(),
        7 => serde_json::json!({ "cursor": word(rng, 30) })
            .to_string()
            .into_bytes(),
        8 => {
            let depth = rng.random_range(100..20_000);
            format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        9 if rng.random_bool(0.1) => {
            let mut big = b"{\"a\":\"".to_vec();
            big.extend(std::iter::repeat_n(b'x', NEARLY_ONE_MIB));
            big.extend_from_slice(b"\"}");
            big
        }
        10 => serde_json::json!({ "customer": word(rng, 8) })
            .to_string()
            .into_bytes(),
        _ => {
            let mut bytes = serde_json::json!({ "k": word(rng, 16) })
                .to_string()
                .into_bytes();
            let at = rng.random_range(0..bytes.len());
            bytes[at] = 0xff;
            bytes
        }
    }
}

/// Headers a request may carry: a bad `Nats-Msg-Id` or `Idempotency-Key`, or none.
fn headers(rng: &mut StdRng) -> HeaderMap {
    let mut headers = HeaderMap::new();
    match rng.random_range(0..4) {
        0 => headers.insert("Nats-Msg-Id", bad_id(rng).as_str()),
        1 => headers.insert("Idempotency-Key", word(rng, 12).as_str()),
        _ => {}
    }
    headers
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    /// The service error headers, with the JSON error body.
    Error(u16),
    /// A JSON reply.
    Reply,
}

async fn ask(
    client: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Answer {
    let request = client.request_with_headers(subject.to_owned(), headers, Bytes::from(body));
    let message = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .unwrap_or_else(|_| panic!("no answer on {subject} within 30s"))
        .unwrap_or_else(|e| panic!("no answer on {subject}: {e}"));
    let json: Value = serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
        panic!(
            "{subject}: reply {:?} is not JSON: {e}",
            String::from_utf8_lossy(&message.payload[..message.payload.len().min(200)])
        )
    });
    let code = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
        .map(|v| v.as_str().parse::<u16>().expect("a numeric error code"));
    match code {
        Some(code) => {
            assert!(
                json["error"].is_string() && json["code"].is_string(),
                "{subject}: error {code} without the JSON error body: {json}"
            );
            Answer::Error(code)
        }
        None => Answer::Reply,
    }
}

/// Publishes bad work messages; returns how many the stream accepted (a repeated `Nats-Msg-Id` is
/// accepted as a duplicate and stored once), by kind, and how many the server refused.
async fn flood_stream(
    rng: &mut StdRng,
    server: &NatsServer,
) -> (BTreeMap<&'static str, usize>, usize) {
    let js = server.js().await;
    let mut stored: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refused = 0;
    for _ in 0..1_000 {
        let kind = rng.random_range(0..5);
        let (name, subject, headers, body): (&str, String, HeaderMap, Vec<u8>) = match kind {
            0 => (
                "bad id",
                format!("orders.submit.{}", bad_id(rng)),
                HeaderMap::new(),
                b"{}".to_vec(),
            ),
            1 => (
                "extra tokens",
                format!("orders.submit.{}.{}", Uuid::now_v7(), word(rng, 4)),
                HeaderMap::new(),
                b"{}".to_vec(),
            ),
            2 => {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", bad_id(rng).as_str());
                (
                    "mismatched Nats-Msg-Id",
                    format!("orders.submit.{}", Uuid::now_v7()),
                    headers,
                    b"{}".to_vec(),
                )
            }
            3 => {
                let body = ["[1]", "1", "null", "\"x\"", "", "{", "\u{0}"][rng.random_range(0..7)];
                (
                    "not an object",
                    format!("orders.submit.{}", Uuid::now_v7()),
                    HeaderMap::new(),
                    body.into(),
                )
            }
            _ => {
                let mut big = vec![b'x'; NEARLY_ONE_MIB];
                big[0] = b'[';
                (
                    "1 MiB",
                    format!("orders.submit.{}", Uuid::now_v7()),
                    HeaderMap::new(),
                    big,
                )
            }
        };
        let acked = match js
            .publish_with_headers(subject.clone(), headers, Bytes::from(body))
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            *stored.entry(name).or_default() += 1;
        } else {
            assert_eq!(name, "extra tokens", "the stream refused {subject}");
            refused += 1;
        }
    }
    // Header blocks async-nats would never send, on the raw protocol.
    let mut raw = RawClient::connect(&server.url)
        .await
        .expect("a raw connection");
    let mut blocks: Vec<Vec<u8>> = MALFORMED.iter().map(|b| b.to_vec()).collect();
    blocks.extend([100, 408, 409, 503].map(status_block));
    for block in &blocks {
        for _ in 0..5 {
            let subject = format!("orders.submit.{}", Uuid::now_v7());
            raw.hpub(&subject, block, b"{}")
                .await
                .expect("the server takes it");
            *stored.entry("malformed header block").or_default() += 1;
        }
    }
    (stored, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nats_input_is_answered_and_ended() {
    let seed = seed();
    println!("[fuzz nats] seed {seed} (ORDERLY_FUZZ_SEED={seed} replays this run)");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let client = server.client().await;
    let js = server.js().await;

    let requests: Vec<(&str, HeaderMap, Vec<u8>)> = (0..REQUESTS)
        .map(|_| {
            let subject = SERVICE_SUBJECTS[rng.random_range(0..SERVICE_SUBJECTS.len())];
            (subject, headers(&mut rng), payload(&mut rng))
        })
        .collect();
    let asked = futures::stream::iter(requests)
        .map(|(subject, headers, body)| {
            let client = client.clone();
            async move { (subject, ask(&client, subject, headers, body).await) }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>();
    let http = reqwest::Client::new();
    let healthy = async {
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(common::submit(&http, &node, serde_json::json!({ "n": i })).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    };
    let (answers, ids) = tokio::join!(asked, healthy);
    let (stored, refused) = flood_stream(&mut rng, &server).await;

    let mut counts: BTreeMap<(&str, Answer), usize> = BTreeMap::new();
    for (subject, answer) in &answers {
        *counts.entry((subject, *answer)).or_default() += 1;
    }
    for ((subject, answer), n) in &counts {
        println!("[fuzz nats] {subject}: {n} {answer:?}");
    }
    for (kind, n) in &stored {
        println!("[fuzz nats] work stream, {kind}: {n} accepted");
    }
    println!("[fuzz nats] work stream, extra tokens: {refused} refused by the server (no stream takes them)");

    // Every message ends: the work queue empties.
    wait_until(
        "the work stream to empty",
        Duration::from_secs(60),
        || async { (common::stream_messages(&js).await == Some(0)).then_some(()) },
    )
    .await;
    common::wait_completed(&http, &node, &ids, "an order submitted during the attack").await;
    // A message that can never be an order (bad id, not an object, too large) is terminated and
    // counted; the others (a foreign Nats-Msg-Id, a malformed header block) run as orders.
    let unrunnable: usize = ["bad id", "not an object", "1 MiB"]
        .iter()
        .filter_map(|kind| stored.get(kind))
        .sum();
    let scrape = wait_until(
        "every unrunnable message counted as terminated",
        Duration::from_secs(10),
        || async {
            let scrape = node.metrics().await;
            let terminated = common::metric_sum(&scrape, "orderly_messages_terminated_total");
            (terminated == unrunnable as f64).then_some(scrape)
        },
    )
    .await;
    println!(
        "[fuzz nats] {} requests, {} work messages accepted, {} terminated by the node",
        answers.len(),
        stored.values().sum::<usize>(),
        common::metric_sum(&scrape, "orderly_messages_terminated_total")
    );
    let response = http
        .get(format!("{}/healthz", node.http))
        .send()
        .await
        .expect("the node still answers");
    assert_eq!(response.status(), 200);
}
