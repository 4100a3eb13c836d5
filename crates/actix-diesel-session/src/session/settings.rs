//! What every session of one [`crate::Database`] shares.

use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpResponse;

use crate::config::SessionConfig;
use crate::connect::Connector;
use crate::error::SessionError;
use crate::observe::SessionObserver;
use crate::pool::{self, DbPool, RecyclePing};
use crate::replica::Replicas;

/// How the middleware turns a [`SessionError`] into the response it sends instead of the
/// handler's (see [`crate::DatabaseBuilder::render_errors`]).
pub type ErrorRenderer = Arc<dyn Fn(SessionError) -> HttpResponse + Send + Sync>;

/// The sessions' shared settings, derived once from the [`SessionConfig`].
pub(crate) struct Settings {
    pub(crate) pool: DbPool,
    /// Opens the connection that resolves a lost COMMIT answer, and sends cancel requests
    /// for statements the session gives up on.
    pub(crate) connector: Connector,
    pub(crate) observer: Arc<dyn SessionObserver>,
    pub(crate) render: ErrorRenderer,
    /// Bound on check-out plus BEGIN, and on resolving a lost COMMIT answer.
    pub(crate) checkout_timeout: Duration,
    /// See [`SessionConfig::statement_deadline`].
    pub(crate) statement_deadline: Option<Duration>,
    /// See [`SessionConfig::finish_deadline`].
    pub(crate) finish_deadline: Duration,
    pub(crate) leak_warn: Option<Duration>,
    pub(crate) after_commit_timeout: Duration,
    pub(crate) echo: bool,
    /// The replicas that read-only sessions may run on (none by default).
    pub(crate) replicas: Option<Arc<Replicas>>,
    /// This worker's own pool of each replica, by the replica's index, with per-worker
    /// pools (empty otherwise: sessions use the replica's shared pool).
    pub(crate) replica_pools: Vec<Arc<Settings>>,
    /// Bound on a replica's check-out plus BEGIN before the read goes to the primary.
    pub(crate) replica_checkout_timeout: Duration,
    /// See [`SessionConfig::statement_cache`].
    pub(crate) statement_cache: bool,
    /// Appended to every `BEGIN`, in its message: the timeouts' `SET LOCAL`s when they do
    /// not travel in the start-up packet (see [`SessionConfig::startup_options`]).
    pub(crate) begin_suffix: String,
}

impl Settings {
    /// The settings of sessions on a new pool for `cfg` (built without connecting,
    /// through `connector`, pinging with `ping`), its reaper started on the current
    /// runtime. One recipe for the application's pool, a worker's, and a replica's.
    pub(crate) fn with_new_pool(
        cfg: &SessionConfig,
        connector: Connector,
        observer: &Arc<dyn SessionObserver>,
        render: &ErrorRenderer,
        ping: RecyclePing,
    ) -> Result<Self, deadpool::managed::BuildError> {
        let pool = pool::build(cfg, connector.clone(), observer.clone(), ping)?;
        pool::spawn_reaper(&pool, cfg, observer.clone());
        Ok(Settings::new(
            cfg,
            pool,
            connector,
            observer.clone(),
            render.clone(),
        ))
    }

    pub(crate) fn new(
        cfg: &SessionConfig,
        pool: DbPool,
        connector: Connector,
        observer: Arc<dyn SessionObserver>,
        render: ErrorRenderer,
    ) -> Self {
        Settings {
            pool,
            connector,
            observer,
            render,
            checkout_timeout: cfg.checkout_timeout,
            statement_deadline: cfg.statement_deadline(),
            finish_deadline: cfg.finish_deadline(),
            leak_warn: cfg.leak_warn,
            after_commit_timeout: cfg.after_commit_timeout,
            echo: cfg.echo,
            replicas: None,
            replica_pools: Vec::new(),
            // A replica that does not hand out a connection within the probe timeout loses
            // the read to the primary, which can still serve it in time (and counts as
            // down, unless its pool only had every connection in use: `Slot::open`).
            replica_checkout_timeout: cfg.checkout_timeout.min(cfg.probe_timeout),
            statement_cache: cfg.statement_cache,
            begin_suffix: cfg.begin_suffix(),
        }
    }
}
