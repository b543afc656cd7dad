//! The HTTP API's OpenAPI 3.1 document, served at `GET /openapi.json`. Its operations come from the
//! handlers' `#[utoipa::path]` annotations, collected by the router as it registers them (see
//! `http.rs`), and their schemas from the types the handlers send; this module adds what is common to
//! every operation: the bearer scheme, and each operation's security and `401`/`403` answers, taken
//! from [`auth::ROUTES`], the table the middleware applies. So neither the routes, nor the bodies, nor
//! who may call what can differ between the document and the code.

use crate::api::auth::{self, Access};
use crate::api::bodies::{ErrorBody, OrderIdText, StateNames};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr};
use utoipa::OpenApi as _;

/// The name of the bearer scheme in `components.securitySchemes`.
pub const BEARER: &str = "bearer";

/// The document before the router adds its operations: what the API is, and its shared schemas.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Orderly",
        description = "Submit orders, follow them through their four steps, cancel and retry them, and \
            read the node's diagnostics. Every error is a JSON body `{\"error\": ..., \"code\": ...}`. \
            When the node has API tokens (`ORDERLY_API_TOKEN`, `ORDERLY_API_TOKENS_FILE`), each operation \
            with a `bearer` security requirement needs `Authorization: Bearer <token>` with the role its \
            description names; without tokens the API is open.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(ErrorBody, OrderIdText, StateNames)),
    tags(
        (name = "orders", description = "Submitting, reading, cancelling and retrying orders"),
        (name = "node", description = "Health, readiness, metrics, diagnostics and control of this node"),
    )
)]
struct Base;

/// The document's starting point, for the router to add its operations to.
pub fn base() -> OpenApi {
    Base::openapi()
}

/// The finished document: `document` with the bearer scheme, and on every operation the security
/// and the role [`auth::ROUTES`] give its method and route.
pub fn finish(mut document: OpenApi) -> OpenApi {
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    for (route, item) in document.paths.paths.iter_mut() {
        for (method, operation) in operations(item) {
            secure(operation, auth::access(method, Some(route)));
        }
    }
    document
}

/// The operations of a path, with their methods as `auth::ROUTES` writes them.
pub fn operations(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    let PathItem {
        get,
        put,
        post,
        delete,
        options,
        head,
        patch,
        trace,
        ..
    } = item;
    [
        ("GET", get),
        ("PUT", put),
        ("POST", post),
        ("DELETE", delete),
        ("OPTIONS", options),
        ("HEAD", head),
        ("PATCH", patch),
        ("TRACE", trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.as_mut().map(|op| (method, op)))
    .collect()
}

/// Gives `operation` the security `access` calls for: none for an open route; the bearer scheme,
/// the role in its description and the `401` and `403` answers for the others.
fn secure(operation: &mut Operation, access: Access) {
    let role = match access {
        Access::Open => {
            operation.security = Some(Vec::new());
            return;
        }
        Access::Needs(role) => role.as_str(),
        // Not in the table: every token is refused. `auth::tests` and `http::tests` keep every
        // documented route in the table.
        Access::Refused => "none",
    };
    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    let needs =
        format!("Needs a token with the `{role}` role or a higher one, when tokens are set.");
    operation.description = Some(match operation.description.take() {
        Some(description) => format!("{description}\n\n{needs}"),
        None => needs,
    });
    let responses = &mut operation.responses.responses;
    let unauthorized =
        error_response("No `Authorization: Bearer` header, or a token that is not configured");
    let unauthorized = unauthorized.header(
        "WWW-Authenticate",
        HeaderBuilder::new()
            .schema(Some(Object::with_type(Type::String)))
            .description(Some("`Bearer`"))
            .build(),
    );
    responses.insert("401".into(), RefOr::T(unauthorized.build()));
    let forbidden = error_response("The token's role may not do this");
    responses.insert("403".into(), RefOr::T(forbidden.build()));
}

/// A response whose body is the JSON error body.
fn error_response(description: &str) -> ResponseBuilder {
    let body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", body)
}
