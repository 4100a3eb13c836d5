//! Request-scoped PostgreSQL transactions for Actix-web, on diesel-async and deadpool.
//!
//! A handler takes a [`DbSession`]; its first [`DbSession::conn`] checks a connection out
//! and begins a transaction. The [`SessionMiddleware`] around the route commits it before
//! the response leaves when the status is below 400, and rolls it back otherwise: on an
//! error, a panic, or a request dropped half-way. A response is never sent for a write
//! that did not commit, and a COMMIT whose answer was lost is resolved by asking the
//! server, never guessed. Every limit is explicit ([`SessionConfig`]), every event can be
//! observed ([`SessionObserver`]), and errors render the application's way
//! ([`DatabaseBuilder::render_errors`]).
//!
//! ```no_run
//! use actix_diesel_session::{Database, DatabaseUrl, DbSession, SessionConfig, SessionError};
//! use actix_web::{web, App, HttpServer};
//! use diesel_async::RunQueryDsl;
//!
//! async fn record(db: DbSession) -> Result<&'static str, SessionError> {
//!     diesel::sql_query("INSERT INTO events DEFAULT VALUES")
//!         .execute(&mut *db.conn().await?)
//!         .await?;
//!     Ok("recorded")
//! }
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let url = DatabaseUrl::parse("postgres://app@localhost/app").map_err(std::io::Error::other)?;
//!     let db = Database::builder(url, SessionConfig::default())
//!         .build()
//!         .map_err(std::io::Error::other)?;
//!     let app_db = db.clone();
//!     HttpServer::new(move || {
//!         App::new().service(
//!             web::resource("/events")
//!                 .route(web::post().to(record))
//!                 .wrap(app_db.middleware()),
//!         )
//!     })
//!     .bind(("127.0.0.1", 8080))?
//!     .run()
//!     .await?;
//!     // Requests a shutdown timeout cut off cancel their statements on the way out.
//!     db.shut_down(std::time::Duration::from_secs(2)).await;
//!     Ok(())
//! }
//! ```
//!
//! See the README for the whole rule, the time bounds, and what the crate needs of
//! diesel-async.

#![deny(missing_docs)]

mod config;
mod connect;
mod error;
mod observe;
mod pool;
mod probe;
mod replica;
mod session;
mod tls;
mod url;
mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;

pub use crate::config::{SessionConfig, DEADLINE_MARGIN, FINISH_DEADLINE_FALLBACK};
pub use crate::connect::Connector;
pub use crate::error::{SessionError, LOST_BEFORE_COMMIT, NO_CONNECTION_IN_TIME, RETRY_AFTER_SECS};
pub use crate::observe::{CloseReason, NoObserver, Outcome, Reason, SessionObserver, TimeoutKind};
pub use crate::pool::{
    ping, spawn_periodic, DbPool, PingError, PoolError, PooledConnection, REAP_INTERVAL,
};
pub use crate::probe::{Check, Readiness};
pub use crate::replica::{
    CommitPosition, Lsn, ReadAfter, ReadReason, ReadTarget, ReplicaConfig, ReplicaStatus,
};
pub use crate::session::{
    DbSession, ErrorRenderer, Isolation, Retry, SessionConn, SessionMiddleware, SessionService,
};
pub use crate::url::{DatabaseUrl, SslMode};
pub use crate::workers::MIN_WORKER_SHARE;

use crate::session::Settings;
use crate::workers::WorkerPools;

/// A database for request sessions: the pool, the connector it opens connections with,
/// and the settings every session shares. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Database {
    settings: Arc<Settings>,
    config: Arc<SessionConfig>,
    /// The workers' own pools, with [`SessionConfig::worker_pools`].
    workers: Option<Arc<WorkerPools>>,
}

/// Builds a [`Database`]; see [`Database::builder`].
pub struct DatabaseBuilder {
    url: DatabaseUrl,
    config: SessionConfig,
    observer: Arc<dyn SessionObserver>,
    render: ErrorRenderer,
    replicas: Vec<DatabaseUrl>,
    replica_config: ReplicaConfig,
}

impl Database {
    /// Starts building a database for `url` with the limits of `config`.
    pub fn builder(url: DatabaseUrl, config: SessionConfig) -> DatabaseBuilder {
        DatabaseBuilder {
            url,
            config,
            observer: Arc::new(NoObserver),
            render: Arc::new(|e: SessionError| actix_web::ResponseError::error_response(&e)),
            replicas: Vec::new(),
            replica_config: ReplicaConfig::default(),
        }
    }

