//! [`SessionError`], the one error type of the session layer.
//!
//! Policy: a variant per thing a client must be told differently (come back later, the
//! write may or may not have happened, a bug), never per internal cause. Causes are logged
//! where they happen (with the `log` crate), and texts a client may see name no SQL, no
//! host and no credential. The application renders the error its own way, through
//! [`crate::DatabaseBuilder::render_errors`] for the responses the middleware makes and
//! through its own `From<SessionError>` for the errors its handlers pass on; the default
//! rendering ([`actix_web::ResponseError`]) is a plain-text body with the status below.

use std::borrow::Cow;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use diesel::result::DatabaseErrorKind;
use tokio_postgres::error::SqlState;

/// The text of a check-out that did not complete within the check-out timeout.
pub const NO_CONNECTION_IN_TIME: &str = "no database connection became available in time";
/// The text of a connection lost before its transaction committed.
pub const LOST_BEFORE_COMMIT: &str =
    "the connection to the database was lost before the transaction committed";
/// The `Retry-After` (seconds) of the default rendering's 503s.
pub const RETRY_AFTER_SECS: u32 = 1;

/// What went wrong with a request's database session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No connection in time, the database cannot be reached, the pool is closed, or the
    /// connection was lost before the transaction committed. The text is safe to show.
    /// 503.
    #[error("{0}")]
    Unavailable(Cow<'static, str>),
    /// The database aborted the transaction because of a concurrent one (SQLSTATE 40001
    /// serialization failure, 40P01 deadlock). Nothing was committed; retrying may work.
    /// 503.
    #[error("the database aborted the transaction because of a concurrent one")]
    Conflict,
    /// A statement ran past the server's `statement_timeout` or `lock_timeout` (57014,
    /// 55P03), or past the session's client-side deadline (the database stopped
    /// answering). 503.
    #[error("a database statement took too long")]
    Timeout,
    /// The COMMIT's answer was lost and the server could not be asked in time whether the
    /// transaction committed: the write may or may not have happened. 503.
    #[error(
        "the database connection was lost during COMMIT and the outcome could not be learned; \
         the write may or may not have been applied"
    )]
    CommitUnknown,
    /// Any other database error (a constraint, a bug in a query, a deferred constraint
    /// violated at COMMIT): the application decides what it means. 500 by default.
    #[error(transparent)]
    Database(diesel::result::Error),
    /// A programming error or an inconsistency the session refused to commit (a statement
    /// failed but the handler answered success; a connection guard outlived its handler;
    /// a handler panicked; the middleware is missing). The text is for logs. 500.
    #[error("{0}")]
    Internal(Cow<'static, str>),
}

impl SessionError {
    /// An [`SessionError::Unavailable`] with this text.
    pub fn unavailable(text: impl Into<Cow<'static, str>>) -> Self {
        SessionError::Unavailable(text.into())
    }

    /// An [`SessionError::Internal`] with this text.
    pub fn internal(text: impl Into<Cow<'static, str>>) -> Self {
        SessionError::Internal(text.into())
    }

    /// Whether the server's answer says the transaction was aborted by a concurrent one
    /// (40001, 40P01).
    pub fn is_conflict(&self) -> bool {
        matches!(self, SessionError::Conflict)
    }
}

impl From<diesel::result::Error> for SessionError {
    /// Classifies a database error by its SQLSTATE alone (the message follows the server's
    /// `lc_messages` and is never read); errors without one (no server answer) by diesel's
    /// kind.
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::Error as E;
        match error {
            E::DatabaseError(kind, ref info) => {
                let class = match diesel_async::pg::sql_state(info.as_ref()) {
                    Some(code) => classify_sql_state(&code),
                    None => classify_kind(kind),
                };
                match class {
                    Some(SessionError::Unavailable(text)) => {
                        // The cause matters to an operator; the client sees `text` only.
                        log::warn!("database unavailable: {}", info.message());
                        SessionError::Unavailable(text)
                    }
                    Some(class) => class,
                    None => SessionError::Database(error),
                }
            }
            // COMMIT failed and so did the ROLLBACK after it: the COMMIT's error is the
            // reason (a lost connection fails both).
            E::RollbackErrorOnCommit { commit_error, .. } => SessionError::from(*commit_error),
            other => SessionError::Database(other),
        }
    }
}

