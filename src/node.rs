//! One Orderly node: connects to NATS (starting an embedded server when no URL is given), sets up the
//! JetStream objects, and runs the workers, the HTTP API, the NATS service and the node heartbeat
//! until it is told to stop. If any of them dies, the node stops instead of limping on.

use crate::api::http::{self, AppState};
use crate::api::intake::Intake;
use crate::config::Config;
use crate::engine::lease::Connection;
use crate::engine::pipeline::{Pipeline, Stop};
use crate::engine::steps::{FailureDraw, Simulated, Steps};
use crate::engine::write::Writer;
use crate::ops::audit::Audit;
use crate::ops::cluster::Cluster;
use crate::ops::events::Events;
use crate::ops::stats::WorkerStats;
use crate::queue::connect::{self, Role};
use crate::queue::embedded::EmbeddedServer;
use crate::queue::follow::Follow;
use crate::queue::give_up::GiveUp;
use crate::queue::process::Processor;
use crate::queue::pull::Puller;
use crate::queue::setup::{self, Layout};
use crate::queue::sweep::Sweep;
use crate::store::OrderStore;
use anyhow::Context as _;
use futures::FutureExt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A readable, unique default node id: the host name and a random suffix.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let host = if host.is_empty() {
        "node".to_owned()
    } else {
        host
    };
    format!("{host}-{:04x}", rand::random::<u16>())
}

/// Runs a node until `shutdown` completes, then drains it: stops fetching, hands in-flight orders back
/// at a step boundary within the grace period, and exits.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let node_id = config.node_id.clone().unwrap_or_else(default_node_id);
    let metrics = crate::ops::metrics::install(&node_id);
    crate::queue::settle::zero_counters();
    tokio::pin!(shutdown);

    // An empty NATS_URL counts as unset.
    let (url, embedded) = match config
        .nats_url
        .as_deref()
        .map(str::trim)
        .filter(|url| !url.is_empty())
    {
        Some(url) => (url.to_owned(), None),
        None => {
            let server = EmbeddedServer::start(
                &config.nats_server,
                config.embedded_nats_addr,
                &config.data_dir,
            )
            .await?;
            (format!("nats://{}", config.embedded_nats_addr), server)
        }
    };
    let result = run_connected(&config, node_id, &url, metrics, &mut shutdown).await;
    if let Some(server) = embedded {
        server.stop().await;
    }
    result
}

