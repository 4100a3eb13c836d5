//! Hand-written baselines for `make bench`; compiled only with `--features bench`.
//!
//! Each route does what its real counterpart does, through the same query functions in
//! `src/db/`, but the way one would write it without this crate's session layer: check a
//! connection out of the same pool (bounded by the same `DB_POOL_TIMEOUT`) and run the work
//! in diesel-async's own `conn.transaction(..)`. No `DbSession`, no finalizing middleware,
//! no statement watch; the request-id and access-log middleware around every route stay.
//! The benchmark compares the two, so the only difference must be the session layer: keep
//! these handlers in step with the real ones.

use std::time::Duration;

use actix_web::web;
use diesel_async::AsyncConnection;

use crate::db::accounts::{self, Account};
use crate::db::pool::PooledConnection;
use crate::db::session::SessionSettings;
use crate::error::ApiError;

/// Registers the baselines under `/_bench`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/_bench/accounts/{id}").route(web::get().to(get_account)));
}

/// A pooled connection, within `DB_POOL_TIMEOUT` (the pool's own wait timeout).
async fn checkout(settings: &SessionSettings) -> Result<PooledConnection, ApiError> {
    let pool = settings.pool();
    let wait = pool.timeouts().wait.unwrap_or(Duration::MAX);
    match tokio::time::timeout(wait, pool.get()).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(ApiError::DatabaseUnavailable(
            "no database connection became available in time".to_owned(),
        )),
    }
}

/// `GET /_bench/accounts/{id}`: `GET /accounts/{id}` without the session layer.
async fn get_account(
    settings: web::Data<SessionSettings>,
    id: web::Path<i64>,
) -> Result<web::Json<Account>, ApiError> {
    let id = id.into_inner();
    let missing = || ApiError::NotFound(format!("account {id} does not exist"));
    if id <= 0 {
        return Err(missing());
    }
    let mut conn = checkout(&settings).await?;
    conn.transaction::<_, ApiError, _>(async |conn| Ok(accounts::find(conn, id).await?))
        .await?
        .map(web::Json)
        .ok_or_else(missing)
}
