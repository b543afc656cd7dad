//! The `orders` NATS service: `orders.create`, `orders.get`, `orders.list`, `orders.cancel` and
//! `orders.retry`, answered by [`Intake`] and [`Control`] like the HTTP API, with the service API's
//! error headers on a failure (`nats req orders.get <id>`).

use crate::api::control::Control;
use crate::api::intake::{Intake, IntakeError, IDEMPOTENCY_KEY};
use crate::api::list::ListRequest;
use crate::domain::order::Interface;
use crate::queue::setup::{
    CANCEL_SUBJECT, CREATE_SUBJECT, GET_SUBJECT, LIST_SUBJECT, RETRY_SUBJECT,
};
use crate::task::Task;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The NATS service of one node, on its public connection.
pub struct Service {
    intake: Intake,
    control: Control,
    /// Set once the endpoints answer, cleared when the service stops (see `/readyz`).
    registered: Arc<AtomicBool>,
    client: async_nats::Client,
    node_id: String,
}

impl Service {
    pub fn new(
        intake: Intake,
        control: Control,
        client: async_nats::Client,
        node_id: String,
    ) -> Service {
        Service {
            intake,
            control,
            registered: Arc::new(AtomicBool::new(false)),
            client,
            node_id,
        }
    }
}

impl Service {
    /// The flag this service sets once its endpoints answer.
    pub fn registered(&self) -> Arc<AtomicBool> {
        self.registered.clone()
    }
}

impl Task for Service {
    const NAME: &'static str = "nats service";

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let service = self
            .client
            .service_builder()
            .description("Orderly: submit and query orders")
            .metadata([("node".to_string(), self.node_id)].into())
            .start("orders", env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!(e).context("cannot start the NATS service"))?;
        let group = service.group("orders");
        let mut create = endpoint(&group, "create", CREATE_SUBJECT, "Submit an order: the body is its payload, a JSON object; replies {order_id, start_time}.").await?;
        let mut get = endpoint(
            &group,
            "get",
            GET_SUBJECT,
            "Look an order up: the body is its id, or {\"order_id\": ...}; replies its document.",
        )
        .await?;
        let mut cancel_ = endpoint(&group, "cancel", CANCEL_SUBJECT, "Cancel an order: the body is its id, or {\"order_id\": ..., \"reason\": ...}; replies its document (Cancelled, or Cancelling on its way there), or error 409 if it ended otherwise.").await?;
        let mut retry = endpoint(&group, "retry", RETRY_SUBJECT, "Run a Failed or Cancelled order again as a new attempt: the body is its id, or {\"order_id\": ...}; replies its document.").await?;
        let mut list = endpoint(&group, "list", LIST_SUBJECT, "A page of orders, newest state change first: {\"state\": [...], \"limit\": 1-500, \"cursor\": \"...\"}, all optional; replies {orders, next_cursor}.").await?;
        // Once the server has the subscriptions (a flush is a round trip), requests find them.
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "cannot confirm the NATS service's subscriptions");
        }
        self.registered.store(true, Ordering::Release);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(request) = create.next() => {
                    let intake = self.intake.clone();
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let key = request
                            .message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(IDEMPOTENCY_KEY).or_else(|| h.get("Nats-Msg-Id")))
                            .map(|v| v.as_str().to_owned());
                        let result = intake.submit(&request.message.payload, Interface::Nats, key.as_deref()).await.map(|s| {
                            Bytes::from(serde_json::to_vec(&s).expect("a reply always serializes"))
                        });
                        reply(&client, request, result).await;
                    });
                }
                Some(request) = get.next() => {
                    let intake = self.intake.clone();
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let result = match parse_request(&request.message.payload) {
                            Ok(asked) => intake.get(&asked.order_id).await,
                            Err(e) => Err(e),
                        };
                        reply(&client, request, result).await;
                    });
                }
                Some(request) = cancel_.next() => {
                    let control = self.control.clone();
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let result = match parse_request(&request.message.payload) {
                            Ok(asked) => control.cancel(&asked.order_id, asked.reason, Interface::Nats).await.map(document),
                            Err(e) => Err(e),
                        };
                        reply(&client, request, result).await;
                    });
                }
                Some(request) = retry.next() => {
                    let control = self.control.clone();
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let result = match parse_request(&request.message.payload) {
                            Ok(asked) => control.retry(&asked.order_id, Interface::Nats).await.map(document),
                            Err(e) => Err(e),
                        };
                        reply(&client, request, result).await;
                    });
                }
                Some(request) = list.next() => {
                    let intake = self.intake.clone();
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let result = match ListRequest::from_json(&request.message.payload) {
                            Ok(wanted) => crate::api::list::list(&intake, &wanted).await.map(|page| {
                                Bytes::from(serde_json::to_vec(&page).expect("a page always serializes"))
                            }),
                            Err(e) => Err(e),
                        };
                        reply(&client, request, result).await;
                    });
                }
                else => break,
            }
        }
        self.registered.store(false, Ordering::Release);
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), service.stop()).await {
            tracing::warn!(error = %e, "NATS service did not stop in time");
        }
        Ok(())
    }
}

