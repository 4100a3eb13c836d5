//! The ledger's hot routes written the common way: axum, sqlx and axum-sqlx-tx, each used as
//! its documentation shows, with the ledger's SQL. `make bench` runs it beside the ledger so
//! that "is the service fast?" is answered against a peer, not only against itself.
//!
//! Only what the benchmark and a by-hand comparison need: the success paths and the answers
//! the ledger gives for a missing row, a rule broken or a short balance, as problem+json. No
//! idempotency keys, lists, batches, health, metrics, request ids or per-request logging.

use std::env;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;

// One transaction per request, begun on extraction, committed on a 2xx or 3xx answer and
// rolled back on any other by the layer: the crate's documented setup.
type Tx = axum_sqlx_tx::Tx<sqlx::Postgres>;

// The ledger's defaults, DB_POOL_SIZE = 5 and DB_MAX_OVERFLOW = 10: at most 15 connections,
// 5 kept open.
const MAX_CONNECTIONS: u32 = 15;
const MIN_CONNECTIONS: u32 = 5;

// The statements the ledger sends (src/db/accounts.rs and src/db/transfers.rs), in the text
// diesel gives them, so that PostgreSQL parses, plans and counts the same statements (and
// the benchmark's statement counts, which match on this text, work for both).
const INSERT_ACCOUNT: &str = r#"INSERT INTO "accounts" ("name", "balance") VALUES ($1, $2) RETURNING "accounts"."id", "accounts"."name", "accounts"."balance", "accounts"."created_at""#;
const FIND_ACCOUNT: &str = r#"SELECT "accounts"."id", "accounts"."name", "accounts"."balance", "accounts"."created_at" FROM "accounts" WHERE ("accounts"."id" = $1) LIMIT $2"#;
// Both rows in one statement, locked in ascending id order: two transfers over the same
// accounts queue instead of deadlocking.
const LOCK_BALANCES: &str = r#"SELECT "accounts"."id", "accounts"."balance" FROM "accounts" WHERE (("accounts"."id" = $1) OR ("accounts"."id" = $2)) ORDER BY "accounts"."id" ASC FOR UPDATE"#;
const SET_BALANCES: &str = "UPDATE accounts AS a SET balance = v.balance FROM unnest(ARRAY[$1, $2]::bigint[], ARRAY[$3, $4]::bigint[]) AS v(id, balance) WHERE a.id = v.id";
const INSERT_TRANSFER: &str = r#"INSERT INTO "transfers" ("from_account_id", "to_account_id", "amount") VALUES ($1, $2, $3) RETURNING "transfers"."id", "transfers"."from_account_id", "transfers"."to_account_id", "transfers"."amount", "transfers"."created_at""#;
const FIND_TRANSFER: &str = r#"SELECT "transfers"."id", "transfers"."from_account_id", "transfers"."to_account_id", "transfers"."amount", "transfers"."created_at" FROM "transfers" WHERE ("transfers"."id" = $1) LIMIT $2"#;

#[derive(Serialize, sqlx::FromRow)]
struct Account {
    id: i64,
    name: String,
    balance: i64,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct Transfer {
    id: i64,
    from_account_id: i64,
    to_account_id: i64,
    amount: i64,
    created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    name: String,
    #[serde(default)]
    balance: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTransfer {
    from_account_id: i64,
    to_account_id: i64,
    amount: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let host = env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port: u16 = match env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 8080,
    };
    let pool = PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .min_connections(MIN_CONNECTIONS)
        .connect(&url)
        .await?;
    let (state, layer) = Tx::setup(pool);
    let app = Router::new()
        .route("/accounts", post(create_account))
        .route("/accounts/{id}", get(get_account))
        .route("/transfers", post(create_transfer))
        .route("/transfers/{id}", get(get_transfer))
        .layer(layer)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn create_account(mut tx: Tx, Json(body): Json<CreateAccount>) -> Result<Response, Problem> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Problem::invalid(
            "name",
            "must be 1 to 100 characters after trimming",
        ));
    }
    if body.balance < 0 {
        return Err(Problem::invalid("balance", "must be >= 0"));
    }
    let account: Account = sqlx::query_as(INSERT_ACCOUNT)
        .bind(name)
        .bind(body.balance)
        .fetch_one(&mut tx)
        .await?;
    Ok(created(format!("/accounts/{}", account.id), account))
}