    /// The middleware that runs each request's session; wrap it around the scopes or
    /// resources whose handlers take a [`DbSession`].
    pub fn middleware(&self) -> SessionMiddleware {
        SessionMiddleware::new(self.settings.clone(), self.workers.clone())
    }

    /// The application's pool, for work outside requests. With per-worker pools
    /// ([`SessionConfig::worker_pools`]) it keeps one connection of the budget, and the
    /// sessions run on their worker's pool ([`Database::pool_here`]); otherwise the
    /// sessions run on it too.
    pub fn pool(&self) -> &DbPool {
        &self.settings.pool
    }

    /// The pool the sessions of the calling thread run on: its worker's own pool once the
    /// worker has built its first session middleware, otherwise [`Database::pool`]. For
    /// handlers that check connections out themselves.
    pub fn pool_here(&self) -> DbPool {
        self.workers
            .as_ref()
            .and_then(WorkerPools::pool_here)
            .unwrap_or_else(|| self.settings.pool.clone())
    }

    /// The figures of all the pools together (the application's and every worker's):
    /// what health and metrics report as the pool.
    pub fn status(&self) -> deadpool::Status {
        let mut total = self.settings.pool.status();
        for pool in self.workers.iter().flat_map(|w| w.pools()) {
            add_status(&mut total, pool.status());
        }
        total
    }

    /// The connector the pool opens connections with. Make connectors for other purposes
    /// from it with [`Connector::with_settings`]: they share its TLS set-up.
    pub fn connector(&self) -> &Connector {
        &self.settings.connector
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// A readiness check on a dedicated connection named `application_name`, bounded by
    /// the probe timeout (see [`Readiness`]).
    pub fn readiness(&self, application_name: &str) -> Readiness {
        let cfg = &self.config;
        let connector = self.settings.connector.with_settings(
            application_name,
            Some(cfg.probe_timeout),
            cfg.idle_in_transaction_timeout,
            cfg.probe_timeout,
        );
        Readiness::new(connector, cfg.probe_timeout, cfg.max_lifetime)
    }

    /// What the latest measurement of each replica found (none without replicas).
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        let mut statuses = self
            .settings
            .replicas
            .as_ref()
            .map(|replicas| replicas.statuses())
            .unwrap_or_default();
        // With per-worker pools, a replica's pool figures are its shared pool's and every
        // worker's own together.
        if let Some(workers) = &self.workers {
            for (index, status) in statuses.iter_mut().enumerate() {
                for pool in workers.replica_pools(index) {
                    add_status(&mut status.pool, pool.status());
                }
            }
        }
        statuses
    }

