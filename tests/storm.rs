//! The storm: three nodes on a three-server cluster (replicas 3) under steady load, while a seeded
//! schedule injects several faults at once: node kill -9, SIGSTOP, SIGTERM and silent network cuts,
//! server and stream-leader kills, live edits of the redelivery windows, malformed headers and forged
//! advisories; and attacks at the edges of what a client can do: message ids taken before Orderly
//! uses them, work messages that claim to be retries, orders cancelled and retried over and over,
//! watches opened until refused, index entries of orders that do not exist, and step handler replies
//! that drop the connection they arrive on (the last node calls its steps over NATS). Then everything
//! is healed, and every accepted order must end exactly once with no overlapping leases, no write
//! outside its interval, no completed step re-run, nothing lost and nothing stranded (see
//! `common::audit`); the retried orders must end within their size with no overlapping leases, no
//! health check may have been crowded out, no order may have failed waiting for a lost reply, and a
//! listing must answer.
//!
//! `ORDERLY_STORM_SEED` picks the schedule (the same seed, the same schedule), `ORDERLY_STORM_SECS` its
//! length (default 120).
//!
//! Not injected: a full store. The cluster's servers run from flags with no store limit, and filling
//! three replicated stores in step would stop every other fault from having any effect while it lasts;
//! `hostile::a_full_store_strands_nothing` covers it on one server.

mod common;

use async_nats::jetstream::context::DeleteStreamErrorKind;
use async_nats::jetstream::{self, consumer::PullConsumer, ErrorCode};
use chrono::{DateTime, Utc};
use common::audit::Outside;
use common::faults::{fill_store, NatsCluster, Proxy, FILLER};
use common::hostile::{stored_in, Barrage, RawClient, Shots, MALFORMED};
use common::scenario::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const NODES: [&str; 3] = ["storm-a", "storm-b", "storm-c"];
const DEFAULT_SEED: u64 = 20_251_122;
/// The nodes' failure draws (`ORDERLY_SEED`), fixed so that a run's simulated failures repeat too.
const NODE_SEED: u64 = 7;
/// Orders submitted per second, through the whole run.
const RATE: f64 = 5.0;
/// The redelivery window the nodes start with (the shortest a replicated consumer may have), and the
/// one a live edit moves to and back from.
const WINDOW: Duration = orderly::engine::window::MIN_REPLICATED_WINDOW;
const EDITED_WINDOW: Duration = Duration::from_secs(5);
/// The consumer metadata key that announces a shorter window before the consumer's is shortened.
const ANNOUNCED: &str = orderly::engine::window::WINDOW_METADATA;
/// Each server's JetStream file store for a run of `run`: small enough to fill quickly, with room
/// for what the run itself stores. Every order keeps its revisions and its index entry (about 90 KB
/// a second at the storm's rate, side orders and index spam included), and a full store refuses the
/// consumer edits the storm makes, so a longer run gets a larger store.
fn store_limit(run: Duration) -> String {
    const BASE_MB: u64 = 64;
    const PER_SECOND_KB: u64 = 128;
    format!("{}MB", BASE_MB + run.as_secs() * PER_SECOND_KB / 1024)
}
/// How long an edit of the consumer or the deletion of the filler stream may wait for a cluster in the
/// middle of other faults (a stream leader killed while another server restarts can leave it without
/// a meta leader for tens of seconds).
const CLUSTER_PATIENCE: Duration = Duration::from_secs(120);
/// How long a node may take to exit after SIGTERM: its 3 s grace and room for a loaded machine.
const TERM_PATIENCE: Duration = Duration::from_secs(15);

/// SplitMix64: a tiny deterministic generator, so that a seed always gives the same schedule.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn between(&mut self, low: f64, high: f64) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(low + (high - low) * unit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of a node; it is started again when the fault ends.
    Kill(usize),
    /// SIGSTOP of a node; SIGCONT when the fault ends.
    Stop(usize),
    /// SIGTERM of a node; it is started again when the fault ends.
    Term(usize),
    /// Every connection of a node to NATS stops forwarding, sockets open; healed when the fault ends.
    Cut(usize),
    /// kill -9 of a server; started again on its store when the fault ends.
    ServerKill(usize),
    /// kill -9 of whichever server leads the ORDERS stream when the fault begins.
    LeaderKill,
    /// The consumer's windows edited live from 3 s to 5 s, and back when the fault ends.
    AckWait,
    /// Malformed header blocks on `orders.create` and `$SRV.PING` every 0.5 s while the fault lasts.
    Malformed,
    /// One work message with a malformed header block, straight into the stream.
    Poison,
    /// Forged MAX_DELIVERIES advisories for the last 100 stream sequences.
    Forged,
    /// Another stream fills every server's store until it refuses writes; it is deleted when the
    /// fault ends.
    Full,
    /// Message ids that Orderly gives its own messages, taken first by other messages (a retry's
    /// old id, the id of the sweep's copy of the next sequence, followed by a work message with a
    /// malformed header block), and work messages that claim to be retries of accepted orders.
    TakenIds,
    /// The side orders cancelled (one cancel in four with the longest reason) and retried over and over while the
    /// fault lasts.
    Retries,
    /// Watches of orders opened on every node until they are refused, kept open while the fault
    /// lasts, while `/healthz` is asked every 0.5 s.
    Watches,
    /// Index entries for orders that do not exist, published into `ORDERS_INDEX`; then a listing.
    IndexSpam,
    /// One reply in three of the step handler (which runs the steps of the node that calls its steps
    /// over NATS) is sent with a header block the node's NATS client cannot parse.
    HostileReplies,
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::Kill(_) => "kill -9 node",
            Fault::Stop(_) => "SIGSTOP node",
            Fault::Term(_) => "SIGTERM node",
            Fault::Cut(_) => "network cut of node",
            Fault::ServerKill(_) => "kill -9 server",
            Fault::LeaderKill => "kill -9 stream leader",
            Fault::AckWait => "ack wait edit",
            Fault::Malformed => "malformed headers on service subjects",
            Fault::Poison => "malformed-header work message",
            Fault::Forged => "forged MAX_DELIVERIES advisories",
            Fault::Full => "full store",
            Fault::TakenIds => "taken message ids and forged retries",
            Fault::Retries => "cancel-retry cycles",
            Fault::Watches => "watch abuse",
            Fault::IndexSpam => "index spam",
            Fault::HostileReplies => "hostile step handler replies",
        }
    }

    fn node(self) -> Option<usize> {
        match self {
            Fault::Kill(i) | Fault::Stop(i) | Fault::Term(i) | Fault::Cut(i) => Some(i),
            _ => None,
        }
    }

    fn on_servers(self) -> bool {
        matches!(self, Fault::ServerKill(_) | Fault::LeaderKill)
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    start: Duration,
    length: Duration,
    fault: Fault,
}

