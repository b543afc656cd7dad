//! The HTTP server's limits: how long a client may take to send a request's head, how long a
//! connection may sit idle between requests, how long a request may take (the watch of an order is
//! exempt: it is a stream, and its connection is busy while the stream's body is being sent, an
//! ordinary connection again once it ends), how many watches are open at once (half the connection
//! cap, so that watches alone cannot fill it: beyond, `503` `too_many_watches`), and how many
//! connections are open at once. Each ends with the documented
//! JSON error `{"error", "code"}`, and so do the answers hyper writes itself (400, 414, 431) and every
//! other error response without a JSON body. Connections over the cap do not wait: the connection that
//! has gone longest without a request in progress (idle, or still sending its head) is closed to make
//! room, so idle clients cannot keep a health check out; only when every connection is busy with a
//! request is the newcomer answered `503`. One connection's timers and socket are in `connection.rs`.

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::connection::{code_of, error_body, raw_response, Conn, Watched};

/// File descriptors kept for everything but HTTP connections (NATS, logs, the store).
const RESERVED_FILES: u64 = 128;

/// Connections over the cap being answered `503` at once, at most.
const REFUSING: usize = 64;

/// The route of the watch of an order, exempt from the request timeout.
const WATCH_ROUTE: &str = "/orders/{id}/events";

/// The HTTP server's limits (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub(super) header_timeout: Duration,
    pub(super) idle_timeout: Duration,
    request_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::new(
            Duration::from_secs(10),
            Duration::from_secs(60),
            Duration::from_secs(30),
            1024,
        )
    }
}

impl Limits {
    pub fn new(
        header_timeout: Duration,
        idle_timeout: Duration,
        request_timeout: Duration,
        max_connections: usize,
    ) -> Limits {
        Limits {
            header_timeout,
            idle_timeout,
            request_timeout,
            max_connections: max_connections.max(1),
        }
    }

    /// The limits with the connection cap kept under the process's open-files limit (raised to the
    /// hard limit if the cap needs it), with a warning when the cap had to be lowered.
    pub fn fit_open_files(mut self) -> Limits {
        let Some((soft, hard)) = open_files_limit() else {
            return self;
        };
        let wanted = self.max_connections as u64 + RESERVED_FILES;
        let soft = if soft < wanted && soft < hard {
            raise_open_files(wanted.min(hard), hard).unwrap_or(soft)
        } else {
            soft
        };
        let room = soft.saturating_sub(RESERVED_FILES).max(1) as usize;
        if room < self.max_connections {
            tracing::warn!(
                wanted = self.max_connections,
                used = room,
                open_files_limit = soft,
                "the HTTP connection cap is lowered to fit the open-files limit (ulimit -n)"
            );
            self.max_connections = room;
        }
        self
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
fn open_files_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

fn raise_open_files(soft: u64, hard: u64) -> Option<u64> {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    (rc == 0).then_some(soft)
}

/// Serves `app` on `listener` within `limits` until `stop` fires, then lets the requests in progress
/// finish (idle connections close at once).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> io::Result<()> {
    let guarded = Guard {
        limits,
        watches: Arc::new(Semaphore::new(max_watches(limits.max_connections))),
    };
    let app = app.layer(middleware::from_fn_with_state(guarded, guard));
    let table = Arc::new(Table::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait for a connection to end.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match table.admit() {
            Some(conn) => {
                let served = Served {
                    app: app.clone(),
                    limits,
                    conn,
                    table: table.clone(),
                };
                connections.spawn(served.run(stream, stop.clone()));
            }
            None => refuse(stream, &refusing),
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Answers a connection over the cap with a `503` and closes it. The answer is sent by a short task
/// that reads what the client sent meanwhile: a socket closed with unread input resets the
/// connection, and the client would lose the answer. Past [`REFUSING`] such tasks at once, the
/// connection is closed without an answer.
fn refuse(stream: TcpStream, refusing: &Arc<Semaphore>) {
    metrics::counter!(crate::ops::metrics::HTTP_CONNECTIONS_REFUSED).increment(1);
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let body = error_body(
            "the node has as many HTTP connections as it allows, all busy with requests; try again",
            "too_many_connections",
        );
        let answer = raw_response(StatusCode::SERVICE_UNAVAILABLE, &body);
        let answered = async {
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answered).await;
    });
}

/// The open connections.
struct Table {
    max: usize,
    next_id: Mutex<u64>,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Table {
    fn new(max: usize) -> Table {
        Table {
            max,
            next_id: Mutex::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a new connection: a free one, or the one of the connection that has gone longest
    /// without a request in progress, which is closed. None when every connection is busy.
    fn admit(&self) -> Option<Arc<Conn>> {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let victim = open
                .iter()
                .filter_map(|(id, conn)| conn.waiting_since().map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(conn) = open.remove(&victim) {
                metrics::counter!(crate::ops::metrics::HTTP_CONNECTIONS_EVICTED).increment(1);
                conn.evict.cancel();
            }
        }
        let conn = Arc::new(Conn::new(id));
        open.insert(id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// One admitted connection.
struct Served {
    app: Router,
    limits: Limits,
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl Served {
    async fn run(self, stream: TcpStream, stop: CancellationToken) {
        let Served {
            app,
            limits,
            conn,
            table,
        } = self;
        let io = hyper_util::rt::TokioIo::new(Watched::new(stream, conn.clone(), limits));
        let service_conn = conn.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let app = app.clone();
            let conn = service_conn.clone();
            async move {
                conn.begin();
                let response = app.oneshot(request.map(Body::new)).await;
                let response = response.map(|response| streamed(response, &conn));
                conn.end();
                response
            }
        });
        let served = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
        tokio::pin!(served);
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = &mut served => break,
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    served.as_mut().graceful_shutdown();
                }
                _ = conn.evict.cancelled() => break,
            }
        }
        table.remove(conn.id);
    }
}

/// An event stream keeps its connection busy while its body is being sent, and no longer: once the
/// body ends (or is dropped with the connection), the connection is idle again, and the idle timeout,
/// the header timeout and eviction apply to it as to any other.
fn streamed(response: Response, conn: &Arc<Conn>) -> Response {
    let event_stream = response.headers().get(header::CONTENT_TYPE)
        == Some(&HeaderValue::from_static("text/event-stream"));
    if !event_stream {
        return response;
    }
    let streaming = conn.stream();
    response.map(|body| holding(body, streaming))
}

/// `body`, keeping `held` alive until the body ends or is dropped.
fn holding<T: Send + 'static>(body: Body, held: T) -> Body {
    Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &held;
        chunk
    }))
}

