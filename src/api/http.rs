//! The HTTP API: submit and query orders, node diagnostics, health and metrics. Every error is a JSON
//! body `{"error": ..., "code": ...}` with a fitting status.

use crate::api::auth::{Denied, Tokens};
use crate::api::control::{Answer, Control};
use crate::api::intake::{bounded_read, Intake, IntakeError, IDEMPOTENCY_KEY};
use crate::api::list::{list, ListRequest, Listing};
use crate::domain::order::Interface;
use crate::ops::cluster::Cluster;
use crate::ops::metrics as m;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    intake: Intake,
    control: Control,
    cluster: Cluster,
    /// The node's connections to NATS: work, fetch and public.
    clients: [async_nats::Client; 3],
    /// Whether the shared consumer can be worked from.
    health: crate::queue::follow::Health,
    metrics: PrometheusHandle,
    draining: CancellationToken,
    /// The bearer tokens; empty: the API is open.
    tokens: Tokens,
    /// Cancelled by `POST /admin/drain`: the node drains as on SIGTERM.
    drain_request: CancellationToken,
}

impl AppState {
    pub fn new(
        intake: Intake,
        control: Control,
        cluster: Cluster,
        clients: [async_nats::Client; 3],
        health: crate::queue::follow::Health,
        metrics: PrometheusHandle,
        draining: CancellationToken,
    ) -> AppState {
        AppState {
            intake,
            control,
            cluster,
            clients,
            health,
            metrics,
            draining,
            tokens: Tokens::default(),
            drain_request: CancellationToken::new(),
        }
    }

    /// Requests need one of `tokens` (none: the API is open); `POST /admin/drain` cancels
    /// `drain_request`.
    pub fn with_access(mut self, tokens: Tokens, drain_request: CancellationToken) -> AppState {
        self.tokens = tokens;
        self.drain_request = drain_request;
        self
    }

    /// Whether every connection of the node to NATS is up.
    fn nats_connected(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
}

/// An HTTP error with a JSON body.
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into(), "code": code }),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: e.body(),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", denied.to_string())
            }
            Denied::Forbidden { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", denied.to_string())
            }
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_request"
        };
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "request body is larger than {} bytes",
                crate::domain::payload::MAX_PAYLOAD
            )
        } else {
            rejection.body_text()
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another request:
            // say so, or a client that pools connections sends its next request into a closed one.
            let close = [(axum::http::header::CONNECTION, "close")];
            return (self.status, close, Json(self.body)).into_response();
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
            return (self.status, challenge, Json(self.body)).into_response();
        }
        (self.status, Json(self.body)).into_response()
    }
}

/// The HTTP API of one node, on a bound listener.
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    app: Router,
    limits: crate::api::limits::Limits,
}

impl HttpServer {
    pub fn new(listener: tokio::net::TcpListener, state: AppState) -> HttpServer {
        HttpServer {
            listener,
            app: router(state),
            limits: crate::api::limits::Limits::default(),
        }
    }

    /// Serves within `limits` (timeouts and the connection cap) instead of the defaults.
    pub fn with_limits(mut self, limits: crate::api::limits::Limits) -> HttpServer {
        self.limits = limits;
        self
    }
}

impl crate::task::Task for HttpServer {
    const NAME: &'static str = "http server";

    /// Serves until `stop` fires, then lets the requests in progress finish.
    async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        crate::api::limits::serve(self.listener, self.app, self.limits, stop).await?;
        Ok(())
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/orders",
            post(create_order)
                .layer(DefaultBodyLimit::max(crate::domain::payload::MAX_PAYLOAD))
                .get(list_orders),
        )
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}/retry", post(retry_order))
        .route("/orders/{id}/events", get(watch_order))
        .route("/admin/drain", post(drain))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/diagnostic/heartbeat", get(heartbeat))
        .route("/diagnostic/cluster", get(cluster))
        .route("/diagnostic/stats", get(stats))
        .route("/metrics", get(metrics_scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let key = match headers.get(IDEMPOTENCY_KEY) {
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Idempotency-Key is not text",
            )
        })?),
        None => None,
    };
    let submitted = state.intake.submit(&body, Interface::Http, key).await?;
    let location = format!("/orders/{}", submitted.order_id);
    let mut response = (StatusCode::ACCEPTED, Json(submitted)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let document = state.intake.get(&id).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response())
}

