//! The connection pool: deadpool over diesel-async, with every limit explicit.
//!
//! deadpool alone sets no timeouts (a check-out may wait forever), has no notion of
//! overflow, of idle reaping or of a maximum lifetime, and diesel-async's default recycling
//! pings on every check-out. What this module adds:
//! - `max_size = DB_POOL_SIZE + DB_MAX_OVERFLOW`, a hard cap;
//! - wait, create and recycle timeouts on the Tokio runtime (deadpool refuses timeouts
//!   without one). They bound the individual steps; the session additionally puts one
//!   outer deadline of `DB_POOL_TIMEOUT` over check-out plus BEGIN, because deadpool's
//!   steps add up (wait, then a recycle per idle connection tried, then a create);
//! - LIFO hand-out, so that under light load the same few connections are reused and the
//!   ones beyond `DB_POOL_SIZE` sit idle long enough for the reaper to close them;
//! - a reaper task, every [`REAP_INTERVAL`], that closes idle connections beyond
//!   `DB_POOL_SIZE` once they have been idle for `DB_POOL_IDLE_TIMEOUT`, and idle
//!   connections past their maximum lifetime (`DB_POOL_RECYCLE`);
//! - a `pre_recycle` hook that retires connections past their maximum lifetime at check-out
//!   and pings (`SELECT 1`, bounded by `min(DB_HEALTH_TIMEOUT, DB_POOL_TIMEOUT / 4)`) only
//!   those unused for longer than [`PING_IF_IDLE_FOR`], as HikariCP does: a busy service
//!   pays no round trip per request, while a connection the server closed during a quiet
//!   spell is caught before a request sees it;
//!
//! "Unused" and "idle" are deadpool's `Metrics::last_used`: the time since the connection
//! was last *checked out* (deadpool stamps check-outs, not returns). So a connection that
//! a request held for longer than 500 ms is pinged at its next check-out, and an overflow
//! connection held past `DB_POOL_IDLE_TIMEOUT` may be closed by the reaper soon after it
//! comes back. Both err on the safe side (a spare ping, an early close of an overflow
//! connection).
//! - `RecyclingMethod::Fast`, which still discards connections whose socket is closed or
//!   whose transaction state is not clean.
//!
//! Connections are opened lazily; the pool does not pre-fill `DB_POOL_SIZE`.
//!
//! deadpool counts a connection being created against `max_size` only through the
//! check-out's semaphore permit, which it releases as soon as the `get()` future is
//! dropped (a check-out deadline, the create timeout): the next check-out may then start
//! a create of its own. The [`Connector`] therefore cancels an attempt whose caller stopped
//! waiting, so creates in progress never outnumber the permits.

use std::time::Duration;

use deadpool::managed::{Hook, HookError, Metrics, QueueMode, Timeouts};
use deadpool::Runtime;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::FutureExt;

use super::connect::Connector;
use crate::config::DbConfig;
use crate::metrics::db::{CloseReason, DbMetrics};

/// The pool type held in `web::Data`.
pub type DbPool = deadpool::managed::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;
/// A checked-out connection; dropping it returns it to the pool.
pub type PooledConnection =
    deadpool::managed::Object<AsyncDieselConnectionManager<AsyncPgConnection>>;
/// The error of a check-out.
pub type PoolError = deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>;

/// The `application_name` of every pooled connection.
pub const APPLICATION_NAME: &str = "ledger";
/// Connections idle for longer than this are pinged before they are handed out.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_millis(500);
/// How often the reaper looks for idle overflow and expired connections.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the pool. Must be called inside a Tokio runtime only when the pool is used;
/// building itself does not connect. Connections opened and retired are counted in
/// `metrics`.
pub fn build_pool(
    cfg: &DbConfig,
    metrics: &DbMetrics,
    single_worker: bool,
) -> Result<DbPool, deadpool::managed::BuildError> {
    let connector = if single_worker {
        connector(cfg).on_callers_runtime()
    } else {
        connector(cfg)
    };
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.recycling_method = RecyclingMethod::Fast;
    let create_metrics = metrics.clone();
    manager_config.custom_setup = Box::new(move |_url| {
        let (connector, metrics) = (connector.clone(), create_metrics.clone());
        async move { metrics.create(connector.establish()).await }.boxed()
    });
    // The URL argument is unused: `custom_setup` connects through the Connector, which
    // holds the parsed settings. Passing an empty string keeps the password out of the
    // manager altogether.
    let manager = AsyncDieselConnectionManager::new_with_config("", manager_config);

    let max_lifetime = cfg.max_lifetime;
    // A silent idle connection must not use up the request's whole check-out budget
    // (DB_POOL_TIMEOUT): give up on it early and let the pool open a fresh one.
    let ping_timeout = cfg.health_timeout.min(cfg.pool_timeout / 4);
    let hook_metrics = metrics.clone();
    DbPool::builder(manager)
        .max_size(cfg.max_connections())
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(cfg.pool_timeout),
            create: Some(cfg.pool_timeout),
            recycle: Some(cfg.pool_timeout),
        })
        .pre_recycle(Hook::async_fn(
            move |conn: &mut AsyncPgConnection, metrics: &Metrics| {
                let (metrics, counts) = (*metrics, hook_metrics.clone());
                async move {
                    check_before_reuse(conn, metrics, max_lifetime, ping_timeout, &counts).await
                }
                .boxed()
            },
        ))
        .build()
}

