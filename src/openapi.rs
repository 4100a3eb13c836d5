//! The OpenAPI 3.1 document (`GET /openapi.json`, contract section 11), built by the same
//! calls that register the routes, so that it cannot drift from them.
//!
//! A documented route is an [`Endpoint`]: one method's Actix `Route` together with the
//! operation that `#[utoipa::path]` generated for its handler, plus the problem `code`s it
//! can answer. [`crate::http::resource`] takes endpoints only and turns them into a
//! [`Documented`] resource, which registers the routes and carries their part of the
//! document; `utoipa-actix-web`'s `ServiceConfig` collects those parts while the app is
//! assembled. A route registered any other way (the test and benchmark routes) has to go
//! through `ServiceConfig::map` on purpose, and is left out of the document.

use std::collections::BTreeMap;

use actix_web::dev::{AppService, HttpServiceFactory};
use actix_web::http::Method;
use actix_web::{web, HttpResponse, Route};
use utoipa::openapi::content::Content;
use utoipa::openapi::header::Header;
use utoipa::openapi::path::{HttpMethod, Operation, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{AllOfBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder};
use utoipa_actix_web::OpenApiFactory;

use crate::error::PROBLEM_JSON;

/// Schemas a part of the document refers to, by name.
type Schemas = Vec<(String, RefOr<Schema>)>;

/// Every problem `code` of contract section 1 with its HTTP status. A unit test holds it
/// to `ApiError`'s own mapping.
pub const PROBLEM_CODES: &[(&str, u16)] = &[
    ("bad_request", 400),
    ("not_found", 404),
    ("method_not_allowed", 405),
    ("insufficient_funds", 409),
    ("idempotency_conflict", 409),
    ("payload_too_large", 413),
    ("unsupported_media_type", 415),
    ("validation_failed", 422),
    ("internal", 500),
    ("database_unavailable", 503),
    ("transaction_conflict", 503),
    ("timeout", 503),
    ("commit_unknown", 503),
];

/// The codes of any request that runs in a session: the database may be out of reach or
/// slow, and anything unforeseen is `internal`.
pub const SESSION_CODES: &[&str] = &[
    "database_unavailable",
    "transaction_conflict",
    "timeout",
    "internal",
];
/// The codes of any request with a JSON body.
pub const BODY_CODES: &[&str] = &["bad_request", "unsupported_media_type", "payload_too_large"];

/// One method of a resource: its route and its operation in the document.
pub struct Endpoint {
    method: Method,
    route: Route,
    operation: Operation,
    schemas: Schemas,
}

impl Endpoint {
    /// The route for the handler whose `#[utoipa::path]` generated `P` (`__path_<handler>`).
    /// The method comes from the annotation; the path is the resource's.
    pub fn new<P>(route: Route) -> Self
    where
        P: utoipa::Path + utoipa::__dev::SchemaReferences,
    {
        let method = P::methods().first().map_or(Method::GET, actix_method);
        let mut schemas = Vec::new();
        P::schemas(&mut schemas);
        Endpoint {
            method,
            route,
            operation: P::operation(),
            schemas,
        }
    }

    /// The same endpoint with its route changed by `f` (wrapped in a middleware).
    pub fn map_route(mut self, f: impl FnOnce(Route) -> Route) -> Self {
        self.route = f(self.route);
        self
    }

    /// Overrides the operation id (a handler served on two paths needs two).
    pub fn operation_id(mut self, id: &str) -> Self {
        self.operation.operation_id = Some(id.to_owned());
        self
    }

    /// Documents the problem answers this endpoint can give: one response per status,
    /// whose body's `code` is one of `codes`. Codes of several lists are merged.
    pub fn problems(mut self, lists: &[&[&str]]) -> Self {
        let mut by_status: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for code in lists.iter().flat_map(|list| list.iter()) {
            let status = PROBLEM_CODES
                .iter()
                .find(|(c, _)| c == code)
                .map_or(500, |(_, s)| *s);
            let codes = by_status.entry(status).or_default();
            if !codes.contains(code) {
                codes.push(code);
            }
        }
        for (status, codes) in by_status {
            let mut response = ResponseBuilder::new()
                .description(problem_description(status, &codes))
                .content(PROBLEM_JSON, Content::new(Some(problem_schema(&codes))));
            if status == 503 {
                response = response.header(
                    "Retry-After",
                    header("Seconds to wait before retrying", integer_schema()),
                );
            }
            self.operation
                .responses
                .responses
                .insert(status.to_string(), RefOr::T(response.build()));
        }
        self
    }

    /// The method, the route and, for the document, the operation with the headers every
    /// response carries.
    fn into_parts(mut self) -> (Method, Route, Operation, Schemas) {
        // Every request may send a `Consistency-Token` back, and a malformed one is 400 on
        // any route (`crate::consistency`); every POST is a write, whose 2xx answers carry
        // one.
        self = self.problems(&[&["bad_request"]]);
        self.operation
            .parameters
            .get_or_insert_with(Vec::new)
            .push(RefOr::T(
                ParameterBuilder::new()
                    .name("Consistency-Token")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some(
                        "The latest Consistency-Token the client holds: a read then sees \
                         every write up to it, whichever replica serves it",
                    ))
                    .schema(Some(token_schema()))
                    .build(),
            ));
        let write = self.method == Method::POST;
        for (status, response) in self.operation.responses.responses.iter_mut() {
            if let RefOr::T(response) = response {
                if write && status.starts_with('2') {
                    response.headers.insert(
                        "Consistency-Token".to_owned(),
                        RefOr::T(header(
                            "A write-ahead-log position at or past this write's commit: send \
                             it back on later requests to read your own writes",
                            token_schema(),
                        )),
                    );
                }
                response.headers.insert(
                    "X-Request-Id".to_owned(),
                    RefOr::T(header(
                        "The request's id: the client's own if it sent a sane one (1 to 128 \
                         letters, digits and -_.:), else a generated one",
                        string_schema(),
                    )),
                );
            }
        }
        (self.method, self.route, self.operation, self.schemas)
    }
}

