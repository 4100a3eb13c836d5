//! Database metrics: the pool's events and the sessions' transaction outcomes.
//!
//! Names follow Prometheus conventions (base units, `_total` on counters) and stay close to
//! HikariCP's pool metrics and the OpenTelemetry database-client conventions. Every label
//! combination that can occur is created up front, so a series exists (at 0) before its
//! first event and `increase()` sees the first one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::db::lease::Lease;
use crate::db::pool::{DbPool, PoolError, PooledConnection};
use crate::db::session::Reason;
use crate::metrics::registered;

/// Bucket bounds (seconds) for waiting on the pool: sub-millisecond hand-outs up to the
/// longest sensible `DB_POOL_TIMEOUT`.
const ACQUIRE_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How long a request holds its connection: a few milliseconds normally, up to the leak
/// threshold and beyond.
const USE_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Opening a connection: TCP, TLS and authentication, locally about a millisecond.
const CREATE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Which pool deadline passed (`db_pool_timeouts_total{kind}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Waiting for a free slot, or the session's outer check-out deadline.
    Wait,
    /// Opening a new connection.
    Create,
    /// Checking an idle connection before reuse.
    Recycle,
}

/// Why the pool lost a connection (`db_pool_connections_closed_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Past `DB_POOL_RECYCLE`: retired by the reaper or at check-out.
    Lifetime,
    /// An overflow connection idle for `DB_POOL_IDLE_TIMEOUT`, closed by the reaper.
    Idle,
    /// Detached by the session: COMMIT or ROLLBACK failed, or the request was abandoned
    /// where no rollback could run.
    Broken,
    /// The ping before reuse failed or timed out.
    RecycleFailed,
}

impl TimeoutKind {
    const ALL: [TimeoutKind; 3] = [TimeoutKind::Wait, TimeoutKind::Create, TimeoutKind::Recycle];

    fn labels(self) -> KindLabel {
        let kind = match self {
            TimeoutKind::Wait => "wait",
            TimeoutKind::Create => "create",
            TimeoutKind::Recycle => "recycle",
        };
        KindLabel { kind }
    }
}

impl CloseReason {
    const ALL: [CloseReason; 4] = [
        CloseReason::Lifetime,
        CloseReason::Idle,
        CloseReason::Broken,
        CloseReason::RecycleFailed,
    ];

    fn labels(self) -> ReasonLabel {
        let reason = match self {
            CloseReason::Lifetime => "lifetime",
            CloseReason::Idle => "idle",
            CloseReason::Broken => "broken",
            CloseReason::RecycleFailed => "recycle_failed",
        };
        ReasonLabel { reason }
    }
}

/// Every reason a transaction can be rolled back for.
const ROLLBACK_REASONS: [Reason; 7] = [
    Reason::Status,
    Reason::Error,
    Reason::Panic,
    Reason::Cancelled,
    Reason::CommitFailed,
    Reason::Timeout,
    Reason::CommitVerified,
];

fn reason_label(reason: Reason) -> &'static str {
    match reason {
        Reason::Status => "status",
        Reason::Error => "error",
        Reason::Panic => "panic",
        Reason::Cancelled => "cancelled",
        Reason::CommitFailed => "commit_failed",
        Reason::Timeout => "timeout",
        Reason::CommitVerified => "commit_verified",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransactionLabels {
    outcome: &'static str,
    reason: &'static str,
}

impl TransactionLabels {
    /// A COMMIT: decided by the status, or verified after its answer was lost.
    fn commit(reason: Reason) -> Self {
        TransactionLabels {
            outcome: "commit",
            reason: reason_label(reason),
        }
    }

    /// A COMMIT whose answer was lost and whose outcome could not be learned: the server
    /// could not be asked in time (`commit_unknown`), or the transaction's id was lost
    /// with the COMMIT's answer, so there was nothing to ask about (`xid_unknown`).
    fn unknown(reason: &'static str) -> Self {
        TransactionLabels {
            outcome: "unknown",
            reason,
        }
    }

    fn rollback(reason: Reason) -> Self {
        TransactionLabels {
            outcome: "rollback",
            reason: reason_label(reason),
        }
    }
}

/// Labels of a leak warning: who held the connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HolderLabels {
    pub route: String,
    pub method: &'static str,
}

/// The database metrics, cheap to clone and shared by the pool's hooks, the reaper, the
/// sessions and the `/metrics` handler of one application.
#[derive(Clone, Debug)]
pub struct DbMetrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    acquire: Histogram,
    connection_use: Histogram,
    create: Histogram,
    timeouts: Family<KindLabel, Counter>,
    created: Counter,
    closed: Family<ReasonLabel, Counter>,
    /// The series of `db_transactions_total`, looked up once (every request touches one;
    /// a family lookup takes a lock and hashes the labels). Every one is created up front.
    commits: Counter,
    commits_verified: Counter,
    unknown: Counter,
    xid_unknown: Counter,
    rollbacks: [Counter; ROLLBACK_REASONS.len()],
    leak_warnings: Family<HolderLabels, Counter>,
    leak_warn: Option<Duration>,
}

