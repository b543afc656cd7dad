//! Several `orderly` processes sharing one nats-server: the work is shared, each order runs on one node,
//! and the cluster view follows nodes as they come and go.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_three_hundred_orders() {
    let server = NatsServer::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            Node::builder(&server.url)
                .id(&format!("node-{i}"))
                .env("ORDERLY_STEP_DURATION", "100ms")
                .start()
                .await,
        );
    }
    let http = reqwest::Client::new();
    let cluster_view = |node: &Node| {
        let url = format!("{}/diagnostic/cluster", node.http);
        let http = http.clone();
        async move { http.get(url).send().await.ok()?.json::<Value>().await.ok() }
    };
    wait_until(
        "all three nodes in the cluster view",
        Duration::from_secs(10),
        || async {
            let view = cluster_view(&nodes[0]).await?;
            (view["node_count"] == 3).then_some(())
        },
    )
    .await;

    let mut ids = Vec::new();
    for i in 0..300 {
        ids.push(submit(&http, &nodes[i % 3], json!({ "n": i })).await);
    }
    let kv = server.js().await.get_key_value("orders").await.unwrap();
    let docs = wait_all_terminal(&kv, &ids, Duration::from_secs(120)).await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (id, doc) in ids.iter().zip(&docs) {
        check_terminal_document(doc);
        assert_eq!(
            terminal_revisions(&kv, *id).await,
            1,
            "order {id} ended exactly once"
        );
        let ran_on: BTreeSet<&str> = doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["node"].as_str().unwrap())
            .collect();
        assert_eq!(
            ran_on.len(),
            1,
            "all steps of {id} ran on one node: {ran_on:?}"
        );
        *per_node
            .entry(ran_on.into_iter().next().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_node.len(),
        3,
        "every node did some orders: {per_node:?}"
    );

    // A node that stops cleanly leaves the view at once; one that is killed, within a few heartbeats.
    let mut stopped = nodes.pop().unwrap();
    stopped.signal("TERM");
    stopped
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits");
    let mut killed = nodes.pop().unwrap();
    killed.signal("KILL");
    killed
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    let view = wait_until(
        "only node-0 in the cluster view",
        Duration::from_secs(10),
        || async {
            let view = cluster_view(&nodes[0]).await?;
            (view["node_count"] == 1).then_some(view)
        },
    )
    .await;
    assert_eq!(view["nodes"][0]["node_id"], "node-0");
}

/// Every heartbeat replaces its node's entry in `orderly-nodes` (one revision per key). Reading the view
/// while entries are replaced must still list every node, on every read.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_view_lists_every_node_while_their_heartbeats_replace_each_other() {
    use async_nats::jetstream::kv;
    use orderly::ops::cluster::Cluster;

    let server = NatsServer::start().await;
    let js = server.js().await;
    let bucket = js
        .create_key_value(kv::Config {
            bucket: "orderly-nodes".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let cluster = |id: &str| {
        Cluster::new(
            bucket.clone(),
            id.into(),
            "127.0.0.1:0".into(),
            50,
            // Long enough that no entry goes stale during the test: only the listing is under test.
            Duration::from_secs(600),
            Default::default(),
            Default::default(),
        )
    };
    let writers: Vec<_> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(|id| {
            let node = cluster(id);
            tokio::spawn(async move {
                loop {
                    node.beat().await.unwrap();
                }
            })
        })
        .collect();
    let reader = cluster("node-a");
    wait_until("all three entries", Duration::from_secs(10), || async {
        (reader.live_nodes().await.ok()?.len() == 3).then_some(())
    })
    .await;
    for read in 0..300 {
        let ids: Vec<String> = reader
            .live_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(ids, ["node-a", "node-b", "node-c"], "read {read}");
    }
    for writer in writers {
        writer.abort();
    }
}
