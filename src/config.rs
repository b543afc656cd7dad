//! Node configuration: every setting is a command-line flag backed by an environment variable, parsed
//! once at start into typed values. A bad value stops the node before anything starts, with clap's
//! message naming the setting.

use crate::engine::steps::FailureRates;
use crate::engine::window::MIN_REPLICATED_WINDOW;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(name = "orderly", version, about = "Order processing on NATS JetStream", long_about = None)]
pub struct Config {
    /// NATS server URL(s), comma-separated, with a user and password (`nats://user:pass@host`) or a
    /// token (`nats://token@host`) if the server wants one. Unset: start an embedded nats-server (or use
    /// the one already listening on --embedded-nats-addr).
    #[arg(long, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<Secret>,

    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed) to connect with.
    #[arg(long, env = "ORDERLY_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// A file holding an nkey seed to connect with.
    #[arg(long, env = "ORDERLY_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,

    /// The CA certificate (PEM) that signed the NATS servers' certificates; setting it requires TLS.
    #[arg(long, env = "ORDERLY_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,

    /// A client certificate (PEM) for servers that verify clients, with --nats-tls-key.
    #[arg(long, env = "ORDERLY_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,

    /// The key (PEM) of --nats-tls-cert.
    #[arg(long, env = "ORDERLY_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,

    /// The nats-server binary for the embedded server.
    #[arg(long, env = "ORDERLY_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,

    /// Address of the embedded nats-server, IP:port.
    #[arg(
        long,
        env = "ORDERLY_EMBEDDED_NATS_ADDR",
        default_value = "127.0.0.1:4222",
        value_parser = parse_socket_addr
    )]
    pub embedded_nats_addr: SocketAddr,

    /// Where the embedded nats-server keeps its JetStream store.
    #[arg(long, env = "ORDERLY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// HTTP API address, IP:port.
    #[arg(long, env = "ORDERLY_HTTP_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_socket_addr)]
    pub http_addr: SocketAddr,

    /// How long a client may take to send a request's head (line and headers): then 408, closed.
    #[arg(long, env = "ORDERLY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub http_header_timeout: Duration,

    /// How long an HTTP connection may sit idle between requests before it is closed.
    #[arg(long, env = "ORDERLY_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub http_idle_timeout: Duration,

    /// How long a request may take (the watch of an order excepted): then 503 `timeout`.
    #[arg(long, env = "ORDERLY_HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub http_request_timeout: Duration,

    /// Open HTTP connections at most (kept under the open-files limit). Over it, the connection
    /// longest without a request in progress is closed; if all are busy, the newcomer gets 503.
    #[arg(long, env = "ORDERLY_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// Concurrent workers (orders in progress) on this node.
    #[arg(long, env = "ORDERLY_WORKERS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub workers: u32,

    /// How long each step takes.
    #[arg(long, env = "ORDERLY_STEP_DURATION", default_value = "5s", value_parser = parse_duration)]
    pub step_duration: Duration,

    /// How long undoing a step takes (default: the step duration).
    #[arg(long, env = "ORDERLY_ROLLBACK_DURATION", value_parser = parse_duration)]
    pub rollback_duration: Option<Duration>,

    /// Probability that a step fails: one number for every step, and/or STEP=P per step, for example
    /// `0.05`, `Processing=1.0` (only Processing fails) or `0.05,Processing=0.5`.
    #[arg(long, env = "ORDERLY_FAILURE_RATE", default_value = "0.05")]
    pub failure_rate: FailureRates,

    /// Makes every failure draw a function of (seed, order id, step, attempt), so runs are reproducible.
    #[arg(long, env = "ORDERLY_SEED")]
    pub seed: Option<u64>,

    /// What does the work of each step: `simulated` (a wait and a failure draw, as set above) or
    /// `nats` (step handler services answering on `orders.steps.<step>.run` and `.rollback`).
    #[arg(long, env = "ORDERLY_STEPS", default_value = "simulated")]
    pub steps: StepRunner,

    /// With `--steps nats`: how long a step handler may take to answer before the step fails.
    #[arg(long, env = "ORDERLY_STEP_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub step_timeout: Duration,

    /// This node's id (letters, digits, '-' and '_'). Default: the host name and a random suffix.
    #[arg(long, env = "ORDERLY_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,

    /// The shared consumer's ack wait: how long the server waits for a sign of life before it hands an
    /// order to another node. Heartbeats and self-fencing derive from it.
    #[arg(long, env = "ORDERLY_ACK_WAIT", default_value = "30s", value_parser = parse_ack_wait)]
    pub ack_wait: Duration,

    /// How many deliveries an order gets before Orderly gives up on it. Orderly counts them itself (the
    /// consumer has no limit): the delivery after the last ends the order `Failed`. A store outage,
    /// however long, uses up none.
    #[arg(long, env = "ORDERLY_MAX_DELIVER", default_value_t = 10, value_parser = clap::value_parser!(i64).range(2..=1000))]
    pub max_deliver: i64,

    /// Replicas of the ORDERS stream and the orders bucket (1, or 3 on a cluster).
    #[arg(long, env = "ORDERLY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,

    /// How long a node waits for in-flight orders to reach a step boundary when it shuts down.
    #[arg(long, env = "ORDERLY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How often the node records itself in the cluster view.
    #[arg(long, env = "ORDERLY_NODE_HEARTBEAT", default_value = "2s", value_parser = parse_positive_duration)]
    pub node_heartbeat: Duration,

    /// Append a JSON-lines audit of this node's lease intervals and order writes to this file (off when
    /// unset). Meant for fault testing and for investigating an incident.
    #[arg(long, env = "ORDERLY_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// A file of HTTP API bearer tokens, one `token role` per line (roles: reader, submitter,
    /// operator; `#` starts a comment). With any token set, every order and admin endpoint needs one.
    #[arg(long, env = "ORDERLY_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,

    /// One HTTP API bearer token with the operator role (besides those of --api-tokens-file).
    #[arg(long, env = "ORDERLY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// Log format.
    #[arg(long, env = "ORDERLY_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (for example `info,orderly=debug`).
    #[arg(long, env = "ORDERLY_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    pub fn rollback_duration(&self) -> Duration {
        self.rollback_duration.unwrap_or(self.step_duration)
    }

    /// What no single setting can say wrong, but two together can.
    pub fn check(&self) -> Result<(), String> {
        if self.replicas > 1 && self.ack_wait < MIN_REPLICATED_WINDOW {
            return Err(format!(
                "--ack-wait (ORDERLY_ACK_WAIT) is {}, and with --replicas (ORDERLY_REPLICAS) above 1 it must be at least {}: a new consumer leader may date a delivery up to a second early",
                humantime::format_duration(self.ack_wait),
                humantime::format_duration(MIN_REPLICATED_WINDOW)
            ));
        }
        Ok(())
    }
}

