//! The request's session state: where its connection is, and how the session ends.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::HttpRequest;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::commit::{self, Resolution, TxId};
use super::deadline::Deadlines;
use super::options::{begin_with_settings, Isolation, TxOptions};
use super::settings::Settings;
use super::tx::{abandon, CommitState, Finish, TxConn};
use super::watch::WatchHandle;
use crate::error::{SessionError, LOST_BEFORE_COMMIT};
use crate::observe::{Outcome, Reason};
use crate::replica::{Lsn, ReadReason, ReadTarget, Replicas};

/// Where the request's session stands.
pub(crate) enum State {
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
pub(crate) struct Slot(Rc<SlotInner>);

pub(crate) struct SlotInner {
    state: RefCell<State>,
    /// The request, once a handler has extracted its session (after routing: the
    /// middleware may wrap a scope, whose router needs the request unshared until it has
    /// matched). Names the request in the leak warning and carries the responses the
    /// middleware makes itself. Taken out when the middleware is done, since the slot
    /// lives in the request's extensions (see [`ForgetRequest`]).
    pub(crate) request: RefCell<Option<HttpRequest>>,
    pub(crate) deadlines: Deadlines,
    pub(crate) commit: CommitState,
    pub(crate) settings: Arc<Settings>,
    pub(crate) options: RefCell<Arc<TxOptions>>,
    /// Transaction-local settings to send with the `BEGIN`.
    pub(crate) local: RefCell<Vec<(String, String)>>,
    /// What runs once the transaction committed.
    hooks: RefCell<Vec<Hook>>,
    /// Set once the transaction committed (or the request succeeded without one).
    committed: Cell<bool>,
    /// Set when the handler's connection guard outlived it: the connection is not back,
    /// and a retry would hold a second one (`session::retry`).
    escaped: Cell<bool>,
    /// The position a read-only session must see, if the request asked for one
    /// ([`crate::ReadAfter`]): only a replica that has replayed it may serve it.
    pub(crate) read_after: Cell<Option<Lsn>>,
    /// Set for a read run again after its replica connection broke: primary only.
    pub(crate) primary_only: Cell<bool>,
    /// The replica the session began on (its index among the replicas), if it did.
    on_replica: Cell<Option<usize>>,
    /// How the session failed on its replica, when the primary may serve it instead: set
    /// when the session ends.
    replica_failure: RefCell<Option<ReplicaFailure>>,
    /// The primary's WAL position read after the COMMIT, when the options ask for it.
    pub(crate) position: Cell<Option<Lsn>>,
}

/// How a read-only session failed on its replica, in a way that the primary may not
/// (`session::finalize` runs such a read again there, once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReplicaFailure {
    /// The connection broke (see [`crate::error::connection_broke`]), or the replica gave
    /// no answer within the statement deadline (the statement timeout plus a margin):
    /// the replica counts as down until its next measurement says otherwise.
    Broken(String),
    /// Replay cancelled a statement (a recovery conflict: 40001 or 40P01, which a
    /// read-only transaction on a standby meets for no other reason). The replica is
    /// working, and a read started now would most likely not meet it again.
    Conflict,
}

/// An after-commit hook: its future, and what it says went wrong.
pub(crate) type Hook = Box<dyn FnOnce() -> LocalBoxFuture<'static, Result<(), String>>>;

impl std::ops::Deref for Slot {
    type Target = SlotInner;

    fn deref(&self) -> &SlotInner {
        &self.0
    }
}

impl Slot {
    pub(crate) fn new(
        settings: Arc<Settings>,
        options: Arc<TxOptions>,
        local: Vec<(String, String)>,
    ) -> Self {
        Slot(Rc::new(SlotInner {
            state: RefCell::new(State::Idle),
            request: RefCell::new(None),
            deadlines: Deadlines::default(),
            commit: CommitState::default(),
            settings,
            options: RefCell::new(options),
            local: RefCell::new(local),
            hooks: RefCell::new(Vec::new()),
            committed: Cell::new(false),
            escaped: Cell::new(false),
            read_after: Cell::new(None),
            primary_only: Cell::new(false),
            on_replica: Cell::new(None),
            replica_failure: RefCell::new(None),
            position: Cell::new(None),
        }))
    }

