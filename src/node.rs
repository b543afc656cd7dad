//! One Orderly node: connects to NATS (starting an embedded server when no URL is given), sets up the
//! JetStream objects, and runs the workers, the HTTP API, the NATS service and the node heartbeat
//! until it is told to stop. If any of them dies, the node stops instead of limping on.

use crate::api::auth::Tokens;
use crate::api::control::Control;
use crate::api::http::{AppState, HttpServer};
use crate::api::intake::Intake;
use crate::api::service::Service;
use crate::config::{BadSetting, Config, Secret, StepRunner};
use crate::engine::connection::Connection;
use crate::engine::interrupt::Interrupts;
use crate::engine::nats_steps::NatsSteps;
use crate::engine::pipeline::Pipeline;
use crate::engine::steps::{FailureDraw, Simulated, Steps};
use crate::engine::write::Writer;
use crate::index::OrderIndex;
use crate::ops::audit::Audit;
use crate::ops::cluster::Cluster;
use crate::ops::events::Events;
use crate::ops::metrics::QueueGauges;
use crate::ops::stats::WorkerStats;
use crate::queue::connect::{self, Role};
use crate::queue::credentials::{self, Access};
use crate::queue::embedded::EmbeddedServer;
use crate::queue::follow::Follow;
use crate::queue::give_up::GiveUp;
use crate::queue::process::Processor;
use crate::queue::pull::Puller;
use crate::queue::setup::{self, Layout, Setup};
use crate::queue::sweep::Sweep;
use crate::queue::wake::WakeListener;
use crate::store::OrderStore;
use crate::task::Task;
use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A readable, unique default node id: the host name and a random suffix.
pub fn default_node_id() -> String {
    let host = host_name()
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

/// The host name, as the kernel reports it.
#[cfg(target_os = "linux")]
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok()
}

