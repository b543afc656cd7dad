//! The phases that run real nodes: a drain of preloaded orders, the steady state at N nodes, the
//! time an order takes beyond its steps, reads under load, and a node's memory.

use super::load::{last_sequence, messages, preload};
use super::nodes::{reset, NodeProcess, Spawner};
use super::query::{self, quantile, Latencies};
use crate::queue::setup::{STREAM, SUBMIT_PREFIX};
use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A node's steps: four of them per order.
const STEPS: u32 = 4;
/// A node's workers.
const WORKERS: f64 = 50.0;

/// One drain of `orders` preloaded orders by `nodes` nodes with zero-time steps.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Drain {
    pub orders_per_s: f64,
    /// Writes to the `orders` bucket per completed order, counted from its stream.
    pub writes_per_order: f64,
    /// Messages on `orders.events.>` per completed order, counted by a subscription.
    pub events_per_order: f64,
}

pub async fn drain(
    js: &jetstream::Context,
    spawner: &mut Spawner,
    orders: usize,
    nodes: usize,
    timeout: Duration,
) -> anyhow::Result<Drain> {
    reset(js).await?;
    preload(js, SUBMIT_PREFIX, orders).await?;
    let events = count_events(js.client()).await?;
    let spawned = Instant::now();
    let mut running = (0..nodes)
        .map(|_| spawner.spawn(Duration::ZERO))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = spawned + timeout;
    // The clock starts at the first order a node finishes, as the floor's starts with its orders
    // loaded and its connections open: a process's start-up is not what is measured.
    let (left, started) = watch_queue(js, &mut running, deadline, FINE, |n| n < orders as u64)
        .await
        .with_context(|| format!("{nodes} node(s) finished no order in {timeout:?}"))?;
    // Polled less often while the nodes drain: each read is a request to the server measured.
    let (_, ended) = watch_queue(js, &mut running, deadline, COARSE, |n| n == 0)
        .await
        .with_context(|| format!("{nodes} node(s) did not drain {orders} orders in {timeout:?}"))?;
    let elapsed = ended - started;
    for node in running {
        node.stop(Duration::from_secs(15)).await;
    }
    let writes = last_sequence(js, &format!("KV_{}", crate::store::BUCKET)).await?;
    js.client().flush().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = events.load(Ordering::Relaxed);
    Ok(Drain {
        orders_per_s: left as f64 / elapsed.as_secs_f64(),
        writes_per_order: writes as f64 / orders as f64,
        events_per_order: events as f64 / orders as f64,
    })
}

/// How often the work stream's count is read when a moment is to be caught: the first order done,
/// the edge of a wave.
const FINE: Duration = Duration::from_millis(2);
/// How often it is read while nodes drain it.
const COARSE: Duration = Duration::from_millis(10);

/// Reads the work stream's message count every `every` until `enough` says so, while the nodes stay
/// alive; returns the count and when it was read.
async fn watch_queue(
    js: &jetstream::Context,
    running: &mut [NodeProcess],
    deadline: Instant,
    every: Duration,
    enough: impl Fn(u64) -> bool,
) -> anyhow::Result<(u64, Instant)> {
    loop {
        let left = messages(js, STREAM).await?;
        if enough(left) {
            return Ok((left, Instant::now()));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} orders left at the deadline"
        );
        for node in running.iter_mut() {
            node.check_alive()?;
        }
        tokio::time::sleep(every).await;
    }
}

/// Counts the messages on `orders.events.>` from now on.
async fn count_events(client: async_nats::Client) -> anyhow::Result<Arc<AtomicU64>> {
    let count = Arc::new(AtomicU64::new(0));
    let mut events = client
        .subscribe(format!("{}.>", crate::ops::events::SUBJECT_PREFIX))
        .await?;
    client.flush().await?;
    let counted = count.clone();
    tokio::spawn(async move {
        while events.next().await.is_some() {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(count)
}

/// The steady state of `nodes` nodes at steps of `step`, against the ideal of its workers.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scale {
    pub nodes: usize,
    pub orders_per_s: f64,
    /// Every worker always busy: nodes × 50 / (4 × step).
    pub ideal_orders_per_s: f64,
    /// orders_per_s / ideal_orders_per_s.
    pub efficiency: f64,
}

/// How long a steady-state measurement warms up, then counts.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warm_up: Duration,
    pub measure: Duration,
}

pub async fn scale(
    js: &jetstream::Context,
    spawner: &mut Spawner,
    nodes: usize,
    step: Duration,
    window: Window,
) -> anyhow::Result<Scale> {
    let ideal = nodes as f64 * WORKERS / (STEPS as f64 * step.as_secs_f64());
    // Enough that the queue never runs dry: twice what the ideal takes over the whole run, and a
    // few seconds of start-up.
    let span = window.warm_up + window.measure + Duration::from_secs(3);
    let queued = (ideal * span.as_secs_f64() * 2.0) as usize + nodes * 50;
    reset(js).await?;
    preload(js, SUBMIT_PREFIX, queued).await?;
    let mut running = spawner.start(nodes, step).await?;
    // Orders taken from a preloaded queue all start at once and so end in waves, one every four
    // steps: counting between two arbitrary moments would be off by up to a wave. The count is
    // taken at the first acknowledgement after the warm-up and after the window instead, so the
    // window holds whole waves.
    tokio::time::sleep(window.warm_up).await;
    let (before, from) = next_ack(js, &mut running).await?;
    tokio::time::sleep(window.measure).await;
    let (after, to) = next_ack(js, &mut running).await?;
    drop(running);
    anyhow::ensure!(
        after > 0,
        "the queue ran dry while measuring {nodes} node(s)"
    );
    let orders_per_s = before.saturating_sub(after) as f64 / (to - from).as_secs_f64();
    Ok(Scale {
        nodes,
        orders_per_s,
        ideal_orders_per_s: ideal,
        efficiency: orders_per_s / ideal,
    })
}

/// The work stream's message count right after the next order leaves it, and when.
async fn next_ack(
    js: &jetstream::Context,
    running: &mut [NodeProcess],
) -> anyhow::Result<(u64, Instant)> {
    let start = messages(js, STREAM).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    watch_queue(js, running, deadline, FINE, |n| n < start)
        .await
        .context("no order finished within 30 s")
}

/// What an order takes beyond its four steps, at moderate load, and the ids of the orders.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub orders: usize,
    pub submitted_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    #[serde(skip)]
    pub ids: Vec<Uuid>,
}

