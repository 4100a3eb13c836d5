//! `DbSession`: one connection and one transaction per request, finalized by middleware.
//!
//! # The commit rule (contract section 2)
//! - A handler that takes a [`DbSession`] gets, on its first [`DbSession::conn`] call, a
//!   pooled connection with a transaction open (check-out plus `BEGIN`, together bounded by
//!   `DB_POOL_TIMEOUT`). Nothing is checked out at extraction: Actix resolves extractors
//!   concurrently, and an eager session would hold a transaction open while a slow client
//!   uploads its body, or for a request that then fails validation.
//! - The [`finalize`] middleware runs after the handler and before the response leaves:
//!   status < 400 commits, anything else rolls back, and so do handler errors and panics
//!   (which it catches and answers with a 500). If `COMMIT` fails, the client gets a 5xx
//!   instead of the handler's answer. If a statement failed inside the transaction and the
//!   handler answered success anyway, the session refuses to commit (PostgreSQL would turn
//!   the `COMMIT` into a silent `ROLLBACK`) and answers 500; see `db::watch` for the one
//!   kind of swallowed error it cannot see (handlers must propagate database errors).
//! - COMMIT is only sent when the connection is at the top level of the transaction with
//!   no statement unanswered. A nested unit of work cut short (a panic inside it, a
//!   handler's own timeout around it) or a statement future dropped mid-flight leaves the
//!   transaction in an unknown state: the request gets a 500, nothing commits, and the
//!   connection is closed rather than rolled back level by level.
//! - If the request future is dropped mid-transaction (shutdown timeout, worker restart),
//!   the transaction is rolled back in a spawned task; whenever a rollback cannot be done,
//!   the connection is detached from the pool and closed, so the server ends the
//!   transaction. A connection goes back to the pool only after a successful `COMMIT` or
//!   `ROLLBACK` of the whole transaction, and only if diesel then reports it clean (no
//!   transaction open, transaction manager not broken, socket open); [`TxConn`] enforces
//!   that by construction.
//! - One request, one connection: every `DbSession` of a request is the same session, and
//!   nothing here checks out a second connection (hold-and-wait deadlocks the pool under
//!   load). Nested `conn.transaction(..)` calls become savepoints through diesel's
//!   transaction manager, which also keeps the connection's transaction state truthful.
//! - Time bounds (contract section 2): `DB_POOL_TIMEOUT` bounds check-out plus `BEGIN`, and
//!   resolving a lost COMMIT answer, nothing else. A handler's statement, its rows
//!   included, is bounded on the client side by the statement timeout plus a margin (none
//!   without a statement timeout: it may run, or wait for a lock, as long as the server
//!   lets it). The session's own statements (COMMIT, ROLLBACK, the clean-up of an abandoned
//!   request) are bounded by that deadline, or without a statement timeout by
//!   `DB_IDLE_IN_TX_TIMEOUT` plus the margin (60 s without either), so that they end even
//!   when the server went silent (TCP still acknowledged, so keepalives never fire). Past the bound the work is dropped, the connection is
//!   closed (with a cancel request for a statement still running: the server would
//!   otherwise keep running it and holding its locks) and the client gets 503 `timeout`.
//!   A live server's own `statement_timeout` normally fires first, answering 503 `timeout`
//!   with the connection kept. One timer per request, run by the middleware, keeps this
//!   deadline, the check-out deadline and the leak warning.
//! - A COMMIT whose answer is lost (connection broken or ended by the server, or the
//!   COMMIT's deadline passed) is resolved before the client is answered (`db::commit`):
//!   the transaction's id travels with the COMMIT, and the server is asked on another
//!   connection whether it committed: the handler's response if it did, 503
//!   `database_unavailable` if not, 503 `commit_unknown` if that cannot be learned within
//!   `DB_POOL_TIMEOUT`.
//! - The guard returned by [`DbSession::conn`] must not outlive the handler. If it does
//!   (moved into a spawned local task), the response becomes a 500 and the transaction is
//!   rolled back when the guard is finally dropped: a late write can never be committed.
//! - Do side effects that are not database writes (calls to other services, messages)
//!   after the handler's writes are committed, i.e. not inside the handler, or accept that
//!   they may happen for a request that rolls back.

use std::cell::{Cell, RefCell};
use std::future::{ready, Future, Ready};
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest, ResponseError};
use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
use futures_util::FutureExt;

use super::commit::{self, CommitError, Detached, Resolution, TxId};
use super::connect::Connector;
use super::lease::{self, Lease};
use super::pool::{DbPool, PooledConnection};
use super::watch::{StatementWatch, WatchHandle};
use crate::config::DbConfig;
use crate::error::ApiError;
use crate::metrics::db::{DbMetrics, TimeoutKind};

