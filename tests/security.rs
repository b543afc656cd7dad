//! NATS authentication and the shipped least-privilege accounts (nats/accounts.conf), against a real
//! nats-server: nodes work as `node`; a `submitter` and an `operator` may do what docs/security.md
//! says and nothing else; no user may publish an advisory; no secret shows; a refused node stops.

mod common;

use common::secured::SecuredServer;
use common::{wait_until, Node};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

const ACCOUNTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nats/accounts.conf");

/// What the server did with an attempt.
#[derive(Debug)]
enum Verdict {
    /// Let through and answered.
    Answered(async_nats::Message),
    /// Let through; nobody listens there.
    NoResponders,
    /// Let through; no answer came (a subscription, or a subject read without replies).
    Passed,
    /// Refused: the server logged a permission violation for it.
    Refused,
}

impl Verdict {
    fn allowed(&self) -> bool {
        !matches!(self, Verdict::Refused)
    }
}

/// A client of one user, and the server's log to tell what it refused.
struct Probe<'a> {
    user: &'static str,
    client: async_nats::Client,
    server: &'a SecuredServer,
}

impl<'a> Probe<'a> {
    async fn connect(server: &'a SecuredServer, user: &'static str, password: &str) -> Probe<'a> {
        // A node's replies come on a prefix of its own (nats/accounts.conf).
        let inbox = if user == "node" {
            "_INBOX_orderly"
        } else {
            "_INBOX"
        };
        let client =
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .custom_inbox_prefix(inbox)
                .connect(server.url("nats", ""))
                .await
                .unwrap_or_else(|e| panic!("{user} connects: {e}"));
        Probe {
            user,
            client,
            server,
        }
    }

    fn refused(&self, kind: &str, subject: &str) -> bool {
        let needle = format!("{kind} Violation - Subject \"{subject}\"");
        self.server
            .violations(self.user)
            .iter()
            .any(|line| line.contains(&needle))
    }

    /// Sends a request on `subject`; refused when the server logs a violation for it.
    async fn publish(&self, subject: &str, payload: &str) -> Verdict {
        let request = tokio::time::timeout(
            Duration::from_secs(3),
            self.client
                .request(subject.to_owned(), payload.to_owned().into()),
        );
        let refused = wait_until(
            "a permission violation",
            Duration::from_secs(10),
            || async { self.refused("Publish", subject).then_some(()) },
        );
        let verdict = tokio::select! {
            _ = refused => return Verdict::Refused,
            reply = request => match reply {
                Ok(Ok(message)) => Verdict::Answered(message),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Verdict::NoResponders,
                Ok(Err(_)) | Err(_) => Verdict::Passed,
            },
        };
        self.settled(verdict, "Publish", subject).await
    }

    /// Subscribes to `subject`; refused when the server logs a violation for it.
    async fn subscribe(&self, subject: &str) -> (Verdict, Option<async_nats::Subscriber>) {
        let subscriber = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("the subscription is sent");
        let verdict = self.settled(Verdict::Passed, "Subscription", subject).await;
        (verdict, Some(subscriber))
    }

    /// `verdict`, unless the server logged a violation for what was sent before a request the user
    /// may make was answered (the server handles a connection's messages in order; a flush only
    /// writes them to the socket).
    async fn settled(&self, verdict: Verdict, kind: &str, subject: &str) -> Verdict {
        let barrier = if self.user == "submitter" {
            "orders.get"
        } else {
            "$JS.API.INFO"
        };
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            self.client.request(barrier, "".into()),
        );
        assert!(
            matches!(answer.await, Ok(Ok(_))),
            "{barrier} answers {}",
            self.user
        );
        if self.refused(kind, subject) {
            Verdict::Refused
        } else {
            verdict
        }
    }
}

/// One line of the matrix: who tried what, whether it may, and what happened.
struct Row {
    user: &'static str,
    action: String,
    expected: bool,
    allowed: bool,
}

#[derive(Default)]
struct Matrix(Vec<Row>);

impl Matrix {
    fn record(
        &mut self,
        probe: &Probe<'_>,
        action: impl Into<String>,
        expected: bool,
        verdict: &Verdict,
    ) {
        self.0.push(Row {
            user: probe.user,
            action: action.into(),
            expected,
            allowed: verdict.allowed(),
        });
    }

