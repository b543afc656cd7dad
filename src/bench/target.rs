//! The NATS server a run measures: the one `--nats-url` names, or a private nats-server on a free
//! port with its own temporary store, stopped (and its store removed) when the run ends, however it
//! ends.

use crate::queue::embedded::EmbeddedServer;
use anyhow::Context;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// A directory of the run's own (the private server's store, the nodes' data dirs and logs), removed
/// when dropped.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new() -> anyhow::Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("orderly-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The server under test. Fields drop in order: the private server stops before its store goes.
pub struct Target {
    pub url: String,
    server: Option<EmbeddedServer>,
    pub scratch: Scratch,
}

impl Target {
    /// The server at `url`, or a private one started from `binary` when there is none.
    pub async fn open(url: Option<&str>, binary: &Path) -> anyhow::Result<Target> {
        let scratch = Scratch::new()?;
        if let Some(url) = url {
            return Ok(Target {
                url: url.to_owned(),
                server: None,
                scratch,
            });
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let server = EmbeddedServer::start(binary, addr, &scratch.path().join("nats"))
            .await?
            .context("the free port was taken by another server")?;
        Ok(Target {
            url: format!("nats://{addr}"),
            server: Some(server),
            scratch,
        })
    }

    /// Whether the server is the run's own.
    pub fn is_private(&self) -> bool {
        self.server.is_some()
    }

    /// Stops the private server cleanly.
    pub async fn close(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok(listener.local_addr()?.port())
}