impl Planned {
    fn end(&self) -> Duration {
        self.start + self.length
    }

    /// Until when the fault acts on the cluster: an ack wait edit shrinks the consumer's windows
    /// 4 × the edited window and a second after it ends.
    fn acts_until(&self) -> Duration {
        match self.fault {
            Fault::AckWait => self.end() + EDITED_WINDOW * 4 + Duration::from_secs(1),
            _ => self.end(),
        }
    }

    fn overlaps(&self, start: Duration, end: Duration, gap: Duration) -> bool {
        self.start < end + gap && start < self.end() + gap
    }
}

/// The schedule for `seed` over `run`: a fault every 1 to 4 s, each lasting 3 to 12 s, so that several
/// are in force at once. A node has one fault at a time and at most two nodes have one; one server is
/// down at a time, with 5 s for it to catch up before the next; one edit and one barrage at a time.
fn plan(seed: u64, run: Duration) -> Vec<Planned> {
    let mut rng = SplitMix64(seed);
    let mut plan: Vec<Planned> = Vec::new();
    let mut start = Duration::from_secs(3);
    while start + Duration::from_secs(5) < run {
        let length = rng.between(3.0, 12.0);
        for _ in 0..10 {
            let fault = match rng.below(16) {
                0 => Fault::Kill(rng.below(3)),
                1 => Fault::Stop(rng.below(3)),
                2 => Fault::Term(rng.below(3)),
                3 => Fault::Cut(rng.below(3)),
                4 => Fault::ServerKill(rng.below(3)),
                5 => Fault::LeaderKill,
                6 => Fault::AckWait,
                7 => Fault::Malformed,
                8 => Fault::Poison,
                9 => Fault::Forged,
                10 => Fault::Full,
                11 => Fault::TakenIds,
                12 => Fault::Retries,
                13 => Fault::Watches,
                14 => Fault::IndexSpam,
                _ => Fault::HostileReplies,
            };
            let length = match fault {
                Fault::Poison | Fault::Forged | Fault::TakenIds | Fault::IndexSpam => {
                    Duration::ZERO
                }
                _ => length,
            };
            let end = start + length;
            let during = |gap: Duration| {
                plan.iter()
                    .filter(move |p| p.overlaps(start, end, gap))
                    .map(|p| p.fault)
            };
            let fits = match fault {
                f if f.node().is_some() => {
                    let busy: Vec<usize> = during(Duration::ZERO).filter_map(Fault::node).collect();
                    !busy.contains(&f.node().unwrap_or_default()) && {
                        let mut nodes = busy.clone();
                        nodes.sort_unstable();
                        nodes.dedup();
                        nodes.len() < 2
                    }
                }
                f if f.on_servers() => !during(Duration::from_secs(5)).any(Fault::on_servers),
                Fault::Malformed | Fault::Retries | Fault::Watches | Fault::HostileReplies => {
                    !during(Duration::ZERO).any(|f| f == fault)
                }
                // The server refuses consumer edits while the store is full: edits (with their
                // shrink) and full stores take turns.
                Fault::AckWait | Fault::Full => {
                    let until = Planned {
                        start,
                        length,
                        fault,
                    }
                    .acts_until();
                    let gap = Duration::from_secs(1);
                    !plan.iter().any(|p| {
                        matches!(p.fault, Fault::AckWait | Fault::Full)
                            && p.start < until + gap
                            && start < p.acts_until() + gap
                    })
                }
                _ => true,
            };
            if fits {
                plan.push(Planned {
                    start,
                    length,
                    fault,
                });
                break;
            }
        }
        start += rng.between(1.0, 4.0);
    }
    plan
}

/// Orders submitted through the run: half straight into the stream, half over HTTP to a node.
#[derive(Default)]
struct Submitted {
    attempted: AtomicUsize,
    accepted: Mutex<Vec<Uuid>>,
    /// The highest stream sequence a publish was acknowledged with.
    last_seq: AtomicU64,
    /// The HTTP addresses of the nodes that run.
    nodes: Mutex<Vec<String>>,
}

impl Submitted {
    async fn submit(&self, js: &jetstream::Context, http: &reqwest::Client, n: usize) {
        self.attempted.fetch_add(1, Ordering::Relaxed);
        let id = Uuid::now_v7();
        let payload = json!({ "storm": n });
        if n.is_multiple_of(2) {
            let published = async {
                js.publish(format!("orders.submit.{id}"), payload.to_string().into())
                    .await
                    .ok()?
                    .await
                    .ok()
            };
            if let Ok(Some(ack)) = tokio::time::timeout(Duration::from_secs(5), published).await {
                self.last_seq.fetch_max(ack.sequence, Ordering::Relaxed);
                self.accepted.lock().expect("lock").push(id);
            }
            return;
        }
        let target = {
            let nodes = self.nodes.lock().expect("lock");
            if nodes.is_empty() {
                return;
            }
            nodes[n % nodes.len()].clone()
        };
        let response = http
            .post(format!("{target}/orders"))
            .header("Idempotency-Key", id.to_string())
            .timeout(Duration::from_secs(3))
            .json(&payload)
            .send()
            .await;
        if response.is_ok_and(|r| r.status() == 202) {
            self.accepted.lock().expect("lock").push(id);
        }
    }
}

/// Everything the storm acts on.
struct Storm {
    started: Instant,
    cluster: NatsCluster,
    /// Each node's proxies, one per server: a cut cuts them all.
    proxies: Vec<Vec<Proxy>>,
    nodes: Vec<Option<Node>>,
    audits: Audits,
    js: jetstream::Context,
    outside: Outside,
    /// When each node that is stopped now was seen stopped.
    stopped_since: Vec<Option<DateTime<Utc>>>,
    submitted: Arc<Submitted>,
    /// The windows the consumer has now: a node started now is configured with it.
    window: Arc<Mutex<Duration>>,
    /// The end of the last ack wait edit: the consumer's windows shortened once the longest
    /// window in force has passed.
    shrink: Option<tokio::task::JoinHandle<()>>,
    barrage: Option<Barrage>,
    shots: Shots,
    /// The server each running server fault killed.
    killed: BTreeMap<usize, String>,
    /// Work messages with malformed headers the stream accepted.
    poisoned: Vec<Uuid>,
    injected: BTreeMap<&'static str, usize>,
    edges: Edges,
}

