//! Routes that exist only to prove the session guarantees; compiled with
//! `--features test-routes` (which `make test` turns on), never in a release build.
//!
//! Each writes an account named after the route (the `name` query parameter, so a test can
//! find its own rows) and then misbehaves in one specific way.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::Deserialize;

use super::undocumented_resource as resource;
use crate::db::accounts;
use crate::error::ApiError;
use actix_diesel_session::{DbSession, SessionMiddleware};

#[derive(Deserialize)]
struct Params {
    name: String,
    #[serde(default)]
    ms: u64,
    /// `pg-sleep` routes: switch the server's own `statement_timeout` off for the
    /// request's transaction (`SET LOCAL`), as a server or pooler that does not apply it
    /// would, so that only the client-side deadline can end the statement.
    #[serde(default)]
    no_server_timeout: bool,
    /// `slow-rows`: how many rows.
    #[serde(default)]
    rows: i64,
}

/// Registers the test routes under `/_test`; `write` is the session of the API's routes
/// that write (with retries).
pub fn configure(
    cfg: &mut web::ServiceConfig,
    session: &SessionMiddleware,
    write: &SessionMiddleware,
) {
    let post = |route: fn() -> actix_web::Route| [(Method::POST, route())];
    cfg.service(resource(
        "/_test/write-then-4xx",
        post(|| web::to(write_then_4xx)),
        session,
    ))
    .service(resource(
        "/_test/write-then-err",
        post(|| web::to(write_then_err)),
        session,
    ))
    .service(resource(
        "/_test/write-then-panic",
        post(|| web::to(write_then_panic)),
        session,
    ))
    .service(resource(
        "/_test/commit-fails",
        post(|| web::to(commit_fails)),
        session,
    ))
    .service(resource(
        "/_test/swallowed-error",
        post(|| web::to(swallowed_error)),
        session,
    ))
    .service(resource(
        "/_test/write-then-sleep",
        post(|| web::to(write_then_sleep)),
        session,
    ))
    .service(resource(
        "/_test/write-in-local-task",
        post(|| web::to(write_in_local_task)),
        session,
    ))
    .service(resource(
        "/_test/savepoint",
        post(|| web::to(savepoint)),
        session,
    ))
    .service(resource(
        "/_test/savepoint-db-error",
        post(|| web::to(savepoint_db_error)),
        session,
    ))
    .service(resource(
        "/_test/escaping-guard",
        post(|| web::to(escaping_guard)),
        session,
    ))
    .service(resource(
        "/_test/pg-sleep",
        post(|| web::to(pg_sleep)),
        session,
    ))
    .service(resource(
        "/_test/slow-rows",
        post(|| web::to(slow_rows)),
        session,
    ))
    .service(resource(
        "/_test/nested-panic",
        post(|| web::to(nested_panic)),
        session,
    ))
    .service(resource(
        "/_test/nested-timeout",
        post(|| web::to(nested_timeout)),
        session,
    ))
    .service(resource(
        "/_test/abandoned-statement",
        post(|| web::to(abandoned_statement)),
        session,
    ))
    .service(resource(
        "/_test/impatient-then-write",
        post(|| web::to(impatient_then_write)),
        session,
    ))
    .service(resource(
        "/_test/write-then-pg-sleep",
        post(|| web::to(write_then_pg_sleep)),
        session,
    ))
    .service(resource("/_test/raise", post(|| web::to(raise)), session))
    .service(resource(
        "/_test/conflict",
        post(|| web::to(conflict)),
        write,
    ))
    .service(resource(
        "/_test/setting",
        [(Method::GET, web::to(setting))],
        session,
    ))
    .service(resource(
        "/_test/lock-account",
        post(|| web::to(lock_account)),
        session,
    ))
    .service(resource(
        "/_test/no-session",
        [(Method::GET, web::to(no_session))],
        session,
    ))
    // `pg-sleep` in a read-only session, which runs on a replica when there is one: a
    // read that is in flight there for as long as a test needs.
    .service(resource(
        "/_test/read-sleep",
        [(Method::GET, web::to(pg_sleep))],
        &session.clone().read_only(),
    ));
}

