//! [`SessionMiddleware`]: what happens to a request, in order.
//!
//! 1. A [`Slot`] for the request's session goes into the request's extensions, where
//!    [`super::DbSession`] finds it. Nothing is checked out yet.
//! 2. The handler runs, inside the request's deadlines (`deadline::run_with_deadlines`);
//!    its panic is caught.
//! 3. A response below 400 that carries no error commits, still inside the deadlines;
//!    anything else (a status of 400 or more, an error, a panic) rolls back.
//! 4. The response goes out only once the transaction has ended: the handler's when it
//!    committed (or nothing was checked out), the error's otherwise.
//! 5. With a retry policy ([`SessionMiddleware::retry`]), a transaction that ended in a
//!    conflict goes back to step 1 with a new slot, the same request and a copy of its
//!    body, instead of step 4 (`session::retry`).
//!
//! A statement past its deadline ends the work at once: its connection is closed (or, for
//! a COMMIT sent, the outcome is resolved first); a request future dropped half-way rolls
//! back in a spawned task (`CancelGuard`).

use std::future::{ready, Ready};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::HttpMessage;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::deadline::run_with_deadlines;
use super::options::{Isolation, SettingsFn, TxOptions};
use super::retry::Retry;
use super::settings::Settings;
use super::slot::{CancelGuard, ForgetRequest, ReplicaFailure, Slot};
use super::tx::Finish;
use super::watch::WatchHandle;
use crate::error::SessionError;
use crate::observe::Reason;
use crate::replica::{CommitPosition, ReadAfter};
use crate::workers::WorkerPools;

/// The finalizing middleware: one transaction per request, committed before the response
/// when the status is below 400, rolled back otherwise (see the crate docs for the whole
/// rule). Made by [`crate::Database::middleware`]; wrap it around the scopes or resources
/// whose handlers take a [`super::DbSession`]:
///
/// ```no_run
/// # use actix_diesel_session::Database;
/// # use actix_web::{web, App, HttpResponse};
/// # fn app(db: Database) {
/// App::new().service(
///     web::resource("/accounts")
///         .route(web::post().to(|| async { HttpResponse::Created().finish() }))
///         .wrap(db.middleware()),
/// );
/// # }
/// ```
///
/// It may wrap the `App`, a scope, a resource or a route: only the requests it wraps get
/// a session. Wrapped more than once around the same route, there is still one session
/// per request, the outermost one's (and its [`crate::Database`]'s), with the options of
/// the innermost: a scope can carry the defaults and a route override them, say
/// `.route("/report", web::get().to(report).wrap(db.middleware().read_only()))`.
#[derive(Clone)]
pub struct SessionMiddleware {
    settings: Arc<Settings>,
    /// The workers' own pools: each worker's services run on its own
    /// ([`crate::SessionConfig::worker_pools`]).
    workers: Option<Arc<WorkerPools>>,
    options: Arc<TxOptions>,
}

impl SessionMiddleware {
    pub(crate) fn new(settings: Arc<Settings>, workers: Option<Arc<WorkerPools>>) -> Self {
        let mut options = TxOptions::default();
        options.begin = options.begin_sql() + &settings.begin_suffix;
        options.replica_begin = options.replica_begin_sql() + &settings.begin_suffix;
        SessionMiddleware {
            settings,
            workers,
            options: Arc::new(options),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut TxOptions)) -> Self {
        let options = Arc::make_mut(&mut self.options);
        change(options);
        options.begin = options.begin_sql() + &self.settings.begin_suffix;
        options.replica_begin = options.replica_begin_sql() + &self.settings.begin_suffix;
        self
    }