/// Adds endpoint `orders-<name>` (subject `subject`) to the group, with its description in its metadata, as
/// `nats micro info orders` shows it.
async fn endpoint(
    group: &async_nats::service::Group,
    name: &str,
    subject: &str,
    description: &str,
) -> anyhow::Result<async_nats::service::endpoint::Endpoint> {
    group
        .endpoint_builder()
        .name(format!("orders-{name}"))
        .metadata([("description".to_string(), description.to_string())].into())
        .add(name)
        .await
        .map_err(|e| anyhow::anyhow!(e).context(format!("cannot add endpoint {subject}")))
}

/// The reply of a cancel or a retry: the document.
fn document(answer: crate::api::control::Answer) -> Bytes {
    Bytes::from(serde_json::to_vec(&answer.order).expect("a document always serializes"))
}

/// What `orders.get`, `orders.cancel` and `orders.retry` are asked.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Asked {
    order_id: String,
    /// Why, for a cancel.
    #[serde(default)]
    reason: Option<String>,
}

/// The body is the id, bare or quoted, or `{"order_id": "...", "reason": "..."}`.
fn parse_request(body: &[u8]) -> Result<Asked, IntakeError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| IntakeError::BadRequest("request body is not UTF-8".into()))?
        .trim();
    if text.starts_with('{') {
        serde_json::from_str(text).map_err(|e| {
            IntakeError::BadRequest(format!(
                "expected an order id or {{\"order_id\": ...}}: {e}"
            ))
        })
    } else {
        Ok(Asked {
            order_id: text.trim_matches('"').to_owned(),
            reason: None,
        })
    }
}

/// Replies with the body, or with a JSON error body and the service API's error headers.
///
/// An error is also counted in the endpoint's statistics (`num_errors` and `last_error` in `nats micro
/// stats orders`). The service API counts an error only when it sends the reply itself, and then
/// sends an empty body; so the counted error reply goes to an inbox nobody listens on, and the caller
/// gets the same headers with the JSON body (`{"error": ..., "code": ...}`) on its reply subject.
async fn reply(
    client: &async_nats::Client,
    mut request: async_nats::service::Request,
    result: Result<Bytes, IntakeError>,
) {
    let sent = match result {
        Ok(body) => request.respond(Ok(body)).await,
        Err(e) => {
            let error = async_nats::service::error::Error {
                status: e.to_string(),
                code: usize::from(e.status()),
            };
            let Some(reply_to) = request.message.reply.replace(client.new_inbox().into()) else {
                return; // a publish, not a request: nobody to answer
            };
            if let Err(e) = request.respond(Err(error.clone())).await {
                tracing::debug!(error = %e, "cannot count the error reply");
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR,
                error.status.as_str(),
            );
            headers.insert(
                async_nats::service::NATS_SERVICE_ERROR_CODE,
                error.code.to_string().as_str(),
            );
            let body = Bytes::from(e.body().to_string());
            client.publish_with_headers(reply_to, headers, body).await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot send the reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_a_bare_or_wrapped_id() {
        let id = |body: &[u8]| parse_request(body).map(|asked| asked.order_id);
        assert_eq!(id(b" abc \n").unwrap(), "abc");
        assert_eq!(id(br#""abc""#).unwrap(), "abc");
        assert_eq!(id(br#"{"order_id":"abc"}"#).unwrap(), "abc");
        assert!(id(br#"{"id":1}"#).is_err());
        let asked = parse_request(br#"{"order_id":"abc","reason":"late"}"#).unwrap();
        assert_eq!(asked.reason.as_deref(), Some("late"));
    }
}
