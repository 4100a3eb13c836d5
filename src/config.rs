//! Configuration, read once from the environment at start-up.
//!
//! Every variable of the contract (section 6) lives here with its default as a named
//! constant. `main` loads `.env` with dotenvy first (the real environment wins); this
//! module never touches files. An empty value counts as unset. Any invalid value is a
//! [`ConfigError`] that names the variable and says what is wrong, and `main` turns it into
//! one line on stderr and exit status 2.
//!
//! | variable | default |
//! |---|---|
//! | `DATABASE_URL` | required |
//! | `DB_POOL_SIZE` | 5 |
//! | `DB_MAX_OVERFLOW` | 10 |
//! | `DB_POOL_IDLE_TIMEOUT` | 10 s |
//! | `DB_POOL_TIMEOUT` | 30 s |
//! | `DB_POOL_RECYCLE` | 1800 s |
//! | `DB_STATEMENT_TIMEOUT` | 0 ms (none) |
//! | `DB_IDLE_IN_TX_TIMEOUT` | 60000 ms |
//! | `DB_HEALTH_TIMEOUT` | 2 s |
//! | `DB_LEAK_WARN_SECS` | 10 s |
//! | `DB_ECHO` | false |
//! | `DB_REQUEST_ID_SETTING` | false |
//! | `DB_STATEMENT_CACHE` | true |
//! | `DB_STARTUP_OPTIONS` | true |
//! | `RUN_MIGRATIONS` | true |
//! | `HTTP_BODY_LIMIT` | 65536 bytes |
//! | `IDEMPOTENCY_TTL_SECS` | 86400 s |
//! | `SHUTDOWN_DRAIN_SECS` | 5 s |
//! | `SHUTDOWN_TIMEOUT_SECS` | 30 s |
//! | `HOST` / `PORT` | 127.0.0.1 / 8080 |
//! | `HTTP_WORKERS` | the CPUs available, but no more than the pool gives 4 connections each (see [`default_http_workers`]) |
//! | `DATABASE_REPLICA_URLS` | none (comma-separated URLs) |
//! | `DB_REPLICA_POOL_SIZE` | `DB_POOL_SIZE` |
//! | `DB_REPLICA_MAX_LAG` | 5000 ms |

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use actix_diesel_session::{DatabaseUrl, ReplicaConfig, SessionConfig};

pub const DEFAULT_POOL_SIZE: usize = 5;
pub const DEFAULT_MAX_OVERFLOW: usize = 10;
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_POOL_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_POOL_RECYCLE_SECS: u64 = 1800;
pub const DEFAULT_STATEMENT_TIMEOUT_MS: u64 = 0;
pub const DEFAULT_IDLE_IN_TX_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_HEALTH_TIMEOUT_SECS: f64 = 2.0;
pub const DEFAULT_LEAK_WARN_SECS: u64 = 10;
pub const DEFAULT_HTTP_BODY_LIMIT: usize = 64 * 1024;
pub const DEFAULT_IDEMPOTENCY_TTL_SECS: u64 = 86_400;
pub const DEFAULT_SHUTDOWN_DRAIN_SECS: u64 = 5;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
/// Off: it adds a statement to every transaction's BEGIN message (see the README,
/// "The request id in the database").
pub const DEFAULT_REQUEST_ID_SETTING: bool = false;
/// A replica further behind than this serves no reads (contract section 10).
pub const DEFAULT_REPLICA_MAX_LAG_MS: u64 = 5000;
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
/// Upper bound of `DB_POOL_SIZE` and `DB_MAX_OVERFLOW` (contract section 6).
const MAX_POOL_SETTING: usize = 1000;
/// The shortest duration setting. `Duration::from_secs_f64` would round `1e-10` down to
/// zero, which deadpool reads as "fail at once" and tokio as "already expired"; below a
/// millisecond a setting is a unit mix-up, not an intent.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// The longest duration setting, in seconds (a year): beyond it a value is a typo, and
/// `Duration::from_secs_f64` panics on values it cannot represent.
const MAX_DURATION_SECS: f64 = 366.0 * 86_400.0;
/// Upper bound of `HTTP_WORKERS`: a guard against typos, far above any core count.
const MAX_HTTP_WORKERS: usize = 1024;

