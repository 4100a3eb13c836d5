//! Opening server connections: the one place that knows how a connection is made.
//!
//! Session settings travel in the start-up packet (`application_name`, and
//! `statement_timeout` / `idle_in_transaction_session_timeout` through `options`), so a new
//! connection costs no extra `SET` round trips. Behind a pooler that refuses `options`
//! ([`Connector::without_startup_options`]) the timeouts are left out, and the session
//! sets them with each `BEGIN` instead (see [`crate::SessionConfig::startup_options`]). TLS follows the URL's `sslmode` (see
//! [`crate::tls`]), set up once per URL: connectors for other purposes (the readiness
//! check, an application's migrations) are made from the pool's with
//! [`Connector::with_settings`], sharing it.
//!
//! An attempt is bounded as a whole: one deadline covers TCP, TLS, start-up,
//! authentication and diesel-async's own first statements (the driver's `connect_timeout`
//! covers only the TCP connect, so a server that accepts and then says nothing would hold
//! an attempt forever). An attempt whose caller stops waiting (a pool check-out given up,
//! a probe past its timeout) is cancelled with it and closes its socket: nothing keeps
//! connecting in the background, so a silent server cannot collect a pile of half-open
//! attempts that would all turn into server connections at once when it recovers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::CacheSize;
use diesel::ConnectionError;
use diesel_async::{AsyncConnection, AsyncPgConnection};

use crate::tls::{self, Tls};
use crate::url::DatabaseUrl;

/// TCP keepalive settings for real network failures (a peer that vanished without a FIN).
/// They cannot catch a peer that acknowledges but never answers: that is what the
/// application deadlines are for.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Bound on a cancel request (it opens a connection of its own, which may hang too).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes connections with fixed session settings.
///
/// Every connection is opened, and its socket driven, on the Tokio runtime that created
/// the `Connector` (normally the runtime that builds the application, the one `main`
/// runs on), not on whichever Actix worker first needed it: diesel-async spawns the task
/// that drives a connection's socket on the current runtime, and a worker's runtime stops
/// with the worker. During a graceful shutdown an idle worker stops first, so connections
/// it had opened would die under the requests other workers are still finishing. A pool
/// that only one worker uses is the exception ([`Connector::on_callers_runtime`]: a
/// single worker, or a worker's own pool).
#[derive(Clone, Debug)]
pub struct Connector {
    url: DatabaseUrl,
    config: tokio_postgres::Config,
    tls: Tls,
    /// The runtime that opens and drives connections; `None` outside any runtime, where
    /// connections use the runtime of their caller.
    io: Option<tokio::runtime::Handle>,
    /// The runtime that sends cancel requests: the one that made the connector, also when
    /// connections are driven on their callers' runtimes. A worker's runtime may be
    /// stopping when a statement is given up on (a shutdown timeout), and a cancel
    /// spawned there would never be sent.
    cancel_io: Option<tokio::runtime::Handle>,
    /// Cancel requests under way (shared by every connector made from this one), so that
    /// a shutdown can wait for them before the process exits: see
    /// [`crate::Database::shut_down`].
    cancels: Arc<AtomicUsize>,
    /// The bound on a whole attempt.
    attempt_timeout: Duration,
    /// `config` without the timeouts in `options` (the URL's own `options` kept), for
    /// [`Connector::without_startup_options`].
    plain: tokio_postgres::Config,
    /// Whether `config` carries the timeouts.
    startup_options: bool,
    /// Whether connections keep prepared statements across transactions.
    statement_cache: bool,
}

/// Aborts the spawned attempt when the caller stops waiting for it: a dropped
/// `JoinHandle` detaches its task, which would keep connecting.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        // A no-op for a finished task; its output (a connection) is dropped with the handle.
        self.0.abort();
    }
}

impl Connector {
    /// A connector whose connections identify as `application_name` and carry the given
    /// server-side timeouts (`None` leaves the server's default). `connect_timeout` bounds
    /// each attempt from the TCP connect to the connection being ready for use. Sets up
    /// TLS as the URL's `sslmode` says (reading the CA file or the system's roots).
    pub fn new(
        url: &DatabaseUrl,
        application_name: &str,
        statement_timeout: Option<Duration>,
        idle_in_tx_timeout: Option<Duration>,
        connect_timeout: Duration,
    ) -> Self {
        Connector::configure(
            url.clone(),
            Tls::for_url(url),
            application_name,
            statement_timeout,
            idle_in_tx_timeout,
            connect_timeout,
        )
    }