/// A resource (or any service) with its part of the document.
pub struct Documented<S> {
    service: S,
    paths: Paths,
    schemas: Schemas,
}

impl<S> Documented<S> {
    /// Splits `endpoints` into the routes, given to `build` with their methods, and the
    /// document's part for `path`.
    pub fn build<const N: usize>(
        path: &str,
        endpoints: [Endpoint; N],
        build: impl FnOnce([(Method, Route); N]) -> S,
    ) -> Self {
        let mut paths = Paths::new();
        let mut schemas = Vec::new();
        let routes = endpoints.map(|endpoint| {
            let (method, route, operation, mut own) = endpoint.into_parts();
            paths.add_path_operation(path, vec![http_method(&method)], operation);
            schemas.append(&mut own);
            (method, route)
        });
        Documented {
            service: build(routes),
            paths,
            schemas,
        }
    }

    /// The same document part for a service made from this one (wrapped in middleware).
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> Documented<T> {
        Documented {
            service: f(self.service),
            paths: self.paths,
            schemas: self.schemas,
        }
    }
}

impl<S: HttpServiceFactory> HttpServiceFactory for Documented<S> {
    fn register(self, config: &mut AppService) {
        self.service.register(config);
    }
}

impl<S> OpenApiFactory for Documented<S> {
    fn paths(&self) -> Paths {
        self.paths.clone()
    }

    fn schemas(&self, schemas: &mut Schemas) {
        schemas.extend(self.schemas.iter().cloned());
    }
}

/// The document's fixed parts; the paths and schemas come from the routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "ledger",
        description = "Accounts and transfers between them, in minor units (cents). Every \
                       error except the probes' is application/problem+json (RFC 9457) with a \
                       machine-readable `code`.",
    ),
    components(schemas(Problem, FieldError))
)]
pub struct ApiDoc;

/// The document served at `/openapi.json`, serialized once per worker.
pub struct Document(pub String);