/// Margin added to the server's statement timeout for the client-side statement deadline,
/// so that the server's own cancellation (a clean 57014 error, connection reusable) always
/// wins when the server is alive.
const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// The bound on COMMIT, ROLLBACK and clean-up when neither a statement timeout nor an
/// idle-in-transaction timeout is set (see `SessionSettings::finish_deadline`).
pub const FINISH_DEADLINE_FALLBACK: Duration = Duration::from_secs(60);

/// Shared, per-application settings of the session layer (in `web::Data`).
#[derive(Clone)]
pub struct SessionSettings {
    pool: DbPool,
    /// Bound on check-out plus BEGIN, and on resolving a lost COMMIT answer
    /// (`DB_POOL_TIMEOUT`).
    checkout_timeout: Duration,
    /// Client-side bound on a handler's statement: the statement timeout plus a margin.
    /// `None` without a statement timeout: a handler's statement may then run, or wait for
    /// a lock, as long as the server lets it (contract section 2).
    statement_deadline: Option<Duration>,
    /// Client-side bound on the session's own statements: COMMIT, ROLLBACK and the
    /// clean-up of an abandoned request. These must end even when the server went silent
    /// (it still acknowledges TCP, so keepalives never fire), or a cancelled request's
    /// clean-up would hold its socket forever: the statement deadline; without a statement
    /// timeout, `DB_IDLE_IN_TX_TIMEOUT` plus the margin (by then the server has given up on
    /// a transaction whose client went quiet, so the service gives up on a server that
    /// went quiet after as long); without either, [`FINISH_DEADLINE_FALLBACK`]. Never
    /// `DB_POOL_TIMEOUT`, which may be tuned short to fail check-outs fast, while a COMMIT
    /// may legitimately wait for a flush, a standby or a deferred check. A COMMIT cut off
    /// by it is resolved like any lost answer.
    finish_deadline: Duration,
    echo: bool,
    metrics: DbMetrics,
    /// Sends cancel requests for statements the session gives up on.
    connector: Connector,
}

impl SessionSettings {
    pub fn new(pool: DbPool, cfg: &DbConfig, metrics: &DbMetrics) -> Self {
        let statement_deadline = cfg.statement_timeout.map(|t| t + DEADLINE_MARGIN);
        SessionSettings {
            pool,
            checkout_timeout: cfg.pool_timeout,
            statement_deadline,
            finish_deadline: statement_deadline
                .or_else(|| cfg.idle_in_tx_timeout.map(|t| t + DEADLINE_MARGIN))
                .unwrap_or(FINISH_DEADLINE_FALLBACK),
            echo: cfg.echo,
            metrics: metrics.clone(),
            connector: super::pool::connector(cfg),
        }
    }

    /// The pool behind the sessions.
    pub fn pool(&self) -> &DbPool {
        &self.pool
    }
}

/// Why a transaction ended the way it did (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The response status decided.
    Status,
    /// The handler (or an inner middleware) returned an error.
    Error,
    /// The handler panicked.
    Panic,
    /// The request future was dropped before it finished.
    Cancelled,
    /// COMMIT failed, or could not be attempted because the transaction was aborted.
    CommitFailed,
    /// A statement outlived its client-side deadline: the connection was closed.
    Timeout,
    /// The COMMIT's answer was lost, and the outcome was then learned from the server on
    /// another connection (see `db::commit`).
    CommitVerified,
}

/// A pooled connection whose transaction may be open.
///
/// The only ways to give the connection back to the pool are a successful
/// [`TxConn::commit`] or [`TxConn::rollback`]. Dropping a `TxConn` in any other state
/// detaches the connection from the pool and closes it, which makes the server roll back:
/// a connection can never re-enter the pool inside a transaction, whatever path (error,
/// panic, cancellation) got us here.
pub struct TxConn {
    /// Boxed: the connection is large, and a `TxConn` moves between the session's slot and
    /// the handler's guard at every use.
    conn: Option<Box<PooledConnection>>,
    watch: WatchHandle,
    /// Use-time metric; ends when the `TxConn` drops.
    lease: Lease,
    /// For the cancel request sent when the connection is closed with a statement running.
    settings: web::Data<SessionSettings>,
}

