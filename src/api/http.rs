//! The HTTP API: submit and query orders, node diagnostics, health and metrics. Every error is a JSON
//! body `{"error": ..., "code": ...}` with a fitting status. Each handler carries its OpenAPI operation
//! (`#[utoipa::path]`), and the router registers the two together, so `GET /openapi.json` describes
//! exactly the routes served (see `openapi.rs`).

use crate::api::auth::{Denied, Tokens};
use crate::api::bodies::{
    ClusterView, ErrorBody, Health, Heartbeat, OrderIdText, Readiness, StateNames, Stats,
};
use crate::api::control::{Answer, Control};
use crate::api::intake::{bounded_read, Intake, IntakeError, Submitted, IDEMPOTENCY_KEY};
use crate::api::list::{list, ListRequest, Listing};
use crate::api::openapi;
use crate::domain::order::{Interface, Order};
use crate::ops::cluster::Cluster;
use crate::ops::metrics as m;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// What every handler and middleware gets: shared, since axum hands each request its own copy of
/// the state (a copy per layer), and the parts (the bucket's stream description, the connections)
/// are not cheap to copy.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(Clone)]
pub struct Shared {
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
    /// Whether the `orders` NATS service is registered and answering.
    serving: Arc<AtomicBool>,
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
        AppState(Arc::new(Shared {
            intake,
            control,
            cluster,
            clients,
            health,
            metrics,
            draining,
            tokens: Tokens::default(),
            drain_request: CancellationToken::new(),
            serving: Arc::new(AtomicBool::new(true)),
        }))
    }

    /// Requests need one of `tokens` (none: the API is open); `POST /admin/drain` cancels
    /// `drain_request`.
    pub fn with_access(mut self, tokens: Tokens, drain_request: CancellationToken) -> AppState {
        let shared = Arc::make_mut(&mut self.0);
        shared.tokens = tokens;
        shared.drain_request = drain_request;
        self
    }

    /// Readiness also waits for the `orders` NATS service, which sets `serving` once its endpoints
    /// answer: a node is not ready while `nats req orders.create` would find no responder on it.
    pub fn with_service(mut self, serving: Arc<AtomicBool>) -> AppState {
        Arc::make_mut(&mut self.0).serving = serving;
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
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: e.error_body(),
        }
    }
}

/// A path axum cannot take apart (a segment that is not UTF-8 once decoded, say): `400`, with the
/// JSON body instead of axum's plain text.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(rejection.status(), "bad_request", rejection.body_text())
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

/// Every route, each with its OpenAPI operation (its `#[utoipa::path]` names the method and path).
fn routes() -> OpenApiRouter<AppState> {
    let body_limit = DefaultBodyLimit::max(crate::domain::payload::MAX_PAYLOAD);
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(create_order).layer(body_limit))
        .routes(routes!(list_orders))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .routes(routes!(retry_order))
        .routes(routes!(watch_order))
        .routes(routes!(drain))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(heartbeat))
        .routes(routes!(cluster))
        .routes(routes!(stats))
        .routes(routes!(metrics_scrape))
        .routes(routes!(openapi_json))
}

/// The OpenAPI document of the routes (`GET /openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(routes().into_openapi())
}

fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn(track))
        .with_state(state)
}

#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    operation_id = "submit_order",
    summary = "Submit an order",
    description = "The body, a JSON object of at most 64 KiB, is the order's payload. The order is \
        accepted once its work message is stored; it then runs on one of the nodes.",
    params(
        ("Idempotency-Key" = inline(Option<OrderIdText>), Header, nullable = false,
            description = "The order's id, chosen by the client: a submission repeated with the same key is the same order"),
    ),
    request_body(content = Object, content_type = "application/json",
        description = "The order's payload: any JSON object"),
    responses(
        (status = 202, description = "Accepted", body = Submitted,
            headers(("Location" = String, description = "The order's URL, `/orders/{order_id}`"))),
        (status = 400, description = "The body is not a JSON object, or the Idempotency-Key is not an order id", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key was used by another message within the duplicate window", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody),
        (status = 503, description = "NATS cannot take the order now (`unavailable`), or did not confirm it (`uncertain`: look it up before submitting again)", body = ErrorBody),
    )
)]
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