/// A setting that could not be used, naming the variable: `DB_POOL_SIZE: must be ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// What is wrong with it; never echoes a value that may hold a secret.
    pub problem: String,
}

/// Everything the database layer needs.
#[derive(Clone, Debug)]
pub struct DbConfig {
    /// Where the database is; `Debug` and `Display` hide the password.
    pub url: DatabaseUrl,
    /// Connections kept open when idle.
    pub pool_size: usize,
    /// Extra connections allowed under load, closed again after `idle_timeout`.
    pub max_overflow: usize,
    /// Idle time after which connections beyond `pool_size` are closed.
    pub idle_timeout: Duration,
    /// Longest wait for a connection, check-out plus BEGIN.
    pub pool_timeout: Duration,
    /// Maximum lifetime of a connection.
    pub max_lifetime: Duration,
    /// Server-side `statement_timeout`; `None` means no limit.
    pub statement_timeout: Option<Duration>,
    /// Server-side `idle_in_transaction_session_timeout`; `None` means no limit.
    pub idle_in_tx_timeout: Option<Duration>,
    /// Bound on every step of the readiness round trip.
    pub health_timeout: Duration,
    /// Warn when a request holds a connection longer than this; `None` disables it.
    pub leak_warn: Option<Duration>,
    /// Log every SQL statement (text only) at `info`.
    pub echo: bool,
    /// Put each request's `X-Request-Id` into its transaction as the setting
    /// `app.request_id` (`DB_REQUEST_ID_SETTING`).
    pub request_id_setting: bool,
    /// Streaming replicas that serve reads (`DATABASE_REPLICA_URLS`); empty: none.
    pub replica_urls: Vec<DatabaseUrl>,
    /// Connections kept per replica (`DB_REPLICA_POOL_SIZE`).
    pub replica_pool_size: usize,
    /// A replica further behind than this serves no reads (`DB_REPLICA_MAX_LAG`).
    pub replica_max_lag: Duration,
    /// Keep prepared statements across transactions; `false` behind a transaction pooler
    /// that does not track them (PgBouncer in transaction mode before 1.21).
    pub statement_cache: bool,
    /// Send the timeouts in the start-up packet; `false` behind a pooler that refuses the
    /// `options` start-up parameter (PgBouncer): they are then set with each `BEGIN`.
    pub startup_options: bool,
}

/// The `application_name` of pooled connections.
pub const APPLICATION_NAME: &str = "ledger";

impl DbConfig {
    /// The hard cap on pooled connections: `pool_size + max_overflow`.
    pub fn max_connections(&self) -> usize {
        self.pool_size + self.max_overflow
    }

    /// The session layer's limits, from these settings, for a service of `workers` Actix
    /// workers: one worker drives its connections itself; more get a pool each (see the
    /// README, "A pool per worker").
    pub fn session_config(&self, workers: usize) -> SessionConfig {
        let mut cfg = SessionConfig::default();
        cfg.application_name = APPLICATION_NAME.to_owned();
        cfg.pool_size = self.pool_size;
        cfg.max_overflow = self.max_overflow;
        cfg.idle_timeout = self.idle_timeout;
        cfg.checkout_timeout = self.pool_timeout;
        cfg.max_lifetime = self.max_lifetime;
        cfg.probe_timeout = self.health_timeout;
        cfg.statement_timeout = self.statement_timeout;
        cfg.idle_in_transaction_timeout = self.idle_in_tx_timeout;
        cfg.leak_warn = self.leak_warn;
        cfg.echo = self.echo;
        cfg.drive_on_callers_runtime = workers == 1;
        cfg.worker_pools = workers;
        cfg.statement_cache = self.statement_cache;
        cfg.startup_options = self.startup_options;
        cfg
    }

    /// How the session layer uses the replicas, from these settings.
    pub fn replica_config(&self) -> ReplicaConfig {
        let mut cfg = ReplicaConfig::default();
        cfg.pool_size = self.replica_pool_size;
        cfg.max_lag = self.replica_max_lag;
        cfg
    }
}