impl TxConn {
    /// Checks a connection out and begins a transaction. Not bounded here: the session
    /// puts `DB_POOL_TIMEOUT` over it (see [`Slot::open`]).
    async fn begin(settings: &web::Data<SessionSettings>) -> Result<TxConn, ApiError> {
        let mut conn = settings.metrics.acquire(&settings.pool).await?;
        let handle = StatementWatch::attach(&mut conn, settings.echo);
        // From here on, dropping `tx` (error, timeout, cancellation) closes the connection
        // instead of pooling it: BEGIN may have reached the server.
        let mut tx = TxConn {
            conn: Some(Box::new(conn)),
            watch: handle,
            lease: settings.metrics.lease(),
            settings: settings.clone(),
        };
        AnsiTransactionManager::begin_transaction(tx.connection()).await?;
        Ok(tx)
    }

    #[expect(
        clippy::expect_used,
        reason = "`conn` is only emptied by `release` and `detach`, which consume the TxConn"
    )]
    fn connection(&mut self) -> &mut AsyncPgConnection {
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

    /// Commits, learning the transaction's id on the way (see `db::commit`). On success the
    /// connection returns to the pool; on any failure it is closed, and the error says what
    /// the client gets, or that the answer was lost and the outcome must be resolved. The
    /// COMMIT itself is bounded by the session's finish deadline, which the middleware
    /// keeps running around it; a rollback instead of it (aborted transaction) by
    /// `timeout`.
    ///
    /// The slot's `committing` is set while the COMMIT statement is under way, its `xid`
    /// gets the transaction's identity as soon as it is known, and its `in_doubt` the
    /// connection when the COMMIT's answer is lost (here, or because this future is
    /// dropped mid-COMMIT by the deadline): the verification uses its place in the pool.
    async fn commit(mut self, timeout: Duration, slot: &SlotInner) -> Result<(), Finish> {
        if !self.at_top_level() {
            // Dropping `self` closes the connection: the server rolls everything back.
            log::error!("not committing: a nested unit of work or a statement was left unfinished");
            return Err(Finish::Failed(ApiError::internal(
                "the transaction was left unfinished (interrupted nested unit of work or abandoned statement)",
            )));
        }
        if self.watch.transaction_aborted() {
            self.rollback(timeout).await;
            return Err(Finish::Failed(swallowed_error()));
        }
        slot.committing.set(true);
        let prepared = self.watch.xid_prepared();
        let mut this = InDoubt {
            tx: self,
            slot,
            armed: true,
        };
        let result =
            commit::commit(this.tx.connection(), &slot.xid, prepared, &slot.commit_sent).await;
        this.armed = false;
        let this = &mut this.tx;
        slot.committing.set(false);
        if *slot.xid.borrow() != TxId::Unknown {
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
                    commit_error(e)
                }))
            }
            Err(CommitError::NotCommitted(e)) => {
                log::error!("COMMIT could not commit ({e}); nothing was written");
                Err(Finish::Failed(match commit_error(e) {
                    ApiError::Internal(_) => ApiError::DatabaseUnavailable(
                        "the connection to the database was lost before the transaction committed"
                            .to_owned(),
                    ),
                    e => e,
                }))
            }
            Err(CommitError::AnswerLost(e)) => {
                log::error!("COMMIT got no answer ({e}); asking the server what happened");
                this.park_in_doubt(slot);
                Err(Finish::AnswerLost)
            }
            Err(CommitError::Failed(e)) => {
                log::error!("COMMIT failed: {e}");
                Err(Finish::Failed(commit_error(e)))
            }
        }
    }

    /// Rolls back. On success the connection returns to the pool, otherwise it is closed.
    async fn rollback(mut self, timeout: Duration) {
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

    /// Keeps the connection whose COMMIT's answer was lost in the slot, out of the pool's
    /// hands: its place serves the verification (see `db::commit::resolve`). No cancel
    /// request: a COMMIT is never cancelled (under synchronous replication a cancelled
    /// wait would leave the commit local only).
    fn park_in_doubt(&mut self, slot: &SlotInner) {
        if let Some(conn) = self.conn.take() {
            self.lease.broken();
            *slot.in_doubt.borrow_mut() = Some(Detached::new(conn));
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
            self.lease.broken();
            drop(deadpool::managed::Object::take(*conn));
        }
    }
}

/// A `TxConn` whose COMMIT is under way: if the COMMIT's future is dropped (its deadline
/// passed), the connection is parked for the verification instead of closed.
struct InDoubt<'a> {
    tx: TxConn,
    slot: &'a SlotInner,
    /// Until the COMMIT's future has finished.
    armed: bool,
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.tx.park_in_doubt(self.slot);
        }
    }
}

