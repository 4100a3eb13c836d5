//! Everything that talks to PostgreSQL.

/// Account rows and their queries.
pub mod accounts;
/// COMMIT with the transaction's id learned on the way; resolving a lost COMMIT answer.
pub mod commit;
/// Opening connections with the service's session settings.
pub mod connect;
/// Idempotency keys: claim, record, purge.
pub mod idempotency;
/// A request's check-out: use-time metric and leak warning.
pub mod lease;
/// Embedded migrations.
pub mod migrate;
/// The deadpool pool, its hooks and its reaper.
pub mod pool;
/// `DbSession` and the finalizing middleware: the transaction-per-request guarantee.
pub mod session;
/// TLS to the server, with libpq's `sslmode` meanings.
pub mod tls;
/// Transfer rows and their queries.
pub mod transfers;
/// `DATABASE_URL`, parsed, with the password kept out of sight.
pub mod url;
/// Per-connection statement watch (aborted transactions, statement count, SQL echo).
pub mod watch;