/// How pooled connections are made: `application_name = 'ledger'`, the configured
/// server-side timeouts, connection attempts bounded by `DB_POOL_TIMEOUT`.
pub fn connector(cfg: &DbConfig) -> Connector {
    Connector::new(
        &cfg.url,
        APPLICATION_NAME,
        cfg.statement_timeout,
        cfg.idle_in_tx_timeout,
        cfg.pool_timeout,
    )
}

/// Retires expired connections and pings long-idle ones. deadpool runs hooks without its
/// recycle timeout, so the ping carries its own.
async fn check_before_reuse(
    conn: &mut AsyncPgConnection,
    metrics: Metrics,
    max_lifetime: Duration,
    ping_timeout: Duration,
    counts: &DbMetrics,
) -> Result<(), HookError<diesel_async::pooled_connection::PoolError>> {
    if metrics.age() >= max_lifetime {
        counts.closed(CloseReason::Lifetime, 1);
        return Err(HookError::message(
            "connection reached its maximum lifetime",
        ));
    }
    if metrics.last_used() < PING_IF_IDLE_FOR {
        return Ok(());
    }
    let ping = diesel::sql_query("SELECT 1").execute(conn);
    match tokio::time::timeout(ping_timeout, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            log::info!("discarding a pooled connection that failed its ping: {e}");
            counts.closed(CloseReason::RecycleFailed, 1);
            Err(HookError::message("ping failed"))
        }
        Err(_) => {
            log::warn!("discarding a pooled connection whose ping timed out");
            counts.closed(CloseReason::RecycleFailed, 1);
            Err(HookError::message("ping timed out"))
        }
    }
}

/// Starts the reaper on the current Tokio runtime. It holds only a weak reference and
/// ends when the pool is dropped or closed.
pub fn spawn_reaper(pool: &DbPool, cfg: &DbConfig, metrics: &DbMetrics) {
    let metrics = metrics.clone();
    let (base, idle_timeout, max_lifetime) = (cfg.pool_size, cfg.idle_timeout, cfg.max_lifetime);
    // The first run comes at once.
    spawn_periodic(
        pool,
        tokio::time::Instant::now(),
        REAP_INTERVAL,
        move |pool| {
            reap(&pool, base, idle_timeout, max_lifetime, &metrics);
            std::future::ready(())
        },
    );
}

/// Runs `task` on the current Tokio runtime at `first`, then every `every` (a late run
/// delays the next ones rather than bunching them up), until the pool is dropped or
/// closed. Between runs it holds only a weak reference: it never keeps the pool alive.
pub fn spawn_periodic<F, Fut>(
    pool: &DbPool,
    first: tokio::time::Instant,
    every: Duration,
    mut task: F,
) where
    F: FnMut(DbPool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let weak = pool.weak();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(first, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { break };
            if pool.is_closed() {
                break;
            }
            task(pool).await;
        }
    });
}

/// Closes idle connections beyond `base` that sat idle for `idle_timeout`, and idle
/// connections older than `max_lifetime`. Returns how many it closed.
pub fn reap(
    pool: &DbPool,
    base: usize,
    idle_timeout: Duration,
    max_lifetime: Duration,
    counts: &DbMetrics,
) -> usize {
    let mut excess = pool.status().size.saturating_sub(base);
    let (mut expired, mut idle) = (0, 0);
    let removed = pool.retain(|_, metrics| {
        if metrics.age() >= max_lifetime {
            excess = excess.saturating_sub(1);
            expired += 1;
            return false;
        }
        if excess > 0 && metrics.last_used() >= idle_timeout {
            excess -= 1;
            idle += 1;
            return false;
        }
        true
    });
    counts.closed(CloseReason::Lifetime, expired);
    counts.closed(CloseReason::Idle, idle);
    let closed = removed.removed.len();
    if closed > 0 {
        log::debug!("closed {closed} idle pooled connection(s)");
    }
    closed
}