    /// The connector of a session pool to `url` as `cfg` says: its application name,
    /// timeouts, the runtime that drives its connections, and what a pooler in front needs
    /// ([`crate::SessionConfig::startup_options`], [`crate::SessionConfig::statement_cache`]).
    /// One place for the primary's pool and every replica's, so that they cannot differ.
    pub(crate) fn for_sessions(url: &DatabaseUrl, cfg: &crate::SessionConfig) -> Self {
        let mut connector = Connector::new(
            url,
            &cfg.application_name,
            cfg.statement_timeout,
            cfg.idle_in_transaction_timeout,
            cfg.checkout_timeout,
        );
        if cfg.drive_on_callers_runtime {
            connector = connector.on_callers_runtime();
        }
        if !cfg.startup_options {
            connector = connector.without_startup_options();
        }
        if !cfg.statement_cache {
            connector = connector.without_statement_cache();
        }
        connector
    }

    /// A connector to the same server with the same TLS set-up (not made again) and other
    /// session settings; it drives its connections where this one does.
    pub fn with_settings(
        &self,
        application_name: &str,
        statement_timeout: Option<Duration>,
        idle_in_tx_timeout: Option<Duration>,
        connect_timeout: Duration,
    ) -> Self {
        let made = Connector {
            io: self.io.clone(),
            cancel_io: self.cancel_io.clone(),
            cancels: self.cancels.clone(),
            statement_cache: self.statement_cache,
            ..Connector::configure(
                self.url.clone(),
                self.tls.clone(),
                application_name,
                statement_timeout,
                idle_in_tx_timeout,
                connect_timeout,
            )
        };
        if self.startup_options {
            made
        } else {
            made.without_startup_options()
        }
    }

    /// Leaves the timeouts out of the start-up packet (the URL's own `options`, if any,
    /// still go): PgBouncer refuses the `options` start-up parameter, or drops it when told
    /// to ignore it. Connectors made from this one with [`Connector::with_settings`] leave
    /// them out too. Whoever uses the connections then sets the timeouts itself: the
    /// session does, with `SET LOCAL` in each `BEGIN`'s message.
    pub fn without_startup_options(mut self) -> Self {
        self.config = self.plain.clone();
        self.startup_options = false;
        self
    }

    /// Turns diesel-async's prepared statement cache off on every connection this
    /// connector opens (and those of connectors made from it with
    /// [`Connector::with_settings`]): each statement is prepared, used and closed in turn,
    /// so that none outlives the transaction it was prepared in (see
    /// [`crate::SessionConfig::statement_cache`]).
    pub fn without_statement_cache(mut self) -> Self {
        self.statement_cache = false;
        self
    }

    fn configure(
        url: DatabaseUrl,
        tls: Tls,
        application_name: &str,
        statement_timeout: Option<Duration>,
        idle_in_tx_timeout: Option<Duration>,
        connect_timeout: Duration,
    ) -> Self {
        let mut config = url.pg_config();
        config
            .application_name(application_name)
            .connect_timeout(connect_timeout)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
        // The driver's own negotiation does the `prefer` fallback and refuses a server
        // without TLS for `require`; certificate checks are the TLS connector's.
        config.ssl_mode(match &tls {
            Tls::Enabled {
                required: false, ..
            } => tokio_postgres::config::SslMode::Prefer,
            Tls::Enabled { required: true, .. } => tokio_postgres::config::SslMode::Require,
            Tls::Disabled | Tls::Broken(_) => tokio_postgres::config::SslMode::Disable,
        });
        let plain = config.clone();
        let mut options: Vec<String> = config
            .get_options()
            .map(str::to_owned)
            .into_iter()
            .collect();
        // 0 switches a PostgreSQL timeout off, which is what `None` means here.
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
        options.push(format!("-c statement_timeout={}", ms(statement_timeout)));
        options.push(format!(
            "-c idle_in_transaction_session_timeout={}",
            ms(idle_in_tx_timeout)
        ));
        config.options(options.join(" "));
        Connector {
            url,
            config,
            tls,
            io: tokio::runtime::Handle::try_current().ok(),
            cancel_io: tokio::runtime::Handle::try_current().ok(),
            cancels: Arc::new(AtomicUsize::new(0)),
            attempt_timeout: connect_timeout,
            plain,
            startup_options: true,
            statement_cache: true,
        }
    }

    /// Drives each connection on the runtime of whoever opens it instead, for a pool that
    /// only one Actix worker uses (a single worker, see
    /// [`crate::SessionConfig::drive_on_callers_runtime`], or a worker's own pool, see
    /// [`crate::SessionConfig::worker_pools`]): that worker then runs both the requests
    /// and their connections' sockets, and a round trip costs no wake-up of another thread
    /// (two per round trip otherwise, about a fifth of the service's CPU per request). The
    /// hazard the application's runtime guards against, an idle worker stopping first
    /// under a graceful shutdown, needs another worker using the same connections. Cancel
    /// requests are still sent from the runtime that made the connector.
    pub fn on_callers_runtime(mut self) -> Self {
        self.io = None;
        self
    }