    /// Runs the sessions at this isolation level, sent in the `BEGIN` itself
    /// (`BEGIN ISOLATION LEVEL SERIALIZABLE`): no round trip added. Without it a session
    /// runs at the server's default (`default_transaction_isolation`) on the primary, and
    /// at `REPEATABLE READ` on a replica, which refuses `SERIALIZABLE` also as a default.
    /// `SERIALIZABLE` sessions never run on a replica.
    ///
    /// ```no_run
    /// # use actix_diesel_session::{Database, Isolation};
    /// # use actix_web::web;
    /// # fn routes(db: &Database) -> actix_web::Scope<impl actix_web::dev::ServiceFactory<actix_web::dev::ServiceRequest, Config = (), Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, Error = actix_web::Error, InitError = ()>> {
    /// web::scope("/reports").wrap(
    ///     db.middleware()
    ///         .isolation(Isolation::Serializable)
    ///         .read_only()
    ///         .deferrable(),
    /// )
    /// # }
    /// ```
    pub fn isolation(self, level: Isolation) -> Self {
        self.with(|o| o.isolation = Some(level))
    }

    /// Runs the sessions as `READ ONLY` transactions: a write fails (SQLSTATE 25006), the
    /// transaction rolls back, and the middleware answers 500 ([`SessionError::Internal`])
    /// in place of the handler's error (whose class, a read-only server after a failover,
    /// would invite a retry that never helps). A
    /// read-only transaction has no id to learn, so its COMMIT goes out alone (one
    /// statement less than a read-write one), and a lost COMMIT answer changes nothing.
    pub fn read_only(self) -> Self {
        self.with(|o| o.read_only = true)
    }

    /// Adds `DEFERRABLE`: with `SERIALIZABLE` and `READ ONLY`, the transaction waits for a
    /// snapshot that cannot conflict, then runs without serialization checks.
    pub fn deferrable(self) -> Self {
        self.with(|o| o.deferrable = true)
    }

    /// Computes transaction-local settings from each request (`SET LOCAL` as
    /// `set_config(name, value, true)`), sent in the same message as the `BEGIN`: no round
    /// trip added, and gone with the transaction. For row-level security, say:
    ///
    /// ```no_run
    /// # use actix_diesel_session::Database;
    /// # fn mw(db: &Database) -> actix_diesel_session::SessionMiddleware {
    /// db.middleware().settings_from(|req| {
    ///     let tenant = req.headers().get("x-tenant").and_then(|v| v.to_str().ok());
    ///     tenant
    ///         .map(|t| vec![("app.tenant_id".to_owned(), t.to_owned())])
    ///         .unwrap_or_default()
    /// })
    /// # }
    /// ```
    pub fn settings_from(
        self,
        settings: impl Fn(&ServiceRequest) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> Self {
        let settings: SettingsFn = Arc::new(settings);
        self.with(|o| o.settings = Some(settings))
    }
}

impl SessionMiddleware {
    /// Runs a request again, from the start and in a new transaction, when its
    /// transaction ends in a serialization failure (40001) or a deadlock (40P01), as
    /// [`Retry`] says (by default up to 3 attempts with a jittered back-off, within 2 s).
    /// Only the last attempt's response is sent; when every attempt conflicted, the
    /// answer is [`SessionError::Conflict`] (rendered as the application renders
    /// errors). Each retry is reported to [`crate::SessionObserver::transaction_retried`].
    ///
    /// Side effects other than the session's own writes are not undone between attempts:
    /// put them in [`super::DbSession::after_commit`] hooks, which run only for the attempt
    /// that committed. Wrap a resource or a route, not a scope (the request is run through
    /// the inner services again, and a scope would route it a second time). Nested inside
    /// another session middleware, this one takes over the request's session, which has not
    /// begun yet. See `session::retry` for the whole rule.
    ///
    /// ```no_run
    /// # use actix_diesel_session::{Database, Isolation, Retry};
    /// # use actix_web::{web, HttpResponse};
    /// # fn routes(db: &Database) -> actix_web::Resource<impl actix_web::dev::ServiceFactory<actix_web::dev::ServiceRequest, Config = (), Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, Error = actix_web::Error, InitError = ()>> {
    /// web::resource("/bookings")
    ///     .route(web::post().to(|| async { HttpResponse::Created().finish() }))
    ///     .wrap(
    ///         db.middleware()
    ///             .isolation(Isolation::Serializable)
    ///             .retry(Retry::default().attempts(5).body_limit(64 * 1024)),
    ///     )
    /// # }
    /// ```
    pub fn retry(self, retry: Retry) -> Self {
        self.with(|o| o.retry = Some(retry))
    }

