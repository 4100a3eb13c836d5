//! `Consistency-Token` (contract section 10): read-your-writes across replicas and pods.
//!
//! - Every 2xx answer to a write (idempotent replays included) carries the primary's WAL
//!   insert position read right after its COMMIT, in the same round trip (the session layer's
//!   `CommitPosition`, which the write routes' session middleware asks for), in
//!   PostgreSQL's text form, e.g. `0/16B3748`: at or past the write's commit record.
//! - A request that sends one back gets it as the session layer's `ReadAfter`: its read
//!   runs on a replica only if that replica's last measured replay position is at or past
//!   it, otherwise on the primary. Without replicas it changes nothing.
//! - A token that does not match `^[0-9A-F]{1,8}/[0-9A-F]{1,8}$` is 400 `bad_request`,
//!   before any handler runs, on every documented route (a client that sends a broken
//!   token has a bug worth hearing about). The check wraps each route, not the app (see
//!   `crate::http::resource`): routing comes first, so an unknown path is still 404 and
//!   an undeclared method 405.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, ResponseError};

use actix_diesel_session::{CommitPosition, Lsn, ReadAfter};

use crate::error::ApiError;

/// The header, in both directions.
pub const HEADER: HeaderName = HeaderName::from_static("consistency-token");

/// Middleware: turns a request's token into `ReadAfter` (or a 400), and a committed
/// write's position into the response's token.
pub async fn token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if let Some(value) = req.headers().get(&HEADER) {
        match value.to_str().ok().and_then(Lsn::parse) {
            Some(lsn) => {
                req.extensions_mut().insert(ReadAfter(lsn));
            }
            None => {
                let error = ApiError::BadRequest(
                    "Consistency-Token must be a WAL position as a write's answer gave it, \
                     e.g. 0/16B3748"
                        .to_owned(),
                );
                return Ok(req.into_response(error.error_response()));
            }
        }
    }
    let mut response = next.call(req).await?.map_into_boxed_body();
    let position = response
        .response()
        .extensions()
        .get::<CommitPosition>()
        .copied();
    if let Some(CommitPosition(lsn)) = position {
        if response.status().is_success() {
            if let Ok(value) = HeaderValue::from_str(&lsn.to_string()) {
                response.headers_mut().insert(HEADER, value);
            }
        }
    }
    Ok(response)
}
