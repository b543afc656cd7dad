//! The `orderly` binary: parse the configuration, start logging, run a node until SIGINT or SIGTERM;
//! or, with `orderly bench`, measure Orderly on a NATS deployment; or, with `orderly submit | get |
//! list | cancel | retry | watch`, talk to a node's HTTP API from a terminal.

use clap::{Parser, Subcommand};
use orderly::config::{Config, LogFormat};
use std::sync::Arc;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The node's settings, or a subcommand.
#[derive(Debug, Parser)]
#[command(name = "orderly", version, about = "Order processing on NATS JetStream", long_about = None)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure Orderly on a NATS server (a private one unless NATS_URL is set): throughput against
    /// the floor of its own NATS operations, scaling with nodes, overhead per order, reads, memory.
    Bench(orderly::bench::Args),
    #[command(flatten)]
    Client(orderly::cli::Command),
    /// Print a shell completion script for orderly (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

impl Command {
    fn is_named(arg: &std::ffi::OsStr) -> bool {
        <Command as clap::Subcommand>::has_subcommand(&arg.to_string_lossy())
    }
}

/// A subcommand alone, without the node's settings: a command does not read the node's environment
/// variables, so a node's env file cannot break the client, and the client's cannot break a node.
#[derive(Debug, Parser)]
#[command(name = "orderly", version)]
struct Subcommands {
    #[command(subcommand)]
    command: Command,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let named = std::env::args_os()
        .nth(1)
        .is_some_and(|arg| Command::is_named(&arg));
    let command = if named {
        match Subcommands::try_parse() {
            Ok(parsed) => Some(parsed.command),
            Err(e) => e.exit(), // exit code 2 for usage errors, 0 for --help
        }
    } else {
        match Cli::try_parse() {
            Ok(Cli {
                command: None,
                config,
            }) => return node(config).await,
            Ok(cli) => cli.command,
            Err(e) => exit_on_bad_config(e),
        }
    };
    match command {
        Some(Command::Bench(args)) => bench(args).await,
        Some(Command::Client(command)) => orderly::cli::run(command).await.into(),
        Some(Command::Completions { shell }) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "orderly", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(_) => std::process::ExitCode::FAILURE, // a closed pipe: nobody to tell
            }
        }
        None => std::process::ExitCode::SUCCESS,
    }
}

/// `orderly bench`: library warnings on stderr beside the progress lines.
async fn bench(args: orderly::bench::Args) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    match orderly::bench::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn node(mut config: Config) -> std::process::ExitCode {
    if let Err(e) = config.check() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    // The node's id is chosen here, so that every log line can carry it.
    let node_id = config
        .node_id
        .get_or_insert_with(orderly::node::default_node_id)
        .clone();
    let filter = match EnvFilter::try_new(filter_directives(&config.log)) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!(
                "error: invalid value {:?} for --log (ORDERLY_LOG): {e}",
                config.log
            );
            return std::process::ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(NodeTagged::new(
            &node_id,
            matches!(config.log_format, LogFormat::Json),
        ));
    match config.log_format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => logs.init(),
    }
    match orderly::node::run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A setting that cannot work: one message, the same exit code as a bad flag.
        Err(e) if e.is::<orderly::config::BadSetting>() => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "node failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The log filter: the user's, with the NATS client's own connection messages (`event: connected`,
/// `connected successfully`) left out unless it names the client's target (`async_nats=debug`): the
/// node logs every connection event itself, once, naming the connection.
fn filter_directives(user: &str) -> String {
    if user.contains("async_nats") {
        user.to_owned()
    } else {
        format!("{user},async_nats=warn")
    }
}

/// Writes log lines to stderr, each with the node's id: `"node_id": ...` as the first field of a JSON
/// line, `node_id=... ` at the start of a text line. The subscriber writes each event with one call,
/// so every line carries the id, whichever task or library logged it.
#[derive(Clone)]
struct NodeTagged {
    prefix: Arc<[u8]>,
    json: bool,
}

impl NodeTagged {
    fn new(node_id: &str, json: bool) -> NodeTagged {
        let prefix = if json {
            format!("\"node_id\":{},", serde_json::Value::from(node_id))
        } else {
            format!("node_id={node_id} ")
        };
        NodeTagged {
            prefix: prefix.into_bytes().into(),
            json,
        }
    }

    /// One formatted event, with the node's id.
    fn tag(&self, event: &[u8]) -> Vec<u8> {
        let mut line = Vec::with_capacity(self.prefix.len() + event.len());
        match event.strip_prefix(b"{") {
            Some(fields) if self.json => {
                line.push(b'{');
                line.extend_from_slice(&self.prefix);
                line.extend_from_slice(fields);
            }
            _ if self.json => line.extend_from_slice(event),
            _ => {
                line.extend_from_slice(&self.prefix);
                line.extend_from_slice(event);
            }
        }
        line
    }
}

impl<'a> MakeWriter<'a> for NodeTagged {
    type Writer = NodeTagged;

    fn make_writer(&'a self) -> NodeTagged {
        self.clone()
    }
}

impl std::io::Write for NodeTagged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(&self.tag(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Prints clap's message, adds which environment variable the setting can also come from, and exits.
fn exit_on_bad_config(error: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue};
    if !error.use_stderr() {
        error.exit(); // --help or --version
    }
    let _ = error.print();
    if let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) {
        let long = arg
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_start_matches("--");
        let command = <Cli as clap::CommandFactory>::command();
        let env = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env());
        if let Some(env) = env {
            eprintln!(
                "(--{long} is also set by the environment variable {})",
                env.to_string_lossy()
            );
        }
    }
    std::process::exit(2)
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_log_line_carries_the_node_id() {
        let json = NodeTagged::new("node-a", true);
        let line = json.tag(b"{\"level\":\"INFO\",\"fields\":{}}\n");
        let value: serde_json::Value = serde_json::from_slice(&line).expect("still JSON");
        assert_eq!(value["node_id"], "node-a");
        assert_eq!(value["level"], "INFO");
        let text = NodeTagged::new("node-a", false);
        assert_eq!(
            text.tag(b"2026-01-01T00:00:00Z  INFO orderly: started\n"),
            b"node_id=node-a 2026-01-01T00:00:00Z  INFO orderly: started\n"
        );
    }

    #[test]
    fn the_clients_own_connection_messages_are_left_out_unless_asked_for() {
        assert_eq!(filter_directives("info"), "info,async_nats=warn");
        assert_eq!(
            filter_directives("info,async_nats=debug"),
            "info,async_nats=debug"
        );
    }
}
