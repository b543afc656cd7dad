//! The cluster example of deploy/cluster/ runs as shipped: three nats-servers started from its
//! `nats-*.conf` and three nodes from its `node-*.env` (ports moved to free ones, stores to a temp dir,
//! nothing else changed) form a cluster with replicas 3, and orders submitted to each node complete.

mod common;

use common::*;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cluster");

/// The example's servers, killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `text` with each address of `moves` replaced by its new one.
fn moved(text: &str, moves: &HashMap<String, String>) -> String {
    moves
        .iter()
        .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
}

/// The `KEY=VALUE` lines of an env file.
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[tokio::test]
async fn the_example_cluster_runs_three_nodes_on_three_servers_with_replicas_3() {
    let dir = temp_dir("deploy-cluster");
    // Every address of the example (client 422i, route 622i, monitoring 822i) to a free port.
    let mut moves = HashMap::new();
    let mut clients = Vec::new();
    for i in 1..=3 {
        for base in [4220, 6220, 8220] {
            let port = free_port();
            moves.insert(
                format!("127.0.0.1:{}", base + i),
                format!("127.0.0.1:{port}"),
            );
            if base == 4220 {
                clients.push(port);
            }
        }
        moves.insert(
            format!("\"./data/nats-{i}\""),
            format!(
                "{:?}",
                dir.path().join(format!("nats-{i}")).display().to_string()
            ),
        );
    }
    let mut servers = Servers(Vec::new());
    for i in 1..=3 {
        let shipped = std::fs::read_to_string(format!("{EXAMPLE}/nats-{i}.conf"))
            .expect("the example's server configuration");
        let conf = dir.path().join(format!("nats-{i}.conf"));
        std::fs::write(&conf, moved(&shipped, &moves)).expect("the moved configuration");
        servers.0.push(
            Command::new(nats_server_binary())
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server runs"),
        );
    }
    for port in &clients {
        wait_until("the servers to listen", Duration::from_secs(20), || async {
            std::net::TcpStream::connect(("127.0.0.1", *port))
                .ok()
                .map(|_| ())
        })
        .await;
    }

    let mut nodes = Vec::new();
    for i in 1..=3 {
        let shipped = std::fs::read_to_string(format!("{EXAMPLE}/node-{i}.env"))
            .expect("the example's node settings");
        let settings = env_file(&moved(&shipped, &moves));
        let get = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("node-{i}.env sets {key}"))
        };
        assert_eq!(get("ORDERLY_REPLICAS"), "3");
        let mut builder = Node::builder(&get("NATS_URL")).id(&get("ORDERLY_NODE_ID"));
        for (key, value) in &settings {
            // The harness gives each node a free HTTP port of its own.
            if key != "ORDERLY_HTTP_ADDR" && key != "ORDERLY_NODE_ID" {
                builder = builder.env(key, value);
            }
        }
        nodes.push(builder.spawn());
    }
    // A cluster elects its JetStream leader after a few seconds; a node waits for it.
    for node in &mut nodes {
        node.wait_ready().await;
    }

    let client = async_nats::connect(format!("nats://127.0.0.1:{}", clients[0]))
        .await
        .expect("a client of the cluster");
    let js = async_nats::jetstream::new(client);
    for stream in ["ORDERS", "ORDERS_INDEX", "KV_orders"] {
        let mut stream = js.get_stream(stream).await.expect("the stream exists");
        let info = stream.info().await.expect("stream info");
        assert_eq!(info.config.num_replicas, 3, "{}", info.config.name);
    }

    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for k in 0..5 {
            ids.push(submit(&http, node, serde_json::json!({ "node": n, "k": k })).await);
        }
    }
    wait_completed(&http, &nodes[2], &ids, "an order of the example cluster").await;
    let ran: std::collections::HashSet<String> = {
        let mut ran = std::collections::HashSet::new();
        for id in &ids {
            let doc = get_json(&http, &format!("{}/orders/{id}", nodes[0].http)).await;
            ran.insert(doc["steps"][0]["node"].as_str().unwrap_or("").to_owned());
        }
        ran
    };
    assert!(
        ran.iter().all(|node| node.starts_with("node-")),
        "orders ran on the example's nodes: {ran:?}"
    );
}
