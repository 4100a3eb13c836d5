//! `DbSession`: one connection and one transaction per request, finalized by middleware.
//!
//! # The commit rule
//! - A handler that takes a [`DbSession`] gets, on its first [`DbSession::conn`] call, a
//!   pooled connection with a transaction open (check-out plus `BEGIN`, together bounded by
//!   the check-out timeout). Nothing is checked out at extraction: Actix resolves extractors
//!   concurrently, and an eager session would hold a transaction open while a slow client
//!   uploads its body, or for a request that then fails validation.
//! - The [`SessionMiddleware`] runs after the handler and before the response leaves:
//!   status < 400 commits, anything else rolls back, and so do handler errors and panics
//!   (which it catches and answers with a 500). If `COMMIT` fails, the client gets a 5xx
//!   instead of the handler's answer. If a statement failed inside the transaction and the
//!   handler answered success anyway, the session refuses to commit (PostgreSQL would turn
//!   the `COMMIT` into a silent `ROLLBACK`) and answers 500; see `watch` for the one
//!   kind of swallowed error it cannot see (handlers must propagate database errors).
//! - COMMIT is only sent when the connection is at the top level of the transaction with
//!   no statement unanswered. A nested unit of work cut short (a panic inside it, a
//!   handler's own timeout around it) or a statement future dropped mid-flight leaves the
//!   transaction in an unknown state: the request gets a 500, nothing commits, and the
//!   connection is closed rather than rolled back level by level.
//! - If the request future is dropped mid-transaction (shutdown timeout, worker restart),
//!   the transaction is rolled back in a spawned task; whenever a rollback cannot be done,
//!   the connection is detached from the pool and closed, so the server ends the
//!   transaction. A connection goes back to the pool only once a `COMMIT` or `ROLLBACK` of
//!   the whole transaction was answered by the server (a refused COMMIT ends the
//!   transaction too), and only if diesel then reports it clean (no
//!   transaction open, transaction manager not broken, socket open); [`TxConn`] enforces
//!   that by construction.
//! - One request, one connection: every `DbSession` of a request is the same session, and
//!   nothing here checks out a second connection (hold-and-wait deadlocks the pool under
//!   load). Nested `conn.transaction(..)` calls become savepoints through diesel's
//!   transaction manager, which also keeps the connection's transaction state truthful.
//! - Time bounds: the check-out timeout bounds check-out plus `BEGIN`, and
//!   resolving a lost COMMIT answer, nothing else. A handler's statement, its rows
//!   included, is bounded on the client side by the statement timeout plus a margin (none
//!   without a statement timeout: it may run, or wait for a lock, as long as the server
//!   lets it). The session's own statements (COMMIT, ROLLBACK, the clean-up of an abandoned
//!   request) are bounded by that deadline, or without a statement timeout by
//!   the idle-in-transaction timeout plus the margin (60 s without either), so that they end even
//!   when the server went silent (TCP still acknowledged, so keepalives never fire). Past the bound the work is dropped, the connection is
//!   closed (with a cancel request for a statement still running: the server would
//!   otherwise keep running it and holding its locks) and the client gets [`SessionError::Timeout`].
//!   A live server's own `statement_timeout` normally fires first, answering [`SessionError::Timeout`]
//!   with the connection kept. One timer per request, run by the middleware, keeps this
//!   deadline, the check-out deadline and the leak warning.
//! - A COMMIT whose answer is lost (connection broken or ended by the server, or the
//!   COMMIT's deadline passed) is resolved before the client is answered (`commit`):
//!   the transaction's id travels with the COMMIT, and the server is asked on another
//!   connection whether it committed: the handler's response if it did, [`SessionError::Unavailable`] if not, [`SessionError::CommitUnknown`] if that cannot be learned within
//!   the check-out timeout.
//! - The guard returned by [`DbSession::conn`] must not outlive the handler. If it does
//!   (moved into a spawned local task), the response becomes a 500 and the transaction is
//!   rolled back when the guard is finally dropped: a late write can never be committed.
//! - Do side effects that are not database writes (calls to other services, messages)
//!   after the handler's writes are committed, i.e. not inside the handler, or accept that
//!   they may happen for a request that rolls back.

