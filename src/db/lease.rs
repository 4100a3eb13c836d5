//! A request's check-out of a pooled connection: how long it is held, and the leak warning.
//!
//! A [`Lease`] starts when the session checks a connection out and ends when the
//! session's `TxConn` is dropped (the connection went back to the pool or was closed). It
//! records `db_pool_connection_use_duration_seconds`, and, like HikariCP's
//! `leakDetectionThreshold`, warns once while the connection is still held past
//! `DB_LEAK_WARN_SECS`: a timer task started at check-out and cancelled when the lease
//! ends. The warning names the route template and method of the request that holds the
//! connection (and its request id), so the culprit can be found while it is happening.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::metrics::db::{CloseReason, DbMetrics, HolderLabels};
use crate::metrics::http;

/// One check-out; see the module docs.
pub struct Lease {
    metrics: DbMetrics,
    started: Instant,
    leak_timer: Option<JoinHandle<()>>,
}

impl Lease {
    /// Starts a lease now. The holder is the request whose future runs this (see
    /// [`http::current_request`]); outside a request it is reported as unknown.
    pub fn start(metrics: DbMetrics, leak_warn: Option<Duration>) -> Lease {
        let leak_timer = leak_warn.and_then(|after| {
            let (method, route) = http::current_request()
                .unwrap_or((http::UNKNOWN_METHOD, http::UNMATCHED.to_owned()));
            let request_id = crate::request_id::current().unwrap_or_else(|| "-".to_owned());
            let holder = HolderLabels { route, method };
            let metrics = metrics.clone();
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            Some(runtime.spawn(async move {
                tokio::time::sleep(after).await;
                log::warn!(
                    "possible connection leak: {} {} (request {request_id}) has held a database \
                     connection for more than {after:?}",
                    holder.method,
                    holder.route,
                );
                metrics.leak_warning(&holder);
            }))
        });
        Lease {
            metrics,
            started: Instant::now(),
            leak_timer,
        }
    }

    /// The connection is being detached from the pool and closed instead of returned.
    pub fn broken(&self) {
        self.metrics.closed(CloseReason::Broken, 1);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(timer) = self.leak_timer.take() {
            timer.abort();
        }
        self.metrics.connection_used(self.started.elapsed());
    }
}
