//! A hostile NATS client on a raw TCP socket. async-nats only sends well-formed header blocks; this one
//! sends whatever bytes it is given (`HPUB <subject> [reply] <hdr_len> <total_len>`), then a `PING`, and
//! returns once the server's `PONG` says it processed the publish.

use std::io;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A header line without a colon.
pub const NO_COLON: &[u8] = b"NATS/1.0\r\nGarbage\r\n\r\n";
/// A header value that is not UTF-8.
pub const NOT_UTF8: &[u8] = b"NATS/1.0\r\nX-Bytes: \xff\xfe\xc0\r\n\r\n";
/// A block that does not start with the `NATS/1.0` version line.
pub const NOT_NATS: &[u8] = b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n";
/// Every malformed block above.
pub const MALFORMED: [&[u8]; 3] = [NO_COLON, NOT_UTF8, NOT_NATS];

/// A block whose version line carries a status code, as the server's own status messages do
/// (`408` request timeout, `100` idle heartbeat, `409` conflict, `503` no responders).
pub fn status_block(code: u16) -> Vec<u8> {
    format!("NATS/1.0 {code}\r\n\r\n").into_bytes()
}

/// How long the client waits for any answer from the server.
const PATIENCE: Duration = Duration::from_secs(10);

pub struct RawClient {
    stream: BufReader<TcpStream>,
    next_sid: u64,
}

impl RawClient {
    /// Connects to the first server of `url` (`nats://host:port`, or several comma-separated) that
    /// accepts the connection.
    pub async fn connect(url: &str) -> io::Result<RawClient> {
        let mut refused = io::Error::other(format!("no server in {url:?}"));
        for server in url.split(',').map(str::trim) {
            let addr = server.strip_prefix("nats://").unwrap_or(server);
            match RawClient::connect_to(addr).await {
                Ok(client) => return Ok(client),
                Err(e) => refused = e,
            }
        }
        Err(refused)
    }

    async fn connect_to(addr: &str) -> io::Result<RawClient> {
        let stream = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await??;
        let mut client = RawClient {
            stream: BufReader::new(stream),
            next_sid: 1,
        };
        let info = client.line().await?;
        if !info.starts_with("INFO ") {
            return Err(io::Error::other(format!("expected INFO, got {info:?}")));
        }
        client
            .send(b"CONNECT {\"headers\":true,\"verbose\":false,\"pedantic\":false}\r\n")
            .await?;
        client.ping().await?;
        Ok(client)
    }

    /// Publishes `header` and `payload` on `subject` as they are, and waits until the server has
    /// processed them.
    pub async fn hpub(&mut self, subject: &str, header: &[u8], payload: &[u8]) -> io::Result<()> {
        self.send(&frame(subject, None, header, payload)).await?;
        self.ping().await
    }

    /// Publishes like [`RawClient::hpub`] with a reply subject, and returns the first reply's payload
    /// (a JetStream publish acknowledgement, for a subject of a stream).
    pub async fn request(
        &mut self,
        subject: &str,
        header: &[u8],
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.hostile.{}", uuid::Uuid::new_v4().simple());
        self.send(format!("SUB {inbox} {sid}\r\n").as_bytes())
            .await?;
        self.send(&frame(subject, Some(&inbox), header, payload))
            .await?;
        loop {
            let line = self.line().await?;
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("MSG") => {
                    let len = parse_len(words.last())?;
                    return self.body(len).await;
                }
                Some("HMSG") => {
                    let header_len = parse_len(words.get(words.len() - 2))?;
                    let total = parse_len(words.last())?;
                    let body = self.body(total).await?;
                    return Ok(body[header_len..].to_vec());
                }
                Some("PING") => self.send(b"PONG\r\n").await?,
                Some("-ERR") => return Err(io::Error::other(line)),
                _ => {}
            }
        }
    }

    async fn ping(&mut self) -> io::Result<()> {
        self.send(b"PING\r\n").await?;
        loop {
            let line = self.line().await?;
            match line.split_whitespace().next() {
                Some("PONG") => return Ok(()),
                Some("PING") => self.send(b"PONG\r\n").await?,
                Some("-ERR") => return Err(io::Error::other(line)),
                _ => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }

    async fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let read = tokio::time::timeout(PATIENCE, self.stream.read_until(b'\n', &mut line)).await?;
        if read? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
    }

    /// Reads a message body of `len` bytes and its closing CRLF.
    async fn body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut body = vec![0; len + 2];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut body)).await??;
        body.truncate(len);
        Ok(body)
    }
}

