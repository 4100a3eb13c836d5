//! [`SessionConfig`]: every limit of the pool and the sessions, as plain values.
//!
//! The crate reads no environment: the application maps its own configuration onto this.

use std::time::Duration;

/// Margin added to the server's statement timeout for the client-side statement deadline,
/// so that the server's own cancellation (a clean 57014 error, connection reusable) always
/// wins when the server is alive.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// The bound on COMMIT, ROLLBACK and clean-up when neither a statement timeout nor an
/// idle-in-transaction timeout is set (see [`SessionConfig::finish_deadline`]).
pub const FINISH_DEADLINE_FALLBACK: Duration = Duration::from_secs(60);

/// Every limit of the pool and the sessions. `Default` gives the values in brackets.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SessionConfig {
    /// `application_name` of the pooled connections (`"actix-diesel-session"`).
    pub application_name: String,
    /// Connections kept when idle (5). Opened on demand, never pre-filled.
    pub pool_size: usize,
    /// Connections allowed beyond `pool_size` under load (10), closed again once idle for
    /// `idle_timeout`.
    pub max_overflow: usize,
    /// Idle time after which a connection beyond `pool_size` is closed (10 s).
    pub idle_timeout: Duration,
    /// Bound on a request's check-out plus its `BEGIN`, on opening a connection, and on
    /// resolving a lost COMMIT answer (30 s).
    pub checkout_timeout: Duration,
    /// Maximum lifetime of a connection (30 min): older ones are closed when idle.
    pub max_lifetime: Duration,
    /// A connection unused for longer than this is pinged before it is handed out
    /// (500 ms); a busy service pays no round trip per request.
    pub ping_if_idle_for: Duration,
    /// Bound on the ping before reuse (together with a quarter of `checkout_timeout`) and
    /// on every step of a readiness check (2 s).
    pub probe_timeout: Duration,
    /// The server's `statement_timeout` for pooled connections, sent at start-up or with
    /// each `BEGIN` (see `startup_options`; `None`: no limit, the default). The client-side statement deadline is this plus
    /// [`DEADLINE_MARGIN`].
    pub statement_timeout: Option<Duration>,
    /// The server's `idle_in_transaction_session_timeout` (60 s; `None`: no limit).
    pub idle_in_transaction_timeout: Option<Duration>,
    /// Warn (log and [`crate::SessionObserver::held_too_long`]) once a request has held its
    /// connection this long (10 s; `None`: never).
    pub leak_warn: Option<Duration>,
    /// Bound on a request's after-commit hooks, all together (5 s): see
    /// [`crate::DbSession::after_commit`].
    pub after_commit_timeout: Duration,
    /// Log every statement's SQL text (never its bind values) at `info`, target
    /// `actix_diesel_session::sql` (false).
    pub echo: bool,
    /// Open and drive each connection on the runtime of the task that opens it, instead of
    /// the runtime that built the [`crate::Database`] (false). Set it for an Actix server
    /// with one worker: the worker then runs both its requests and their connections'
    /// sockets, and a round trip costs no wake-up of another thread. With more workers
    /// leave it off: a worker's runtime stops with the worker, and during a graceful
    /// shutdown an idle worker stops first, so connections it had opened would die under
    /// the requests other workers are still finishing.
    pub drive_on_callers_runtime: bool,
    /// Give each of this many Actix workers a pool of its own, opened and driven on that
    /// worker (0 or 1, the default: one pool for all). Set it to the server's worker
    /// count: a request and its connection's socket then stay on one thread, which spares
    /// two cross-thread wake-ups per round trip. The budget (`pool_size + max_overflow`)
    /// is split among the workers, one connection kept for the application's own pool
    /// ([`crate::Database::pool`]; two with replicas); with fewer than 4 connections per
    /// worker there is one pool for all, driven on the runtime that built the
    /// [`crate::Database`]. See the crate's README, "Pool, probes, TLS".
    pub worker_pools: usize,
    /// Keep each connection's prepared statements for its later transactions (true).
    /// Turn it off behind a transaction pooler that does not track prepared statements
    /// (PgBouncer in transaction mode before 1.21, or without `max_prepared_statements`):
    /// a statement prepared in one transaction is gone, or another client's, in the next.
    /// Every statement is then prepared, used and closed within its transaction (a round
    /// trip more per statement), and a COMMIT waits for the transaction id query before
    /// it is sent instead of being pipelined with it.
    pub statement_cache: bool,
    /// Send `statement_timeout` and `idle_in_transaction_session_timeout` in the start-up
    /// packet's `options` (true). Turn it off behind a pooler that refuses `options`, or
    /// drops it (PgBouncer): the timeouts are then set with `SET LOCAL` in the same
    /// message as each `BEGIN`, so they hold whichever server connection runs the
    /// transaction. (The readiness and verification connections have client-side bounds
    /// of their own.)
    pub startup_options: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            application_name: "actix-diesel-session".to_owned(),
            pool_size: 5,
            max_overflow: 10,
            idle_timeout: Duration::from_secs(10),
            checkout_timeout: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(1800),
            ping_if_idle_for: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(2),
            statement_timeout: None,
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
            leak_warn: Some(Duration::from_secs(10)),
            after_commit_timeout: Duration::from_secs(5),
            echo: false,
            drive_on_callers_runtime: false,
            worker_pools: 0,
            statement_cache: true,
            startup_options: true,
        }
    }
}