    /// After a read-write session commits, reads the primary's WAL insert position
    /// (`pg_current_wal_insert_lsn()`, through the simple protocol, on the session's own
    /// connection before it goes back to the pool, so no second wait for the pool under
    /// load) and puts it into the response's extensions as a
    /// [`crate::CommitPosition`]: a position at or past the transaction's commit record,
    /// which a later request can hand back as [`crate::ReadAfter`] to be served only by a
    /// replica that has replayed the write (read-your-writes). Costs a round trip per
    /// write, after the COMMIT. If the position cannot be read (or the COMMIT's answer was
    /// lost and the commit confirmed elsewhere), an error is logged and the response
    /// carries the highest position there is instead, which sends reads that hand it
    /// back to the primary: the write is committed all the same.
    pub fn commit_position(self) -> Self {
        self.with(|o| o.commit_position = true)
    }
}

impl<S, B> Transform<S, ServiceRequest> for SessionMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Transform = SessionService<S>;
    type InitError = ();
    type Future = Ready<Result<SessionService<S>, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        // Called on the worker that will run the service: its own pool, if it has one.
        let settings = self
            .workers
            .as_ref()
            .and_then(WorkerPools::settings_here)
            .unwrap_or_else(|| self.settings.clone());
        ready(Ok(SessionService {
            service: Rc::new(service),
            settings,
            options: self.options.clone(),
        }))
    }
}

/// The service [`SessionMiddleware`] wraps around a route.
pub struct SessionService<S> {
    service: Rc<S>,
    settings: Arc<Settings>,
    options: Arc<TxOptions>,
}

impl<S, B> Service<ServiceRequest> for SessionService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<ServiceResponse<BoxBody>, actix_web::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        let outer = req.extensions().get::<Slot>().cloned();
        let mut inherited = Vec::new();
        let mut settings = self.settings.clone();
        if let Some(slot) = outer {
            if self.options.retry.is_none() || !slot.is_idle() {
                // An outer session middleware already runs this request's session: this
                // one, nearer the handler, says which options it runs with.
                slot.override_options(&self.options, &req);
                return Box::pin(async move {
                    service
                        .call(req)
                        .await
                        .map(ServiceResponse::map_into_boxed_body)
                });
            }
            // This one retries: it runs the session itself, around the services it can
            // call again, with the outer one's database and settings. The outer session
            // stays idle, and ends with nothing to do.
            inherited = slot.local.borrow().clone();
            settings = slot.settings.clone();
        }
        let options = self.options.clone();
        // Two futures boxed apart: a request without retries does not carry (allocate and
        // move) the larger state of one with them.
        match options.retry.clone() {
            None => {
                Box::pin(async move { once(req, &service, &settings, &options, inherited).await })
            }
            Some(retry) => Box::pin(async move {
                with_retries(req, &service, &settings, &options, inherited, &retry).await
            }),
        }
    }
}