/// Rolls back a transaction whose request is gone, off the request's own future.
///
/// Runs on the current Tokio runtime; without one (the worker is shutting down), or if the
/// runtime drops the task unfinished, the `TxConn` is dropped and closes the connection.
fn abandon(tx: TxConn, timeout: Duration) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(tx.rollback(timeout));
        }
        Err(_) => drop(tx),
    }
}

/// Where the request's session stands.
enum State {
    /// No connection yet (and maybe never: sessions are lazy).
    Idle,
    /// Check-out and BEGIN are under way, or the handler holds the connection.
    Busy,
    /// A transaction is open and the connection is parked between uses.
    Open(TxConn),
    /// The middleware has finished the session; nothing may use it again.
    Finalized,
}

/// The per-request slot that the middleware creates and the extractor finds.
#[derive(Clone)]
struct Slot(Rc<SlotInner>);

struct SlotInner {
    state: RefCell<State>,
    /// The watch of the session's connection, once there is one: the middleware reads the
    /// in-flight statement from it while the handler holds the connection.
    watch: RefCell<Option<WatchHandle>>,
    /// When the session checked its connection out, once it has: for the leak warning.
    held_since: Cell<Option<Instant>>,
    /// While a check-out (and its BEGIN) is under way: when it must give up
    /// (`DB_POOL_TIMEOUT` after it started). The middleware's timer watches it.
    checkout_deadline: Cell<Option<Instant>>,
    /// Set by the middleware's timer when `checkout_deadline` passed: the check-out gives up.
    checkout_expired: Cell<bool>,
    /// Set while the COMMIT statement is under way: it is then bounded by the finish
    /// deadline, and a COMMIT cut off by it is resolved as a lost answer.
    committing: Cell<bool>,
    /// Set once the COMMIT has been sent (`committing` is set before the transaction-id
    /// query a connection's first COMMIT waits for): only a COMMIT sent can be in doubt.
    commit_sent: Cell<bool>,
    /// The transaction's identity, learned during COMMIT.
    xid: RefCell<TxId>,
    /// The connection of a COMMIT whose answer was lost, kept for the verification.
    in_doubt: RefCell<Option<Detached>>,
    /// The waker of the task waiting on the check-out, woken when its deadline passes: it
    /// need not be the request's own task (`conn()` under `spawn_local`, say).
    checkout_waker: RefCell<Option<Waker>>,
    /// The waker the middleware's timer is registered with: a check-out that starts in
    /// another task wakes it, so that the timer is armed for the check-out's deadline.
    timer_waker: RefCell<Option<Waker>>,
    settings: web::Data<SessionSettings>,
}

impl Slot {
    fn new(settings: web::Data<SessionSettings>) -> Self {
        Slot(Rc::new(SlotInner {
            state: RefCell::new(State::Idle),
            watch: RefCell::new(None),
            held_since: Cell::new(None),
            checkout_deadline: Cell::new(None),
            checkout_expired: Cell::new(false),
            committing: Cell::new(false),
            commit_sent: Cell::new(false),
            xid: RefCell::new(TxId::Unknown),
            in_doubt: RefCell::new(None),
            checkout_waker: RefCell::new(None),
            timer_waker: RefCell::new(None),
            settings,
        }))
    }

    fn settings(&self) -> &SessionSettings {
        &self.0.settings
    }

    fn replace(&self, state: State) -> State {
        std::mem::replace(&mut *self.0.state.borrow_mut(), state)
    }

    /// When the session's statement now running was sent, if one is.
    fn statement_in_flight_since(&self) -> Option<Instant> {
        self.0
            .watch
            .borrow()
            .as_ref()
            .and_then(WatchHandle::in_flight_since)
    }