fn frame(subject: &str, reply: Option<&str>, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
    let total = header.len() + payload.len();
    let mut bytes = format!("HPUB {subject}{reply} {} {total}\r\n", header.len()).into_bytes();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(b"\r\n");
    bytes
}

fn parse_len(word: Option<&&str>) -> io::Result<usize> {
    word.and_then(|w| w.parse().ok())
        .ok_or_else(|| io::Error::other("a message line without a length"))
}

/// One hostile publish on a connection of its own.
pub async fn hpub(url: &str, subject: &str, header: &[u8], payload: &[u8]) -> io::Result<()> {
    RawClient::connect(url)
        .await?
        .hpub(subject, header, payload)
        .await
}

/// Publishes a work message with a hostile `header` straight into the `ORDERS` stream as
/// `orders.submit.<id>`, and panics unless the stream stored it.
pub async fn hpub_order(url: &str, id: uuid::Uuid, header: &[u8], payload: &[u8]) {
    let mut client = RawClient::connect(url)
        .await
        .expect("hostile client connects");
    let ack = client
        .request(&format!("orders.submit.{id}"), header, payload)
        .await
        .expect("the stream answers the hostile publish");
    assert!(
        stored_in(&ack, "ORDERS").is_some(),
        "the stream stored the hostile message: {}",
        String::from_utf8_lossy(&ack)
    );
}

/// The sequence `stream` stored a publish at, from JetStream's answer to it. An error answer names
/// the stream too (`{"error":{…},"stream":"ORDERS","seq":0}`, e.g. while the store is full): only an
/// answer without an error and with a sequence is a stored message.
pub fn stored_in(ack: &[u8], stream: &str) -> Option<u64> {
    let ack: serde_json::Value = serde_json::from_slice(ack).ok()?;
    if ack["stream"] != stream || !ack["error"].is_null() {
        return None;
    }
    ack["seq"].as_u64().filter(|seq| *seq > 0)
}

/// Hostile publishes sent in the background at a steady pace until [`Barrage::stop`].
pub struct Barrage {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Shots>,
}

/// What a [`Barrage`] sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shots {
    /// Publishes the server processed.
    pub taken: usize,
    /// Publishes that found no server to take them.
    pub missed: usize,
}

impl Barrage {
    /// Every `every`, publishes `payload` once on each subject of `subjects`, with the header blocks of
    /// `headers` in turn.
    pub fn start(
        url: &str,
        every: Duration,
        subjects: &[&str],
        headers: &[&[u8]],
        payload: &[u8],
    ) -> Barrage {
        let stop = tokio_util::sync::CancellationToken::new();
        let (url, payload) = (url.to_owned(), payload.to_vec());
        let subjects: Vec<String> = subjects.iter().map(|s| s.to_string()).collect();
        let headers: Vec<Vec<u8>> = headers.iter().map(|h| h.to_vec()).collect();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut shots = Shots::default();
            let mut turn = 0;
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return shots,
                    _ = tick.tick() => {}
                }
                for subject in &subjects {
                    let header = &headers[turn % headers.len()];
                    turn += 1;
                    match hpub(&url, subject, header, &payload).await {
                        Ok(()) => shots.taken += 1,
                        Err(_) => shots.missed += 1,
                    }
                }
            }
        });
        Barrage { stop, task }
    }

    /// Stops and says what was sent.
    pub async fn stop(self) -> Shots {
        self.stop.cancel();
        self.task.await.expect("the hostile client does not panic")
    }
}
