//! The embedded development server: a `nats-server` child process with JetStream, started when no
//! `NATS_URL` is given and stopped with the node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no nats-server binary at {path:?} (ORDERLY_NATS_SERVER), nor on PATH, nor in ./.tools/bin. Run the node with `bash scripts/run`, or run `bash scripts/install-nats-server` (both fetch nats-server 2.12.2 into .tools/bin) and start the node from the project's directory; or set ORDERLY_NATS_SERVER to the path of a nats-server, or point NATS_URL at a running server")]
    NotInstalled { path: PathBuf },
    #[error("cannot start nats-server: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the embedded nats-server did not come up on {addr} within {timeout:?}; see {log:?}")]
    NotReady {
        addr: SocketAddr,
        timeout: Duration,
        log: PathBuf,
    },
}

/// A nats-server child process with JetStream, started for a node that was given no `NATS_URL`. It is
/// stopped when dropped, and on Linux the kernel kills it if the node dies without dropping it.
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
        let binary = &resolve(binary);
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
            // A group of its own: Ctrl-C in a terminal signals the node alone, which drains its orders
            // and then stops the server, instead of losing the server in the middle of the drain.
            .process_group(0)
            .kill_on_drop(true);
        // Other Unix systems have no parent-death signal: there the server is stopped when the node
        // stops or drops it, but a node killed with SIGKILL leaves it running (the next node started
        // on the same address uses it).
        die_with_parent(command.as_std_mut());
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

/// Has the kernel kill the process `command` starts when the thread that started it dies (Linux; a
/// no-op elsewhere), so that a child outlives no `kill -9` of its parent.
pub fn die_with_parent(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Where scripts/install-nats-server puts the pinned server, relative to the project's directory.
pub const TOOLS_NATS_SERVER: &str = ".tools/bin/nats-server";

/// The nats-server to run: `binary` as given, unless it is the bare default name and nothing of that
/// name is on `PATH`; then `.tools/bin/nats-server` in the current directory, where
/// `scripts/install-nats-server` (and so `scripts/run` and `.ci/run`) put it, if it is there.
pub fn resolve(binary: &Path) -> PathBuf {
    let bare = binary.components().count() == 1 && !binary.is_absolute();
    if !bare || on_path(binary) {
        return binary.to_owned();
    }
    let tools = Path::new(".").join(TOOLS_NATS_SERVER);
    if binary == Path::new("nats-server") && tools.is_file() {
        tools
    } else {
        binary.to_owned()
    }
}

fn on_path(name: &Path) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}
