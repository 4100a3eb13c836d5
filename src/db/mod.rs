//! The ledger's queries and migrations. The pool and the request sessions are the
//! `actix_diesel_session` crate's.

/// Account rows and their queries.
pub mod accounts;
/// Idempotency keys: claim, record, purge.
pub mod idempotency;
/// Embedded migrations.
pub mod migrate;
/// Transfer rows and their queries.
pub mod transfers;