mod commit;
mod deadline;
mod finalize;
mod options;
mod retry;
mod settings;
mod slot;
mod tx;
mod watch;

use std::future::{ready, Ready};
use std::ops::{Deref, DerefMut};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use diesel_async::AsyncPgConnection;

pub use self::finalize::{SessionMiddleware, SessionService};
pub use self::options::Isolation;
pub use self::retry::Retry;
pub use self::settings::ErrorRenderer;
pub(crate) use self::settings::Settings;
use self::slot::{Slot, State};
use self::tx::{abandon, TxConn};
use crate::error::SessionError;
use crate::observe::{Outcome, Reason};

/// The request's database session. Extracting it is free; see the module docs.
///
/// ```no_run
/// use actix_diesel_session::{DbSession, SessionError};
/// use diesel_async::RunQueryDsl;
///
/// async fn handler(db: DbSession) -> Result<String, SessionError> {
///     let mut conn = db.conn().await?;
///     diesel::sql_query("INSERT INTO events DEFAULT VALUES")
///         .execute(&mut *conn)
///         .await?;
///     // Committed by the middleware before this response leaves.
///     Ok("recorded".to_owned())
/// }
/// ```
pub struct DbSession {
    slot: Slot,
}

impl FromRequest for DbSession {
    type Error = SessionError;
    type Future = Ready<Result<Self, SessionError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Slot>()
                .cloned()
                .map(|slot| {
                    slot.remember(req);
                    DbSession { slot }
                })
                .ok_or_else(|| {
                    SessionError::internal("DbSession used without the session middleware")
                }),
        )
    }
}

impl DbSession {
    /// The request's connection, inside its transaction. The first call checks out and
    /// begins (bounded by the check-out timeout: [`SessionError::Unavailable`] after it);
    /// later calls return the same connection and transaction. Drop the guard before
    /// calling again; holding two at once is a programming error
    /// ([`SessionError::Internal`]).
    pub async fn conn(&self) -> Result<SessionConn, SessionError> {
        let previous = self.slot.replace(State::Busy);
        let tx = match previous {
            State::Open(tx) => tx,
            State::Idle => {
                // If this future is dropped mid-way (a handler's own timeout around
                // `conn()`), the slot goes back to Idle; the half-made TxConn closes its
                // connection as it drops.
                let mut opening = BackToIdle(&self.slot, true);
                let tx = self.slot.open().await?;
                opening.1 = false;
                tx
            }
            other @ (State::Busy | State::Finalized) => {
                self.slot.replace(other);
                return Err(SessionError::internal(
                    "DbSession::conn called while the connection is in use or after the request ended",
                ));
            }
        };
        Ok(SessionConn {
            slot: self.slot.clone(),
            tx: Some(tx),
        })
    }
}

