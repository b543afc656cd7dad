//! Every wrong setting stops the node at once: the node binary is run as a process with one wrong
//! setting, against a real nats-server where one is needed, and must exit with code 2 within seconds,
//! with one message naming the setting and the fix, and without retrying.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a node may take to give up on a wrong setting: far less than the minute it retries a
/// server that is not ready yet.
const AT_ONCE: Duration = Duration::from_secs(10);

/// Runs a node on `nats_url` with `env`, waits for it to exit, and answers its exit code and output.
async fn fails(nats_url: &str, env: &[(&str, &str)]) -> (i32, String) {
    let mut builder = Node::builder(nats_url);
    for (key, value) in env {
        builder = builder.env(key, value);
    }
    let mut node = builder.spawn();
    let status = node.wait_exit(AT_ONCE).await;
    let logs = node.logs();
    let status = status.unwrap_or_else(|| panic!("the node still runs after {AT_ONCE:?}:\n{logs}"));
    (status.code().expect("an exit code"), logs)
}

/// The one error line of the output, checked to be the only one.
fn the_error(logs: &str) -> &str {
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.starts_with("error:") || l.contains("ERROR orderly") || l.contains("retrying in 1s")
        })
        .collect();
    assert_eq!(errors.len(), 1, "one error, said once, no retries:\n{logs}");
    errors[0]
}

#[tokio::test]
async fn a_malformed_nats_url_is_refused_before_connecting() {
    let (code, logs) = fails("htp:/oops", &[]).await;
    assert_eq!(code, 2, "{logs}");
    let error = the_error(&logs);
    assert!(
        error.contains("NATS_URL \"htp:/oops\" is not a NATS URL"),
        "{error}"
    );
    assert!(error.contains("nats://127.0.0.1:4222"), "{error}");
    assert!(!logs.contains("retrying"), "{logs}");
}

#[tokio::test]
async fn a_host_name_for_the_http_address_gets_the_ip_to_write() {
    let nats = NatsServer::start().await;
    let (code, logs) = fails(&nats.url, &[("ORDERLY_HTTP_ADDR", "localhost:8080")]).await;
    assert_eq!(code, 2, "{logs}");
    assert!(
        logs.contains("must be IP:port") && logs.contains("write 127.0.0.1:8080"),
        "{logs}"
    );
    assert!(logs.contains("ORDERLY_HTTP_ADDR"), "{logs}");
}

/// A `NATS_URL`, the other settings, and what the message must say.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn bad_files_and_two_ways_to_authenticate_exit_2_naming_their_setting() {
    let nats = NatsServer::start().await;
    let dir = temp_dir("settings");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret admin\n").expect("a tokens file");
    let seed = dir.path().join("seed");
    std::fs::write(
        &seed,
        "SUAEL6GG2L2HIF7DUGZJGMRUFKXELGGYFMHF76UO2AYBG3K4YLWR3FKC5Q\n",
    )
    .expect("a seed file");
    let tokens = tokens.display().to_string();
    let seed = seed.display().to_string();
    let user_url = nats.url.replace("nats://", "nats://u:p@");
    let cases: [Case; 4] = [
        (
            &nats.url,
            vec![("ORDERLY_API_TOKENS_FILE", &tokens)],
            "(ORDERLY_API_TOKENS_FILE), line 1: unknown role \"admin\"",
        ),
        (
            &nats.url,
            vec![("ORDERLY_API_TOKENS_FILE", "/nonexistent/tokens")],
            "cannot read the API tokens file /nonexistent/tokens (ORDERLY_API_TOKENS_FILE)",
        ),
        (
            &nats.url,
            vec![("ORDERLY_NATS_CREDS", "/nonexistent/node.creds")],
            "cannot read the credentials file /nonexistent/node.creds (ORDERLY_NATS_CREDS)",
        ),
        (
            &user_url,
            vec![("ORDERLY_NATS_NKEY", &seed)],
            "set only one way to authenticate to NATS",
        ),
    ];
    for (url, env, message) in cases {
        let (code, logs) = fails(url, &env).await;
        assert_eq!(code, 2, "{env:?}: {logs}");
        let error = the_error(&logs);
        assert!(error.contains(message), "{env:?}: {error}");
        assert!(
            !error.contains("NATS_URL:"),
            "labelled with its own setting: {error}"
        );
    }
}

#[tokio::test]
async fn three_replicas_on_a_single_server_stop_at_once() {
    let nats = NatsServer::start().await;
    let (code, logs) = fails(&nats.url, &[("ORDERLY_REPLICAS", "3")]).await;
    assert_eq!(code, 2, "{logs}");
    let error = the_error(&logs);
    assert!(
        error.contains("--replicas (ORDERLY_REPLICAS) is 3"),
        "{error}"
    );
    assert!(error.contains("set ORDERLY_REPLICAS=1"), "{error}");
}

/// A nats-server without JetStream, killed on drop.
struct PlainServer(Child);

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_server_without_jetstream_stops_the_node_at_once() {
    let port = free_port();
    let _server = PlainServer(
        Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs"),
    );
    let url = format!("nats://127.0.0.1:{port}");
    wait_until("the server to listen", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let (code, logs) = fails(&url, &[]).await;
    assert_eq!(code, 2, "{logs}");
    let error = the_error(&logs);
    assert!(
        error.contains("does not run JetStream; start it with -js"),
        "{error}"
    );
}

#[tokio::test]
async fn a_wrong_account_or_password_stops_the_node_at_once() {
    let dir = temp_dir("accounts");
    let port = free_port();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{ store_dir: {:?} }}\naccounts {{\n  ORDERS: {{ jetstream: enabled, users: [{{user: node, password: node-pw}}] }}\n  PLAIN: {{ users: [{{user: plain, password: plain-pw}}] }}\n}}\n",
            dir.path().join("store").display().to_string()
        ),
    )
    .expect("the server configuration");
    let _server = PlainServer(
        Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs"),
    );
    wait_until("the server to listen", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let (code, logs) = fails(&format!("nats://plain:plain-pw@127.0.0.1:{port}"), &[]).await;
    assert_eq!(code, 2, "{logs}");
    let error = the_error(&logs);
    assert!(
        error.contains("not for the account the node connects as"),
        "{error}"
    );
    let (code, logs) = fails(&format!("nats://node:wrong@127.0.0.1:{port}"), &[]).await;
    assert_eq!(code, 2, "{logs}");
    let error = the_error(&logs);
    assert!(
        error.contains("NATS refused the work connection: authorization failed"),
        "{error}"
    );
    assert!(
        !logs.contains("wrong"),
        "no password in the message: {logs}"
    );
}
