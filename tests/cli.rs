//! The terminal client (`orderly submit | get | list | cancel | retry | watch | completions`) run as a
//! process against a real node on a real nats-server: text and `--json` output, and the exit codes a
//! script branches on (0 ok, 2 bad usage, 3 not found, 4 conflict, 5 unreachable, 6 unauthorized).

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};
use tokio::task::spawn_blocking;

/// Runs `orderly <args>` against `url` with `env`, off the async runtime.
async fn orderly(url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderly"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ORDERLY_URL", url)
        .args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    spawn_blocking(move || command.output().expect("orderly runs"))
        .await
        .expect("the command's thread")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("an exit code, not a signal")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}): {}", stdout(output)))
}

/// Asserts a command exited with `expected`, showing its output if not.
fn expect(output: &Output, expected: i32, what: &str) {
    assert_eq!(
        code(output),
        expected,
        "{what}: stdout {}\nstderr {}",
        stdout(output),
        stderr(output)
    );
}

#[tokio::test]
async fn an_order_from_submit_to_failed_retried_cancelled_and_watched() {
    let nats = NatsServer::start().await;
    // Every order fails in Processing, so it can be retried; steps long enough to cancel one running.
    let node = Node::builder(&nats.url)
        .env("ORDERLY_STEP_DURATION", "300ms")
        .env("ORDERLY_FAILURE_RATE", "Processing=1.0")
        .start()
        .await;
    let url = node.http.as_str();

    let submitted = orderly(url, &[], &["submit", r#"{"customer":"ada"}"#]).await;
    expect(&submitted, 0, "submit");
    let id = stdout(&submitted).trim().to_owned();
    assert_eq!(id.len(), 36, "submit prints the id alone: {id:?}");

    let got = orderly(url, &[], &["get", &id, "--json"]).await;
    expect(&got, 0, "get --json");
    assert_eq!(json(&got)["order_id"], id.as_str());
    assert_eq!(json(&got)["payload"]["customer"], "ada");

    // The watch follows the order to its end, one line per change, and exits 0.
    let watched = orderly(url, &[], &["watch", &id]).await;
    expect(&watched, 0, "watch to Failed");
    let lines = stdout(&watched);
    assert!(
        lines.lines().next().unwrap_or("").contains("snapshot"),
        "{lines}"
    );
    assert!(
        lines.lines().last().unwrap_or("").contains("failed"),
        "{lines}"
    );
    assert!(lines.contains("rollback_started"), "{lines}");

    let text = orderly(url, &[], &["get", &id]).await;
    expect(&text, 0, "get");
    let text = stdout(&text);
    assert!(text.contains("state          Failed"), "{text}");
    assert!(text.contains("failed_step    Processing"), "{text}");
    assert!(
        text.contains("STEP") && text.contains("RolledBack"),
        "{text}"
    );

    let listed = orderly(url, &[], &["list", "--state", "Failed", "--json"]).await;
    expect(&listed, 0, "list --json");
    let page = json(&listed);
    let orders = page["orders"].as_array().expect("orders[]");
    assert_eq!(orders.len(), 1, "{page}");
    assert_eq!(orders[0]["order_id"], id.as_str());
    let table = orderly(url, &[], &["list"]).await;
    expect(&table, 0, "list");
    assert!(stdout(&table).starts_with("ORDER_ID"), "{}", stdout(&table));
    assert!(stdout(&table).contains(&id));

    // A Failed order cannot be cancelled: 409, exit 4.
    let refused = orderly(url, &[], &["cancel", &id]).await;
    expect(&refused, 4, "cancel of a Failed order");
    assert!(
        stderr(&refused).contains("invalid_state"),
        "{}",
        stderr(&refused)
    );

    // Retried, then cancelled at once with a reason, then watched to Cancelled.
    let retried = orderly(url, &[], &["retry", &id, "--json"]).await;
    expect(&retried, 0, "retry");
    assert_eq!(json(&retried)["retries"], 1);
    let again = orderly(url, &[], &["retry", &id]).await;
    expect(&again, 4, "retry of an order in progress");
    let cancelled = orderly(
        url,
        &[],
        &["cancel", &id, "--reason", "by mistake", "--json"],
    )
    .await;
    expect(&cancelled, 0, "cancel");
    assert_eq!(json(&cancelled)["intent"]["reason"], "by mistake");
    let watched = orderly(url, &[], &["watch", &id, "--json"]).await;
    expect(&watched, 0, "watch to Cancelled");
    let last: Value = serde_json::from_str(stdout(&watched).lines().last().unwrap_or("null"))
        .expect("watch --json prints a JSON line per event");
    assert_eq!(last["to"], "Cancelled", "{}", stdout(&watched));

    // Not found, malformed, and bad usage.
    let unknown = "01a20737-278d-7770-9ea1-fb5f19f32d56";
    expect(
        &orderly(url, &[], &["get", unknown]).await,
        3,
        "get of an unknown order",
    );
    expect(
        &orderly(url, &[], &["watch", unknown]).await,
        3,
        "watch of an unknown order",
    );
    expect(
        &orderly(url, &[], &["get", "nope"]).await,
        2,
        "get of a malformed id",
    );
    expect(
        &orderly(url, &[], &["submit", "[1,2]"]).await,
        2,
        "an array payload",
    );
    expect(
        &orderly(url, &[], &["list", "--state", "Done"]).await,
        2,
        "an unknown state",
    );
    expect(
        &orderly(url, &[], &["frobnicate"]).await,
        2,
        "an unknown command",
    );
}

#[tokio::test]
async fn an_unreachable_node_exits_5_with_a_hint() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let output = orderly(&url, &[], &["get", "01a20737-278d-7770-9ea1-fb5f19f32d56"]).await;
    expect(&output, 5, "nobody listening");
    let message = stderr(&output);
    assert!(message.contains("cannot reach the node at"), "{message}");
    assert!(message.contains("ORDERLY_URL"), "{message}");
    let bad = orderly("localhost:8080", &[], &["list"]).await;
    expect(&bad, 2, "a URL without a scheme");
}

#[tokio::test]
async fn a_token_protected_node_wants_the_token() {
    let nats = NatsServer::start().await;
    let node = Node::builder(&nats.url)
        .env("ORDERLY_API_TOKEN", "s3cret-operator")
        .start()
        .await;
    let url = node.http.as_str();
    let denied = orderly(url, &[], &["submit"]).await;
    expect(&denied, 6, "no token");
    assert!(
        stderr(&denied).contains("ORDERLY_TOKEN"),
        "{}",
        stderr(&denied)
    );
    let wrong = orderly(url, &[], &["list", "--token", "guess"]).await;
    expect(&wrong, 6, "a wrong token");
    let submitted = orderly(url, &[("ORDERLY_TOKEN", "s3cret-operator")], &["submit"]).await;
    expect(&submitted, 0, "the token from ORDERLY_TOKEN");
    let id = stdout(&submitted).trim().to_owned();
    let watched = orderly(url, &[], &["watch", &id, "--token", "s3cret-operator"]).await;
    expect(&watched, 0, "watch with --token");
    assert!(
        stdout(&watched).contains("completed"),
        "{}",
        stdout(&watched)
    );
}

#[tokio::test]
async fn completions_are_printed_for_a_shell() {
    let output = orderly("http://127.0.0.1:1", &[], &["completions", "bash"]).await;
    expect(&output, 0, "completions bash");
    let script = stdout(&output);
    for word in ["submit", "watch", "--token", "bench"] {
        assert!(script.contains(word), "{word} in the bash completions");
    }
    expect(
        &orderly("http://127.0.0.1:1", &[], &["completions", "tcsh"]).await,
        2,
        "an unknown shell",
    );
}