/// What the middleware of every request needs: the limits, and the watches the node may carry at once.
#[derive(Clone)]
struct Guard {
    limits: Limits,
    watches: Arc<Semaphore>,
}

/// The most watches of an order in progress at once: half the connection cap, so that watches alone
/// cannot fill it (at least one).
fn max_watches(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}

/// The request timeout (but for the watch of an order), and a JSON body on every error response that
/// has none (such as axum's rejection of a path that is not UTF-8).
async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let limits = guard.limits;
    let watch = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|path| path.as_str() == WATCH_ROUTE);
    let response = if watch {
        let Ok(permit) = guard.watches.clone().try_acquire_owned() else {
            metrics::counter!(crate::ops::metrics::HTTP_WATCHES_REFUSED).increment(1);
            let message = format!(
                "the node carries as many watches as it allows ({}); try again later or on another node",
                guard.watches_allowed()
            );
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &message,
                "too_many_watches",
            );
        };
        // The watch keeps its place until its stream ends.
        next.run(request).await.map(|body| holding(body, permit))
    } else {
        match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => {
                metrics::counter!(crate::ops::metrics::HTTP_REQUEST_TIMEOUTS).increment(1);
                let message = format!(
                    "the request was not done within {}; a submission may or may not have been accepted: query it before submitting again",
                    humantime::format_duration(limits.request_timeout)
                );
                return json_error(StatusCode::SERVICE_UNAVAILABLE, &message, "timeout");
            }
        }
    };
    with_json_body(response).await
}

impl Guard {
    fn watches_allowed(&self) -> usize {
        max_watches(self.limits.max_connections)
    }
}

fn json_error(status: StatusCode, message: &str, code: &str) -> Response {
    let body = serde_json::json!({ "error": message, "code": code });
    (status, axum::Json(body)).into_response()
}

/// An error response whose body is not JSON, with its text moved into the documented JSON body.
async fn with_json_body(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut fixed = json_error(status, &text, code_of(status));
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name, value.clone());
        }
    }
    fixed
}