/// A setting that cannot work, found as the node starts (a file it names, the form of a URL, what the
/// NATS server can do): the node stops at once with this one message, which names the setting and the
/// fix, and exits with code 2 as for a bad flag.
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct BadSetting {
    problem: String,
}

impl BadSetting {
    /// `error` and its causes, each once, as the message.
    pub fn from_error(error: &(dyn std::error::Error + 'static)) -> BadSetting {
        let mut problem = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !problem.contains(&text) {
                problem.push_str(": ");
                problem.push_str(&text);
            }
            source = cause.source();
        }
        BadSetting { problem }
    }

    pub fn new(problem: impl Into<String>) -> BadSetting {
        BadSetting {
            problem: problem.into(),
        }
    }
}

/// A setting that must not be printed: its `Debug` shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// What does the work of each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StepRunner {
    Simulated,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// An `IP:port` to listen on; a host name is refused with the address to write instead.
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let suggestion = match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            let ip = if host.eq_ignore_ascii_case("localhost") || host.is_empty() {
                "127.0.0.1"
            } else {
                "0.0.0.0"
            };
            format!("{ip}:{port}")
        }
        _ => "127.0.0.1:8080".to_owned(),
    };
    Err(format!(
        "it must be IP:port, not a host name; write {suggestion} (127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
    ))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use a duration like 5s, 200ms or 1m)"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

