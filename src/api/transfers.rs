//! `/transfers` (contract section 4).
//!
//! The posting rules live in [`crate::ledger`]; the `Idempotency-Key` handling in
//! [`super::idempotency`]. Handlers check what needs no database first, so a request that
//! is bound to fail that way never checks out a connection.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::idempotency::{self, Claimed, IdempotencyKey, IdempotencySettings, Idempotent};
use super::json::Json;
use super::{find_by_id, page_limit, resource, Page};
use crate::db::transfers::{self, NewTransfer, Transfer};
use crate::error::ApiError;
use crate::ledger;
use actix_diesel_session::{DbSession, SessionMiddleware};

/// Most items in one batch (contract section 4).
pub const MAX_BATCH_ITEMS: usize = 100;
/// Idempotency scopes: a key is bound to one endpoint.
const SINGLE_ENDPOINT: &str = "POST /transfers";
const BATCH_ENDPOINT: &str = "POST /transfers/batch";

/// Registers the transfer routes. `/transfers/batch` comes before `/transfers/{id}`, which
/// would otherwise match it.
/// The reads run in read-only transactions (contract section 10).
pub fn configure(
    cfg: &mut web::ServiceConfig,
    session: &SessionMiddleware,
    write: &SessionMiddleware,
) {
    let read = session.clone().read_only();
    // Each method its own session middleware, and none around the resource: a request
    // then passes through one session layer only (a second, nested one cost a transfer
    // some 2 % of its instructions: BENCHMARKS.md), and a 405 takes no session.
    cfg.service(crate::http::resource(
        "/transfers",
        [
            (Method::GET, web::to(list).wrap(read.clone())),
            (Method::POST, web::to(create).wrap(write.clone())),
        ],
    ))
    .service(resource(
        "/transfers/batch",
        [(Method::POST, web::to(create_batch))],
        write,
    ))
    .service(resource(
        "/transfers/{id}",
        [(Method::GET, web::to(get))],
        &read,
    ));
}

/// A transfer request: the body of `POST /transfers` and an item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from_account_id: i64,
    pub to_account_id: i64,
    pub amount: i64,
}

impl From<TransferRequest> for NewTransfer {
    fn from(r: TransferRequest) -> Self {
        NewTransfer {
            from_account_id: r.from_account_id,
            to_account_id: r.to_account_id,
            amount: r.amount,
        }
    }
}

/// `POST /transfers/batch` body. A malformed item's 400 names its index like any other
/// failing item: the body extractor ([`Json`]) tracks the element being read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub transfers: Vec<TransferRequest>,
}

impl BatchRequest {
    /// The items: 1..=100 of them, else 422.
    fn items(self) -> Result<Vec<TransferRequest>, ApiError> {
        if !(1..=MAX_BATCH_ITEMS).contains(&self.transfers.len()) {
            return Err(ApiError::invalid("transfers", "must hold 1 to 100 items"));
        }
        Ok(self.transfers)
    }
}

/// A batch body as parsed: what its idempotency fingerprint covers, so that the same JSON
/// value, however it was spelt, gives the same fingerprint.
#[derive(Serialize)]
struct ParsedBatch<'a> {
    transfers: &'a [TransferRequest],
}

/// The `POST /transfers/batch` answer.
#[derive(Debug, Serialize)]
struct BatchResponse {
    items: Vec<Transfer>,
}

/// Query of `GET /transfers`. Unknown parameters are rejected: a misspelt `account_id`
/// must not silently widen the list to every transfer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub account_id: Option<i64>,
    pub limit: Option<i64>,
    pub after_id: Option<i64>,
}

/// The part of a stored transfer body that gives its `Location`.
#[derive(Deserialize)]
struct IdOnly {
    id: i64,
}

fn location(id: i64) -> String {
    format!("/transfers/{id}")
}

async fn create(
    session: DbSession,
    key: IdempotencyKey,
    settings: web::Data<IdempotencySettings>,
    body: Json<TransferRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    let item = NewTransfer::from(request);
    ledger::check(&item)?;
    let idempotent = Idempotent::new(SINGLE_ENDPOINT, key, &request, &settings)?;
    let mut conn = session.conn().await?;
    if let Claimed::Replay(stored) = idempotency::claim(idempotent.as_ref(), &mut conn).await? {
        let id = serde_json::from_str::<IdOnly>(&stored.body).ok();
        return Ok(stored.replay(id.map(|t| location(t.id))));
    }
    let transfer = ledger::post(&mut conn, &[item])
        .await
        .map_err(|failure| failure.error)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("posting returned no transfer"))?;
    let body = serde_json::to_string(&transfer).map_err(ApiError::internal)?;
    idempotency::created(
        idempotent.as_ref(),
        &mut conn,
        body,
        Some(location(transfer.id)),
    )
    .await
}

async fn create_batch(
    session: DbSession,
    key: IdempotencyKey,
    settings: web::Data<IdempotencySettings>,
    body: Json<BatchRequest>,
) -> Result<HttpResponse, ApiError> {
    let requests = body.into_inner().items()?;
    let items: Vec<NewTransfer> = requests.iter().copied().map(NewTransfer::from).collect();
    ledger::check_first(&items).map_err(ledger::Failure::into_batch_error)?;
    let parsed = ParsedBatch {
        transfers: &requests,
    };
    let idempotent = Idempotent::new(BATCH_ENDPOINT, key, &parsed, &settings)?;
    let mut conn = session.conn().await?;
    if let Claimed::Replay(stored) = idempotency::claim(idempotent.as_ref(), &mut conn).await? {
        return Ok(stored.replay(None));
    }
    let posted = ledger::post(&mut conn, &items)
        .await
        .map_err(ledger::Failure::into_batch_error)?;
    let body =
        serde_json::to_string(&BatchResponse { items: posted }).map_err(ApiError::internal)?;
    idempotency::created(idempotent.as_ref(), &mut conn, body, None).await
}

async fn get(session: DbSession, id: web::Path<i64>) -> Result<web::Json<Transfer>, ApiError> {
    find_by_id(&session, "transfer", id.into_inner(), transfers::find).await
}

async fn list(
    session: DbSession,
    params: web::Query<ListParams>,
) -> Result<web::Json<Page<Transfer>>, ApiError> {
    let limit = page_limit(params.limit)?;
    let after_id = params.after_id.unwrap_or(0);
    let mut conn = session.conn().await?;
    let items = transfers::list(&mut conn, params.account_id, after_id, limit).await?;
    Ok(web::Json(Page::new(items, limit, |t| t.id)))
}
