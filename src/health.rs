//! Kubernetes probes (contract section 5).
//!
//! - `/health/live`, `/livez`: never touch the database. A database outage must not make
//!   Kubernetes restart every pod.
//! - `/health/ready`, `/readyz`, `/health`: a `SELECT 1` round trip on one dedicated
//!   connection outside the pool (`application_name = 'ledger-health'`), so readiness
//!   answers even while traffic holds every pooled connection. Connecting and the query
//!   are together bounded by `DB_HEALTH_TIMEOUT`. A connection that failed is dropped and
//!   re-established, within the same bound, so one stale connection never fails a probe;
//!   one older than `DB_POOL_RECYCLE` is closed and replaced like a pooled one (closed
//!   first, so there are never two).
//! - Probes that arrive together share one round trip in flight (single flight): the
//!   first starts it, the others await its result, so a flood of probes costs the
//!   database one round trip at a time and no probe queues behind others' round trips.
//!   Every probe answers within `DB_HEALTH_TIMEOUT` of its own arrival. A finished round
//!   trip's result is not reused: a probe that arrives after it starts the next one, so
//!   no answer is older than the probe (reusing a pass for even 250 ms would report a
//!   database that has just become unreachable as ready).
//! - Readiness also fails while migrations are pending and once shutdown has begun (read
//!   after the round trip, so a probe that waited on a shared round trip while shutdown
//!   began fails too).
//!
//! Bodies follow the IETF draft "Health Check Response Format for HTTP APIs"
//! (`application/health+json`); `output` texts come from the driver and name no secret.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::http::header::{CacheControl, CacheDirective, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chrono::{SecondsFormat, Utc};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::config::DbConfig;
use crate::db::connect::Connector;
use crate::db::pool::DbPool;
use crate::metrics::CheckStatus;

/// The `application_name` of the readiness connection.
pub const APPLICATION_NAME: &str = "ledger-health";
const HEALTH_JSON: &str = "application/health+json";

/// Probe state shared by all workers.
pub struct Health {
    link: Arc<ReadinessLink>,
    /// The latest round trip: in flight, or done.
    latest: Mutex<Option<Trip>>,
    timeout: Duration,
    pool: DbPool,
    schema_ready: AtomicBool,
    draining: AtomicBool,
    /// `health_check_status{check="postgres"}`, set by every answer.
    postgres_status: CheckStatus,
}

/// The dedicated connection and how to make it; owned by the round trips in flight.
struct ReadinessLink {
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

/// One round trip, shared by every probe that joins it.
struct Trip {
    started: Instant,
    outcome: Shared<BoxFuture<'static, RoundTrip>>,
}

/// Result of one round trip.
#[derive(Clone)]
struct RoundTrip {
    elapsed: Duration,
    error: Option<String>,
}

impl Health {
    pub fn new(cfg: &DbConfig, pool: DbPool) -> Self {
        Health {
            link: Arc::new(ReadinessLink {
                connector: Connector::new(
                    &cfg.url,
                    APPLICATION_NAME,
                    Some(cfg.health_timeout),
                    cfg.idle_in_tx_timeout,
                    cfg.health_timeout,
                ),
                timeout: cfg.health_timeout,
                max_lifetime: cfg.max_lifetime,
                idle: Mutex::new(None),
                closed: AtomicBool::new(false),
            }),
            latest: Mutex::new(None),
            timeout: cfg.health_timeout,
            pool,
            schema_ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            postgres_status: CheckStatus::unregistered("postgres"),
        }
    }

    /// Reports the PostgreSQL round trip's outcome to `status` (the metrics registry).
    pub fn with_postgres_status(mut self, status: CheckStatus) -> Self {
        self.postgres_status = status;
        self
    }

    /// Marks the schema as migrated (or not managed by this process).
    pub fn set_schema_ready(&self) {
        self.schema_ready.store(true, Ordering::Release);
    }

    /// From now on readiness fails: the service is shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        AtomicBool::load(&self.draining, Ordering::Acquire)
    }

    /// Closes the readiness connection (at shutdown), also one a round trip holds now.
    pub async fn close(&self) {
        self.link.closed.store(true, Ordering::Release);
        lock(&self.link.idle).take();
        // A round trip nobody awaits any more holds its connection until dropped.
        lock(&self.latest).take();
    }

    /// The outcome of the round trip in flight, or of a new one if none is; within
    /// `DB_HEALTH_TIMEOUT` of the call.
    async fn round_trip(&self) -> RoundTrip {
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
        // probe's arrival, for a round trip that nobody polled for a while.
        tokio::time::timeout(self.timeout, outcome)
            .await
            .unwrap_or_else(|_| RoundTrip {
                elapsed: arrived.elapsed(),
                error: Some(format!("no answer within {:?}", self.timeout)),
            })
    }