/// The host name, as the system reports it (other Unix systems have no `/proc/sys`).
#[cfg(not(target_os = "linux"))]
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`, which lives for the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// Runs a node with the simulated steps the configuration describes until `shutdown` completes, then
/// drains it: stops fetching, hands in-flight orders back at a step boundary within the grace period,
/// and exits.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let steps = match config.steps {
        StepRunner::Simulated => StepsChoice::Given(Arc::new(Simulated {
            step_duration: config.step_duration,
            rollback_duration: config.rollback_duration(),
            failures: FailureDraw {
                rates: config.failure_rate,
                seed: config.seed,
            },
        })),
        StepRunner::Nats => StepsChoice::Nats(config.step_timeout),
    };
    run_node(config, steps, shutdown).await
}

/// [`run`], with `steps` doing the work of each step instead of the simulated steps.
pub async fn run_with(
    config: Config,
    steps: Arc<dyn Steps>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_node(config, StepsChoice::Given(steps), shutdown).await
}

/// What does the work of the steps: given before the node connects, or step handlers reached over
/// NATS on the node's steps connection once it has one.
enum StepsChoice {
    Given(Arc<dyn Steps>),
    Nats(Duration),
}

async fn run_node(
    config: Config,
    steps: StepsChoice,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let node_id = config.node_id.clone().unwrap_or_else(default_node_id);
    let access = HttpAccess::load(&config)?;
    // `POST /admin/drain` ends the node as `shutdown` does.
    let drain_request = access.drain_request.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = drain_request.cancelled() => {}
        }
    };
    let metrics = crate::ops::metrics::install(&node_id);
    crate::queue::settle::zero_counters();
    tokio::pin!(shutdown);

    // An empty NATS_URL counts as unset.
    let (url, embedded) = match config
        .nats_url
        .as_ref()
        .map(|url| url.expose().trim())
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
    let result = run_connected(
        &config,
        node_id,
        &url,
        metrics,
        steps,
        access,
        &mut shutdown,
    )
    .await;
    if let Some(server) = embedded {
        server.stop().await;
    }
    result
}

/// The signal that ends a node, as `run_with` was given it.
type Shutdown<'a, F> = Pin<&'a mut F>;

async fn run_connected<F: Future<Output = ()>>(
    config: &Config,
    node_id: String,
    url: &str,
    metrics: PrometheusHandle,
    steps: StepsChoice,
    access: HttpAccess,
    shutdown: &mut Shutdown<'_, F>,
) -> anyhow::Result<()> {
    let nats =
        Access::new(url, &nats_credentials(config)).map_err(|e| BadSetting::from_error(&e))?;
    let drain = CancellationToken::new();
    let steps_over_nats = matches!(steps, StepsChoice::Nats(_));
    let connections = tokio::select! {
        // A server that refuses the node (its user, password, token, credentials or TLS) is a setting
        // that cannot work: retrying would not help.
        connected = Connections::open(&nats, &node_id, steps_over_nats, &drain) => {
            connected.map_err(|e| BadSetting::from_error(&e))?
        }
        _ = shutdown.as_mut() => None,
    };
    let Some(connections) = connections else {
        tracing::info!("stopped before connecting to NATS");
        return Ok(());
    };
    check_server(&connections.work, config.replicas, nats.shown()).await?;
    let layout = Layout {
        replicas: config.replicas,
        ack_wait: config.ack_wait,
    };
    let Some(setup) = set_up(&connections.work, layout, shutdown).await? else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (ORDERLY_HTTP_ADDR)", config.http_addr))?;
    let http_addr = listener.local_addr()?.to_string();
    let steps: Arc<dyn Steps> = match steps {
        StepsChoice::Given(steps) => steps,
        // On a connection of their own: a client that drops the public connection (a header block
        // the NATS client cannot parse, sent to `orders.create`) cannot take a step's reply with it.
        StepsChoice::Nats(timeout) => {
            let (client, connection) = connections
                .steps
                .clone()
                .context("the steps connection is opened when the steps run over NATS")?;
            Arc::new(NatsSteps::new(client, timeout).with_connection(connection))
        }
    };
    let parts = Parts {
        config,
        node_id: &node_id,
        connections: &connections,
        setup,
        layout,
        drain,
        interrupts: Interrupts::default(),
        access,
    };
    let mut running = parts.start(listener, metrics, steps).await?;
    tracing::info!(
        node.id = %node_id,
        http = %http_addr,
        nats = nats.shown(),
        workers = config.workers,
        step_duration = %humantime::format_duration(config.step_duration),
        failure_rate = %config.failure_rate,
        steps = ?config.steps,
        ack_wait = %humantime::format_duration(config.ack_wait),
        "node started"
    );
    let failure = running.until_stopped(shutdown).await;
    running.drain(config.shutdown_grace).await;
    connections.flush().await;
    tracing::info!("node stopped");
    failure.map_or(Ok(()), Err)
}

/// What the NATS server must be able to do for these settings, checked once connected: JetStream, for
/// the account the node connects as, and a cluster for more than one replica. Each would otherwise
/// look like a server not ready yet, retried for a minute.
async fn check_server(
    client: &async_nats::Client,
    replicas: u8,
    shown: &str,
) -> Result<(), BadSetting> {
    let info = client.server_info();
    let server = format!("the NATS server at {shown}");
    if !info.jetstream {
        return Err(BadSetting::new(format!(
            "{server} (NATS_URL) does not run JetStream; start it with -js, or with a `jetstream {{ store_dir: ... }}` block in its configuration"
        )));
    }
    if replicas > 1 && info.cluster.is_none() {
        return Err(BadSetting::new(format!(
            "--replicas (ORDERLY_REPLICAS) is {replicas}, but {server} is a single server, not a cluster: set ORDERLY_REPLICAS=1, or run a cluster of at least {replicas} servers (see deploy/cluster/)"
        )));
    }
    let js = async_nats::jetstream::new(client.clone());
    if let Err(e) = js.query_account().await {
        if let async_nats::jetstream::context::AccountErrorKind::JetStream(error) = e.kind() {
            if error.error_code()
                == async_nats::jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            {
                return Err(BadSetting::new(format!(
                    "{server} has JetStream, but not for the account the node connects as (NATS_URL, ORDERLY_NATS_CREDS or ORDERLY_NATS_NKEY): connect as a user of an account with `jetstream: enabled` (see nats/accounts.conf)"
                )));
            }
        }
    }
    Ok(())
}

/// How the node authenticates to NATS, besides the credentials in `NATS_URL`.
fn nats_credentials(config: &Config) -> credentials::Settings {
    credentials::Settings {
        creds: config.nats_creds.clone(),
        nkey: config.nats_nkey.clone(),
        tls_ca: config.nats_tls_ca.clone(),
        tls_cert: config.nats_tls_cert.clone(),
        tls_key: config.nats_tls_key.clone(),
    }
}

/// Sets up the JetStream objects, retrying for a while: a cluster that is still forming cannot place
/// replicas yet, and JetStream may come up later. `None` if the node was told to stop meanwhile.
async fn set_up<F: Future<Output = ()>>(
    client: &async_nats::Client,
    layout: Layout,
    shutdown: &mut Shutdown<'_, F>,
) -> anyhow::Result<Option<Setup>> {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + SETUP_PATIENCE;
    loop {
        match setup::setup(&js, layout).await {
            Ok(setup) => return Ok(Some(setup)),
            Err(e @ setup::SetupError::Nats { .. }) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "JetStream not ready; retrying in 1s");
                tokio::select! {
                    _ = shutdown.as_mut() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The node's connections to NATS (see [`Role`]): three, and a fourth for the step handlers when
/// the steps run over NATS.
struct Connections {
    work: async_nats::Client,
    fetch: async_nats::Client,
    public: async_nats::Client,
    /// The steps connection, and its losses as step calls see them.
    steps: Option<(async_nats::Client, Connection)>,
    /// The work connection as leases see it.
    leases: Connection,
    /// The fetch connection as the sweep sees it: a bad header block drops it.
    fetching: Connection,
}

impl Connections {
    /// Connects all of them (the steps connection only if `steps`), retrying until they are up;
    /// `None` if `cancel` fires first, an error if the server refuses the node.
    async fn open(
        access: &Access,
        node_id: &str,
        steps: bool,
        cancel: &CancellationToken,
    ) -> Result<Option<Connections>, connect::Refused> {
        let leases = Connection::default();
        let fetching = Connection::default();
        let connect =
            |role, connection| connect::connect(access, node_id, role, connection, cancel);
        let Some(work) = connect(Role::Work, &leases).await? else {
            return Ok(None);
        };
        let Some(fetch) = connect(Role::Fetch, &fetching).await? else {
            return Ok(None);
        };
        let Some(public) = connect(Role::Public, &Connection::default()).await? else {
            return Ok(None);
        };
        let steps = if steps {
            let calls = Connection::default();
            let connecting = connect::connect(access, node_id, Role::Steps, &calls, cancel);
            let Some(client) = connecting.await? else {
                return Ok(None);
            };
            Some((client, calls))
        } else {
            None
        };
        Ok(Some(Connections {
            work,
            fetch,
            public,
            steps,
            leases,
            fetching,
        }))
    }

    /// The connections readiness depends on: work, fetch and public.
    fn clients(&self) -> [async_nats::Client; 3] {
        [self.work.clone(), self.fetch.clone(), self.public.clone()]
    }

    /// Flushes what is still buffered; bounded, since with NATS unreachable a flush would wait for
    /// the connection to come back.
    async fn flush(&self) {
        let steps = self.steps.iter().map(|(client, _)| client.clone());
        for client in self.clients().into_iter().chain(steps) {
            match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot flush the NATS connection"),
                Err(_) => tracing::warn!("NATS unreachable; exiting without flushing"),
            }
        }
    }
}

/// What a node is built from, once it is connected and its JetStream objects are set up.
struct Parts<'a> {
    config: &'a Config,
    node_id: &'a str,
    connections: &'a Connections,
    setup: Setup,
    layout: Layout,
    drain: CancellationToken,
    /// The steps running here that a cancel may interrupt.
    interrupts: Interrupts,
    access: HttpAccess,
}

/// Who may use the HTTP API, and the request to drain that `POST /admin/drain` makes.
struct HttpAccess {
    tokens: Tokens,
    drain_request: CancellationToken,
}

impl HttpAccess {
    /// The configured tokens; a bad token setting stops the node before anything starts.
    fn load(config: &Config) -> anyhow::Result<HttpAccess> {
        let tokens = Tokens::load(
            config.api_tokens_file.as_deref(),
            config.api_token.as_ref().map(Secret::expose),
        )
        .map_err(|e| BadSetting::from_error(&e))?;
        if tokens.is_empty() {
            tracing::warn!("no API token configured (ORDERLY_API_TOKENS_FILE, ORDERLY_API_TOKEN): the HTTP API is open to anyone who can reach it");
        }
        Ok(HttpAccess {
            tokens,
            drain_request: CancellationToken::new(),
        })
    }
}

impl Parts<'_> {
    /// Builds every task of the node and starts them.
    async fn start(
        self,
        listener: tokio::net::TcpListener,
        metrics: PrometheusHandle,
        steps: Arc<dyn Steps>,
    ) -> anyhow::Result<Running> {
        let config = self.config;
        let node_id = self.node_id.to_owned();
        let audit = match &config.audit_log {
            Some(path) => Audit::open(path, &node_id).with_context(|| {
                format!(
                    "cannot open the audit log {} (ORDERLY_AUDIT_LOG)",
                    path.display()
                )
            })?,
            None => Audit::off(),
        };
        let follow = Follow::new(
            self.setup.stream.clone(),
            self.layout,
            self.setup.consumer.cached_info(),
            self.connections.leases.clone(),
        );
        let health = follow.health();
        let stats = Arc::new(WorkerStats::default());
        let cluster = Cluster::new(
            self.setup.nodes.clone(),
            node_id.clone(),
            listener.local_addr()?.to_string(),
            config.workers as usize,
            config.node_heartbeat,
            stats.clone(),
            self.drain.clone(),
        );
        let intake = self.intake(&audit).await?;
        let control = Control::new(intake.clone(), node_id.clone());
        let service = Service::new(
            intake.clone(),
            control.clone(),
            self.connections.public.clone(),
            node_id.clone(),
        );
        let state = AppState::new(
            intake.clone(),
            control.clone(),
            cluster.clone(),
            self.connections.clients(),
            health.clone(),
            metrics,
            self.drain.clone(),
        )
        .with_access(
            self.access.tokens.clone(),
            self.access.drain_request.clone(),
        )
        .with_service(service.registered());
        // The work connection's view of the orders: leases write through it, and the sweep reads it.
        let index = OrderIndex::new(async_nats::jetstream::new(self.connections.work.clone()));
        let store = OrderStore::new(self.setup.orders.clone(), index, audit.clone());
        let mut running = Running::new(self.drain.clone(), cluster);
        running.spawn(
            self.workers(
                &follow,
                store.clone(),
                audit,
                stats,
                steps,
                running.abort.clone(),
            )
            .await?,
        );
        running.spawn(WakeListener::new(
            self.connections.public.clone(),
            node_id.clone(),
            store.clone(),
            self.interrupts.clone(),
        ));
        running.spawn(QueueGauges::new(
            self.setup.stream.clone(),
            self.setup.consumer.clone(),
            QUEUE_POLL,
        ));
        let limits = crate::api::limits::Limits::new(
            config.http_header_timeout,
            config.http_idle_timeout,
            config.http_request_timeout,
            config.http_max_connections as usize,
        )
        .fit_open_files();
        running.spawn(HttpServer::new(listener, state).with_limits(limits));
        running.spawn(Sweep::new(
            async_nats::jetstream::new(self.connections.work.clone()),
            self.setup.stream.clone(),
            store,
            follow.windows(),
            self.setup.nodes.clone(),
            node_id.clone(),
            self.connections.fetching.clone(),
        ));
        running.spawn(follow);
        running.spawn(service);
        Ok(running)
    }

    /// Intake, on the public connection.
    async fn intake(&self, audit: &Audit) -> anyhow::Result<Intake> {
        let public = &self.connections.public;
        let js = async_nats::jetstream::new(public.clone());
        // Set up on another connection a moment ago; a cluster under load can still let one request
        // for it time out, which is no reason to stop the node.
        let deadline = Instant::now() + SETUP_PATIENCE;
        let orders = loop {
            match js.get_key_value(crate::store::BUCKET).await {
                Ok(orders) => break orders,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot open the orders bucket yet; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e).context("cannot open the orders bucket"),
            }
        };
        let store = OrderStore::new(orders, OrderIndex::new(js.clone()), audit.clone());
        let events = Events::new(public.clone(), self.node_id.to_owned());
        Ok(Intake::new(js, store, events))
    }

    /// The pull loop and everything an order runs through: fetches on the fetch connection, holds
    /// leases and writes on the work connection.
    async fn workers(
        &self,
        follow: &Follow,
        store: OrderStore,
        audit: Audit,
        stats: Arc<WorkerStats>,
        steps: Arc<dyn Steps>,
        abort: CancellationToken,
    ) -> anyhow::Result<Puller> {
        let work = &self.connections.work;
        let writer = Writer::new(store, Events::new(work.clone(), self.node_id.to_owned()));
        let pipeline = Arc::new(Pipeline::new(
            self.node_id.to_owned(),
            steps,
            writer.clone(),
            self.interrupts.clone(),
        ));
        let give_up = GiveUp::new(writer, self.setup.stream.clone(), stats.clone());
        let max_deliver = u32::try_from(self.config.max_deliver).unwrap_or(u32::MAX);
        let processor = Processor::new(
            pipeline,
            give_up,
            stats,
            audit,
            follow.windows(),
            max_deliver,
        );
        let consumer = async_nats::jetstream::new(self.connections.fetch.clone())
            .get_consumer_from_stream(setup::CONSUMER, setup::STREAM)
            .await
            .context("cannot open the consumer on the fetch connection")?;
        Ok(Puller::new(
            consumer,
            async_nats::jetstream::new(work.clone()),
            self.connections.leases.clone(),
            follow.health(),
            self.config.workers as usize,
            processor,
            abort,
        ))
    }
}

/// The tasks of a running node. The node heartbeat runs apart: it goes on while the others drain,
/// so that the cluster view shows the node draining, and stops last.
struct Running {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    heartbeat: Option<JoinHandle<anyhow::Result<()>>>,
    heartbeat_stop: CancellationToken,
    drain: CancellationToken,
    abort: CancellationToken,
}

impl Running {
    fn new(drain: CancellationToken, heartbeat: impl Task) -> Running {
        let heartbeat_stop = CancellationToken::new();
        Running {
            tasks: JoinSet::new(),
            heartbeat: Some(tokio::spawn(heartbeat.run(heartbeat_stop.clone()))),
            heartbeat_stop,
            drain,
            abort: CancellationToken::new(),
        }
    }

    fn spawn<T: Task>(&mut self, task: T) {
        let stop = self.drain.clone();
        self.tasks
            .spawn(async move { (T::NAME, task.run(stop).await) });
    }

    /// Waits until the node is told to stop, or until one of its tasks ends (which stops it too);
    /// returns the failure in the second case.
    async fn until_stopped<F: Future<Output = ()>>(
        &mut self,
        shutdown: &mut Shutdown<'_, F>,
    ) -> Option<anyhow::Error> {
        let heartbeat = self
            .heartbeat
            .as_mut()
            .expect("the heartbeat runs until the drain");
        let (name, result) = tokio::select! {
            _ = shutdown.as_mut() => {
                tracing::info!("shutdown requested: draining");
                return None;
            }
            Some(joined) = self.tasks.join_next() => {
                joined.unwrap_or_else(|e| ("a task", Err(anyhow::Error::new(e).context("panicked"))))
            }
            joined = heartbeat => {
                self.heartbeat = None;
                let result = joined.unwrap_or_else(|e| Err(anyhow::Error::new(e).context("panicked")));
                (Cluster::NAME, result)
            }
        };
        let error = result
            .err()
            .map_or_else(|| "it returned".to_owned(), |e| format!("{e:#}"));
        tracing::error!(task = name, %error, "a task of the node stopped; stopping the node");
        Some(anyhow::anyhow!("{name} stopped: {error}"))
    }

    /// Stops fetching and accepting; orders stop at their next step boundary, or when the grace period
    /// ends, and are handed back. Then the heartbeat stops.
    async fn drain(mut self, grace: Duration) {
        self.drain.cancel();
        let abort = self.abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace period over: interrupting the orders still running");
            abort.cancel();
        });
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok((name, Err(e))))) => {
                    tracing::warn!(task = name, error = %format!("{e:#}"), "task ended with an error")
                }
                Ok(Some(Ok((_, Ok(()))))) => {}
                Ok(Some(Err(e))) => tracing::error!(error = %e, "task panicked"),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("tasks did not stop in time");
                    break;
                }
            }
        }
        self.heartbeat_stop.cancel();
        let heartbeat = self.heartbeat.take();
        let abort_heartbeat = heartbeat.as_ref().map(|h| h.abort_handle());
        let rest = async {
            while self.tasks.join_next().await.is_some() {}
            if let Some(heartbeat) = heartbeat {
                let _ = heartbeat.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(3), rest)
            .await
            .is_err()
        {
            self.tasks.abort_all();
            if let Some(abort) = abort_heartbeat {
                abort.abort();
            }
        }
    }
}

/// How long a node retries setting up its JetStream objects before it gives up and exits.
const SETUP_PATIENCE: Duration = Duration::from_secs(60);
/// How often the work queue's state is read for the metrics.
const QUEUE_POLL: Duration = Duration::from_secs(5);
