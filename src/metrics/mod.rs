//! `GET /metrics`: Prometheus text exposition (version 0.0.4), contract section 9.
//!
//! One [`Metrics`] per application, shared by all workers through `web::Data` and handed
//! explicitly to the pool, the sessions and the readiness check (no global registry, so
//! that several applications in one process, as in the tests, keep separate counts).
//! Scraping never touches the database: the pool gauges are read from the pool's own
//! bookkeeping (`Pool::status`) at scrape time.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `db_pool_connections` | gauge | `state` = `idle`, `used` |
//! | `db_pool_connections_max` / `_min` | gauge | |
//! | `db_pool_pending_requests` | gauge | |
//! | `db_pool_acquire_duration_seconds` | histogram | |
//! | `db_pool_connection_use_duration_seconds` | histogram | |
//! | `db_pool_connection_create_duration_seconds` | histogram | |
//! | `db_pool_timeouts_total` | counter | `kind` = `wait`, `create`, `recycle` |
//! | `db_pool_connections_created_total` | counter | |
//! | `db_pool_connections_closed_total` | counter | `reason` = `lifetime`, `idle`, `broken`, `recycle_failed` |
//! | `db_pool_leak_warnings_total` | counter | `route`, `method` |
//! | `db_transactions_total` | counter | `outcome` = `commit`, `rollback`; `reason` = `status`, `error`, `panic`, `cancelled`, `commit_failed` |
//! | `http_request_duration_seconds` | histogram | `route` (template, or `unmatched`), `method`, `status` |
//! | `health_check_status` | gauge | `check` = `postgres` (1 pass, 0 fail; absent before the first check) |
//! | `app_draining` | gauge | |
//! | `db_replica_lag_seconds` | gauge | `replica` (`host:port`); `+Inf` while unknown (not yet measured, down, or behind every sample kept) |
//! | `db_reads_total` | counter | `target` = `primary`, `replica`; `reason` = `replica`, `no_replica`, `down`, `lagging`, `token` |

use std::sync::atomic::AtomicU64;

use actix_diesel_session::Database;
use actix_web::http::header::{CacheControl, CacheDirective, CONTENT_TYPE};
use actix_web::{web, HttpResponse};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::config::DbConfig;
use crate::error::ApiError;
use crate::health::Health;
use crate::openapi::Endpoint;

/// Pool, transaction and leak metrics.
pub mod db;
/// Request durations by route template.
pub mod http;

pub use db::DbMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: &'static str,
}

/// The application's metrics registry and the metrics in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    db: DbMetrics,
    http: http::HttpMetrics,
    connections: Family<StateLabel, Gauge>,
    pending: Gauge,
    checks: Family<CheckLabel, Gauge>,
    draining: Gauge,
    replica_lag: Family<ReplicaLabel, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    /// A registry with every metric of the service, for a pool configured by `cfg`.
    pub fn new(cfg: &DbConfig) -> Metrics {
        let mut registry = Registry::default();
        let connections = registered(
            &mut registry,
            "db_pool_connections",
            "Open pooled connections, by state",
            Family::<StateLabel, Gauge>::default(),
        );
        let connections_max: Gauge = registered(
            &mut registry,
            "db_pool_connections_max",
            "Most pooled connections allowed (DB_POOL_SIZE + DB_MAX_OVERFLOW)",
            Gauge::default(),
        );
        let connections_min: Gauge = registered(
            &mut registry,
            "db_pool_connections_min",
            "Pooled connections kept when idle (DB_POOL_SIZE; opened on demand)",
            Gauge::default(),
        );
        let pending = registered(
            &mut registry,
            "db_pool_pending_requests",
            "Check-outs waiting for a pooled connection",
            Gauge::default(),
        );
        let checks = registered(
            &mut registry,
            "health_check_status",
            "Outcome of the latest readiness check (1 pass, 0 fail)",
            Family::<CheckLabel, Gauge>::default(),
        );
        let draining = registered(
            &mut registry,
            "app_draining",
            "1 once shutdown has begun (readiness fails, requests are still served)",
            Gauge::default(),
        );
        let replica_lag = registered(
            &mut registry,
            "db_replica_lag_seconds",
            "Replay lag of each replica, as last measured in the background",
            Family::<ReplicaLabel, Gauge<f64, AtomicU64>>::default(),
        );
        connections_max.set(gauge_value(cfg.max_connections()));
        connections_min.set(gauge_value(cfg.pool_size));
        let db = DbMetrics::register(&mut registry);
        let http = http::HttpMetrics::register(&mut registry);
        Metrics {
            registry,
            db,
            http,
            connections,
            pending,
            checks,
            draining,
            replica_lag,
        }
    }

    /// The database metrics, for the pool and the sessions.
    pub fn db(&self) -> &DbMetrics {
        &self.db
    }

    /// The exposition text, with the gauges read from `pool` and `health` now.
    pub fn render(&self, db: &Database, health: &Health) -> Result<String, ApiError> {
        let status = db.status();
        self.connections
            .get_or_create(&StateLabel { state: "idle" })
            .set(gauge_value(status.available));
        self.connections
            .get_or_create(&StateLabel { state: "used" })
            .set(gauge_value(status.size.saturating_sub(status.available)));
        self.pending.set(gauge_value(status.waiting));
        self.draining.set(i64::from(health.is_draining()));
        if let Some(passed) = health.postgres_passed() {
            self.checks
                .get_or_create(&CheckLabel { check: "postgres" })
                .set(i64::from(passed));
        }
        for replica in db.replicas() {
            // Unknown (down, or behind every sample kept) is +Inf rather than the last value:
            // an alert on the lag must fire for a replica that stopped answering.
            let lag = match replica.lag {
                Some(lag) if replica.up => lag.as_secs_f64(),
                _ => f64::INFINITY,
            };
            self.replica_lag
                .get_or_create(&ReplicaLabel {
                    replica: replica.name,
                })
                .set(lag);
        }
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .map_err(|_| ApiError::internal("encoding the metrics failed"))?;
        Ok(text)
    }
}

/// Registers `metric` and returns it: the registry reads one handle, the service updates
/// the other (metrics are shared handles; clones count together).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Prometheus metrics
///
/// The Prometheus text exposition format. Never touches the database.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "metrics",
    responses((status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)),
)]
// Takes no `DbSession`: it never checks out a connection.
async fn scrape(
    metrics: web::Data<Metrics>,
    db: web::Data<Database>,
    health: web::Data<Health>,
) -> Result<HttpResponse, ApiError> {
    let text = metrics.render(&db, &health)?;
    Ok(HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, prometheus_text::CONTENT_TYPE))
        .insert_header(CacheControl(vec![CacheDirective::NoStore]))
        .body(text))
}

/// Registers `GET /metrics`.
pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(crate::http::resource(
        "/metrics",
        [Endpoint::new::<__path_scrape>(web::to(scrape)).problems(&[&["internal"]])],
    ));
}
