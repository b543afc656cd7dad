//! The fault suite: real nats-servers and at least two real `orderly` processes per scenario, short
//! steps and a short ack wait. After every scenario every accepted order is terminal exactly once, no
//! order's lease intervals overlap across nodes, no write lies outside its writer's interval, and no
//! completed step ran again (see `common::audit`).
//!
//! The scenarios run one at a time: each loads both cores on its own, and timing faults (a pause, a
//! cut) should not be blurred by a neighbour's load.

mod common;

use async_nats::jetstream;
use chrono::Utc;
use common::audit::{self, Outside};
use common::faults::{NatsCluster, Proxy};
use common::scenario::*;
use common::*;
use std::time::{Duration, Instant};
use uuid::Uuid;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The ack wait of every scenario but SIGTERM's: short, so that takeovers happen within seconds.
const ACK_WAIT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_mid_step_under_load() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let mut a = audits.node(&server.url, "kill-a").start().await;
    let _b = audits.node(&server.url, "kill-b").start().await;
    let js = server.js().await;
    let ids = publish_orders(&js, 300).await;

    wait_busy(&a, 30.0).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5))
        .await
        .expect("killed node exits");
    let died = Utc::now();
    let held = audits.held_by("kill-a");
    assert!(!held.is_empty(), "the killed node held orders");

    let outside = Outside {
        died: [("kill-a".to_owned(), vec![died])].into(),
        ..Outside::default()
    };
    let report = settle_and_check(
        "kill -9",
        &js,
        &ids,
        &audits,
        &outside,
        Duration::from_secs(60),
    )
    .await;
    let takeovers = report.handovers_after("died");
    assert_eq!(
        takeovers.len(),
        held.len(),
        "every order the killed node held was taken over"
    );
    assert!(takeovers.iter().all(|h| h.to.node == "kill-b"));
    let mut times: Vec<f64> = takeovers
        .iter()
        .map(|h| seconds(died, h.to.start))
        .collect();
    let (median, max) = audit::median_max(&mut times);
    println!(
        "[kill -9] {} orders taken over after the kill: median {median:.3}s, max {max:.3}s (ack wait {ACK_WAIT:?})",
        times.len()
    );
}

/// How a node is separated from the others for a while.
enum Isolation<'a> {
    /// `SIGSTOP`, then `SIGCONT`: the process does nothing at all meanwhile.
    Paused(&'a Node),
    /// Its connection to NATS stops forwarding, sockets open; the process keeps running.
    CutOff(&'a Proxy),
}

impl Isolation<'_> {
    async fn begin(&self) {
        match self {
            Isolation::Paused(node) => {
                node.signal("STOP");
                node.wait_stopped().await;
            }
            Isolation::CutOff(proxy) => proxy.cut(),
        }
    }

    fn end(&self) {
        match self {
            Isolation::Paused(node) => node.signal("CONT"),
            Isolation::CutOff(proxy) => proxy.heal(),
        }
    }
}