async fn write(session: &DbSession, name: &str) -> Result<i64, ApiError> {
    let mut conn = session.conn().await?;
    Ok(accounts::insert(&mut conn, name, 100).await?.id)
}

/// Writes, sleeps `ms` (0 by default), then answers 409 without an error: the status alone must roll back.
async fn write_then_4xx(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    Ok(HttpResponse::Conflict().json(serde_json::json!({ "written": true })))
}

/// Writes, then returns an error.
async fn write_then_err(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    Err(ApiError::invalid("name", "rejected after the write"))
}

/// Writes, then panics.
async fn write_then_panic(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    panic!("test route panics after its write");
}

/// Writes, then violates a deferred constraint, so COMMIT itself fails.
async fn commit_fails(session: DbSession, q: web::Query<Params>) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    diesel::sql_query(
        "CREATE TEMP TABLE deferred_check (v int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP",
    )
    .execute(&mut *conn)
    .await?;
    diesel::sql_query("INSERT INTO deferred_check VALUES (1), (1)")
        .execute(&mut *conn)
        .await?;
    Ok(HttpResponse::Created().finish())
}

/// Writes, lets a statement fail, ignores the error and answers 200.
async fn swallowed_error(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    let ignored = diesel::sql_query("SELECT 1/0").execute(&mut *conn).await;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "ignored_error": ignored.is_err() })))
}

/// Writes, then sleeps `ms` while holding the transaction (cancellation, pool exhaustion).
async fn write_then_sleep(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    let id = write(&session, &q.name).await?;
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    Ok(HttpResponse::Created().json(serde_json::json!({ "id": id })))
}

/// Writes from a local task the handler awaits, not from the handler's own future: the
/// session's check-out deadline must still reach the check-out there.
async fn write_in_local_task(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    let name = q.into_inner().name;
    let id = actix_web::rt::spawn(async move { write(&session, &name).await })
        .await
        .map_err(ApiError::internal)??;
    Ok(HttpResponse::Created().json(serde_json::json!({ "id": id })))
}

/// Writes, then a nested unit of work writes and fails: only the savepoint rolls back.
async fn savepoint(session: DbSession, q: web::Query<Params>) -> Result<HttpResponse, ApiError> {
    let outer = write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    let inner_name = format!("{}-inner", q.name);
    let nested = conn
        .transaction::<(), ApiError, _>(async |conn| {
            accounts::insert(conn, &inner_name, 1).await?;
            Err(ApiError::invalid("inner", "nested unit of work fails"))
        })
        .await;
    Ok(HttpResponse::Created()
        .json(serde_json::json!({ "id": outer, "nested_failed": nested.is_err() })))
}

/// Writes, then a nested unit of work writes and hits a real database error (division by
/// zero, which aborts the transaction up to the savepoint); after the savepoint rolled back,
/// the handler writes once more and answers 201.
async fn savepoint_db_error(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    let outer = write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    let inner_name = format!("{}-inner", q.name);
    let nested = conn
        .transaction::<(), diesel::result::Error, _>(async |conn| {
            accounts::insert(conn, &inner_name, 1).await?;
            diesel::sql_query("SELECT 1/0").execute(conn).await?;
            Ok(())
        })
        .await;
    let after = accounts::insert(&mut conn, &format!("{}-after", q.name), 1)
        .await?
        .id;
    Ok(HttpResponse::Created().json(serde_json::json!({
        "id": outer,
        "after_id": after,
        "nested_failed": nested.is_err(),
    })))
}

/// Moves the connection guard into a task that outlives the handler, which then writes.
async fn escaping_guard(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    let mut conn = session.conn().await?;
    let name = q.name.clone();
    actix_web::rt::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = accounts::insert(&mut conn, &name, 1).await;
    });
    Ok(HttpResponse::Created().finish())
}