    /// Checks the session's connection out and begins its transaction, within
    /// `DB_POOL_TIMEOUT`: the deadline goes into the slot, where the middleware's one timer
    /// per request watches it (instead of a timer of its own) and flags it when it passes.
    async fn open(&self) -> Result<TxConn, ApiError> {
        let settings = self.settings();
        self.0
            .checkout_deadline
            .set(Some(later(Instant::now(), settings.checkout_timeout)));
        let _done = CheckoutOver(self);
        // Not boxed, although it makes every handler's future 2 KB larger: measured with
        // callgrind, the box (an allocation and a copy of the future) cost more than the
        // larger future's moves. (The COMMIT future is the opposite case, see `finish`.)
        let mut begin = std::pin::pin!(TxConn::begin(&self.0.settings));
        std::future::poll_fn(|cx| match begin.as_mut().poll(cx) {
            Poll::Pending if self.0.checkout_expired.get() => {
                settings.metrics.timeout(TimeoutKind::Wait);
                Poll::Ready(Err(ApiError::DatabaseUnavailable(
                    "no database connection became available in time".to_owned(),
                )))
            }
            Poll::Pending => {
                let mut waker = self.0.checkout_waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                    // Checking out in a task of its own (`conn()` under `spawn_local`): the
                    // middleware's timer learns of the deadline only when it is polled.
                    if let Some(timer) = self.0.timer_waker.borrow().as_ref() {
                        if !timer.will_wake(cx.waker()) {
                            timer.wake_by_ref();
                        }
                    }
                }
                Poll::Pending
            }
            ready => ready,
        })
        .await
    }

    /// Ends the session without talking to the server: the connection (if the session has
    /// one parked) is closed, which makes the server roll back. For a connection whose
    /// peer stopped answering, where a ROLLBACK would only wait too. (Dropping the
    /// `TxConn` sends a cancel request for a statement still running.)
    fn discard(&self) {
        match self.replace(State::Finalized) {
            State::Open(tx) => {
                self.settings().metrics.rolled_back(Reason::Timeout);
                drop(tx);
            }
            // Cut off inside `finish`: the ROLLBACK of an aborted transaction that the
            // session was about to COMMIT (a COMMIT cut off is resolved instead).
            State::Finalized => self.settings().metrics.rolled_back(Reason::Timeout),
            State::Idle | State::Busy => {}
        }
    }

    /// Ends the session: commits when `commit` is true and a transaction is open, else
    /// rolls back. Says what must replace the response, if anything.
    async fn finish(&self, commit: bool, reason: Reason) -> Result<(), Finish> {
        match self.replace(State::Finalized) {
            State::Idle | State::Finalized => Ok(()),
            State::Busy => {
                // The guard escaped the handler. It rolls back when it is dropped.
                log::error!("a DbSession connection outlived its handler; answering 500");
                Err(Finish::Failed(ApiError::internal(
                    "DbSession connection outlived its handler",
                )))
            }
            State::Open(tx) => {
                // Both futures are boxed: they hold diesel's large ones, which would
                // otherwise make every request's middleware future larger, and that future
                // is moved around on every request (see BENCHMARKS.md).
                let timeout = self.settings().finish_deadline;
                if commit {
                    let result = Box::pin(tx.commit(timeout, &self.0)).await;
                    match &result {
                        Ok(()) => self.settings().metrics.committed(Reason::Status),
                        // Counted once resolved.
                        Err(Finish::AnswerLost) => {}
                        Err(Finish::Failed(_)) => {
                            self.settings().metrics.rolled_back(Reason::CommitFailed)
                        }
                    }
                    result
                } else {
                    log::debug!("rolling back the request's transaction ({reason:?})");
                    Box::pin(tx.rollback(timeout)).await;
                    self.settings().metrics.rolled_back(reason);
                    Ok(())
                }
            }
        }
    }

    /// Finds out, on another connection, whether the transaction whose COMMIT answer was
    /// lost committed (see `db::commit`), within `DB_POOL_TIMEOUT`. `Ok` when the
    /// handler's response may be sent.
    async fn resolve_lost_commit(&self) -> Result<(), ApiError> {
        let settings = self.settings();
        let xid = self.0.xid.borrow().clone();
        let in_doubt = self.0.in_doubt.borrow_mut().take();
        // A request dropped during the verification (a shutdown timeout) leaves the
        // outcome unknown: counted so.
        let mut dropped = UnknownIfDropped {
            metrics: &settings.metrics,
            id_known: xid != TxId::Unknown,
            armed: true,
        };
        let resolution = Box::pin(commit::resolve(
            in_doubt,
            &settings.connector,
            &settings.pool,
            &settings.metrics,
            &xid,
            settings.checkout_timeout,
        ))
        .await;
        dropped.armed = false;
        let about = match &xid {
            TxId::Assigned(id) => format!("transaction {}", id.xid),
            TxId::Unassigned => "a transaction that wrote nothing".to_owned(),
            TxId::Unknown => "a transaction whose id was lost too".to_owned(),
        };
        match resolution {
            Resolution::Committed => {
                log::warn!("COMMIT answer lost; {about} committed: sending the handler's response");
                settings.metrics.committed(Reason::CommitVerified);
                Ok(())
            }
            Resolution::Aborted => {
                log::warn!("COMMIT answer lost; {about} did not commit: answering 503");
                settings.metrics.rolled_back(Reason::CommitVerified);
                Err(ApiError::DatabaseUnavailable(
                    "the connection to the database was lost before the transaction committed"
                        .to_owned(),
                ))
            }
            Resolution::Unknown => {
                log::error!(
                    "COMMIT answer lost; whether {about} committed could not be learned within \
                     {:?} (or only from a server that restarted since): answering 503 \
                     commit_unknown",
                    settings.checkout_timeout
                );
                settings.metrics.commit_unknown(xid != TxId::Unknown);
                Err(ApiError::CommitUnknown)
            }
        }
    }
}