impl Storm {
    fn say(&self, what: &str) {
        println!(
            "[storm +{:6.1}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn builder(&self, i: usize) -> NodeBuilder {
        let urls: Vec<&str> = self.proxies[i].iter().map(|p| p.url.as_str()).collect();
        let builder = self
            .audits
            .node(&urls.join(","), NODES[i])
            .env("ORDERLY_REPLICAS", 3)
            .env("ORDERLY_SEED", NODE_SEED)
            .env("ORDERLY_ACK_WAIT", format!("{}s", self.window().as_secs()))
            .env("ORDERLY_HTTP_MAX_CONNECTIONS", STORM_MAX_CONNECTIONS);
        if i == NATS_STEPS_NODE {
            builder.env("ORDERLY_STEPS", "nats").env(
                "ORDERLY_STEP_TIMEOUT",
                format!("{}s", STEP_TIMEOUT.as_secs()),
            )
        } else {
            builder
        }
    }

    fn start_node(&mut self, i: usize) {
        self.nodes[i] = Some(self.builder(i).spawn());
        self.publish_addresses();
    }

    fn publish_addresses(&self) {
        *self.submitted.nodes.lock().expect("lock") = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.http.clone())
            .collect();
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("the node runs")
    }

    fn server_name(&self, i: usize) -> String {
        self.cluster.servers()[i].0.clone()
    }

    /// Starts node `i` again if it exited by itself (it stops rather than limp on when one of its
    /// parts fails), and says so: an operator's supervisor would do the same.
    fn revive(&mut self, i: usize) {
        let exited = self.nodes[i].as_mut().is_some_and(Node::has_exited);
        if exited {
            self.say(&format!(
                "{} had exited by itself; starting it again",
                NODES[i]
            ));
            let logs = self.node(i).logs();
            let lines: Vec<&str> = logs.lines().collect();
            for line in &lines[lines.len().saturating_sub(12)..] {
                println!("    {line}");
            }
            *self.injected.entry("node exited by itself").or_default() += 1;
            self.start_node(i);
        }
    }

    /// Runs node `i` until it is ready. A node started while an edit of the consumer's windows was
    /// under way (a cluster in trouble can take tens of seconds to answer one) was configured with
    /// the windows of before or after it, and exits if they are not the consumer's: it is started
    /// again with the windows the consumer has now that the last edit has ended.
    async fn heal_node(&mut self, i: usize) {
        const STARTS: usize = 3;
        for _ in 0..STARTS {
            if self.nodes[i].is_none() {
                self.start_node(i);
            }
            self.revive(i);
            let node = self.nodes[i].as_mut().expect("started");
            if node.wait_ready_or_exit().await.is_none() {
                self.say(&format!("{} is ready", NODES[i]));
                return;
            }
        }
        self.revive(i);
        self.nodes[i].as_mut().expect("started").wait_ready().await;
    }

    async fn begin(&mut self, index: usize, fault: Fault) {
        *self.injected.entry(fault.kind()).or_default() += 1;
        if let Some(i) = fault.node() {
            self.revive(i);
        }
        match fault {
            Fault::Kill(i) => {
                self.say(&format!("begin {}: {}", fault.kind(), NODES[i]));
                let mut node = self.nodes[i].take().expect("the node runs");
                node.signal("KILL");
                node.wait_exit(Duration::from_secs(5))
                    .await
                    .expect("a killed node exits");
                let died = Utc::now();
                if let Some(since) = self.stopped_since[i].take() {
                    self.outside.stopped(&node.id, since, died);
                }
                self.outside
                    .died
                    .entry(node.id.clone())
                    .or_default()
                    .push(died);
                self.publish_addresses();
            }
            Fault::Stop(i) => {
                self.say(&format!("begin {}: {}", fault.kind(), NODES[i]));
                self.node(i).signal("STOP");
                self.node(i).wait_stopped().await;
                self.stopped_since[i] = Some(Utc::now());
            }
            Fault::Term(i) => {
                self.say(&format!("begin {}: {}", fault.kind(), NODES[i]));
                self.node(i).signal("TERM");
            }
            Fault::Cut(i) => {
                self.say(&format!("begin {}: {}", fault.kind(), NODES[i]));
                self.proxies[i].iter().for_each(Proxy::cut);
            }
            Fault::ServerKill(s) => {
                let name = self.server_name(s);
                self.say(&format!("begin {}: {name}", fault.kind()));
                self.cluster.kill(&name);
                self.killed.insert(index, name);
            }
            Fault::LeaderKill => {
                let leader = self.cluster.stream_leader(&self.js, "ORDERS").await;
                let name = leader.clone().unwrap_or_else(|| self.server_name(0));
                let known = if leader.is_some() {
                    ""
                } else {
                    " (leader unknown)"
                };
                self.say(&format!("begin {}: {name}{known}", fault.kind()));
                self.cluster.kill(&name);
                self.killed.insert(index, name);
            }
            Fault::AckWait => {
                if let Some(shrink) = self.shrink.take() {
                    shrink.await.expect("the last edit's shrink does not panic");
                }
                self.say(&format!(
                    "begin {}: windows {:?} -> {:?}",
                    fault.kind(),
                    self.window(),
                    EDITED_WINDOW
                ));
                set_windows(&self.js, &self.window, EDITED_WINDOW).await;
            }
            Fault::Malformed => {
                self.say(&format!("begin {}: orders.create, $SRV.PING", fault.kind()));
                self.barrage = Some(Barrage::start(
                    &self.cluster.urls,
                    Duration::from_millis(500),
                    &["orders.create", "$SRV.PING"],
                    &MALFORMED,
                    br#"{"customer":"mallory"}"#,
                ));
            }
            Fault::Poison => {
                self.poison(fault).await;
            }
            Fault::TakenIds => {
                // In the background: on a cluster in the middle of other faults each publish can
                // take seconds, and the schedule must not wait for them.
                let targets: Vec<Uuid> = {
                    let accepted = self.submitted.accepted.lock().expect("lock");
                    // Orders accepted a while ago: most have ended.
                    accepted
                        .iter()
                        .rev()
                        .skip(100)
                        .step_by(7)
                        .take(3)
                        .copied()
                        .collect()
                };
                self.say(&format!(
                    "{}: the retry ids of {} orders, forged retries, the id of the next sweep copy",
                    fault.kind(),
                    targets.len()
                ));
                tokio::spawn(take_ids(
                    self.js.clone(),
                    self.cluster.urls.clone(),
                    self.submitted.clone(),
                    self.edges.counts.clone(),
                    targets,
                ));
            }
            Fault::Retries => {
                self.say(&format!("begin {}", fault.kind()));
                let stop = tokio_util::sync::CancellationToken::new();
                let task = tokio::spawn(cycle_side_orders(
                    self.edges.side.clone(),
                    self.submitted.clone(),
                    self.js.clone(),
                    self.edges.counts.clone(),
                    stop.clone(),
                ));
                self.edges.running = Some((stop, task));
            }
            Fault::HostileReplies => {
                self.say(&format!("begin {}", fault.kind()));
                self.edges.hostile_replies.store(true, Ordering::Relaxed);
            }
            Fault::Watches => {
                let watched = self.edges.watched;
                self.say(&format!("begin {}: watches of {watched}", fault.kind()));
                let stop = tokio_util::sync::CancellationToken::new();
                let task = tokio::spawn(abuse_watches(
                    self.submitted.clone(),
                    watched,
                    self.edges.counts.clone(),
                    stop.clone(),
                ));
                self.edges.watching = Some((stop, task));
            }
            Fault::IndexSpam => {
                self.say(fault.kind());
                let nodes = live_nodes(&self.submitted);
                let node = nodes.get(index % nodes.len().max(1)).cloned();
                tokio::spawn(spam_index_and_list(
                    self.js.client(),
                    node,
                    self.edges.counts.clone(),
                ));
            }
            Fault::Forged => {
                let last = self.submitted.last_seq.load(Ordering::Relaxed);
                let first = last.saturating_sub(99).max(1);
                self.say(&format!(
                    "{}: stream sequences {first}..={last}",
                    fault.kind()
                ));
                // Beside the schedule: a client reconnecting to a restarted server holds its
                // publishes back, which must not hold back the faults after this one.
                let client = self.js.client();
                tokio::spawn(async move {
                    for seq in first..=last {
                        let advisory = json!({
                            "type": "io.nats.jetstream.advisory.v1.max_deliver",
                            "stream": "ORDERS",
                            "consumer": "workers",
                            "stream_seq": seq,
                            "deliveries": 10,
                        });
                        let subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ORDERS.workers";
                        let _ = client.publish(subject, advisory.to_string().into()).await;
                    }
                });
            }
            Fault::Full => {
                let stored = fill_store(&self.js, 3).await;
                self.say(&format!(
                    "begin {}: {:.1} MB more stored, then the servers refused writes",
                    fault.kind(),
                    stored as f64 / 1e6
                ));
            }
        }
    }

