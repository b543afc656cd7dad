//! The README's "A first run" shows the lines a node prints as it starts with its embedded
//! nats-server. This starts the real binary the same way and checks those lines against the README's
//! block, line for line: level, target, message and field names. Values (the node's id, times,
//! addresses, paths, durations) vary from run to run and are not compared.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the check compares of one text log line such as
/// `node_id=vm-1 2026-11-23T07:09:33.465932Z  INFO orderly::queue::connect: connected to NATS connection="work"`.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    level: String,
    target: String,
    message: String,
    fields: Vec<String>,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {} [{}]",
            self.level,
            self.target,
            self.message,
            self.fields.join(" ")
        )
    }
}

/// Parses a line as the node's text format writes it: `node_id=<id> <time> <LEVEL> <target>: <message>
/// <name>=<value>...`. The message ends at the first word that starts a field (`name=`); a value is
/// one word, or a quoted string that may hold spaces.
fn shape(line: &str) -> Result<Shape, String> {
    let bad = |why: &str| format!("{why}: {line:?}");
    let rest = line
        .strip_prefix("node_id=")
        .ok_or_else(|| bad("no node_id= prefix"))?;
    let mut words = rest.split_whitespace();
    let (_node, _time) = (words.next(), words.next());
    let level = words.next().ok_or_else(|| bad("no level"))?;
    let target = words
        .next()
        .and_then(|t| t.strip_suffix(':'))
        .ok_or_else(|| bad("no target"))?;
    let mut rest = line
        .split_once(&format!(" {target}: "))
        .map(|(_, r)| r)
        .ok_or_else(|| bad("no message"))?;

    let mut message = Vec::new();
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let word_end = rest.find(' ').unwrap_or(rest.len());
        let name = rest[..word_end]
            .split_once('=')
            .map(|(name, _)| name)
            .filter(|name| is_field_name(name));
        match name {
            None if fields.is_empty() => {
                message.push(&rest[..word_end]);
                rest = &rest[word_end..];
            }
            None => return Err(bad("a word after the fields")),
            Some(name) => {
                fields.push(name.to_owned());
                rest = &rest[name.len() + 1..];
                rest = &rest[value_len(rest).ok_or_else(|| bad("an unclosed quote"))?..];
            }
        }
        rest = rest.trim_start_matches(' ');
    }
    Ok(Shape {
        level: level.to_owned(),
        target: target.to_owned(),
        message: message.join(" "),
        fields,
    })
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// The length of the field value at the start of `rest`: a quoted string (with `\"` escapes) or a word.
fn value_len(rest: &str) -> Option<usize> {
    let Some(quoted) = rest.strip_prefix('"') else {
        return Some(rest.find(' ').unwrap_or(rest.len()));
    };
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 2),
            _ => {}
        }
    }
    None
}

/// The README's start-up block: the lines after `$ bash scripts/run` up to the closing fence.
fn readme_lines() -> Vec<String> {
    let path = format!("{}/README.md", env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let start = lines
        .windows(2)
        .position(|w| w[0].starts_with("```") && w[1] == "$ bash scripts/run")
        .expect("README.md has a block that starts with `$ bash scripts/run`")
        + 2;
    let block: Vec<String> = lines[start..]
        .iter()
        .take_while(|line| !line.starts_with("```"))
        .map(|line| line.to_string())
        .collect();
    assert!(
        start + block.len() < lines.len(),
        "the `$ bash scripts/run` block in README.md is not closed"
    );
    assert!(
        !block.is_empty(),
        "the `$ bash scripts/run` block in README.md is empty"
    );
    block
}

/// The node process; killed if the test ends before it stopped by itself.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(node: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = node.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn the_readme_shows_the_lines_a_node_prints_as_it_starts() {
    let wanted = readme_lines();
    let dir = temp_dir("readme");
    let nats_port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderly"));
    // As `bash scripts/run` starts it: default settings, no NATS_URL, so its own nats-server.
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ORDERLY_NATS_SERVER", nats_server_binary())
        .env("ORDERLY_DATA_DIR", dir.path().join("data"))
        .env("ORDERLY_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env(
            "ORDERLY_EMBEDDED_NATS_ADDR",
            format!("127.0.0.1:{nats_port}"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut node = Running(command.spawn().expect("the orderly binary starts"));

    // Read stderr on a thread until it closes, so the node never blocks on a full pipe.
    let stderr = node.0.stderr.take().expect("piped stderr");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let started = line.contains(" node started");
                printed.push(line);
                if started {
                    break;
                }
            }
            Err(e) => panic!(
                "no `node started` line ({e}); the node printed:\n{}",
                printed.join("\n")
            ),
        }
    }

    let shapes = |lines: &[String], whose: &str| -> Vec<Shape> {
        lines
            .iter()
            .map(|line| shape(line).unwrap_or_else(|e| panic!("{whose}: {e}")))
            .collect()
    };
    let (wanted_shapes, printed_shapes) = (
        shapes(&wanted, "README.md"),
        shapes(&printed, "the node's stderr"),
    );
    let list = |shapes: &[Shape]| {
        shapes
            .iter()
            .map(|s| format!("  {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        wanted_shapes == printed_shapes,
        "README.md's start-up lines differ from what the node prints; update the block after \
         `$ bash scripts/run` in README.md.\nREADME.md:\n{}\nthe node:\n{}\nthe node's lines:\n{}",
        list(&wanted_shapes),
        list(&printed_shapes),
        printed.join("\n")
    );

    // SIGTERM: the node stops, and stops its nats-server.
    let status = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
    let exit = wait_exit(&mut node.0, Duration::from_secs(30)).expect("the node exits on SIGTERM");
    assert!(exit.success(), "the node exited with {exit}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the embedded nats-server still listens after the node stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_log_line_parses_into_level_target_message_and_field_names() {
    let line = r#"node_id=vm-9 2026-11-23T07:09:33.490854Z  INFO orderly::node: node started node.id=vm-9 nats="nats://a b\"c" failure_rate=Scheduling=0.05 ack_wait=30s"#;
    assert_eq!(
        shape(line).unwrap(),
        Shape {
            level: "INFO".into(),
            target: "orderly::node".into(),
            message: "node started".into(),
            fields: vec![
                "node.id".into(),
                "nats".into(),
                "failure_rate".into(),
                "ack_wait".into()
            ],
        }
    );
    let warn = "node_id=vm-9 2026-11-23T07:09:33.4Z  WARN orderly::node: no API token configured (A, B): open";
    assert_eq!(
        shape(warn).unwrap().message,
        "no API token configured (A, B): open"
    );
    assert!(shape("2026-11-23T07:09:33.4Z  INFO orderly::node: x").is_err());
    assert!(shape(r#"node_id=a t INFO x: m k="open"#).is_err());
}
