//! A nats-server that wants credentials: started from a configuration file with the environment it
//! reads secrets from, its log kept in a file so a test can read the permission violations it logged.

use super::{free_port, nats_server_binary, temp_dir, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;
use tempfile::TempDir;

pub struct SecuredServer {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
    config: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl SecuredServer {
    /// Starts `nats-server -c <config> <extra...> -p <free port>` with `env`, and waits until it listens.
    pub async fn start(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> SecuredServer {
        let dir = temp_dir("secured-nats");
        let mut server = SecuredServer {
            child: Command::new("true").spawn().expect("a placeholder process"),
            port: free_port(),
            log: dir.path().join("nats-server.log"),
            dir,
            config: config.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.spawn().await;
        server
    }

    /// Where the server listens, with `scheme` (`nats` or `tls`) and `userinfo` (`user:password` or a
    /// token; empty for none).
    pub fn url(&self, scheme: &str, userinfo: &str) -> String {
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!("{scheme}://{userinfo}{at}127.0.0.1:{}", self.port)
    }

    /// Stops the server and starts it again on the same port and store with `env` instead.
    pub async fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn().await;
    }

    /// The server log's lines that report a permission violation by `user`
    /// (`... "ORDERLY/user:node" - Publish Violation - Subject "..."`).
    pub fn violations(&self, user: &str) -> Vec<String> {
        let who = format!("user:{user}\"");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(" Violation - ") && line.contains(&who))
            .map(str::to_owned)
            .collect()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server and waits until it is ready. On its first start a server that exits at once
    /// lost its port to someone else, and starts again on another one.
    async fn spawn(&mut self) {
        let first = !self.log.exists();
        for _ in 0..5 {
            if self.spawn_once().await {
                return;
            }
            assert!(
                first,
                "nats-server did not start again:\n{}",
                self.log_text()
            );
            self.port = free_port();
        }
        panic!("nats-server did not start:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server started and is ready (false: it exited).
    async fn spawn_once(&mut self) -> bool {
        let _ = self.child.wait();
        let started = self.log_text().matches("Server is ready").count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a server log");
        let store = self.dir.path().join("store");
        self.child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&self.config)
            .args(&self.extra)
            .args(["-js", "-sd"])
            .arg(&store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("a log handle"))
            .stderr(log)
            .spawn()
            .expect("nats-server runs");
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until(
            "the secured nats-server to be ready or to exit",
            Duration::from_secs(10),
            || {
                let exited = matches!(self.child.try_wait(), Ok(Some(_)));
                let ready = self.log_text().matches("Server is ready").count() > started
                    && std::net::TcpStream::connect(&addr).is_ok();
                async move { (exited || ready).then_some(ready) }
            },
        )
        .await
    }
}

impl Drop for SecuredServer {
    fn drop(&mut self) {
        self.kill();
    }
}
