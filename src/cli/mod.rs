//! The terminal client: `orderly submit | get | list | cancel | retry | watch`, over a node's HTTP API
//! as docs/api.md documents it. Text for people by default, the API's own JSON with `--json`, and an
//! exit code a script can branch on ([`Exit`]).

mod client;
mod render;

pub use client::Error;

use clap::{Args, Subcommand};
use client::Client;
use reqwest::Url;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// What a command's exit status says, for scripts. The README lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// Anything else: the node answered something unexpected (500), or the output could not be written.
    Failure = 1,
    /// Bad usage or configuration: a bad flag, or a request the node refused as malformed (400, 413).
    Usage = 2,
    /// No such order (404).
    NotFound = 3,
    /// The order's state does not allow it (409): cancelling a finished order, retrying a running one.
    Conflict = 4,
    /// The node cannot be reached or cannot answer now (connection refused, timeout, 503, 429): try
    /// again later.
    Unavailable = 5,
    /// No token, an unknown one (401), or one whose role may not do this (403).
    Unauthorized = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Where the node is, and how to talk to it: shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The node's HTTP API.
    #[arg(long, env = "ORDERLY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: Url,

    /// A bearer token for the API (needed when the node has tokens).
    #[arg(long, env = "ORDERLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the API's JSON as it is (one document per line for `watch`).
    #[arg(long)]
    pub json: bool,
}

/// The client's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit an order; prints its id.
    Submit {
        /// The order's payload, a JSON object; `-` reads it from stdin.
        #[arg(default_value = "{}")]
        payload: String,
        /// Read the payload from this file instead.
        #[arg(long, conflicts_with = "payload")]
        file: Option<PathBuf>,
        /// Your own order id (a lower-case UUID), so that submitting again is the same order.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Show an order.
    Get {
        /// The order's id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// List orders, the one whose state changed last first.
    List {
        /// Only orders in these states (Queued, Running, RollingBack, Cancelling, Completed, Failed,
        /// Cancelled); repeat it or separate names with commas.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Orders per page (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start at this page (the cursor a listing printed).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursors to the last page.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Cancel an order: its done steps are rolled back and it ends Cancelled.
    Cancel {
        /// The order's id.
        id: String,
        /// Why, recorded in the order.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Run a Failed or Cancelled order again from its first step.
    Retry {
        /// The order's id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Follow an order's changes live until it ends.
    Watch {
        /// The order's id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

impl Command {
    /// The names of the client's commands, to tell them from the node's settings.
    pub const NAMES: [&'static str; 6] = ["submit", "get", "list", "cancel", "retry", "watch"];

    fn common(&self) -> &Common {
        match self {
            Command::Submit { common, .. }
            | Command::Get { common, .. }
            | Command::List { common, .. }
            | Command::Cancel { common, .. }
            | Command::Retry { common, .. }
            | Command::Watch { common, .. } => common,
        }
    }
}

/// Runs one client command, prints its result, and says how it went.
pub async fn run(command: Command) -> Exit {
    match execute(command).await {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("{hint}");
            }
            e.exit()
        }
    }
}

async fn execute(command: Command) -> Result<(), Error> {
    let common = command.common().clone();
    let client = Client::new(&common)?;
    let out = render::Output::new(common.json);
    match command {
        Command::Submit {
            payload,
            file,
            idempotency_key,
            ..
        } => {
            let body = read_payload(&payload, file.as_deref())?;
            let accepted = client.submit(body, idempotency_key.as_deref()).await?;
            out.submitted(&accepted)
        }
        Command::Get { id, .. } => out.document(&client.get(&id).await?),
        Command::List {
            state,
            limit,
            cursor,
            all,
            ..
        } => {
            let mut cursor = cursor;
            loop {
                let page = client.list(&state, limit, cursor.as_deref()).await?;
                let next = page.value["next_cursor"].as_str().map(str::to_owned);
                out.page(&page, all)?;
                match next {
                    Some(next) if all => cursor = Some(next),
                    _ => return Ok(()),
                }
            }
        }
        Command::Cancel { id, reason, .. } => {
            out.document(&client.cancel(&id, reason.as_deref()).await?)
        }
        Command::Retry { id, .. } => out.document(&client.retry(&id).await?),
        Command::Watch { id, .. } => client.watch(&id, |event, raw| out.event(event, raw)).await,
    }
}

/// The payload argument, `-` for stdin, or the file: a JSON object.
fn read_payload(arg: &str, file: Option<&std::path::Path>) -> Result<Value, Error> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::Usage(format!("cannot read --file {}: {e}", path.display())))?,
        None if arg == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Error::Usage(format!("cannot read the payload from stdin: {e}")))?;
            text
        }
        None => arg.to_owned(),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(Error::Usage(
            "the payload must be a JSON object, for example '{\"customer\":\"ada\"}'".into(),
        )),
        Err(e) => Err(Error::Usage(format!(
            "the payload is not JSON ({e}); write a JSON object, for example '{{\"customer\":\"ada\"}}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_must_be_a_json_object() {
        assert!(read_payload("{\"a\":1}", None).is_ok());
        assert!(matches!(read_payload("[1]", None), Err(Error::Usage(_))));
        assert!(matches!(read_payload("nope", None), Err(Error::Usage(_))));
    }
}
