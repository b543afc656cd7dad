//! Listing orders, `GET /orders` and `orders.list`, against a real nats-server and real nodes: filters
//! by state, paging through every page, the errors, and the listing after a node was killed mid-run.

mod common;

use common::scenario::*;
use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// Every state a document of today shows.
const STATES: [&str; 5] = ["Queued", "Running", "RollingBack", "Completed", "Failed"];

/// `GET /orders` with `query`, answering the status and the JSON body.
async fn list(http: &reqwest::Client, node: &Node, query: &str) -> (u16, Value) {
    let response = http
        .get(format!("{}/orders?{query}", node.http))
        .send()
        .await
        .expect("GET /orders answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// Every page of `query` with pages of `limit`, in the order they came.
async fn all_pages(http: &reqwest::Client, node: &Node, query: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut full = format!("{query}&limit={limit}");
        if let Some(cursor) = &cursor {
            full.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = list(http, node, &full).await;
        assert_eq!(status, 200, "{page}");
        let orders = page["orders"].as_array().expect("orders[]").clone();
        assert!(orders.len() <= limit, "a page holds at most its limit");
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(orders.len(), limit, "a page with a next page is full");
                cursor = Some(next.to_owned());
            }
            None => {
                items.extend(orders);
                return items;
            }
        }
        items.extend(orders);
    }
}

fn ids_of(items: &[Value]) -> Vec<Uuid> {
    items
        .iter()
        .map(|item| {
            item["order_id"]
                .as_str()
                .expect("order_id")
                .parse()
                .expect("a UUID")
        })
        .collect()
}

