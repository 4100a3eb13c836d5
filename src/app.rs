//! The application builder that `main` and the tests share.
//!
//! [`Application::build`] builds the pool, prepares the schema, binds the listener (port
//! 0 picks a free one: see [`Application::port`]) and assembles the Actix app;
//! [`Application::run_until_stopped`] serves until the server is stopped, then closes the
//! pool. Signal handling with the drain window lives in [`crate::shutdown`].

use std::io;
use std::net::TcpListener;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Logger};
use actix_web::{web, App, HttpServer};
use utoipa_actix_web::AppExt;

use actix_diesel_session::Database;

use crate::api::idempotency::IdempotencySettings;
use crate::config::Config;
use crate::db::{self, migrate};
use crate::error::ApiError;
use crate::health::{self, Health};
use crate::metrics::{self, Metrics};
use crate::{api, openapi, request_id};

/// After the server stopped: how long requests cut off by the shutdown timeout get to give
/// their connections up and cancel their statements (milliseconds, normally).
const SHUTDOWN_CLEANUP: Duration = Duration::from_secs(2);

/// Access log: peer, request line, status, size, duration and the request id.
const ACCESS_LOG_FORMAT: &str = r#"%a "%r" %s %b %Dms rid=%{x-request-id}o"#;

/// A built, bound, not yet running service.
pub struct Application {
    port: u16,
    server: Server,
    db: Database,
    health: web::Data<Health>,
    config: Config,
}

impl Application {
    /// Builds everything and binds the listener. Does not need the database: if it cannot
    /// be reached, the service starts anyway and migrations are retried in the background.
    pub async fn build(config: Config) -> io::Result<Self> {
        let metrics = web::Data::new(Metrics::new(&config.db));
        // The session layer: pool, connector, reaper. Its errors are rendered as the
        // ledger's problem+json, and its events counted in the ledger's metrics.
        let db = Database::builder(
            config.db.url.clone(),
            config.db.session_config(config.http_workers),
        )
        .observer(metrics.db().clone())
        .replicas(config.db.replica_urls.clone(), config.db.replica_config())
        .render_errors(|e| actix_web::ResponseError::error_response(&ApiError::from(e)))
        .build()
        .map_err(io::Error::other)?;
        db::idempotency::spawn_purger(db.pool(), config.idempotency_ttl);
        let health = web::Data::new(Health::new(&db));
        prepare_schema(&config, &db, &health).await;

        let state = AppState {
            db: web::Data::new(db.clone()),
            health: health.clone(),
            metrics,
            body_limit: config.http_body_limit,
            idempotency_ttl: config.idempotency_ttl,
            request_id_setting: config.db.request_id_setting,
        };
        let listener = TcpListener::bind((config.host, config.port))?;
        let port = listener.local_addr()?.port();
        let server = HttpServer::new(move || app(state.clone()))
            .workers(config.http_workers)
            .listen(listener)?
            // Signals are ours (see `shutdown`): Actix would stop accepting at once.
            .disable_signals()
            .shutdown_timeout(config.shutdown_timeout.as_secs())
            .run();

        Ok(Application {
            port,
            server,
            db,
            health,
            config,
        })
    }

    /// The port the listener is bound to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The session layer's database (tests read its pools' status).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The probe state (shutdown flips it to draining).
    pub fn health(&self) -> web::Data<Health> {
        self.health.clone()
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until stopped, then closes the pool and the readiness connection.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        let result = self.server.await;
        // Requests cut off by the shutdown timeout give their connections up, and cancel
        // what they were running, as their workers stop: give that a moment.
        if !self.db.shut_down(SHUTDOWN_CLEANUP).await {
            log::warn!(
                "requests cut off at shutdown had not ended within {SHUTDOWN_CLEANUP:?}; the server ends their statements when it next writes to them"
            );
        }
        self.health.close();
        log::info!("stopped");
        result
    }
}

/// What every worker's `App` shares.
#[derive(Clone)]
pub struct AppState {
    /// The session layer (pool and sessions).
    pub db: web::Data<Database>,
    pub health: web::Data<Health>,
    pub metrics: web::Data<Metrics>,
    pub body_limit: usize,
    /// How long idempotency keys count (`IDEMPOTENCY_TTL_SECS`).
    pub idempotency_ttl: Duration,
    /// Whether transactions carry the request id (`DB_REQUEST_ID_SETTING`).
    pub request_id_setting: bool,
}

/// The transaction-local setting that carries the request id (`DB_REQUEST_ID_SETTING`).
pub const REQUEST_ID_SETTING: &str = "app.request_id";

/// The Actix app: routes, shared state and middleware, in the order that matters. The
/// server and in-process tests (`actix_web::test::init_service`) both use it.
pub fn app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let mut session = state.db.middleware();
    if state.request_id_setting {
        // Sent in the same message as each transaction's BEGIN and local to it, so a
        // trigger, an audit function or a `RAISE` can name the request with
        // `current_setting('app.request_id', true)`. The value is a bound parameter, and
        // the id itself is one the service made or validated (`request_id`).
        session = session.settings_from(|_| {
            request_id::current()
                .map(|id| vec![(REQUEST_ID_SETTING.to_owned(), id)])
                .unwrap_or_default()
        });
    }
    // Every documented route is registered here, and the document is made of exactly
    // those registrations (see `openapi`).
    let (app, doc) = App::new()
        .into_utoipa_app()
        .configure(health::configure)
        .configure(metrics::configure)
        .configure(openapi::configure)
        .configure(|cfg| api::configure(cfg, state.body_limit, &session))
        .split_for_parts();
    app.app_data(web::Data::new(openapi::document(doc)))
        .app_data(state.db)
        .app_data(state.health)
        .app_data(state.metrics)
        .app_data(web::Data::new(IdempotencySettings {
            ttl: state.idempotency_ttl,
        }))
        .default_service(web::to(crate::http::not_found))
        // The session middleware wraps each API resource (see `api::resource`), inside these.
        // The access log is outermost so that it sees the stamped X-Request-Id.
        .wrap(from_fn(request_id::assign))
        // Times the whole request, by route template.
        .wrap(from_fn(metrics::http::track))
        .wrap(Logger::new(ACCESS_LOG_FORMAT))
}

/// Applies migrations before serving when the database answers quickly; otherwise keeps
/// retrying in the background while the service starts (readiness fails until done).
async fn prepare_schema(config: &Config, db: &Database, health: &web::Data<Health>) {
    if !config.run_migrations {
        health.set_schema_ready();
        return;
    }
    // The background task makes the first attempt too, and start-up only stops waiting
    // for it: a first attempt dropped on a timeout would go on in its blocking thread
    // (connected, perhaps waiting on the advisory lock) while a retry opened a second
    // migration connection beside it. A database that does not answer within the health
    // timeout must not hold up the start (liveness must answer).
    let first_try: Duration = config.db.health_timeout;
    let (connector, ready) = (
        migrate::connector(db, config.db.pool_timeout),
        health.clone(),
    );
    let mut migrating = tokio::spawn(async move {
        migrate::run_until_applied(&connector).await;
        ready.set_schema_ready();
    });
    if tokio::time::timeout(first_try, &mut migrating)
        .await
        .is_err()
    {
        log::warn!("migrations not applied within {first_try:?}; migrating in the background");
    }
}