/// Runs one request under one session, the usual case.
async fn once<S, B>(
    req: ServiceRequest,
    service: &Rc<S>,
    settings: &Arc<Settings>,
    options: &Arc<TxOptions>,
    inherited: Vec<(String, String)>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    let again = (settings.replicas.is_some() && options.read_only).then(|| inherited.clone());
    let (slot, attempt) = finalize(req, service, settings, options, inherited, false, false).await;
    // A read whose replica connection broke, or whose replica gave no answer within the
    // statement deadline, or whose statement replay cancelled there (a recovery conflict),
    // before it answered: nothing was sent, and the primary may well serve it. Once, and
    // only for a session that began on a replica, did not commit and answered a server
    // error. Never a statement cancelled by its own statement timeout: run again on the
    // primary, it would double the time and the load it takes, for the same answer.
    let failure = slot.replica_failure();
    if let Some(ReplicaFailure::Broken(error)) = &failure {
        slot.mark_replica_down(error);
    }
    let failed_on_replica = failure.is_some()
        && !slot.has_committed()
        && !slot.guard_escaped()
        && matches!(&attempt, Attempt::Answer(Ok(res)) if res.status().is_server_error());
    let (slot, attempt) = match (failed_on_replica, again, attempt) {
        (true, Some(inherited), Attempt::Answer(Ok(res))) => {
            drop(slot);
            let (request, _) = res.into_parts();
            // As a retry does: the attempt's session must be gone from the request.
            let old = request.extensions_mut().remove::<Slot>();
            drop(old);
            match failure {
                Some(ReplicaFailure::Conflict) => log::info!(
                    "replay on its replica cancelled a read (a recovery conflict); running it \
                     again on the primary"
                ),
                _ => log::warn!(
                    "a read's replica connection broke before it answered; running it again on \
                     the primary"
                ),
            }
            // Reads carry no body to replay (a body the handler read is not kept).
            let req = ServiceRequest::from_parts(request, Payload::None);
            finalize(req, service, settings, options, inherited, false, true).await
        }
        (_, _, attempt) => (slot, attempt),
    };
    let response = match attempt {
        Attempt::Answer(response) => response,
        // Never without a retry policy; answered as the handler did, all the same.
        Attempt::Conflict(res) => Ok(res.map_into_boxed_body()),
    };
    slot.after_commit().await;
    response
}

/// Runs one request under a session per attempt, running it again after a conflict as
/// `retry` says; see `session::retry`.
async fn with_retries<S, B>(
    mut req: ServiceRequest,
    service: &Rc<S>,
    settings: &Arc<Settings>,
    options: &Arc<TxOptions>,
    inherited: Vec<(String, String)>,
    retry: &Retry,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // Where routing stood: a router inside (a scope's) would move it on.
    let routed = (
        req.match_info().unprocessed().len(),
        req.match_info().segment_count(),
    );
    let body = retry.buffer(&mut req).await;
    // After the body: a slow upload does not use up the time for retries.
    let started = Instant::now();
    let mut failed = 0;
    loop {
        let (slot, attempt) = finalize(
            req,
            service,
            settings,
            options,
            inherited.clone(),
            body.is_some(),
            false,
        )
        .await;
        let res = match attempt {
            Attempt::Answer(response) => {
                slot.after_commit().await;
                return response;
            }
            Attempt::Conflict(res) => res,
        };
        failed += 1;
        // The attempt's session is over: its hooks go with it, and the request must be
        // rid of it (and of every handle on the request) to be run again.
        drop(slot);
        let (request, _) = res.into_parts();
        // Dropped after the extensions are released: what its hooks captured may look at
        // the request when dropped.
        let old = request.extensions_mut().remove::<Slot>();
        drop(old);
        let conflict = |request| {
            let response = (settings.render)(SessionError::Conflict);
            Ok(ServiceResponse::new(request, response))
        };
        let Some(delay) = retry.delay(failed, started.elapsed()) else {
            log::warn!("transaction conflict on attempt {failed}; no attempt left in time");
            return conflict(request);
        };
        let info = request.match_info();
        if (info.unprocessed().len(), info.segment_count()) != routed {
            log::error!(
                "a session middleware that retries wraps a scope, which cannot route a request \
                 twice: wrap the resource or route instead; answering the conflict"
            );
            return conflict(request);
        }
        let Some(body) = &body else {
            return conflict(request);
        };
        settings.observer.transaction_retried(&request, failed);
        log::info!(
            "transaction conflict on attempt {failed}; running the request again in {delay:?}"
        );
        tokio::time::sleep(delay).await;
        req = ServiceRequest::from_parts(request, Payload::from(body.clone()));
    }
}

/// How one attempt at a request ended.
enum Attempt<B> {
    /// The answer to send (its transaction has ended).
    Answer(Result<ServiceResponse<BoxBody>, actix_web::Error>),
    /// The transaction rolled back after a conflict and may be run again (only when the
    /// attempt was told it may): the handler's response, whose request is needed again.
    Conflict(ServiceResponse<B>),
}