fn parse_ack_wait(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("use 1 to 64 letters, digits, '-' or '_'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::Step;

    #[test]
    fn failure_rates_accept_a_number_and_per_step_values() {
        assert_eq!(
            "0.2".parse::<FailureRates>().unwrap(),
            FailureRates::uniform(0.2)
        );
        let rates: FailureRates = "Processing=1.0,Scheduling=0".parse().unwrap();
        assert_eq!(rates.get(Step::Processing), 1.0);
        assert_eq!(rates.get(Step::Scheduling), 0.0);
        assert_eq!(rates.get(Step::PreProcessing), 0.0);
        let rates: FailureRates = "0.1, Pre-Processing=0.5".parse().unwrap();
        assert_eq!(rates.get(Step::PreProcessing), 0.5);
        assert_eq!(rates.get(Step::PostProcessing), 0.1);
        assert!("".parse::<FailureRates>().is_err());
        assert!("1.5".parse::<FailureRates>().is_err());
        assert!("Shipping=0.1".parse::<FailureRates>().is_err());
        assert!("x".parse::<FailureRates>().is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = Config::try_parse_from(["orderly"]).unwrap();
        assert_eq!(config.workers, 50);
        assert_eq!(config.step_duration, Duration::from_secs(5));
        assert_eq!(config.failure_rate, FailureRates::uniform(0.05));
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.replicas, 1);
        assert_eq!(config.rollback_duration(), Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Config::try_parse_from(["orderly", "--step-duration", "fast"]).unwrap_err();
        assert!(err.to_string().contains("--step-duration"), "{err}");
        let err = Config::try_parse_from(["orderly", "--workers", "0"]).unwrap_err();
        assert!(err.to_string().contains("--workers"), "{err}");
        let err = Config::try_parse_from(["orderly", "--node-id", "a b"]).unwrap_err();
        assert!(err.to_string().contains("--node-id"), "{err}");
        let short = Config::try_parse_from(["orderly", "--replicas", "3", "--ack-wait", "2s"]);
        let err = short.unwrap().check().unwrap_err();
        assert!(err.contains("--ack-wait") && err.contains("3s"), "{err}");
        let single = Config::try_parse_from(["orderly", "--ack-wait", "2s"]).unwrap();
        assert_eq!(single.check(), Ok(()));
        let err = Config::try_parse_from(["orderly", "--node-heartbeat", "0s"]).unwrap_err();
        assert!(err.to_string().contains("--node-heartbeat"), "{err}");
        let secret = Config::try_parse_from(["orderly", "--api-token", "s3cret"]).unwrap();
        assert!(!format!("{secret:?}").contains("s3cret"));
        let url = Config::try_parse_from(["orderly", "--nats-url", "nats://u:s3cret@a:4222"]);
        assert!(!format!("{:?}", url.unwrap()).contains("s3cret"));
        let half = Config::try_parse_from(["orderly", "--nats-tls-cert", "c.pem"]).unwrap_err();
        assert!(half.to_string().contains("--nats-tls-key"), "{half}");
        let err = Config::try_parse_from(["orderly", "--http-addr", "localhost:8080"]).unwrap_err();
        assert!(err.to_string().contains("write 127.0.0.1:8080"), "{err}");
        let err = Config::try_parse_from(["orderly", "--ack-wait", "100ms"]).unwrap_err();
        assert!(err.to_string().contains("--ack-wait"), "{err}");
    }
}
