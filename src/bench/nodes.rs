//! Real node processes: the `orderly` binary itself, spawned with the settings a run needs, each on
//! its own HTTP port and data dir, killed when dropped. Also the reset that gives every phase a clean
//! `ORDERS`, `orders` and `ORDERS_INDEX`.

use crate::queue::setup::{self, Layout};
use anyhow::Context;
use async_nats::jetstream;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts nodes on one server.
pub struct Spawner {
    exe: PathBuf,
    url: String,
    dir: PathBuf,
    spawned: usize,
}

impl Spawner {
    /// Nodes of the running binary on `url`, with their data dirs and logs under `dir`.
    pub fn new(url: &str, dir: PathBuf) -> anyhow::Result<Spawner> {
        let exe = std::env::current_exe().context("cannot find the orderly binary")?;
        Ok(Spawner {
            exe,
            url: url.to_owned(),
            dir,
            spawned: 0,
        })
    }

    /// A node with 50 workers, steps of `step` that never fail, logging warnings only.
    pub fn spawn(&mut self, step: Duration) -> anyhow::Result<NodeProcess> {
        self.spawned += 1;
        let id = format!("bench-{}", self.spawned);
        let dir = self.dir.join(&id);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("orderly.log"))?;
        let http = SocketAddr::from(([127, 0, 0, 1], super::target::free_port()?));
        let mut command = Command::new(&self.exe);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NATS_URL", &self.url)
            .env("ORDERLY_NODE_ID", &id)
            .env("ORDERLY_WORKERS", "50")
            .env(
                "ORDERLY_STEP_DURATION",
                humantime::format_duration(step).to_string(),
            )
            .env("ORDERLY_FAILURE_RATE", "0")
            .env("ORDERLY_HTTP_ADDR", http.to_string())
            .env("ORDERLY_DATA_DIR", dir.join("data"))
            .env("ORDERLY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A node dies with the run, should the run die without dropping it.
        crate::queue::embedded::die_with_parent(&mut command);
        let child = command.spawn().context("cannot start a node")?;
        Ok(NodeProcess {
            child,
            id,
            http,
            log: dir.join("orderly.log"),
        })
    }

    /// `count` nodes, ready (their `/readyz` answers 200).
    pub async fn start(
        &mut self,
        count: usize,
        step: Duration,
    ) -> anyhow::Result<Vec<NodeProcess>> {
        let mut nodes = (0..count)
            .map(|_| self.spawn(step))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for node in &mut nodes {
            node.wait_ready(Duration::from_secs(60)).await?;
        }
        Ok(nodes)
    }
}

/// A running node, killed when dropped.
pub struct NodeProcess {
    child: Child,
    pub id: String,
    pub http: SocketAddr,
    log: PathBuf,
}

impl NodeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the node answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!(
                    "node {} exited with {status} before it was ready; its log:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
            if super::query::status(self.http, "/readyz").await == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("node {} not ready in {timeout:?}", self.id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An error if the node has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            anyhow::bail!(
                "node {} exited with {status}; its log:\n{}",
                self.id,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Resident memory (`VmRSS` of `/proc/<pid>/status`), in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("cannot read the node's /proc status (Linux only)")?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in the node's /proc status")?;
        Ok(kib / 1024.0)
    }

    /// Asks the node to stop (SIGTERM) and waits for it; kills it after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The layout a node started with default settings sets up.
pub fn layout() -> Layout {
    Layout {
        replicas: 1,
        ack_wait: Duration::from_secs(30),
    }
}

/// Deletes the work stream, the orders bucket and the index, and sets them up again empty, as a node
/// does at start. No node may be running.
pub async fn reset(js: &jetstream::Context) -> anyhow::Result<()> {
    for stream in [
        setup::STREAM.to_owned(),
        format!("KV_{}", crate::store::BUCKET),
        crate::index::STREAM.to_owned(),
    ] {
        let _ = js.delete_stream(stream).await;
    }
    setup::setup(js, layout())
        .await
        .context("cannot set up Orderly's stream, consumer and buckets")?;
    Ok(())
}

/// Refuses to run on a server whose Orderly objects hold anything: the run deletes them.
pub async fn check_empty(js: &jetstream::Context) -> anyhow::Result<()> {
    for stream in [
        setup::STREAM.to_owned(),
        format!("KV_{}", crate::store::BUCKET),
        crate::index::STREAM.to_owned(),
    ] {
        if let Ok(held) = super::load::messages(js, &stream).await {
            if held > 0 {
                anyhow::bail!(
                    "stream {stream} holds {held} messages on this server, and the benchmark deletes and recreates it: run it on a server (or account) without Orderly data, or without --nats-url for a private server"
                );
            }
        }
    }
    Ok(())
}