/// Runs one request (or one attempt at it) under its session; see the module docs. The
/// session's per-request settings are `inherited` (an outer middleware's) and this one's
/// own. With `retryable`, a transaction that ended in a conflict is given back as
/// [`Attempt::Conflict`] rather than answered. The after-commit hooks are left to the
/// caller, to run once the attempt is known to be the last.
async fn finalize<S, B>(
    req: ServiceRequest,
    service: &Rc<S>,
    settings: &Arc<Settings>,
    options: &Arc<TxOptions>,
    mut local: Vec<(String, String)>,
    retryable: bool,
    primary_only: bool,
) -> (Slot, Attempt<B>)
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    if let Some(f) = &options.settings {
        local.extend(f(&req));
    }
    let slot = Slot::new(settings.clone(), options.clone(), local);
    if settings.replicas.is_some() {
        slot.read_after
            .set(req.extensions().get::<ReadAfter>().map(|after| after.0));
        slot.primary_only.set(primary_only);
    }
    req.extensions_mut().insert(slot.clone());
    // No clone of the request is kept here: around a scope, the scope's router needs it
    // unshared. The slot learns it when a handler extracts its session.
    let forget = ForgetRequest(slot.clone());

    let mut cancel = CancelGuard(Some(slot.clone()));
    // The handler and, when it succeeded, its COMMIT run under the same deadlines. The
    // handler's outcome is kept outside the work, so that it survives a COMMIT cut off by
    // its deadline (the lost COMMIT may turn out to have committed). The work is dropped
    // at the end of this block, before anything below looks at the slot: dropping it
    // parks the connection the handler held back in the slot, where `discard` finds it.
    let mut outcome = None;
    let committed = {
        let work = std::pin::pin!(async {
            let result = AssertUnwindSafe(service.call(req)).catch_unwind().await;
            let commit = matches!(&result, Ok(Ok(res)) if succeeded(res));
            outcome = Some(result);
            if commit {
                Some(slot.finish(true, Reason::Status).await)
            } else {
                None
            }
        });
        run_with_deadlines(
            work,
            &slot.deadlines,
            &slot.commit,
            &slot.settings,
            &slot.request,
        )
        .await
    };
    cancel.0 = None;

    let attempt = match (committed, outcome) {
        (Some(committed), Some(outcome)) => answer(&slot, committed, outcome, retryable).await,
        // A statement outlived its deadline.
        (_, outcome) => Attempt::Answer(after_deadline(&slot, outcome).await),
    };
    drop(forget);
    (slot, attempt)
}

/// The answer once the work is done: the handler's outcome (`outcome`), after its
/// transaction ended (`committed`: the COMMIT's result, if one was made).
async fn answer<B: MessageBody + 'static>(
    slot: &Slot,
    committed: Option<Result<(), Finish>>,
    outcome: HandlerOutcome<B>,
    retryable: bool,
) -> Attempt<B> {
    let render = |e: SessionError| (slot.settings.render)(e);

    Attempt::Answer(match outcome {
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            log::error!("handler panicked: {message}");
            // A rollback failure has nothing to add to a 500.
            let _ = slot.finish(false, Reason::Panic).await;
            respond(slot, render(SessionError::internal("handler panicked")))
        }
        Ok(Err(err)) => {
            let _ = slot.finish(false, Reason::Error).await;
            Err(err)
        }
        Ok(Ok(res)) => {
            // Read before the session ends: the watch goes with the connection.
            let watch = slot.deadlines.watch.borrow().clone();
            let refused_write = slot.options.borrow().read_only
                && watch.as_ref().is_some_and(WatchHandle::refused_write);
            let conflict_seen = watch.as_ref().is_some_and(WatchHandle::conflict);
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
            if retryable && !slot.has_committed() {
                // Rolled back (or refused at COMMIT) because of a conflict: worth another
                // attempt. A COMMIT whose answer was lost is not: it may have committed.
                // Never when the handler's connection guard outlived it: that connection
                // is still out, and the next attempt would hold a second one.
                let conflict = !slot.guard_escaped()
                    && match &finished {
                        Ok(()) => conflict_seen,
                        Err(Finish::Failed(e)) => conflict_seen || e.is_conflict(),
                        Err(Finish::AnswerLost) => false,
                    };
                if conflict {
                    return Attempt::Conflict(res);
                }
            }
            let finished = match finished {
                Err(Finish::AnswerLost) => slot.resolve_lost_commit().await,
                // A COMMIT refused because a conflict aborted the transaction (the
                // handler swallowed the 40001/40P01 and answered success): the conflict
                // is what the client must be told, 503 and worth a retry, not a 500.
                Err(Finish::Failed(_)) if conflict_seen && !slot.guard_escaped() => {
                    Err(SessionError::Conflict)
                }
                Err(Finish::Failed(e)) => Err(e),
                // The handler passed on the server's refusal of a write in a session that
                // asked to be read-only (25006, which the error's class calls a read-only
                // server, worth a retry): a programming error, and a retry never helps.
                Ok(()) if refused_write => Err(SessionError::internal(
                    "a write was attempted in a read-only session",
                )),
                Ok(()) => Ok(()),
            };
            match finished {
                Ok(()) => Ok(with_position(slot, res.map_into_boxed_body())),
                Err(e) => Ok(res.into_response(render(e))),
            }
        }
    })
}