    /// The position a committed write's answer carries ([`crate::CommitPosition`]): the one
    /// read after its COMMIT; or, when that could not be read (the read failed or timed
    /// out, or the COMMIT's answer was lost and the commit confirmed on another
    /// connection), the highest position there is. A read that sends it back then goes to
    /// the primary, which has every commit, until the client's next write brings a real
    /// one: answering without a token would leave the client holding an older write's,
    /// which a replica may cover without having replayed this write.
    pub(crate) fn answer_position(&self) -> Option<Lsn> {
        if let Some(position) = self.position.get() {
            return Some(position);
        }
        let options = self.options.borrow();
        (options.commit_position && !options.read_only && self.commit.sent.get())
            .then_some(Lsn::MAX)
    }

    /// Keeps a handle on `request` (the first extraction's) for the rest of the request;
    /// never once the middleware is done (an extraction from the response, say), when
    /// nothing would drop the handle again.
    pub(crate) fn remember(&self, request: &HttpRequest) {
        if matches!(*self.state.borrow(), State::Finalized) {
            return;
        }
        let mut slot = self.request.borrow_mut();
        if slot.is_none() {
            *slot = Some(request.clone());
        }
    }

    /// Takes `options` (an inner middleware's) for the session, with their per-request
    /// settings, unless the session has begun already.
    pub(crate) fn override_options(&self, options: &Arc<TxOptions>, req: &ServiceRequest) {
        if !self.is_idle() {
            return;
        }
        if let Some(settings) = &options.settings {
            self.local.borrow_mut().extend(settings(req));
        }
        *self.options.borrow_mut() = options.clone();
    }

    /// Whether the transaction committed (early, or at the end), or the request succeeded
    /// without one.
    pub(crate) fn has_committed(&self) -> bool {
        self.committed.get()
    }

    /// Whether the handler's connection guard outlived it (the session ended `Busy`).
    pub(crate) fn guard_escaped(&self) -> bool {
        self.escaped.get()
    }

    /// Whether the session has no connection yet.
    pub(crate) fn is_idle(&self) -> bool {
        matches!(*self.state.borrow(), State::Idle)
    }

    pub(crate) fn add_hook(&self, hook: Hook) {
        self.hooks.borrow_mut().push(hook);
    }

