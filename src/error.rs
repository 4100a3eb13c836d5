//! `ApiError`, the one error type of the service, and its problem+json form (RFC 9457).
//!
//! Every error response except the health endpoints' goes through here, so the body shape,
//! the `code` table of contract section 1 and the rule "no credentials, SQL or stack traces
//! in a body" are enforced in one place. Causes are logged (with the request id), never
//! sent.

use std::fmt;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::request_id;
use actix_diesel_session::SessionError;

/// The content type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = actix_diesel_session::RETRY_AFTER_SECS;

/// One field that broke a rule, for `validation_failed` bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Everything that can go wrong in a request, one variant per contract code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("validation failed: {0:?}")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(Vec<Method>),
    #[error("{0}")]
    InsufficientFunds(String),
    #[error("the Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// No connection in time, or the database cannot be reached. The text is safe to show.
    #[error("{0}")]
    DatabaseUnavailable(String),
    /// The database aborted the transaction (serialization failure or deadlock).
    #[error("the database aborted the transaction because of a concurrent one")]
    TransactionConflict,
    /// A statement ran past the statement timeout, or the database stopped answering.
    #[error("a database statement took too long")]
    Timeout,
    /// The answer to COMMIT was lost and the server could not be asked in time whether the
    /// transaction committed: the write may or may not have happened.
    #[error("the database connection was lost during COMMIT and the outcome could not be learned; the write may or may not have been applied")]
    CommitUnknown,
    /// Anything else. The cause is logged, the client sees a generic text.
    #[error("internal error: {0}")]
    Internal(String),
    /// An error of one item of a batch; the body names the item's index.
    #[error("item {index}: {error}")]
    AtIndex { index: usize, error: Box<ApiError> },
}

impl ApiError {
    /// An internal error whose cause is logged but never shown.
    pub fn internal(cause: impl fmt::Display) -> Self {
        ApiError::Internal(cause.to_string())
    }

    /// One failing field.
    pub fn invalid(field: &str, message: &str) -> Self {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }

    /// The machine-readable code of contract section 1.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Validation(_) => "validation_failed",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::InsufficientFunds(_) => "insufficient_funds",
            ApiError::IdempotencyConflict => "idempotency_conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::DatabaseUnavailable(_) => "database_unavailable",
            ApiError::TransactionConflict => "transaction_conflict",
            ApiError::Timeout => "timeout",
            ApiError::CommitUnknown => "commit_unknown",
            ApiError::Internal(_) => "internal",
            ApiError::AtIndex { error, .. } => error.code(),
        }
    }

    /// The text a client may see.
    fn detail(&self) -> String {
        match self {
            ApiError::Internal(_) => "the server could not complete the request".to_owned(),
            ApiError::Validation(errors) => {
                let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
                format!("invalid value for {}", fields.join(", "))
            }
            ApiError::MethodNotAllowed(allow) => format!(
                "this resource supports {}",
                allow
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ApiError::AtIndex { index, error } => format!("item {index}: {}", error.detail()),
            other => other.to_string(),
        }
    }

    fn log(&self) {
        match self {
            ApiError::Internal(cause) => log::error!("internal error: {cause}"),
            ApiError::DatabaseUnavailable(_)
            | ApiError::TransactionConflict
            | ApiError::Timeout
            | ApiError::CommitUnknown => {
                log::warn!("{}: {self}", self.code())
            }
            ApiError::AtIndex { error, .. } => error.log(),
            _ => {}
        }
    }
}

/// The RFC 9457 body.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    code: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InsufficientFunds(_) | ApiError::IdempotencyConflict => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::DatabaseUnavailable(_)
            | ApiError::TransactionConflict
            | ApiError::Timeout
            | ApiError::CommitUnknown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::AtIndex { error, .. } => error.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let status = self.status_code();
        let (errors, index) = match self {
            ApiError::Validation(errors) => (Some(errors.as_slice()), None),
            ApiError::AtIndex { index, error } => match error.as_ref() {
                ApiError::Validation(errors) => (Some(errors.as_slice()), Some(*index)),
                _ => (None, Some(*index)),
            },
            _ => (None, None),
        };
        let body = Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            code: self.code(),
            detail: self.detail(),
            request_id: request_id::current(),
            errors,
            index,
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
        }
        if let ApiError::MethodNotAllowed(allow) = self {
            let allow: Vec<&str> = allow.iter().map(Method::as_str).collect();
            response.insert_header((header::ALLOW, allow.join(", ")));
        }
        match serde_json::to_vec(&body) {
            Ok(bytes) => response.body(bytes),
            Err(_) => response.finish(),
        }
    }
}

impl From<diesel::result::Error> for ApiError {
    /// `NotFound` is the ledger's 404; every other error is classified by the session
    /// layer (by its SQLSTATE, see `actix_diesel_session::SessionError`).
    fn from(error: diesel::result::Error) -> Self {
        match error {
            diesel::result::Error::NotFound => ApiError::NotFound("not found".to_owned()),
            other => ApiError::from(SessionError::from(other)),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Unavailable(text) => ApiError::DatabaseUnavailable(text.into_owned()),
            SessionError::Conflict => ApiError::TransactionConflict,
            SessionError::Timeout => ApiError::Timeout,
            SessionError::CommitUnknown => ApiError::CommitUnknown,
            SessionError::Database(e) => ApiError::internal(e),
            SessionError::Internal(cause) => ApiError::internal(cause),
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    use super::*;

    #[test]
    fn a_lost_connection_is_database_unavailable_and_not_found_is_404() {
        let lost = Error::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand,
            Box::new("connection closed".to_owned()),
        );
        assert_eq!(ApiError::from(lost).code(), "database_unavailable");
        assert_eq!(ApiError::from(Error::NotFound).code(), "not_found");
        let unknown = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("deadlock detected".to_owned()),
        );
        assert_eq!(ApiError::from(unknown).code(), "internal");
    }
}
