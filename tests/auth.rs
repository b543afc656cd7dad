//! Bearer tokens on the HTTP API: every endpoint, asked with no token, a wrong token and a token of
//! each role, answers with the documented status: 401 (with `WWW-Authenticate: Bearer`) without a
//! valid token, 403 for a role that may not, the endpoint's own answer otherwise; `/healthz`,
//! `/readyz` and `/metrics` stay open.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    NoToken,
    WrongToken,
    Reader,
    Submitter,
    Operator,
}

const CALLERS: [Caller; 5] = [
    Caller::NoToken,
    Caller::WrongToken,
    Caller::Reader,
    Caller::Submitter,
    Caller::Operator,
];

impl Caller {
    fn token(self) -> Option<&'static str> {
        match self {
            Caller::NoToken => None,
            Caller::WrongToken => Some("not-a-configured-token"),
            Caller::Reader => Some("reader-3f9a"),
            Caller::Submitter => Some("submitter-77c1"),
            Caller::Operator => Some("operator-0b2e"),
        }
    }
}

const TOKENS_FILE: &str = "\
# Orderly API tokens: token role
reader-3f9a     reader
submitter-77c1  submitter   # the shop front

operator-0b2e   operator
";

/// An endpoint, the role it needs (`None`: open to all), and its own answer to a caller allowed in.
struct Endpoint {
    method: &'static str,
    path: String,
    needs: Option<Caller>,
    answer: Answer,
}

/// What an endpoint answers a caller it lets in.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
}

fn endpoints(order: &str) -> Vec<Endpoint> {
    let endpoint = |method, path: &str, needs, answer| Endpoint {
        method,
        path: path.to_owned(),
        needs,
        answer,
    };
    use Answer::*;
    use Caller::*;
    vec![
        endpoint("GET", "/healthz", None, Status(200)),
        endpoint("GET", "/readyz", None, Status(200)),
        endpoint("GET", "/metrics", None, Status(200)),
        endpoint(
            "GET",
            &format!("/orders/{order}"),
            Some(Reader),
            Status(200),
        ),
        // The order is terminal: its stream is one snapshot, then ends.
        endpoint(
            "GET",
            &format!("/orders/{order}/events"),
            Some(Reader),
            Status(200),
        ),
        endpoint("GET", "/diagnostic/heartbeat", Some(Reader), Status(200)),
        endpoint("GET", "/diagnostic/cluster", Some(Reader), Status(200)),
        endpoint("GET", "/diagnostic/stats", Some(Reader), Status(200)),
        endpoint("POST", "/orders", Some(Submitter), Status(202)),
        endpoint("GET", "/orders", Some(Reader), Status(200)),
        endpoint(
            "POST",
            &format!("/orders/{order}/cancel"),
            Some(Operator),
            // The order has completed: neither a cancel nor a retry can change that.
            Status(409),
        ),
        endpoint(
            "POST",
            &format!("/orders/{order}/retry"),
            Some(Operator),
            // The order has completed: neither a cancel nor a retry can change that.
            Status(409),
        ),
        // The operator's call drains the node: it is made last, below.
        endpoint("POST", "/admin/drain", Some(Operator), Status(202)),
    ]
}

