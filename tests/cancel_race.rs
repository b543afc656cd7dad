//! Cancels at random moments against two node processes, one of them SIGTERMed and the other killed
//! with -9 during the run: every `200`/`202` answer ends `Cancelled`, every `409` ends `Completed` or
//! `Failed`, no step starts after an accepted cancel, and the lease audit finds no overlap (see
//! `common::audit`, which also checks each revision a cancel request wrote).

mod common;

use chrono::Utc;
use common::audit::Outside;
use common::scenario::*;
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use uuid::Uuid;

const ORDERS: usize = 300;
/// Orders asked to be cancelled twice at the same moment, through different nodes.
const TWICE_EVERY: usize = 10;

/// What one cancel request came to.
#[derive(Debug, Clone)]
struct Answer {
    order: Uuid,
    status: u16,
    state: Option<String>,
}

/// The HTTP addresses of the nodes that are up now.
type Live = Arc<Mutex<Vec<String>>>;

/// Asks for a cancel over HTTP, through one of the live nodes, or over NATS; tries another way when
/// the node it picked is gone.
async fn cancel(
    http: &reqwest::Client,
    nats: &async_nats::Client,
    live: &Live,
    order: Uuid,
    seed: u64,
) -> Answer {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..20 {
        if rng.random_bool(0.3) {
            let request = json!({ "order_id": order, "reason": "race" }).to_string();
            if let Ok(Ok(reply)) = tokio::time::timeout(
                Duration::from_secs(10),
                nats.request("orders.cancel", request.into()),
            )
            .await
            {
                let status = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .map_or(200, |code| code.as_str().parse().unwrap_or(0));
                let body: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
                // Over NATS a cancel under way and a cancel done are both a document.
                let status = match (status, body["state"].as_str()) {
                    (200, Some("Cancelling")) => 202,
                    (status, _) => status,
                };
                return Answer {
                    order,
                    status,
                    state: body["state"].as_str().map(str::to_owned),
                };
            }
            continue;
        }
        let nodes = live.lock().await.clone();
        let Some(node) = nodes.get(rng.random_range(0..nodes.len().max(1))) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sent = http
            .post(format!("{node}/orders/{order}/cancel"))
            .json(&json!({ "reason": "race" }))
            .send()
            .await;
        let Ok(response) = sent else {
            // The node is going or gone: ask another.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        return Answer {
            order,
            status,
            state: body["state"].as_str().map(str::to_owned),
        };
    }
    panic!("no node answered the cancel of {order}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_at_random_moments_get_answers_the_final_states_keep() {
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let node = |id: &str| {
        audits
            .node(&server.url, id)
            .env("ORDERLY_STEP_DURATION", "300ms")
            .env("ORDERLY_FAILURE_RATE", "0.1")
            .env("ORDERLY_SEED", "17")
    };
    let mut a = node("race-a").start().await;
    let mut b = node("race-b").start().await;
    let live: Live = Arc::new(Mutex::new(vec![a.http.clone(), b.http.clone()]));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let nats = server.client().await;

    // Orders come in over 3 s; each is cancelled at a random moment of its life (or before it).
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut ids = Vec::new();
    let mut cancels = Vec::new();
    let started = Instant::now();
    for i in 0..ORDERS {
        let at = Duration::from_millis((i * 3000 / ORDERS) as u64);
        tokio::time::sleep_until((started + at).into()).await;
        let target = if i % 2 == 0 { &a } else { &b };
        let id =
            match tokio::time::timeout(Duration::from_secs(10), try_submit(&http, &target.http, i))
                .await
            {
                Ok(Some(id)) => id,
                _ => continue,
            };
        ids.push(id);
        let twice = i % TWICE_EVERY == 0;
        for copy in 0..if twice { 2 } else { 1 } {
            let delay = Duration::from_millis(rng.random_range(0..2500));
            let seed = rng.random::<u64>() + copy;
            let (http, nats, live) = (http.clone(), nats.clone(), live.clone());
            cancels.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                cancel(&http, &nats, &live, id, seed).await
            }));
        }
    }

    // Meanwhile: node a is SIGTERMed and comes back; node b is killed with -9 and comes back.
    live.lock().await.retain(|n| *n != a.http);
    a.signal("TERM");
    a.wait_exit(Duration::from_secs(10))
        .await
        .expect("the SIGTERMed node exits");
    let a2 = node("race-a").start().await;
    live.lock().await.push(a2.http.clone());
    live.lock().await.retain(|n| *n != b.http);
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5))
        .await
        .expect("the killed node exits");
    let died = Utc::now();
    let b2 = node("race-b").start().await;
    live.lock().await.push(b2.http.clone());

    let mut answers = Vec::new();
    for cancel in cancels {
        answers.push(cancel.await.expect("the cancel task"));
    }
    let outside = Outside {
        died: [("race-b".to_owned(), vec![died])].into(),
        ..Outside::default()
    };
    let js = server.js().await;
    let report = settle_and_check(
        "cancel race",
        &js,
        &ids,
        &audits,
        &outside,
        Duration::from_secs(90),
    )
    .await;

    // Every answer agrees with the final state.
    let kv = orders_bucket(&js).await;
    let mut finals: BTreeMap<Uuid, String> = BTreeMap::new();
    for id in &ids {
        let doc = document(&kv, *id).await.expect("a document");
        finals.insert(*id, doc["state"].as_str().unwrap_or_default().to_owned());
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        let last = &finals[&answer.order];
        let kind = format!(
            "{} {}",
            answer.status,
            answer.state.as_deref().unwrap_or("-")
        );
        *kinds.entry(kind).or_default() += 1;
        match answer.status {
            200 | 202 => assert_eq!(last, "Cancelled", "{answer:?} but the order ended {last}"),
            409 => {
                assert!(
                    matches!(last.as_str(), "Completed" | "Failed"),
                    "{answer:?} but the order ended {last}"
                );
                assert!(matches!(
                    answer.state.as_deref(),
                    Some("Completed" | "Failed" | "RollingBack")
                ));
            }
            // Unknown: the request may or may not have been recorded.
            503 => {}
            other => panic!("unexpected answer {other} to a cancel: {answer:?}"),
        }
    }
    // The index agrees: listing Cancelled orders, page by page, gives exactly the cancelled ones.
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/orders?state=Cancelled&limit=40", b2.http);
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page = get_json(&http, &url).await;
        for order in page["orders"].as_array().expect("orders[]") {
            listed.push(
                order["order_id"]
                    .as_str()
                    .expect("an id")
                    .parse::<Uuid>()
                    .expect("a UUID"),
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    listed.sort();
    let cancelled: Vec<Uuid> = finals
        .iter()
        .filter(|(_, state)| *state == "Cancelled")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        listed, cancelled,
        "the list of Cancelled orders is the cancelled orders"
    );
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for state in finals.values() {
        *states.entry(state.as_str()).or_default() += 1;
    }
    println!(
        "[cancel race] {} orders, {} cancels sent; answers: {kinds:?}; final states: {states:?}; cancel revisions {}, handovers {}",
        ids.len(),
        answers.len(),
        report.cancels_recorded,
        report.handovers.len()
    );
    assert!(
        ids.len() >= ORDERS * 9 / 10,
        "most submissions were accepted"
    );
    for wanted in ["Cancelled", "Completed"] {
        assert!(
            states.contains_key(wanted),
            "some orders ended {wanted}: {states:?}"
        );
    }
    assert!(
        answers.iter().any(|a| a.status == 409),
        "some cancels came too late: {kinds:?}"
    );
}

async fn try_submit(http: &reqwest::Client, node: &str, i: usize) -> Option<Uuid> {
    let response = http
        .post(format!("{node}/orders"))
        .json(&json!({ "n": i }))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["order_id"].as_str()?.parse().ok()
}
