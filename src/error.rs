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
use diesel::result::DatabaseErrorKind;
use serde::Serialize;
use tokio_postgres::error::SqlState;

use crate::db::pool::PoolError;
use crate::request_id;

/// The content type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

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
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::Error as E;
        match error {
            E::NotFound => ApiError::NotFound("not found".to_owned()),
            E::DatabaseError(kind, ref info) => {
                let class = match diesel_async::pg::sql_state(info.as_ref()) {
                    Some(code) => classify_sql_state(&code),
                    None => classify_kind(kind),
                };
                match class {
                    Some(ApiError::DatabaseUnavailable(text)) => {
                        // The cause matters to an operator; the client sees `text` only.
                        log::warn!("database unavailable: {}", info.message());
                        ApiError::DatabaseUnavailable(text)
                    }
                    Some(class) => class,
                    None => ApiError::internal(&error),
                }
            }
            // COMMIT failed and so did the ROLLBACK after it: the COMMIT's error is the
            // reason (a lost connection fails both).
            E::RollbackErrorOnCommit { commit_error, .. } => ApiError::from(*commit_error),
            other => ApiError::internal(other),
        }
    }
}

/// The contract's class (section 1) of a server error, by its SQLSTATE alone: the message
/// follows the server's `lc_messages` and is never read. `None`: anything else, `internal`.
fn classify_sql_state(code: &SqlState) -> Option<ApiError> {
    let unavailable = |text: &str| Some(ApiError::DatabaseUnavailable(text.to_owned()));
    match *code {
        // 40001, 40P01
        SqlState::T_R_SERIALIZATION_FAILURE | SqlState::T_R_DEADLOCK_DETECTED => {
            Some(ApiError::TransactionConflict)
        }
        // 57014 (statement_timeout, or a cancel request), 55P03 (lock_timeout, NOWAIT)
        SqlState::QUERY_CANCELED | SqlState::LOCK_NOT_AVAILABLE => Some(ApiError::Timeout),
        // 57P01..57P03: the server is going away, or is not up yet.
        SqlState::ADMIN_SHUTDOWN | SqlState::CRASH_SHUTDOWN | SqlState::CANNOT_CONNECT_NOW => {
            unavailable("the database connection failed")
        }
        // 25006: a failover to a standby (or a server set read-only), not the request's
        // fault, and worth retrying once the primary is back.
        SqlState::READ_ONLY_SQL_TRANSACTION => unavailable("the database is read-only right now"),
        // Class 08, connection exception.
        _ if code.code().starts_with("08") => unavailable("the database connection failed"),
        _ => None,
    }
}

/// The class of an error that carries no SQLSTATE: diesel-async reports a failure to
/// reach the server (closed connection, I/O error) as `UnableToSendCommand` with a text.
fn classify_kind(kind: DatabaseErrorKind) -> Option<ApiError> {
    match kind {
        DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => Some(
            ApiError::DatabaseUnavailable("the database connection failed".to_owned()),
        ),
        _ => None,
    }
}

impl From<PoolError> for ApiError {
    fn from(error: PoolError) -> Self {
        use deadpool::managed::PoolError as P;
        match error {
            P::Timeout(kind) => {
                log::warn!("no database connection: pool timeout ({kind:?})");
                ApiError::DatabaseUnavailable(
                    "no database connection became available in time".to_owned(),
                )
            }
            P::Backend(e) => {
                log::warn!("cannot connect to the database: {e}");
                ApiError::DatabaseUnavailable("the database cannot be reached".to_owned())
            }
            P::Closed => ApiError::DatabaseUnavailable("the service is shutting down".to_owned()),
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use diesel::result::{DatabaseErrorKind, Error};

    use super::*;

    /// What diesel-async reports when the connection is gone: no SQLSTATE, a text only.
    fn lost_connection() -> Error {
        Error::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand,
            Box::new("connection closed".to_owned()),
        )
    }

    #[test]
    fn an_error_without_a_server_answer_is_classified_by_its_kind() {
        assert_eq!(
            ApiError::from(lost_connection()).code(),
            "database_unavailable"
        );
        let closed = Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("deadlock detected".to_owned()),
        );
        assert_eq!(ApiError::from(closed).code(), "database_unavailable");
        // The text is never read: an English deadlock message without a code stays internal.
        let unknown = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("deadlock detected".to_owned()),
        );
        assert_eq!(ApiError::from(unknown).code(), "internal");
    }

    #[test]
    fn a_commit_whose_rollback_also_failed_is_classified_by_the_commit_error() {
        let error = Error::RollbackErrorOnCommit {
            rollback_error: Box::new(Error::BrokenTransactionManager),
            commit_error: Box::new(lost_connection()),
        };
        assert_eq!(ApiError::from(error).code(), "database_unavailable");
    }

    #[test]
    fn every_connection_exception_is_database_unavailable() {
        for code in ["08000", "08001", "08003", "08004", "08006", "08P01"] {
            let class = classify_sql_state(&SqlState::from_code(code));
            assert_eq!(
                class.map(|e| e.code()),
                Some("database_unavailable"),
                "{code}"
            );
        }
        assert!(classify_sql_state(&SqlState::from_code("0A000")).is_none());
    }
}
