//! The `orders` NATS service: `orders.create`, `orders.get` and `orders.list`, answered by [`Intake`] like the HTTP
//! API, with the service API's error headers on a failure (`nats req orders.get <id>`).

use crate::api::intake::{Intake, IntakeError, IDEMPOTENCY_KEY};
use crate::api::list::ListRequest;
use crate::domain::order::Interface;
use crate::queue::setup::{CREATE_SUBJECT, GET_SUBJECT, LIST_SUBJECT};
use crate::task::Task;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The NATS service of one node, on its public connection.
pub struct Service {
    intake: Intake,
    client: async_nats::Client,
    node_id: String,
}

impl Service {
    pub fn new(intake: Intake, client: async_nats::Client, node_id: String) -> Service {
        Service {
            intake,
            client,
            node_id,
        }
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
        let mut create = group.endpoint("create").await.map_err(|e| {
            anyhow::anyhow!(e).context(format!("cannot add endpoint {CREATE_SUBJECT}"))
        })?;
        let mut get = group.endpoint("get").await.map_err(|e| {
            anyhow::anyhow!(e).context(format!("cannot add endpoint {GET_SUBJECT}"))
        })?;
        let mut list = group
            .endpoint_builder()
            .metadata(
                LIST_METADATA
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
            )
            .add("list")
            .await
            .map_err(|e| {
                anyhow::anyhow!(e).context(format!("cannot add endpoint {LIST_SUBJECT}"))
            })?;
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
                        let id = parse_get_request(&request.message.payload);
                        let result = match id {
                            Ok(id) => intake.get(&id).await,
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
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), service.stop()).await {
            tracing::warn!(error = %e, "NATS service did not stop in time");
        }
        Ok(())
    }
}

/// What `nats micro info orders` says of `orders.list`.
const LIST_METADATA: [(&str, &str); 1] = [(
    "description",
    "A page of orders, newest state change first: {\"state\": [...], \"limit\": 1-500, \"cursor\": \"...\"}, all optional",
)];

/// `orders.get` takes the id as the whole body, or as `{"order_id": "..."}`.
fn parse_get_request(body: &[u8]) -> Result<String, IntakeError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| IntakeError::BadRequest("request body is not UTF-8".into()))?
        .trim();
    if text.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Get {
            order_id: String,
        }
        let get: Get = serde_json::from_str(text).map_err(|e| {
            IntakeError::BadRequest(format!(
                "expected an order id or {{\"order_id\": ...}}: {e}"
            ))
        })?;
        Ok(get.order_id)
    } else {
        Ok(text.trim_matches('"').to_owned())
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
    fn get_requests_take_a_bare_or_wrapped_id() {
        assert_eq!(parse_get_request(b" abc \n").unwrap(), "abc");
        assert_eq!(parse_get_request(br#""abc""#).unwrap(), "abc");
        assert_eq!(parse_get_request(br#"{"order_id":"abc"}"#).unwrap(), "abc");
        assert!(parse_get_request(br#"{"id":1}"#).is_err());
    }
}
