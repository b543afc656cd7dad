//! One HTTP connection as the limits see it: whether a request is in progress on it, when it last
//! read or wrote, and when a request head began to arrive. Its socket ends a connection that waits too
//! long for a request head (with a `408`) or sits idle too long, and replaces the error answers hyper
//! writes itself (400, 414, 431: no body) with the same status and the documented JSON body.

use super::limits::Limits;
use axum::http::StatusCode;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// `{"error": ..., "code": ...}`.
pub(super) fn error_body(message: &str, code: &str) -> Vec<u8> {
    serde_json::json!({ "error": message, "code": code })
        .to_string()
        .into_bytes()
}

/// A whole HTTP/1.1 response that closes the connection, for answers written around hyper.
pub(super) fn raw_response(status: StatusCode, body: &[u8]) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

/// What one connection is doing.
pub(super) struct Conn {
    pub(super) id: u64,
    state: Mutex<ConnState>,
    /// Cancelled when the connection is closed to make room for another.
    pub(super) evict: CancellationToken,
}

struct ConnState {
    /// The last byte read or written, or the last response made.
    last_io: Instant,
    /// When the first byte of a request head not yet complete arrived.
    head_since: Option<Instant>,
    /// Requests handed to the application and not yet answered.
    in_flight: usize,
    /// Event streams whose body is being sent: the connection is busy while one is.
    streams: usize,
    /// The task that last waited for the socket to be readable: woken when a stream ends, so that
    /// the idle timeout starts to run at once.
    reader: Option<Waker>,
}

/// What a connection waits for while no request is in progress.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Waiting {
    Head(Instant),
    Idle(Instant),
}

impl Conn {
    pub(super) fn new(id: u64) -> Conn {
        Conn {
            id,
            state: Mutex::new(ConnState {
                last_io: Instant::now(),
                head_since: None,
                in_flight: 0,
                streams: 0,
                reader: None,
            }),
            evict: CancellationToken::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ConnState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn read(&self, bytes: usize) {
        self.with(|s| {
            s.last_io = Instant::now();
            if bytes > 0 && s.in_flight == 0 && s.head_since.is_none() && s.streams == 0 {
                s.head_since = Some(s.last_io);
            }
        });
    }

    fn waits_to_read(&self, waker: &Waker) {
        self.with(|s| match &mut s.reader {
            Some(reader) => reader.clone_from(waker),
            None => s.reader = Some(waker.clone()),
        });
    }

    fn wrote(&self) {
        self.with(|s| s.last_io = Instant::now());
    }

    pub(super) fn begin(&self) {
        self.with(|s| {
            s.in_flight += 1;
            s.head_since = None;
        });
    }

    pub(super) fn end(&self) {
        self.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_io = Instant::now();
        });
    }

    /// An event stream's body starts to be sent; the connection is busy until the returned guard is
    /// dropped (the body ended, or was dropped with the connection), and then an ordinary connection
    /// again, idle from that moment.
    pub(super) fn stream(self: &Arc<Self>) -> Streaming {
        self.with(|s| s.streams += 1);
        Streaming { conn: self.clone() }
    }

    /// What the connection waits for, if no request is in progress on it.
    fn waiting(&self) -> Option<Waiting> {
        self.with(|s| match (s.in_flight, s.streams, s.head_since) {
            (0, 0, Some(since)) => Some(Waiting::Head(since)),
            (0, 0, None) => Some(Waiting::Idle(s.last_io)),
            _ => None,
        })
    }

    pub(super) fn waiting_since(&self) -> Option<Instant> {
        self.waiting().map(|w| match w {
            Waiting::Head(since) | Waiting::Idle(since) => since,
        })
    }
}