    /// Prints the matrix, then fails on every line that differs from what is expected.
    fn check(&self) {
        println!("| user | over NATS | may | as tested |");
        println!("| --- | --- | --- | --- |");
        let word = |b: bool| if b { "yes" } else { "no" };
        for row in &self.0 {
            println!(
                "| {} | {} | {} | {} |",
                row.user,
                row.action,
                word(row.expected),
                if row.allowed { "allowed" } else { "refused" }
            );
        }
        let wrong: Vec<String> = self
            .0
            .iter()
            .filter(|row| row.expected != row.allowed)
            .map(|row| {
                format!(
                    "{} {}: expected {}",
                    row.user,
                    row.action,
                    word(row.expected)
                )
            })
            .collect();
        assert!(wrong.is_empty(), "permissions differ: {wrong:#?}");
    }
}

fn passwords() -> [(String, String); 3] {
    ["NODE", "SUBMITTER", "OPERATOR"].map(|role| {
        (
            format!("ORDERLY_{role}_PASSWORD"),
            format!("pw-{role}-{}", Uuid::new_v4().simple()),
        )
    })
}

async fn accounts_server(passwords: &[(String, String); 3]) -> SecuredServer {
    let env: Vec<(&str, &str)> = passwords
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    SecuredServer::start(Path::new(ACCOUNTS), &[], &env).await
}

fn json_of(verdict: &Verdict) -> Value {
    match verdict {
        Verdict::Answered(message) => {
            serde_json::from_slice(&message.payload).unwrap_or(Value::Null)
        }
        _ => Value::Null,
    }
}

/// Asks `orders.get` until the order's state satisfies `done`.
async fn wait_state(probe: &Probe<'_>, id: &str, what: &str, done: impl Fn(&str) -> bool) -> Value {
    // A plain request: a draining node may take one without answering it, and then another asks.
    wait_until(what, Duration::from_secs(30), || async {
        let request = probe.client.request("orders.get", id.to_owned().into());
        let reply = tokio::time::timeout(Duration::from_secs(2), request).await;
        let doc: Value = serde_json::from_slice(&reply.ok()?.ok()?.payload).ok()?;
        doc["state"].as_str().is_some_and(&done).then_some(doc)
    })
    .await
}

