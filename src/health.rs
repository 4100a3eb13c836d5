//! Kubernetes probes (contract section 5).
//!
//! - `/health/live`, `/livez`: never touch the database. A database outage must not make
//!   Kubernetes restart every pod.
//! - `/health/ready`, `/readyz`, `/health`: a `SELECT 1` round trip on one dedicated
//!   connection outside the pool (`application_name = 'ledger-health'`), so readiness
//!   answers even while traffic holds every pooled connection, bounded by
//!   `DB_HEALTH_TIMEOUT`, with probes that arrive together sharing one round trip: the
//!   session layer's `Readiness` (see its docs for the single flight and the
//!   reconnection rules).
//! - Readiness also fails while migrations are pending and once shutdown has begun (read
//!   after the round trip, so a probe that waited on a shared round trip while shutdown
//!   began fails too).
//!
//! - With replicas, `/health` (and readiness when one is degraded) reports each one by
//!   `host:port` (`componentId`): `postgres-replica:responseTime`, the background
//!   measurement's round trip, and `postgres-replica:lag`, its replay lag in ms. A replica
//!   down or behind `DB_REPLICA_MAX_LAG` makes the status `warn`, never `fail`: reads go to
//!   the primary meanwhile. Nothing here queries a replica: the measurement is the
//!   session layer's, made in the background.
//!
//! Bodies follow the IETF draft "Health Check Response Format for HTTP APIs"
//! (`application/health+json`); `output` texts come from the driver and name no secret.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use actix_diesel_session::{Database, Readiness, ReplicaStatus};
use actix_web::http::header::{CacheControl, CacheDirective, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::resource;
use crate::openapi::Endpoint;

/// The `application_name` of the readiness connection.
pub const APPLICATION_NAME: &str = "ledger-health";
const HEALTH_JSON: &str = "application/health+json";

/// The latest PostgreSQL round trip's outcome, for `/metrics`.
const NOT_CHECKED: u8 = 0;
const PASSED: u8 = 1;
const FAILED: u8 = 2;

/// Probe state shared by all workers.
pub struct Health {
    readiness: Readiness,
    db: Database,
    schema_ready: AtomicBool,
    draining: AtomicBool,
    /// [`NOT_CHECKED`], [`PASSED`] or [`FAILED`]: set by every readiness answer.
    postgres: AtomicU8,
}

impl Health {
    /// Probes for `db`: readiness on a dedicated connection named [`APPLICATION_NAME`].
    pub fn new(db: &Database) -> Self {
        Health {
            readiness: db.readiness(APPLICATION_NAME),
            db: db.clone(),
            schema_ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            postgres: AtomicU8::new(NOT_CHECKED),
        }
    }

    /// The latest readiness round trip's outcome: `None` before the first.
    pub fn postgres_passed(&self) -> Option<bool> {
        match self.postgres.load(Ordering::Acquire) {
            PASSED => Some(true),
            FAILED => Some(false),
            _ => None,
        }
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
    pub fn close(&self) {
        self.readiness.close();
    }

    async fn report(&self, detailed: bool) -> HttpResponse {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut checks = serde_json::Map::new();
        let mut status = Status::Pass;

        let trip = self.readiness.check().await;
        // Read after the round trip: a probe that waited for a (shared) result while
        // shutdown began still fails.
        if self.is_draining() {
            status = Status::Fail;
            checks.insert(
                "service:shutdown".into(),
                json!([{ "status": "fail", "output": "shutting down", "time": now }]),
            );
        }
        self.postgres.store(
            if trip.error.is_none() { PASSED } else { FAILED },
            Ordering::Release,
        );
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

        let pool = self.db.status();
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

        let replicas = self.db.replicas();
        let degraded = replicas.iter().any(|r| !r.eligible);
        if degraded && status == Status::Pass {
            status = Status::Warn;
        }
        if (detailed || degraded) && !replicas.is_empty() {
            let (times, lags) = replica_checks(&replicas, &now);
            checks.insert("postgres-replica:responseTime".into(), Value::Array(times));
            checks.insert("postgres-replica:lag".into(), Value::Array(lags));
        }

        respond(status, Some(Value::Object(checks)))
    }
}

/// One `responseTime` and one `lag` entry per replica, named by `host:port`.
fn replica_checks(replicas: &[ReplicaStatus], now: &str) -> (Vec<Value>, Vec<Value>) {
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    let mut times = Vec::new();
    let mut lags = Vec::new();
    for r in replicas {
        let mut time = json!({
            "componentId": r.name,
            "status": if r.up { "pass" } else { "warn" },
            "observedValue": r.response_time.map(ms),
            "observedUnit": "ms",
            "time": now,
        });
        if let Some(error) = &r.error {
            time["output"] = Value::String(error.clone());
        }
        times.push(time);
        let mut lag = json!({
            "componentId": r.name,
            "status": if r.eligible { "pass" } else { "warn" },
            "observedValue": r.lag.map(ms),
            "observedUnit": "ms",
            "time": now,
        });
        if !r.eligible {
            let why = if r.up {
                "behind DB_REPLICA_MAX_LAG: reads go to the primary"
            } else {
                "down: reads go to the primary"
            };
            lag["output"] = Value::String(why.into());
        }
        lags.push(lag);
    }
    (times, lags)
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
#[utoipa::path(
    get,
    path = "/health/live",
    operation_id = "live",
    tag = "health",
    responses(
        (status = 200, description = "Serving", content_type = "application/health+json", body = HealthReport,
            headers(("Cache-Control" = String, description = "`no-store`"))),
    ),
)]
async fn live() -> HttpResponse {
    respond(Status::Pass, None)
}

/// Readiness: the database answered a round trip in time and the service is not draining.
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready (`pass`, or `warn` while every pooled connection is in use)", content_type = "application/health+json", body = HealthReport,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 503, description = "Not ready: the database did not answer in time, migrations are pending, or the service is shutting down", content_type = "application/health+json", body = HealthReport,
            headers(("Cache-Control" = String, description = "`no-store`"))),
    ),
)]
async fn ready(health: web::Data<Health>) -> HttpResponse {
    health.report(false).await
}