    async fn end(&mut self, index: usize, fault: Fault) {
        match fault {
            Fault::Kill(i) => {
                self.say(&format!("end {}: {} starts again", fault.kind(), NODES[i]));
                self.start_node(i);
            }
            Fault::Stop(i) => {
                self.say(&format!("end {}: SIGCONT {}", fault.kind(), NODES[i]));
                if let Some(since) = self.stopped_since[i].take() {
                    let id = self.node(i).id.clone();
                    self.outside.stopped(&id, since, Utc::now());
                }
                self.node(i).signal("CONT");
            }
            Fault::Term(i) => {
                let mut node = self.nodes[i].take().expect("the node runs");
                let status = node.wait_exit(TERM_PATIENCE).await;
                assert!(
                    status.is_some(),
                    "node {} did not exit within {TERM_PATIENCE:?} of SIGTERM",
                    node.id
                );
                self.say(&format!(
                    "end {}: {} exited ({}), starts again",
                    fault.kind(),
                    NODES[i],
                    status.map(|s| s.to_string()).unwrap_or_default()
                ));
                drop(node);
                self.start_node(i);
            }
            Fault::Cut(i) => {
                self.say(&format!("end {}: {} healed", fault.kind(), NODES[i]));
                self.proxies[i].iter().for_each(Proxy::heal);
            }
            Fault::ServerKill(_) | Fault::LeaderKill => {
                let name = self.killed.remove(&index).expect("a killed server");
                self.say(&format!("end {}: {name} starts again", fault.kind()));
                self.cluster.start_again(&name);
            }
            Fault::AckWait => {
                // Shortening follows the documented procedure: announce the shorter window, wait
                // out the longest window in force, then shorten the consumer's. The storm goes on
                // meanwhile.
                let longest = self.window() * 4;
                self.say(&format!(
                    "end {}: announcing {WINDOW:?}, then in {:?} windows {:?} -> {WINDOW:?}",
                    fault.kind(),
                    longest + Duration::from_secs(1),
                    self.window()
                ));
                edit_consumer(&self.js, |config| {
                    config
                        .metadata
                        .insert(ANNOUNCED.to_owned(), format!("{}s", WINDOW.as_secs()));
                })
                .await;
                let (js, window) = (self.js.clone(), self.window.clone());
                self.shrink = Some(tokio::spawn(async move {
                    tokio::time::sleep(longest + Duration::from_secs(1)).await;
                    set_windows(&js, &window, WINDOW).await;
                }));
            }
            Fault::Malformed => {
                let shots = self.barrage.take().expect("a barrage").stop().await;
                self.say(&format!(
                    "end {}: {} sent, {} found no server",
                    fault.kind(),
                    shots.taken,
                    shots.missed
                ));
                self.shots.taken += shots.taken;
                self.shots.missed += shots.missed;
            }
            Fault::Full => {
                self.say(&format!("end {}: stream {FILLER} deleted", fault.kind()));
                let js = self.js.clone();
                wait_until("stream FILLER to be deleted", CLUSTER_PATIENCE, || {
                    let js = js.clone();
                    async move {
                        let deleted =
                            tokio::time::timeout(Duration::from_secs(5), js.delete_stream(FILLER))
                                .await;
                        match deleted {
                            Ok(Ok(_)) => Some(()),
                            Ok(Err(e)) => match e.kind() {
                                DeleteStreamErrorKind::JetStream(e)
                                    if e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                                {
                                    Some(())
                                }
                                _ => None,
                            },
                            _ => None,
                        }
                    }
                })
                .await;
            }
            Fault::Retries => {
                if let Some((stop, task)) = self.edges.running.take() {
                    stop.cancel();
                    task.await.expect("the cycles do not panic");
                }
                self.say(&format!(
                    "end {}: {} cycles so far",
                    fault.kind(),
                    self.edges.counts.cycles.load(Ordering::Relaxed)
                ));
            }
            Fault::Watches => {
                if let Some((stop, task)) = self.edges.watching.take() {
                    stop.cancel();
                    task.await.expect("the watches do not panic");
                }
                self.say(&format!(
                    "end {}: {} watches opened, {} refused so far",
                    fault.kind(),
                    self.edges.counts.watches_open.load(Ordering::Relaxed),
                    self.edges.counts.watches_refused.load(Ordering::Relaxed)
                ));
            }
            Fault::HostileReplies => {
                self.edges.hostile_replies.store(false, Ordering::Relaxed);
                self.say(&format!(
                    "end {}: {} of {} replies sent hostile so far",
                    fault.kind(),
                    self.edges.counts.hostile_replies.load(Ordering::Relaxed),
                    self.edges.counts.replies.load(Ordering::Relaxed)
                ));
            }
            Fault::Poison | Fault::Forged | Fault::TakenIds | Fault::IndexSpam => {}
        }
    }

    /// Publishes one work message with a malformed header block straight into the stream.
    async fn poison(&mut self, fault: Fault) {
        let header = MALFORMED[self.poisoned.len() % MALFORMED.len()];
        let stored = poison_message(&self.cluster.urls, header).await;
        self.say(&format!(
            "{}: {}",
            fault.kind(),
            stored.map_or("not stored".to_owned(), |id| format!(
                "orders.submit.{id} stored"
            ))
        ));
        self.poisoned.extend(stored);
    }