    /// Ends the database after the server has stopped: waits, up to `within`, for the
    /// sessions the server cut off (a shutdown timeout) to give their connections up,
    /// primary and replicas, and for the cancel requests they send for statements still
    /// running to be sent, then closes the pools ([`Database::close`]). Returns whether
    /// everything finished in time.
    ///
    /// Actix answers a forced stop before the worker has dropped its requests (the worker
    /// thread drops them as its runtime stops, and Actix does not join it): a process that
    /// exited at once would lose those cancel requests, and the server would go on
    /// running the statements, holding their locks, until they end. A connection still
    /// checked out once the server has stopped belongs to such a request, or to work
    /// outside requests (an application's own check-outs, a replica's lag sample), which
    /// this waits for as well. Connections a handler checked out itself
    /// ([`Database::pool_here`]) get no cancel request when dropped: only sessions do.
    pub async fn shut_down(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let in_use = |s: &deadpool::Status| s.size > s.available;
        let mut released = false;
        while Instant::now() < deadline {
            if !in_use(&self.status()) && !self.replicas().iter().any(|r| in_use(&r.pool)) {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = self
            .settings
            .connector
            .cancels_sent(deadline.saturating_duration_since(Instant::now()))
            .await;
        self.close();
        released && sent
    }

    /// Closes the pool (and the replicas' pools): idle connections close now, connections
    /// in use when they come back; check-outs fail from now on.
    pub fn close(&self) {
        self.settings.pool.close();
        if let Some(workers) = &self.workers {
            workers.close();
        }
        if let Some(replicas) = &self.settings.replicas {
            replicas.close();
        }
    }
}

/// Adds one pool's figures to a sum of pools'.
fn add_status(total: &mut deadpool::Status, status: deadpool::Status) {
    total.max_size += status.max_size;
    total.size += status.size;
    total.available += status.available;
    total.waiting += status.waiting;
}

impl DatabaseBuilder {
    /// Reports the session layer's events to `observer` (metrics, logs).
    pub fn observer(mut self, observer: impl SessionObserver) -> Self {
        self.observer = Arc::new(observer);
        self
    }

    /// Renders the errors the middleware answers with itself (a failed or unknown COMMIT,
    /// a deadline, a panic) the application's way; the default is
    /// [`SessionError`]'s own plain-text rendering. Errors that handlers return are
    /// rendered by the handlers' own error type.
    pub fn render_errors(
        mut self,
        render: impl Fn(SessionError) -> HttpResponse + Send + Sync + 'static,
    ) -> Self {
        self.render = Arc::new(render);
        self
    }

    /// Runs read-only sessions on these streaming replicas of the database when they are
    /// current enough, as `config` says: a pool per replica, background tasks that
    /// measure their lag (one per server), and the primary whenever no replica is
    /// eligible. See
    /// [`ReplicaConfig`] and the README, "Read replicas".
    pub fn replicas(mut self, urls: Vec<DatabaseUrl>, config: ReplicaConfig) -> Self {
        self.replicas = urls;
        self.replica_config = config;
        self
    }

    /// Builds the pool (without connecting) and starts its reaper (see
    /// [`SessionConfig::idle_timeout`]) on the current Tokio runtime, which also opens and
    /// drives the connections unless [`SessionConfig::drive_on_callers_runtime`] is set.
    /// With [`SessionConfig::worker_pools`], each worker's pool is built, and driven, by
    /// that worker when it builds its first [`SessionMiddleware`].
    /// Fails outside a Tokio runtime (call it from `#[actix_web::main]`, say).
    pub fn build(self) -> Result<Database, SessionError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SessionError::internal(
                "Database::build needs a Tokio runtime: the one that runs the pool's reaper and drives its connections",
            ));
        }
        let cfg = self.config;
        let connector = Connector::for_sessions(&self.url, &cfg);
        let application = workers::application_connections(!self.replicas.is_empty());
        let shares = (cfg.worker_pools > 1)
            .then(|| {
                workers::shares(
                    cfg.pool_size,
                    cfg.max_connections().saturating_sub(application),
                    cfg.worker_pools,
                )
            })
            .flatten();
        let per_worker = shares.is_some();
        if cfg.worker_pools > 1 && !per_worker {
            log::info!(
                "{} pooled connections cannot give {} workers {} each besides the application's {application}: one pool for all, driven on the application's runtime",
                cfg.max_connections(),
                cfg.worker_pools,
                workers::MIN_WORKER_SHARE,
            );
        }
        // The application's own pool: with per-worker pools, its connections, none kept
        // open when idle.
        let application_cfg = if per_worker {
            workers::share_config(&cfg, (0, application))
        } else {
            cfg.clone()
        };
        let mut settings = Settings::with_new_pool(
            &application_cfg,
            connector,
            &self.observer,
            &self.render,
            pool::RecyclePing::Select1,
        )
        .map_err(|e| SessionError::internal(format!("building the pool failed: {e}")))?;
        if !self.replicas.is_empty() {
            // Each worker gets pools of the replicas too only if it has one of the primary.
            let mut replica_session_cfg = cfg.clone();
            if !per_worker {
                replica_session_cfg.worker_pools = 0;
            }
            let replicas = replica::Replicas::start(
                &self.replicas,
                &replica_session_cfg,
                &self.replica_config,
                &settings.pool,
                &settings.connector,
                &settings.observer,
                &settings.render,
            )
            .map_err(|e| SessionError::internal(format!("building a replica pool failed: {e}")))?;
            settings.replicas = Some(replicas);
        }
        let settings = Arc::new(settings);
        let workers = shares.map(|shares| WorkerPools::new(&cfg, settings.clone(), shares));
        Ok(Database {
            settings,
            config: Arc::new(cfg),
            workers,
        })
    }
}
