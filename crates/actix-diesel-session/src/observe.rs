//! What the session layer reports as it works, for metrics and logs of the application's
//! own choosing.
//!
//! Implement [`SessionObserver`] (every method defaults to doing nothing) and pass it to
//! [`crate::Database::builder`]. Its methods are called inline on the request's path, on
//! the thread that runs the request, within the request's own future where they concern a
//! request (so task-locals such as a request id are visible): keep them cheap (an atomic
//! increment, a histogram observation) and never block in them.

use std::time::Duration;

use actix_web::HttpRequest;

use crate::replica::{ReadReason, ReadTarget};

/// Receives the session layer's events. Every method defaults to nothing.
pub trait SessionObserver: Send + Sync + 'static {
    /// A request checked a pooled connection out after waiting `waited`.
    fn checkout_waited(&self, waited: Duration) {
        let _ = waited;
    }

    /// A check-out gave up because a deadline passed.
    fn checkout_timed_out(&self, kind: TimeoutKind) {
        let _ = kind;
    }

    /// The pool opened a connection, which took `took` (TCP, TLS, authentication).
    fn connection_opened(&self, took: Duration) {
        let _ = took;
    }

    /// The session layer closed `count` pooled connections for `reason`.
    fn connection_closed(&self, reason: CloseReason, count: u64) {
        let _ = (reason, count);
    }

    /// A request's connection went back to the pool or was closed after it held it for
    /// `held` (from check-out).
    fn connection_released(&self, held: Duration) {
        let _ = held;
    }

    /// `request` has held its connection for longer than the configured leak warning
    /// threshold, `held`; called once per request, while it still holds it. The session
    /// layer also logs a warning naming the request's method and route.
    fn held_too_long(&self, request: &HttpRequest, held: Duration) {
        let _ = (request, held);
    }

    /// A request's transaction ended.
    fn transaction_ended(&self, outcome: Outcome) {
        let _ = outcome;
    }

    /// `request`'s transaction ended in a conflict (serialization failure or deadlock)
    /// on attempt `failed` (1 for the first), and the request is about to run again
    /// ([`crate::SessionMiddleware::retry`]). The attempt's rollback was reported to
    /// [`SessionObserver::transaction_ended`] already.
    fn transaction_retried(&self, request: &HttpRequest, failed: u32) {
        let _ = (request, failed);
    }

    /// A read-only session began on `target`, for `reason` (see
    /// [`crate::DatabaseBuilder::replicas`]). A read run again on the primary after its
    /// replica connection broke is reported again.
    fn read_routed(&self, target: ReadTarget, reason: ReadReason) {
        let _ = (target, reason);
    }
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl SessionObserver for NoObserver {}

/// How a request's transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It committed.
    Committed(Reason),
    /// It was rolled back, or abandoned to the server, which rolls it back.
    RolledBack(Reason),
    /// Its COMMIT's answer was lost and whether it committed could not be learned in time.
    /// `id_known`: whether the transaction's id was known (when it was not, it was lost
    /// with the COMMIT's answer, and there was nothing to ask about).
    Unknown {
        /// Whether the transaction's id was known.
        id_known: bool,
    },
}

/// What decided a transaction's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// The response status decided: below 400 commits, anything else rolls back.
    Status,
    /// The handler (or a middleware inside the session's) returned an error, or a response
    /// that carries one: this includes the errors of a server-side timeout (57014), a
    /// conflict or a lost connection that the handler passed on.
    Error,
    /// The handler panicked.
    Panic,
    /// The request future was dropped before it finished: a shutdown timeout, a worker
    /// stopping, an outer timeout. (A client that disconnects does not drop it: Actix-web
    /// 4 runs the handler to its end, and its transaction ends by the status.)
    Cancelled,
    /// COMMIT failed, or could not be attempted because the transaction was aborted.
    CommitFailed,
    /// A statement outlived its client-side deadline: the connection was closed.
    Timeout,
    /// The COMMIT's answer was lost, and the outcome was then learned from the server on
    /// another connection.
    CommitVerified,
}

impl Reason {
    /// Every reason, for metrics that create their series up front.
    pub const ALL: [Reason; 7] = [
        Reason::Status,
        Reason::Error,
        Reason::Panic,
        Reason::Cancelled,
        Reason::CommitFailed,
        Reason::Timeout,
        Reason::CommitVerified,
    ];

    /// A short snake_case name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Status => "status",
            Reason::Error => "error",
            Reason::Panic => "panic",
            Reason::Cancelled => "cancelled",
            Reason::CommitFailed => "commit_failed",
            Reason::Timeout => "timeout",
            Reason::CommitVerified => "commit_verified",
        }
    }
}

/// Which check-out deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// Waiting for a free place in the pool, or the session's outer check-out deadline.
    Wait,
    /// Opening a new connection.
    Create,
    /// Checking an idle connection before reuse.
    Recycle,
}

impl TimeoutKind {
    /// Every kind.
    pub const ALL: [TimeoutKind; 3] =
        [TimeoutKind::Wait, TimeoutKind::Create, TimeoutKind::Recycle];

    /// A short snake_case name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Wait => "wait",
            TimeoutKind::Create => "create",
            TimeoutKind::Recycle => "recycle",
        }
    }
}

/// Why the session layer closed a pooled connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// Past its maximum lifetime: retired by the reaper or at check-out.
    Lifetime,
    /// A connection beyond the pool's base size, idle for the idle timeout.
    Idle,
    /// Detached by the session: ROLLBACK failed, the COMMIT's answer was lost, a
    /// statement outlived its deadline, or the request was abandoned where no rollback
    /// could run.
    Broken,
    /// The ping before reuse failed or timed out.
    RecycleFailed,
}

impl CloseReason {
    /// Every reason.
    pub const ALL: [CloseReason; 4] = [
        CloseReason::Lifetime,
        CloseReason::Idle,
        CloseReason::Broken,
        CloseReason::RecycleFailed,
    ];

    /// A short snake_case name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Lifetime => "lifetime",
            CloseReason::Idle => "idle",
            CloseReason::Broken => "broken",
            CloseReason::RecycleFailed => "recycle_failed",
        }
    }
}