/// The state of every order's document, by order.
async fn states(kv: &async_nats::jetstream::kv::Store, ids: &[Uuid]) -> HashMap<Uuid, String> {
    let mut states = HashMap::new();
    for id in ids {
        let doc = document(kv, *id).await.expect("every order has a document");
        states.insert(*id, doc["state"].as_str().expect("state").to_owned());
    }
    states
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_filter_by_state_and_hold_every_order_once_newest_first() {
    let server = NatsServer::start().await;
    // One worker: orders end one after the other, in the order they were submitted.
    let node = Node::builder(&server.url)
        .env("ORDERLY_WORKERS", 1)
        .env("ORDERLY_STEP_DURATION", "10ms")
        .env("ORDERLY_FAILURE_RATE", "0.3")
        .env("ORDERLY_SEED", 7)
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..23 {
        ids.push(submit(&http, &node, json!({ "n": n })).await);
    }
    let kv = orders_bucket(&server.js().await).await;
    wait_all_terminal(&kv, &ids, Duration::from_secs(60)).await;
    let truth = states(&kv, &ids).await;
    let completed: HashSet<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| truth[id] == "Completed")
        .collect();
    let failed: HashSet<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| truth[id] == "Failed")
        .collect();
    assert!(!completed.is_empty() && !failed.is_empty(), "{truth:?}");
    // Each write that reached a new state cleared the order's older entries: one entry per order.
    let js = server.js().await;
    wait_until(
        "one index entry per order",
        Duration::from_secs(10),
        || async { (index_messages(&js).await == ids.len() as u64).then_some(()) },
    )
    .await;

    // Every order, in pages of 4: each once, the last one to end first.
    let items = all_pages(&http, &node, "", 4).await;
    let listed = ids_of(&items);
    let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();
    assert_eq!(listed, newest_first);
    for item in &items {
        let id: Uuid = item["order_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(item["state"], truth[&id].as_str());
        assert_eq!(item["current_step"], truth[&id].as_str());
        assert!(time(&item["complete_time"]) >= time(&item["start_time"]));
    }
    let ends: Vec<_> = items.iter().map(|i| time(&i["complete_time"])).collect();
    assert!(
        ends.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {ends:?}"
    );

    // One state, in pages of 3; two states, repeated or separated by a comma.
    let only_failed: HashSet<Uuid> = ids_of(&all_pages(&http, &node, "state=Failed", 3).await)
        .into_iter()
        .collect();
    assert_eq!(only_failed, failed);
    let only_completed = ids_of(&all_pages(&http, &node, "state=Completed", 5).await);
    assert_eq!(only_completed.len(), completed.len(), "each once");
    assert_eq!(
        only_completed.into_iter().collect::<HashSet<_>>(),
        completed
    );
    for query in ["state=Completed&state=Failed", "state=Failed,Completed"] {
        assert_eq!(
            ids_of(&all_pages(&http, &node, query, 7).await),
            newest_first
        );
    }
    for state in ["Queued", "Running", "RollingBack"] {
        let (status, page) = list(&http, &node, &format!("state={state}")).await;
        assert_eq!(status, 200);
        assert_eq!(
            page,
            json!({ "orders": [], "next_cursor": null }),
            "{state}"
        );
    }

    // `nats req orders.list '{"state":["Failed"],"limit":2}'` answers what HTTP answers.
    let client = server.client().await;
    let reply = client
        .request("orders.list", r#"{"state":["Failed"],"limit":2}"#.into())
        .await
        .expect("orders.list answers");
    let over_nats: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    let (_, over_http) = list(&http, &node, "state=Failed&limit=2").await;
    assert_eq!(over_nats, over_http);
    // An empty request lists the 50 newest orders of any state.
    let reply = client.request("orders.list", "".into()).await.unwrap();
    let everything: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        ids_of(everything["orders"].as_array().unwrap()),
        newest_first
    );
    assert_eq!(everything["next_cursor"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_listing_requests_are_refused_with_400_over_http_and_nats() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    for (query, says) in [
        ("state=Done", "expected one of"),
        ("state=Completed,done", "done"),
        ("limit=0", "limit must be 1 to 500"),
        ("limit=501", "limit must be 1 to 500"),
        ("limit=many", "limit"),
        ("cursor=xyz", "cursor"),
        ("sort=asc", "unknown parameter"),
    ] {
        let (status, body) = list(&http, &node, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], "bad_request", "{query}");
        let error = body["error"].as_str().expect("error");
        assert!(error.contains(says), "{query}: {error}");
    }
    let (_, body) = list(&http, &node, "state=Done").await;
    for state in STATES {
        assert!(body["error"].as_str().unwrap().contains(state), "{body}");
    }

    let client = server.client().await;
    for request in [
        r#"{"state":["Done"]}"#,
        r#"{"limit":600}"#,
        r#"{"cursor":"xyz"}"#,
        "not json",
    ] {
        let reply = client
            .request("orders.list", request.to_owned().into())
            .await
            .expect("orders.list answers");
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
            Some("400"),
            "{request}"
        );
        let body: Value = serde_json::from_slice(&reply.payload).expect("a JSON body");
        assert_eq!(body["code"], "bad_request", "{request}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_node_is_killed_mid_run_every_order_is_listed_under_its_state() {
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let mut a = audits.node(&server.url, "list-a").start().await;
    let b = audits.node(&server.url, "list-b").start().await;
    let js = server.js().await;
    let ids = publish_orders(&js, 200).await;

    wait_busy(&a, 20.0).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5))
        .await
        .expect("killed node exits");
    let kv = orders_bucket(&js).await;
    wait_all_terminal(&kv, &ids, Duration::from_secs(90)).await;
    let truth = states(&kv, &ids).await;

    // Every order once, under the state its document shows.
    let http = reqwest::Client::new();
    let items = all_pages(&http, &b, "", 17).await;
    let listed = ids_of(&items);
    assert_eq!(listed.len(), ids.len(), "each order once");
    assert_eq!(
        listed.iter().copied().collect::<HashSet<_>>(),
        ids.iter().copied().collect::<HashSet<_>>()
    );
    for item in &items {
        let id: Uuid = item["order_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(item["state"], truth[&id].as_str(), "{id}");
    }
    // And by state: each order under its own state only.
    let mut seen = HashSet::new();
    for state in STATES {
        let under = ids_of(&all_pages(&http, &b, &format!("state={state}"), 13).await);
        for id in under {
            assert_eq!(truth[&id], state, "{id} listed under {state}");
            assert!(seen.insert(id), "{id} listed twice");
        }
    }
    assert_eq!(seen.len(), ids.len());
}

/// Publishes the index entry a writer publishes before writing `doc` into `state` over revision
/// `base`, as one that died before its document write (or before removing a refused one) leaves it.
async fn leave_entry(js: &async_nats::jetstream::Context, doc: &Value, state: &str, base: u64) {
    let id = doc["order_id"].as_str().expect("order_id");
    let entry = json!({
        "order_id": id,
        "state": state,
        "current_step": doc["current_step"],
        "start_time": doc["start_time"],
        "complete_time": doc["complete_time"],
        "base": base,
    });
    js.publish(
        format!("orders.index.{id}.{state}"),
        entry.to_string().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("the index stores the entry");
}

/// Entries stored in the index.
async fn index_messages(js: &async_nats::jetstream::Context) -> u64 {
    let stream = js.get_stream("ORDERS_INDEX").await.expect("the index");
    stream.get_info().await.expect("stream info").state.messages
}

/// Entries stored on `subject` in the index.
async fn entries_on(js: &async_nats::jetstream::Context, subject: &str) -> u64 {
    let stream = js.get_stream("ORDERS_INDEX").await.expect("the index");
    let info = stream
        .info_with_subjects(subject)
        .await
        .expect("stream info");
    let mut total = 0;
    let mut subjects = info;
    use futures::TryStreamExt;
    while let Some((_, count)) = subjects.try_next().await.expect("subjects") {
        total += count as u64;
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_left_by_writers_that_died_neither_hide_nor_repeat_an_order() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(submit(&http, &node, json!({ "n": n })).await);
    }
    let js = server.js().await;
    let kv = orders_bucket(&js).await;
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;
    let revision = |id: Uuid| {
        let kv = kv.clone();
        async move { kv.entry(id.to_string()).await.unwrap().unwrap().revision }
    };
    // A writer died between its entry and its document write, over the current revision: its
    // write might still land, so the entry is neither listed nor removed.
    let in_flight = ids[0];
    leave_entry(&js, &docs[0], "Running", revision(in_flight).await).await;
    // A refused writer died before removing its entry, in the state the order is in: the order is
    // listed once, at the newer entry.
    let repeated = ids[1];
    leave_entry(&js, &docs[1], "Completed", revision(repeated).await - 1).await;
    // An intake whose create was refused left a Queued entry: it is passed over and removed.
    let refused = ids[2];
    leave_entry(&js, &docs[2], "Queued", 0).await;

    let items = all_pages(&http, &node, "", 2).await;
    let listed = ids_of(&items);
    assert_eq!(listed.len(), ids.len(), "each once: {listed:?}");
    assert_eq!(listed[0], repeated, "listed at its newest entry");
    assert!(items.iter().all(|i| i["state"] == "Completed"));
    for state in ["Running", "Queued"] {
        let (_, page) = list(&http, &node, &format!("state={state}")).await;
        assert_eq!(page["orders"], json!([]), "{state}");
    }
    wait_until(
        "the refused create's entry to be removed",
        Duration::from_secs(10),
        || async {
            (entries_on(&js, &format!("orders.index.{refused}.Queued")).await == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        entries_on(&js, &format!("orders.index.{in_flight}.Running")).await,
        1,
        "an entry whose write may still land stays"
    );
}

/// The time of one page of 50 with 100 000 orders stored (`ORDERLY_BENCH_ORDERS` changes the count),
/// as a user of `GET /orders` sees it. The orders are written as nodes write them, through the store:
/// each created `Queued`, then ended `Completed` (or `Failed`, one in twenty), so the index holds one
/// entry per order with the gaps the purges leave. Reports figures and asserts nothing about speed:
///
/// ```text
/// cargo test --release --test list -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with --ignored"]
async fn a_page_of_fifty_with_100_000_orders_stored() {
    use futures::StreamExt;
    use orderly::domain::order::{Interface, Order};
    let orders: usize = std::env::var("ORDERLY_BENCH_ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_LOG", "warn")
        .start()
        .await;
    let js = server.js().await;
    let kv = orders_bucket(&js).await;
    let store = orderly::store::OrderStore::new(
        kv,
        orderly::index::OrderIndex::new(js.clone()),
        orderly::ops::audit::Audit::off(),
    );
    let started = std::time::Instant::now();
    let written = futures::stream::iter(0..orders)
        .map(|n| {
            let store = store.clone();
            async move {
                let payload = serde_json::value::RawValue::from_string(format!("{{\"n\":{n}}}"))
                    .expect("a JSON object");
                let now = chrono::Utc::now();
                let queued = Order::queued(Uuid::now_v7(), payload, Interface::Http, now);
                let created = store.create(&queued).await.expect("create");
                let ended = if n % 20 == 0 { "Failed" } else { "Completed" };
                let mut doc = serde_json::to_value(&queued).expect("a document");
                doc["state"] = json!(ended);
                doc["current_step"] = json!(ended);
                doc["complete_time"] = json!(now);
                let ended: Order = serde_json::from_value(doc).expect("an ended document");
                store
                    .update(&ended, created.revision)
                    .await
                    .expect("update");
            }
        })
        .buffer_unordered(256)
        .count()
        .await;
    println!(
        "stored {written} orders (create + end, index kept) in {:.1?}; the index holds {} entries",
        started.elapsed(),
        index_messages(&js).await
    );

    let http = reqwest::Client::new();
    // The purges run in the background: once they are done, the index holds one entry per order,
    // and paging through it all lists each order once.
    wait_until(
        "one index entry per order",
        Duration::from_secs(60),
        || async { (index_messages(&js).await == orders as u64).then_some(()) },
    )
    .await;
    let every = ids_of(&all_pages(&http, &node, "", 500).await);
    assert_eq!(every.len(), orders);
    assert_eq!(every.iter().collect::<HashSet<_>>().len(), orders);
    let first = list(&http, &node, "limit=50").await.1;
    // A page deep down: the 201st, or half-way down a smaller run.
    let skipped = (orders / 50 / 2).clamp(1, 200);
    let deep = {
        let mut cursor = first["next_cursor"].as_str().unwrap().to_owned();
        for _ in 1..skipped {
            let (_, page) = list(&http, &node, &format!("limit=50&cursor={cursor}")).await;
            cursor = page["next_cursor"].as_str().unwrap().to_owned();
        }
        cursor
    };
    for (what, query) in [
        ("newest 50, any state", "limit=50".to_owned()),
        (
            "newest 50 Completed (95 %)",
            "state=Completed&limit=50".to_owned(),
        ),
        ("newest 50 Failed (5 %)", "state=Failed&limit=50".to_owned()),
        ("Queued (none stored)", "state=Queued&limit=50".to_owned()),
        (
            &format!("page {} (after {} orders)", skipped + 1, skipped * 50),
            format!("limit=50&cursor={deep}"),
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let began = std::time::Instant::now();
            let (status, page) = list(&http, &node, &query).await;
            times.push(began.elapsed());
            assert_eq!(status, 200, "{page}");
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        println!(
            "{what}: p50 {:.2?}, p99 {:.2?} over {} pages",
            at(0.50),
            at(0.99),
            times.len()
        );
    }
}

/// A page of `GET /orders` at `cursor` (the first without one), with the time it took.
async fn page_at(
    http: &reqwest::Client,
    node: &Node,
    limit: usize,
    cursor: Option<&str>,
) -> (Value, Duration) {
    let mut query = format!("limit={limit}");
    if let Some(cursor) = cursor {
        query.push_str(&format!("&cursor={cursor}"));
    }
    let began = std::time::Instant::now();
    let (status, page) = list(http, node, &query).await;
    let took = began.elapsed();
    assert_eq!(status, 200, "{page}");
    (page, took)
}

#[tokio::test(flavor = "multi_thread")]
async fn index_entries_without_an_order_are_removed_and_never_stall_a_listing() {
    use futures::StreamExt;
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(submit(&http, &node, json!({ "n": n })).await);
    }
    let js = server.js().await;
    let kv = orders_bucket(&js).await;
    wait_all_terminal(&kv, &ids, Duration::from_secs(30)).await;
    wait_until(
        "one index entry per order",
        Duration::from_secs(10),
        || async { (index_messages(&js).await == ids.len() as u64).then_some(()) },
    )
    .await;
    // Two documents are removed (as an age limit on the bucket or an operator would).
    for gone in &ids[..2] {
        kv.delete(gone.to_string())
            .await
            .expect("the document is deleted");
    }
    let kept: HashSet<Uuid> = ids[2..].iter().copied().collect();
    // Entries anyone may publish on an open server, newer than every order: 19 000 that look like
    // entries of orders that do not exist, and 1 000 that are not entries at all.
    let fakes = 20_000;
    let published = futures::stream::iter(0..fakes)
        .map(|n| {
            let js = js.clone();
            async move {
                let id = Uuid::now_v7();
                let body = if n % 20 == 0 {
                    "not an entry".to_owned()
                } else {
                    json!({
                        "order_id": id,
                        "state": "Completed",
                        "current_step": "Completed",
                        "start_time": "2026-01-01T00:00:00Z",
                        "complete_time": "2026-01-01T00:00:01Z",
                        "base": 1,
                    })
                    .to_string()
                };
                js.publish(format!("orders.index.{id}.Completed"), body.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("the index stores the entry");
            }
        })
        .buffer_unordered(256)
        .count()
        .await;
    assert_eq!(published, fakes);
    assert_eq!(index_messages(&js).await, (ids.len() + fakes) as u64);

    // Within the grace an entry with no document may be a create in flight, and is left alone;
    // past it, the listings that meet such entries remove them.
    tokio::time::sleep(orderly::store::ENTRY_GRACE).await;
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    let mut slowest = Duration::ZERO;
    let began = std::time::Instant::now();
    loop {
        let (page, took) = page_at(&http, &node, 10, cursor.as_deref()).await;
        pages += 1;
        slowest = slowest.max(took);
        listed.extend(ids_of(page["orders"].as_array().expect("orders[]")));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages <= 100, "the listing goes on and on");
    }
    println!(
        "{fakes} entries without an order: {pages} pages of limit=10 in {:.2?}, the slowest {slowest:.2?}",
        began.elapsed()
    );
    assert_eq!(listed.iter().copied().collect::<HashSet<_>>(), kept);
    assert_eq!(listed.len(), kept.len(), "each once: {listed:?}");
    let most = fakes / orderly::store::EXAMINED_PER_PAGE + 2;
    assert!(pages <= most, "{pages} pages, at most {most}");

    // The entries with no order behind them are gone from the stream, and a page holds the orders.
    wait_until(
        "the entries without an order to be removed",
        Duration::from_secs(30),
        || async { (index_messages(&js).await == kept.len() as u64).then_some(()) },
    )
    .await;
    let (page, took) = page_at(&http, &node, 10, None).await;
    println!("then one page of limit=10 in {took:.2?}");
    let first: HashSet<Uuid> = ids_of(page["orders"].as_array().expect("orders[]"))
        .into_iter()
        .collect();
    assert_eq!(first, kept);
    assert_eq!(page["next_cursor"], Value::Null);
}
