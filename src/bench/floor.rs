//! The floor: what NATS itself allows for Orderly's work. A tight loop does exactly the operations a
//! node does per completed order ([`super::mix::ORDERLY`]) on objects of its own, with the same
//! concurrency (50 orders in flight per node-equivalent, pulled as workers free up), and none of the
//! node's own work (leases, heartbeats, metrics, decisions). The nodes' orders per second divided by
//! the floor's is what Orderly's own code costs.

use super::document::Document;
use super::load::preload;
use super::mix::{Change, OpMix};
use crate::engine::lease::confirm;
use anyhow::Context;
use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "BENCH_FLOOR";
const SUBMIT_PREFIX: &str = "bench.floor.submit";
const CONSUMER: &str = "bench-floor";
const BUCKET: &str = "bench-floor";
const INDEX_STREAM: &str = "BENCH_FLOOR_INDEX";
const INDEX_PREFIX: &str = "bench.floor.index";
const EVENTS_PREFIX: &str = "bench.floor.events";
/// Orders in flight per node-equivalent, as a node's default workers.
const WORKERS: usize = 50;

/// One drain of the floor: `orders` preloaded, then processed by `nodes` node-equivalents.
pub async fn drain(
    url: &str,
    mix: OpMix,
    orders: usize,
    nodes: usize,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let admin = jetstream::new(async_nats::connect(url).await?);
    remove(&admin).await;
    let measured = measure(url, &admin, mix, orders, nodes, timeout).await;
    remove(&admin).await;
    measured
}

async fn measure(
    url: &str,
    admin: &jetstream::Context,
    mix: OpMix,
    orders: usize,
    nodes: usize,
    timeout: Duration,
) -> anyhow::Result<f64> {
    create(admin).await?;
    preload(admin, SUBMIT_PREFIX, orders).await?;

    let progress = Arc::new(Progress::new(orders));
    let mut pullers = JoinSet::new();
    let mut started = Vec::with_capacity(nodes);
    for n in 0..nodes {
        // As a node: one connection fetches, another carries the order's writes and acks.
        let fetch = jetstream::new(async_nats::connect(url).await?);
        let work = jetstream::new(async_nats::connect(url).await?);
        let consumer: consumer::PullConsumer = fetch
            .get_stream(STREAM)
            .await?
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("the floor's consumer: {e}"))?;
        let worker = Worker {
            kv: work.get_key_value(BUCKET).await?,
            js: work,
            mix,
            node: format!("bench-floor-{n}"),
        };
        started.push((consumer, worker));
    }
    let clock = Instant::now();
    for (consumer, worker) in started {
        pullers.spawn(pull(consumer, worker, progress.clone()));
    }
    let finished = tokio::time::timeout(timeout, progress.done.cancelled()).await;
    let elapsed = clock.elapsed();
    progress.done.cancel();
    pullers.shutdown().await;
    if let Some(e) = progress.error.lock().ok().and_then(|mut e| e.take()) {
        return Err(e);
    }
    finished.map_err(|_| {
        anyhow::anyhow!(
            "the floor completed {} of {orders} orders in {timeout:?}",
            progress.completed.load(Ordering::Relaxed)
        )
    })?;
    Ok(orders as f64 / elapsed.as_secs_f64())
}

