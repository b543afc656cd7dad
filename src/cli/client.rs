//! The HTTP side of the terminal client: one request per command, the API's error body turned into an
//! [`Error`] that knows its exit code, and the order's watch (Server-Sent Events) followed to its end,
//! reconnecting with `Last-Event-ID` when a node drains.

use super::{Common, Exit};
use reqwest::{header, Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::{json, Value};
use std::time::Duration;

/// How long the client waits for a connection to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take (the node gives up on its own after 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
/// How long a watch may go without a byte (the node sends a comment every 15 s).
const WATCH_SILENCE: Duration = Duration::from_secs(45);
/// How many times in a row a watch reconnects to a stream that ended before the order did.
const WATCH_RECONNECTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument, found before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The node could not be reached, or did not answer in time.
    #[error("cannot reach the node at {url}: {}", cause(source))]
    Unreachable {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    /// The node answered with an error.
    #[error("{status}: {message} ({code})")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The node answered something that is not the API's.
    #[error("unexpected answer from {url}: {what}")]
    Protocol { url: Url, what: String },
    /// The watch ended before the order did, and reconnecting did not help.
    #[error("the watch of order {id} ended before the order did (last event {last_id:?})")]
    WatchCut { id: String, last_id: Option<String> },
    /// The output could not be written (a closed pipe, say).
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Usage(_) => Exit::Usage,
            Error::Unreachable { .. } | Error::WatchCut { .. } => Exit::Unavailable,
            Error::Api { status, .. } => match *status {
                StatusCode::NOT_FOUND => Exit::NotFound,
                StatusCode::CONFLICT => Exit::Conflict,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Exit::Unauthorized,
                StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::GATEWAY_TIMEOUT
                | StatusCode::REQUEST_TIMEOUT => Exit::Unavailable,
                s if s.is_client_error() => Exit::Usage,
                _ => Exit::Failure,
            },
            Error::Protocol { .. } | Error::Output(_) => Exit::Failure,
        }
    }

    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Unreachable { .. } => Some(
                "hint: is a node running there? Set the node's address with --url or ORDERLY_URL",
            ),
            Error::Api { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                Some("hint: the node wants a bearer token: --token or ORDERLY_TOKEN")
            }
            _ => None,
        }
    }
}

/// Why a request failed, without reqwest's own line (which repeats the URL).
fn cause(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer in time".into();
    }
    match std::error::Error::source(error) {
        Some(source) => chain(source),
        None => error.to_string(),
    }
}

/// An error and its causes, `a: b: c`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A JSON answer of the API, parsed, and as it came (what `--json` prints).
pub struct Answer {
    pub value: Value,
    pub raw: String,
}

pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    pub fn new(common: &Common) -> Result<Client, Error> {
        if !matches!(common.url.scheme(), "http" | "https") || !common.url.has_host() {
            return Err(Error::Usage(format!(
                "--url (ORDERLY_URL) {} is not an http:// address; use one like http://127.0.0.1:8080",
                common.url
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(WATCH_SILENCE)
            .user_agent(concat!("orderly/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: common.url.clone(),
            token: common.token.clone(),
        })
    }

    /// `base` + path segments, each escaped.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request and reads its JSON answer, or the API's error.
    async fn call(&self, request: RequestBuilder, url: &Url) -> Result<Answer, Error> {
        let response = send(request.timeout(REQUEST_TIMEOUT), url).await?;
        let response = check(response, url).await?;
        let raw = response.text().await.map_err(|source| Error::Unreachable {
            url: url.clone(),
            source,
        })?;
        match serde_json::from_str(&raw) {
            Ok(value) => Ok(Answer { value, raw }),
            Err(e) => Err(Error::Protocol {
                url: url.clone(),
                what: format!("the body is not JSON: {e}"),
            }),
        }
    }

    pub async fn submit(&self, payload: Value, key: Option<&str>) -> Result<Answer, Error> {
        let url = self.url(&["orders"]);
        let mut request = self.request(Method::POST, url.clone()).json(&payload);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.call(request, &url).await
    }

    pub async fn get(&self, id: &str) -> Result<Answer, Error> {
        let url = self.url(&["orders", id]);
        self.call(self.request(Method::GET, url.clone()), &url)
            .await
    }

    pub async fn list(
        &self,
        states: &[String],
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Answer, Error> {
        let mut url = self.url(&["orders"]);
        {
            let mut query = url.query_pairs_mut();
            for state in states {
                query.append_pair("state", state);
            }
            query.append_pair("limit", &limit.to_string());
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
        }
        self.call(self.request(Method::GET, url.clone()), &url)
            .await
    }

    pub async fn cancel(&self, id: &str, reason: Option<&str>) -> Result<Answer, Error> {
        let url = self.url(&["orders", id, "cancel"]);
        let mut request = self.request(Method::POST, url.clone());
        if let Some(reason) = reason {
            request = request.json(&json!({ "reason": reason }));
        }
        self.call(request, &url).await
    }

    pub async fn retry(&self, id: &str) -> Result<Answer, Error> {
        let url = self.url(&["orders", id, "retry"]);
        self.call(self.request(Method::POST, url.clone()), &url)
            .await
    }

    /// Follows the order's events, calling `each` with every event's data (parsed, and as it came), until the order ends. A
    /// stream cut before that (the node drained or lost NATS) is resumed with `Last-Event-ID`.
    pub async fn watch(
        &self,
        id: &str,
        mut each: impl FnMut(&Value, &str) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let url = self.url(&["orders", id, "events"]);
        let mut last_id: Option<String> = None;
        let mut failures = 0;
        loop {
            let mut request = self
                .request(Method::GET, url.clone())
                .header(header::ACCEPT, "text/event-stream");
            if let Some(last) = &last_id {
                request = request.header("Last-Event-ID", last);
            }
            let ended = match send(request, &url).await {
                Ok(response) => {
                    let mut response = check(response, &url).await?;
                    let mut events = EventParser::default();
                    let mut ended = false;
                    loop {
                        let chunk = match response.chunk().await {
                            Ok(Some(chunk)) => chunk,
                            Ok(None) | Err(_) => break,
                        };
                        for event in events.push(&chunk) {
                            failures = 0;
                            if event.id.is_some() {
                                last_id = event.id;
                            }
                            let data: Value =
                                serde_json::from_str(&event.data).map_err(|e| Error::Protocol {
                                    url: url.clone(),
                                    what: format!("an event's data is not JSON: {e}"),
                                })?;
                            each(&data, &event.data)?;
                            ended |= is_terminal(&data);
                        }
                        if ended {
                            break;
                        }
                    }
                    ended
                }
                Err(e) if last_id.is_none() => return Err(e),
                Err(_) => false,
            };
            if ended {
                return Ok(());
            }
            failures += 1;
            if failures > WATCH_RECONNECTS {
                return Err(Error::WatchCut {
                    id: id.to_owned(),
                    last_id,
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn send(request: RequestBuilder, url: &Url) -> Result<Response, Error> {
    request.send().await.map_err(|source| Error::Unreachable {
        url: url.clone(),
        source,
    })
}

/// The response if it is a success, else the API's error from its JSON body.
async fn check(response: Response, url: &Url) -> Result<Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&body) {
        Ok(error) if error["error"].is_string() => Err(Error::Api {
            status,
            code: error["code"].as_str().unwrap_or("error").to_owned(),
            message: error["error"].as_str().unwrap_or_default().to_owned(),
        }),
        _ if status.is_server_error() || status == StatusCode::NOT_FOUND => Err(Error::Api {
            status,
            code: "http".into(),
            message: format!("{} answered {status}", url.as_str()),
        }),
        _ => Err(Error::Protocol {
            url: url.clone(),
            what: format!("{status} without the API's error body"),
        }),
    }
}

/// Whether a watch event moved the order to a terminal state.
fn is_terminal(event: &Value) -> bool {
    matches!(
        event["to"].as_str(),
        Some("Completed" | "Failed" | "Cancelled")
    )
}

/// One Server-Sent Event.
#[derive(Debug, Default, PartialEq, Eq)]
struct Event {
    id: Option<String>,
    data: String,
}

/// Splits a stream of bytes into Server-Sent Events: `id:` and `data:` lines, ended by a blank line;
/// comments (`:`) and other fields are skipped.
#[derive(Default)]
struct EventParser {
    buffer: Vec<u8>,
    current: Event,
}

impl EventParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.current.data.is_empty() {
                    events.push(std::mem::take(&mut self.current));
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.current.id = Some(value.to_owned()),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_whatever_the_chunks() {
        let stream = b": keep-alive\n\nid: 2\nevent: snapshot\ndata: {\"to\":\"Running\"}\n\nid: 3\r\nevent: completed\r\ndata: {\"to\":\"Completed\"}\r\n\r\n";
        for size in [1, 7, stream.len()] {
            let mut parser = EventParser::default();
            let events: Vec<Event> = stream.chunks(size).flat_map(|c| parser.push(c)).collect();
            assert_eq!(
                events,
                vec![
                    Event {
                        id: Some("2".into()),
                        data: "{\"to\":\"Running\"}".into()
                    },
                    Event {
                        id: Some("3".into()),
                        data: "{\"to\":\"Completed\"}".into()
                    }
                ],
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let api = |status: u16| Error::Api {
            status: StatusCode::from_u16(status).unwrap(),
            code: String::new(),
            message: String::new(),
        };
        assert_eq!(api(404).exit(), Exit::NotFound);
        assert_eq!(api(409).exit(), Exit::Conflict);
        assert_eq!(api(401).exit(), Exit::Unauthorized);
        assert_eq!(api(403).exit(), Exit::Unauthorized);
        assert_eq!(api(400).exit(), Exit::Usage);
        assert_eq!(api(413).exit(), Exit::Usage);
        assert_eq!(api(503).exit(), Exit::Unavailable);
        assert_eq!(api(500).exit(), Exit::Failure);
    }
}
