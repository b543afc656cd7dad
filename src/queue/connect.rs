//! The node's connections to NATS: one per [`Role`], each reporting its state to the metrics and, for
//! the connections leases depend on, to a [`Connection`] that ends every lease taken on it when it is lost.

use crate::engine::connection::Connection;
use crate::ops::metrics as m;
use std::time::Duration;

/// The servers named in a `NATS_URL`: one URL, or several separated by commas (the servers of a
/// cluster; the client moves to another one when its server goes away).
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("invalid NATS URL {url:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|servers| {
            if servers.is_empty() {
                Err("no NATS URL given".to_owned())
            } else {
                Ok(servers)
            }
        })
}

/// What a node's connection to NATS is for. The NATS client drops a whole connection when it receives
/// a message whose header block it cannot read, and any client can send one: to the node's service
/// subjects, or into the work stream, from where it is delivered to a node. So what a node receives
/// from others comes in on connections of its own, and the connection its leases live on receives
/// nothing but replies to its own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Holds leases: in-progress acks, acks, naks, terms, and every write to the orders bucket.
    Work,
    /// Fetches work messages (a message stored with a bad header block drops this one).
    Fetch,
    /// Serves the `orders` NATS service (`orders.create`, `orders.get`, `$SRV.*`) and intake.
    Public,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Work => "work",
            Role::Fetch => "fetch",
            Role::Public => "public",
        }
    }
}

/// Connects to NATS, logging and counting connection changes. Retries until it succeeds or
/// `cancel` fires. Each loss of the connection is recorded in `connection` (leases taken on it end).
pub async fn connect(
    servers: &[async_nats::ServerAddr],
    node_id: &str,
    role: Role,
    connection: &Connection,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<async_nats::Client> {
    let label = role.as_str();
    // At zero from the first scrape on (the HTTP server starts after every connection is made).
    metrics::counter!(m::NATS_RECONNECTS, "connection" => label).absolute(0);
    let connected_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let connected_once = connected_once.clone();
        let lost = connection.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("orderly {node_id} {label}"))
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(3))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Disconnected) {
                    // At once, not in the spawned handler: leases on this connection end now.
                    lost.lost();
                }
                let connected_once = connected_once.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(1.0);
                            if connected_once.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::info!(connection = label, "reconnected to NATS");
                                metrics::counter!(m::NATS_RECONNECTS, "connection" => label).increment(1);
                            } else {
                                tracing::info!(connection = label, "connected to NATS");
                            }
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(connection = label, "disconnected from NATS; reconnecting");
                            metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(0.0);
                        }
                        async_nats::Event::Closed => tracing::info!(connection = label, "NATS connection closed"),
                        other => tracing::warn!(connection = label, event = %other, "NATS connection event"),
                    }
                }
            });
        match options.connect(servers).await {
            Ok(client) => {
                metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(1.0);
                return Some(client);
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to NATS; retrying in 1s"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_takes_every_server_of_a_cluster() {
        let servers = server_addrs("nats://a:4222, nats://b:4222,nats://c:4222").expect("valid");
        let hosts: Vec<&str> = servers.iter().map(|s| s.host()).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert!(server_addrs("nats://a:4222,http://[::1").is_err());
        assert!(server_addrs(" , ").is_err());
    }
}