async fn run_connected(
    config: &Config,
    node_id: String,
    url: &str,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let servers = connect::server_addrs(url)
        .map_err(anyhow::Error::msg)
        .context("NATS_URL")?;
    let drain = CancellationToken::new();
    let connection = Connection::default();
    let fetching = Connection::default();
    let connections = tokio::select! {
        connected = async {
            let work = connect::connect(&servers, &node_id, Role::Work, &connection, &drain).await?;
            let fetch = connect::connect(&servers, &node_id, Role::Fetch, &fetching, &drain).await?;
            let public = connect::connect(&servers, &node_id, Role::Public, &Connection::default(), &drain).await?;
            Some((work, fetch, public))
        } => connected,
        _ = shutdown.as_mut() => None,
    };
    let Some((client, fetch, public)) = connections else {
        tracing::info!("stopped before connecting to NATS");
        return Ok(());
    };
    let js = async_nats::jetstream::new(client.clone());
    let public_js = async_nats::jetstream::new(public.clone());
    let setup_deadline = Instant::now() + SETUP_PATIENCE;
    let layout = Layout {
        replicas: config.replicas,
        ack_wait: config.ack_wait,
    };
    let setup = loop {
        match setup::setup(&js, layout).await {
            Ok(setup) => break setup,
            // A cluster that is still forming cannot place replicas yet; JetStream may come up later.
            Err(e @ setup::SetupError::Nats { .. }) if Instant::now() < setup_deadline => {
                tracing::warn!(error = %e, "JetStream not ready; retrying in 1s");
                tokio::select! {
                    _ = shutdown.as_mut() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (ORDERLY_HTTP_ADDR)", config.http_addr))?;
    let http_addr = listener.local_addr()?.to_string();

    let audit = match &config.audit_log {
        Some(path) => Audit::open(path, &node_id).with_context(|| {
            format!(
                "cannot open the audit log {} (ORDERLY_AUDIT_LOG)",
                path.display()
            )
        })?,
        None => Audit::off(),
    };
    let store = OrderStore::new(setup.orders.clone(), audit.clone());
    let public_orders = public_js
        .get_key_value(crate::store::BUCKET)
        .await
        .context("cannot open the orders bucket")?;
    let public_store = OrderStore::new(public_orders, audit.clone());
    let events = Events::new(client.clone(), node_id.clone());
    let follow = Follow::new(
        setup.stream.clone(),
        layout,
        setup.consumer.cached_info(),
        connection.clone(),
    );
    let health = follow.health();
    let stats = Arc::new(WorkerStats::default());
    let stop = Stop {
        drain: drain.clone(),
        abort: CancellationToken::new(),
    };
    let writer = Writer::new(store.clone(), events.clone());
    let steps: Arc<dyn Steps> = Arc::new(Simulated {
        step_duration: config.step_duration,
        rollback_duration: config.rollback_duration(),
        failures: FailureDraw {
            rates: config.failure_rate,
            seed: config.seed,
        },
    });
    let pipeline = Arc::new(Pipeline::new(node_id.clone(), steps, writer.clone()));
    let fetch_consumer = async_nats::jetstream::new(fetch.clone())
        .get_consumer_from_stream(setup::CONSUMER, setup::STREAM)
        .await
        .context("cannot open the consumer on the fetch connection")?;
    let processor = Processor {
        pipeline,
        give_up: GiveUp {
            writer,
            stream: setup.stream.clone(),
            stats: stats.clone(),
        },
        stats: stats.clone(),
        audit: audit.clone(),
        windows: follow.windows(),
        max_deliver: u32::try_from(config.max_deliver).unwrap_or(u32::MAX),
    };
    let worker = Puller::new(
        fetch_consumer,
        js.clone(),
        connection.clone(),
        health.clone(),
        config.workers as usize,
        processor,
    );
    let sweep = Sweep::new(
        js.clone(),
        setup.stream.clone(),
        store.clone(),
        follow.windows(),
        setup.nodes.clone(),
        node_id.clone(),
        fetching,
    );
    let cluster = Cluster {
        kv: setup.nodes.clone(),
        node_id: node_id.clone(),
        http_addr: http_addr.clone(),
        started_at: crate::clock::now(),
        workers: config.workers as usize,
        interval: config.node_heartbeat,
        stats,
        draining: drain.clone(),
        last_beat: Default::default(),
    };
    let intake = Intake {
        js: public_js,
        store: public_store,
        events: Events::new(public.clone(), node_id.clone()),
    };
    let app = http::router(AppState {
        intake: intake.clone(),
        cluster: cluster.clone(),
        clients: [client.clone(), fetch.clone(), public.clone()],
        health,
        metrics,
        draining: drain.clone(),
    });

    let heartbeat_stop = CancellationToken::new();
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let worker_stop = stop.clone();
    tasks.spawn(async move { ("workers", worker.run(worker_stop).await) });
    let heartbeat = heartbeat_stop.clone();
    tasks.spawn(async move {
        cluster.run(heartbeat).await;
        (HEARTBEAT_TASK, Ok(()))
    });
    let poll = crate::ops::metrics::poll_queue(
        setup.stream.clone(),
        setup.consumer.clone(),
        QUEUE_POLL,
        drain.clone(),
    );
    tasks.spawn(poll.map(|()| ("queue metrics", Ok(()))));
    let http_drain = drain.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(http_drain.cancelled_owned())
            .await;
        ("http server", served.map_err(anyhow::Error::from))
    });
    tasks.spawn(follow.run(drain.clone()).map(|r| ("consumer follower", r)));
    tasks.spawn(sweep.run(drain.clone()).map(|r| ("sweep", r)));
    tasks.spawn(
        intake
            .serve_nats(public.clone(), node_id.clone(), drain.clone())
            .map(|r| ("nats service", r)),
    );
    tracing::info!(
        node.id = %node_id,
        http = %http_addr,
        nats = url,
        workers = config.workers,
        step_duration = %humantime::format_duration(config.step_duration),
        failure_rate = %config.failure_rate,
        ack_wait = %humantime::format_duration(config.ack_wait),
        "node started"
    );

    let mut failure = None;
    let mut heartbeat_running = true;
    tokio::select! {
        _ = shutdown.as_mut() => tracing::info!("shutdown requested: draining"),
        Some(joined) = tasks.join_next() => {
            let (name, result) = joined.unwrap_or_else(|e| ("a task", Err(anyhow::anyhow!("panicked: {e}"))));
            heartbeat_running = name != HEARTBEAT_TASK;
            let error = result.err().map_or_else(|| "it returned".to_owned(), |e| format!("{e:#}"));
            tracing::error!(task = name, %error, "a task of the node stopped; stopping the node");
            failure = Some(anyhow::anyhow!("{name} stopped: {error}"));
        }
    }

    // Drain: stop fetching and accepting; orders stop at their next step boundary, or when the grace
    // period ends, and are handed back.
    drain.cancel();
    let abort = stop.abort.clone();
    let grace = config.shutdown_grace;
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        tracing::warn!("shutdown grace period over: interrupting the orders still running");
        abort.cancel();
    });
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(5);
    while tasks.len() > usize::from(heartbeat_running) {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok((name, Err(e))))) => {
                tracing::warn!(task = name, error = %format!("{e:#}"), "task ended with an error")
            }
            Ok(Some(Ok((name, Ok(()))))) => heartbeat_running &= name != HEARTBEAT_TASK,
            Ok(Some(Err(e))) => tracing::error!(error = %e, "task panicked"),
            Ok(None) => break,
            Err(_) => {
                tracing::warn!("tasks did not stop in time");
                break;
            }
        }
    }
    heartbeat_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.abort_all();
    }
    // Bounded: with NATS unreachable a flush would wait for the connection to come back.
    for client in [&client, &fetch, &public] {
        match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the NATS connection"),
            Err(_) => tracing::warn!("NATS unreachable; exiting without flushing"),
        }
    }
    tracing::info!("node stopped");
    failure.map_or(Ok(()), Err)
}

const HEARTBEAT_TASK: &str = "node heartbeat";
/// How long a node retries setting up its JetStream objects before it gives up and exits.
const SETUP_PATIENCE: Duration = Duration::from_secs(60);
/// How often the work queue's state is read for the metrics.
const QUEUE_POLL: Duration = Duration::from_secs(5);