    /// The windows the consumer has now.
    fn window(&self) -> Duration {
        *self.window.lock().expect("lock")
    }
}

/// Edits the consumer in place (as `nats consumer edit ORDERS workers --backoff ...` does): its
/// windows become `window`, twice, then twice and four times as long, and so does `now`. A cluster in
/// the middle of another fault may not answer at once: it is asked again for up to 30 s.
async fn set_windows(js: &jetstream::Context, now: &Mutex<Duration>, window: Duration) {
    edit_consumer(js, |config| {
        config.ack_wait = window;
        config.backoff = orderly::queue::setup::backoff(window);
        // A longer window needs no announcement; a shorter one was announced already.
        config.metadata.remove(ANNOUNCED);
    })
    .await;
    *now.lock().expect("lock") = window;
}

/// Edits the consumer in place with `change`, asking again for up to 30 s.
async fn edit_consumer(js: &jetstream::Context, change: impl Fn(&mut jetstream::consumer::Config)) {
    let change = &change;
    wait_until("the consumer edit", CLUSTER_PATIENCE, || {
        let js = js.clone();
        async move {
            let edit = async {
                let stream = js.get_stream("ORDERS").await.ok()?;
                let mut consumer: PullConsumer = stream.get_consumer("workers").await.ok()?;
                let mut config = consumer.info().await.ok()?.config.clone();
                change(&mut config);
                stream.update_consumer(config).await.ok().map(|_| ())
            };
            tokio::time::timeout(Duration::from_secs(5), edit)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
        })
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm() {
    let seed = env_u64("ORDERLY_STORM_SEED", DEFAULT_SEED);
    let run = Duration::from_secs(env_u64("ORDERLY_STORM_SECS", 120));
    let schedule = plan(seed, run);
    println!(
        "[storm] seed {seed} (ORDERLY_STORM_SEED), {run:?} (ORDERLY_STORM_SECS), {} faults planned:",
        schedule.len()
    );
    for planned in &schedule {
        println!(
            "[storm]   {:6.1}s for {:4.1}s: {:?}",
            planned.start.as_secs_f64(),
            planned.length.as_secs_f64(),
            planned.fault
        );
    }

    let cluster = NatsCluster::start_with_store_limit(Some(&store_limit(run))).await;
    let mut proxies = Vec::new();
    for _ in NODES {
        let mut mine = Vec::new();
        for (_, port) in cluster.servers() {
            mine.push(Proxy::start(port).await);
        }
        proxies.push(mine);
    }
    let js = jetstream::new(cluster.client().await);
    let mut storm = Storm {
        started: Instant::now(),
        cluster,
        proxies,
        nodes: NODES.iter().map(|_| None).collect(),
        audits: Audits::new(),
        js: js.clone(),
        outside: Outside::default(),
        stopped_since: NODES.iter().map(|_| None).collect(),
        submitted: Arc::new(Submitted::default()),
        window: Arc::new(Mutex::new(WINDOW)),
        shrink: None,
        barrage: None,
        shots: Shots::default(),
        killed: BTreeMap::new(),
        poisoned: Vec::new(),
        injected: BTreeMap::new(),
        edges: Edges {
            counts: Arc::default(),
            side: Arc::default(),
            running: None,
            watching: None,
            watched: Uuid::now_v7(),
            hostile_replies: Arc::default(),
        },
    };
    let handler = tokio::spawn(step_handler(
        storm.cluster.client().await,
        storm.cluster.urls.clone(),
        storm.edges.hostile_replies.clone(),
        storm.edges.counts.clone(),
    ));
    for i in 0..NODES.len() {
        storm.start_node(i);
        let node = storm.nodes[i].as_mut().expect("started");
        node.wait_ready().await;
    }
    put_unrun_order(&orders_bucket(&js).await, storm.edges.watched).await;
    let http = reqwest::Client::new();
    for _ in 0..SIDE_ORDERS {
        let side = submit_side_order(&http, &storm.node(0).http)
            .await
            .expect("a side order is accepted");
        storm.edges.side.lock().expect("lock").push(side);
    }

    // Steady load through the whole run, each submission on its own so that a stuck one holds up
    // no other.
    let submitter = {
        let (submitted, js) = (storm.submitted.clone(), js.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
            let mut submissions = tokio::task::JoinSet::new();
            let ends = Instant::now() + run;
            let mut n = 0;
            while Instant::now() < ends {
                pace.tick().await;
                let (submitted, js, http) = (submitted.clone(), js.clone(), http.clone());
                submissions.spawn(async move { submitted.submit(&js, &http, n).await });
                n += 1;
            }
            submissions.join_all().await;
        })
    };

    // The schedule, as begin and end actions in time order (an end before a begin at the same time).
    let mut actions: Vec<(Duration, bool, usize)> = Vec::new();
    for (index, planned) in schedule.iter().enumerate() {
        actions.push((planned.start, true, index));
        actions.push((planned.end(), false, index));
    }
    actions.sort_by_key(|(at, begins, index)| (*at, *begins, *index));
    let began = storm.started;
    let mut pending = actions.into_iter().peekable();
    while let Some((at, begins, index)) = pending.next_if(|(at, _, _)| *at < run) {
        tokio::time::sleep_until((began + at).into()).await;
        let fault = schedule[index].fault;
        if begins {
            storm.begin(index, fault).await;
        } else {
            storm.end(index, fault).await;
        }
    }

    // Stop injecting, heal everything, and let the load finish.
    tokio::time::sleep_until((began + run).into()).await;
    storm.say("healing everything");
    for (_, begins, index) in pending {
        if !begins {
            storm.end(index, schedule[index].fault).await;
        }
    }
    submitter.await.expect("the submitter does not panic");
    if let Some(shrink) = storm.shrink.take() {
        shrink.await.expect("the last edit's shrink does not panic");
    }
    storm.cluster.wait_all_up(Duration::from_secs(60)).await;
    for i in 0..NODES.len() {
        storm.heal_node(i).await;
    }
    storm.say("healed; waiting for every accepted order");

    let mut ids = storm.submitted.accepted.lock().expect("lock").clone();
    let attempted = storm.submitted.attempted.load(Ordering::Relaxed);
    println!(
        "[storm] seed {seed}: {attempted} orders submitted, {} accepted, {} malformed-header work messages stored",
        ids.len(),
        storm.poisoned.len()
    );
    for (kind, count) in &storm.injected {
        println!("[storm]   {count:3} x {kind}");
    }
    println!(
        "[storm]   {} malformed service messages sent ({} found no server)",
        storm.shots.taken, storm.shots.missed
    );
    ids.extend(&storm.poisoned);
    let kv = orders_bucket(&js).await;
    if let Err(unfinished) = terminal_within(&kv, &ids, Duration::from_secs(180)).await {
        panic!("seed {seed}: {unfinished}");
    }
    let report = settle_and_check(
        "storm",
        &js,
        &ids,
        &storm.audits,
        &storm.outside,
        Duration::from_secs(60),
    )
    .await;
    println!(
        "[storm] seed {seed}: {} completed, {} failed, {} leases handed over",
        report.completed,
        report.failed,
        report.handovers.len()
    );
    storm.check_edges(seed, &kv, &ids).await;
    handler.abort();
}

impl Storm {
    /// The side orders end, stay within their size and never had two holders at once; watches never
    /// crowded out a health check; a listing answers despite the index spam.
    async fn check_edges(&mut self, seed: u64, kv: &jetstream::kv::Store, ids: &[Uuid]) {
        let counts = self.edges.counts.clone();
        // No step handler reply was lost for good: a lost one fails its step at the step timeout.
        let mut timed_out = Vec::new();
        for id in ids {
            if let Some(doc) = document(kv, *id).await {
                let reason = doc["failure_reason"].as_str().unwrap_or_default();
                if reason.contains("timed out") || reason.contains("did not answer") {
                    timed_out.push(format!("{id}: {reason}"));
                }
            }
        }
        println!(
            "[storm] seed {seed}: the step handler answered {} calls, {} of them with a malformed header block; {} orders failed waiting for a reply",
            counts.replies.load(Ordering::Relaxed),
            counts.hostile_replies.load(Ordering::Relaxed),
            timed_out.len()
        );
        assert!(timed_out.is_empty(), "seed {seed}: {timed_out:?}");
        let http = reqwest::Client::new();
        let side = self.edges.side.lock().expect("lock").clone();
        let node = self.node(0).http.clone();
        for id in &side {
            // A cancel ends the side orders still running; one that ended already refuses it.
            wait_until(
                "a final cancel of a side order",
                Duration::from_secs(60),
                || {
                    let http = http.clone();
                    let node = node.clone();
                    async move {
                        let status = act(&http, &node, *id, "cancel", Value::Null).await?;
                        matches!(status, 200 | 202 | 409).then_some(())
                    }
                },
            )
            .await;
        }
        let docs = terminal_within(kv, &side, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: side orders: {e}"));
        let mut largest = 0;
        let mut retries = 0;
        for id in &side {
            let raw = kv
                .get(id.to_string())
                .await
                .expect("get")
                .expect("a side order");
            largest = largest.max(raw.len());
            assert!(
                raw.len() <= 576 * 1024,
                "seed {seed}: side order {id} is {} bytes",
                raw.len()
            );
        }
        for doc in &docs {
            retries += doc["retries"].as_u64().unwrap_or(0);
            assert!(doc["history"].as_array().map_or(0, Vec::len) <= 20);
        }
        let leases =
            common::audit::check_leases(kv, &side, &self.audits.lines(), &self.outside).await;
        println!(
            "[storm] seed {seed}: {} side orders, {retries} retries in all ({} cycles; {} cancels and {} retries answered 503, {} replaced), the largest document {largest} bytes, {} lease intervals, none overlapping ({} taken over while the previous holder's last answer was on its way)",
            side.len(),
            counts.cycles.load(Ordering::Relaxed),
            counts.cancel_refused_503.load(Ordering::Relaxed),
            counts.retry_refused_503.load(Ordering::Relaxed),
            counts.replaced.load(Ordering::Relaxed),
            leases.intervals,
            leases.handovers_by_revision
        );
        println!(
            "[storm] seed {seed}: watches {} opened, {} refused; /healthz answered {} times, {} of them crowded out",
            counts.watches_open.load(Ordering::Relaxed),
            counts.watches_refused.load(Ordering::Relaxed),
            counts.health_answered.load(Ordering::Relaxed),
            counts.health_crowded_out.load(Ordering::Relaxed)
        );
        assert_eq!(
            counts.health_crowded_out.load(Ordering::Relaxed),
            0,
            "seed {seed}: watches crowded /healthz out"
        );
        let listed = wait_until("a listing after the storm", Duration::from_secs(60), || {
            let http = http.clone();
            let node = node.clone();
            async move {
                let response = http
                    .get(format!("{node}/orders?limit=10"))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .ok()?;
                (response.status() == 200).then_some(())?;
                let page: Value = response.json().await.ok()?;
                page["orders"].as_array().map(Vec::len)
            }
        })
        .await;
        println!(
            "[storm] seed {seed}: {} fake index entries published, listings during the storm answered {:?}; after it, a listing of {listed} orders",
            counts.index_entries.load(Ordering::Relaxed),
            counts.listings.lock().expect("lock")
        );
        println!(
            "[storm] seed {seed}: {} message ids taken first, {} forged retries published, {} malformed-header work messages sent after a taken sweep id",
            counts.taken_ids.load(Ordering::Relaxed),
            counts.forged_retries.load(Ordering::Relaxed),
            counts.taken_poisoned.load(Ordering::Relaxed)
        );
    }
}

/// What the attacks at the edges of retry, watches and the index saw.
#[derive(Default)]
struct EdgeCounts {
    cycles: AtomicUsize,
    cancel_refused_503: AtomicUsize,
    retry_refused_503: AtomicUsize,
    replaced: AtomicUsize,
    watches_open: AtomicUsize,
    watches_refused: AtomicUsize,
    health_answered: AtomicUsize,
    /// `/healthz` answered 503 for want of a connection: what watches must never cause.
    health_crowded_out: AtomicUsize,
    index_entries: AtomicUsize,
    listings: Mutex<BTreeMap<u16, usize>>,
    taken_ids: AtomicUsize,
    forged_retries: AtomicUsize,
    replies: AtomicUsize,
    hostile_replies: AtomicUsize,
    taken_poisoned: AtomicUsize,
}

/// The attacks at the edges, and the orders cancelled and retried over and over ("side orders").
struct Edges {
    counts: Arc<EdgeCounts>,
    /// Every side order there was; the last `SIDE_ORDERS` are the ones cycled.
    side: Arc<Mutex<Vec<Uuid>>>,
    running: Option<Task>,
    watching: Option<Task>,
    /// An order whose document nobody changes (it has no work message): its watches stay open.
    watched: Uuid,
    /// While set, the step handler sends some replies with a malformed header block.
    hostile_replies: Arc<std::sync::atomic::AtomicBool>,
}

/// A task of the storm's, with what stops it.
type Task = (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
);

/// The node whose steps are done by the storm's step handler over NATS.
const NATS_STEPS_NODE: usize = 2;
/// Its step timeout: a reply lost and waited out shows as an order failed after this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Side orders cycled at once.
const SIDE_ORDERS: usize = 3;
/// Cancel-retry cycles of one side order before the next.
const TURNS_PER_ORDER: usize = 10;
/// The longest reason a cancel may carry.
const LONGEST_REASON: usize = 1000;
/// One cancel in this many carries the longest reason, the others a short one: an order's kept
/// history always holds some of the longest reasons, without every revision of every side order
/// weighing near the most a document may (that bound is tested in `tests/edges.rs`).
const LONG_REASON_EVERY: usize = 4;
/// Each node's connection cap in the storm, so that watches can reach it.
const STORM_MAX_CONNECTIONS: usize = 48;

fn live_nodes(submitted: &Submitted) -> Vec<String> {
    submitted.nodes.lock().expect("lock").clone()
}

/// `POST <node>/orders/<id>/<action>`; the status, or `None` when no answer came in time.
async fn act(
    http: &reqwest::Client,
    node: &str,
    id: Uuid,
    action: &str,
    body: Value,
) -> Option<u16> {
    http.post(format!("{node}/orders/{id}/{action}"))
        .timeout(Duration::from_secs(3))
        .json(&body)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// The state of the order's document, read as text (its `state` comes before its payload).
async fn state_of(kv: &jetstream::kv::Store, id: Uuid) -> Option<String> {
    let read = tokio::time::timeout(Duration::from_secs(3), kv.get(id.to_string()));
    let raw = read.await.ok()?.ok()??;
    let doc: Value = serde_json::from_slice(&raw).ok()?;
    doc["state"].as_str().map(str::to_owned)
}

/// Cancels and retries the side orders until `stop`: a cancel (now and then with the longest reason), a wait for
/// the order to end, a retry. An order that completed before its cancel is replaced by a new one.
async fn cycle_side_orders(
    side: Arc<Mutex<Vec<Uuid>>>,
    submitted: Arc<Submitted>,
    js: jetstream::Context,
    counts: Arc<EdgeCounts>,
    stop: tokio_util::sync::CancellationToken,
) {
    // The bucket, asked for here: the cluster may be in the middle of another fault.
    let kv = loop {
        if let Ok(Ok(kv)) =
            tokio::time::timeout(Duration::from_secs(5), js.get_key_value("orders")).await
        {
            break kv;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    let http = reqwest::Client::new();
    let longest = "\u{1}".repeat(LONGEST_REASON);
    let mut turn = 0usize;
    while !stop.is_cancelled() {
        turn += 1;
        let nodes = live_nodes(&submitted);
        let active: Vec<Uuid> = {
            let side = side.lock().expect("lock");
            side[side.len().saturating_sub(SIDE_ORDERS)..].to_vec()
        };
        if nodes.is_empty() || active.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let node = &nodes[turn % nodes.len()];
        // The same order a few turns in a row: its next cancel follows its retry at once, before
        // the new attempt can run to its end.
        let id = active[(turn / TURNS_PER_ORDER) % active.len()];
        let reason = if turn.is_multiple_of(LONG_REASON_EVERY) {
            longest.as_str()
        } else {
            "storm: cancelled to be retried"
        };
        match act(&http, node, id, "cancel", json!({ "reason": reason })).await {
            Some(200 | 202) => {}
            Some(409) => {
                if state_of(&kv, id).await.as_deref() == Some("Completed") {
                    // It ran to its end between two cycles: a new one takes its place.
                    if let Some(new) = submit_side_order(&http, node).await {
                        side.lock().expect("lock").push(new);
                        counts.replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            }
            Some(503) => {
                counts.cancel_refused_503.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => continue,
        }
        let ended = async {
            loop {
                if let Some("Cancelled" | "Failed" | "Completed") =
                    state_of(&kv, id).await.as_deref()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            done = tokio::time::timeout(Duration::from_secs(10), ended) => if done.is_err() { continue },
        }
        match act(&http, node, id, "retry", Value::Null).await {
            Some(202) => {
                counts.cycles.fetch_add(1, Ordering::Relaxed);
            }
            Some(503) => {
                counts.retry_refused_503.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

async fn submit_side_order(http: &reqwest::Client, node: &str) -> Option<Uuid> {
    let response = http
        .post(format!("{node}/orders"))
        .timeout(Duration::from_secs(3))
        .json(&json!({ "side": true }))
        .send()
        .await
        .ok()?;
    if response.status() != 202 {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["order_id"].as_str()?.parse().ok()
}

/// Opens watches on every node until they are refused, keeps them open until `stop`, and asks each
/// node's `/healthz` every 0.5 s meanwhile.
async fn abuse_watches(
    submitted: Arc<Submitted>,
    watched: Uuid,
    counts: Arc<EdgeCounts>,
    stop: tokio_util::sync::CancellationToken,
) {
    let watcher = reqwest::Client::builder()
        .pool_max_idle_per_host(STORM_MAX_CONNECTIONS)
        .build()
        .expect("a client");
    let prober = reqwest::Client::new();
    let mut open = Vec::new();
    for node in live_nodes(&submitted) {
        for _ in 0..STORM_MAX_CONNECTIONS {
            let watch = watcher
                .get(format!("{node}/orders/{watched}/events"))
                .timeout(Duration::from_secs(120))
                .send();
            match tokio::time::timeout(Duration::from_secs(3), watch).await {
                Ok(Ok(response)) if response.status() == 200 => {
                    counts.watches_open.fetch_add(1, Ordering::Relaxed);
                    open.push(response);
                }
                Ok(Ok(response)) if response.status() == 503 => {
                    counts.watches_refused.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ => break,
            }
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for node in live_nodes(&submitted) {
            let asked = prober
                .get(format!("{node}/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let Ok(response) = asked else { continue };
            counts.health_answered.fetch_add(1, Ordering::Relaxed);
            if response.status() == 503 {
                let body = response.text().await.unwrap_or_default();
                if body.contains("too_many_connections") {
                    counts.health_crowded_out.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    drop(open);
}

/// Publishes `count` index entries of orders that do not exist, and a few messages that are no
/// entries at all, as any client of an open server can.
async fn spam_index(client: &async_nats::Client, count: usize) -> usize {
    let mut sent = 0;
    for n in 0..count {
        let id = Uuid::now_v7();
        let entry = if n % 100 == 0 {
            "not an entry".to_owned()
        } else {
            json!({
                "order_id": id,
                "state": "Failed",
                "current_step": "Failed",
                "start_time": Utc::now(),
                "complete_time": Utc::now(),
                "base": 3,
            })
            .to_string()
        };
        if client
            .publish(format!("orders.index.{id}.Failed"), entry.into())
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    sent
}

/// Publishes `payload` on `subject` with `headers`; the stream sequence it was stored at, if it
/// was (the cluster may be in the middle of another fault).
async fn publish_with(
    js: &jetstream::Context,
    subject: String,
    headers: &[(&str, &str)],
) -> Option<u64> {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    let published = async {
        js.publish_with_headers(subject, map, "{}".into())
            .await
            .ok()?
            .await
            .ok()
    };
    let ack = tokio::time::timeout(Duration::from_secs(5), published)
        .await
        .ok()??;
    (!ack.duplicate).then_some(ack.sequence)
}

/// The storm's step handler: answers every step call of the node that calls its steps over NATS after
/// the storm's step time, and, while `hostile` is set, one reply in three with a header block the
/// node's NATS client cannot parse (sent raw to the reply subject), which drops the connection it
/// arrives on.
async fn step_handler(
    client: async_nats::Client,
    urls: String,
    hostile: Arc<std::sync::atomic::AtomicBool>,
    counts: Arc<EdgeCounts>,
) {
    use futures::StreamExt;
    let Ok(mut calls) = client
        .queue_subscribe("orders.steps.>", "storm-steps".into())
        .await
    else {
        return;
    };
    while let Some(call) = calls.next().await {
        let Some(reply) = call.reply.clone() else {
            continue;
        };
        let n = counts.replies.fetch_add(1, Ordering::Relaxed);
        let bad = hostile.load(Ordering::Relaxed) && n.is_multiple_of(3);
        let (client, urls, counts) = (client.clone(), urls.clone(), counts.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if bad {
                let header = MALFORMED[n % MALFORMED.len()];
                if let Ok(mut raw) = RawClient::connect(&urls).await {
                    if raw.hpub(&reply, header, b"{}").await.is_ok() {
                        counts.hostile_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else {
                let _ = client.publish(reply, "{}".into()).await;
            }
        });
    }
}

/// Writes the document of a queued order that has no work message: nobody changes it, so a watch of
/// it stays open until the client goes.
async fn put_unrun_order(kv: &jetstream::kv::Store, id: Uuid) {
    let payload = serde_json::value::RawValue::from_string(r#"{"watched":true}"#.to_owned())
        .expect("a JSON object");
    let order = orderly::Order::queued(
        id,
        payload,
        orderly::domain::order::Interface::Http,
        Utc::now(),
    );
    let doc = serde_json::to_string(&order).expect("an order serializes");
    kv.create(id.to_string(), doc.into())
        .await
        .expect("the watched order is written");
}

/// Takes the ids Orderly gives its own messages and forges retries: for each of `targets`, a new
/// order whose message takes the id a retry of the target used to have, and a work message that
/// claims to be the target's retry; then a new order whose message takes the id of the sweep's copy
/// of the next sequence, and a work message with a malformed header block at that sequence.
async fn take_ids(
    js: jetstream::Context,
    urls: String,
    submitted: Arc<Submitted>,
    counts: Arc<EdgeCounts>,
    targets: Vec<Uuid>,
) {
    let take_id = |taken: String| {
        let (js, submitted, counts) = (js.clone(), submitted.clone(), counts.clone());
        async move {
            let other = Uuid::now_v7();
            let subject = format!("orders.submit.{other}");
            if publish_with(&js, subject, &[("Nats-Msg-Id", &taken)])
                .await
                .is_some()
            {
                submitted.accepted.lock().expect("lock").push(other);
                counts.taken_ids.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    for id in &targets {
        take_id(format!("{id}.retry.1")).await;
        // A forged retry of an order that has ended: one of an order in flight would be a second
        // message beside its own at the same delivery, which the lease audit cannot tell apart.
        let ended = async {
            let kv = js.get_key_value("orders").await.ok()?;
            let raw = kv.get(id.to_string()).await.ok()??;
            let doc: Value = serde_json::from_slice(&raw).ok()?;
            Some(is_terminal(&doc))
        };
        if tokio::time::timeout(Duration::from_secs(5), ended).await != Ok(Some(true)) {
            continue;
        }
        let forged = format!("{id}.retry.1.{}", Uuid::new_v4().simple());
        let subject = format!("orders.submit.{id}");
        let headers = [("Nats-Msg-Id", forged.as_str()), ("Orderly-Retry", "1")];
        if publish_with(&js, subject, &headers).await.is_some() {
            counts.forged_retries.fetch_add(1, Ordering::Relaxed);
        }
    }
    let last = async {
        let mut stream = js.get_stream("ORDERS").await.ok()?;
        stream.info().await.ok().map(|i| i.state.last_sequence)
    };
    if let Ok(Some(last)) = tokio::time::timeout(Duration::from_secs(5), last).await {
        take_id(format!("orderly-requeue-{}", last + 2)).await;
        if let Some(poisoned) = poison_message(&urls, MALFORMED[0]).await {
            submitted.accepted.lock().expect("lock").push(poisoned);
            counts.taken_poisoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publishes a work message with the malformed header block `header` straight into the stream; its
/// order's id, if the stream stored it.
async fn poison_message(urls: &str, header: &[u8]) -> Option<Uuid> {
    let id = Uuid::now_v7();
    let sent = async {
        let mut client = RawClient::connect(urls).await.ok()?;
        let subject = format!("orders.submit.{id}");
        let ack = client
            .request(&subject, header, br#"{"customer":"mallory"}"#)
            .await
            .ok()?;
        stored_in(&ack, "ORDERS")
    };
    let stored = tokio::time::timeout(Duration::from_secs(5), sent).await;
    matches!(stored, Ok(Some(_))).then_some(id)
}

/// Pages of failed orders a listing after an index spam walks: each page looks at up to 1 000
/// entries and removes those with no order behind them, so a few pages clear a spam of 2 000.
const SPAM_PAGES: usize = 8;

/// Publishes 2 000 index entries of orders that do not exist, then walks `node`'s listing of failed
/// orders a few pages down, counting each page's answer.
async fn spam_index_and_list(
    client: async_nats::Client,
    node: Option<String>,
    counts: Arc<EdgeCounts>,
) {
    let sent = spam_index(&client, 2_000).await;
    counts.index_entries.fetch_add(sent, Ordering::Relaxed);
    let Some(node) = node else {
        *counts.listings.lock().expect("lock").entry(0).or_default() += 1;
        return;
    };
    let http = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    for _ in 0..SPAM_PAGES {
        let mut query = vec![("state", "Failed".to_owned()), ("limit", "10".to_owned())];
        query.extend(cursor.take().map(|c| ("cursor", c)));
        let answer = http
            .get(format!("{node}/orders"))
            .query(&query)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let status = answer.as_ref().map_or(0, |r| r.status().as_u16());
        *counts
            .listings
            .lock()
            .expect("lock")
            .entry(status)
            .or_default() += 1;
        let Ok(answer) = answer.and_then(reqwest::Response::error_for_status) else {
            return;
        };
        let page: Value = answer.json().await.unwrap_or_default();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return,
        }
    }
}