/// A committed answer with the write's position in its extensions, if it has one
/// ([`Slot::answer_position`]).
fn with_position(slot: &Slot, mut res: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
    if let Some(position) = slot.answer_position() {
        res.response_mut()
            .extensions_mut()
            .insert(CommitPosition(position));
    }
    res
}

/// Whether the handler's answer commits: a status below 400 that is not an error.
fn succeeded(res: &ServiceResponse<impl MessageBody>) -> bool {
    res.status().as_u16() < 400 && res.response().error().is_none()
}

/// The answer after a statement outlived its deadline and the work future was dropped
/// (which cancelled the statement on our side). If it was a COMMIT already sent, its
/// outcome is resolved on another connection, and the handler's response (`outcome`) is
/// sent if it committed; any other statement's connection cannot be trusted and is
/// closed: [`SessionError::Timeout`].
async fn after_deadline(
    slot: &Slot,
    outcome: Option<HandlerOutcome<impl MessageBody + 'static>>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let error = if !slot.commit.sent.get() {
        // Not a COMMIT, or one not sent yet (cut off in the transaction-id query a
        // connection's first COMMIT waits for): no outcome in doubt.
        drop(slot.commit.in_doubt.borrow_mut().take());
        slot.discard();
        SessionError::Timeout
    } else {
        log::error!(
            "COMMIT got no answer within {:?}",
            slot.settings.finish_deadline
        );
        match (slot.resolve_lost_commit().await, outcome) {
            // Only a successful response is ever committed.
            (Ok(()), Some(Ok(Ok(res)))) => {
                return Ok(with_position(slot, res.map_into_boxed_body()))
            }
            // A COMMIT the handler made early and the deadline cut off: it committed,
            // but the handler's response is gone. The only 5xx that may answer a write
            // that committed says it may have.
            (Ok(()), _) => SessionError::CommitUnknown,
            (Err(e), _) => e,
        }
    };
    // A statement ran, so a handler took the session and the slot knows the request.
    respond(slot, (slot.settings.render)(error))
}

/// A response the middleware makes itself, for the request the slot learned when a
/// handler extracted its session. A handler that never did (it panicked without one) has
/// left no request to answer with: the response then goes out as an error, which Actix
/// turns into the same response (outer middleware sees an `Err`).
fn respond(
    slot: &Slot,
    response: actix_web::HttpResponse,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    match slot.request.borrow_mut().take() {
        Some(request) => Ok(ServiceResponse::new(request, response)),
        None => {
            Err(actix_web::error::InternalError::from_response("handler failed", response).into())
        }
    }
}

/// What the inner service gave: a response, an error, or a panic.
type HandlerOutcome<B> =
    Result<Result<ServiceResponse<B>, actix_web::Error>, Box<dyn std::any::Any + Send>>;
