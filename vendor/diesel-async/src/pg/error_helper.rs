use std::error::Error;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use diesel::result::DatabaseErrorInformation;
use diesel::ConnectionError;
use tokio_postgres::error::{DbError, Severity, SqlState};

pub(super) struct ErrorHelper(pub(super) tokio_postgres::Error);

impl From<ErrorHelper> for ConnectionError {
    fn from(postgres_error: ErrorHelper) -> Self {
        ConnectionError::CouldntSetupConfiguration(postgres_error.into())
    }
}

impl From<ErrorHelper> for diesel::result::Error {
    fn from(ErrorHelper(postgres_error): ErrorHelper) -> Self {
        from_tokio_postgres_error(Arc::new(postgres_error))
    }
}

pub(super) fn from_tokio_postgres_error(
    postgres_error: Arc<tokio_postgres::Error>,
) -> diesel::result::Error {
    use diesel::result::DatabaseErrorKind::*;
    use tokio_postgres::error::SqlState;

    match postgres_error.code() {
        Some(code) => {
            let kind = match *code {
                SqlState::UNIQUE_VIOLATION => UniqueViolation,
                SqlState::FOREIGN_KEY_VIOLATION => ForeignKeyViolation,
                SqlState::RESTRICT_VIOLATION => RestrictViolation,
                SqlState::EXCLUSION_VIOLATION => ExclusionViolation,
                SqlState::T_R_SERIALIZATION_FAILURE => SerializationFailure,
                SqlState::READ_ONLY_SQL_TRANSACTION => ReadOnlyTransaction,
                SqlState::NOT_NULL_VIOLATION => NotNullViolation,
                SqlState::CHECK_VIOLATION => CheckViolation,
                _ => Unknown,
            };

            diesel::result::Error::DatabaseError(
                kind,
                PostgresDbErrorWrapper::boxed(
                    postgres_error
                        .source()
                        .and_then(|e| e.downcast_ref::<tokio_postgres::error::DbError>().cloned())
                        .expect("It's a db error, because we've got a SQLState code above"),
                ),
            )
        }
        None => diesel::result::Error::DatabaseError(
            UnableToSendCommand,
            Box::new(postgres_error.to_string()),
        ),
    }
}

/// The SQLSTATE of a PostgreSQL error returned by [`AsyncPgConnection`](super::AsyncPgConnection).
///
/// [`DatabaseErrorKind`](diesel::result::DatabaseErrorKind) names only a few SQLSTATEs
/// and reports every other server error as `Unknown`, and `DatabaseErrorInformation` has
/// no method for the code. This gives it back, so that callers can tell, say, a deadlock
/// (`40P01`) or a statement timeout (`57014`) from other errors without reading the
/// message, whose text follows the server's `lc_messages`.
///
/// Returns `None` for information this crate's PostgreSQL connection did not create,
/// and for errors that carry no server response (a closed connection, for example, is
/// `DatabaseErrorKind::UnableToSendCommand` with a text only).
///
/// ```rust,no_run
/// # use diesel::result::Error;
/// use diesel_async::pg::sql_state;
/// use tokio_postgres::error::SqlState;
///
/// fn is_deadlock(error: &Error) -> bool {
///     matches!(error, Error::DatabaseError(_, info)
///         if sql_state(info.as_ref()) == Some(SqlState::T_R_DEADLOCK_DETECTED))
/// }
/// ```
pub fn sql_state(info: &dyn DatabaseErrorInformation) -> Option<SqlState> {
    let address = address_of(info);
    live_wrappers()
        .iter()
        .find(|(live, ..)| *live == address)
        .map(|(_, code, _)| code.clone())
}

/// The severity of a PostgreSQL error returned by [`AsyncPgConnection`](super::AsyncPgConnection),
/// as the server sent it in its non-localized form: `FATAL` and `PANIC` mean the server
/// ended the session (or itself) rather than just the statement. `None` as for
/// [`sql_state`], and for a server too old to send the non-localized severity.
pub fn severity(info: &dyn DatabaseErrorInformation) -> Option<Severity> {
    let address = address_of(info);
    live_wrappers()
        .iter()
        .find(|(live, ..)| *live == address)
        .and_then(|(.., severity)| *severity)
}

/// The SQLSTATE of every live [`PostgresDbErrorWrapper`], by the wrapper's address.
///
/// `DatabaseErrorInformation` has no `Any` supertrait, so a boxed wrapper cannot be
/// downcast; its address identifies it instead. A wrapper is only ever created in a box
/// (`PostgresDbErrorWrapper::boxed`) and cannot be moved out of it once the box is a
/// trait object, so the address is its own for as long as it lives: no other live
/// `DatabaseErrorInformation` can have it (a zero-sized one has a dangling address, and
/// the wrapper's field does not implement the trait). `Drop` removes the entry. Errors
/// are few and short-lived: a short list and a lock per error are enough, and no
/// `unsafe` is needed.
static LIVE_WRAPPERS: Mutex<Vec<(usize, SqlState, Option<Severity>)>> = Mutex::new(Vec::new());

fn live_wrappers() -> MutexGuard<'static, Vec<(usize, SqlState, Option<Severity>)>> {
    // The list stays consistent whatever panicked while holding the lock.
    LIVE_WRAPPERS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn address_of<T: ?Sized>(value: &T) -> usize {
    (value as *const T).cast::<()>().addr()
}

// Not zero-sized (the address would not be unique) and never constructed outside `boxed`.
struct PostgresDbErrorWrapper(DbError);

impl PostgresDbErrorWrapper {
    fn boxed(error: DbError) -> Box<dyn DatabaseErrorInformation + Send + Sync> {
        let (code, severity) = (error.code().clone(), error.parsed_severity());
        let wrapper = Box::new(PostgresDbErrorWrapper(error));
        live_wrappers().push((address_of(&*wrapper), code, severity));
        wrapper
    }
}

impl Drop for PostgresDbErrorWrapper {
    fn drop(&mut self) {
        let address = address_of(self);
        let mut live = live_wrappers();
        if let Some(index) = live.iter().position(|(live, ..)| *live == address) {
            live.swap_remove(index);
        }
    }
}

impl diesel::result::DatabaseErrorInformation for PostgresDbErrorWrapper {
    fn message(&self) -> &str {
        self.0.message()
    }

    fn details(&self) -> Option<&str> {
        self.0.detail()
    }

    fn hint(&self) -> Option<&str> {
        self.0.hint()
    }

    fn table_name(&self) -> Option<&str> {
        self.0.table()
    }

    fn column_name(&self) -> Option<&str> {
        self.0.column()
    }

    fn constraint_name(&self) -> Option<&str> {
        self.0.constraint()
    }

    fn statement_position(&self) -> Option<i32> {
        use tokio_postgres::error::ErrorPosition;
        self.0.position().and_then(|e| match *e {
            ErrorPosition::Original(position) | ErrorPosition::Internal { position, .. } => {
                position.try_into().ok()
            }
        })
    }
}
