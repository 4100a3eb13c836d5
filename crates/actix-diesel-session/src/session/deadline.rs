//! The request's time bounds, kept by one timer per request.
//!
//! - **Statement deadline**: a statement of the session in flight for longer than its
//!   bound ends the request's work (the handler's statement deadline, none without a
//!   statement timeout; the finish deadline while the COMMIT runs).
//! - **Check-out deadline**: the check-out timeout over check-out plus `BEGIN`.
//!   [`Deadlines::checkout`] records when it is due; the timer flags it expired when it
//!   passes and wakes the check-out, which then gives up.
//! - **Leak warning**: once the session has held its connection that long.
//!
//! The timer lives in [`run_with_deadlines`], which the middleware runs around the
//! handler and its COMMIT: one `Sleep`, re-armed with `reset`, polled after the work at
//! every wake-up. (Not `tokio::select!`: the deadline can move during a poll of the work,
//! when a check-out or a COMMIT starts, and the `Sleep` must be re-armed before it is
//! polled.)

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;

use super::settings::Settings;
use super::tx::CommitState;
use super::watch::WatchHandle;
use crate::error::{SessionError, NO_CONNECTION_IN_TIME};
use crate::observe::TimeoutKind;

/// The request's deadline state, shared by the timer and the session's check-out.
#[derive(Default)]
pub(crate) struct Deadlines {
    /// The watch of the session's connection, once there is one: the timer reads the
    /// in-flight statement from it while the handler holds the connection.
    pub(crate) watch: RefCell<Option<WatchHandle>>,
    /// When the session checked its connection out, once it has: for the leak warning.
    pub(crate) held_since: Cell<Option<Instant>>,
    /// While a check-out (and its BEGIN) is under way: when it must give up.
    checkout_due: Cell<Option<Instant>>,
    /// Set by the timer when `checkout_due` passed: the check-out gives up.
    checkout_expired: Cell<bool>,
    /// The waker of the task waiting on the check-out, woken when its deadline passes: it
    /// need not be the request's own task (`conn()` under `spawn_local`, say).
    checkout_waker: RefCell<Option<Waker>>,
    /// The waker the timer is registered with: a check-out that starts in another task
    /// wakes it, so that the timer is armed for the check-out's deadline.
    timer_waker: RefCell<Option<Waker>>,
}

impl Deadlines {
    /// When the session's statement now running was sent, if one is.
    pub(crate) fn statement_in_flight_since(&self) -> Option<Instant> {
        self.watch
            .borrow()
            .as_ref()
            .and_then(WatchHandle::in_flight_since)
    }

