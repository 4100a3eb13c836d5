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

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use diesel_async::AsyncConnection;

use super::idempotency::{self, Claimed, IdempotencyKey, IdempotencySettings, Idempotent};
use super::transfers::TransferRequest;
use crate::db::accounts::{self, Account};
use crate::db::transfers::NewTransfer;
use crate::error::ApiError;
use crate::ledger;
use actix_diesel_session::{Database, PooledConnection, SessionError, NO_CONNECTION_IN_TIME};

/// Registers the baselines under `/_bench`, in one scope (see `api::configure`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_bench")
            .service(web::resource("/accounts/{id}").route(web::get().to(get_account)))
            .service(web::resource("/transfers").route(web::post().to(create_transfer))),
    );
}

/// A pooled connection, within `DB_POOL_TIMEOUT` (the pool's own wait timeout).
async fn checkout(db: &Database) -> Result<PooledConnection, ApiError> {
    // The pool the session layer's requests on this worker use.
    let pool = db.pool_here();
    let wait = pool.timeouts().wait.unwrap_or(Duration::MAX);
    match tokio::time::timeout(wait, pool.get()).await {
        Ok(conn) => Ok(conn.map_err(SessionError::from)?),
        Err(_) => Err(ApiError::DatabaseUnavailable(
            NO_CONNECTION_IN_TIME.to_owned(),
        )),
    }
}

/// `GET /_bench/accounts/{id}`: `GET /accounts/{id}` without the session layer.
async fn get_account(
    db: web::Data<Database>,
    id: web::Path<i64>,
) -> Result<web::Json<Account>, ApiError> {
    let id = id.into_inner();
    let missing = || ApiError::NotFound(format!("account {id} does not exist"));
    if id <= 0 {
        return Err(missing());
    }
    let mut conn = checkout(&db).await?;
    // Read-only, as the read routes run (contract section 10).
    conn.build_transaction()
        .read_only()
        .run::<_, ApiError, _>(async |conn| Ok(accounts::find(conn, id).await?))
        .await?
        .map(web::Json)
        .ok_or_else(missing)
}

/// What the transaction of a baseline transfer produced (an `HttpResponse` is not `Send`,
/// which diesel-async's `transaction` requires of its result).
enum Posted {
    Replay(idempotency::Stored),
    Created { id: i64, body: String },
}

/// `POST /_bench/transfers`: `POST /transfers` without the session layer (same checks, same
/// idempotency handling, same posting, same answer).
async fn create_transfer(
    db: web::Data<Database>,
    key: IdempotencyKey,
    idempotency_settings: web::Data<IdempotencySettings>,
    body: web::Json<TransferRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    let item = NewTransfer::from(request);
    ledger::check(&item)?;
    let idempotent = Idempotent::new("POST /transfers", key, &request, &idempotency_settings)?;
    let mut conn = checkout(&db).await?;
    let posted = conn
        .transaction::<_, ApiError, _>(async |conn| {
            if let Claimed::Replay(stored) = idempotency::claim(idempotent.as_ref(), conn).await? {
                return Ok(Posted::Replay(stored));
            }
            let transfer = ledger::post(conn, &[item])
                .await
                .map_err(|failure| failure.error)?
                .into_iter()
                .next()
                .ok_or_else(|| ApiError::internal("posting returned no transfer"))?;
            let body = serde_json::to_string(&transfer).map_err(ApiError::internal)?;
            if let Some(idempotent) = &idempotent {
                idempotent.record(conn, StatusCode::CREATED, &body).await?;
            }
            Ok(Posted::Created {
                id: transfer.id,
                body,
            })
        })
        .await?;
    // The contract's `Consistency-Token`, as the real route gives it: the insert position
    // after the COMMIT, on the same connection, through the simple protocol: a round trip
    // of its own (the session pipelines it behind its COMMIT; diesel-async's `transaction`
    // commits inside and leaves nothing to pipeline it with).
    let token = conn
        .simple_query("SELECT pg_current_wal_insert_lsn()")
        .await?
        .into_iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("no WAL position"))?;
    let mut response = match posted {
        Posted::Replay(stored) => {
            let id = serde_json::from_str::<serde_json::Value>(&stored.body)
                .ok()
                .and_then(|v| v["id"].as_i64());
            stored.replay(id.map(|id| format!("/transfers/{id}")))
        }
        Posted::Created { id, body } => idempotency::json_response(
            StatusCode::CREATED,
            body,
            Some(format!("/transfers/{id}")),
            false,
        ),
    };
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&token) {
        response
            .headers_mut()
            .insert(crate::consistency::HEADER, value);
    }
    Ok(response)
}
