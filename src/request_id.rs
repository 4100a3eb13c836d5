//! `X-Request-Id`: every response carries one, problem bodies repeat it, log lines show it.
//!
//! The id lives in a Tokio task-local for as long as the request's future is polled, so
//! [`current`] works anywhere in the request's own code (error bodies, log lines through
//! the logger's format) without threading it through every signature. Work spawned onto
//! other tasks does not inherit it.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;

/// The header, in both directions.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied id we accept; longer ones are replaced.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request whose future is running now, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A client's id is kept when it is 1..=128 characters of letters, digits and `-_.:`, so it
/// cannot inject anything into logs or headers; otherwise a UUID is generated.
fn accept(value: Option<&HeaderValue>) -> String {
    value
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_LEN
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Middleware: assigns the id, runs the rest of the chain inside its scope and stamps the
/// response. (Handlers' errors are already responses here; an `Err` can only come from
/// middleware and passes through unstamped.)
pub async fn assign(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = accept(req.headers().get(&HEADER));
    let mut response = REQUEST_ID.scope(id.clone(), next.call(req)).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    Ok(response)
}
