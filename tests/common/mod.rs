//! Test harness: a real nats-server per test on a free port with its own store, and real `orderly`
//! processes. Both are killed when dropped. Waiting is always on a condition with a deadline.
#![allow(dead_code)]

pub mod audit;
pub mod faults;
pub mod hostile;
pub mod scenario;
pub mod secured;

use async_nats::jetstream;
use serde_json::Value;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use uuid::Uuid;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn nats_server_binary() -> String {
    std::env::var("ORDERLY_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// Polls `check` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
    pub dir: TempDir,
    /// Arguments after the address and port: JetStream on the store, or a configuration file.
    args: Vec<String>,
}

/// A temp dir for a server's store, a node's files or a scenario's audits, named after `what`. With
/// `ORDERLY_TEST_KEEP` set to a directory, it is made there and kept after the test, to look into a
/// failure: node logs (`<node>-*/orderly.log`), audits and server logs stay.
pub fn temp_dir(what: &str) -> TempDir {
    match std::env::var_os("ORDERLY_TEST_KEEP") {
        Some(keep) => {
            std::fs::create_dir_all(&keep).expect("ORDERLY_TEST_KEEP is a directory");
            tempfile::Builder::new()
                .prefix(&format!("{what}-"))
                .disable_cleanup(true)
                .tempdir_in(keep)
                .expect("a kept dir")
        }
        None => tempfile::tempdir().expect("a temp dir"),
    }
}

fn spawn_nats_server(port: u16, store: &std::path::Path, extra: &[String]) -> Child {
    let mut args = vec![
        "-js".to_owned(),
        "-sd".to_owned(),
        store.display().to_string(),
    ];
    args.extend_from_slice(extra);
    spawn_nats_server_with(port, &args)
}

fn spawn_nats_server_with(port: u16, args: &[String]) -> Child {
    Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server runs (`bash scripts/install-nats-server` fetches it into .tools/bin)")
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        NatsServer::start_with(|dir| vec!["-js".into(), "-sd".into(), dir.display().to_string()])
            .await
    }

    /// A server whose JetStream block also holds `jetstream_settings`, for example
    /// `max_file_store: 8MB` (the store stays in the server's temp dir).
    pub async fn start_with_config(jetstream_settings: &str) -> NatsServer {
        NatsServer::start_with(|dir| {
            let store = dir.join("store");
            let conf = dir.join("server.conf");
            let text = format!(
                "jetstream {{\n  store_dir: {:?}\n  {jetstream_settings}\n}}\n",
                store.display().to_string()
            );
            std::fs::write(&conf, text).expect("the server configuration is written");
            vec!["-c".into(), conf.display().to_string()]
        })
        .await
    }

    /// Starts a server with the arguments `args` makes for its temp dir.
    async fn start_with(args: impl Fn(&std::path::Path) -> Vec<String>) -> NatsServer {
        let mut dir = temp_dir("nats");
        for _ in 0..5 {
            let port = free_port();
            let args = args(dir.path());
            let child = spawn_nats_server_with(port, &args);
            let mut server = NatsServer {
                child,
                port,
                url: format!("nats://127.0.0.1:{port}"),
                dir,
                args,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // lost the port to someone else: try another
                }
                if async_nats::connect(&server.url).await.is_ok() {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            dir = std::mem::replace(&mut server.dir, temp_dir("nats"));
        }
        panic!("nats-server did not start");
    }

    /// Kills the server (`kill -9`) and starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// Sends `signal` (for example `STOP` or `CONT`) to the server process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port and store after [`NatsServer::kill`].
    pub async fn start_again(&mut self) {
        self.child = spawn_nats_server_with(self.port, &self.args);
        wait_until(
            "the restarted nats-server to accept clients",
            Duration::from_secs(20),
            || async { async_nats::connect(&self.url).await.ok().map(|_| ()) },
        )
        .await;
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to the test nats-server")
    }

    pub async fn js(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// The `orders` bucket, once a node has created it.
    pub async fn orders(&self) -> jetstream::kv::Store {
        self.js()
            .await
            .get_key_value("orders")
            .await
            .expect("the orders bucket")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `orderly` process.
pub struct Node {
    child: Child,
    pub id: String,
    pub http: String,
    pub log: PathBuf,
    _dir: TempDir,
}

pub struct NodeBuilder {
    env: Vec<(String, String)>,
    id: String,
}

impl NodeBuilder {
    pub fn env(mut self, key: &str, value: impl ToString) -> NodeBuilder {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn id(mut self, id: &str) -> NodeBuilder {
        self.id = id.to_owned();
        self
    }

    /// Starts the process without waiting for it to be ready.
    pub fn spawn(self) -> Node {
        let dir = temp_dir(&self.id);
        let log = dir.path().join("orderly.log");
        let out = std::fs::File::create(&log).expect("a log file");
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_orderly"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ORDERLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("ORDERLY_NODE_ID", &self.id)
            .env("ORDERLY_LOG", "info,orderly=debug")
            .env("ORDERLY_NODE_HEARTBEAT", "500ms")
            .env("ORDERLY_DATA_DIR", dir.path().join("data"));
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command
            .stdout(out.try_clone().expect("a log file handle"))
            .stderr(out)
            .spawn()
            .expect("the orderly binary starts");
        Node {
            child,
            id: self.id,
            http: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    /// Starts the process and waits until `/readyz` answers 200.
    pub async fn start(self) -> Node {
        let mut node = self.spawn();
        node.wait_ready().await;
        node
    }
}

impl Node {
    /// A node on `nats_url` with short steps and no failures unless the builder says otherwise.
    pub fn builder(nats_url: &str) -> NodeBuilder {
        NodeBuilder {
            env: vec![
                ("NATS_URL".into(), nats_url.into()),
                ("ORDERLY_STEP_DURATION".into(), "50ms".into()),
                ("ORDERLY_FAILURE_RATE".into(), "0".into()),
            ],
            id: format!("node-{}", &Uuid::new_v4().simple().to_string()[..6]),
        }
    }

    pub async fn wait_ready(&mut self) {
        if let Some(status) = self.wait_ready_or_exit().await {
            panic!(
                "node {} exited with {status} before it was ready:\n{}",
                self.id,
                self.logs()
            );
        }
    }

    /// Waits until the node is ready (`None`) or has exited (its exit status), for up to 30 s.
    pub async fn wait_ready_or_exit(&mut self) -> Option<std::process::ExitStatus> {
        let url = format!("{}/readyz", self.http);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if let Ok(response) = http.get(&url).send().await {
                if response.status() == 200 {
                    return None;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready in 30s:\n{}",
                self.id,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits until the process is stopped (after `SIGSTOP`): a signal only takes effect once the system
    /// call the process is in has returned.
    pub async fn wait_stopped(&self) {
        let stat = format!("/proc/{}/stat", self.pid());
        wait_until(
            &format!("node {} to stop", self.id),
            Duration::from_secs(10),
            || async {
                let text = std::fs::read_to_string(&stat).unwrap_or_default();
                // The state follows the command name in parentheses: "pid (comm) T ...".
                let state = text.rsplit(')').next()?.split_whitespace().next()?;
                (state == "T" || state == "t").then_some(())
            },
        )
        .await;
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has exited (by itself, or after a signal).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.http))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- last log lines of node {} ---", self.id);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Sum of a counter or gauge over all its label sets in a Prometheus scrape.
pub fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GETs `url` and parses the JSON body, whatever the status.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let response = http.get(url).send().await.expect("the node answers");
    response.json().await.expect("a JSON body")
}

/// Sum of a metric over the label sets that contain `labels` (for example `reason="duplicate"`).
/// Waits for each of `ids` (`what`) to be `Completed`, as `GET /orders/{id}` on `node` shows it, 30 s
/// each.
pub async fn wait_completed(http: &reqwest::Client, node: &Node, ids: &[Uuid], what: &str) {
    for id in ids {
        wait_until(
            &format!("{what} ({id}) to complete"),
            Duration::from_secs(30),
            || async {
                let doc = get_json(http, &format!("{}/orders/{id}", node.http)).await;
                (doc["state"] == "Completed").then_some(())
            },
        )
        .await;
    }
}

pub fn metric_with(scrape: &str, name: &str, labels: &str) -> f64 {
    let lines: Vec<&str> = scrape
        .lines()
        .filter(|line| line.contains(labels))
        .collect();
    metric_sum(&lines.join("\n"), name)
}

/// Submits an order over HTTP, returning its id.
pub async fn submit(http: &reqwest::Client, node: &Node, payload: Value) -> Uuid {
    let response = http
        .post(format!("{}/orders", node.http))
        .json(&payload)
        .send()
        .await
        .expect("POST /orders answers");
    assert_eq!(response.status(), 202, "POST /orders");
    let body: Value = response.json().await.expect("JSON reply");
    body["order_id"]
        .as_str()
        .expect("order_id")
        .parse()
        .expect("a UUID")
}

/// Publishes an empty-object order straight into the work stream (as `nats req orders.submit.<id> '{}'`
/// does) and returns the stream's acknowledgement.
pub async fn publish_order(js: &jetstream::Context, id: Uuid) -> jetstream::publish::PublishAck {
    js.publish(format!("orders.submit.{id}"), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("the stream stores the order")
}

/// Creates `ORDERS` and `workers` from `nats/*.json`, as an operator with the `nats` CLI would, but with
/// the delivery limit an earlier Orderly gave the consumer: `max_deliver` deliveries, `window` apart.
pub async fn orders_with_delivery_limit(
    js: &jetstream::Context,
    window: Duration,
    max_deliver: i64,
) -> (jetstream::stream::Stream, jetstream::consumer::PullConsumer) {
    let stream: jetstream::stream::Config =
        serde_json::from_str(include_str!("../../nats/orders-stream.json")).expect("stream JSON");
    let stream = js.create_stream(stream).await.expect("create stream");
    let mut limited: jetstream::consumer::pull::Config =
        serde_json::from_str(include_str!("../../nats/workers-consumer.json"))
            .expect("consumer JSON");
    limited.ack_wait = window;
    limited.max_deliver = max_deliver;
    limited.backoff = vec![window; max_deliver as usize];
    let consumer = stream
        .create_consumer(limited)
        .await
        .expect("create consumer");
    (stream, consumer)
}

/// Takes the next message from `consumer` and never settles it, again at each redelivery, until it has
/// been delivered `times` times: as a worker that dies with every delivery would.
pub async fn take_unsettled(
    consumer: &jetstream::consumer::PullConsumer,
    times: i64,
    expires: Duration,
) {
    use futures::StreamExt;
    let mut delivered = 0;
    while delivered < times {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(expires)
            .messages()
            .await
            .expect("fetch");
        if let Some(message) = batch.next().await {
            delivered = message
                .expect("a delivery")
                .info()
                .expect("metadata")
                .delivered;
        }
    }
}

/// Reads an order's document straight from the `orders` bucket (what `nats kv get orders <id>` shows).
pub async fn document(kv: &jetstream::kv::Store, id: Uuid) -> Option<Value> {
    let value = kv.get(id.to_string()).await.expect("kv get")?;
    // `None` for a value that is not JSON (a document an operator damaged), as for no document.
    serde_json::from_slice(&value).ok()
}

pub fn is_terminal(doc: &Value) -> bool {
    matches!(
        doc["state"].as_str(),
        Some("Completed" | "Failed" | "Cancelled")
    )
}

/// Waits until every order is terminal and returns their documents.
pub async fn wait_all_terminal(
    kv: &jetstream::kv::Store,
    ids: &[Uuid],
    timeout: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut docs = Vec::with_capacity(ids.len());
    for id in ids {
        loop {
            match document(kv, *id).await {
                Some(doc) if is_terminal(&doc) => {
                    docs.push(doc);
                    break;
                }
                doc => assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for order {id} to be terminal; it is {doc:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    docs
}

/// Messages stored in the `ORDERS` stream.
pub async fn stream_messages(js: &jetstream::Context) -> Option<u64> {
    let stream = js.get_stream("ORDERS").await.ok()?;
    Some(stream.get_info().await.ok()?.state.messages)
}

/// How many revisions in the order's history are terminal: exactly one for an order that ended once.
/// How many times the order's document was written (its revisions in the bucket's history).
pub async fn revisions(kv: &jetstream::kv::Store, id: Uuid) -> usize {
    use futures::StreamExt;
    let history = kv.history(id.to_string()).await.expect("kv history");
    history.count().await
}

pub async fn terminal_revisions(kv: &jetstream::kv::Store, id: Uuid) -> usize {
    use futures::StreamExt;
    let mut history = kv.history(id.to_string()).await.expect("kv history");
    let mut count = 0;
    while let Some(entry) = history.next().await {
        let entry = entry.expect("history entry");
        let doc: Value = serde_json::from_slice(&entry.value).expect("a JSON document");
        if is_terminal(&doc) {
            count += 1;
        }
    }
    count
}

pub fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("an RFC 3339 time, got {value}"))
        .with_timezone(&chrono::Utc)
}

/// Checks what a user sees in a terminal document: completed orders ran the four steps in order with
/// increasing times; failed ones rolled back what they did, in reverse order.
pub fn check_terminal_document(doc: &Value) {
    let steps = doc["steps"].as_array().expect("steps[]");
    let names = [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
    ];
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["step_name"], names[i], "step {i} of {doc}");
        if step["step_complete_time"].is_null() && doc["state"] == "Cancelled" {
            // The step a cancel interrupted: it never completed.
            assert_eq!(
                i + 1,
                steps.len(),
                "only the last step can be interrupted: {doc}"
            );
            continue;
        }
        assert!(time(&step["step_complete_time"]) >= time(&step["step_start_time"]));
        if i > 0 {
            assert!(time(&step["step_start_time"]) >= time(&steps[i - 1]["step_complete_time"]));
        }
    }
    assert!(time(&doc["complete_time"]) >= time(&doc["start_time"]));
    match doc["state"].as_str() {
        Some("Completed") => {
            assert_eq!(doc["current_step"], "Completed");
            assert_eq!(steps.len(), 4, "a completed order ran four steps: {doc}");
            assert!(steps
                .iter()
                .all(|s| s["status"] == "Completed" && s.get("rollback_start_time").is_none()));
        }
        Some("Failed") => {
            assert_eq!(doc["current_step"], "Failed");
            let failed = doc["failed_step"].as_str().expect("failed_step");
            assert_eq!(
                steps.last().expect("a step ran")["step_name"],
                failed,
                "no step ran after the failed one"
            );
            assert!(doc["failure_reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()));
            for (i, step) in steps.iter().enumerate() {
                assert_eq!(step["status"], "RolledBack", "{doc}");
                let start = time(&step["rollback_start_time"]);
                assert!(time(&step["rollback_complete_time"]) >= start);
                assert!(start >= time(&step["step_complete_time"]));
                if i + 1 < steps.len() {
                    // Reverse order: this step's rollback starts after the later step's finished.
                    assert!(
                        start >= time(&steps[i + 1]["rollback_complete_time"]),
                        "{doc}"
                    );
                }
            }
        }
        Some("Cancelled") => {
            assert_eq!(doc["current_step"], "Cancelled");
            assert_eq!(doc["intent"]["kind"], "cancel", "{doc}");
            let requested = time(&doc["intent"]["requested_at"]);
            for (i, step) in steps.iter().enumerate() {
                assert_eq!(step["status"], "RolledBack", "{doc}");
                assert!(
                    time(&step["step_start_time"]) <= requested,
                    "no step starts after the cancel: {doc}"
                );
                if i + 1 < steps.len() {
                    assert!(
                        time(&step["rollback_start_time"])
                            >= time(&steps[i + 1]["rollback_complete_time"]),
                        "{doc}"
                    );
                }
            }
        }
        other => panic!("not terminal: {other:?}"),
    }
}
