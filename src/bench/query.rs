//! Reading orders under load: `GET /orders/{id}` on a node over keep-alive connections, and the same
//! keys read straight from the bucket, each at the same concurrency for the same time.

use anyhow::Context;
use async_nats::jetstream::kv;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use uuid::Uuid;

/// What a load measured: how many reads completed, in how long, and each one's time.
#[derive(Debug, Clone)]
pub struct Latencies {
    elapsed: Duration,
    sorted: Vec<Duration>,
}

impl Latencies {
    fn new(elapsed: Duration, mut all: Vec<Duration>) -> Latencies {
        all.sort_unstable();
        Latencies {
            elapsed,
            sorted: all,
        }
    }

    pub fn per_s(&self) -> f64 {
        self.sorted.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile (0 < p ≤ 1), in milliseconds.
    pub fn quantile_ms(&self, p: f64) -> f64 {
        quantile(&self.sorted, p).as_secs_f64() * 1000.0
    }
}

/// The `p` quantile of `sorted` (nearest rank); zero when it is empty.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One client connection to a node, kept alive between requests.
struct Connection {
    addr: SocketAddr,
    sender: http1::SendRequest<Empty<Bytes>>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Connection { addr, sender })
    }

    /// `GET path`: the status, with the body read to its end.
    async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        self.sender.ready().await?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// The status of one `GET path` on a fresh connection, if the node answers.
pub async fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut connection = Connection::open(addr).await.ok()?;
    connection.get(path).await.ok()
}

/// `GET /orders/{id}` over `ids` in turn, on `concurrency` keep-alive connections, for `duration`.
/// Any answer but 200 stops the load with an error.
pub async fn http_gets(
    addr: SocketAddr,
    ids: &[Uuid],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    let ids: Arc<[Uuid]> = ids.into();
    let mut connections = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        connections.push(Connection::open(addr).await?);
    }
    run(
        connections,
        ids,
        duration,
        |mut connection, id| async move {
            let status = connection.get(&format!("/orders/{id}")).await?;
            anyhow::ensure!(status == 200, "GET /orders/{id} answered {status}");
            Ok(connection)
        },
    )
    .await
}

/// Gets of the same keys from the bucket, `concurrency` at once, for `duration`.
pub async fn kv_gets(
    bucket: &kv::Store,
    ids: &[Uuid],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    let ids: Arc<[Uuid]> = ids.into();
    let clients = vec![bucket.clone(); concurrency];
    run(clients, ids, duration, |bucket, id| async move {
        let entry = bucket.entry(id.to_string()).await?;
        anyhow::ensure!(entry.is_some(), "order {id} is not in the bucket");
        Ok(bucket)
    })
    .await
}

/// Runs one loop per client, each reading the ids from its own offset on, until `duration` passed.
async fn run<C, F, Fut>(
    clients: Vec<C>,
    ids: Arc<[Uuid]>,
    duration: Duration,
    read: F,
) -> anyhow::Result<Latencies>
where
    C: Send + 'static,
    F: Fn(C, Uuid) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<C>> + Send,
{
    anyhow::ensure!(!ids.is_empty(), "no order ids to read");
    let started = Instant::now();
    let until = started + duration;
    let count = clients.len();
    let mut loops = tokio::task::JoinSet::new();
    for (n, client) in clients.into_iter().enumerate() {
        let (ids, read) = (ids.clone(), read.clone());
        loops.spawn(async move {
            let mut client = client;
            let mut times = Vec::new();
            let mut next = n * ids.len() / count;
            while Instant::now() < until {
                let id = ids[next % ids.len()];
                next += 1;
                let sent = Instant::now();
                client = read(client, id).await?;
                times.push(sent.elapsed());
            }
            anyhow::Ok(times)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = loops.join_next().await {
        all.extend(done.context("a reader panicked")??);
    }
    Ok(Latencies::new(started.elapsed(), all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&sorted, 0.5), ms(50));
        assert_eq!(quantile(&sorted, 0.99), ms(99));
        assert_eq!(quantile(&sorted, 1.0), ms(100));
        assert_eq!(quantile(&[ms(7)], 0.99), ms(7));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
