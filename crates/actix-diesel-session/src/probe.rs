//! [`Readiness`]: a database round trip for readiness probes, on a dedicated connection.
//!
//! - `SELECT 1` on one connection outside the pool, so that readiness answers even while
//!   traffic holds every pooled connection. Connecting and the query are together bounded
//!   by the probe timeout. A connection that failed is dropped and re-established, within
//!   the same bound, so one stale connection never fails a probe; one older than the
//!   pool's maximum lifetime is closed and replaced like a pooled one (closed first, so
//!   there are never two).
//! - Checks that arrive together share one round trip in flight (single flight): the
//!   first starts it, the others await its result, so a flood of probes costs the
//!   database one round trip at a time and no probe queues behind others' round trips.
//!   Every check answers within the probe timeout of its own arrival. A finished round
//!   trip's result is not reused: a check that arrives after it starts the next one, so
//!   no answer is older than the check (reusing a pass for even 250 ms would report a
//!   database that has just become unreachable as ready).
//!
//! Rendering the answer (health+json, say) is the application's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel_async::AsyncPgConnection;
use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;

use crate::connect::Connector;
use crate::pool::ping;

/// Readiness checks on a dedicated connection; see the module docs. Made by
/// [`crate::Database::readiness`].
pub struct Readiness {
    link: Arc<Link>,
    /// The latest round trip: in flight, or done.
    latest: Mutex<Option<Trip>>,
    timeout: Duration,
}

/// The result of one readiness round trip.
#[derive(Clone, Debug)]
pub struct Check {
    /// How long the round trip took (connecting included, when it had to).
    pub elapsed: Duration,
    /// What went wrong, if anything: the driver's text, which names no secret.
    pub error: Option<String>,
}

/// The dedicated connection and how to make it; owned by the round trips in flight.
struct Link {
    connector: Connector,
    timeout: Duration,
    max_lifetime: Duration,
    /// The idle connection and when it was opened. A round trip takes it out for its
    /// duration, so a round trip given up on (dropped) closes it rather than leaving a
    /// half-used connection behind.
    idle: Mutex<Option<(AsyncPgConnection, Instant)>>,
    /// Set at shutdown: a round trip that ends later closes its connection.
    closed: AtomicBool,
}

/// One round trip, shared by every check that joins it.
struct Trip {
    started: Instant,
    outcome: Shared<BoxFuture<'static, Check>>,
}

impl Readiness {
    pub(crate) fn new(connector: Connector, timeout: Duration, max_lifetime: Duration) -> Self {
        Readiness {
            link: Arc::new(Link {
                connector,
                timeout,
                max_lifetime,
                idle: Mutex::new(None),
                closed: AtomicBool::new(false),
            }),
            latest: Mutex::new(None),
            timeout,
        }
    }

    /// The outcome of the round trip in flight, or of a new one if none is; within the
    /// probe timeout of the call.
    pub async fn check(&self) -> Check {
        let arrived = Instant::now();
        let outcome = {
            let mut latest = lock(&self.latest);
            match latest.as_ref() {
                Some(trip) if self.joinable(trip) => trip.outcome.clone(),
                _ => {
                    let link = self.link.clone();
                    let outcome = async move { link.round_trip().await }.boxed().shared();
                    *latest = Some(Trip {
                        started: arrived,
                        outcome: outcome.clone(),
                    });
                    outcome
                }
            }
        };
        // The shared round trip has its own bound, from its start; this one is from the
        // check's arrival, for a round trip that nobody polled for a while.
        tokio::time::timeout(self.timeout, outcome)
            .await
            .unwrap_or_else(|_| Check {
                elapsed: arrived.elapsed(),
                error: Some(format!("no answer within {:?}", self.timeout)),
            })
    }

    /// Closes the dedicated connection (at shutdown), also one a round trip holds now.
    pub fn close(&self) {
        self.link.closed.store(true, Ordering::Release);
        lock(&self.link.idle).take();
        // A round trip nobody awaits any more holds its connection until dropped.
        lock(&self.latest).take();
    }

    /// Whether a check arriving now may join `trip`: it is still running within its
    /// bound (one started longer ago was abandoned by every check that awaited it; it is
    /// dropped when replaced, closing its connection).
    fn joinable(&self, trip: &Trip) -> bool {
        trip.outcome.peek().is_none() && trip.started.elapsed() < self.timeout
    }
}

impl Link {
    async fn round_trip(&self) -> Check {
        let started = Instant::now();
        let error = match tokio::time::timeout(self.timeout, self.select_one()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {:?}", self.timeout)),
        };
        Check {
            elapsed: started.elapsed(),
            error,
        }
    }

    /// `SELECT 1` on the dedicated connection, (re)connecting when it is missing, stale or
    /// past its lifetime. Single flight guarantees one caller at a time.
    async fn select_one(&self) -> Result<(), String> {
        let idle = lock(&self.idle).take();
        if let Some((mut conn, opened)) = idle {
            // One past its lifetime is dropped (closed) here, before its successor opens;
            // a stale one (server restarted, backend terminated) likewise.
            if opened.elapsed() < self.max_lifetime && ping(&mut conn, self.timeout).await.is_ok() {
                self.put_back(conn, opened);
                return Ok(());
            }
        }
        let opened = Instant::now();
        let mut conn = self
            .connector
            .establish()
            .await
            .map_err(|e| e.to_string())?;
        ping(&mut conn, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        self.put_back(conn, opened);
        Ok(())
    }

    fn put_back(&self, conn: AsyncPgConnection, opened: Instant) {
        if !self.closed.load(Ordering::Acquire) {
            *lock(&self.idle) = Some((conn, opened));
        }
    }
}

/// The guarded value even if a thread panicked while holding the lock: every value kept
/// under these locks is valid at every point.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