/// The whole service configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub db: DbConfig,
    /// Apply embedded migrations at start-up.
    pub run_migrations: bool,
    /// Largest accepted request body, in bytes.
    pub http_body_limit: usize,
    /// How long idempotency keys are kept.
    pub idempotency_ttl: Duration,
    /// After SIGTERM: keep serving while readiness fails.
    pub shutdown_drain: Duration,
    /// Then: longest wait for in-flight requests.
    pub shutdown_timeout: Duration,
    pub host: IpAddr,
    pub port: u16,
    /// Actix worker threads. Each drives the connections of a pool of its own
    /// (`SessionConfig::worker_pools`, the budget split among them), so a request and its
    /// connection's socket stay on one thread; with a budget too small for that, one pool
    /// driven on the runtime that built the application (two cross-thread wake-ups per
    /// round trip); with one worker, that worker drives the one pool.
    pub http_workers: usize,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={}:{} database={} pool_size={} max_overflow={} pool_timeout={:?} \
             statement_timeout={:?} run_migrations={}",
            self.host,
            self.port,
            self.db.url,
            self.db.pool_size,
            self.db.max_overflow,
            self.db.pool_timeout,
            self.db.statement_timeout,
            self.run_migrations
        )
    }
}

impl Config {
    /// Reads the process environment. Call it once, after dotenvy has loaded `.env`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so that tests can feed a map instead of the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let url = env.required("DATABASE_URL")?;
        let url = DatabaseUrl::parse(&url).map_err(|problem| ConfigError {
            var: "DATABASE_URL",
            problem,
        })?;
        let pool_size = env.int_in("DB_POOL_SIZE", DEFAULT_POOL_SIZE, 1, MAX_POOL_SETTING)?;
        let db = DbConfig {
            url,
            pool_size,
            max_overflow: env.int_in(
                "DB_MAX_OVERFLOW",
                DEFAULT_MAX_OVERFLOW,
                0,
                MAX_POOL_SETTING,
            )?,
            idle_timeout: env.positive_secs(
                "DB_POOL_IDLE_TIMEOUT",
                DEFAULT_POOL_IDLE_TIMEOUT_SECS as f64,
                false,
            )?,
            pool_timeout: env.positive_secs("DB_POOL_TIMEOUT", DEFAULT_POOL_TIMEOUT_SECS, true)?,
            max_lifetime: env.positive_secs(
                "DB_POOL_RECYCLE",
                DEFAULT_POOL_RECYCLE_SECS as f64,
                false,
            )?,
            statement_timeout: env
                .optional_millis("DB_STATEMENT_TIMEOUT", DEFAULT_STATEMENT_TIMEOUT_MS)?,
            idle_in_tx_timeout: env
                .optional_millis("DB_IDLE_IN_TX_TIMEOUT", DEFAULT_IDLE_IN_TX_TIMEOUT_MS)?,
            health_timeout: env.positive_secs(
                "DB_HEALTH_TIMEOUT",
                DEFAULT_HEALTH_TIMEOUT_SECS,
                true,
            )?,
            leak_warn: match env.int_in(
                "DB_LEAK_WARN_SECS",
                DEFAULT_LEAK_WARN_SECS as usize,
                0,
                usize::MAX,
            )? {
                0 => None,
                secs => Some(Duration::from_secs(secs as u64)),
            },
            echo: env.boolean("DB_ECHO", false)?,
            request_id_setting: env.boolean("DB_REQUEST_ID_SETTING", DEFAULT_REQUEST_ID_SETTING)?,
            replica_urls: env.urls("DATABASE_REPLICA_URLS")?,
            replica_pool_size: env.int_in(
                "DB_REPLICA_POOL_SIZE",
                pool_size,
                1,
                MAX_POOL_SETTING,
            )?,
            replica_max_lag: match env
                .optional_millis("DB_REPLICA_MAX_LAG", DEFAULT_REPLICA_MAX_LAG_MS)?
            {
                Some(lag) => lag,
                None => {
                    return Err(ConfigError::new(
                        "DB_REPLICA_MAX_LAG",
                        "must be > 0 milliseconds",
                    ))
                }
            },
            statement_cache: env.boolean("DB_STATEMENT_CACHE", true)?,
            startup_options: env.boolean("DB_STARTUP_OPTIONS", true)?,
        };
        let http_workers = env.int_in(
            "HTTP_WORKERS",
            default_http_workers(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                &db,
            ),
            1,
            MAX_HTTP_WORKERS,
        )?;
        Ok(Config {
            db,
            run_migrations: env.boolean("RUN_MIGRATIONS", true)?,
            http_body_limit: env.int_in(
                "HTTP_BODY_LIMIT",
                DEFAULT_HTTP_BODY_LIMIT,
                1,
                usize::MAX,
            )?,
            idempotency_ttl: env.positive_secs(
                "IDEMPOTENCY_TTL_SECS",
                DEFAULT_IDEMPOTENCY_TTL_SECS as f64,
                false,
            )?,
            shutdown_drain: Duration::from_secs(env.int_in(
                "SHUTDOWN_DRAIN_SECS",
                DEFAULT_SHUTDOWN_DRAIN_SECS as usize,
                0,
                usize::MAX,
            )? as u64),
            shutdown_timeout: env.positive_secs(
                "SHUTDOWN_TIMEOUT_SECS",
                DEFAULT_SHUTDOWN_TIMEOUT_SECS as f64,
                false,
            )?,
            host: match env.get("HOST") {
                None => DEFAULT_HOST
                    .parse()
                    .map_err(|_| ConfigError::new("HOST", "invalid default"))?,
                Some(v) => v.parse().map_err(|_| {
                    ConfigError::new("HOST", format!("must be an IP address, got {v:?}"))
                })?,
            },
            port: env.int_in("PORT", DEFAULT_PORT as usize, 0, u16::MAX as usize)? as u16,
            http_workers,
        })
    }
}