/// Readiness with full detail (pool figures always included).
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "health",
    responses(
        (status = 200, description = "Ready, with the pool's figures", content_type = "application/health+json", body = HealthReport,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 503, description = "Not ready, with the pool's figures", content_type = "application/health+json", body = HealthReport,
            headers(("Cache-Control" = String, description = "`no-store`"))),
    ),
)]
async fn detail(health: web::Data<Health>) -> HttpResponse {
    health.report(true).await
}

/// Registers the probe routes. `/livez` and `/readyz` are the same operations under the
/// Kubernetes API server's names.
pub fn configure(cfg: &mut ServiceConfig) {
    let live_at = |id: &str| Endpoint::new::<__path_live>(web::to(live)).operation_id(id);
    let ready_at = |id: &str| Endpoint::new::<__path_ready>(web::to(ready)).operation_id(id);
    cfg.service(resource("/health/live", [live_at("live")]))
        .service(resource("/livez", [live_at("livez")]))
        .service(resource("/health/ready", [ready_at("ready")]))
        .service(resource("/readyz", [ready_at("readyz")]))
        .service(resource(
            "/health",
            [Endpoint::new::<__path_detail>(web::to(detail))],
        ));
}

/// A health report (IETF draft "Health Check Response Format for HTTP APIs").
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "a schema only: the body is built in `respond`")]
struct HealthReport {
    /// `pass`, `warn` (serving, but degraded) or `fail`.
    #[schema(pattern = "^(pass|warn|fail)$")]
    status: String,
    /// Each check's outcomes, by `component:measurement`.
    checks: Option<std::collections::HashMap<String, Vec<serde_json::Value>>>,
}