    /// Runs the after-commit hooks, in the order they were added, if the transaction
    /// committed (else drops them), within the after-commit timeout all together. A hook
    /// that fails or panics is logged; nothing changes the response.
    pub(crate) async fn after_commit(&self) {
        let hooks = std::mem::take(&mut *self.hooks.borrow_mut());
        if hooks.is_empty() || !self.committed.get() {
            return;
        }
        let bound = self.settings.after_commit_timeout;
        let run = async {
            for hook in hooks {
                match AssertUnwindSafe(hook()).catch_unwind().await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::error!("an after-commit hook failed: {e}"),
                    Err(_) => log::error!("an after-commit hook panicked"),
                }
            }
        };
        if tokio::time::timeout(bound, run).await.is_err() {
            log::error!("after-commit hooks cut off after {bound:?}");
        }
    }

    /// Commits now, at the handler's request (`DbSession::commit`).
    pub(crate) async fn commit_now(&self) -> Result<(), SessionError> {
        if matches!(*self.state.borrow(), State::Busy | State::Finalized) {
            return Err(SessionError::internal(
                "DbSession::commit called while the connection is in use or after the session ended",
            ));
        }
        let result = match self.finish(true, Reason::Status).await {
            Ok(()) => Ok(()),
            Err(Finish::Failed(e)) => Err(e),
            Err(Finish::AnswerLost) => self.resolve_lost_commit().await,
        };
        // The connection is gone (back to the pool, or closed): its statements and its
        // holding time are no longer this request's, for the rest of the handler.
        *self.deadlines.watch.borrow_mut() = None;
        self.deadlines.held_since.set(None);
        result
    }

    pub(crate) fn replace(&self, state: State) -> State {
        std::mem::replace(&mut *self.state.borrow_mut(), state)
    }

    /// Puts `Open(tx)` back if the session is still `Busy` (the handler's guard was
    /// dropped); otherwise gives the transaction back, which the request no longer owns.
    pub(crate) fn park(&self, tx: TxConn) -> Option<TxConn> {
        let mut state = self.state.borrow_mut();
        match &*state {
            State::Busy => {
                *state = State::Open(tx);
                None
            }
            _ => Some(tx),
        }
    }

    /// Back to `Idle` if a check-out left the session `Busy` (it was dropped mid-way).
    pub(crate) fn back_to_idle(&self) {
        let mut state = self.state.borrow_mut();
        if matches!(*state, State::Busy) {
            *state = State::Idle;
        }
    }

    /// Checks the session's connection out and begins its transaction, within the
    /// check-out timeout.
    pub(crate) async fn open(&self) -> Result<TxConn, SessionError> {
        let settings = &self.settings;
        // Kept until the BEGIN that carries them succeeded: a check-out that fails or is
        // cut off leaves them for the next `conn()`.
        let local = self.local.borrow().clone();
        let options = self.options.borrow().clone();
        let begin = |begin| with_local(begin, &local);
        let tx = match self.replica(&options) {
            None => self.begin_on_primary(&begin(&options.begin)?).await?,
            Some((replicas, index)) => {
                let replica = &replicas.members[index];
                // This worker's own pool of the replica, if it has one.
                let replica_settings = settings
                    .replica_pools
                    .get(index)
                    .unwrap_or(&replica.settings);
                // Its own BEGIN, which states the isolation level (see `TxOptions`).
                let on_replica = self
                    .deadlines
                    .checkout(
                        settings.replica_checkout_timeout,
                        settings,
                        TxConn::begin(replica_settings, &begin(&options.replica_begin)?),
                    )
                    .await;
                match on_replica {
                    Ok(tx) => {
                        self.on_replica.set(Some(index));
                        settings
                            .observer
                            .read_routed(ReadTarget::Replica, ReadReason::Replica);
                        tx
                    }
                    Err(e) => {
                        // Nothing has been read yet: the primary can serve it. A pool
                        // whose every connection was in use only had no connection to
                        // spare (with a pool per worker, this worker's share of the
                        // replica): that says nothing of the replica, which other workers
                        // go on using. Otherwise connecting or BEGIN failed, or took too
                        // long: it counts as down until its next measurement.
                        let status = replica_settings.pool.status();
                        if status.size < status.max_size || status.available > 0 {
                            replicas.mark_down(replica, &e.to_string());
                        }
                        settings
                            .observer
                            .read_routed(ReadTarget::Primary, ReadReason::Down);
                        self.begin_on_primary(&begin(&options.begin)?).await?
                    }
                }
            }
        };
        self.local.borrow_mut().clear();
        *self.deadlines.watch.borrow_mut() = Some(tx.watch.clone());
        self.deadlines.held_since.set(Some(tx.checked_out));
        Ok(tx)
    }

    /// The replica a read-only session runs on, if it may run on one and one is
    /// eligible; otherwise reports why it runs on the primary. Writes, `SERIALIZABLE`
    /// sessions (a hot standby refuses them) and reads run again after a replica broke
    /// never go to a replica.
    fn replica(&self, options: &TxOptions) -> Option<(&Replicas, usize)> {
        let settings = &self.settings;
        if !options.read_only {
            return None;
        }
        let observer = &settings.observer;
        let replicas = match &settings.replicas {
            Some(replicas) if options.isolation != Some(Isolation::Serializable) => replicas,
            _ => {
                observer.read_routed(ReadTarget::Primary, ReadReason::NoReplica);
                return None;
            }
        };
        if self.primary_only.get() {
            observer.read_routed(ReadTarget::Primary, ReadReason::Down);
            return None;
        }
        match replicas.choose(self.read_after.get()) {
            Ok(index) => Some((replicas, index)),
            Err(reason) => {
                observer.read_routed(ReadTarget::Primary, reason);
                None
            }
        }
    }

    /// Check-out and BEGIN on the primary, within the check-out timeout.
    async fn begin_on_primary(&self, begin: &str) -> Result<TxConn, SessionError> {
        let settings = &self.settings;
        self.deadlines
            .checkout(
                settings.checkout_timeout,
                settings,
                TxConn::begin(settings, begin),
            )
            .await
    }

    /// How the session failed on its replica, if it began on one and failed there in a
    /// way that the primary may not; see [`ReplicaFailure`].
    pub(crate) fn replica_failure(&self) -> Option<ReplicaFailure> {
        self.replica_failure.borrow().clone()
    }

    /// Counts the session's replica as down until its next measurement: its connection
    /// broke (`error` says how).
    pub(crate) fn mark_replica_down(&self, error: &str) {
        if let (Some(replicas), Some(index)) = (&self.settings.replicas, self.on_replica.get()) {
            replicas.mark_down(&replicas.members[index], error);
        }
    }

    /// How the statements of a session on a replica failed, from the watch of its
    /// connection: to be read before the connection goes back to the pool, where the
    /// next session resets it. `None` for a session on the primary.
    fn replica_failure_seen(&self, watch: &WatchHandle) -> Option<ReplicaFailure> {
        self.on_replica.get()?;
        if watch.connection_broke() {
            Some(ReplicaFailure::Broken(
                "the connection broke during a read".to_owned(),
            ))
        } else if watch.conflict() {
            Some(ReplicaFailure::Conflict)
        } else {
            None
        }
    }

    /// Records how the session failed on its replica: `seen` by its statements, else by
    /// its COMMIT (`ended`; a READ ONLY COMMIT whose connection broke, say).
    fn note_replica_failure(&self, seen: Option<ReplicaFailure>, ended: &Result<(), Finish>) {
        if self.on_replica.get().is_none() {
            return;
        }
        let failure = seen.or_else(|| match ended {
            Err(Finish::Failed(SessionError::Unavailable(e))) => {
                Some(ReplicaFailure::Broken(e.to_string()))
            }
            Err(Finish::Failed(SessionError::Conflict)) => Some(ReplicaFailure::Conflict),
            _ => None,
        });
        if failure.is_some() {
            *self.replica_failure.borrow_mut() = failure;
        }
    }

    fn ended(&self, outcome: Outcome) {
        self.settings.observer.transaction_ended(outcome);
    }

    /// Ends the session without talking to the server: the connection (if the session has
    /// one parked) is closed, which makes the server roll back. For a connection whose
    /// peer stopped answering, where a ROLLBACK would only wait too. (Dropping the
    /// `TxConn` sends a cancel request for a statement still running.)
    pub(crate) fn discard(&self) {
        match self.replace(State::Finalized) {
            State::Open(tx) => {
                self.ended(Outcome::RolledBack(Reason::Timeout));
                if self.on_replica.get().is_some() {
                    // The statement timeout would have ended a statement on a working
                    // server before this deadline.
                    *self.replica_failure.borrow_mut() = Some(ReplicaFailure::Broken(
                        "no answer within the statement deadline".to_owned(),
                    ));
                }
                drop(tx);
            }
            // Cut off inside `finish`: the ROLLBACK of an aborted transaction that the
            // session was about to COMMIT (a COMMIT cut off is resolved instead).
            State::Finalized => self.ended(Outcome::RolledBack(Reason::Timeout)),
            State::Idle | State::Busy => {}
        }
    }

    /// Ends the session: commits when `commit` is true and a transaction is open, else
    /// rolls back. Says what must replace the response, if anything.
    pub(crate) async fn finish(&self, commit: bool, reason: Reason) -> Result<(), Finish> {
        match self.replace(State::Finalized) {
            State::Idle => {
                // Nothing to commit: a success all the same, for the hooks.
                self.committed.set(commit);
                Ok(())
            }
            State::Finalized => Ok(()),
            State::Busy => {
                // The guard escaped the handler. It rolls back when it is dropped.
                log::error!("a DbSession connection outlived its handler; answering 500");
                self.escaped.set(true);
                Err(Finish::Failed(SessionError::internal(
                    "DbSession connection outlived its handler",
                )))
            }
            State::Open(tx) => {
                // Both futures are boxed: they hold diesel's large ones, which would
                // otherwise make every request's middleware future larger, and that future
                // is moved around on every request (BENCHMARKS.md, "The session layer's
                // own cost").
                let timeout = self.settings.finish_deadline;
                let seen = self.replica_failure_seen(&tx.watch);
                if commit {
                    let read_only = self.options.borrow().read_only;
                    let position = (self.options.borrow().commit_position && !read_only)
                        .then_some(&self.position);
                    let result =
                        Box::pin(tx.commit(timeout, &self.commit, read_only, position)).await;
                    match &result {
                        Ok(()) => {
                            self.committed.set(true);
                            self.ended(Outcome::Committed(Reason::Status));
                        }
                        // Counted once resolved.
                        Err(Finish::AnswerLost) => {}
                        Err(Finish::Failed(_)) => {
                            self.ended(Outcome::RolledBack(Reason::CommitFailed))
                        }
                    }
                    self.note_replica_failure(seen, &result);
                    result
                } else {
                    log::debug!("rolling back the request's transaction ({reason:?})");
                    Box::pin(tx.rollback(timeout)).await;
                    self.ended(Outcome::RolledBack(reason));
                    self.note_replica_failure(seen, &Ok(()));
                    Ok(())
                }
            }
        }
    }

    /// Finds out, on another connection, whether the transaction whose COMMIT answer was
    /// lost committed (see `session::commit`), within the check-out timeout. `Ok` when the
    /// handler's response may be sent.
    pub(crate) async fn resolve_lost_commit(&self) -> Result<(), SessionError> {
        let settings = &self.settings;
        let xid = self.commit.xid.borrow().clone();
        let in_doubt = self.commit.in_doubt.borrow_mut().take();
        // A request dropped during the verification (a shutdown timeout) leaves the
        // outcome unknown: counted so.
        let mut dropped = UnknownIfDropped {
            slot: self,
            id_known: xid != TxId::Unknown,
            armed: true,
        };
        let resolution = Box::pin(commit::resolve(
            in_doubt,
            &settings.connector,
            &settings.pool,
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
                self.committed.set(true);
                self.ended(Outcome::Committed(Reason::CommitVerified));
                Ok(())
            }
            Resolution::Aborted => {
                log::warn!("COMMIT answer lost; {about} did not commit: answering 503");
                self.ended(Outcome::RolledBack(Reason::CommitVerified));
                Err(SessionError::unavailable(LOST_BEFORE_COMMIT))
            }
            Resolution::Unknown => {
                log::error!(
                    "COMMIT answer lost; whether {about} committed could not be learned within \
                     {:?} (or only from a server that restarted since): answering 503 \
                     commit_unknown",
                    settings.checkout_timeout
                );
                self.ended(Outcome::Unknown {
                    id_known: xid != TxId::Unknown,
                });
                Err(SessionError::CommitUnknown)
            }
        }
    }
}

