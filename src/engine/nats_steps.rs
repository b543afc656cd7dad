//! Steps done by step handler services over NATS request/reply (`ORDERLY_STEPS=nats`): each call is
//! a request on `orders.steps.<step>.run` or `orders.steps.<step>.rollback`, carrying the order's
//! document and who is calling (order, step, attempt, run, fence) in headers. Any JSON object in
//! reply completes the step; a service-API error fails it with the error as the reason; no
//! responders means no handler is running, and the pipeline waits and calls again, as it does when
//! the connection is lost while a call waits for its reply (the reply is lost with it). The protocol
//! is described in docs/step-handlers.md.

use crate::domain::order::{Step, StepOutput};
use crate::engine::connection::Connection;
use crate::engine::steps::{StepCall, StepOutcome, Steps};
use async_nats::{HeaderMap, RequestErrorKind};
use futures::future::BoxFuture;
use serde_json::value::RawValue;
use std::time::Duration;

/// The prefix of every step handler subject.
pub const SUBJECT_PREFIX: &str = "orders.steps";
pub const ORDER_ID_HEADER: &str = "Orderly-Order-Id";
pub const STEP_HEADER: &str = "Orderly-Step";
pub const ATTEMPT_HEADER: &str = "Orderly-Attempt";
pub const RUN_HEADER: &str = "Orderly-Run";
pub const FENCE_HEADER: &str = "Orderly-Fence";
const ERROR_HEADER: &str = "Nats-Service-Error";
const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// Step handlers reached over NATS.
#[derive(Debug, Clone)]
pub struct NatsSteps {
    client: async_nats::Client,
    /// The losses of `client`'s connection: a reply does not survive one.
    connection: Connection,
    timeout: Duration,
}

impl NatsSteps {
    /// Calls handlers on `client` (a connection that may subscribe: replies come to its inbox), each
    /// call failing its step when no answer came within `timeout`.
    pub fn new(client: async_nats::Client, timeout: Duration) -> NatsSteps {
        NatsSteps {
            client,
            connection: Connection::default(),
            timeout,
        }
    }

    /// Sees `client`'s connection losses through `connection` (which its event callback tells of
    /// each `Disconnected`): a call that waits for its reply when the connection is lost is answered
    /// "not now" at once, and made again, instead of waiting out the timeout for a reply that was
    /// lost with the connection.
    pub fn with_connection(mut self, connection: Connection) -> NatsSteps {
        self.connection = connection;
        self
    }

    async fn call(&self, call: StepCall<'_>, verb: &str) -> StepOutcome {
        let subject = subject(call.step, verb);
        let body = match serde_json::to_vec(call.order) {
            Ok(body) => body,
            Err(e) => {
                return StepOutcome::Failed {
                    reason: format!("the order cannot be sent to its step handler: {e}"),
                }
            }
        };
        let request = async_nats::Request::new()
            .headers(headers(&call))
            .payload(body.into())
            // The pipeline stops waiting at the step timeout; this only bounds a forgotten request.
            .timeout(Some(self.timeout + Duration::from_secs(5)));
        // Taken before the request goes out: a loss from here on may take the reply with it.
        let epoch = self.connection.current();
        let replied = tokio::select! {
            replied = self.client.send_request(subject.clone(), request) => replied,
            _ = epoch.wait_ended() => {
                return StepOutcome::NotNow {
                    reason: format!(
                        "the connection to the step handlers was lost while waiting for the answer on {subject}"
                    ),
                }
            }
        };
        match replied {
            Ok(reply) => answer(&reply),
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => StepOutcome::NotNow {
                    reason: format!("no step handler is answering on {subject}"),
                },
                RequestErrorKind::TimedOut => StepOutcome::Failed {
                    reason: format!("the step handler on {subject} did not answer in time"),
                },
                RequestErrorKind::MaxPayloadExceeded => StepOutcome::Failed {
                    reason: format!("the order is too large to send to {subject}: {e}"),
                },
                _ => StepOutcome::NotNow {
                    reason: format!("cannot reach the step handler on {subject}: {e}"),
                },
            },
        }
    }
}

impl Steps for NatsSteps {
    fn run<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(self.call(call, "run"))
    }

    fn roll_back<'a>(&'a self, call: StepCall<'a>) -> BoxFuture<'a, StepOutcome> {
        Box::pin(self.call(call, "rollback"))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    /// A handler goes on with a run the node stopped waiting for: its rollback is sent once it has
    /// answered (or its timeout passed), not while it still works.
    fn awaits_interrupted_runs(&self) -> bool {
        true
    }
}

/// `orders.steps.<step>.<verb>`, the step in lower case (`pre-processing`).
pub fn subject(step: Step, verb: &str) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.{verb}",
        step.as_str().to_ascii_lowercase()
    )
}

fn headers(call: &StepCall<'_>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(ORDER_ID_HEADER, call.order.order_id.to_string().as_str());
    headers.insert(STEP_HEADER, call.step.as_str());
    headers.insert(ATTEMPT_HEADER, call.attempt.to_string().as_str());
    headers.insert(RUN_HEADER, call.run.to_string().as_str());
    headers.insert(FENCE_HEADER, call.fence.to_string().as_str());
    headers
}

/// What a handler's reply means: a service error fails the step with its description; an empty body
/// or a JSON object completes it (the object is its output); anything else fails it.
fn answer(reply: &async_nats::Message) -> StepOutcome {
    let header = |name: &str| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    if let Some(code) = header(ERROR_CODE_HEADER) {
        let description = header(ERROR_HEADER).unwrap_or_default();
        return StepOutcome::Failed {
            reason: format!("{description} (step handler error {code})"),
        };
    }
    if reply.payload.iter().all(u8::is_ascii_whitespace) {
        return StepOutcome::done();
    }
    let output = std::str::from_utf8(&reply.payload)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        .filter(|raw| raw.get().trim_start().starts_with('{'));
    match output {
        Some(output) => StepOutcome::Done {
            output: Some(StepOutput(output)),
        },
        None => StepOutcome::Failed {
            reason: "the step handler answered with something other than a JSON object".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(headers: &[(&str, &str)], payload: &str) -> async_nats::Message {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        async_nats::Message {
            subject: "_INBOX.x".into(),
            reply: None,
            payload: payload.to_owned().into(),
            headers: (!headers.is_empty()).then_some(map),
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn subjects_name_the_step_in_lower_case() {
        assert_eq!(
            subject(Step::PreProcessing, "rollback"),
            "orders.steps.pre-processing.rollback"
        );
        assert_eq!(
            subject(Step::Scheduling, "run"),
            "orders.steps.scheduling.run"
        );
    }

    #[test]
    fn replies_complete_or_fail_the_step() {
        let out = |outcome| match outcome {
            StepOutcome::Done { output } => Ok(output.map(|o| o.0.get().to_owned())),
            StepOutcome::Failed { reason } => Err(reason),
            StepOutcome::NotNow { reason } => Err(format!("not now: {reason}")),
        };
        assert_eq!(out(answer(&reply(&[], ""))), Ok(None));
        assert_eq!(
            out(answer(&reply(&[], r#"{"charged":12}"#))),
            Ok(Some(r#"{"charged":12}"#.into()))
        );
        assert_eq!(
            out(answer(&reply(
                &[(ERROR_CODE_HEADER, "402"), (ERROR_HEADER, "card declined")],
                ""
            ))),
            Err("card declined (step handler error 402)".into())
        );
        assert!(out(answer(&reply(&[], "[1,2]"))).is_err());
        assert!(out(answer(&reply(&[], "not json"))).is_err());
    }
}