/// Completes `doc` (the routes' parts) with [`ApiDoc`] and serializes it.
pub fn document(doc: OpenApi) -> Document {
    use utoipa::OpenApi as _;
    let mut full = ApiDoc::openapi();
    full.merge(doc);
    // Serializing plain data cannot fail; an empty document would fail the tests.
    Document(full.to_json().unwrap_or_default())
}

/// The OpenAPI document of this service.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
async fn serve(doc: web::Data<Document>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(doc.0.clone())
}

/// Registers `GET /openapi.json`; the document itself is app data (`Document`).
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(crate::http::resource(
        "/openapi.json",
        [Endpoint::new::<__path_serve>(web::to(serve))],
    ));
}

/// An RFC 9457 problem (contract section 1).
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only: the body is built in `error`")]
struct Problem {
    /// Always `about:blank`.
    #[schema(rename = "type")]
    kind: String,
    /// The status's reason phrase.
    title: String,
    /// The HTTP status.
    status: u16,
    /// The machine-readable code.
    code: String,
    /// For humans.
    detail: String,
    /// The request's `X-Request-Id`.
    request_id: Option<String>,
    /// The fields that broke a rule (`validation_failed` only).
    errors: Option<Vec<FieldError>>,
    /// The failing item of a batch.
    index: Option<u32>,
}

/// One field that broke a rule.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only: the body is built in `error`")]
struct FieldError {
    field: String,
    message: String,
}

/// `Problem` with `code` narrowed to `codes`.
fn problem_schema(codes: &[&str]) -> RefOr<Schema> {
    let code = ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(codes.iter().copied()));
    AllOfBuilder::new()
        .item(Ref::from_schema_name("Problem"))
        .item(ObjectBuilder::new().property("code", code).required("code"))
        .into()
}

fn problem_description(status: u16, codes: &[&str]) -> String {
    let reason = actix_web::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!("{reason}: {}", codes.join(", "))
}

fn header(description: &str, schema: Schema) -> Header {
    let mut header = Header::new(schema);
    header.description = Some(description.to_owned());
    header
}

fn string_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .into()
}

/// The token's form (contract section 10): an LSN in PostgreSQL's text form.
fn token_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .pattern(Some("^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"))
        .into()
}

fn integer_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Integer))
        .minimum(Some(0))
        .into()
}

/// A `Location` header (`201 Created`).
pub fn location_header() -> Header {
    header("The created resource", string_schema())
}

fn http_method(method: &Method) -> HttpMethod {
    match *method {
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::DELETE => HttpMethod::Delete,
        Method::PATCH => HttpMethod::Patch,
        Method::HEAD => HttpMethod::Head,
        Method::OPTIONS => HttpMethod::Options,
        Method::TRACE => HttpMethod::Trace,
        _ => HttpMethod::Get,
    }
}

fn actix_method(method: &HttpMethod) -> Method {
    match method {
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Trace => Method::TRACE,
        _ => Method::GET,
    }
}

#[cfg(test)]
mod tests {
    use actix_web::ResponseError;

    use super::*;
    use crate::error::ApiError;

    /// The table the document is built from says what `ApiError` does.
    #[test]
    fn the_problem_codes_table_matches_api_error() {
        let errors = [
            ApiError::BadRequest(String::new()),
            ApiError::UnsupportedMediaType(String::new()),
            ApiError::Validation(Vec::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed(Vec::new()),
            ApiError::InsufficientFunds(String::new()),
            ApiError::IdempotencyConflict,
            ApiError::PayloadTooLarge(0),
            ApiError::DatabaseUnavailable(String::new()),
            ApiError::TransactionConflict,
            ApiError::Timeout,
            ApiError::CommitUnknown,
            ApiError::Internal(String::new()),
        ];
        assert_eq!(errors.len(), PROBLEM_CODES.len());
        for error in errors {
            let status = error.status_code().as_u16();
            assert!(
                PROBLEM_CODES.contains(&(error.code(), status)),
                "{} {status} missing from PROBLEM_CODES",
                error.code()
            );
        }
    }
}
