//! [`TxConn`]: a pooled connection whose transaction may be open, and the COMMIT and
//! ROLLBACK that end it.
//!
//! The only ways to give the connection back to the pool are a [`TxConn::commit`] or
//! [`TxConn::rollback`] that the server answered (a COMMIT it refused ends the transaction
//! too), and then only if diesel reports the connection clean. Dropping a `TxConn` in any
//! other state detaches the connection from the pool and closes it, which makes the server
//! roll back: a connection can never re-enter the pool inside a transaction, whatever path
//! (error, panic, cancellation) got us here.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};

use super::commit::{self, CommitError, Detached, TxId};
use super::settings::Settings;
use super::watch::{StatementWatch, WatchHandle};
use crate::error::{SessionError, LOST_BEFORE_COMMIT};
use crate::observe::{CloseReason, TimeoutKind};
use crate::pool::PooledConnection;
use crate::replica::Lsn;

/// A pooled connection whose transaction may be open; see the module docs.
pub(crate) struct TxConn {
    /// Boxed: the connection is large, and a `TxConn` moves between the session's slot and
    /// the handler's guard at every use.
    conn: Option<Box<PooledConnection>>,
    pub(crate) watch: WatchHandle,
    /// When the connection was checked out; the use time is reported when the `TxConn`
    /// drops (the connection went back to the pool or was closed).
    pub(crate) checked_out: Instant,
    /// For the observer and the cancel request sent when the connection is closed with a
    /// statement running.
    settings: Arc<Settings>,
}

/// The COMMIT's side of the request's state, which the middleware's timer and the
/// verification of a lost answer read.
#[derive(Default)]
pub(crate) struct CommitState {
    /// Set while the COMMIT statement is under way: it is then bounded by the finish
    /// deadline, and a COMMIT cut off by it is resolved as a lost answer.
    pub(crate) committing: Cell<bool>,
    /// Set once the COMMIT has been sent (`committing` is set before the transaction-id
    /// query a connection's first COMMIT waits for): only a COMMIT sent can be in doubt.
    pub(crate) sent: Cell<bool>,
    /// The transaction's identity, learned during COMMIT.
    pub(crate) xid: RefCell<TxId>,
    /// The connection of a COMMIT whose answer was lost, kept for the verification.
    pub(crate) in_doubt: RefCell<Option<Detached>>,
}

/// What must happen after a session ended badly.
pub(crate) enum Finish {
    /// The response is replaced by this error.
    Failed(SessionError),
    /// The COMMIT's answer was lost: the outcome must be resolved before answering.
    AnswerLost,
}

impl TxConn {
    /// Checks a connection out and begins a transaction. Not bounded here: the session
    /// puts the check-out timeout over it (see `deadline::Deadlines::checkout`).
    /// `begin` is the session's `BEGIN` statement (with its options, and any
    /// transaction-local settings in the same message).
    pub(crate) async fn begin(
        settings: &Arc<Settings>,
        begin: &str,
    ) -> Result<TxConn, SessionError> {
        let started = Instant::now();
        let mut conn = match settings.pool.get().await {
            Ok(conn) => conn,
            Err(e) => {
                if let deadpool::managed::PoolError::Timeout(kind) = &e {
                    settings.observer.checkout_timed_out(match kind {
                        deadpool::managed::TimeoutType::Wait => TimeoutKind::Wait,
                        deadpool::managed::TimeoutType::Create => TimeoutKind::Create,
                        deadpool::managed::TimeoutType::Recycle => TimeoutKind::Recycle,
                    });
                }
                return Err(e.into());
            }
        };
        let checked_out = Instant::now();
        settings.observer.checkout_waited(checked_out - started);
        let handle = StatementWatch::attach(&mut conn, settings.echo);
        // From here on, dropping `tx` (error, timeout, cancellation) closes the connection
        // instead of pooling it: BEGIN may have reached the server.
        let mut tx = TxConn {
            conn: Some(Box::new(conn)),
            watch: handle,
            checked_out,
            settings: settings.clone(),
        };
        if begin == "BEGIN" {
            AnsiTransactionManager::begin_transaction(tx.connection()).await?;
        } else {
            AnsiTransactionManager::begin_transaction_sql(tx.connection(), begin).await?;
        }
        Ok(tx)
    }