#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    operation_id = "get_order",
    summary = "Look an order up",
    description = "The order's document, as stored: its state, steps, owner, attempts and payload.",
    params(("id" = OrderIdText, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order's document", body = Order),
        (status = 400, description = "The id is not an order id", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 503, description = "NATS did not answer", body = ErrorBody),
    )
)]
async fn get_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let document = state.intake.get(&id).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response())
}

/// The body of `POST /orders/{id}/cancel`: empty, or `{"reason": "..."}`.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    /// Why, kept in the order's `intent`.
    #[serde(default)]
    #[schema(max_length = 1000)]
    reason: Option<String>,
}

#[utoipa::path(
    post,
    path = "/orders/{id}/cancel",
    tag = "orders",
    operation_id = "cancel_order",
    summary = "Cancel an order",
    description = "Stops the order: no step starts any more, the steps done are rolled back, and it \
        ends `Cancelled`. The answer is final: it is decided by the write that records the cancel.",
    params(("id" = OrderIdText, Path, description = "The order's id")),
    request_body(content = Option<CancelRequest>, content_type = "application/json",
        description = "Empty, or the reason"),
    responses(
        (status = 200, description = "The order is `Cancelled` (now, or already)", body = Order),
        (status = 202, description = "The order is `Cancelling`: its done steps are being rolled back, and it will end `Cancelled`", body = Order),
        (status = 400, description = "The id is not an order id, or the body is neither empty nor `{\"reason\": \"...\"}` with at most 1000 characters", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order ended otherwise, or is rolling back after a failure: `state` says which", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, or gave no answer within 5 s (the cancel may or may not be recorded; asking again is safe)", body = ErrorBody),
    )
)]
async fn cancel_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let body = body?;
    // `null` is no request body too, as the document's schema for it says.
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        serde_json::from_slice::<Option<CancelRequest>>(&body)
            .map(Option::unwrap_or_default)
            .map_err(|e| {
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

#[utoipa::path(
    post,
    path = "/orders/{id}/retry",
    tag = "orders",
    operation_id = "retry_order",
    summary = "Retry a failed or cancelled order",
    description = "Runs a `Failed` or `Cancelled` order again from its first step, as a new attempt; \
        the attempt that ended moves to the document's `history`.",
    params(("id" = OrderIdText, Path, description = "The order's id")),
    responses(
        (status = 202, description = "The order is `Queued` again", body = Order),
        (status = 400, description = "The id is not an order id", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "The order is not `Failed` or `Cancelled`: `state` says what it is", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, or gave no answer within 5 s (asking again is safe)", body = ErrorBody),
    )
)]
async fn retry_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
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
#[utoipa::path(
    get,
    path = "/orders/{id}/events",
    tag = "orders",
    operation_id = "watch_order",
    summary = "Follow an order's changes",
    description = "Server-Sent Events: first the document as it is (`snapshot`), then one event per \
        stored change, named as on `orders.events.<id>`; the stream ends after a terminal state. Each \
        event's `id` is the revision and its `data` the change's JSON with the whole `document`.",
    params(
        ("id" = OrderIdText, Path, description = "The order's id"),
        ("Last-Event-ID" = Option<u64>, Header, nullable = false,
            description = "The id of the last event received: the stream resumes after it"),
    ),
    responses(
        (status = 200, description = "The stream of the order's changes; the schema is one event's",
            body = crate::api::watch::SentEvent, content_type = "text/event-stream"),
        (status = 400, description = "The id is not an order id, or Last-Event-ID is not a revision", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 503, description = "NATS did not answer (`unavailable`), or the node carries as many watches as it allows, half its connection cap (`too_many_watches`)", body = ErrorBody),
    )
)]
async fn watch_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
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

#[utoipa::path(
    post,
    path = "/admin/drain",
    tag = "node",
    operation_id = "drain",
    summary = "Drain this node",
    description = "The node drains as on SIGTERM: it stops fetching, hands its orders back at a step \
        boundary within the grace period, and exits with status 0. The answer comes at once.",
    responses((status = 202, description = "The node is draining", body = crate::api::bodies::Draining))
)]
async fn drain(State(state): State<AppState>) -> Response {
    crate::api::admin::drain(&state.drain_request)
}