impl SessionConfig {
    /// The hard cap on pooled connections: `pool_size + max_overflow`.
    pub fn max_connections(&self) -> usize {
        self.pool_size + self.max_overflow
    }

    /// The most workers this budget gives a pool of their own
    /// ([`SessionConfig::worker_pools`]): [`crate::MIN_WORKER_SHARE`] connections each,
    /// after the application's own (one, two `with_replicas`). A server with more workers
    /// than this runs them all on one pool.
    pub fn max_worker_pools(&self, with_replicas: bool) -> usize {
        self.max_connections()
            .saturating_sub(crate::workers::application_connections(with_replicas))
            / crate::workers::MIN_WORKER_SHARE
    }

    /// Client-side bound on a handler's statement: the statement timeout plus
    /// [`DEADLINE_MARGIN`]. `None` without a statement timeout: a handler's statement may
    /// then run, or wait for a lock, as long as the server lets it.
    pub fn statement_deadline(&self) -> Option<Duration> {
        self.statement_timeout.map(|t| t + DEADLINE_MARGIN)
    }

    /// Client-side bound on the session's own statements: COMMIT, ROLLBACK and the
    /// clean-up of an abandoned request. These must end even when the server went silent
    /// (it still acknowledges TCP, so keepalives never fire), or a cancelled request's
    /// clean-up would hold its socket forever: the statement deadline; without a statement
    /// timeout, the idle-in-transaction timeout plus the margin (by then the server has
    /// given up on a transaction whose client went quiet, so the session gives up on a
    /// server that went quiet after as long); without either,
    /// [`FINISH_DEADLINE_FALLBACK`]. Never the check-out timeout, which may be tuned short
    /// to fail check-outs fast, while a COMMIT may legitimately wait for a flush, a standby
    /// or a deferred check. A COMMIT cut off by it is resolved like any lost answer.
    pub fn finish_deadline(&self) -> Duration {
        self.statement_deadline()
            .or_else(|| {
                self.idle_in_transaction_timeout
                    .map(|t| t + DEADLINE_MARGIN)
            })
            .unwrap_or(FINISH_DEADLINE_FALLBACK)
    }

    /// The bound on the ping before reuse: a silent idle connection must not use up a
    /// request's whole check-out budget, so give up on it early and open a fresh one.
    pub fn ping_timeout(&self) -> Duration {
        self.probe_timeout.min(self.checkout_timeout / 4)
    }

    /// What follows every `BEGIN` in its message: nothing when the timeouts travel in the
    /// start-up packet; otherwise `SET LOCAL` of both (0, PostgreSQL's "no limit", for
    /// `None`, as at start-up), so that a server connection's own defaults never apply.
    pub(crate) fn begin_suffix(&self) -> String {
        if self.startup_options {
            return String::new();
        }
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
        format!(
            "; SET LOCAL statement_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}",
            ms(self.statement_timeout),
            ms(self.idle_in_transaction_timeout)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_startup_options_the_timeouts_follow_every_begin() {
        let mut cfg = SessionConfig::default();
        assert_eq!(cfg.begin_suffix(), "", "they travel in the start-up packet");
        cfg.startup_options = false;
        cfg.statement_timeout = Some(Duration::from_millis(1500));
        assert_eq!(
            cfg.begin_suffix(),
            "; SET LOCAL statement_timeout = 1500; \
             SET LOCAL idle_in_transaction_session_timeout = 60000"
        );
        // No limit is 0, never the server connection's own default.
        cfg.idle_in_transaction_timeout = None;
        assert!(cfg
            .begin_suffix()
            .ends_with("SET LOCAL idle_in_transaction_session_timeout = 0"));
    }
}