/// An event stream in progress on a connection, for as long as its body lives.
pub(super) struct Streaming {
    conn: Arc<Conn>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let reader = self.conn.with(|s| {
            s.streams = s.streams.saturating_sub(1);
            s.last_io = Instant::now();
            s.reader.take()
        });
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// A connection's socket that keeps its `Conn` up to date, ends a connection that waits too long for
/// a request head (with a `408`) or sits idle too long, and gives hyper's own error answers a JSON
/// body.
pub(super) struct Watched {
    /// Taken out only when the connection is dropped.
    stream: Option<TcpStream>,
    conn: Arc<Conn>,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
    /// An error answer of hyper's own went out: hyper closes the connection now, perhaps before the
    /// client has sent all of its request.
    linger: bool,
}

/// Sockets that read what their client still sends after an error answer, at most: beyond that a
/// connection closes at once.
const LINGERING: usize = 64;
/// How long, and how much, a lingering socket reads before it closes.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;

static LINGERING_NOW: Semaphore = Semaphore::const_new(LINGERING);

/// Sends what is left to send, then reads and discards what the client still sends until it stops,
/// [`LINGER_FOR`] passes or [`LINGER_BYTES`] arrived. A client that sent a whole request before
/// reading (one hyper refused part way: headers too large) would otherwise have its answer destroyed
/// by the reset that closing a socket with unread data sends, and see a broken pipe instead.
async fn linger(mut stream: TcpStream, _permit: tokio::sync::SemaphorePermit<'static>) {
    let drain = async {
        stream.shutdown().await.ok()?;
        let mut scratch = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
        Some(())
    };
    let _ = tokio::time::timeout(LINGER_FOR, drain).await;
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take().filter(|_| self.linger) else {
            return;
        };
        let (Ok(runtime), Ok(permit)) = (
            tokio::runtime::Handle::try_current(),
            LINGERING_NOW.try_acquire(),
        ) else {
            return;
        };
        runtime.spawn(linger(stream, permit));
    }
}

impl Watched {
    pub(super) fn new(stream: TcpStream, conn: Arc<Conn>, limits: Limits) -> Watched {
        Watched {
            stream: Some(stream),
            conn,
            limits,
            timer: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            linger: false,
        }
    }

    fn io(&mut self) -> &mut TcpStream {
        self.stream
            .as_mut()
            .expect("the socket is taken out only when the connection is dropped")
    }

    /// Whether the wait for a request has run out; on a head that took too long, a `408` is sent.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (deadline, head) = match self.conn.waiting() {
            None => return false,
            Some(Waiting::Head(since)) => (since + self.limits.header_timeout, true),
            Some(Waiting::Idle(since)) => (since + self.limits.idle_timeout, false),
        };
        self.timer.as_mut().reset(deadline);
        if std::future::Future::poll(self.timer.as_mut(), cx).is_pending() {
            return false;
        }
        if head {
            metrics::counter!(crate::ops::metrics::HTTP_HEADER_TIMEOUTS).increment(1);
            let message = format!(
                "the request head was not complete within {}",
                humantime::format_duration(self.limits.header_timeout)
            );
            let body = error_body(&message, "request_timeout");
            let _ = self
                .io()
                .try_write(&raw_response(StatusCode::REQUEST_TIMEOUT, &body));
        }
        true
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(self.io()).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.conn.read(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The end of the stream, as hyper sees it: the connection closes.
            Poll::Pending if self.expired(cx) => Poll::Ready(Ok(())),
            Poll::Pending => {
                self.conn.waits_to_read(cx.waker());
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(replacement) = own_error_with_json(buf) {
            self.linger = true;
            if self.io().try_write(&replacement).ok() == Some(replacement.len()) {
                self.conn.wrote();
                return Poll::Ready(Ok(buf.len()));
            }
        }
        let written = Pin::new(self.io()).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(_))) {
            self.conn.wrote();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()).poll_shutdown(cx)
    }
}

/// An error answer hyper writes itself (a request it cannot parse: 400, 414, 431, ...) has no body
/// and no content type, while every answer of the application has one: the same answer, with the
/// documented JSON body.
fn own_error_with_json(written: &[u8]) -> Option<Vec<u8>> {
    let head_end = written.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&written[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let code: u16 = status_line
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    let typed = head
        .lines()
        .any(|line| line.to_ascii_lowercase().starts_with("content-type:"));
    if typed || !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let body = error_body(
        &format!(
            "the request could not be read: {}",
            status.canonical_reason().unwrap_or("malformed")
        ),
        code_of(status),
    );
    Some(raw_response(status, &body))
}

/// The error code of a status no handler chose.
pub(super) fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_own_errors_get_a_json_body() {
        let written =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let fixed = String::from_utf8(own_error_with_json(written).unwrap()).unwrap();
        assert!(fixed.starts_with("HTTP/1.1 431 "), "{fixed}");
        assert!(fixed.contains("content-type: application/json"), "{fixed}");
        let body = fixed.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "headers_too_large");
    }

    #[test]
    fn application_answers_are_left_alone() {
        let typed = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(own_error_with_json(typed).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(own_error_with_json(ok).is_none());
        assert!(own_error_with_json(b"{\"partial\": \"body\"}").is_none());
    }
}