/// `GET /orders?state=Completed&state=Failed&limit=50&cursor=...`
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    operation_id = "list_orders",
    summary = "List orders",
    description = "Orders by their latest state change, newest first, a page at a time: pass the \
        page's `next_cursor` as `cursor` for the next one, until it is `null`. A page looks at 1 000 \
        index entries at most, so a page with a `next_cursor` may hold fewer orders than `limit`.",
    params(
        ("state" = Option<Vec<StateNames>>, Query, style = Form, explode = true, nullable = false,
            description = "Only orders in these states (repeat it, or separate names with commas); every state without it"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, nullable = false,
            description = "Orders on a page, 1 to 500; 50 without it"),
        ("cursor" = Option<String>, Query, nullable = false,
            description = "Where the page starts: the previous page's `next_cursor`"),
    ),
    responses(
        (status = 200, description = "A page of orders", body = Listing),
        (status = 400, description = "An unknown state or parameter, a limit out of range, or a cursor this API did not give", body = ErrorBody),
        (status = 503, description = "NATS did not answer", body = ErrorBody),
    )
)]
async fn list_orders(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Listing>, ApiError> {
    let Query(pairs) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let request = ListRequest::from_pairs(&pairs)?;
    Ok(Json(list(&state.intake, &request).await?))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "node",
    operation_id = "healthz",
    summary = "Liveness",
    responses((status = 200, description = "The process answers", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "node",
    operation_id = "readyz",
    summary = "Readiness",
    description = "Ready when every connection to NATS is up, the node is not draining and the shared \
        consumer can be worked from.",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready: the body says why", body = Readiness),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    let connected = state.nats_connected();
    let draining = state.draining.is_cancelled();
    let problem = state
        .health
        .problem()
        .map(|problem| problem.to_string())
        .or_else(|| {
            (!state.serving.load(Ordering::Acquire))
                .then(|| "the orders NATS service is not registered yet".to_owned())
        });
    let ready = connected && !draining && problem.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not ready" },
        nats_connected: connected,
        draining,
        reason: problem,
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(
    get,
    path = "/diagnostic/heartbeat",
    tag = "node",
    operation_id = "heartbeat",
    summary = "This node, now",
    responses((status = 200, description = "This node's status", body = Heartbeat))
)]
async fn heartbeat(State(state): State<AppState>) -> Json<Heartbeat> {
    Json(Heartbeat::new(
        state.cluster.status(),
        state.nats_connected(),
    ))
}

#[utoipa::path(
    get,
    path = "/diagnostic/stats",
    tag = "node",
    operation_id = "stats",
    summary = "This node's worker counters",
    responses((status = 200, description = "This node's counters", body = Stats))
)]
async fn stats(State(state): State<AppState>) -> Json<Stats> {
    let heartbeat_age = state.cluster.heartbeat_age().map(|age| age.as_secs_f64());
    Json(Stats::new(
        state.cluster.status(),
        heartbeat_age,
        state.cluster.interval().as_secs_f64(),
        state.nats_connected(),
    ))
}

#[utoipa::path(
    get,
    path = "/diagnostic/cluster",
    tag = "node",
    operation_id = "cluster",
    summary = "Every live node",
    description = "The nodes whose heartbeat is recent, from the `orderly-nodes` bucket.",
    responses(
        (status = 200, description = "The live nodes", body = ClusterView),
        (status = 503, description = "NATS did not answer", body = ErrorBody),
    )
)]
async fn cluster(State(state): State<AppState>) -> Result<Json<ClusterView>, ApiError> {
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
    Ok(Json(ClusterView::new(nodes, crate::clock::now())))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    responses((status = 200, description = "The node's metrics in Prometheus' text format", body = String,
        content_type = "text/plain"))
)]
async fn metrics_scrape(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "node",
    operation_id = "openapi",
    summary = "This document",
    description = "The OpenAPI 3.1 document of this API, generated from the code.",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
async fn openapi_json() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        openapi()
            .to_pretty_json()
            .expect("an OpenAPI document always serializes")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    not_allowed(
        request.method().as_str(),
        request.uri().path(),
        route.unwrap_or_default(),
    )
}

