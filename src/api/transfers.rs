//! `/transfers` (contract section 4).
//!
//! The posting rules live in [`crate::ledger`]; the `Idempotency-Key` handling in
//! [`super::idempotency`]. Handlers check what needs no database first, so a request that
//! is bound to fail that way never checks out a connection.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::idempotency::{self, Claimed, IdempotencyKey, IdempotencySettings, Idempotent};
use super::json::Json;
use super::{find_by_id, page_limit, resource, Page};
use crate::db::transfers::{self, NewTransfer, Transfer};
use crate::error::ApiError;
use crate::ledger;
use crate::openapi::{Endpoint, BODY_CODES, SESSION_CODES};
use actix_diesel_session::{DbSession, SessionMiddleware};
use utoipa_actix_web::service_config::ServiceConfig;

/// Most items in one batch (contract section 4).
pub const MAX_BATCH_ITEMS: usize = 100;
/// Idempotency scopes: a key is bound to one endpoint.
const SINGLE_ENDPOINT: &str = "POST /transfers";
const BATCH_ENDPOINT: &str = "POST /transfers/batch";

/// Registers the transfer routes. `/transfers/batch` comes before `/transfers/{id}`, which
/// would otherwise match it.
/// The reads run in read-only transactions (contract section 10).
pub fn configure(cfg: &mut ServiceConfig, session: &SessionMiddleware, write: &SessionMiddleware) {
    let read = session.clone().read_only();
    // Each method its own session middleware, and none around the resource: a request
    // then passes through one session layer only (a second, nested one cost a transfer
    // some 2 % of its instructions: BENCHMARKS.md), and a 405 takes no session.
    let transfer_codes: &[&str] = &[
        "validation_failed",
        "not_found",
        "insufficient_funds",
        "idempotency_conflict",
        "commit_unknown",
    ];
    let list_codes: &[&[&str]] = &[&["bad_request", "validation_failed"], SESSION_CODES];
    cfg.service(crate::http::resource(
        "/transfers",
        [
            Endpoint::new::<__path_list>(web::to(list).wrap(read.clone())).problems(list_codes),
            Endpoint::new::<__path_create>(web::to(create).wrap(write.clone())).problems(&[
                BODY_CODES,
                transfer_codes,
                SESSION_CODES,
            ]),
        ],
    ))
    .service(resource(
        "/transfers/batch",
        [
            Endpoint::new::<__path_create_batch>(web::to(create_batch)).problems(&[
                BODY_CODES,
                transfer_codes,
                SESSION_CODES,
            ]),
        ],
        write,
    ))
    .service(resource(
        "/transfers/{id}",
        [Endpoint::new::<__path_get>(web::to(get))
            .problems(&[&["bad_request", "not_found"], SESSION_CODES])],
        &read,
    ));
}

/// A transfer to make: `amount` moves from one account to another (not the same one), and
/// the sender's balance must cover it and the receiver's must not overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    #[schema(minimum = 1)]
    pub from_account_id: i64,
    #[schema(minimum = 1)]
    pub to_account_id: i64,
    /// In minor units.
    #[schema(minimum = 1)]
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

/// Transfers applied together, in order, or not at all.
//
// A malformed item's 400 names its index like any other failing item: the body extractor
// (`Json`) tracks the element being read.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    #[schema(min_items = 1, max_items = 100)]
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

/// The transfers of a batch, in request order.
#[derive(Debug, Serialize, ToSchema)]
struct BatchResponse {
    items: Vec<Transfer>,
}

/// Query of `GET /transfers`. Unknown parameters are rejected: a misspelt `account_id`
/// must not silently widen the list to every transfer.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only the transfers from or to this account.
    pub account_id: Option<i64>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub limit: Option<i64>,
    /// Start after this id (the previous page's `next_after_id`).
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

/// Move an amount between two accounts
#[utoipa::path(
    post,
    path = "/transfers",
    operation_id = "create_transfer",
    tag = "transfers",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters. A repeat with the same body replays \
                       the first answer; with another body it is refused (409)")),
    request_body = TransferRequest,
    responses((
        status = 201,
        description = "The transfer",
        body = Transfer,
        headers(
            ("Location" = String, description = "/transfers/{id} of the new transfer"),
            ("Idempotent-Replayed" = String, description = "`true` on a replayed answer"),
        ),
        links(("GetTransfer" = (operation_id = "get_transfer", parameters(("id" = "$response.body#/id"))))),
    )),
)]
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

/// Make up to 100 transfers atomically
#[utoipa::path(
    post,
    path = "/transfers/batch",
    operation_id = "create_transfer_batch",
    tag = "transfers",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters. A repeat with the same body replays \
                       the first answer; with another body it is refused (409)")),
    request_body = BatchRequest,
    responses((
        status = 201,
        description = "The transfers, in request order. A failing item's problem names its `index`",
        body = BatchResponse,
        headers(("Idempotent-Replayed" = String, description = "`true` on a replayed answer")),
    )),
)]
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

/// Read a transfer
#[utoipa::path(
    get,
    path = "/transfers/{id}",
    operation_id = "get_transfer",
    tag = "transfers",
    params(("id" = i64, Path, minimum = 1, description = "The transfer's id")),
    responses((status = 200, description = "The transfer", body = Transfer)),
)]
async fn get(session: DbSession, id: web::Path<i64>) -> Result<web::Json<Transfer>, ApiError> {
    find_by_id(&session, "transfer", id.into_inner(), transfers::find).await
}

/// List transfers by ascending id
#[utoipa::path(
    get,
    path = "/transfers",
    operation_id = "list_transfers",
    tag = "transfers",
    params(ListParams),
    responses((status = 200, description = "A page of transfers", body = Page<Transfer>)),
)]
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