/// Runs `pg_sleep` for `ms` (statement timeout tests).
async fn pg_sleep(session: DbSession, q: web::Query<Params>) -> Result<HttpResponse, ApiError> {
    let mut conn = session.conn().await?;
    if q.no_server_timeout {
        diesel::sql_query("SET LOCAL statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
    }
    diesel::sql_query("SELECT pg_sleep($1::bigint / 1000.0)")
        .bind::<BigInt, _>(i64::try_from(q.ms).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
    Ok(HttpResponse::Ok().finish())
}

/// Reads `rows` rows of 10 kB, one every `ms`: each row is larger than the server's output
/// buffer, so it leaves as soon as it is made, and the result streams for as long as the
/// rows take, long after the statement started answering (client-side deadline tests).
async fn slow_rows(session: DbSession, q: web::Query<Params>) -> Result<HttpResponse, ApiError> {
    #[derive(diesel::QueryableByName)]
    struct Pad {
        #[diesel(sql_type = diesel::sql_types::Text)]
        pad: String,
    }
    let mut conn = session.conn().await?;
    if q.no_server_timeout {
        diesel::sql_query("SET LOCAL statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
    }
    let rows: Vec<Pad> = diesel::sql_query(
        "SELECT repeat('x', 10000) || pg_sleep($2::bigint / 1000.0)::text AS pad \
         FROM generate_series(1, $1)",
    )
    .bind::<BigInt, _>(q.rows)
    .bind::<BigInt, _>(i64::try_from(q.ms).unwrap_or(i64::MAX))
    .load(&mut *conn)
    .await?;
    let bytes: usize = rows.iter().map(|r| r.pad.len()).sum();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "rows": rows.len(), "bytes": bytes })))
}

/// Writes, then runs `pg_sleep` for `ms` (client-side deadline tests).
async fn write_then_pg_sleep(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    pg_sleep(session, q).await
}

/// Gives up on a first `conn()` after `ms`, then asks again and writes: an abandoned
/// check-out must leave the session usable.
async fn impatient_then_write(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    let first = tokio::time::timeout(Duration::from_millis(q.ms), session.conn()).await;
    let gave_up = first.is_err();
    drop(first);
    let id = write(&session, &q.name).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({ "id": id, "gave_up_first": gave_up })))
}

/// Writes, then panics inside a nested unit of work (a savepoint is open).
async fn nested_panic(session: DbSession, q: web::Query<Params>) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    let inner = format!("{}-inner", q.name);
    let _ = conn
        .transaction::<(), ApiError, _>(async |conn| {
            accounts::insert(conn, &inner, 1).await?;
            panic!("test route panics inside a nested unit of work");
        })
        .await;
    Ok(HttpResponse::Created().finish())
}

/// Writes, then cuts a nested unit of work short with its own timeout (the savepoint
/// stays open, its statement unanswered) and answers 201 anyway.
async fn nested_timeout(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    let cut_short = tokio::time::timeout(
        Duration::from_millis(100),
        conn.transaction::<(), ApiError, _>(async |conn| {
            diesel::sql_query("SELECT pg_sleep(0.5)")
                .execute(conn)
                .await?;
            Ok(())
        }),
    )
    .await
    .is_err();
    Ok(HttpResponse::Created().json(serde_json::json!({ "cut_short": cut_short })))
}

/// Writes, then drops a statement future mid-flight (a valid INSERT that the server runs
/// after the handler stopped waiting) and answers 201 anyway.
async fn abandoned_statement(
    session: DbSession,
    q: web::Query<Params>,
) -> Result<HttpResponse, ApiError> {
    write(&session, &q.name).await?;
    let mut conn = session.conn().await?;
    // The statement runs for `ms` (300 by default) on the server.
    let sleep_ms = if q.ms == 0 { 300 } else { q.ms };
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        diesel::sql_query(
            "INSERT INTO accounts (name, balance) SELECT 'late', 1 FROM pg_sleep($1::bigint / 1000.0)",
        )
        .bind::<BigInt, _>(i64::try_from(sleep_ms).unwrap_or(i64::MAX))
        .execute(&mut *conn),
    )
    .await
    .is_err();
    Ok(HttpResponse::Created().json(serde_json::json!({ "abandoned": abandoned })))
}