/// `405`, with the methods `route` serves in `Allow`.
fn not_allowed(method: &str, path: &str, route: &str) -> Response {
    let message = format!("{method} is not allowed on {path}");
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
    .into_response();
    if let Ok(allow) = HeaderValue::from_str(&served(route).join(", ")) {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// The methods the router serves on `route`, as the routes registered them (`HEAD` with `GET`).
fn served(route: &str) -> &'static [&'static str] {
    static SERVED: OnceLock<BTreeMap<String, Vec<&'static str>>> = OnceLock::new();
    let served = SERVED.get_or_init(|| {
        let mut document = openapi();
        let mut served = BTreeMap::new();
        for (route, item) in document.paths.paths.iter_mut() {
            let mut methods: Vec<&'static str> = openapi::operations(item)
                .into_iter()
                .map(|(method, _)| method)
                .collect();
            if methods.contains(&"GET") {
                methods.push("HEAD");
            }
            served.insert(route.clone(), methods);
        }
        served
    });
    served.get(route).map_or(&[], Vec::as_slice)
}

/// Lets a request through to its handler only with a token whose role the route needs (see `auth.rs`).
/// A valid token with a method the route does not serve gets `405`, as without tokens, not `403`.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let method = request.method().as_str();
    let authorization = request.headers().get(header::AUTHORIZATION);
    let checked = state.tokens.check(
        method,
        route,
        request.uri().path(),
        authorization.map(HeaderValue::as_bytes),
    );
    match (checked, route) {
        (Ok(()), _) => next.run(request).await,
        (Err(Denied::Forbidden { .. }), Some(route)) if !served(route).contains(&method) => {
            not_allowed(method, request.uri().path(), route)
        }
        (Err(denied), _) => ApiError::from(denied).into_response(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::{self, Access};
    use serde_json::json;
    use std::collections::BTreeSet;

    /// Routes of `auth::ROUTES` that no handler serves yet; each leaves this list when its handler,
    /// with its `#[utoipa::path]`, joins `routes()`.
    const NOT_YET_SERVED: &[(&str, &str)] = &[];

    #[test]
    fn the_document_and_the_token_table_name_the_same_routes_with_the_same_access() {
        let mut document = openapi();
        let mut documented = BTreeSet::new();
        for (route, item) in document.paths.paths.iter_mut() {
            for (method, operation) in openapi::operations(item) {
                let security = json!(operation.security);
                let responses = &operation.responses.responses;
                match auth::access(method, Some(route)) {
                    Access::Open => assert_eq!(security, json!([]), "{method} {route}"),
                    Access::Needs(_) => {
                        assert_eq!(security, json!([{ "bearer": [] }]), "{method} {route}");
                        assert!(responses.contains_key("401"), "{method} {route}");
                        assert!(responses.contains_key("403"), "{method} {route}");
                    }
                    Access::Refused => panic!("{method} {route} is served but not in auth::ROUTES"),
                }
                documented.insert((method, route.clone()));
            }
        }
        for &(method, route, _) in auth::ROUTES {
            let served = documented.contains(&(method, route.to_owned()));
            if NOT_YET_SERVED.contains(&(method, route)) {
                assert!(
                    !served,
                    "{method} {route} is served now: take it off NOT_YET_SERVED"
                );
            } else {
                assert!(
                    served,
                    "{method} {route} is in auth::ROUTES but has no documented handler"
                );
            }
        }
        let schemes = json!(document.components.map(|c| c.security_schemes));
        assert_eq!(
            schemes["bearer"],
            json!({ "type": "http", "scheme": "bearer" })
        );
    }

    #[test]
    fn every_error_answer_is_the_json_error_body() {
        let mut document = openapi();
        for (route, item) in document.paths.paths.iter_mut() {
            for (method, operation) in openapi::operations(item) {
                for (status, response) in &operation.responses.responses {
                    if !(status.starts_with('4') || status.starts_with('5')) {
                        continue;
                    }
                    let response = json!(response);
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    // `/readyz` says why it is not ready in its own body.
                    let expected = if route == "/readyz" {
                        "#/components/schemas/Readiness"
                    } else {
                        "#/components/schemas/ErrorBody"
                    };
                    assert_eq!(schema, expected, "{method} {route} {status}");
                }
            }
        }
    }

    #[test]
    fn a_method_no_route_serves_is_not_allowed_and_head_goes_with_get() {
        assert_eq!(served("/orders/{id}"), ["GET", "HEAD"]);
        assert_eq!(served("/orders/{id}/cancel"), ["POST"]);
        assert!(served("/nowhere").is_empty());
    }
}
