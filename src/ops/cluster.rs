//! Node heartbeats and the cluster view. Each node writes its status to the `orderly-nodes` bucket every
//! heartbeat interval and deletes it on a clean stop; a node that stops writing drops out of the view
//! after three intervals (and out of the bucket after its max age).

use crate::ops::stats::WorkerStats;
use crate::task::Task;
use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a node says about itself. Its fields are in alphabetical order, the order they are sent in.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub heartbeat_interval_ms: u64,
    pub http_addr: String,
    pub last_seen: DateTime<Utc>,
    pub name: String,
    pub node_id: String,
    pub orders_cancelled: u64,
    pub orders_completed: u64,
    pub orders_failed: u64,
    pub started_at: DateTime<Utc>,
    /// `running` or `draining`.
    pub status: String,
    pub version: String,
    pub workers_busy: usize,
    pub workers_total: usize,
}

#[derive(Clone)]
pub struct Cluster {
    kv: kv::Store,
    node_id: String,
    http_addr: String,
    started_at: DateTime<Utc>,
    workers: usize,
    interval: Duration,
    stats: Arc<WorkerStats>,
    draining: CancellationToken,
    /// When this node's heartbeat was last written, in Unix milliseconds (0: never).
    last_beat: Arc<AtomicI64>,
}

impl Cluster {
    /// The view of node `node_id`, started now, with heartbeats every `interval` in bucket `kv`.
    pub fn new(
        kv: kv::Store,
        node_id: String,
        http_addr: String,
        workers: usize,
        interval: Duration,
        stats: Arc<WorkerStats>,
        draining: CancellationToken,
    ) -> Cluster {
        Cluster {
            kv,
            node_id,
            http_addr,
            started_at: crate::clock::now(),
            workers,
            interval,
            stats,
            draining,
            last_beat: Default::default(),
        }
    }

    /// This node's status now.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node_id: self.node_id.clone(),
            name: "orderly".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            status: if self.draining.is_cancelled() {
                "draining"
            } else {
                "running"
            }
            .into(),
            http_addr: self.http_addr.clone(),
            started_at: self.started_at,
            last_seen: crate::clock::now(),
            workers_busy: self.stats.busy.load(Ordering::Relaxed),
            workers_total: self.workers,
            orders_completed: self.stats.completed.load(Ordering::Relaxed),
            orders_failed: self.stats.failed.load(Ordering::Relaxed),
            orders_cancelled: self.stats.cancelled.load(Ordering::Relaxed),
            heartbeat_interval_ms: self.interval.as_millis() as u64,
        }
    }

    /// Writes this node's status to the bucket once.
    pub async fn beat(&self) -> Result<(), kv::PutError> {
        let status = self.status();
        let body = serde_json::to_vec(&status).expect("a status always serializes");
        self.kv.put(&self.node_id, body.into()).await?;
        self.last_beat
            .store(status.last_seen.timestamp_millis(), Ordering::Relaxed);
        Ok(())
    }

    /// How often this node writes its heartbeat.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long ago this node's heartbeat was last written, if ever.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        match self.last_beat.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(
                (Utc::now().timestamp_millis() - at).max(0) as u64,
            )),
        }
    }

    /// Every node that wrote a heartbeat within three of its intervals.
    pub async fn live_nodes(&self) -> Result<Vec<NodeStatus>, crate::error::BoxError> {
        // The keys are read from the stream's subject list, not with `Store::keys`: that walks a
        // last-per-subject consumer, which skips a key whose entry is replaced while it walks (every
        // heartbeat replaces one, and the bucket keeps a single revision).
        let mut subjects = self
            .kv
            .stream
            .info_with_subjects(format!("{}>", self.kv.prefix))
            .await?;
        let mut nodes = Vec::new();
        let now = Utc::now();
        while let Some(entry) = subjects.next().await {
            let (subject, _count) = entry?;
            let Some(key) = subject.strip_prefix(self.kv.prefix.as_str()) else {
                continue;
            };
            let Ok(Some(value)) = self.kv.get(key).await else {
                continue;
            };
            let Ok(node) = serde_json::from_slice::<NodeStatus>(&value) else {
                continue;
            };
            let age = (now - node.last_seen).to_std().unwrap_or_default();
            if age <= Duration::from_millis(node.heartbeat_interval_ms.max(1) * 3) {
                nodes.push(node);
            }
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(nodes)
    }
}

impl Task for Cluster {
    const NAME: &'static str = "node heartbeat";

    /// Writes the heartbeat every interval until `stop` fires, then removes this node from the view.
    async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut errors = crate::ops::rate::RateLimited::new(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.beat().await {
                if let Some(skipped) = errors.allow() {
                    tracing::warn!(error = %e, skipped, "cannot write the node heartbeat");
                }
            }
        }
        if let Err(e) = self.kv.delete(&self.node_id).await {
            tracing::warn!(error = %e, "cannot remove this node from the cluster view");
        }
        Ok(())
    }
}
