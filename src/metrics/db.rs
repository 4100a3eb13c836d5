//! Database metrics: the pool's events and the sessions' transaction outcomes.
//!
//! Names follow Prometheus conventions (base units, `_total` on counters) and stay close to
//! HikariCP's pool metrics and the OpenTelemetry database-client conventions. Every label
//! combination that can occur is created up front, so a series exists (at 0) before its
//! first event and `increase()` sees the first one.

use std::sync::Arc;
use std::time::Duration;

use actix_diesel_session::{
    CloseReason, Outcome, ReadReason, ReadTarget, Reason, SessionObserver, TimeoutKind,
};
use actix_web::HttpRequest;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::http::{self, UNMATCHED};
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

/// Every reason a transaction can be rolled back for.
const ROLLBACK_REASONS: [Reason; 7] = Reason::ALL;

fn kind_label(kind: TimeoutKind) -> KindLabel {
    KindLabel {
        kind: kind.as_str(),
    }
}

fn reason_label(reason: CloseReason) -> ReasonLabel {
    ReasonLabel {
        reason: reason.as_str(),
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
struct ReadLabels {
    target: &'static str,
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
            reason: reason.as_str(),
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
            reason: reason.as_str(),
        }
    }
}

/// Labels of a leak warning or a retry: the request's route and method.
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
    retries: Family<HolderLabels, Counter>,
    reads: Family<ReadLabels, Counter>,
}

impl DbMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> DbMetrics {
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
            retries: registered(
                registry,
                "db_transaction_retries",
                "Requests run again after a serialization failure or deadlock, by route",
                Family::default(),
            ),
            reads: registered(
                registry,
                "db_reads",
                "Read-only sessions begun, by where they ran and why (contract section 10)",
                Family::default(),
            ),
        };
        for kind in TimeoutKind::ALL {
            drop(inner.timeouts.get_or_create(&kind_label(kind)));
        }
        for reason in CloseReason::ALL {
            drop(inner.closed.get_or_create(&reason_label(reason)));
        }
        for reason in ReadReason::ALL {
            let target = match reason {
                ReadReason::Replica => ReadTarget::Replica,
                _ => ReadTarget::Primary,
            };
            drop(inner.reads.get_or_create(&ReadLabels {
                target: target.as_str(),
                reason: reason.as_str(),
            }));
        }
        DbMetrics(Arc::new(inner))
    }
}

/// The route template and method of `request`, as a leak warning or a retry names it.
fn holder(request: &HttpRequest) -> HolderLabels {
    HolderLabels {
        route: request
            .match_pattern()
            .unwrap_or_else(|| UNMATCHED.to_owned()),
        method: http::method_label(request.method()),
    }
}

/// The session layer's events as Prometheus metrics. The leak warning and the retry count
/// add the route template and method of the request.
impl SessionObserver for DbMetrics {
    fn checkout_waited(&self, waited: Duration) {
        self.0.acquire.observe(waited.as_secs_f64());
    }

    fn checkout_timed_out(&self, kind: TimeoutKind) {
        self.0.timeouts.get_or_create(&kind_label(kind)).inc();
    }

    fn connection_opened(&self, took: Duration) {
        self.0.create.observe(took.as_secs_f64());
        self.0.created.inc();
    }

    fn connection_closed(&self, reason: CloseReason, count: u64) {
        self.0
            .closed
            .get_or_create(&reason_label(reason))
            .inc_by(count);
    }

    fn connection_released(&self, held: Duration) {
        self.0.connection_use.observe(held.as_secs_f64());
    }

    fn held_too_long(&self, request: &HttpRequest, _held: Duration) {
        self.0.leak_warnings.get_or_create(&holder(request)).inc();
    }

    fn transaction_retried(&self, request: &HttpRequest, _failed: u32) {
        self.0.retries.get_or_create(&holder(request)).inc();
    }

    fn read_routed(&self, target: ReadTarget, reason: ReadReason) {
        self.0
            .reads
            .get_or_create(&ReadLabels {
                target: target.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    fn transaction_ended(&self, outcome: Outcome) {
        match outcome {
            Outcome::Committed(Reason::CommitVerified) => self.0.commits_verified.inc(),
            Outcome::Committed(_) => self.0.commits.inc(),
            Outcome::RolledBack(reason) => {
                let index = ROLLBACK_REASONS.iter().position(|r| *r == reason);
                match index.and_then(|i| self.0.rollbacks.get(i)) {
                    Some(counter) => counter.inc(),
                    None => 0,
                }
            }
            Outcome::Unknown { id_known: true } => self.0.unknown.inc(),
            Outcome::Unknown { id_known: false } => self.0.xid_unknown.inc(),
            // An outcome a later version of the session layer adds: not counted until
            // the metrics know its label.
            _ => 0,
        };
    }
}