async fn call(
    http: &reqwest::Client,
    node: &Node,
    endpoint: &Endpoint,
    caller: Caller,
) -> reqwest::Response {
    let url = format!("{}{}", node.http, endpoint.path);
    let mut request = match endpoint.method {
        "POST" if endpoint.path == "/orders" => http.post(url).json(&json!({ "sku": "A-1" })),
        "POST" => http.post(url),
        _ => http.get(url),
    };
    if let Some(token) = caller.token() {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("the node answers")
}

/// Checks the answer to `caller` on `endpoint`; `false` if there is nothing to check yet.
async fn check(http: &reqwest::Client, node: &Node, endpoint: &Endpoint, caller: Caller) -> bool {
    let what = format!("{} {} as {caller:?}", endpoint.method, endpoint.path);
    let expected = match endpoint.needs {
        None => endpoint.answer,
        Some(_) if caller <= Caller::WrongToken => Answer::Status(401),
        Some(needs) if caller < needs => Answer::Status(403),
        Some(_) => endpoint.answer,
    };
    let Answer::Status(expected) = expected;
    let response = call(http, node, endpoint, caller).await;
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = response.text().await.expect("a body");
    assert_eq!(status, expected, "{what}: {body}");
    match status {
        401 => {
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}");
            let error: Value = serde_json::from_str(&body).expect("a JSON error");
            assert_eq!(error["code"], "unauthorized", "{what}");
        }
        403 => {
            let error: Value = serde_json::from_str(&body).expect("a JSON error");
            assert_eq!(error["code"], "forbidden", "{what}");
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        _ => assert_eq!(challenge, None, "{what}"),
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_answers_each_role_as_documented() {
    let server = NatsServer::start().await;
    let dir = temp_dir("tokens");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS_FILE).expect("write the tokens file");
    let mut node = Node::builder(&server.url)
        .env("ORDERLY_API_TOKENS_FILE", tokens.display())
        .start()
        .await;
    let http = reqwest::Client::new();
    let reply: Value = http
        .post(format!("{}/orders", node.http))
        .bearer_auth("submitter-77c1")
        .json(&json!({ "sku": "A-1" }))
        .send()
        .await
        .expect("POST /orders answers")
        .json()
        .await
        .expect("a JSON reply");
    let order = reply["order_id"].as_str().expect("an order id").to_owned();
    let kv = server
        .js()
        .await
        .get_key_value("orders")
        .await
        .expect("the orders bucket");
    wait_all_terminal(
        &kv,
        &[order.parse().expect("a UUID")],
        Duration::from_secs(20),
    )
    .await;

    let endpoints = endpoints(&order);
    let mut checked = 0;
    for endpoint in &endpoints {
        for caller in CALLERS {
            let drains = endpoint.path == "/admin/drain" && caller == Caller::Operator;
            if !drains && check(&http, &node, endpoint, caller).await {
                checked += 1;
            }
        }
    }
    assert!(checked >= 50, "checked {checked} answers");
    assert!(
        !node.has_exited(),
        "nobody but the operator drains the node"
    );

    // No token is ever written to the log, not even a wrong one.
    let logs = node.logs();
    for caller in CALLERS {
        if let Some(token) = caller.token() {
            assert!(!logs.contains(token), "{caller:?}'s token is in the log");
        }
    }
    assert!(!logs.contains("API is open"), "{logs}");

    let drain = endpoints.last().expect("the drain endpoint");
    assert!(check(&http, &node, drain, Caller::Operator).await);
    let status = node
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the drained node exits");
    assert!(status.success(), "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_the_api_is_open_and_the_node_says_so_once() {
    let server = NatsServer::start().await;
    let node = Node::builder(&server.url).start().await;
    let http = reqwest::Client::new();
    let id = submit(&http, &node, json!({ "sku": "A-1" })).await;
    let response = http
        .get(format!("{}/orders/{id}", node.http))
        .send()
        .await
        .expect("GET answers");
    assert_eq!(response.status(), 200);
    let logs = node.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("API is open"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_setting_stops_the_node_naming_the_line() {
    let server = NatsServer::start().await;
    let dir = temp_dir("bad-tokens");
    let cases = [
        ("ok-1 reader\nsecret-2 admin\n", "line 2"),
        ("# only a role is missing\nsecret-1\n", "line 2"),
        ("# nothing\n\n", "no token"),
    ];
    for (text, says) in cases {
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, text).expect("write the tokens file");
        let mut node = Node::builder(&server.url)
            .env("ORDERLY_API_TOKENS_FILE", tokens.display())
            .spawn();
        let status = node
            .wait_exit(Duration::from_secs(20))
            .await
            .expect("the node stops at start");
        assert!(!status.success());
        let logs = node.logs();
        assert!(
            logs.contains("ORDERLY_API_TOKENS_FILE") && logs.contains(says),
            "{logs}"
        );
        assert!(!logs.contains("secret-"), "no token in the message: {logs}");
    }
    let mut node = Node::builder(&server.url)
        .env("ORDERLY_API_TOKEN", "")
        .spawn();
    let status = node
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("stops");
    assert!(!status.success());
    assert!(node.logs().contains("ORDERLY_API_TOKEN"), "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_file_saved_with_a_byte_order_mark_keeps_its_first_token() {
    let server = NatsServer::start().await;
    let dir = temp_dir("tokens");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "\u{feff}first-5a1c operator\nreader-2b7e reader\n")
        .expect("write the tokens file");
    let node = Node::builder(&server.url)
        .env("ORDERLY_API_TOKENS_FILE", tokens.display())
        .start()
        .await;
    let http = reqwest::Client::new();
    for token in ["first-5a1c", "reader-2b7e"] {
        let response = http
            .get(format!("{}/orders", node.http))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /orders answers");
        assert_eq!(response.status(), 200, "the token of the file's line works");
    }
}