/// Node `a` is isolated while it holds orders, for more than 2 × the ack wait, then comes back. Each
/// order it held is finished by node `b`; `a` ends its lease on each as fenced and acks, naks or
/// terminates none of them; back at work, it finishes new orders; and the guarantees hold throughout.
async fn isolated_node_is_taken_over_and_returns(
    scenario: &str,
    js: &jetstream::Context,
    audits: &Audits,
    (a, b): (&Node, &str),
    isolation: Isolation<'_>,
) {
    let mut ids = publish_orders(js, 150).await;
    wait_busy(a, 20.0).await;
    isolation.begin().await;
    let began = Instant::now();
    let held = audits.held_by(&a.id);
    assert!(!held.is_empty(), "the isolated node held orders");
    if let Isolation::CutOff(_) = isolation {
        // Still cut off, the node stops working on each order: it cannot confirm its lease.
        wait_until(
            "the cut-off node to fence itself",
            Duration::from_secs(10),
            || async { audits.held_by(&a.id).is_empty().then_some(()) },
        )
        .await;
        let fences = metric_sum(&a.metrics().await, "orderly_self_fences_total");
        assert!(
            fences >= held.len() as f64,
            "{fences} self-fences for {} orders",
            held.len()
        );
    }
    let kv = orders_bucket(js).await;
    wait_all_terminal(&kv, &held, Duration::from_secs(30)).await;
    hold_fault(began, 2 * ACK_WAIT + Duration::from_millis(500)).await;
    isolation.end();

    wait_until(
        "the returned node to let go of every order it held",
        Duration::from_secs(10),
        || async { audits.held_by(&a.id).is_empty().then_some(()) },
    )
    .await;
    for id in &held {
        let mine = audits.of(&a.id, *id);
        let last_claim = mine
            .iter()
            .rposition(|l| l["event"] == "claim")
            .expect("a claim");
        let after = &mine[last_claim + 1..];
        assert!(
            after.iter().all(|l| l["event"] != "settled"),
            "order {id}: the isolated node touched the message: {after:?}"
        );
        let end = after
            .iter()
            .find(|l| l["event"] == "lease_end")
            .expect("an end");
        assert_eq!(end["why"], "fenced", "order {id}: {end}");
    }

    // Back at work.
    let more = publish_orders(js, 150).await;
    wait_until(
        "the returned node to finish a new order",
        Duration::from_secs(60),
        || async {
            more.iter()
                .any(|id| audits.of(&a.id, *id).iter().any(common::audit::finishes))
                .then_some(())
        },
    )
    .await;
    ids.extend(more);
    let report = settle_and_check(
        scenario,
        js,
        &ids,
        audits,
        &Outside::default(),
        Duration::from_secs(60),
    )
    .await;
    let fenced = report.handovers_after("fenced");
    assert!(
        held.iter().all(|id| fenced
            .iter()
            .any(|h| h.order_id == *id && h.from.node == a.id && h.to.node == b)),
        "every order of the isolated node went to the other node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_longer_than_two_ack_waits_then_sigcont() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let audits = Audits::new();
    let a = audits.node(&server.url, "stop-a").start().await;
    let _b = audits.node(&server.url, "stop-b").start().await;
    let js = server.js().await;
    isolated_node_is_taken_over_and_returns(
        "SIGSTOP",
        &js,
        &audits,
        (&a, "stop-b"),
        Isolation::Paused(&a),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_a_silent_network_fences_itself_and_rejoins() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let proxy = Proxy::start(server.port).await;
    let audits = Audits::new();
    let a = audits.node(&proxy.url, "cut-a").start().await;
    let _b = audits.node(&server.url, "cut-b").start().await;
    let js = server.js().await;
    isolated_node_is_taken_over_and_returns(
        "network cut",
        &js,
        &audits,
        (&a, "cut-b"),
        Isolation::CutOff(&proxy),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_hands_orders_back_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let audits = Audits::new();
    // A long ack wait: orders can only be finished in time if they are handed back, not timed out.
    let node = |id: &str| {
        audits
            .node(&server.url, id)
            .env("ORDERLY_ACK_WAIT", "60s")
            .env("ORDERLY_SHUTDOWN_GRACE", "5s")
    };
    let mut a = node("term-a").start().await;
    let _b = node("term-b").start().await;
    let js = server.js().await;
    let ids = publish_orders(&js, 200).await;

    wait_busy(&a, 20.0).await;
    a.signal("TERM");
    let status = a
        .wait_exit(Duration::from_secs(5 + 3))
        .await
        .expect("the node exits within its grace period");
    assert!(status.success(), "clean exit: {status}");

    let report = settle_and_check(
        "SIGTERM",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(30),
    )
    .await;
    let handed = report.handovers_after("released");
    assert!(!handed.is_empty(), "the stopped node handed orders back");
    assert!(handed.iter().all(|h| h.to.node == "term-b"));
    let mut times: Vec<f64> = handed
        .iter()
        .map(|h| seconds(h.from.end, h.to.start))
        .collect();
    let (median, max) = audit::median_max(&mut times);
    println!(
        "[SIGTERM] {} orders handed back and taken over: median {median:.3}s, max {max:.3}s (ack wait 60s)",
        times.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_under_load_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut server = NatsServer::start().await;
    let audits = Audits::new();
    let a = audits.node(&server.url, "restart-a").start().await;
    let b = audits.node(&server.url, "restart-b").start().await;
    let js = server.js().await;
    let mut ids = publish_orders(&js, 200).await;

    wait_busy(&a, 20.0).await;
    server.restart().await;
    let js = server.js().await;

    // Both nodes reconnect by themselves and take new work.
    for node in [&a, &b] {
        wait_until(
            &format!("node {} to reconnect", node.id),
            Duration::from_secs(30),
            || async {
                let scrape = node.metrics().await;
                let connected = |connection: &str| {
                    metric_with(
                        &scrape,
                        "orderly_nats_connected",
                        &format!(r#"connection="{connection}""#),
                    )
                };
                (metric_with(
                    &scrape,
                    "orderly_nats_reconnects_total",
                    r#"connection="work""#,
                ) >= 1.0
                    && connected("work") == 1.0
                    && connected("public") == 1.0)
                    .then_some(())
            },
        )
        .await;
    }
    ids.extend(publish_orders(&js, 100).await);
    settle_and_check(
        "nats-server restart",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_of_a_three_server_cluster_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start().await;
    let audits = Audits::new();
    let node = |id: &str| {
        audits
            .node(&cluster.urls, id)
            .env("ORDERLY_REPLICAS", 3)
            .env("ORDERLY_ACK_WAIT", "3s")
    };
    let a = node("raft-a").start().await;
    let b = node("raft-b").start().await;
    let js = jetstream::new(cluster.client().await);
    let ids = publish_orders(&js, 200).await;

    let mut stream = js.get_stream("ORDERS").await.expect("stream ORDERS");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.num_replicas, 3);
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");
    wait_busy(&a, 20.0).await;
    cluster.kill(&leader);

    let js = jetstream::new(cluster.client().await);
    settle_and_check(
        "stream leader killed",
        &js,
        &ids,
        &audits,
        &Outside::default(),
        Duration::from_secs(90),
    )
    .await;
    let mut stream = js.get_stream("ORDERS").await.expect("stream ORDERS");
    let info = stream.info().await.expect("stream info");
    let new_leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    assert!(
        new_leader.is_some() && new_leader != Some(leader.clone()),
        "a new leader ({new_leader:?}) replaced {leader}"
    );
    // Each server reports its own creation time for the consumer: a new leader is not a recreated
    // consumer, and no node may say it was.
    for node in [&a, &b] {
        let logs = node.logs();
        assert!(
            !logs.contains("was created again"),
            "a node took a change of leader for a recreated consumer:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_ever_failing_orders_end_within_the_delivery_cap() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = NatsServer::start().await;
    let js = server.js().await;
    let layout = orderly::queue::setup::Layout {
        replicas: 1,
        ack_wait: ACK_WAIT,
    };
    let max_deliver = 3;
    let setup = orderly::queue::setup::setup(&js, layout)
        .await
        .expect("JetStream set up");
    let mut outside = Outside::default();

    // An order whose every delivery goes to a worker that dies with it: here the test takes each
    // delivery from the shared consumer and never answers.
    let abandoned = Uuid::now_v7();
    publish_order(&js, abandoned).await;
    take_unsettled(&setup.consumer, max_deliver, Duration::from_secs(10)).await;

    // An order whose processing keeps erroring: its stored document is unreadable.
    let unreadable = Uuid::now_v7();
    let revision = setup
        .orders
        .put(unreadable.to_string(), "not an order".into())
        .await
        .expect("kv put");
    outside.revisions.insert(revision);
    publish_order(&js, unreadable).await;
    // A message that can never be processed, and an order whose payload is not JSON.
    js.publish("orders.submit.not-an-order-id", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let not_json = Uuid::now_v7();
    js.publish(format!("orders.submit.{not_json}"), "{oops".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let healthy = publish_orders(&js, 100).await;

    let audits = Audits::new();
    let node = |id: &str| {
        audits
            .node(&server.url, id)
            .env("ORDERLY_MAX_DELIVER", 3)
            .env("ORDERLY_FAILURE_RATE", "0")
    };
    let a = node("poison-a").start().await;
    let b = node("poison-b").start().await;

    let mut ids = healthy.clone();
    ids.extend([abandoned, unreadable, not_json]);
    let report = settle_and_check(
        "poison",
        &js,
        &ids,
        &audits,
        &outside,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        report.completed,
        healthy.len(),
        "healthy orders all complete"
    );

    let kv = orders_bucket(&js).await;
    for (id, expected) in [
        (abandoned, "gave up after 3 deliveries"),
        (unreadable, "gave up after 3 deliveries"),
        (not_json, "not valid JSON"),
    ] {
        let doc = document(&kv, id).await.expect("a document");
        assert_eq!(doc["state"], "Failed", "{doc}");
        let reason = doc["failure_reason"].as_str().unwrap_or_default();
        assert!(reason.contains(expected), "order {id}: {reason}");
    }
    let mut scrapes = String::new();
    for node in [&a, &b] {
        scrapes.push_str(&node.metrics().await);
    }
    // Both end under a lease: the abandoned one on the delivery after its last, the unreadable one
    // on its last.
    assert_eq!(
        metric_with(
            &scrapes,
            "orderly_orders_given_up_total",
            r#"path="last_delivery""#
        ),
        2.0
    );
    assert_eq!(
        metric_with(
            &scrapes,
            "orderly_messages_terminated_total",
            r#"reason="invalid_id""#
        ),
        1.0
    );
}

/// The consumer's leader and creation time as the cluster reports them now.
async fn consumer_leader(
    js: &jetstream::Context,
) -> Option<(String, time::OffsetDateTime, Vec<(String, bool)>)> {
    let read = async {
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("workers", "ORDERS")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        let cluster = info.cluster.as_ref()?;
        let replicas = cluster
            .replicas
            .iter()
            .map(|r| (r.name.clone(), r.current))
            .collect();
        Some((cluster.leader.clone()?, info.created, replicas))
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_leading_the_consumer_is_not_taken_for_a_recreated_consumer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start().await;
    let audits = Audits::new();
    let node = audits
        .node(&cluster.urls, "restart-a")
        .env("ORDERLY_REPLICAS", 3)
        .env("ORDERLY_ACK_WAIT", "3s")
        .start()
        .await;
    let js = jetstream::new(cluster.client().await);
    let (first, created, _) = wait_until("the consumer's leader", Duration::from_secs(30), || {
        consumer_leader(&js)
    })
    .await;

    // The consumer's leader is killed and started again; once it has caught up, it is made the
    // leader again.
    cluster.kill(&first);
    wait_until("another leader", Duration::from_secs(30), || async {
        consumer_leader(&js)
            .await
            .filter(|(leader, _, _)| *leader != first)
    })
    .await;
    cluster.start_again(&first);
    cluster.wait_all_up(Duration::from_secs(30)).await;
    let js = jetstream::new(cluster.client().await);
    wait_until(
        "the restarted server to lead the consumer",
        Duration::from_secs(60),
        || async {
            let (leader, created, replicas) = consumer_leader(&js).await?;
            if leader == first {
                return Some(created);
            }
            if replicas
                .iter()
                .any(|(name, current)| *name == first && *current)
            {
                let request = serde_json::json!({ "placement": { "preferred": first } });
                let _ = js
                    .client()
                    .request(
                        "$JS.API.CONSUMER.LEADER.STEPDOWN.ORDERS.workers",
                        request.to_string().into(),
                    )
                    .await;
            }
            None
        },
    )
    .await;
    let (_, created_now, _) = consumer_leader(&js).await.expect("the consumer's leader");
    println!("[restarted leader] {first} leads again; creation time {created} then {created_now}");

    // The node ends its leases and says that the leader changed; it does not claim the consumer
    // was created again.
    let said = wait_until(
        "the node to see the change of leader",
        Duration::from_secs(10),
        || async {
            let logs = node.logs();
            logs.lines()
                .find(|l| {
                    l.contains("ending every lease taken")
                        && l.contains(&format!("leader=\"{first}\""))
                })
                .map(str::to_owned)
        },
    )
    .await;
    println!("[restarted leader] the node says: {said}");
    let logs = node.logs();
    assert!(
        !logs.contains("was created again"),
        "a change of leader was reported as a recreated consumer:\n{logs}"
    );
}