/// Counts a COMMIT of unknown outcome when dropped armed.
struct UnknownIfDropped<'a> {
    metrics: &'a DbMetrics,
    id_known: bool,
    armed: bool,
}

impl Drop for UnknownIfDropped<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.commit_unknown(self.id_known);
        }
    }
}

/// What must happen after a session ended badly.
enum Finish {
    /// The response is replaced by this error.
    Failed(ApiError),
    /// The COMMIT's answer was lost: the outcome must be resolved before answering.
    AnswerLost,
}

/// What the client gets for an error that ended a COMMIT: the contract's 503s as they
/// are, anything else a generic 500.
fn commit_error(e: diesel::result::Error) -> ApiError {
    match ApiError::from(e) {
        e @ (ApiError::TransactionConflict
        | ApiError::DatabaseUnavailable(_)
        | ApiError::Timeout) => e,
        _ => ApiError::internal("COMMIT failed"),
    }
}

/// The error for a transaction that a failed statement aborted while the handler answered
/// success.
fn swallowed_error() -> ApiError {
    ApiError::internal(
        "a statement failed inside the transaction, but the handler answered success",
    )
}

/// Clears the slot's check-out deadline when the check-out is over (done, failed, timed out
/// or dropped).
struct CheckoutOver<'a>(&'a Slot);

impl Drop for CheckoutOver<'_> {
    fn drop(&mut self) {
        self.0 .0.checkout_deadline.set(None);
        self.0 .0.checkout_expired.set(false);
        self.0 .0.checkout_waker.borrow_mut().take();
    }
}

/// Rolls back when the request future is dropped before the middleware finished.
struct CancelGuard(Option<Slot>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            if let State::Open(tx) = slot.replace(State::Finalized) {
                log::warn!("request cancelled inside a transaction; rolling back");
                slot.settings().metrics.rolled_back(Reason::Cancelled);
                abandon(tx, slot.settings().finish_deadline);
            }
        }
    }
}

/// The request's database session. Extracting it is free; see the module docs.
pub struct DbSession {
    slot: Slot,
}

impl FromRequest for DbSession {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Slot>()
                .cloned()
                .map(|slot| DbSession { slot })
                .ok_or_else(|| ApiError::internal("DbSession used without the session middleware")),
        )
    }
}

