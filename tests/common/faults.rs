//! Fault injection for the fault suite: a TCP proxy that can stop forwarding without closing its
//! sockets, a three-server NATS cluster whose servers can be killed one by one, and a store filled
//! until it refuses writes.

use super::{free_port, spawn_nats_server, temp_dir, wait_until};
use async_nats::jetstream;
use std::process::Child;
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A TCP proxy in front of one upstream port. [`Proxy::cut`] makes it stop forwarding in both
/// directions while every socket stays open (a network that silently drops traffic, not one that
/// resets connections); [`Proxy::heal`] resumes forwarding, including what was held back.
pub struct Proxy {
    pub port: u16,
    pub url: String,
    open: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let port = listener.local_addr().expect("proxy address").port();
        let (open, watching) = watch::channel(true);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                pumps.spawn(pump(client_read, server_write, watching.clone()));
                pumps.spawn(pump(server_read, client_write, watching.clone()));
            }
        });
        Proxy {
            port,
            url: format!("nats://127.0.0.1:{port}"),
            open,
            tasks,
        }
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies `from` to `to` while the proxy is open; while it is cut, neither reads nor writes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Three JetStream servers on loopback, clustered by routes.
pub struct NatsCluster {
    servers: Vec<ClusterServer>,
    /// Every server's client URL, comma-separated (as `NATS_URL` takes them).
    pub urls: String,
}

struct ClusterServer {
    name: String,
    port: u16,
    child: Option<Child>,
    /// The arguments it was started with, to start it again on the same port and store.
    extra: Vec<String>,
    _dir: TempDir,
}

impl ClusterServer {
    fn spawn(&mut self) {
        self.child = Some(spawn_nats_server(
            self.port,
            &self._dir.path().join("store"),
            &self.extra,
        ));
    }
}

impl NatsCluster {
    /// Starts three servers and waits until they elect a JetStream leader. A server that cannot
    /// start (a port taken in the meantime) makes it start over on new ports.
    pub async fn start() -> NatsCluster {
        NatsCluster::start_with_store_limit(None).await
    }

    /// Like [`NatsCluster::start`], each server's JetStream file store limited to `max_file_store`
    /// (`"64MB"`) when given.
    pub async fn start_with_store_limit(max_file_store: Option<&str>) -> NatsCluster {
        for _ in 0..3 {
            let cluster = NatsCluster::spawn(max_file_store);
            if cluster.wait_ready(Duration::from_secs(40)).await {
                return cluster;
            }
            eprintln!("the NATS cluster did not come up; starting it again on new ports");
            for server in &cluster.servers {
                let log = std::fs::read_to_string(server._dir.path().join("server.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- {} ---", server.name);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        panic!("the NATS cluster did not come up in three attempts");
    }

    fn spawn(max_file_store: Option<&str>) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let name = format!("s{}", i + 1);
            let dir = temp_dir(&name);
            let port = free_port();
            let mut extra = vec![
                "--server_name".to_owned(),
                name.clone(),
                "--cluster_name".to_owned(),
                "orderly-test".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cluster_port}"),
                "--routes".to_owned(),
                routes.clone(),
                "-l".to_owned(),
                dir.path().join("server.log").display().to_string(),
                // Clients keep to the URLs they were given: a proxy in front of a server is never
                // bypassed through a discovered address.
                "--no_advertise=true".to_owned(),
            ];
            if let Some(limit) = max_file_store {
                let conf = dir.path().join("server.conf");
                std::fs::write(
                    &conf,
                    format!("jetstream {{\n  max_file_store: {limit}\n}}\n"),
                )
                .expect("the server configuration is written");
                extra.extend(["-c".to_owned(), conf.display().to_string()]);
            }
            let mut server = ClusterServer {
                name,
                port,
                child: None,
                extra,
                _dir: dir,
            };
            server.spawn();
            servers.push(server);
        }
        let urls = servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",");
        NatsCluster { servers, urls }
    }

    async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let servers: Vec<&str> = self.urls.split(',').collect();
            if let Ok(client) = async_nats::connect(servers).await {
                let js = jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    pub async fn client(&self) -> async_nats::Client {
        wait_until(
            "a cluster server to accept clients",
            Duration::from_secs(30),
            || async {
                let servers: Vec<&str> = self.urls.split(',').collect();
                async_nats::connect(servers).await.ok()
            },
        )
        .await
    }

    fn server(&mut self, name: &str) -> &mut ClusterServer {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// The servers' names and client ports.
    pub fn servers(&self) -> Vec<(String, u16)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.port))
            .collect()
    }

    /// Kills (`kill -9`) the server named `name`.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.server(name).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.servers
            .iter()
            .any(|s| s.name == name && s.child.is_some())
    }

    /// Starts a killed server again on its port and store, without waiting for it.
    pub fn start_again(&mut self, name: &str) {
        let server = self.server(name);
        if server.child.is_none() {
            server.spawn();
        }
    }

    /// Waits until every server accepts clients and the cluster answers JetStream requests.
    pub async fn wait_all_up(&self, timeout: Duration) {
        for server in &self.servers {
            let url = format!("nats://127.0.0.1:{}", server.port);
            wait_until(
                &format!("server {} to accept clients", server.name),
                timeout,
                || async { async_nats::connect(&url).await.ok().map(|_| ()) },
            )
            .await;
        }
        assert!(
            self.wait_ready(timeout).await,
            "JetStream did not answer within {timeout:?}"
        );
    }

    /// The server that leads the replicas of stream `stream`, if the cluster says in time.
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> Option<String> {
        let info = async {
            let mut stream = js.get_stream(stream).await.ok()?;
            let info = stream.info().await.ok()?;
            info.cluster.as_ref()?.leader.clone()
        };
        tokio::time::timeout(Duration::from_secs(3), info)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The stream [`fill_store`] fills the store with.
pub const FILLER: &str = "FILLER";

/// Fills the JetStream store with a stream of its own ([`FILLER`], with `replicas`) until the
/// servers refuse to store even a small message, and returns the bytes stored. A publish that is not
/// answered within 5 s counts as refused, so that a cluster in the middle of another fault is not
/// waited on for ever (the store may then be left less than full).
pub async fn fill_store(js: &jetstream::Context, replicas: usize) -> u64 {
    let config = jetstream::stream::Config {
        name: FILLER.into(),
        subjects: vec!["filler.>".into()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    // A cluster in the middle of another fault (a server down, no metadata leader) may not answer
    // at once.
    wait_until(
        "stream FILLER to be created",
        Duration::from_secs(60),
        || {
            let config = config.clone();
            async move { js.get_or_create_stream(config).await.ok().map(|_| ()) }
        },
    )
    .await;
    let mut stored = 0;
    let mut size = 512 * 1024;
    for i in 0..100_000 {
        let chunk = bytes::Bytes::from(vec![b'x'; size]);
        let published = async {
            js.publish(format!("filler.{i}"), chunk)
                .await
                .ok()?
                .await
                .ok()
        };
        let refused = !matches!(
            tokio::time::timeout(Duration::from_secs(5), published).await,
            Ok(Some(_))
        );
        match (refused, size) {
            (false, _) => stored += size as u64,
            (true, 256) => return stored,
            (true, _) => size /= 2,
        }
    }
    panic!("the store took {stored} bytes and was still not full");
}