/// The SQLSTATEs `/_test/raise` accepts. A `DO` block takes no bind parameters, so the
/// statement is built from the entry of this list, never from the request's text.
const RAISABLE: &[&str] = &[
    "40001", "40P01", "57014", "55P03", "57P01", "57P02", "57P03", "08000", "08003", "08006",
    "25006", "22012",
];

#[derive(Deserialize)]
struct RaiseParams {
    code: String,
}

/// Raises the SQLSTATE `code` (one of [`RAISABLE`]) inside the session's transaction,
/// under a message no server would write: the answer must follow from the code alone.
async fn raise(session: DbSession, q: web::Query<RaiseParams>) -> Result<HttpResponse, ApiError> {
    let Some(code) = RAISABLE.iter().find(|&&code| code == q.code) else {
        return Err(ApiError::BadRequest(
            "code is not one of the raisable SQLSTATEs".to_owned(),
        ));
    };
    let mut conn = session.conn().await?;
    diesel::sql_query(format!(
        "DO $$BEGIN RAISE EXCEPTION 'zz' USING ERRCODE = '{code}'; END$$"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(HttpResponse::Ok().finish())
}

#[derive(Deserialize)]
struct ConflictParams {
    name: String,
    times: u32,
}

/// Writes an account named `name`, then fails with a serialization failure (40001) on
/// the first `times` attempts of requests with this name, and answers 201 after that. The
/// route retries as the API's writes do.
async fn conflict(
    session: DbSession,
    q: web::Query<ConflictParams>,
) -> Result<HttpResponse, ApiError> {
    static ATTEMPTS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());
    let attempt = {
        let mut attempts = ATTEMPTS.lock().unwrap_or_else(PoisonError::into_inner);
        let n = attempts.entry(q.name.clone()).or_default();
        *n += 1;
        *n
    };
    write(&session, &q.name).await?;
    if attempt <= q.times {
        diesel::sql_query("DO $$BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END$$")
            .execute(&mut *session.conn().await?)
            .await?;
    }
    Ok(HttpResponse::Created().json(serde_json::json!({ "attempt": attempt })))
}

#[derive(Deserialize)]
struct SettingParams {
    name: String,
}

/// The value of the setting `name` inside the request's transaction (`null` when unset).
async fn setting(
    session: DbSession,
    q: web::Query<SettingParams>,
) -> Result<HttpResponse, ApiError> {
    #[derive(diesel::QueryableByName)]
    struct Value {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        value: Option<String>,
    }
    let value = diesel::sql_query("SELECT current_setting($1, true) AS value")
        .bind::<diesel::sql_types::Text, _>(&q.name)
        .get_result::<Value>(&mut *session.conn().await?)
        .await?
        .value;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "value": value })))
}

#[derive(Deserialize)]
struct LockParams {
    id: i64,
}

/// Locks account `id` with a lock timeout of 100 ms for this transaction only.
async fn lock_account(
    session: DbSession,
    q: web::Query<LockParams>,
) -> Result<HttpResponse, ApiError> {
    let mut conn = session.conn().await?;
    diesel::sql_query("SET LOCAL lock_timeout = '100ms'")
        .execute(&mut *conn)
        .await?;
    diesel::sql_query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind::<BigInt, _>(q.id)
        .execute(&mut *conn)
        .await?;
    Ok(HttpResponse::Ok().finish())
}

/// Takes no session: must not check out a connection.
async fn no_session() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "session": false }))
}
