//! `/accounts` (contract section 3).

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::json::Json;
use super::{find_by_id, page_limit, resource, Page};
use crate::db::accounts::{self, Account};
use crate::error::{ApiError, FieldError};
use crate::openapi::{Endpoint, BODY_CODES, SESSION_CODES};
use actix_diesel_session::{DbSession, SessionMiddleware};
use utoipa_actix_web::service_config::ServiceConfig;

/// Longest account name, in characters, after trimming.
const MAX_NAME_CHARS: usize = 100;

/// Registers the account routes; the reads run in read-only transactions (contract
/// section 10).
pub fn configure(cfg: &mut ServiceConfig, session: &SessionMiddleware, write: &SessionMiddleware) {
    let read = session.clone().read_only();
    // Each method its own session middleware, and none around the resource: a request
    // then passes through one session layer only (a second, nested one cost a transfer
    // some 2 % of its instructions: BENCHMARKS.md), and a 405 takes no session.
    cfg.service(crate::http::resource(
        "/accounts",
        [
            Endpoint::new::<__path_list>(web::to(list).wrap(read.clone()))
                .problems(&[&["bad_request", "validation_failed"], SESSION_CODES]),
            Endpoint::new::<__path_create>(web::to(create).wrap(write.clone())).problems(&[
                BODY_CODES,
                &["validation_failed", "commit_unknown"],
                SESSION_CODES,
            ]),
        ],
    ))
    .service(resource(
        "/accounts/{id}",
        [Endpoint::new::<__path_get>(web::to(get))
            .problems(&[&["bad_request", "not_found"], SESSION_CODES])],
        &read,
    ));
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// 1 to 100 characters after trimming surrounding whitespace, without U+0000; stored
    /// trimmed.
    #[schema(min_length = 1)]
    pub name: String,
    /// The opening balance, in minor units.
    #[serde(default)]
    #[schema(minimum = 0, default = 0)]
    pub balance: i64,
}

impl CreateAccount {
    /// The trimmed name, or every rule the request breaks.
    fn validate(&self) -> Result<&str, ApiError> {
        let name = self.name.trim();
        let mut errors = Vec::new();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            errors.push(FieldError::new(
                "name",
                "must be 1 to 100 characters after trimming",
            ));
        } else if name.contains('\0') {
            // Valid JSON (`\u0000`), but PostgreSQL's text cannot hold it: the INSERT
            // would fail with a 500.
            errors.push(FieldError::new("name", "must not contain U+0000"));
        }
        if self.balance < 0 {
            errors.push(FieldError::new("balance", "must be >= 0"));
        }
        if errors.is_empty() {
            Ok(name)
        } else {
            Err(ApiError::Validation(errors))
        }
    }
}

/// Query of `GET /accounts`. Unknown parameters are rejected (400), as for transfers: a
/// misspelt `limit` must not silently give the default page.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub limit: Option<i64>,
    /// Start after this id (the previous page's `next_after_id`).
    pub after_id: Option<i64>,
}

/// Create an account
#[utoipa::path(
    post,
    path = "/accounts",
    operation_id = "create_account",
    tag = "accounts",
    request_body = CreateAccount,
    responses((
        status = 201,
        description = "The account",
        body = Account,
        headers(("Location" = String, description = "/accounts/{id} of the new account")),
        links(
            ("GetAccount" = (operation_id = "get_account", parameters(("id" = "$response.body#/id")))),
            ("TransferFromAccount" = (
                operation_id = "create_transfer",
                request_body = json!({"from_account_id": "$response.body#/id"}),
                description = "A transfer from the new account (its other fields as the client chooses)",
            )),
        ),
    )),
)]
async fn create(session: DbSession, body: Json<CreateAccount>) -> Result<HttpResponse, ApiError> {
    let name = body.validate()?;
    let mut conn = session.conn().await?;
    let account = accounts::insert(&mut conn, name, body.balance).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/accounts/{}", account.id)))
        .json(account))
}

/// Read an account
#[utoipa::path(
    get,
    path = "/accounts/{id}",
    operation_id = "get_account",
    tag = "accounts",
    params(("id" = i64, Path, minimum = 1, description = "The account's id")),
    responses((status = 200, description = "The account", body = Account)),
)]
async fn get(session: DbSession, id: web::Path<i64>) -> Result<web::Json<Account>, ApiError> {
    find_by_id(&session, "account", id.into_inner(), accounts::find).await
}

/// List accounts by ascending id
#[utoipa::path(
    get,
    path = "/accounts",
    operation_id = "list_accounts",
    tag = "accounts",
    params(ListParams),
    responses((status = 200, description = "A page of accounts", body = Page<Account>)),
)]
async fn list(
    session: DbSession,
    params: web::Query<ListParams>,
) -> Result<web::Json<Page<Account>>, ApiError> {
    let limit = page_limit(params.limit)?;
    let after_id = params.after_id.unwrap_or(0);
    let mut conn = session.conn().await?;
    let items = accounts::list(&mut conn, after_id, limit).await?;
    Ok(web::Json(Page::new(items, limit, |a| a.id)))
}
