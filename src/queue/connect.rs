//! The node's connections to NATS: one per [`Role`], each reporting its state to the metrics and, for
//! the connections leases depend on, to a [`Connection`] that ends every lease taken on it when it is lost.

use crate::engine::connection::Connection;
use crate::ops::metrics as m;
use crate::queue::credentials::Access;
use std::time::Duration;

/// The server refused a connection: its credentials or its TLS. Trying again would not help, so the
/// node stops with this instead of retrying.
#[derive(Debug, thiserror::Error)]
#[error("NATS refused the {connection} connection: {advice} ({error})")]
pub struct Refused {
    connection: &'static str,
    advice: &'static str,
    error: async_nats::ConnectError,
}

impl Refused {
    /// `error` as a refusal, if it is one (anything else, such as a server not up yet, is worth retrying).
    fn of(
        role: Role,
        error: async_nats::ConnectError,
    ) -> Result<Refused, async_nats::ConnectError> {
        use async_nats::ConnectErrorKind as Kind;
        let advice = match error.kind() {
            Kind::AuthorizationViolation => "authorization failed; check the user and password or token in NATS_URL, or ORDERLY_NATS_CREDS or ORDERLY_NATS_NKEY",
            Kind::Authentication => "the node cannot sign in with its nkey; check the seed in ORDERLY_NATS_NKEY or ORDERLY_NATS_CREDS",
            Kind::Tls => TLS_ADVICE,
            Kind::Io if is_tls_handshake(&error) => TLS_ADVICE,
            _ => return Err(error),
        };
        Ok(Refused {
            connection: role.as_str(),
            advice,
            error,
        })
    }
}

const TLS_ADVICE: &str = "TLS failed; check ORDERLY_NATS_TLS_CA (the CA of the server's certificate), and ORDERLY_NATS_TLS_CERT and ORDERLY_NATS_TLS_KEY if the server verifies clients";

/// The client reports a certificate the node does not trust, or a handshake the server refused, as
/// an I/O error of kind `InvalidData` (how the TLS library's errors reach the socket); a server that is
/// down or unreachable gives other kinds.
fn is_tls_handshake(error: &async_nats::ConnectError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

/// Whether a failed reconnection was a refusal of the node's credentials. The client reports each failed
/// reconnection as an event carrying only the error kind's text, and goes on trying (it never gives
/// up: `max_reconnects(None)`); so does the node, which is not ready meanwhile, and is let back in
/// once the server accepts its credentials again (the server's configuration is put back, or the node
/// is restarted with the new ones).
fn is_refusal(error: &str) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    [Kind::AuthorizationViolation, Kind::Authentication]
        .iter()
        .any(|kind| kind.to_string() == error)
}

/// What a node's connection to NATS is for. The NATS client drops a whole connection when it receives
/// a message whose header block it cannot read, and any client can send one: to the node's service
/// subjects, or into the work stream, from where it is delivered to a node. So what a node receives
/// from others comes in on connections of its own, and the connection its leases live on receives
/// nothing but replies to its own requests. So do the calls of step handlers (`ORDERLY_STEPS=nats`): a
/// reply lost with a dropped connection would leave its step waiting until the step timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Holds leases: in-progress acks, acks, naks, terms, and every write to the orders bucket.
    Work,
    /// Fetches work messages (a message stored with a bad header block drops this one).
    Fetch,
    /// Serves the `orders` NATS service (`orders.create`, `orders.get`, `$SRV.*`) and intake.
    Public,
    /// Calls step handlers and receives their replies, and nothing else; opened only when the steps
    /// run over NATS.
    Steps,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Work => "work",
            Role::Fetch => "fetch",
            Role::Public => "public",
            Role::Steps => "steps",
        }
    }
}

/// Connects to NATS, logging and counting connection changes. Retries until it succeeds, the server
/// refuses the node ([`Refused`]), or `cancel` fires (`None`). Each loss of the connection is recorded
/// in `connection` (leases taken on it end).
pub async fn connect(
    access: &Access,
    node_id: &str,
    role: Role,
    connection: &Connection,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Option<async_nats::Client>, Refused> {
    let label = role.as_str();
    // At zero from the first scrape on (the HTTP server starts after every connection is made).
    metrics::counter!(m::NATS_RECONNECTS, "connection" => label).absolute(0);
    metrics::counter!(m::NATS_AUTH_REFUSED, "connection" => label).absolute(0);
    let connected_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let connected_once = connected_once.clone();
        let lost = connection.clone();
        let options = access
            .options()
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
                        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                            tracing::error!(connection = label, "NATS refused this node's credentials (authorization failed)");
                            metrics::counter!(m::NATS_AUTH_REFUSED, "connection" => label).increment(1);
                        }
                        async_nats::Event::ClientError(async_nats::ClientError::Other(error)) if is_refusal(&error) => {
                            tracing::error!(connection = label, %error, "NATS refused this node's credentials on reconnecting (authorization failed); trying again");
                            metrics::counter!(m::NATS_AUTH_REFUSED, "connection" => label).increment(1);
                        }
                        other => tracing::warn!(connection = label, event = %other, "NATS connection event"),
                    }
                }
            });
        match options.connect(access.servers()).await {
            Ok(client) => {
                metrics::gauge!(m::NATS_CONNECTED, "connection" => label).set(1.0);
                return Ok(Some(client));
            }
            Err(e) => match Refused::of(role, e) {
                Ok(refused) => return Err(refused),
                Err(e) => {
                    tracing::warn!(connection = label, error = %e, "cannot connect to NATS; retrying in 1s")
                }
            },
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