async fn get_account(mut tx: Tx, Path(id): Path<i64>) -> Result<Json<Account>, Problem> {
    sqlx::query_as(FIND_ACCOUNT)
        .bind(id)
        .bind(1_i64)
        .fetch_optional(&mut tx)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("account {id} does not exist")))
}

async fn create_transfer(
    mut tx: Tx,
    Json(body): Json<CreateTransfer>,
) -> Result<Response, Problem> {
    let CreateTransfer {
        from_account_id: from,
        to_account_id: to,
        amount,
    } = body;
    if amount <= 0 {
        return Err(Problem::invalid("amount", "must be > 0"));
    }
    if from == to {
        return Err(Problem::invalid(
            "to_account_id",
            "must differ from from_account_id",
        ));
    }
    let (low, high) = (from.min(to), from.max(to));
    let locked: Vec<(i64, i64)> = sqlx::query_as(LOCK_BALANCES)
        .bind(low)
        .bind(high)
        .fetch_all(&mut tx)
        .await?;
    let balance = |id: i64| {
        locked
            .iter()
            .find(|(locked_id, _)| *locked_id == id)
            .map(|(_, balance)| *balance)
            .ok_or_else(|| Problem::not_found(format!("account {id} does not exist")))
    };
    let (from_balance, to_balance) = (balance(from)?, balance(to)?);
    if from_balance < amount {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "insufficient_funds",
            format!("account {from} has {from_balance}, transfer needs {amount}"),
        ));
    }
    let to_balance = to_balance.checked_add(amount).ok_or_else(|| {
        Problem::invalid(
            "amount",
            "would overflow the balance of the receiving account",
        )
    })?;
    let from_balance = from_balance - amount;
    // The ledger writes the balances in ascending id order, as it locked them.
    let (low_balance, high_balance) = if from < to {
        (from_balance, to_balance)
    } else {
        (to_balance, from_balance)
    };
    sqlx::query(SET_BALANCES)
        .bind(low)
        .bind(high)
        .bind(low_balance)
        .bind(high_balance)
        .execute(&mut tx)
        .await?;
    let transfer: Transfer = sqlx::query_as(INSERT_TRANSFER)
        .bind(from)
        .bind(to)
        .bind(amount)
        .fetch_one(&mut tx)
        .await?;
    Ok(created(format!("/transfers/{}", transfer.id), transfer))
}

async fn get_transfer(mut tx: Tx, Path(id): Path<i64>) -> Result<Json<Transfer>, Problem> {
    sqlx::query_as(FIND_TRANSFER)
        .bind(id)
        .bind(1_i64)
        .fetch_optional(&mut tx)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("transfer {id} does not exist")))
}

fn created(location: String, body: impl Serialize) -> Response {
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

/// An error answer in the ledger's problem+json shape (RFC 9457), without its request id.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    errors: Option<[FieldError; 1]>,
}

#[derive(Debug, Serialize)]
struct FieldError {
    field: &'static str,
    message: &'static str,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, detail: String) -> Self {
        Problem {
            status,
            code,
            detail,
            errors: None,
        }
    }

    fn not_found(detail: String) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    fn invalid(field: &'static str, message: &'static str) -> Self {
        Problem {
            errors: Some([FieldError { field, message }]),
            ..Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                format!("invalid value for {field}"),
            )
        }
    }
}

impl From<sqlx::Error> for Problem {
    // Causes stay out of the body, as in the ledger; the peer logs nothing per request.
    fn from(_: sqlx::Error) -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server could not complete the request".to_owned(),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            title: &'static str,
            status: u16,
            code: &'static str,
            detail: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            errors: Option<&'a [FieldError; 1]>,
        }
        let body = Body {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
            errors: self.errors.as_ref(),
        };
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            Json(body),
        )
            .into_response()
    }
}
