//! Benchmarks, run on demand (they report figures and assert nothing about speed):
//!
//! ```text
//! cargo test --release --test bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `ORDERLY_BENCH_ORDERS` sets how many orders the throughput run processes (default 5000), and
//! `ORDERLY_BENCH_NODES` how many node processes share them (default 1), `ORDERLY_BENCH_STEP` the step
//! duration (default 0s).

mod common;

use common::*;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Loads orders into the stream with no node running, then measures how fast the nodes, with zero
/// step time, drain them.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with --ignored"]
async fn throughput_with_zero_step_time() {
    let orders: usize = std::env::var("ORDERLY_BENCH_ORDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let node_count: usize = std::env::var("ORDERLY_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let step = std::env::var("ORDERLY_BENCH_STEP").unwrap_or_else(|_| "0s".into());
    let server = NatsServer::start().await;
    // A first start creates the stream, consumer and buckets; then the node goes away.
    let mut setup = Node::builder(&server.url).start().await;
    setup.signal("TERM");
    setup
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("setup node exits");

    let js = server.js().await;
    let started = Instant::now();
    let acks = futures::stream::iter((0..orders).map(|i| {
        let js = js.clone();
        async move {
            let id = Uuid::now_v7();
            let body = json!({ "customer": "bench", "n": i }).to_string();
            js.publish(format!("orders.submit.{id}"), body.into())
                .await?
                .await
        }
    }))
    .buffer_unordered(256)
    .collect::<Vec<_>>()
    .await;
    assert!(acks.iter().all(Result::is_ok));
    let publish = started.elapsed();
    println!(
        "published {orders} orders into ORDERS in {publish:.2?} ({:.0}/s)",
        orders as f64 / publish.as_secs_f64()
    );

    // The clock starts with the process: its start-up (a few ms) counts against it.
    let started = Instant::now();
    let mut nodes: Vec<Node> = (0..node_count)
        .map(|_| {
            Node::builder(&server.url)
                .env("ORDERLY_STEP_DURATION", &step)
                .env("ORDERLY_FAILURE_RATE", "0.05")
                .env("ORDERLY_LOG", "warn")
                .spawn()
        })
        .collect();
    for node in &mut nodes {
        node.wait_ready().await;
    }
    wait_until(
        "every order processed",
        Duration::from_secs(600),
        || async {
            let mut finished = 0.0;
            for node in &nodes {
                finished += metric_sum(&node.metrics().await, "orderly_orders_finished_total");
            }
            (finished as usize >= orders).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    // Check the work really happened: every order is terminal in the bucket and the queue is empty.
    let kv = js.get_key_value("orders").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    let (mut terminal, mut completed) = (0, 0);
    while let Some(key) = keys.next().await {
        let doc: serde_json::Value =
            serde_json::from_slice(&kv.get(key.unwrap()).await.unwrap().unwrap()).unwrap();
        if is_terminal(&doc) {
            check_terminal_document(&doc);
            terminal += 1;
            completed += usize::from(doc["state"] == "Completed");
        }
    }
    assert_eq!(terminal, orders);
    assert_eq!(stream_messages(&js).await, Some(0));
    println!("{terminal} orders terminal ({completed} completed), work queue empty");
    println!(
        "{node_count} node(s), 50 workers each, {step} steps: {orders} orders in {took:.2?} = {:.0} orders/s",
        orders as f64 / took.as_secs_f64()
    );
}

/// Resident memory of a node while all 50 workers hold an order.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with --ignored"]
async fn memory_with_fifty_busy_workers() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url)
        .env("ORDERLY_STEP_DURATION", "5s")
        .env("ORDERLY_LOG", "warn")
        .start()
        .await;
    let idle = rss_kib(node.pid());
    let http = reqwest::Client::new();
    for i in 0..100 {
        submit(&http, &node, json!({ "customer": "bench", "n": i })).await;
    }
    wait_until("50 busy workers", Duration::from_secs(20), || async {
        let busy = metric_sum(&node.metrics().await, "orderly_workers_busy");
        (busy >= 50.0).then_some(())
    })
    .await;
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss_kib(node.pid()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "node RSS: idle {:.1} MiB, with 50 busy workers {:.1} MiB (peak over 5 s)",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}

fn rss_kib(pid: i32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
