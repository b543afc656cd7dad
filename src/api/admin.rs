//! Node control over HTTP, for operators who cannot send signals: `POST /admin/drain` drains the node
//! exactly as SIGTERM does (it stops fetching, hands its orders back at a step boundary within the
//! grace period, and exits with status 0).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_util::sync::CancellationToken;

/// Asks the node to drain by cancelling `request`, which the node waits on next to its shutdown
/// signal; the reply comes at once. Asking again while the node drains answers the same.
pub fn drain(request: &CancellationToken) -> Response {
    if !request.is_cancelled() {
        tracing::info!("drain requested over HTTP");
        request.cancel();
    }
    let body = crate::api::bodies::Draining { status: "draining" };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_is_requested_once_and_every_call_is_accepted() {
        let request = CancellationToken::new();
        assert_eq!(drain(&request).status(), StatusCode::ACCEPTED);
        assert!(request.is_cancelled());
        assert_eq!(drain(&request).status(), StatusCode::ACCEPTED);
        assert!(request.is_cancelled());
    }
}