impl DbSession {
    /// Sets `name` to `value` for the rest of the transaction (`SET LOCAL`, as
    /// `set_config(name, value, true)`): gone when it ends, so it never reaches the next
    /// user of the connection, even behind a pooler. Called before the session's first
    /// [`DbSession::conn`], it goes out in the same message as the `BEGIN` (no round trip
    /// added); called later, it is one statement of its own. The value is sent as an
    /// escaped literal or a bound parameter, never spliced into SQL.
    ///
    /// ```no_run
    /// # use actix_diesel_session::{DbSession, SessionError};
    /// async fn handler(db: DbSession) -> Result<&'static str, SessionError> {
    ///     db.set_local("app.tenant_id", "42").await?;
    ///     let _conn = db.conn().await?; // BEGIN; SELECT set_config('app.tenant_id', '42', true)
    ///     Ok("row-level security sees tenant 42")
    /// }
    /// ```
    pub async fn set_local(&self, name: &str, value: &str) -> Result<(), SessionError> {
        if self.slot.is_idle() {
            self.slot
                .local
                .borrow_mut()
                .push((name.to_owned(), value.to_owned()));
            return Ok(());
        }
        use diesel::sql_types::Text;
        use diesel_async::RunQueryDsl;
        let mut conn = self.conn().await?;
        diesel::sql_query("SELECT set_config($1, $2, true)")
            .bind::<Text, _>(name)
            .bind::<Text, _>(value)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Runs `hook` once the transaction has committed, and never when it rolls back or
    /// its outcome is unknown: the place for side effects that are not database writes
    /// (a message, a call to another service). Hooks run in the order they were added,
    /// after the COMMIT and **before the response is sent**, all together bounded by
    /// [`crate::SessionConfig::after_commit_timeout`]: so a client that has the response
    /// knows the hooks have run (or were cut off), and a graceful shutdown, which waits
    /// for requests in flight, never loses one. A hook's error or panic is logged and
    /// never changes the response. A request without a transaction that succeeds runs
    /// its hooks too; a request dropped before its response is ready drops them.
    ///
    /// ```no_run
    /// # use actix_diesel_session::{DbSession, SessionError};
    /// async fn handler(db: DbSession) -> Result<&'static str, SessionError> {
    ///     // ... writes through db.conn() ...
    ///     db.after_commit(|| async {
    ///         // notify another service; runs only if the writes committed
    ///         Ok::<(), std::io::Error>(())
    ///     });
    ///     Ok("done")
    /// }
    /// ```
    pub fn after_commit<F, Fut, E>(&self, hook: F)
    where
        F: FnOnce() -> Fut + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + 'static,
        E: std::fmt::Display,
    {
        self.slot.add_hook(Box::new(move || {
            Box::pin(async move { hook().await.map_err(|e| e.to_string()) })
        }));
    }

    /// Commits the transaction now, before the handler's response: the response can then
    /// no longer roll it back, and the middleware has nothing more to do. Later use of the
    /// session is an error ([`SessionError::Internal`]). Drop the connection guard first.
    /// A lost COMMIT answer is resolved here, as the middleware would.
    pub async fn commit(&self) -> Result<(), SessionError> {
        self.slot.commit_now().await
    }
}

/// Puts a slot that is `Busy` opening a connection back to `Idle` when dropped armed.
struct BackToIdle<'a>(&'a Slot, bool);

impl Drop for BackToIdle<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.back_to_idle();
        }
    }
}

/// The handler's borrow of the session connection; dereferences to
/// `&mut AsyncPgConnection`. Dropping it parks the connection for the next use or for
/// the middleware.
pub struct SessionConn {
    slot: Slot,
    tx: Option<TxConn>,
}

impl SessionConn {
    #[expect(clippy::expect_used, reason = "`tx` is only emptied in Drop")]
    fn tx(&mut self) -> &mut TxConn {
        self.tx.as_mut().expect("SessionConn used after drop")
    }
}

impl Deref for SessionConn {
    type Target = AsyncPgConnection;

    #[expect(
        clippy::expect_used,
        reason = "`tx` and its connection are only emptied in Drop"
    )]
    fn deref(&self) -> &AsyncPgConnection {
        self.tx
            .as_ref()
            .and_then(TxConn::conn_ref)
            .expect("SessionConn used after drop")
    }
}

impl DerefMut for SessionConn {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        self.tx().connection()
    }
}

impl Drop for SessionConn {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        if let Some(tx) = self.slot.park(tx) {
            // The request is over (or the session was torn down under us): never commit
            // late work, roll it back.
            let settings = &self.slot.settings;
            settings
                .observer
                .transaction_ended(Outcome::RolledBack(Reason::Cancelled));
            abandon(tx, settings.finish_deadline);
        }
    }
}
