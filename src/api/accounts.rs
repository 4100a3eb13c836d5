//! `/accounts` (contract section 3).

use actix_web::http::{header, Method};
use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::json::Json;
use super::{find_by_id, page_limit, resource, Page};
use crate::db::accounts::{self, Account};
use crate::error::{ApiError, FieldError};
use actix_diesel_session::{DbSession, SessionMiddleware};

/// Longest account name, in characters, after trimming.
const MAX_NAME_CHARS: usize = 100;

/// Registers the account routes; the reads run in read-only transactions (contract
/// section 10).
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
        "/accounts",
        [
            (Method::GET, web::to(list).wrap(read.clone())),
            (Method::POST, web::to(create).wrap(write.clone())),
        ],
    ))
    .service(resource(
        "/accounts/{id}",
        [(Method::GET, web::to(get))],
        &read,
    ));
}

/// `POST /accounts` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    #[serde(default)]
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<i64>,
    pub after_id: Option<i64>,
}

async fn create(session: DbSession, body: Json<CreateAccount>) -> Result<HttpResponse, ApiError> {
    let name = body.validate()?;
    let mut conn = session.conn().await?;
    let account = accounts::insert(&mut conn, name, body.balance).await?;
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/accounts/{}", account.id)))
        .json(account))
}

async fn get(session: DbSession, id: web::Path<i64>) -> Result<web::Json<Account>, ApiError> {
    find_by_id(&session, "account", id.into_inner(), accounts::find).await
}

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