/// Submits orders to `node` (one node, steps of `step`) at `load` of its capacity for `duration`,
/// waits for all of them, and reads each one's `complete_time - start_time - 4 × step`.
pub async fn overhead(
    js: &jetstream::Context,
    step: Duration,
    load: f64,
    duration: Duration,
) -> anyhow::Result<Overhead> {
    let rate = load * WORKERS / (STEPS as f64 * step.as_secs_f64());
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let until = Instant::now() + duration;
    let mut ids = Vec::new();
    let mut acks = Vec::new();
    while Instant::now() < until {
        ticks.tick().await;
        let id = Uuid::now_v7();
        let body = serde_json::json!({ "customer": "bench", "n": ids.len() }).to_string();
        acks.push(
            js.publish(format!("{SUBMIT_PREFIX}.{id}"), body.into())
                .await?,
        );
        ids.push(id);
    }
    for ack in acks {
        ack.await?;
    }
    let deadline = Instant::now() + step * STEPS * 4 + Duration::from_secs(30);
    while messages(js, STREAM).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the submitted orders did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bucket = js.get_key_value(crate::store::BUCKET).await?;
    let mut extra = Vec::with_capacity(ids.len());
    for id in &ids {
        let value = bucket
            .get(id.to_string())
            .await?
            .with_context(|| format!("order {id} has no document"))?;
        let order: crate::Order = serde_json::from_slice(&value)?;
        anyhow::ensure!(
            order.state == crate::State::Completed,
            "order {id} ended {}",
            order.state
        );
        let complete = order
            .complete_time
            .context("a completed order has a time")?;
        let took = (complete - order.start_time)
            .to_std()
            .unwrap_or_default()
            .saturating_sub(step * STEPS);
        extra.push(took);
    }
    extra.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Overhead {
        orders: ids.len(),
        submitted_per_s: rate,
        p50_ms: ms(quantile(&extra, 0.5)),
        p99_ms: ms(quantile(&extra, 0.99)),
        ids,
    })
}

/// Reads of existing orders: through a node's HTTP API and straight from the bucket.
#[derive(Debug, Clone, Serialize)]
pub struct Reads {
    pub concurrency: usize,
    pub http_per_s: f64,
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
    pub kv_per_s: f64,
    pub kv_p50_ms: f64,
    pub kv_p99_ms: f64,
}

pub async fn reads(
    js: &jetstream::Context,
    node: &NodeProcess,
    ids: &[Uuid],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Reads> {
    let http: Latencies = query::http_gets(node.http, ids, concurrency, duration).await?;
    let bucket = js.get_key_value(crate::store::BUCKET).await?;
    let kv = query::kv_gets(&bucket, ids, concurrency, duration).await?;
    Ok(Reads {
        concurrency,
        http_per_s: http.per_s(),
        http_p50_ms: http.quantile_ms(0.5),
        http_p99_ms: http.quantile_ms(0.99),
        kv_per_s: kv.per_s(),
        kv_p50_ms: kv.quantile_ms(0.5),
        kv_p99_ms: kv.quantile_ms(0.99),
    })
}

/// A node's resident memory with every worker busy, then with `queued` more orders waiting.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    pub busy_mib: f64,
    pub queued_mib: f64,
    pub queued_orders: usize,
}

pub async fn memory(
    js: &jetstream::Context,
    spawner: &mut Spawner,
    queued: usize,
    sample: Duration,
) -> anyhow::Result<Memory> {
    reset(js).await?;
    let mut running = spawner.start(1, Duration::from_secs(3600)).await?;
    let node = running.pop().context("one node")?;
    preload(js, SUBMIT_PREFIX, 100).await?;
    // 100 orders in, 50 held by the workers: the other 50 wait in the stream.
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(STREAM)
        .await?
        .get_consumer(crate::queue::setup::CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("the consumer {}: {e}", crate::queue::setup::CONSUMER))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut consumer = consumer.clone();
        if consumer.info().await?.num_ack_pending >= 50 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the node's workers did not fill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy_mib = peak_rss(&node, sample).await?;
    preload(js, SUBMIT_PREFIX, queued).await?;
    let queued_mib = peak_rss(&node, sample).await?;
    drop(node);
    reset(js).await?;
    Ok(Memory {
        busy_mib,
        queued_mib,
        queued_orders: queued,
    })
}

/// The highest resident memory of `node` over `sample`, read ten times.
async fn peak_rss(node: &NodeProcess, sample: Duration) -> anyhow::Result<f64> {
    let mut peak: f64 = 0.0;
    for _ in 0..10 {
        peak = peak.max(node.rss_mib()?);
        tokio::time::sleep(sample / 10).await;
    }
    Ok(peak)
}
