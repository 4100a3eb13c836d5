//! A request's check-out of a pooled connection: how long it is held, and the leak warning.
//!
//! A [`Lease`] starts when the session checks a connection out and ends when the
//! session's `TxConn` is dropped (the connection went back to the pool or was closed). It
//! records `db_pool_connection_use_duration_seconds`.
//!
//! The leak warning, like HikariCP's `leakDetectionThreshold`, fires once while a request
//! still holds its connection past `DB_LEAK_WARN_SECS` ([`warn_leak`]). The session's
//! finalizing middleware raises it from the timer it already runs for the statement
//! deadline, inside the request's own future, so the warning can name the route template
//! and method of the request that holds the connection (and its request id) while it is
//! happening, and a request costs no timer or task of its own for it. That timer runs while
//! the handler does, which is when a connection can be held for long: after the handler,
//! COMMIT or ROLLBACK is bounded by the statement deadline, and a guard that escapes its
//! handler is reported at once (a 500 and an error line).

use std::time::{Duration, Instant};

use crate::metrics::db::{CloseReason, DbMetrics, HolderLabels};
use crate::metrics::http;

/// One check-out; see the module docs.
pub struct Lease {
    metrics: DbMetrics,
    started: Instant,
}

impl Lease {
    /// Starts a lease now.
    pub fn start(metrics: DbMetrics) -> Lease {
        Lease {
            metrics,
            started: Instant::now(),
        }
    }

    /// When the connection was checked out.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The connection is being detached from the pool and closed instead of returned.
    pub fn broken(&self) {
        self.metrics.closed(CloseReason::Broken, 1);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.metrics.connection_used(self.started.elapsed());
    }
}

/// Logs and counts a connection held for longer than `after`. The holder is the request
/// whose future runs this (see [`http::current_request`]); outside a request it is reported
/// as unknown.
pub fn warn_leak(metrics: &DbMetrics, after: Duration) {
    let (method, route) =
        http::current_request().unwrap_or((http::UNKNOWN_METHOD, http::UNMATCHED.to_owned()));
    let request_id = crate::request_id::current().unwrap_or_else(|| "-".to_owned());
    log::warn!(
        "possible connection leak: {method} {route} (request {request_id}) has held a database \
         connection for more than {after:?}"
    );
    metrics.leak_warning(&HolderLabels { route, method });
}
