//! What a user gets from a clone: `scripts/install-nats-server` puts the pinned server in
//! `.tools/bin`, and a node (or `orderly bench`, which starts its server the same way) run from the
//! project's directory finds it there without `PATH` or `ORDERLY_NATS_SERVER`.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The nats-server the tests use, as a path.
fn nats_server_path() -> std::path::PathBuf {
    let name = nats_server_binary();
    if name.contains('/') {
        return name.into();
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(&name))
        .find(|path| path.is_file())
        .expect("nats-server on PATH")
}

#[tokio::test]
async fn a_node_finds_the_nats_server_that_install_put_in_tools_bin() {
    let project = temp_dir("clone");
    let tools = project.path().join(".tools/bin");
    std::fs::create_dir_all(&tools).expect(".tools/bin");
    std::os::unix::fs::symlink(nats_server_path(), tools.join("nats-server"))
        .expect("the server in .tools/bin");
    let (http, nats) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("ORDERLY_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("ORDERLY_EMBEDDED_NATS_ADDR", format!("127.0.0.1:{nats}"))
        .current_dir(project.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("orderly starts");
    let ready = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/readyz");
    let up = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if ready
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or(false);
    // SIGTERM: the node stops its embedded server on the way out.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let output = child.wait_with_output().expect("the node exits");
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(up, "the node did not get ready:\n{logs}");
    assert!(logs.contains("started embedded nats-server"), "{logs}");
}