#[tokio::test]
async fn each_role_may_do_what_the_accounts_allow_and_nothing_else() {
    let passwords = passwords();
    let [node_pw, submitter_pw, operator_pw] = passwords.clone().map(|(_, v)| v);
    let server = accounts_server(&passwords).await;
    let node_url = server.url("nats", &format!("node:{node_pw}"));
    let mut first = Node::builder(&node_url)
        .env("ORDERLY_STEP_DURATION", "1s")
        .start()
        .await;
    let submitter = Probe::connect(&server, "submitter", &submitter_pw).await;
    let operator = Probe::connect(&server, "operator", &operator_pw).await;
    let node = Probe::connect(&server, "node", &node_pw).await;
    let mut matrix = Matrix::default();

    // A submitter submits, reads and follows its orders.
    let (verdict, events) = submitter.subscribe("orders.events.>").await;
    matrix.record(&submitter, "subscribe orders.events.>", true, &verdict);
    let created = submitter
        .publish("orders.create", r#"{"customer":"ada"}"#)
        .await;
    matrix.record(&submitter, "request orders.create", true, &created);
    let id = json_of(&created)["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let read = submitter.publish("orders.get", &id).await;
    matrix.record(&submitter, "request orders.get", true, &read);
    assert_eq!(json_of(&read)["order_id"], id.as_str());
    let submitted = submitter
        .publish(
            &format!("orders.submit.{}", Uuid::now_v7()),
            r#"{"customer":"bob"}"#,
        )
        .await;
    matrix.record(
        &submitter,
        "publish orders.submit.<id> (into the stream)",
        true,
        &submitted,
    );
    if let Some(events) = events {
        let mut ours = futures::StreamExt::filter(events, |m| {
            std::future::ready(m.subject.ends_with(id.as_str()))
        });
        let event =
            tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut ours))
                .await;
        assert!(
            matches!(event, Ok(Some(_))),
            "an event of the order arrives"
        );
    }
    let doc = wait_state(&submitter, &id, "the order to complete", |s| {
        s == "Completed"
    })
    .await;
    assert_eq!(doc["current_step"], "Completed");

    // ... and nothing else.
    let forbidden_publish = [
        (
            "$JS.API.STREAM.MSG.GET.ORDERS",
            r#"{"seq":1}"#,
            "read the work stream",
        ),
        ("$JS.API.STREAM.INFO.ORDERS", "", "stream info"),
        (
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.workers",
            r#"{"batch":1}"#,
            "fetch from the consumer",
        ),
        (
            "$JS.API.CONSUMER.CREATE.ORDERS",
            "{}",
            "create a consumer on the work stream",
        ),
        (
            &format!("$KV.orders.{id}") as &str,
            "{}",
            "write the orders bucket",
        ),
        (
            &format!("$JS.API.DIRECT.GET.KV_orders.$KV.orders.{id}"),
            "",
            "read the orders bucket directly",
        ),
        (
            "$JS.API.STREAM.DELETE.KV_orders",
            "",
            "delete the orders bucket",
        ),
        (
            "$JS.API.STREAM.PURGE.KV_orders",
            "",
            "purge the orders bucket",
        ),
        (&format!("orders.events.{id}"), "{}", "publish a fake event"),
        (
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ORDERS.workers",
            "{}",
            "publish a fake advisory",
        ),
        ("orders.cancel", &id, "request orders.cancel"),
        ("orders.retry", &id, "request orders.retry"),
        ("orders.list", "{}", "request orders.list"),
        (
            &format!("orders.interrupt.{}", first.id),
            &id,
            "interrupt a node",
        ),
        ("$SRV.INFO", "", "service info"),
    ];
    for (subject, payload, what) in forbidden_publish {
        let verdict = submitter.publish(subject, payload).await;
        matrix.record(&submitter, format!("{what} (`{subject}`)"), false, &verdict);
    }
    let forbidden_subscribe = [
        (
            "orders.submit.>",
            "read work messages as they are published",
        ),
        (
            "_INBOX_orderly.>",
            "receive what nodes receive (fetched work, JetStream answers)",
        ),
        ("$JS.ACK.>", "see acks"),
        ("$KV.orders.>", "see document writes"),
        ("orders.create", "answer orders.create in a node's place"),
        ("$JS.EVENT.>", "follow advisories"),
    ];
    for (subject, what) in forbidden_subscribe {
        let (verdict, _) = submitter.subscribe(subject).await;
        matrix.record(
            &submitter,
            format!("{what} (subscribe `{subject}`)"),
            false,
            &verdict,
        );
    }

    // An operator also cancels, retries, lists and looks.
    let created = operator.publish("orders.create", "{}").await;
    matrix.record(&operator, "request orders.create", true, &created);
    let cancelled_id = json_of(&created)["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let cancel = operator.publish("orders.cancel", &cancelled_id).await;
    matrix.record(&operator, "request orders.cancel", true, &cancel);
    wait_state(&operator, &cancelled_id, "the order to be cancelled", |s| {
        s == "Cancelled"
    })
    .await;
    let retry = operator.publish("orders.retry", &cancelled_id).await;
    matrix.record(&operator, "request orders.retry", true, &retry);
    assert_eq!(
        json_of(&retry)["order_id"],
        cancelled_id.as_str(),
        "{retry:?}"
    );
    let list = operator.publish("orders.list", "{}").await;
    matrix.record(&operator, "request orders.list", true, &list);
    let looks = [
        ("$SRV.INFO.orders", "service info (nats micro info orders)"),
        ("$JS.API.INFO", "account info"),
        ("$JS.API.STREAM.NAMES", "stream names"),
        ("$JS.API.STREAM.INFO.ORDERS", "stream info ORDERS"),
        (
            "$JS.API.CONSUMER.INFO.ORDERS.workers",
            "consumer info ORDERS workers",
        ),
        (
            &format!("$JS.API.DIRECT.GET.KV_orders.$KV.orders.{id}") as &str,
            "nats kv get orders <id>",
        ),
    ];
    for (subject, what) in looks {
        let verdict = operator.publish(subject, "").await;
        matrix.record(&operator, format!("{what} (`{subject}`)"), true, &verdict);
    }
    let history = async {
        let kv = async_nats::jetstream::new(operator.client.clone())
            .get_key_value("orders")
            .await
            .ok()?;
        let entries = futures::StreamExt::collect::<Vec<_>>(kv.history(&id).await.ok()?).await;
        Some(entries.len())
    };
    let revisions = tokio::time::timeout(Duration::from_secs(10), history)
        .await
        .ok()
        .flatten();
    assert!(
        revisions.unwrap_or(0) > 1,
        "nats kv history orders <id>: {revisions:?}"
    );
    let verdict = operator
        .settled(
            Verdict::Passed,
            "Publish",
            "$JS.API.CONSUMER.CREATE.KV_orders",
        )
        .await;
    matrix.record(
        &operator,
        "nats kv history orders <id> (a consumer on KV_orders)",
        true,
        &verdict,
    );
    let operator_forbidden = [
        (
            "$JS.API.STREAM.MSG.GET.ORDERS",
            r#"{"seq":1}"#,
            "read the work stream",
        ),
        (
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.workers",
            r#"{"batch":1}"#,
            "fetch from the consumer",
        ),
        ("$JS.API.STREAM.DELETE.ORDERS", "", "delete the work stream"),
        ("$JS.API.STREAM.PURGE.ORDERS", "", "purge the work stream"),
        (
            "$JS.API.STREAM.UPDATE.ORDERS",
            "{}",
            "change the work stream",
        ),
        (
            "$JS.API.CONSUMER.DELETE.ORDERS.workers",
            "",
            "delete the consumer",
        ),
        (
            &format!("$KV.orders.{id}") as &str,
            "{}",
            "write the orders bucket",
        ),
        (
            "$JS.API.STREAM.DELETE.KV_orders",
            "",
            "delete the orders bucket",
        ),
        (
            "$JS.API.STREAM.PURGE.KV_orders",
            "",
            "purge the orders bucket",
        ),
        (&format!("orders.events.{id}"), "{}", "publish a fake event"),
        (
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.ORDERS.workers",
            "{}",
            "publish a fake advisory",
        ),
    ];
    for (subject, payload, what) in operator_forbidden {
        let verdict = operator.publish(subject, payload).await;
        matrix.record(&operator, format!("{what} (`{subject}`)"), false, &verdict);
    }
    let (verdict, _) = operator.subscribe("_INBOX_orderly.>").await;
    matrix.record(
        &operator,
        "receive what nodes receive (subscribe `_INBOX_orderly.>`)",
        false,
        &verdict,
    );
    let verdict = node.publish("$JS.EVENT.ADVISORY.API", "{}").await;
    matrix.record(
        &node,
        "publish an advisory (`$JS.EVENT.ADVISORY.API`)",
        false,
        &verdict,
    );

    // A node hands its order back on SIGTERM, and the next one finishes it.
    let handed = json_of(&submitter.publish("orders.create", "{}").await)["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    wait_state(&submitter, &handed, "the order to run", |s| s == "Running").await;
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the node drains and exits: {status:?}"
    );
    let second = Node::builder(&node_url).start().await;
    wait_state(
        &submitter,
        &handed,
        "the handed-back order to complete",
        |s| s == "Completed",
    )
    .await;

    // Nothing of a secret shows, wherever a node shows itself.
    let http = reqwest::Client::new();
    let mut shown = vec![first.logs(), second.logs(), second.metrics().await];
    for path in [
        "/diagnostic/heartbeat",
        "/diagnostic/cluster",
        "/diagnostic/stats",
    ] {
        shown.push(
            common::get_json(&http, &format!("{}{path}", second.http))
                .await
                .to_string(),
        );
    }
    shown.push(json_of(&operator.publish("$SRV.INFO.orders", "").await).to_string());
    let js = async_nats::jetstream::new(node.client.clone());
    let beats = js
        .get_key_value("orderly-nodes")
        .await
        .expect("the heartbeat bucket");
    let value = beats
        .get(&second.id)
        .await
        .expect("a heartbeat")
        .expect("one");
    shown.push(String::from_utf8_lossy(&value).into_owned());
    for text in &shown {
        for (_, password) in &passwords {
            assert!(
                !text.contains(password.as_str()),
                "a password shows in:\n{text}"
            );
        }
    }
    assert!(
        first.logs().contains("nats://node:***@127.0.0.1"),
        "{}",
        first.logs()
    );

    matrix.check();
    // The nodes' own connections (named `orderly <node> <connection>`), not the test's probe as `node`.
    let violations: Vec<String> = server
        .violations("node")
        .into_iter()
        .filter(|line| line.contains(":orderly "))
        .collect();
    assert!(
        violations.is_empty(),
        "the node was refused what it needs:\n{}",
        violations.join("\n")
    );
}

#[tokio::test]
async fn a_node_with_a_wrong_password_stops_and_says_authorization_failed() {
    let passwords = passwords();
    let server = accounts_server(&passwords).await;
    let mut node = Node::builder(&server.url("nats", "node:wrong-password")).spawn();
    let status = node.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}\n{}",
        node.logs()
    );
    let logs = node.logs();
    assert!(logs.contains("authorization failed"), "{logs}");
    assert!(!logs.contains("wrong-password"), "{logs}");
}