/// The body of `POST /orders/{id}/cancel`: empty, or `{"reason": "..."}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        serde_json::from_slice::<CancelRequest>(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected an empty body or {{\"reason\": \"...\"}}: {e}"),
            )
        })?
    };
    let answer = state
        .control
        .cancel(&id, request.reason, Interface::Http)
        .await?;
    Ok(answered(answer))
}

async fn retry_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(answered(state.control.retry(&id, Interface::Http).await?))
}

/// `200` with the document when the request is done, `202` when it is under way.
fn answered(answer: Answer) -> Response {
    let status = if answer.done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(answer.order)).into_response()
}

/// The order's changes as Server-Sent Events (see `watch.rs`).
async fn watch_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_seen = crate::api::watch::last_event_id(headers.get("last-event-id"))?;
    let changes = crate::api::watch::open(
        state.intake.bucket(),
        &state.clients[2],
        &id,
        last_seen,
        state.draining.clone(),
    )
    .await?;
    Ok(crate::api::watch::respond(changes))
}

async fn drain(State(state): State<AppState>) -> Response {
    crate::api::admin::drain(&state.drain_request)
}

/// `GET /orders?state=Completed&state=Failed&limit=50&cursor=...`
async fn list_orders(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Listing>, ApiError> {
    let Query(pairs) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let request = ListRequest::from_pairs(&pairs)?;
    Ok(Json(list(&state.intake, &request).await?))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let connected = state.nats_connected();
    let draining = state.draining.is_cancelled();
    let problem = state.health.problem();
    let ready = connected && !draining && problem.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "nats_connected": connected,
        "draining": draining,
    });
    if let Some(problem) = problem {
        body["reason"] = json!(problem);
    }
    (status, Json(body)).into_response()
}

async fn heartbeat(State(state): State<AppState>) -> Json<serde_json::Value> {
    let status = state.cluster.status();
    let uptime = (status.last_seen - status.started_at).num_milliseconds() as f64 / 1000.0;
    Json(json!({
        "node_id": status.node_id,
        "name": status.name,
        "version": status.version,
        "status": status.status,
        "generated_at": status.last_seen,
        "started_at": status.started_at,
        "uptime_seconds": uptime,
        "http_addr": status.http_addr,
        "nats_connected": state.nats_connected(),
        "workers_busy": status.workers_busy,
        "workers_total": status.workers_total,
        "orders_completed": status.orders_completed,
        "orders_failed": status.orders_failed,
    }))
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let status = state.cluster.status();
    let uptime = (status.last_seen - status.started_at).num_milliseconds() as f64 / 1000.0;
    let heartbeat_age = state.cluster.heartbeat_age().map(|age| age.as_secs_f64());
    Json(json!({
        "node_id": status.node_id,
        "generated_at": status.last_seen,
        "uptime_seconds": uptime,
        "orders_completed": status.orders_completed,
        "orders_failed": status.orders_failed,
        "orders_in_flight": status.workers_busy,
        "workers_busy": status.workers_busy,
        "workers_total": status.workers_total,
        "heartbeat_age_seconds": heartbeat_age,
        "heartbeat_interval_seconds": state.cluster.interval().as_secs_f64(),
        "nats_connected": state.nats_connected(),
    }))
}

async fn cluster(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // The heartbeats bucket is read on the work connection (the first one).
    let read = async {
        state
            .cluster
            .live_nodes()
            .await
            .map_err(|e| IntakeError::Unavailable {
                context: "cannot read the cluster view".into(),
                source: Some(e),
            })
    };
    let nodes = bounded_read(&state.clients[0], read).await?;
    let busy: usize = nodes.iter().map(|n| n.workers_busy).sum();
    let total: usize = nodes.iter().map(|n| n.workers_total).sum();
    Ok(Json(json!({
        "generated_at": crate::clock::now(),
        "node_count": nodes.len(),
        "workers_busy": busy,
        "workers_total": total,
        "nodes": nodes,
    })))
}

async fn metrics_scrape(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Lets a request through to its handler only with a token whose role the route needs (see `auth.rs`).
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let authorization = request.headers().get(header::AUTHORIZATION);
    let checked = state.tokens.check(
        request.method().as_str(),
        route,
        request.uri().path(),
        authorization.map(HeaderValue::as_bytes),
    );
    match checked {
        Ok(()) => next.run(request).await,
        Err(denied) => ApiError::from(denied).into_response(),
    }
}

/// Counts requests by route and status, and records their latency.
async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(m::HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
