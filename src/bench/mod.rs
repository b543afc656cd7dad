//! `orderly bench`: measures Orderly on a NATS deployment, in one run.
//!
//! It compares real node processes (this binary, spawned) with a floor — a tight loop doing exactly
//! the node's NATS operations per order ([`mix::ORDERLY`]) — in alternating rounds, then measures how
//! throughput grows with nodes at real step times, what an order takes beyond its steps, reads by id
//! through the HTTP API against reads straight from the bucket, and a node's memory. Progress goes to
//! stderr, the table to stdout, the figures as JSON to `--json`.
//!
//! With no `--nats-url` (or `NATS_URL`) it starts a private nats-server on a free port with its own
//! store. Every node and the private server are killed when the run ends, however it ends (Ctrl-C
//! included). On a given server the run deletes and recreates `ORDERS`, `orders` and
//! `ORDERS_INDEX`, so it refuses a server where they hold anything.
//!
//! Layout: [`mix`] (the op mix), `floor` (its replay), `nodes` (processes, the reset), `phases` (what
//! runs on nodes), `query` (reads under load), `load` (preloading), `target` (the server), `report`.

mod floor;
mod load;
pub mod mix;
mod nodes;
mod phases;
mod query;
mod report;
mod target;

use anyhow::Context;
use async_nats::jetstream;
use report::{median, Parameters, Report, Round};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `orderly bench`: measure Orderly against what NATS allows.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The NATS server to measure. Unset: a private nats-server on a free port, with its own
    /// temporary store, stopped at the end. A given server must not hold Orderly data: the run deletes
    /// and recreates the ORDERS and ORDERS_INDEX streams and the orders bucket.
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// The nats-server binary for the private server.
    #[arg(long, env = "ORDERLY_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,

    /// Orders preloaded for each drain, by the floor and by the nodes [default: 20000; --quick: 2000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub orders: Option<u64>,

    /// Nodes (and floor node-equivalents) of 50 workers each in the drains.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub nodes: u64,

    /// Rounds of floor then nodes; the medians are reported [default: 3; --quick: 1].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub rounds: Option<u64>,

    /// Scaling is measured at 1, 2, 4, 8, 16 nodes up to this [default: 16; --quick: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_nodes: Option<u64>,

    /// The step time of the scaling, overhead and query phases.
    #[arg(long, default_value = "100ms", value_parser = parse_step)]
    pub scaling_step: Duration,

    /// Orders queued behind a busy node for its memory figure [default: 100000; --quick: 10000].
    #[arg(long)]
    pub rss_queued_orders: Option<u64>,

    /// A short run (about a minute): fewer orders, one round, up to 2 nodes, shorter windows.
    #[arg(long)]
    pub quick: bool,

    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

fn parse_step(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use a duration like 100ms)"))?;
    if d < Duration::from_millis(10) {
        return Err("must be at least 10ms".into());
    }
    Ok(d)
}

/// The settings of a run, with `--quick`'s defaults applied.
#[derive(Debug, Clone)]
struct Plan {
    orders: usize,
    nodes: usize,
    rounds: usize,
    max_nodes: usize,
    step: Duration,
    window: phases::Window,
    overhead_load: f64,
    overhead_for: Duration,
    query_concurrency: usize,
    query_for: Duration,
    rss_queued: usize,
    rss_sample: Duration,
    quick: bool,
}

impl Plan {
    fn new(args: &Args) -> Plan {
        let quick = args.quick;
        let pick = |given: Option<u64>, full: u64, short: u64| {
            given.unwrap_or(if quick { short } else { full }) as usize
        };
        let secs = |full: u64, short: u64| Duration::from_secs(if quick { short } else { full });
        Plan {
            orders: pick(args.orders, 20_000, 2_000),
            nodes: args.nodes as usize,
            rounds: pick(args.rounds, 3, 1),
            max_nodes: pick(args.max_nodes, 16, 2),
            step: args.scaling_step,
            window: phases::Window {
                warm_up: secs(3, 1),
                measure: secs(10, 3),
            },
            overhead_load: 0.3,
            overhead_for: secs(20, 4),
            query_concurrency: 64,
            query_for: secs(10, 2),
            rss_queued: pick(args.rss_queued_orders, 100_000, 10_000),
            rss_sample: secs(2, 1),
            quick,
        }
    }