/// `HTTP_WORKERS` when unset: one worker per CPU, as Actix does, but no more workers than
/// the pool can give a pool of their own ([`actix_diesel_session::MIN_WORKER_SHARE`]
/// connections each, after the application's own one, two with replicas), and at least
/// one. Each worker then drives its own connections (no cross-thread wake-up per round
/// trip). In a container with one or two CPUs that is one worker per CPU with the default
/// pool (15 connections); on a large machine it is as many workers as 15 connections
/// keep busy (3): the database's connections, not the service's CPUs, bound a service
/// whose requests each hold one, and a worker thread can drive several at once. Raise
/// `DB_POOL_SIZE` / `DB_MAX_OVERFLOW` (or set `HTTP_WORKERS`) for more.
pub fn default_http_workers(cpus: usize, db: &DbConfig) -> usize {
    let fed = db
        .session_config(cpus)
        .max_worker_pools(!db.replica_urls.is_empty());
    cpus.min(fed).max(1)
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            var,
            problem: problem.into(),
        }
    }
}

/// Typed access to the variables; each parser names the variable in its error.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// The trimmed value, or `None` when the variable is unset or empty.
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        self.get(var)
            .ok_or_else(|| ConfigError::new(var, "is required but not set"))
    }

    fn int_in(
        &self,
        var: &'static str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(default);
        };
        let range = if max == usize::MAX {
            format!("an integer >= {min}")
        } else {
            format!("an integer in {min}..={max}")
        };
        match raw.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                format!("must be {range}, got {raw:?}"),
            )),
        }
    }

    /// Seconds, at least [`MIN_DURATION`] and at most [`MAX_DURATION_SECS`]; `decimals`
    /// allows values such as `0.5`.
    fn positive_secs(
        &self,
        var: &'static str,
        default: f64,
        decimals: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(Duration::from_secs_f64(default));
        };
        let what = if decimals {
            "a number of seconds >= 0.001"
        } else {
            "a whole number of seconds > 0"
        };
        let parsed = if decimals {
            raw.parse::<f64>().ok()
        } else {
            raw.parse::<u64>().ok().map(|n| n as f64)
        };
        // `is_finite` first: NaN compares false with everything, infinity would make
        // `Duration::from_secs_f64` panic.
        match parsed {
            Some(secs)
                if secs.is_finite()
                    && secs >= MIN_DURATION.as_secs_f64()
                    && secs <= MAX_DURATION_SECS =>
            {
                Ok(Duration::from_secs_f64(secs))
            }
            _ => Err(ConfigError::new(
                var,
                format!("must be {what} (at most a year), got {raw:?}"),
            )),
        }
    }

    /// Milliseconds where 0 means "no limit".
    fn optional_millis(
        &self,
        var: &'static str,
        default: u64,
    ) -> Result<Option<Duration>, ConfigError> {
        let ms = match self.get(var) {
            None => default,
            // PostgreSQL's timeouts are 32-bit integers of milliseconds.
            Some(raw) => match raw.parse::<u64>() {
                Ok(n) if n <= i32::MAX as u64 => n,
                _ => {
                    return Err(ConfigError::new(
                        var,
                        format!(
                            "must be a whole number of milliseconds in 0..={}, got {raw:?}",
                            i32::MAX
                        ),
                    ))
                }
            },
        };
        Ok((ms > 0).then(|| Duration::from_millis(ms)))
    }

    /// Comma-separated database URLs; none when unset. The error names the position of
    /// the bad one, never the URL (it may hold a password).
    fn urls(&self, var: &'static str) -> Result<Vec<DatabaseUrl>, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .enumerate()
            .map(|(i, url)| {
                let url = url.trim();
                if url.is_empty() {
                    return Err(ConfigError::new(var, format!("URL {} is empty", i + 1)));
                }
                DatabaseUrl::parse(url)
                    .map_err(|problem| ConfigError::new(var, format!("URL {} {problem}", i + 1)))
            })
            .collect()
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(default);
        };
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(
                var,
                format!("must be a boolean (true/false/1/0/yes/no/on/off), got {raw:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:s3cret@db:5432/ledger");

    #[test]
    fn defaults_follow_the_contract() {
        let c = config(&[URL]).unwrap();
        assert_eq!(c.db.pool_size, 5);
        assert_eq!(c.db.max_overflow, 10);
        assert_eq!(c.db.pool_timeout, Duration::from_secs(30));
        assert_eq!(c.db.statement_timeout, None);
        assert_eq!(c.db.idle_in_tx_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.http_body_limit, 65536);
        assert_eq!(c.port, 8080);
        assert!(c.run_migrations);
        assert!(!c.db.echo);
        assert!(c.db.statement_cache);
        assert!(c.db.startup_options);
        assert_eq!(
            c.http_workers,
            default_http_workers(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                &c.db
            )
        );
        assert_eq!(
            config(&[URL, ("HTTP_WORKERS", "1")]).unwrap().http_workers,
            1
        );
    }

    #[test]
    fn each_invalid_value_names_its_variable() {
        for (var, value) in [
            ("DB_POOL_SIZE", "0"),
            ("DB_POOL_SIZE", "1001"),
            ("DB_MAX_OVERFLOW", "-1"),
            ("DB_POOL_TIMEOUT", "0"),
            ("DB_POOL_TIMEOUT", "abc"),
            ("DB_POOL_RECYCLE", "1.5"),
            ("DB_STATEMENT_TIMEOUT", "-5"),
            ("DB_ECHO", "maybe"),
            ("DB_STATEMENT_CACHE", "disabled"),
            ("DB_STARTUP_OPTIONS", "2"),
            ("RUN_MIGRATIONS", "2"),
            ("HTTP_BODY_LIMIT", "0"),
            ("PORT", "70000"),
            ("HOST", "not-an-ip"),
            ("HTTP_WORKERS", "0"),
            ("DATABASE_URL", "mysql://x@y/z"),
            ("DATABASE_REPLICA_URLS", "mysql://x@y/z"),
            (
                "DATABASE_REPLICA_URLS",
                "postgres://a@b/c,,postgres://a@d/c",
            ),
            ("DB_REPLICA_POOL_SIZE", "0"),
            ("DB_REPLICA_MAX_LAG", "0"),
            ("DB_REPLICA_MAX_LAG", "soon"),
        ] {
            let err = config(&[URL, (var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{var}={value}");
        }
    }

    #[test]
    fn replicas_are_a_comma_separated_list_whose_pool_defaults_to_the_primarys() {
        let c = config(&[URL, ("DB_POOL_SIZE", "7")]).unwrap();
        assert!(c.db.replica_urls.is_empty());
        assert_eq!(c.db.replica_pool_size, 7);
        assert_eq!(c.db.replica_max_lag, Duration::from_secs(5));
        let c = config(&[
            URL,
            (
                "DATABASE_REPLICA_URLS",
                "postgres://app:s3cret@r1:5433/ledger, postgres://app@r2/ledger",
            ),
            ("DB_REPLICA_MAX_LAG", "500"),
        ])
        .unwrap();
        assert_eq!(c.db.replica_urls.len(), 2);
        assert_eq!(c.db.replica_max_lag, Duration::from_millis(500));
        let err =
            config(&[URL, ("DATABASE_REPLICA_URLS", "postgres://a:s3cret@h/d#x")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn empty_counts_as_unset_and_booleans_accept_any_case() {
        let c = config(&[URL, ("DB_POOL_SIZE", ""), ("DB_ECHO", "YES")]).unwrap();
        assert_eq!(c.db.pool_size, 5);
        assert!(c.db.echo);
        assert_eq!(config(&[]).unwrap_err().var, "DATABASE_URL");
    }

    #[test]
    fn decimals_are_allowed_for_the_pool_timeout() {
        let c = config(&[URL, ("DB_POOL_TIMEOUT", "0.25")]).unwrap();
        assert_eq!(c.db.pool_timeout, Duration::from_millis(250));
    }

    #[test]
    fn the_shortest_accepted_durations_are_one_millisecond_and_never_zero() {
        for var in ["DB_POOL_TIMEOUT", "DB_HEALTH_TIMEOUT"] {
            let c = config(&[URL, (var, "0.001")]).unwrap();
            let d = if var == "DB_POOL_TIMEOUT" {
                c.db.pool_timeout
            } else {
                c.db.health_timeout
            };
            assert_eq!(d, Duration::from_millis(1), "{var}");
            for bad in ["0.0009999", "1e-10", "NaN", "inf", "-0.0", "1e300"] {
                assert_eq!(config(&[URL, (var, bad)]).unwrap_err().var, var, "{bad}");
            }
        }
    }

    #[test]
    fn display_and_debug_hide_the_password() {
        let c = config(&[URL]).unwrap();
        assert!(!format!("{c}").contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(format!("{c}").contains("app:***@db"));
    }

    #[test]
    fn the_default_worker_count_is_the_cpus_the_pool_can_give_a_pool_each() {
        let db = |vars: &[(&str, &str)]| {
            let mut all = vec![URL];
            all.extend_from_slice(vars);
            config(&all).unwrap().db
        };
        let defaults = db(&[]);
        // 15 connections, 1 the application's: 14 feed 3 workers of 4.
        assert_eq!(default_http_workers(1, &defaults), 1);
        assert_eq!(default_http_workers(2, &defaults), 2);
        assert_eq!(default_http_workers(64, &defaults), 3);
        // Replicas keep a second connection for the application: 13 feed 3.
        let replicas = db(&[("DATABASE_REPLICA_URLS", "postgres://r@replica/app")]);
        assert_eq!(default_http_workers(64, &replicas), 3);
        let small = db(&[("DB_POOL_SIZE", "2"), ("DB_MAX_OVERFLOW", "2")]);
        assert_eq!(default_http_workers(8, &small), 1);
        let large = db(&[("DB_POOL_SIZE", "20"), ("DB_MAX_OVERFLOW", "45")]);
        assert_eq!(default_http_workers(8, &large), 8);
        assert_eq!(default_http_workers(64, &large), 16);
    }
}
