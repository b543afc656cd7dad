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
//! Layout: [`mix`] (the op mix), `floor` and `document` (its replay), `nodes` (processes, the
//! reset), `phases` (what runs on nodes), `query` (reads under load), `load` (preloading), `plan`
//! (the settings), `target` (the server), `report`.

mod document;
mod floor;
mod load;
pub mod mix;
mod nodes;
mod phases;
mod plan;
mod query;
mod report;
mod target;

use anyhow::Context;
use async_nats::jetstream;
use plan::Plan;
use report::{Parameters, Report, Round};
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

/// Runs the benchmark until it is done or interrupted (Ctrl-C, SIGTERM); either way every process it
/// started is stopped.
pub async fn run(args: Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    let given = args.nats_url.clone();
    let why = tokio::select! {
        done = measure(args) => return done,
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    };
    // The nodes and the private server went with the run; a given server keeps the floor's objects
    // unless they are deleted now.
    if let Some(url) = given {
        floor::clean_up(&url).await;
    }
    anyhow::bail!("{why}; every node and the private server were stopped")
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
    let server = if target.is_private() {
        "private"
    } else {
        "given"
    };
    progress(&format!(
        "nats-server {version} at {} ({server}), {} cores",
        target.url,
        cores()
    ));
    let mut spawner = nodes::Spawner::new(&target.url, target.scratch.path().join("nodes"))?;

    let rounds = rounds(&plan, &target.url, &js, &mut spawner).await?;
    let scaling = scaling(&plan, &js, &mut spawner).await?;
    let (overhead, reads) = one_node(&plan, &js, &mut spawner).await?;
    let memory = phases::memory(&js, &mut spawner, plan.rss_queued, plan.rss_sample)
        .await
        .context("memory")?;
    progress(&format!(
        "memory: {:.1} MiB with 50 busy workers, {:.1} MiB with {} orders queued",
        memory.busy_mib, memory.queued_mib, memory.queued_orders
    ));

    let parameters = Parameters {
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
        nats_server: server,
        nats_server_version: version,
        cores: cores(),
        orderly_version: env!("CARGO_PKG_VERSION"),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    };
    let report = Report::new(parameters, rounds, scaling, &overhead, &reads, &memory);
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    progress(&format!("done in {:.0?}", started.elapsed()));
    target.close().await;
    Ok(())
}

/// The floor, then the nodes, on the same number of orders, `plan.rounds` times.
async fn rounds(
    plan: &Plan,
    url: &str,
    js: &jetstream::Context,
    spawner: &mut nodes::Spawner,
) -> anyhow::Result<Vec<Round>> {
    let timeout = Duration::from_secs(60) + Duration::from_millis(plan.orders as u64 * 5);
    let mut rounds = Vec::new();
    for round in 1..=plan.rounds {
        let floor = floor::drain(url, mix::ORDERLY, plan.orders, plan.nodes, timeout)
            .await
            .context("floor")?;
        progress(&format!(
            "round {round}/{}: floor {floor:.0} orders/s ({} orders, {} x 50 in flight)",
            plan.rounds, plan.orders, plan.nodes
        ));
        let drained = phases::drain(js, spawner, plan.orders, plan.nodes, timeout)
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
    Ok(rounds)
}

/// The steady state at each node count of the plan.
async fn scaling(
    plan: &Plan,
    js: &jetstream::Context,
    spawner: &mut nodes::Spawner,
) -> anyhow::Result<Vec<phases::Scale>> {
    let mut scaling = Vec::new();
    for count in plan.scaling_nodes() {
        let scale = phases::scale(js, spawner, count, plan.step, plan.window)
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
    Ok(scaling)
}

/// One node: the overhead at moderate load, then reads of the orders it ran.
async fn one_node(
    plan: &Plan,
    js: &jetstream::Context,
    spawner: &mut nodes::Spawner,
) -> anyhow::Result<(phases::Overhead, phases::Reads)> {
    nodes::reset(js).await?;
    let node = spawner
        .start(1, plan.step)
        .await?
        .pop()
        .context("one node")?;
    let overhead = phases::overhead(js, plan.step, plan.overhead_load, plan.overhead_for)
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
        js,
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
    Ok((overhead, reads))
}

/// One line of progress on stderr.
fn progress(line: &str) {
    eprintln!("bench: {line}");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