impl DbSession {
    /// The request's connection, inside its transaction. The first call checks out and
    /// begins (bounded by `DB_POOL_TIMEOUT`: 503 `database_unavailable` after it); later
    /// calls return the same connection and transaction. Drop the guard before calling
    /// again; holding two at once is a programming error (500).
    pub async fn conn(&self) -> Result<SessionConn, ApiError> {
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
                *self.slot.0.watch.borrow_mut() = Some(tx.watch.clone());
                self.slot.0.held_since.set(Some(tx.lease.started()));
                tx
            }
            other @ (State::Busy | State::Finalized) => {
                self.slot.replace(other);
                return Err(ApiError::internal(
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

/// Puts a slot that is `Busy` opening a connection back to `Idle` when dropped armed.
struct BackToIdle<'a>(&'a Slot, bool);

impl Drop for BackToIdle<'_> {
    fn drop(&mut self) {
        let mut state = self.0 .0.state.borrow_mut();
        if self.1 && matches!(*state, State::Busy) {
            *state = State::Idle;
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
            .and_then(|tx| tx.conn.as_deref())
            .map(|conn| &**conn)
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
        let mut state = self.slot.0.state.borrow_mut();
        match &*state {
            State::Busy => *state = State::Open(tx),
            _ => {
                // The request is over (or the session was torn down under us): never
                // commit late work, roll it back.
                drop(state);
                self.slot.settings().metrics.rolled_back(Reason::Cancelled);
                abandon(tx, self.slot.settings().finish_deadline);
            }
        }
    }
}

/// Drives the request's work (the handler, then its COMMIT) under the session's deadlines,
/// with one timer per request:
/// - **statement deadline**: returns `None` if one of the session's statements has been in
///   flight for longer than it (the work is then dropped): the handler's statement
///   deadline (none without a statement timeout), or the finish deadline while the COMMIT
///   runs. The timer sleeps a whole deadline while no statement runs and re-arms relative
///   to the start of the statement in flight, so a handler that runs many short
///   statements is never cut off, while one that waits on a silent peer is, after at most
///   one deadline;
/// - **check-out deadline** (`DB_POOL_TIMEOUT` over check-out and BEGIN, see
///   [`Slot::open`]): flags the check-out as expired and polls the work again, so that
///   `DbSession::conn` returns its error to the handler;
/// - **leak warning** (`DB_LEAK_WARN_SECS`, see `db::lease`): once the session has held
///   its connection that long.
///
/// Written as a hand-made poll rather than `select!` because it runs around every request:
/// the timer registers only once the work has to wait, and afterwards it is looked at (an
/// atomic load) instead of polled at every wake-up.
///
/// The work is pinned by the caller: taken by value it would sit in this future twice
/// (argument and pinned local), and that future is moved around on every request.
async fn run_with_deadlines<F: Future>(mut work: Pin<&mut F>, slot: &Slot) -> Option<F::Output> {
    let settings = slot.settings();
    let inner = &slot.0;
    // The bound on the statement in flight, if it has one.
    let deadline = || {
        if inner.committing.get() {
            Some(settings.finish_deadline)
        } else {
            settings.statement_deadline
        }
    };
    // Whether the timer was armed for the COMMIT since it began.
    let mut armed_for_commit = false;
    // `None` once warned (or when the warning is off).
    let mut leak_after = settings.metrics.leak_warn();
    let next_wake = |leak_after: Option<Duration>| {
        let now = Instant::now();
        let mut wake = later(
            slot.statement_in_flight_since().unwrap_or(now),
            deadline().unwrap_or(Duration::MAX),
        );
        if let Some(due) = inner.checkout_deadline.get() {
            if !inner.checkout_expired.get() {
                wake = wake.min(due);
            }
        }
        // Before the check-out, wake when a connection taken now would be overdue.
        leak_after.map_or(wake, |after| {
            wake.min(later(inner.held_since.get().unwrap_or(now), after))
        })
    };
    let mut armed_for = next_wake(leak_after);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(armed_for.into()));
    // The waker the timer was last registered with; `None` until it has been.
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        // A check-out or a COMMIT that started during this poll may be due before the
        // timer.
        let mut due = inner
            .checkout_deadline
            .get()
            .filter(|_| !inner.checkout_expired.get());
        if inner.committing.get() && !armed_for_commit {
            armed_for_commit = true;
            let since = slot
                .statement_in_flight_since()
                .unwrap_or_else(Instant::now);
            let commit_due = later(since, settings.finish_deadline);
            due = Some(due.map_or(commit_due, |d| d.min(commit_due)));
        }
        if let Some(due) = due.filter(|due| *due < armed_for) {
            armed_for = due;
            sleep.as_mut().reset(due.into());
            registered = None;
        }
        if registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
            // Unconstrained: out of the task's cooperative budget, a `Sleep` answers
            // Pending without registering the waker, and it is not polled again.
            let polled = std::pin::pin!(tokio::task::coop::unconstrained(sleep.as_mut())).poll(cx);
            registered = Some(cx.waker().clone());
            *inner.timer_waker.borrow_mut() = registered.clone();
            if polled.is_pending() {
                return Poll::Pending;
            }
        } else if !sleep.is_elapsed() {
            return Poll::Pending;
        }
        // The timer fired.
        let now = Instant::now();
        if let (Some(since), Some(deadline)) = (slot.statement_in_flight_since(), deadline()) {
            if now.saturating_duration_since(since) >= deadline {
                log::warn!("a statement got no answer within {deadline:?}; closing its connection");
                return Poll::Ready(None);
            }
        }
        if inner.checkout_deadline.get().is_some_and(|due| now >= due) {
            // The check-out gives up when it is polled again: at the top of the loop when
            // the work drives it, else in the task its waker belongs to.
            inner.checkout_expired.set(true);
            if let Some(waker) = inner.checkout_waker.borrow_mut().take() {
                waker.wake();
            }
        }
        if let (Some(after), Some(held_since)) = (leak_after, inner.held_since.get()) {
            if now.saturating_duration_since(held_since) >= after {
                lease::warn_leak(&settings.metrics, after);
                leak_after = None;
            }
        }
        armed_for = next_wake(leak_after);
        sleep.as_mut().reset(armed_for.into());
        registered = None;
    })
    .await
}

/// `start + after`, or a time far beyond any request's life when that overflows (the
/// configuration allows very long timeouts).
fn later(start: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    start
        .checked_add(after)
        .unwrap_or_else(|| start + FAR.min(after))
}