    /// The connection, for the handler's guard.
    pub(crate) fn conn_ref(&self) -> Option<&AsyncPgConnection> {
        self.conn.as_deref().map(|conn| &**conn)
    }

    #[expect(
        clippy::expect_used,
        reason = "`conn` is only emptied by `release` and `detach`, which consume the TxConn"
    )]
    pub(crate) fn connection(&mut self) -> &mut AsyncPgConnection {
        self.conn.as_mut().expect("TxConn used after release")
    }

    /// True when the connection sits at the top level of the request's transaction with
    /// no statement unanswered: the only state in which one COMMIT or ROLLBACK ends the
    /// whole transaction. A nested unit of work interrupted by a panic or a dropped future
    /// leaves diesel's depth above 1 (COMMIT would only release a savepoint), and a
    /// statement future dropped mid-flight leaves its outcome unknown.
    fn at_top_level(&mut self) -> bool {
        if self.watch.in_flight_since().is_some() {
            return false;
        }
        let status = AnsiTransactionManager::transaction_manager_status_mut(self.connection());
        matches!(status.transaction_depth(), Ok(Some(depth)) if depth.get() == 1)
    }

    /// Commits, learning the transaction's id on the way (see `session::commit`). On
    /// success, or when the server refused the COMMIT (which ended the transaction), the
    /// connection returns to the pool; on any other failure it is closed, and the
    /// error says what the client gets, or that the answer was lost and the outcome must be
    /// resolved. The COMMIT itself is bounded by the session's finish deadline, which the
    /// middleware keeps running around it; a rollback instead of it (aborted transaction)
    /// by `timeout`.
    ///
    /// `state.committing` is set while the COMMIT statement is under way, `state.xid` gets
    /// the transaction's identity as soon as it is known, and `state.in_doubt` the
    /// connection when the COMMIT's answer is lost (here, or because this future is
    /// dropped mid-COMMIT by the deadline): the verification uses its place in the pool.
    ///
    /// With `position`, the primary's WAL insert position is read on the same connection,
    /// pipelined behind the COMMIT (see `session::commit`), and stored there. A failure
    /// leaves it empty and is logged; the COMMIT stands.
    pub(crate) async fn commit(
        mut self,
        timeout: Duration,
        state: &CommitState,
        read_only: bool,
        position: Option<&Cell<Option<Lsn>>>,
    ) -> Result<(), Finish> {
        if !self.at_top_level() {
            // Dropping `self` closes the connection: the server rolls everything back.
            log::error!("not committing: a nested unit of work or a statement was left unfinished");
            return Err(Finish::Failed(SessionError::internal(
                "the transaction was left unfinished (interrupted nested unit of work or abandoned statement)",
            )));
        }
        if self.watch.transaction_aborted() {
            self.rollback(timeout).await;
            return Err(Finish::Failed(swallowed_error()));
        }
        state.committing.set(true);
        // Without the statement cache the id query is prepared anew at every COMMIT, a
        // round trip during which a pipelined COMMIT would overtake it: never pipeline.
        let prepared = self.settings.statement_cache && self.watch.xid_prepared();
        let mut this = InDoubt {
            tx: self,
            state,
            armed: true,
        };
        let result = if read_only {
            // A read-only transaction has no id to learn (it cannot write).
            commit::commit_alone(this.tx.connection(), &state.xid, &state.sent).await
        } else {
            commit::commit(
                this.tx.connection(),
                &state.xid,
                prepared,
                &state.sent,
                position,
            )
            .await
        };
        this.armed = false;
        let this = &mut this.tx;
        state.committing.set(false);
        if *state.xid.borrow() != TxId::Unknown {
            this.watch.set_xid_prepared();
        }
        match result {
            Ok(()) => {
                this.release();
                Ok(())
            }
            Err(CommitError::WasRollback(e)) => {
                log::error!("the transaction id query failed ({e}); COMMIT rolled back");
                this.release();
                let aborted_earlier = matches!(&e, diesel::result::Error::DatabaseError(_, info)
                    if diesel_async::pg::sql_state(info.as_ref())
                        == Some(tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION));
                Err(Finish::Failed(if aborted_earlier {
                    swallowed_error()
                } else {
                    SessionError::from(e)
                }))
            }
            Err(CommitError::NotCommitted(e)) => {
                log::error!("COMMIT could not commit ({e}); nothing was written");
                Err(Finish::Failed(match SessionError::from(e) {
                    SessionError::Database(_) | SessionError::Internal(_) => {
                        SessionError::unavailable(LOST_BEFORE_COMMIT)
                    }
                    e => e,
                }))
            }
            Err(CommitError::AnswerLost(e)) => {
                log::error!("COMMIT got no answer ({e}); asking the server what happened");
                this.park_in_doubt(state);
                Err(Finish::AnswerLost)
            }
            Err(CommitError::Failed(e)) => {
                log::error!("COMMIT failed: {e}");
                // The server answered: the transaction is over (rolled back), and the
                // connection is as good as after a ROLLBACK.
                this.release();
                Err(Finish::Failed(SessionError::from(e)))
            }
        }
    }

    /// Rolls back. On success the connection returns to the pool, otherwise it is closed.
    pub(crate) async fn rollback(mut self, timeout: Duration) {
        if !self.at_top_level() {
            // One ROLLBACK would only undo the innermost savepoint, or queue behind a
            // statement nobody waits for: close the connection instead.
            log::warn!(
                "transaction left unfinished; closing the connection instead of rolling back"
            );
            return;
        }
        match tokio::time::timeout(
            timeout,
            AnsiTransactionManager::rollback_transaction(self.connection()),
        )
        .await
        {
            Ok(Ok(())) => self.release(),
            Ok(Err(e)) => log::warn!("ROLLBACK failed, closing the connection: {e}"),
            Err(_) => {
                log::warn!("ROLLBACK did not answer within {timeout:?}; closing the connection")
            }
        }
    }

    /// Keeps the connection whose COMMIT's answer was lost in `state`, out of the pool's
    /// hands: its place serves the verification (see `session::commit::resolve`). No
    /// cancel request: a COMMIT is never cancelled (under synchronous replication a
    /// cancelled wait would leave the commit local only).
    fn park_in_doubt(&mut self, state: &CommitState) {
        if let Some(conn) = self.conn.take() {
            self.settings
                .observer
                .connection_closed(CloseReason::Broken, 1);
            *state.in_doubt.borrow_mut() = Some(Detached::new(conn));
        }
    }

    /// Returns the connection to the pool if it is clean: no transaction open, diesel's
    /// transaction manager not broken, socket open. Otherwise dropping `self` closes it.
    fn release(&mut self) {
        let clean = self
            .conn
            .as_mut()
            .is_some_and(|conn| !PoolableConnection::is_broken(&mut ***conn));
        if clean {
            drop(self.conn.take());
        }
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Not released: its transaction may be open. Take it out of the pool's
            // accounting and close it; the server rolls back when the socket closes.
            // Closing does not stop a statement the server is still running (it notices
            // only when it next writes), nor free its locks: ask it to cancel that first.
            if self.watch.in_flight_since().is_some() {
                self.settings
                    .connector
                    .cancel(AsyncPgConnection::cancel_token(&conn));
            }
            self.settings
                .observer
                .connection_closed(CloseReason::Broken, 1);
            drop(deadpool::managed::Object::take(*conn));
        }
        self.settings
            .observer
            .connection_released(self.checked_out.elapsed());
    }
}

/// A `TxConn` whose COMMIT is under way: if the COMMIT's future is dropped (its deadline
/// passed), the connection is parked for the verification instead of closed.
struct InDoubt<'a> {
    tx: TxConn,
    state: &'a CommitState,
    /// Until the COMMIT's future has finished.
    armed: bool,
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.tx.park_in_doubt(self.state);
        }
    }
}

/// Rolls back a transaction whose request is gone, off the request's own future.
///
/// Runs on the current Tokio runtime; without one (the worker is shutting down), or if the
/// runtime drops the task unfinished, the `TxConn` is dropped and closes the connection.
pub(crate) fn abandon(tx: TxConn, timeout: Duration) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(tx.rollback(timeout));
        }
        Err(_) => drop(tx),
    }
}

/// The error for a transaction that a failed statement aborted while the handler answered
/// success.
pub(crate) fn swallowed_error() -> SessionError {
    SessionError::internal(
        "a statement failed inside the transaction, but the handler answered success",
    )
}
