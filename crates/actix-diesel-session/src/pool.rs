//! The connection pool: deadpool over diesel-async, with every limit explicit.
//!
//! deadpool alone sets no timeouts (a check-out may wait forever), has no notion of
//! overflow, of idle reaping or of a maximum lifetime, and diesel-async's default recycling
//! pings on every check-out. What this module adds:
//! - `max_size = pool_size + max_overflow`, a hard cap;
//! - wait, create and recycle timeouts on the Tokio runtime (deadpool refuses timeouts
//!   without one). They bound the individual steps; the session additionally puts one
//!   outer deadline of the check-out timeout over check-out plus BEGIN, because deadpool's
//!   steps add up (wait, then a recycle per idle connection tried, then a create);
//! - LIFO hand-out, so that under light load the same few connections are reused and the
//!   ones beyond `pool_size` sit idle long enough for the reaper to close them;
//! - a reaper task, every [`REAP_INTERVAL`], that closes idle connections beyond
//!   `pool_size` once they have been idle for `idle_timeout`, and idle
//!   connections past their maximum lifetime (`max_lifetime`);
//! - a `pre_recycle` hook that retires connections past their maximum lifetime at check-out
//!   and pings (`SELECT 1` on the primary, an empty query on a replica, bounded by
//!   [`crate::SessionConfig::ping_timeout`]) only
//!   those unused for longer than `ping_if_idle_for`, as HikariCP does: a busy service
//!   pays no round trip per request, while a connection the server closed during a quiet
//!   spell is caught before a request sees it;
//!
//! "Unused" and "idle" are deadpool's `Metrics::last_used`: the time since the connection
//! was last *checked out* (deadpool stamps check-outs, not returns). So a connection that
//! a request held for longer than 500 ms is pinged at its next check-out, and an overflow
//! connection held past `idle_timeout` may be closed by the reaper soon after it
//! comes back. Both err on the safe side (a spare ping, an early close of an overflow
//! connection).
//! - `RecyclingMethod::Fast`, which still discards connections whose socket is closed or
//!   whose transaction state is not clean.
//!
//! Connections are opened lazily; the pool does not pre-fill `pool_size`.
//!
//! deadpool counts a connection being created against `max_size` only through the
//! check-out's semaphore permit, which it releases as soon as the `get()` future is
//! dropped (a check-out deadline, the create timeout): the next check-out may then start
//! a create of its own. The [`Connector`] therefore cancels an attempt whose caller stopped
//! waiting, so creates in progress never outnumber the permits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{Hook, HookError, Metrics, QueueMode, Timeouts};
use deadpool::Runtime;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;

use crate::config::SessionConfig;
use crate::connect::Connector;
use crate::observe::{CloseReason, SessionObserver};

/// The pool of diesel-async PostgreSQL connections.
pub type DbPool = deadpool::managed::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;
/// A checked-out connection; dropping it returns it to the pool.
pub type PooledConnection =
    deadpool::managed::Object<AsyncDieselConnectionManager<AsyncPgConnection>>;
/// The error of a check-out.
pub type PoolError = deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>;

/// How often the reaper looks for idle overflow and expired connections.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the pool; building does not connect. Connections are opened through
/// `connector`; opening and retiring them is reported to `observer`.
pub(crate) fn build(
    cfg: &SessionConfig,
    connector: Connector,
    observer: Arc<dyn SessionObserver>,
    ping: RecyclePing,
) -> Result<DbPool, deadpool::managed::BuildError> {
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.recycling_method = RecyclingMethod::Fast;
    let create_observer = observer.clone();
    manager_config.custom_setup = Box::new(move |_url| {
        let (connector, observer) = (connector.clone(), create_observer.clone());
        async move {
            let started = Instant::now();
            let conn = connector.establish().await?;
            observer.connection_opened(started.elapsed());
            Ok(conn)
        }
        .boxed()
    });
    // The URL argument is unused: `custom_setup` connects through the Connector, which
    // holds the parsed settings. Passing an empty string keeps the password out of the
    // manager altogether.
    let manager = AsyncDieselConnectionManager::new_with_config("", manager_config);

    let (max_lifetime, ping_if_idle_for, ping_timeout) =
        (cfg.max_lifetime, cfg.ping_if_idle_for, cfg.ping_timeout());
    DbPool::builder(manager)
        .max_size(cfg.max_connections())
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(cfg.checkout_timeout),
            create: Some(cfg.checkout_timeout),
            recycle: Some(cfg.checkout_timeout),
        })
        .pre_recycle(Hook::async_fn(
            move |conn: &mut AsyncPgConnection, metrics: &Metrics| {
                let (metrics, observer) = (*metrics, observer.clone());
                async move {
                    if metrics.age() >= max_lifetime {
                        observer.connection_closed(CloseReason::Lifetime, 1);
                        return Err(HookError::message(
                            "connection reached its maximum lifetime",
                        ));
                    }
                    if metrics.last_used() < ping_if_idle_for {
                        return Ok(());
                    }
                    recycle_ping(conn, ping, ping_timeout).await.map_err(|e| {
                        // A silent server is worth a warning; a closed connection is
                        // routine (the server restarted, an idle timeout).
                        match e {
                            PingError::TimedOut(_) => {
                                log::warn!("discarding a pooled connection: {e}")
                            }
                            PingError::Failed(_) => {
                                log::info!("discarding a pooled connection: {e}")
                            }
                        }
                        observer.connection_closed(CloseReason::RecycleFailed, 1);
                        HookError::message("ping failed")
                    })
                }
                .boxed()
            },
        ))
        .build()
}

