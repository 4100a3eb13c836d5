//! Kubernetes probes (contract section 5).
//!
//! - `/health/live`, `/livez`: never touch the database. A database outage must not make
//!   Kubernetes restart every pod.
//! - `/health/ready`, `/readyz`, `/health`: a `SELECT 1` round trip on one dedicated
//!   connection outside the pool (`application_name = 'ledger-health'`), so readiness
//!   answers even while traffic holds every pooled connection. Waiting for that connection
//!   (probes that overlap), connecting and the query are together bounded by
//!   `DB_HEALTH_TIMEOUT`. A connection that failed is dropped and re-established, within
//!   the same bound, so one stale connection never fails a probe.
//! - Readiness also fails while migrations are pending and once shutdown has begun.
//!
//! Bodies follow the IETF draft "Health Check Response Format for HTTP APIs"
//! (`application/health+json`); `output` texts come from the driver and name no secret.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix_web::http::header::{CacheControl, CacheDirective, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chrono::{SecondsFormat, Utc};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::config::DbConfig;
use crate::db::connect::Connector;
use crate::db::pool::DbPool;
use crate::metrics::CheckStatus;

/// The `application_name` of the readiness connection.
pub const APPLICATION_NAME: &str = "ledger-health";
const HEALTH_JSON: &str = "application/health+json";

/// Probe state shared by all workers.
pub struct Health {
    connector: Connector,
    conn: Mutex<Option<AsyncPgConnection>>,
    timeout: Duration,
    pool: DbPool,
    schema_ready: AtomicBool,
    draining: AtomicBool,
    /// `health_check_status{check="postgres"}`, set by every round trip.
    postgres_status: CheckStatus,
}

/// Result of one round trip.
struct RoundTrip {
    elapsed: Duration,
    error: Option<String>,
}

impl Health {
    pub fn new(cfg: &DbConfig, pool: DbPool) -> Self {
        Health {
            connector: Connector::new(
                &cfg.url,
                APPLICATION_NAME,
                Some(cfg.health_timeout),
                cfg.idle_in_tx_timeout,
                cfg.health_timeout,
            ),
            conn: Mutex::new(None),
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

    /// Closes the readiness connection (at shutdown).
    pub async fn close(&self) {
        self.conn.lock().await.take();
    }

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

    /// `SELECT 1` on the dedicated connection. The connection is taken out of its slot
    /// for the duration, so that a timed-out (dropped) attempt closes it rather than
    /// leaving a half-used connection behind.
    async fn select_one(&self) -> Result<(), String> {
        let mut slot = self.conn.lock().await;
        if let Some(mut conn) = slot.take() {
            if ping(&mut conn).await.is_ok() {
                *slot = Some(conn);
                return Ok(());
            }
            // Stale (server restarted, backend terminated): reconnect below.
        }
        let mut conn = self
            .connector
            .establish()
            .await
            .map_err(|e| e.to_string())?;
        ping(&mut conn).await?;
        *slot = Some(conn);
        Ok(())
    }

    async fn report(&self, detailed: bool) -> HttpResponse {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut checks = serde_json::Map::new();
        let mut status = Status::Pass;

        if self.is_draining() {
            status = Status::Fail;
            checks.insert(
                "service:shutdown".into(),
                json!([{ "status": "fail", "output": "shutting down", "time": now }]),
            );
        }
        let trip = self.round_trip().await;
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