/// A CA, and a certificate it signed for `names`, as PEM files in `dir` named after `name`.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orderly test CA");
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let ca = params.self_signed(&ca_key).expect("a CA");
        Pki { ca, ca_key }
    }

    /// Writes `<name>.pem` and `<name>-key.pem`, signed by the CA for `names`; returns their paths.
    fn issue(&self, dir: &Path, name: &str, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("params");
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("a signed certificate");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("written");
        std::fs::write(&key_path, key.serialize_pem()).expect("written");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    fn write_ca(&self, dir: &Path) -> String {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).expect("written");
        path.display().to_string()
    }
}

#[tokio::test]
async fn a_node_connects_over_tls_with_a_token_and_keeps_trying_when_the_token_is_rotated() {
    let dir = common::temp_dir("tls");
    let pki = Pki::new();
    let ca = pki.write_ca(dir.path());
    let (server_cert, server_key) = pki.issue(dir.path(), "server", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = pki.issue(dir.path(), "client", &["orderly-node"]);
    let config = dir.path().join("tls.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ token: $ORDERLY_TEST_TOKEN }}\n\
             tls {{ cert_file: {server_cert:?}, key_file: {server_key:?}, ca_file: {ca:?}, verify: true }}\n"
        ),
    )
    .expect("the server configuration is written");
    let token = format!("tok-{}", Uuid::new_v4().simple());
    let mut server =
        SecuredServer::start(&config, &[], &[("ORDERLY_TEST_TOKEN", token.as_str())]).await;
    let url = server.url("nats", &token);

    // Without the CA, and without a client certificate, the server is not trusted or does not trust.
    for (what, env) in [
        ("no CA", vec![]),
        (
            "no client certificate",
            vec![("ORDERLY_NATS_TLS_CA", ca.as_str())],
        ),
    ] {
        let mut builder = Node::builder(&url);
        for (key, value) in env {
            builder = builder.env(key, value);
        }
        let mut node = builder.spawn();
        let status = node.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| !s.success()),
            "{what}: {status:?}\n{}",
            node.logs()
        );
        let logs = node.logs();
        assert!(
            logs.contains("NATS refused the work connection"),
            "{what}:\n{logs}"
        );
        assert!(!logs.contains(&token), "{what}: the token shows:\n{logs}");
    }

    let mut node = Node::builder(&url)
        .env("ORDERLY_NATS_TLS_CA", &ca)
        .env("ORDERLY_NATS_TLS_CERT", &client_cert)
        .env("ORDERLY_NATS_TLS_KEY", &client_key)
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({ "customer": "ada" })).await;
    wait_until("the order to complete", Duration::from_secs(20), || async {
        let doc = common::get_json(&http, &format!("{}/orders/{id}", node.http)).await;
        (doc["state"] == "Completed").then_some(())
    })
    .await;
    assert!(
        node.logs().contains("nats=\"nats://***@127.0.0.1"),
        "{}",
        node.logs()
    );

    // The token is rotated: the node cannot get back in; it says so, counts it, is not ready, and
    // keeps trying. With the old token back, it is let in again.
    let rotated = format!("tok-{}", Uuid::new_v4().simple());
    server
        .restart_with(&[("ORDERLY_TEST_TOKEN", rotated.as_str())])
        .await;
    wait_until(
        "the node to report the refusal",
        Duration::from_secs(20),
        || async {
            let scrape = node.metrics().await;
            let refused = common::metric_sum(&scrape, "orderly_nats_auth_refused_total");
            (refused > 0.0).then_some(())
        },
    )
    .await;
    let ready = http
        .get(format!("{}/readyz", node.http))
        .send()
        .await
        .expect("an answer");
    assert_eq!(ready.status(), 503);
    assert!(!node.has_exited(), "the node keeps trying");
    assert!(
        node.logs()
            .contains("refused this node's credentials on reconnecting"),
        "{}",
        node.logs()
    );
    server
        .restart_with(&[("ORDERLY_TEST_TOKEN", token.as_str())])
        .await;
    node.wait_ready().await;
    let logs = node.logs();
    assert!(
        !logs.contains(&token) && !logs.contains(&rotated),
        "a token shows:\n{logs}"
    );
}

#[tokio::test]
async fn a_node_connects_with_an_nkey() {
    let dir = common::temp_dir("nkey");
    let user = nkeys::KeyPair::new_user();
    let seed_file = dir.path().join("node.nk");
    std::fs::write(&seed_file, user.seed().expect("a seed")).expect("written");
    let config = dir.path().join("nkey.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .expect("the server configuration is written");
    let server = SecuredServer::start(&config, &[], &[]).await;
    let url = server.url("nats", "");
    let node = Node::builder(&url)
        .env("ORDERLY_NATS_NKEY", seed_file.display())
        .start()
        .await;
    let http = reqwest::Client::new();
    let id = common::submit(&http, &node, serde_json::json!({})).await;
    assert!(!id.is_nil());
    // Without the seed, the same server refuses a node.
    let mut anonymous = Node::builder(&url).spawn();
    let status = anonymous.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(
        anonymous.logs().contains("authorization failed"),
        "{}",
        anonymous.logs()
    );
}