/// The class of a server error by its SQLSTATE; `None`: anything else.
fn classify_sql_state(code: &SqlState) -> Option<SessionError> {
    let unavailable = |text: &'static str| Some(SessionError::unavailable(text));
    match *code {
        // 40001, 40P01
        SqlState::T_R_SERIALIZATION_FAILURE | SqlState::T_R_DEADLOCK_DETECTED => {
            Some(SessionError::Conflict)
        }
        // 57014 (statement_timeout, or a cancel request), 55P03 (lock_timeout, NOWAIT)
        SqlState::QUERY_CANCELED | SqlState::LOCK_NOT_AVAILABLE => Some(SessionError::Timeout),
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

/// Whether `error` says the connection broke, rather than that the server refused a
/// statement: a connection exception (class 08), the server ending the session (57P01
/// admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 57P04 database
/// dropped: a standby ends a session so when replay drops its database or a conflict
/// cannot be resolved otherwise), or no answer at all (a closed connection, which
/// diesel-async reports without a SQLSTATE). Not 57014: a statement cancelled by its own
/// `statement_timeout` ran on a working connection.
pub(crate) fn connection_broke(error: &diesel::result::Error) -> bool {
    let diesel::result::Error::DatabaseError(kind, info) = error else {
        return false;
    };
    match diesel_async::pg::sql_state(info.as_ref()) {
        Some(code) => {
            code.code().starts_with("08")
                || matches!(
                    code,
                    SqlState::ADMIN_SHUTDOWN
                        | SqlState::CRASH_SHUTDOWN
                        | SqlState::CANNOT_CONNECT_NOW
                        | SqlState::DATABASE_DROPPED
                )
        }
        None => classify_kind(*kind).is_some(),
    }
}

/// The class of an error that carries no SQLSTATE: diesel-async reports a failure to
/// reach the server (closed connection, I/O error) as `UnableToSendCommand` with a text.
fn classify_kind(kind: DatabaseErrorKind) -> Option<SessionError> {
    match kind {
        DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => {
            Some(SessionError::unavailable("the database connection failed"))
        }
        _ => None,
    }
}

impl From<crate::pool::PoolError> for SessionError {
    fn from(error: crate::pool::PoolError) -> Self {
        use deadpool::managed::PoolError as P;
        match error {
            P::Timeout(kind) => {
                log::warn!("no database connection: pool timeout ({kind:?})");
                SessionError::unavailable(NO_CONNECTION_IN_TIME)
            }
            P::Backend(e) => {
                log::warn!("cannot connect to the database: {e}");
                SessionError::unavailable("the database cannot be reached")
            }
            P::Closed => SessionError::unavailable("the service is shutting down"),
            other => SessionError::internal(other.to_string()),
        }
    }
}

impl ResponseError for SessionError {
    fn status_code(&self) -> StatusCode {
        match self {
            SessionError::Unavailable(_)
            | SessionError::Conflict
            | SessionError::Timeout
            | SessionError::CommitUnknown => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::Database(_) | SessionError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// A plain-text body: the error's text for a 503, a generic text for a 500 (whose
    /// cause is logged, never sent); `Retry-After` on a 503.
    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut response = HttpResponse::build(status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
            response.body(self.to_string())
        } else {
            log::error!("{self}");
            response.body("the server could not complete the request")
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
        assert!(matches!(
            SessionError::from(lost_connection()),
            SessionError::Unavailable(_)
        ));
        let closed = Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("deadlock detected".to_owned()),
        );
        assert!(matches!(
            SessionError::from(closed),
            SessionError::Unavailable(_)
        ));
        // The text is never read: an English deadlock message without a code is not a
        // conflict.
        let unknown = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("deadlock detected".to_owned()),
        );
        assert!(matches!(
            SessionError::from(unknown),
            SessionError::Database(_)
        ));
    }

    #[test]
    fn a_commit_whose_rollback_also_failed_is_classified_by_the_commit_error() {
        let error = Error::RollbackErrorOnCommit {
            rollback_error: Box::new(Error::BrokenTransactionManager),
            commit_error: Box::new(lost_connection()),
        };
        assert!(matches!(
            SessionError::from(error),
            SessionError::Unavailable(_)
        ));
    }

    #[test]
    fn every_connection_exception_is_unavailable() {
        for code in ["08000", "08001", "08003", "08004", "08006", "08P01"] {
            let class = classify_sql_state(&SqlState::from_code(code));
            assert!(
                matches!(class, Some(SessionError::Unavailable(_))),
                "{code}"
            );
        }
        assert!(classify_sql_state(&SqlState::from_code("0A000")).is_none());
    }

    #[test]
    fn a_broken_connection_is_no_refused_statement() {
        assert!(connection_broke(&lost_connection()));
        let refused = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("canceling statement due to statement timeout".to_owned()),
        );
        assert!(
            !connection_broke(&refused),
            "no SQLSTATE, not a lost connection"
        );
        assert!(!connection_broke(&Error::NotFound));
    }

    #[test]
    fn the_default_rendering_shows_no_cause_of_a_500() {
        let error = SessionError::internal("secret detail of a bug");
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let unavailable = SessionError::unavailable(NO_CONNECTION_IN_TIME).error_response();
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            unavailable.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from_static("1"))
        );
    }
}