/// Whether the handler's answer commits: a status below 400 that is not an error.
fn succeeded(res: &ServiceResponse<impl MessageBody>) -> bool {
    res.status().as_u16() < 400 && res.response().error().is_none()
}

/// The finalizing middleware; see the module docs for the rule it enforces.
///
/// It wraps each resource (see `api::resource`): after routing, so that holding a clone of
/// the request does not stop Actix's router, and innermost, so that it answers a handler's
/// panic before any outer middleware sees it.
pub async fn finalize(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(settings) = req.app_data::<web::Data<SessionSettings>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let slot = Slot::new(settings);
    req.extensions_mut().insert(slot.clone());
    let http_req = req.request().clone();

    let mut cancel = CancelGuard(Some(slot.clone()));
    // The handler and, when it succeeded, its COMMIT run under the same deadlines. The
    // handler's outcome is kept outside the work, so that it survives a COMMIT cut off by
    // its deadline (the lost COMMIT may turn out to have committed). The work is dropped
    // at the end of this block, before anything below looks at the slot: dropping it
    // parks the connection the handler held back in the slot, where `discard` finds it.
    let mut outcome = None;
    let committed = {
        let work = std::pin::pin!(async {
            let result = AssertUnwindSafe(next.call(req)).catch_unwind().await;
            let commit = matches!(&result, Ok(Ok(res)) if succeeded(res));
            outcome = Some(result);
            if commit {
                Some(slot.finish(true, Reason::Status).await)
            } else {
                None
            }
        });
        run_with_deadlines(work, &slot).await
    };
    cancel.0 = None;

    let (committed, outcome) = match (committed, outcome) {
        (Some(committed), Some(outcome)) => (committed, outcome),
        // A statement outlived its deadline.
        (_, outcome) => return Ok(after_deadline(&slot, outcome, http_req).await),
    };

    match outcome {
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            log::error!("handler panicked: {message}");
            // A rollback failure has nothing to add to a 500.
            let _ = slot.finish(false, Reason::Panic).await;
            let response = ApiError::internal("handler panicked").error_response();
            Ok(ServiceResponse::new(http_req, response))
        }
        Ok(Err(err)) => {
            let _ = slot.finish(false, Reason::Error).await;
            Err(err)
        }
        Ok(Ok(res)) => {
            let finished = match committed {
                Some(result) => result,
                None => {
                    let reason = if res.response().error().is_some() {
                        Reason::Error
                    } else {
                        Reason::Status
                    };
                    slot.finish(false, reason).await
                }
            };
            let finished = match finished {
                Err(Finish::AnswerLost) => slot.resolve_lost_commit().await,
                Err(Finish::Failed(e)) => Err(e),
                Ok(()) => Ok(()),
            };
            match finished {
                Ok(()) => Ok(res.map_into_boxed_body()),
                Err(e) => Ok(res.into_response(e.error_response())),
            }
        }
    }
}

/// The answer after a statement outlived its deadline and the work future was dropped
/// (which cancelled the statement on our side). If it was a COMMIT already sent, its
/// outcome is resolved on another connection, and the handler's response (`outcome`) is sent if it
/// committed; any other statement's connection cannot be trusted and is closed: 503
/// `timeout`.
async fn after_deadline(
    slot: &Slot,
    outcome: Option<HandlerOutcome<impl MessageBody + 'static>>,
    http_req: HttpRequest,
) -> ServiceResponse<BoxBody> {
    if !slot.0.commit_sent.get() {
        // Not a COMMIT, or one not sent yet (cut off in the transaction-id query a
        // connection's first COMMIT waits for): no outcome in doubt.
        drop(slot.0.in_doubt.borrow_mut().take());
        slot.discard();
        return ServiceResponse::new(http_req, ApiError::Timeout.error_response());
    }
    log::error!(
        "COMMIT got no answer within {:?}",
        slot.settings().finish_deadline
    );
    match (slot.resolve_lost_commit().await, outcome) {
        // Only a successful response is ever committed.
        (Ok(()), Some(Ok(Ok(res)))) => res.map_into_boxed_body(),
        (Ok(()), _) => ServiceResponse::new(
            http_req,
            ApiError::internal("lost response").error_response(),
        ),
        (Err(e), _) => ServiceResponse::new(http_req, e.error_response()),
    }
}

/// What the inner service gave: a response, an error, or a panic.
type HandlerOutcome<B> =
    Result<Result<ServiceResponse<B>, actix_web::Error>, Box<dyn std::any::Any + Send>>;
