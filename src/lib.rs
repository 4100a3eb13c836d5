//! ledger: a small ledger service whose point is database connection and session
//! management done right (Actix-web, diesel-async, deadpool, PostgreSQL).
//!
//! See `README.md` for the guarantees; the request sessions are the
//! `actix_diesel_session` crate's (`crates/actix-diesel-session`).

/// REST routes and the extractor configuration.
pub mod api;
/// The application builder shared by `main` and the tests.
pub mod app;
/// Typed configuration from the environment.
pub mod config;
/// `Consistency-Token`: read-your-writes across replicas.
pub mod consistency;
/// Migrations and queries.
pub mod db;
/// `ApiError` and its problem+json form.
pub mod error;
/// Liveness and readiness probes.
pub mod health;
/// Route building blocks: 405 with `Allow`, the 404 default service.
pub mod http;
/// Posting transfers: the bookkeeping rules.
pub mod ledger;
/// `GET /metrics` and the metrics behind it.
pub mod metrics;
/// The OpenAPI document, built from the route registrations (`GET /openapi.json`).
pub mod openapi;
/// `X-Request-Id` handling.
pub mod request_id;
/// The diesel schema (generated).
pub mod schema;
/// Signal handling and the drain window.
pub mod shutdown;

pub use app::Application;
pub use config::Config;

/// Initialises `env_logger` (default level `info`), with the request id on every line
/// logged while a request runs. Safe to call more than once.
pub fn init_logging() {
    use std::io::Write;
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let ts = buf.timestamp_millis();
            match request_id::current() {
                Some(rid) => writeln!(
                    buf,
                    "{ts} {} {} rid={rid}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
                None => writeln!(
                    buf,
                    "{ts} {} {}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
            }
        })
        .try_init();
}