    /// Opens one connection within the connector's attempt timeout. Dropping the returned
    /// future cancels the attempt and closes its socket. Errors carry the driver's
    /// message, which names the host but never the password; TLS failures also name the
    /// `sslmode`.
    pub async fn establish(&self) -> Result<AsyncPgConnection, ConnectionError> {
        let limit = self.attempt_timeout;
        let attempt = async {
            let Some(io) = &self.io else {
                return self.establish_here().await;
            };
            let connector = self.clone();
            let mut task = AbortOnDrop(io.spawn(async move { connector.establish_here().await }));
            (&mut task.0).await.map_err(|e| {
                ConnectionError::BadConnection(format!("connection task failed: {e}"))
            })?
        };
        // On expiry the attempt is dropped, which aborts its task.
        tokio::time::timeout(limit, attempt).await.map_err(|_| {
            ConnectionError::BadConnection(format!(
                "the database did not complete the connection within {limit:?}"
            ))
        })?
    }

    /// Asks the server, in the background and within `CANCEL_TIMEOUT` (5 s), to cancel what
    /// the connection of `token` is running: closing a socket does not stop a statement
    /// the server is executing, nor free its locks, until the server next writes to it.
    ///
    /// Sent from the caller's runtime (no other thread to wake), or from the runtime that
    /// made the connector when the caller's is stopping (a worker dropping its requests at
    /// a forced shutdown: without a runtime context, or one that no longer runs tasks).
    pub fn cancel(&self, token: tokio_postgres::CancelToken) {
        let send = || {
            let (token, tls) = (token.clone(), self.tls.clone());
            let pending = PendingCancel::new(&self.cancels);
            async move {
                let _pending = pending;
                let sent = async {
                    match tls {
                        Tls::Enabled { connector, .. } => token.cancel_query(connector).await,
                        Tls::Disabled | Tls::Broken(_) => {
                            token.cancel_query(tokio_postgres::NoTls).await
                        }
                    }
                };
                match tokio::time::timeout(CANCEL_TIMEOUT, sent).await {
                    Ok(Ok(())) => log::debug!("cancel request sent"),
                    Ok(Err(e)) => log::warn!("cancel request failed: {}", with_causes(&e)),
                    Err(_) => {
                        log::warn!("cancel request got no answer within {CANCEL_TIMEOUT:?}")
                    }
                }
            }
        };
        if let Ok(here) = tokio::runtime::Handle::try_current() {
            // A runtime that is shutting down drops a task at once: finished before it ran.
            if !here.spawn(send()).is_finished() {
                return;
            }
        }
        if let Some(io) = &self.cancel_io {
            io.spawn(send());
        }
    }

    /// Sends cancel requests as `primary` does (from its runtime when the caller's is
    /// stopping) and counts them with its own, so that one wait at shutdown covers both.
    pub(crate) fn sharing_cancels_with(mut self, primary: &Connector) -> Self {
        self.cancel_io = primary.cancel_io.clone();
        self.cancels = primary.cancels.clone();
        self
    }

    /// Waits until no cancel request of this connector (or of one made from it) is under
    /// way, or `within` has passed; whether none is left.
    pub(crate) async fn cancels_sent(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        // Polled: a shutdown waits here once, for milliseconds.
        while self.cancels.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    async fn establish_here(&self) -> Result<AsyncPgConnection, ConnectionError> {
        let mut conn = self.open().await?;
        if !self.statement_cache {
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        }
        Ok(conn)
    }

    async fn open(&self) -> Result<AsyncPgConnection, ConnectionError> {
        match &self.tls {
            Tls::Disabled => {
                let (client, connection) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| ConnectionError::BadConnection(with_causes(&e)))?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
            Tls::Enabled { connector, .. } => {
                let (client, connection) =
                    self.config.connect(connector.clone()).await.map_err(|e| {
                        ConnectionError::BadConnection(format!(
                            "{} (sslmode={})",
                            with_causes(&e),
                            tls::mode_name(self.url.ssl_mode())
                        ))
                    })?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
            // Fail closed: never fall back to plain text when TLS could not be set up.
            Tls::Broken(e) => Err(ConnectionError::BadConnection(e.clone())),
        }
    }
}

/// Counts a cancel request as under way until it is dropped (sent, failed, timed out, or
/// its task dropped with a runtime that stopped).
struct PendingCancel(Arc<AtomicUsize>);

impl PendingCancel {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        PendingCancel(count.clone())
    }
}

impl Drop for PendingCancel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The driver's error with its causes: its own text is only the kind ("error performing
/// TLS handshake"); the cause says what happened ("invalid peer certificate: ..."). None of
/// them contains the password.
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
