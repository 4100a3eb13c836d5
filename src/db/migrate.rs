//! Embedded migrations, applied at start-up (unless `RUN_MIGRATIONS=false`) and by
//! `ledger migrate`.
//!
//! diesel_migrations is synchronous. diesel-async's `AsyncMigrationHarness` bridges it with
//! `block_in_place`, which panics on Actix's single-threaded runtime, so the migrations run
//! through `AsyncConnectionWrapper` on a blocking thread instead.
//!
//! All pending migrations run in one transaction, under a transaction-level advisory lock
//! (`pg_advisory_xact_lock`) taken as its first statement: replicas that start together
//! are serialised (the second waits, then finds nothing pending, since each statement of
//! a READ COMMITTED transaction sees what committed before it began), and the lock ends
//! with the transaction. A session-level lock would not do behind a transaction pooler
//! (PgBouncer in transaction mode): the unlock, or the connection's end, would reach
//! whichever server connection the pooler picks, and the lock would stay held. Inside
//! the transaction the harness's parameterised statements are also safe from the pooler
//! (see `SessionConfig::statement_cache`). Each migration is a savepoint of it (the
//! harness's own transaction per migration, nested), so a failed one undoes them all.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{Connection, RunQueryDsl};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use actix_diesel_session::{Connector, Database};

use crate::config::DbConfig;

/// The `application_name` of the migration connection.
pub const APPLICATION_NAME: &str = "ledger-migrate";

/// The migrations under `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
/// `pg_advisory_xact_lock` key: "ledger" in ASCII, so it is recognisable in `pg_locks`.
const MIGRATION_LOCK_KEY: i64 = 0x6c65_6467_6572;
/// First and longest pause between start-up attempts while the database is unreachable.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why migrating failed; the texts never contain the URL.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl From<diesel::result::Error> for MigrateError {
    fn from(e: diesel::result::Error) -> Self {
        MigrateError::Migration(e.to_string())
    }
}

/// The migrations' connector: the pool's server and TLS set-up, `application_name =
/// 'ledger-migrate'`, no statement timeout (a migration may legitimately run long), each
/// attempt bounded by `connect_timeout`.
pub fn connector(db: &Database, connect_timeout: Duration) -> Connector {
    db.connector()
        .with_settings(APPLICATION_NAME, None, None, connect_timeout)
}

/// The same for `ledger migrate`, which builds no pool: a connector of its own.
pub fn standalone_connector(cfg: &DbConfig) -> Connector {
    let connector = Connector::new(&cfg.url, APPLICATION_NAME, None, None, cfg.pool_timeout);
    if cfg.startup_options {
        connector
    } else {
        connector.without_startup_options()
    }
}

/// Applies every pending migration in one transaction under the advisory lock; returns
/// the versions applied.
pub async fn run_pending(connector: &Connector) -> Result<Vec<String>, MigrateError> {
    // The attempt as a whole (start-up exchange included) is bounded by the connector: a
    // peer that accepts and then never answers cannot hold this attempt, and with it every
    // background retry, forever.
    let conn = connector.establish().await?;
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        conn.transaction(|conn| {
            // Without start-up options the server's default statement timeout would apply:
            // a migration, and the wait for another replica's, may legitimately run long.
            conn.batch_execute("SET LOCAL statement_timeout = 0")?;
            diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
                .execute(conn)?;
            conn.run_pending_migrations(MIGRATIONS)
                .map(|versions| versions.iter().map(ToString::to_string).collect())
                .map_err(|e| MigrateError::Migration(e.to_string()))
        })
    })
    .await
    .map_err(|e| MigrateError::Migration(format!("migration task failed: {e}")))?
}

/// Retries [`run_pending`] until it succeeds, backing off up to [`RETRY_MAX`]: the service
/// starts without its database and catches up when the database appears. A migration
/// that fails on a reachable database is retried too (and logged as an error each time),
/// since readiness stays failed until migrations are in.
pub async fn run_until_applied(connector: &Connector) {
    let mut pause = RETRY_FIRST;
    loop {
        match run_pending(connector).await {
            Ok(applied) => {
                if applied.is_empty() {
                    log::info!("database schema is up to date");
                } else {
                    log::info!("applied migrations: {}", applied.join(", "));
                }
                return;
            }
            Err(e @ MigrateError::Connect(_)) => {
                log::warn!("migrations pending, will retry in {pause:?}: {e}")
            }
            Err(e) => log::error!("migrations failed, will retry in {pause:?}: {e}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}