    /// Whether a probe arriving now may join `trip`: it is still running within its
    /// bound (one started longer ago was abandoned by every probe that awaited it; it is
    /// dropped when replaced, closing its connection).
    fn joinable(&self, trip: &Trip) -> bool {
        trip.outcome.peek().is_none() && trip.started.elapsed() < self.timeout
    }

    async fn report(&self, detailed: bool) -> HttpResponse {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut checks = serde_json::Map::new();
        let mut status = Status::Pass;

        let trip = self.round_trip().await;
        // Read after the round trip: a probe that waited for a (shared) result while
        // shutdown began still fails.
        if self.is_draining() {
            status = Status::Fail;
            checks.insert(
                "service:shutdown".into(),
                json!([{ "status": "fail", "output": "shutting down", "time": now }]),
            );
        }
        self.postgres_status.set(trip.error.is_none());
        let mut rt = json!({
            "status": if trip.error.is_some() { "fail" } else { "pass" },
            "observedValue": (trip.elapsed.as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
            "observedUnit": "ms",
            "time": now,
        });
        if let Some(error) = &trip.error {
            rt["output"] = Value::String(error.clone());
            status = Status::Fail;
        }
        checks.insert("postgres:responseTime".into(), json!([rt]));

        if !AtomicBool::load(&self.schema_ready, Ordering::Acquire) {
            status = Status::Fail;
            checks.insert(
                "postgres:migrations".into(),
                json!([{ "status": "fail", "output": "migrations not applied yet", "time": now }]),
            );
        }

        let pool = self.pool.status();
        let saturated = pool.waiting > 0;
        if saturated && status == Status::Pass {
            status = Status::Warn;
        }
        if detailed || saturated {
            let mut conns = json!({
                "status": if saturated { "warn" } else { "pass" },
                "observedValue": pool.size,
                "observedUnit": "connections",
                "max": pool.max_size,
                "idle": pool.available,
                "waiting": pool.waiting,
                "time": now,
            });
            if saturated {
                conns["output"] = Value::String("every pooled connection is in use".into());
            }
            checks.insert("postgres:connections".into(), json!([conns]));
        }

        respond(status, Some(Value::Object(checks)))
    }
}

impl ReadinessLink {
    async fn round_trip(&self) -> RoundTrip {
        let started = Instant::now();
        let error = match tokio::time::timeout(self.timeout, self.select_one()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {:?}", self.timeout)),
        };
        RoundTrip {
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
            if opened.elapsed() < self.max_lifetime && ping(&mut conn).await.is_ok() {
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
        ping(&mut conn).await?;
        self.put_back(conn, opened);
        Ok(())
    }

    fn put_back(&self, conn: AsyncPgConnection, opened: Instant) {
        if !AtomicBool::load(&self.closed, Ordering::Acquire) {
            *lock(&self.idle) = Some((conn, opened));
        }
    }
}

/// The guarded value even if a thread panicked while holding the lock: every value kept
/// under these locks is valid at every point.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn ping(conn: &mut AsyncPgConnection) -> Result<(), String> {
    diesel::sql_query("SELECT 1")
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Warn,
    Fail,
}

fn respond(status: Status, checks: Option<Value>) -> HttpResponse {
    let (code, text) = match status {
        Status::Pass => (StatusCode::OK, "pass"),
        Status::Warn => (StatusCode::OK, "warn"),
        Status::Fail => (StatusCode::SERVICE_UNAVAILABLE, "fail"),
    };
    let mut body = json!({ "status": text });
    if let Some(checks) = checks {
        body["checks"] = checks;
    }
    HttpResponse::build(code)
        .insert_header(CacheControl(vec![CacheDirective::NoStore]))
        .insert_header((CONTENT_TYPE, HEALTH_JSON))
        .body(body.to_string())
}

/// Liveness: the process answers. Never touches the database.
async fn live() -> HttpResponse {
    respond(Status::Pass, None)
}

/// Readiness: the database answered a round trip in time and the service is not draining.
async fn ready(health: web::Data<Health>) -> HttpResponse {
    health.report(false).await
}

/// Readiness with full detail (pool figures always included).
async fn detail(health: web::Data<Health>) -> HttpResponse {
    health.report(true).await
}

/// Registers the probe routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    use crate::api::resource;
    use actix_web::http::Method;
    cfg.service(resource("/health/live", [(Method::GET, web::to(live))]))
        .service(resource("/livez", [(Method::GET, web::to(live))]))
        .service(resource("/health/ready", [(Method::GET, web::to(ready))]))
        .service(resource("/readyz", [(Method::GET, web::to(ready))]))
        .service(resource("/health", [(Method::GET, web::to(detail))]));
}
