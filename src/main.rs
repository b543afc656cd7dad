//! The `orderly` binary: parse the configuration, start logging, run a node until SIGINT or SIGTERM.

use clap::Parser;
use orderly::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) => exit_on_bad_config(e),
    };
    if let Err(e) = config.check() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let filter = match EnvFilter::try_new(&config.log) {
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
        .with_writer(std::io::stderr);
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
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "node failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
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
        let command = <Config as clap::CommandFactory>::command();
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
