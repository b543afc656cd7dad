//! The fixes prometheus/RUNBOOK.md tells an operator to apply with the `nats` CLI, applied to a real
//! nats-server with real nodes running. Each test sends the JetStream API requests that the documented
//! `nats` command sends (`nats consumer edit` reads the consumer's configuration, changes it and sends
//! it back as an update; `nats stream get` / `rmm` are `STREAM.MSG.GET` / `STREAM.MSG.DELETE`; `nats
//! pub -J` is a publish that waits for the stream's acknowledgement), and checks what the operator would
//! see afterwards.

mod common;

use async_nats::jetstream::consumer::{pull, FromConsumer, PullConsumer};
use async_nats::jetstream::stream::Stream;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

/// The consumer's configuration as `nats consumer edit` starts from it.
async fn consumer_config(stream: &Stream) -> pull::Config {
    let consumer: PullConsumer = stream.get_consumer("workers").await.expect("consumer");
    pull::Config::try_from_consumer_config(consumer.cached_info().config.clone())
        .expect("a pull consumer")
}

async fn readyz(node: &Node) -> (u16, Value) {
    let response = reqwest::get(format!("{}/readyz", node.http))
        .await
        .expect("readyz answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// OrderlyRedeliverySpike and OrderlySelfFenceSpike: raise the ack wait. `nats consumer edit ORDERS
/// workers --wait 4s` alone does not change the window (the server follows backoff[0]) and a node
/// started with the new ORDERLY_ACK_WAIT refuses to start; editing ack_wait and backoff together
/// (`nats consumer edit ORDERS workers --config workers-consumer-4s.json`, as nats/README.md shows)
/// keeps the running node working and lets a node with the new setting start.
#[tokio::test(flavor = "multi_thread")]
async fn raising_the_ack_wait_takes_the_backoff_too() {
    let secs = Duration::from_secs;
    let server = NatsServer::start().await;
    let old = Node::builder(&server.url)
        .id("old")
        .env("ORDERLY_ACK_WAIT", "2s")
        .start()
        .await;
    let js = server.js().await;
    let stream = js.get_stream("ORDERS").await.expect("stream ORDERS");

    // `nats consumer edit ORDERS workers --wait 4s`: only ack_wait changes.
    let mut config = consumer_config(&stream).await;
    assert_eq!(config.backoff, vec![secs(2), secs(2), secs(4), secs(8)]);
    config.ack_wait = secs(4);
    stream
        .update_consumer(config)
        .await
        .expect("the consumer is edited");
    let edited = consumer_config(&stream).await;
    assert_eq!(
        edited.backoff[0],
        secs(2),
        "the window in force is still 2 s"
    );
    let mut refused = Node::builder(&server.url)
        .id("refused")
        .env("ORDERLY_ACK_WAIT", "4s")
        .spawn();
    let status = refused
        .wait_exit(secs(20))
        .await
        .expect("a node with ORDERLY_ACK_WAIT=4s refuses to start");
    assert_eq!(status.code(), Some(1), "{}", refused.logs());
    assert!(
        refused.logs().contains("different configuration"),
        "{}",
        refused.logs()
    );

    // The fix: ack_wait and backoff = [w, w, 2w, 4w], edited in place.
    let mut config = consumer_config(&stream).await;
    config.ack_wait = secs(4);
    config.backoff = vec![secs(4), secs(4), secs(8), secs(16)];
    stream
        .update_consumer(config)
        .await
        .expect("the consumer is edited");
    wait_until(
        "the running node to follow the new windows",
        secs(10),
        || async {
            old.logs()
                .contains("the consumer's redelivery windows changed")
                .then_some(())
        },
    )
    .await;
    assert_eq!(readyz(&old).await.0, 200, "the running node stays ready");
    // Restart the nodes one at a time with the new setting: a node with 4 s starts and works.
    let new = Node::builder(&server.url)
        .id("new")
        .env("ORDERLY_ACK_WAIT", "4s")
        .start()
        .await;
    let http = reqwest::Client::new();
    let ids = vec![
        submit(&http, &old, json!({"n": 1})).await,
        submit(&http, &new, json!({"n": 2})).await,
    ];
    let kv = js.get_key_value("orders").await.expect("bucket");
    for doc in wait_all_terminal(&kv, &ids, secs(20)).await {
        assert_eq!(doc["state"], "Completed", "{doc}");
    }
}

/// OrderlyAckPendingNearCap: `nats consumer edit ORDERS workers --max-pending 40000` needs no
/// restart: running nodes stay ready, keep working, and export the new cap the alert compares with.
#[tokio::test(flavor = "multi_thread")]
async fn raising_max_ack_pending_needs_no_restart() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let js = server.js().await;
    let stream = js.get_stream("ORDERS").await.expect("stream ORDERS");
    let mut config = consumer_config(&stream).await;
    config.max_ack_pending = 40_000;
    stream
        .update_consumer(config)
        .await
        .expect("the consumer is edited");
    wait_until(
        "the node to export the new cap",
        Duration::from_secs(10),
        || async {
            (metric_sum(&node.metrics().await, "orderly_queue_max_ack_pending") == 40_000.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(readyz(&node).await.0, 200, "the node stays ready");
    let id = submit(&reqwest::Client::new(), &node, json!({})).await;
    let kv = js.get_key_value("orders").await.expect("bucket");
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed", "{}", docs[0]);
}

/// OrderlyDeliveriesExhausted: a message stranded by a delivery limit is retried as the runbook says.
/// Remove the limit (here a node whose ack wait agrees does it when it starts), read the payload
/// (`nats stream get ORDERS <seq>`), remove the old message (`nats stream rmm ORDERS <seq>`) and
/// publish the payload again without a Nats-Msg-Id (`nats pub -J orders.submit.<id> '<payload>'`):
/// the order runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_stranded_message_is_retried_as_the_runbook_says() {
    let server = NatsServer::start().await;
    let js = server.js().await;
    let (stream, consumer) = orders_with_delivery_limit(&js, Duration::from_secs(1), 2).await;

    // Both deliveries go to a client that never settles them, and the last one runs out.
    let mut advisories = server
        .client()
        .await
        .subscribe("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ORDERS.workers")
        .await
        .expect("subscribe to advisories");
    let id = uuid::Uuid::now_v7();
    let seq = publish_order(&js, id).await.sequence;
    take_unsettled(&consumer, 2, Duration::from_secs(5)).await;
    // A pull waiting after the last delivery's window: the server gives up on the message instead
    // of delivering it, and says so.
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(3))
        .messages()
        .await
        .expect("fetch");
    assert!(batch.next().await.is_none(), "no third delivery");
    tokio::time::timeout(Duration::from_secs(10), advisories.next())
        .await
        .expect("a MAX_DELIVERIES advisory within 10 s")
        .expect("the advisory subscription is open");

    let node = Node::builder(&server.url)
        .env("ORDERLY_ACK_WAIT", "1s")
        .start()
        .await;
    assert_eq!(
        consumer_config(&stream).await.max_deliver,
        -1,
        "the limit is removed"
    );
    let kv = js.get_key_value("orders").await.expect("bucket");
    let stranded = || async {
        let mut consumer: PullConsumer = stream.get_consumer("workers").await.ok()?;
        let info = consumer.info().await.ok()?;
        let stored = stream_messages(&js).await?;
        Some(stored - info.num_pending - info.num_ack_pending as u64)
    };
    assert_eq!(stranded().await, Some(1), "one message is stranded");
    assert!(document(&kv, id).await.is_none(), "its order never ran");

    // `nats stream get ORDERS <seq>`, `nats stream rmm ORDERS <seq>`, `nats pub -J ...`.
    let old = stream.get_raw_message(seq).await.expect("stream get");
    assert_eq!(old.subject.as_str(), format!("orders.submit.{id}"));
    assert!(
        stream.delete_message(seq).await.expect("stream rmm"),
        "removed"
    );
    js.publish(old.subject.clone(), old.payload.clone())
        .await
        .expect("publish")
        .await
        .expect("the stream stores the order");
    let docs = wait_all_terminal(&kv, &[id], Duration::from_secs(20)).await;
    assert_eq!(docs[0]["state"], "Completed", "{}", docs[0]);
    assert_eq!(stranded().await, Some(0), "nothing is stranded");
    assert_eq!(readyz(&node).await.0, 200);
}