/// The floor's objects, as Orderly's are: a work-queue stream with a pull consumer, a bucket with
/// history, an index stream with direct gets.
async fn create(js: &jetstream::Context) -> anyhow::Result<()> {
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{SUBMIT_PREFIX}.*")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("cannot create the floor's stream")?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: crate::queue::setup::MAX_ACK_PENDING,
            ..Default::default()
        })
        .await
        .context("cannot create the floor's consumer")?;
    js.create_key_value(kv::Config {
        bucket: BUCKET.into(),
        history: crate::queue::setup::ORDER_HISTORY,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("cannot create the floor's bucket")?;
    js.create_stream(stream::Config {
        name: INDEX_STREAM.into(),
        subjects: vec![format!("{INDEX_PREFIX}.*.*")],
        storage: stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .context("cannot create the floor's index stream")?;
    Ok(())
}

/// Deletes the floor's objects on the server at `url`, if it answers within a few seconds: after an
/// interrupted run.
pub async fn clean_up(url: &str) {
    let cleaned = async {
        if let Ok(client) = async_nats::connect(url).await {
            remove(&jetstream::new(client)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), cleaned).await;
}

/// Deletes the floor's objects (those that exist).
pub async fn remove(js: &jetstream::Context) {
    for stream in [STREAM, INDEX_STREAM] {
        let _ = js.delete_stream(stream).await;
    }
    let _ = js.delete_key_value(BUCKET).await;
}

/// How far a drain is.
struct Progress {
    target: usize,
    completed: AtomicUsize,
    done: CancellationToken,
    error: Mutex<Option<anyhow::Error>>,
}

impl Progress {
    fn new(target: usize) -> Progress {
        Progress {
            target,
            completed: AtomicUsize::new(0),
            done: CancellationToken::new(),
            error: Mutex::new(None),
        }
    }

    fn completed_one(&self) {
        if self.completed.fetch_add(1, Ordering::AcqRel) + 1 >= self.target {
            self.done.cancel();
        }
    }

    fn failed(&self, error: anyhow::Error) {
        if let Ok(mut first) = self.error.lock() {
            first.get_or_insert(error);
        }
        self.done.cancel();
    }
}

/// A node-equivalent's pull loop: as many messages as it has free workers, one task per message.
async fn pull(consumer: consumer::PullConsumer, worker: Worker, progress: Arc<Progress>) {
    let slots = Arc::new(Semaphore::new(WORKERS));
    let mut orders = JoinSet::new();
    while !progress.done.is_cancelled() {
        while orders.try_join_next().is_some() {}
        let Ok(mut permits) = slots.clone().acquire_owned().await else {
            return;
        };
        let free = slots.available_permits() as u32;
        if free > 0 {
            if let Ok(more) = slots.clone().try_acquire_many_owned(free) {
                permits.merge(more);
            }
        }
        let batch = consumer
            .fetch()
            .max_messages(permits.num_permits())
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => return progress.failed(anyhow::anyhow!("floor pull: {e}")),
        };
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => return progress.failed(anyhow::anyhow!("floor pull: {e}")),
            };
            let permit = permits.split(1);
            let (worker, progress) = (worker.clone(), progress.clone());
            orders.spawn(async move {
                match worker.order(message).await {
                    Ok(()) => progress.completed_one(),
                    Err(e) => progress.failed(e),
                }
                drop(permit);
            });
        }
    }
    orders.shutdown().await;
}

/// What one node-equivalent's workers share.
#[derive(Clone)]
struct Worker {
    js: jetstream::Context,
    kv: kv::Store,
    mix: OpMix,
    node: String,
}

impl Worker {
    /// One order, op for op as [`OpMix`] says.
    async fn order(&self, message: jetstream::Message) -> anyhow::Result<()> {
        let id = message
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        for _ in 0..self.mix.kv_gets {
            if self.kv.entry(&id).await?.is_some() {
                anyhow::bail!("floor order {id} exists already");
            }
        }
        let payload: Value = serde_json::from_slice(&message.payload)?;
        let mut doc = Document::queued(&id, payload);
        let mut revision = 0;
        for write in self.mix.writes {
            let before = doc.state();
            doc.apply(write.records, write.state, &self.node, seq);
            let entry = if write.indexed {
                Some(self.announce(&id, &doc, revision).await?)
            } else {
                None
            };
            let value = doc.encode();
            revision = match write.records {
                Change::Create => self.kv.create(&id, value).await?,
                _ => self.kv.update(&id, value, revision).await?,
            };
            if let Some(entry) = entry.filter(|_| write.purges()) {
                self.purge_below(&id, entry);
            }
            for _ in 0..self.mix.events_per_write {
                self.event(&id, &before, &doc).await?;
            }
        }
        for _ in 0..self.mix.double_acks {
            confirm(&message, AckKind::Ack).await?;
        }
        Ok(())
    }

    /// The awaited publish of the order's index entry, as `OrderIndex::announce`.
    async fn announce(&self, id: &str, doc: &Document, base: u64) -> anyhow::Result<u64> {
        let entry = json!({
            "order_id": id,
            "state": doc.0["state"],
            "current_step": doc.0["current_step"],
            "start_time": doc.0["start_time"],
            "complete_time": doc.0["complete_time"],
            "base": base,
        });
        let subject = format!("{INDEX_PREFIX}.{id}.{}", doc.state());
        let ack = self
            .js
            .publish(subject, serde_json::to_vec(&entry)?.into())
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// The background purge of the order's older entries, as `OrderIndex::settle`.
    fn purge_below(&self, id: &str, seq: u64) {
        if seq <= 1 {
            return;
        }
        let request = json!({ "filter": format!("{INDEX_PREFIX}.{id}.*"), "seq": seq });
        let js = self.js.clone();
        tokio::spawn(async move {
            let _: Result<Value, _> = js
                .request(format!("STREAM.PURGE.{INDEX_STREAM}"), &request)
                .await;
        });
    }

    /// The core publish of an event, as `ops::events`.
    async fn event(&self, id: &str, before: &str, doc: &Document) -> anyhow::Result<()> {
        let event = json!({
            "order_id": id,
            "change": "step_started",
            "from": before,
            "to": doc.0["state"],
            "from_step": doc.0["current_step"],
            "step": doc.0["current_step"],
            "node": self.node,
            "attempt": doc.0["attempt"],
            "time": doc.0["updated_at"],
        });
        self.js
            .client()
            .publish(
                format!("{EVENTS_PREFIX}.{id}"),
                serde_json::to_vec(&event)?.into(),
            )
            .await?;
        Ok(())
    }
}