/// `begin` with the transaction-local settings `local` in its message, if there are any.
fn with_local<'a>(
    begin: &'a str,
    local: &[(String, String)],
) -> Result<Cow<'a, str>, SessionError> {
    if local.is_empty() {
        Ok(Cow::Borrowed(begin))
    } else {
        begin_with_settings(begin, local).map(Cow::Owned)
    }
}

/// Counts a COMMIT of unknown outcome when dropped armed.
struct UnknownIfDropped<'a> {
    slot: &'a Slot,
    id_known: bool,
    armed: bool,
}

impl Drop for UnknownIfDropped<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.slot.ended(Outcome::Unknown {
                id_known: self.id_known,
            });
        }
    }
}

/// Drops the slot's handle on the request when the middleware is done (or dropped): the
/// slot lives in the request's extensions, so the handle would keep the request alive,
/// and out of Actix's request pool, for good.
pub(crate) struct ForgetRequest(pub(crate) Slot);

impl Drop for ForgetRequest {
    fn drop(&mut self) {
        self.0.request.borrow_mut().take();
    }
}

/// Rolls back when the request future is dropped before the middleware finished.
pub(crate) struct CancelGuard(pub(crate) Option<Slot>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            if let State::Open(tx) = slot.replace(State::Finalized) {
                log::warn!("request cancelled inside a transaction; rolling back");
                slot.ended(Outcome::RolledBack(Reason::Cancelled));
                abandon(tx, slot.settings.finish_deadline);
            }
        }
    }
}