impl DbMetrics {
    /// Creates the metrics and registers them. `leak_warn` is `DB_LEAK_WARN_SECS`.
    pub fn register(registry: &mut Registry, leak_warn: Option<Duration>) -> DbMetrics {
        let transactions: Family<TransactionLabels, Counter> = registered(
            registry,
            "db_transactions",
            "Request transactions finished, by outcome and by what decided it",
            Family::default(),
        );
        let commits = transactions
            .get_or_create(&TransactionLabels::commit(Reason::Status))
            .clone();
        let commits_verified = transactions
            .get_or_create(&TransactionLabels::commit(Reason::CommitVerified))
            .clone();
        let unknown = transactions
            .get_or_create(&TransactionLabels::unknown("commit_unknown"))
            .clone();
        let xid_unknown = transactions
            .get_or_create(&TransactionLabels::unknown("xid_unknown"))
            .clone();
        let rollbacks = ROLLBACK_REASONS.map(|reason| {
            transactions
                .get_or_create(&TransactionLabels::rollback(reason))
                .clone()
        });
        let inner = Inner {
            acquire: registered(
                registry,
                "db_pool_acquire_duration_seconds",
                "Time a request waited for a pooled connection (successful check-outs)",
                Histogram::new(ACQUIRE_BUCKETS),
            ),
            connection_use: registered(
                registry,
                "db_pool_connection_use_duration_seconds",
                "Time a request held its connection, from check-out to its return or closing",
                Histogram::new(USE_BUCKETS),
            ),
            create: registered(
                registry,
                "db_pool_connection_create_duration_seconds",
                "Time to open a new pooled connection (TCP, TLS, authentication)",
                Histogram::new(CREATE_BUCKETS),
            ),
            timeouts: registered(
                registry,
                "db_pool_timeouts",
                "Check-outs that failed because a pool deadline passed, by deadline",
                Family::default(),
            ),
            created: registered(
                registry,
                "db_pool_connections_created",
                "Pooled connections opened",
                Counter::default(),
            ),
            closed: registered(
                registry,
                "db_pool_connections_closed",
                "Pooled connections closed by the service, by reason",
                Family::default(),
            ),
            commits,
            commits_verified,
            unknown,
            xid_unknown,
            rollbacks,
            leak_warnings: registered(
                registry,
                "db_pool_leak_warnings",
                "Connections held longer than DB_LEAK_WARN_SECS, by the route that held them",
                Family::default(),
            ),
            leak_warn,
        };
        for kind in TimeoutKind::ALL {
            drop(inner.timeouts.get_or_create(&kind.labels()));
        }
        for reason in CloseReason::ALL {
            drop(inner.closed.get_or_create(&reason.labels()));
        }
        DbMetrics(Arc::new(inner))
    }

    /// Checks a connection out of `pool`, timing the wait and counting deadlines.
    pub async fn acquire(&self, pool: &DbPool) -> Result<PooledConnection, PoolError> {
        let started = Instant::now();
        let result = pool.get().await;
        match &result {
            Ok(_) => self.0.acquire.observe(started.elapsed().as_secs_f64()),
            Err(deadpool::managed::PoolError::Timeout(kind)) => self.timeout(match kind {
                deadpool::managed::TimeoutType::Wait => TimeoutKind::Wait,
                deadpool::managed::TimeoutType::Create => TimeoutKind::Create,
                deadpool::managed::TimeoutType::Recycle => TimeoutKind::Recycle,
            }),
            Err(_) => {}
        }
        result
    }

    /// Counts a pool deadline that passed.
    pub fn timeout(&self, kind: TimeoutKind) {
        self.0.timeouts.get_or_create(&kind.labels()).inc();
    }

    /// Opens a pooled connection through `connect`, timing it and counting successes.
    pub async fn create(
        &self,
        connect: impl std::future::Future<Output = Result<AsyncPgConnection, ConnectionError>>,
    ) -> Result<AsyncPgConnection, ConnectionError> {
        let started = Instant::now();
        let result = connect.await;
        if result.is_ok() {
            self.0.create.observe(started.elapsed().as_secs_f64());
            self.0.created.inc();
        }
        result
    }

    /// Counts `n` pooled connections closed for `reason`.
    pub fn closed(&self, reason: CloseReason, n: u64) {
        self.0.closed.get_or_create(&reason.labels()).inc_by(n);
    }

    /// Counts a transaction committed: by the status (`Reason::Status`), or found
    /// committed after its COMMIT's answer was lost (`Reason::CommitVerified`).
    pub fn committed(&self, reason: Reason) {
        if reason == Reason::CommitVerified {
            self.0.commits_verified.inc();
        } else {
            self.0.commits.inc();
        }
    }

    /// Counts a COMMIT whose answer was lost and whose outcome could not be learned;
    /// `id_known`: whether the transaction's id was (so the server could not be asked).
    pub fn commit_unknown(&self, id_known: bool) {
        if id_known {
            self.0.unknown.inc();
        } else {
            self.0.xid_unknown.inc();
        }
    }

    /// Counts a transaction rolled back (or abandoned to the server, which rolls it back).
    pub fn rolled_back(&self, reason: Reason) {
        let index = ROLLBACK_REASONS.iter().position(|r| *r == reason);
        if let Some(counter) = index.and_then(|i| self.0.rollbacks.get(i)) {
            counter.inc();
        }
    }

    /// Starts a check-out: see [`Lease`].
    pub fn lease(&self) -> Lease {
        Lease::start(self.clone())
    }

    /// `DB_LEAK_WARN_SECS`: how long a request may hold a connection before a warning.
    pub fn leak_warn(&self) -> Option<Duration> {
        self.0.leak_warn
    }

    /// Records how long a connection was held.
    pub(crate) fn connection_used(&self, held: Duration) {
        self.0.connection_use.observe(held.as_secs_f64());
    }

    /// Counts a leak warning for the holder.
    pub(crate) fn leak_warning(&self, holder: &HolderLabels) {
        self.0.leak_warnings.get_or_create(holder).inc();
    }
}