/// One `SELECT 1` round trip within `timeout`: the readiness check. Through the simple
/// protocol: outside a transaction a prepared statement is named, and a transaction pooler
/// may run its execution on another server connection than its preparation.
pub async fn ping(conn: &mut AsyncPgConnection, timeout: Duration) -> Result<(), PingError> {
    round_trip(conn, "SELECT 1", timeout).await
}

/// The check before reusing a long-idle pooled connection, `sql` the pool's
/// [`RecyclePing`]. (deadpool runs hooks without its recycle timeout, so the ping carries
/// its own.)
async fn recycle_ping(
    conn: &mut AsyncPgConnection,
    sql: RecyclePing,
    timeout: Duration,
) -> Result<(), PingError> {
    round_trip(conn, sql.sql(), timeout).await
}

/// What a pool's check before reuse sends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RecyclePing {
    /// `SELECT 1`, on the primary: a statement that pg_stat_statements counts, so that a
    /// benchmark can tell that requests pay for no ping.
    Select1,
    /// An empty query, on a replica: a round trip that needs no snapshot. A `SELECT 1`
    /// would take one, and a hot standby whose `default_transaction_isolation` is
    /// `serializable` refuses every snapshot outside a transaction that states a lower
    /// level ("cannot use serializable mode in a hot standby").
    Empty,
}

impl RecyclePing {
    fn sql(self) -> &'static str {
        match self {
            RecyclePing::Select1 => "SELECT 1",
            RecyclePing::Empty => "",
        }
    }
}

async fn round_trip(
    conn: &mut AsyncPgConnection,
    sql: &str,
    timeout: Duration,
) -> Result<(), PingError> {
    match tokio::time::timeout(timeout, conn.batch_execute(sql)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(PingError::Failed(e.to_string())),
        Err(_) => Err(PingError::TimedOut(timeout)),
    }
}

/// Why a [`ping`] failed. The text names no secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PingError {
    /// The server answered with an error, or the connection is closed: the driver's text.
    #[error("ping failed: {0}")]
    Failed(String),
    /// No answer within this bound.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Starts the reaper on the current Tokio runtime. It holds only a weak reference and
/// ends when the pool is dropped or closed.
pub(crate) fn spawn_reaper(pool: &DbPool, cfg: &SessionConfig, observer: Arc<dyn SessionObserver>) {
    let (base, idle_timeout, max_lifetime) = (cfg.pool_size, cfg.idle_timeout, cfg.max_lifetime);
    // The first run comes at once.
    spawn_periodic(
        pool,
        tokio::time::Instant::now(),
        REAP_INTERVAL,
        move |pool| {
            reap(&pool, base, idle_timeout, max_lifetime, observer.as_ref());
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
pub(crate) fn reap(
    pool: &DbPool,
    base: usize,
    idle_timeout: Duration,
    max_lifetime: Duration,
    observer: &dyn SessionObserver,
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
    for (reason, count) in [(CloseReason::Lifetime, expired), (CloseReason::Idle, idle)] {
        if count > 0 {
            observer.connection_closed(reason, count);
        }
    }
    let closed = removed.removed.len();
    if closed > 0 {
        log::debug!("closed {closed} idle pooled connection(s)");
    }
    closed
}