    /// Runs `checkout` (check-out plus BEGIN) within `timeout`: the deadline goes into
    /// the request's state, where the one timer per request watches it (instead of a
    /// timer of its own) and flags it when it passes; the check-out then gives up.
    pub(crate) async fn checkout<T>(
        &self,
        timeout: Duration,
        settings: &Settings,
        checkout: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, SessionError> {
        self.checkout_due.set(Some(later(Instant::now(), timeout)));
        let _done = CheckoutOver(self);
        // Not boxed, although it makes every handler's future larger: the box (an
        // allocation and a copy per check-out) costs more than the larger future's moves
        // (BENCHMARKS.md, "The session layer's own cost").
        let mut checkout = std::pin::pin!(checkout);
        std::future::poll_fn(|cx| match checkout.as_mut().poll(cx) {
            Poll::Pending if self.checkout_expired.get() => {
                settings.observer.checkout_timed_out(TimeoutKind::Wait);
                Poll::Ready(Err(SessionError::unavailable(NO_CONNECTION_IN_TIME)))
            }
            Poll::Pending => {
                let mut waker = self.checkout_waker.borrow_mut();
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                    // Checking out in a task of its own (`conn()` under `spawn_local`): the
                    // timer learns of the deadline only when it is polled.
                    if let Some(timer) = self.timer_waker.borrow().as_ref() {
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
}

/// Clears the check-out deadline when the check-out is over (done, failed, timed out or
/// dropped).
struct CheckoutOver<'a>(&'a Deadlines);

impl Drop for CheckoutOver<'_> {
    fn drop(&mut self) {
        self.0.checkout_due.set(None);
        self.0.checkout_expired.set(false);
        self.0.checkout_waker.borrow_mut().take();
    }
}

/// Drives the request's work (the handler, then its COMMIT) under the request's
/// deadlines (see the module docs), with one timer:
/// - returns `None` if one of the session's statements has been in flight for longer
///   than its bound (the work is then dropped). The timer sleeps a whole deadline while
///   no statement runs and re-arms relative to the start of the statement in flight, so a
///   handler that runs many short statements is never cut off, while one that waits on a
///   silent peer is, after at most one deadline;
/// - flags an expired check-out and polls the work again (or wakes the task that waits
///   on the check-out), so that `DbSession::conn` returns its error to the handler;
/// - warns once about a connection held too long.
///
/// The work is pinned by the caller: taken by value it would sit in this future twice
/// (argument and pinned local), and that future is moved around on every request.
pub(crate) async fn run_with_deadlines<F: Future>(
    mut work: Pin<&mut F>,
    deadlines: &Deadlines,
    commit: &CommitState,
    settings: &Settings,
    request: &RefCell<Option<HttpRequest>>,
) -> Option<F::Output> {
    // The bound on the statement in flight, if it has one.
    let deadline = || {
        if commit.committing.get() {
            Some(settings.finish_deadline)
        } else {
            settings.statement_deadline
        }
    };
    // Whether the timer was armed for the COMMIT since it began.
    let mut armed_for_commit = false;
    // `None` once warned (or when the warning is off).
    let mut leak_after = settings.leak_warn;
    let next_wake = |leak_after: Option<Duration>| {
        let now = Instant::now();
        let mut wake = later(
            deadlines.statement_in_flight_since().unwrap_or(now),
            deadline().unwrap_or(Duration::MAX),
        );
        if let Some(due) = deadlines.checkout_due.get() {
            if !deadlines.checkout_expired.get() {
                wake = wake.min(due);
            }
        }
        // Before the check-out, wake when a connection taken now would be overdue.
        leak_after.map_or(wake, |after| {
            wake.min(later(deadlines.held_since.get().unwrap_or(now), after))
        })
    };
    let mut armed_for = next_wake(leak_after);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(armed_for.into()));
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        // A check-out or a COMMIT that started during this poll may be due before the
        // timer.
        let mut due = deadlines
            .checkout_due
            .get()
            .filter(|_| !deadlines.checkout_expired.get());
        if commit.committing.get() && !armed_for_commit {
            armed_for_commit = true;
            let since = deadlines
                .statement_in_flight_since()
                .unwrap_or_else(Instant::now);
            let commit_due = later(since, settings.finish_deadline);
            due = Some(due.map_or(commit_due, |d| d.min(commit_due)));
        }
        if let Some(due) = due.filter(|due| *due < armed_for) {
            armed_for = due;
            sleep.as_mut().reset(due.into());
        }
        // Unconstrained: out of the task's cooperative budget, a `Sleep` answers Pending
        // without registering the waker, and it would not be polled again.
        if std::pin::pin!(tokio::task::coop::unconstrained(sleep.as_mut()))
            .poll(cx)
            .is_pending()
        {
            // A check-out in another task wakes this one to arm the timer for it.
            let mut timer = deadlines.timer_waker.borrow_mut();
            if !timer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *timer = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        // The timer fired.
        let now = Instant::now();
        if let (Some(since), Some(deadline)) = (deadlines.statement_in_flight_since(), deadline()) {
            if now.saturating_duration_since(since) >= deadline {
                log::warn!("a statement got no answer within {deadline:?}; closing its connection");
                return Poll::Ready(None);
            }
        }
        if deadlines.checkout_due.get().is_some_and(|due| now >= due) {
            // The check-out gives up when it is polled again: at the top of the loop when
            // the work drives it, else in the task its waker belongs to.
            deadlines.checkout_expired.set(true);
            if let Some(waker) = deadlines.checkout_waker.borrow_mut().take() {
                waker.wake();
            }
        }
        if let (Some(after), Some(held_since)) = (leak_after, deadlines.held_since.get()) {
            if now.saturating_duration_since(held_since) >= after {
                if let Some(request) = request.borrow().as_ref() {
                    warn_leak(settings, request, after);
                }
                leak_after = None;
            }
        }
        armed_for = next_wake(leak_after);
        sleep.as_mut().reset(armed_for.into());
    })
    .await
}

/// The leak warning, like HikariCP's `leakDetectionThreshold`: raised from the request's
/// own timer while the request still holds its connection, so that it names the request.
fn warn_leak(settings: &Settings, request: &HttpRequest, after: Duration) {
    log::warn!(
        "possible connection leak: {} {} has held a database connection for more than {after:?}",
        request.method(),
        request
            .match_pattern()
            .unwrap_or_else(|| request.path().to_owned()),
    );
    settings.observer.held_too_long(request, after);
}

/// `start + after`, or a time far beyond any request's life when that overflows (the
/// configuration allows very long timeouts).
pub(crate) fn later(start: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    start
        .checked_add(after)
        .unwrap_or_else(|| start + FAR.min(after))
}