    /// 1, 2, 4, 8, 16 ... nodes, up to `max_nodes` (and `max_nodes` itself).
    fn scaling_nodes(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = std::iter::successors(Some(1), |n| Some(n * 2))
            .take_while(|n| *n <= self.max_nodes)
            .collect();
        if counts.last() != Some(&self.max_nodes) {
            counts.push(self.max_nodes);
        }
        counts
    }
}

/// Runs the benchmark until it is done or interrupted (Ctrl-C, SIGTERM); either way every process it
/// started is stopped.
pub async fn run(args: Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    tokio::select! {
        done = measure(args) => done,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; every node and the private server were stopped"),
        _ = term.recv() => anyhow::bail!("terminated; every node and the private server were stopped"),
    }
}

async fn measure(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args);
    let started = Instant::now();
    let target = target::Target::open(args.nats_url.as_deref(), &args.nats_server).await?;
    let client = async_nats::connect(&target.url)
        .await
        .with_context(|| format!("cannot connect to {}", target.url))?;
    let version = client.server_info().version;
    let js = jetstream::new(client);
    if !target.is_private() {
        nodes::check_empty(&js).await?;
    }
    progress(&format!(
        "nats-server {version} at {} ({}), {} cores",
        target.url,
        if target.is_private() {
            "private"
        } else {
            "given"
        },
        cores()
    ));
    let mut spawner = nodes::Spawner::new(&target.url, target.scratch.path().join("nodes"))?;
    let drain_timeout = Duration::from_secs(60) + Duration::from_millis(plan.orders as u64 * 5);

    let mut rounds = Vec::new();
    for round in 1..=plan.rounds {
        let floor = floor::drain(
            &target.url,
            mix::ORDERLY,
            plan.orders,
            plan.nodes,
            drain_timeout,
        )
        .await
        .context("floor")?;
        progress(&format!(
            "round {round}/{}: floor {:.0} orders/s ({} orders, {} x 50 in flight)",
            plan.rounds, floor, plan.orders, plan.nodes
        ));
        let drained = phases::drain(&js, &mut spawner, plan.orders, plan.nodes, drain_timeout)
            .await
            .context("node drain")?;
        progress(&format!(
            "round {round}/{}: {} node(s) {:.0} orders/s, {:.2} writes and {:.2} events per order",
            plan.rounds,
            plan.nodes,
            drained.orders_per_s,
            drained.writes_per_order,
            drained.events_per_order
        ));
        rounds.push(Round {
            round,
            floor_orders_per_s: floor,
            nodes: drained,
            ratio_to_floor: drained.orders_per_s / floor,
        });
    }

    let mut scaling = Vec::new();
    for count in plan.scaling_nodes() {
        let scale = phases::scale(&js, &mut spawner, count, plan.step, plan.window)
            .await
            .with_context(|| format!("scaling at {count} node(s)"))?;
        progress(&format!(
            "scaling: {count} node(s) at {} steps: {:.1} orders/s of {:.1} ideal ({:.0} %)",
            humantime::format_duration(plan.step),
            scale.orders_per_s,
            scale.ideal_orders_per_s,
            scale.efficiency * 100.0
        ));
        scaling.push(scale);
    }

    nodes::reset(&js).await?;
    let node = spawner
        .start(1, plan.step)
        .await?
        .pop()
        .context("one node")?;
    let overhead = phases::overhead(&js, plan.step, plan.overhead_load, plan.overhead_for)
        .await
        .context("overhead")?;
    progress(&format!(
        "overhead: {} orders at {:.1}/s: p50 {:.1} ms, p99 {:.1} ms beyond 4 x {}",
        overhead.orders,
        overhead.submitted_per_s,
        overhead.p50_ms,
        overhead.p99_ms,
        humantime::format_duration(plan.step)
    ));
    let reads = phases::reads(
        &js,
        &node,
        &overhead.ids,
        plan.query_concurrency,
        plan.query_for,
    )
    .await
    .context("reads")?;
    progress(&format!(
        "reads: GET /orders/{{id}} {:.0}/s (p99 {:.2} ms), KV get {:.0}/s (p99 {:.2} ms), {} at once",
        reads.http_per_s, reads.http_p99_ms, reads.kv_per_s, reads.kv_p99_ms, reads.concurrency
    ));
    node.stop(Duration::from_secs(15)).await;

    let memory = phases::memory(&js, &mut spawner, plan.rss_queued, plan.rss_sample)
        .await
        .context("memory")?;
    progress(&format!(
        "memory: {:.1} MiB with 50 busy workers, {:.1} MiB with {} orders queued",
        memory.busy_mib, memory.queued_mib, memory.queued_orders
    ));

    let report = Report {
        parameters: Parameters {
            orders: plan.orders,
            nodes: plan.nodes,
            rounds: plan.rounds,
            max_nodes: plan.max_nodes,
            quick: plan.quick,
            scaling_step_ms: plan.step.as_secs_f64() * 1000.0,
            scaling_warm_up_s: plan.window.warm_up.as_secs_f64(),
            scaling_window_s: plan.window.measure.as_secs_f64(),
            overhead_load: plan.overhead_load,
            overhead_s: plan.overhead_for.as_secs_f64(),
            overhead_orders: overhead.orders,
            query_concurrency: plan.query_concurrency,
            query_s: plan.query_for.as_secs_f64(),
            rss_queued_orders: memory.queued_orders,
            nats_server: if target.is_private() {
                "private"
            } else {
                "given"
            },
            nats_server_version: version,
            cores: cores(),
            orderly_version: env!("CARGO_PKG_VERSION"),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        op_mix: mix::ORDERLY.summary(),
        floor_orders_per_s: median(rounds.iter().map(|r| r.floor_orders_per_s)),
        orders_per_s: median(rounds.iter().map(|r| r.nodes.orders_per_s)),
        ratio_to_floor: median(rounds.iter().map(|r| r.ratio_to_floor)),
        writes_per_order: median(rounds.iter().map(|r| r.nodes.writes_per_order)),
        floor_writes_per_order: mix::ORDERLY.writes.len() as f64,
        events_per_order: median(rounds.iter().map(|r| r.nodes.events_per_order)),
        floor_events_per_order: mix::ORDERLY.events() as f64,
        scaling,
        overhead_p50_ms: overhead.p50_ms,
        overhead_p99_ms: overhead.p99_ms,
        query_per_s: reads.http_per_s,
        query_p50_ms: reads.http_p50_ms,
        query_p99_ms: reads.http_p99_ms,
        kv_get_per_s: reads.kv_per_s,
        kv_get_p50_ms: reads.kv_p50_ms,
        kv_get_p99_ms: reads.kv_p99_ms,
        query_ratio_to_kv: reads.http_per_s / reads.kv_per_s,
        rss_busy_mib: memory.busy_mib,
        rss_queued_mib: memory.queued_mib,
        rss_queued_orders: memory.queued_orders,
        rounds,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    progress(&format!("done in {:.0?}", started.elapsed()));
    target.close().await;
    Ok(())
}

/// One line of progress on stderr.
fn progress(line: &str) {
    eprintln!("bench: {line}");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn quick_shrinks_what_was_not_given() {
        let cli = Cli::try_parse_from(["bench", "--quick", "--orders", "500"]).unwrap();
        let plan = Plan::new(&cli.args);
        assert_eq!(plan.orders, 500);
        assert_eq!(plan.rounds, 1);
        assert_eq!(plan.scaling_nodes(), [1, 2]);
        let full = Plan::new(&Cli::try_parse_from(["bench"]).unwrap().args);
        assert_eq!(full.scaling_nodes(), [1, 2, 4, 8, 16]);
        assert_eq!(full.rss_queued, 100_000);
        let odd = Cli::try_parse_from(["bench", "--max-nodes", "3"]).unwrap();
        assert_eq!(Plan::new(&odd.args).scaling_nodes(), [1, 2, 3]);
    }
}
