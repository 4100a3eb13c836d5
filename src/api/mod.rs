//! The REST API: routes, extractor configuration and the shared bad-input story.
//!
//! Every resource is registered through [`resource`], which lists its methods once (a
//! known path with a wrong method gets 405 `method_not_allowed`, see
//! [`crate::http::resource`]) and wraps it in the session middleware: each request's
//! handler runs in one transaction, committed before its response. Request bodies go through [`json::Json`] (objects only,
//! `application/json` only); it and the path and query extractors map their failures to
//! the contract's codes (400, 413, 415), so bad input never reaches a handler, never checks
//! out a connection and never writes.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{web, HttpRequest, Resource};
use diesel::QueryResult;
use diesel_async::AsyncPgConnection;
use serde::Serialize;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::error::ApiError;
use crate::openapi::{Documented, Endpoint};
use actix_diesel_session::{DbSession, Retry, SessionMiddleware};

/// `/accounts`.
pub mod accounts;
/// Hand-written baselines without the session layer, for `make bench` (`--features bench`).
#[cfg(feature = "bench")]
pub mod bench_routes;
/// The `Idempotency-Key` header of the POST endpoints.
pub mod idempotency;
/// The request body extractor: `application/json`, objects where structs are expected.
pub mod json;
/// Routes that exist only to prove the session guarantees (`--features test-routes`).
#[cfg(feature = "test-routes")]
pub mod test_routes;
/// `/transfers`.
pub mod transfers;

/// Registers the API routes, each inside `session` (one transaction per request), and
/// the extractor configuration. The routes that write run again after a deadlock or a
/// serialization failure ([`write_retry`]). The test and benchmark routes go through
/// `map`, which leaves them out of the OpenAPI document.
pub fn configure(cfg: &mut ServiceConfig, body_limit: usize, session: &SessionMiddleware) {
    cfg.map(|cfg| {
        json::configure(cfg, body_limit);
        // `web::Json` is left to the benchmark baselines; the API's bodies use `json::Json`.
        cfg.app_data(json_config(body_limit))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::QueryConfig::default().error_handler(query_error));
        // First, as one scope: Actix tries resources in order, matching the dynamic ones
        // with a regex, so a baseline registered after the real routes would pay for
        // matching them too. This way either side's request matches one pattern (after
        // cheap prefix checks).
        #[cfg(feature = "bench")]
        bench_routes::configure(cfg);
        cfg
    });
    // Writes learn the WAL position after their COMMIT: the `Consistency-Token` of their
    // answer (`crate::consistency`).
    let write = session
        .clone()
        .retry(write_retry(body_limit))
        .commit_position();
    accounts::configure(cfg, session, &write);
    transfers::configure(cfg, session, &write);
    #[cfg(feature = "test-routes")]
    cfg.map(|cfg| {
        test_routes::configure(cfg, session, &write);
        cfg
    });
}

/// How the routes that write retry a transaction that ended in a deadlock (40P01) or a
/// serialization failure (40001): the session layer's defaults (3 attempts in all, within
/// 2 s), keeping bodies up to `HTTP_BODY_LIMIT`, which the body extractor enforces anyway.
/// The handlers' only side effects are their writes, which a retry rolls back. After the
/// last attempt the client gets 503 `transaction_conflict` with `Retry-After`.
pub fn write_retry(body_limit: usize) -> Retry {
    Retry::default().body_limit(body_limit)
}

/// [`crate::http::resource`] inside the session middleware. The middleware wraps each API
/// resource rather than the whole app so that the probes and `/metrics` carry no session
/// at all.
pub fn resource<const N: usize>(
    path: &str,
    endpoints: [Endpoint; N],
    session: &SessionMiddleware,
) -> Documented<
    Resource<
        impl ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<impl MessageBody>,
            Error = actix_web::Error,
            InitError = (),
        >,
    >,
> {
    // On each route rather than the resource: inside the `Consistency-Token` check that
    // `crate::http::resource` puts around every route, so that it sees the commit position.
    let endpoints =
        endpoints.map(|endpoint| endpoint.map_route(|route| route.wrap(session.clone())));
    crate::http::resource(path, endpoints)
}

/// [`resource`] for the test routes, which the OpenAPI document leaves out.
#[cfg(feature = "test-routes")]
pub fn undocumented_resource<const N: usize>(
    path: &str,
    methods: [(actix_web::http::Method, actix_web::Route); N],
    session: &SessionMiddleware,
) -> Resource<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    crate::http::undocumented_resource(path, methods).wrap(session.clone())
}

fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _req| json_error(err).into())
}

fn json_error(err: JsonPayloadError) -> ApiError {
    match err {
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType(
            "the body must be sent with Content-Type: application/json".to_owned(),
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::PayloadTooLarge(limit),
        JsonPayloadError::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")),
        other => ApiError::BadRequest(format!("unreadable body: {other}")),
    }
}

fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    let PathError::Deserialize(e) = err else {
        return ApiError::BadRequest("invalid path".to_owned()).into();
    };
    ApiError::BadRequest(format!("invalid path parameter: {e}")).into()
}

fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let QueryPayloadError::Deserialize(e) = err else {
        return ApiError::BadRequest("invalid query string".to_owned()).into();
    };
    ApiError::BadRequest(format!("invalid query string: {e}")).into()
}

/// The row of a `GET /<resources>/{id}` that `find` reads, or 404 `not_found` for the
/// `what` (`account`, `transfer`). No row has an id <= 0: such ids get the 404 without a
/// connection being checked out.
pub async fn find_by_id<T>(
    session: &DbSession,
    what: &str,
    id: i64,
    find: impl AsyncFnOnce(&mut AsyncPgConnection, i64) -> QueryResult<Option<T>>,
) -> Result<web::Json<T>, ApiError> {
    let missing = || ApiError::NotFound(format!("{what} {id} does not exist"));
    if id <= 0 {
        return Err(missing());
    }
    let mut conn = session.conn().await?;
    find(&mut *conn, id)
        .await?
        .map(web::Json)
        .ok_or_else(missing)
}

/// `limit` of the list endpoints: 1..=1000, default 50 (contract section 3).
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    const DEFAULT: i64 = 50;
    const MAX: i64 = 1000;
    match limit.unwrap_or(DEFAULT) {
        n @ 1..=MAX => Ok(n),
        _ => Err(ApiError::invalid("limit", "must be between 1 and 1000")),
    }
}

/// A page of a keyset-paginated list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The last item's id when the page is full (a following page may be empty), else `null`.
    #[schema(required = true)]
    pub next_after_id: Option<i64>,
}

impl<T> Page<T> {
    /// Builds the page; `id` reads an item's id.
    pub fn new(items: Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> Self {
        let full = i64::try_from(items.len()).is_ok_and(|n| n == limit);
        let next_after_id = if full { items.last().map(id) } else { None };
        Page {
            items,
            next_after_id,
        }
    }
}
