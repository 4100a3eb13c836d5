//! What the ledger does with the session layer's per-request features: the routes that
//! write retry a transaction that ended in a serialization failure or a deadlock, counted
//! by route; and, with `DB_REQUEST_ID_SETTING`, each transaction carries the request id.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::metrics::Scrape;
use crate::support::{spawn_app, spawn_app_with, TestApp};

const RETRIES: &str = r#"db_transaction_retries_total{route="/_test/conflict",method="POST"}"#;

/// A write route whose first attempt fails with 40001 answers 201 from its second, with
/// the write made once, and the retry is counted under the route's template. One that
/// conflicts on every attempt answers 503 `transaction_conflict` with `Retry-After` after
/// three attempts (two retries), and nothing of it is written.
#[tokio::test]
async fn a_write_that_conflicts_is_retried_and_counted_by_route_then_answered_503() {
    let app = spawn_app().await;
    let before = Scrape::take(&app).await;

    let once = app
        .post_json("/_test/conflict?name=rt-once&times=1", &json!({}))
        .await;
    assert_eq!(once.status, StatusCode::CREATED, "{}", once.text);
    assert_eq!(once.body["attempt"], 2);
    assert_eq!(app.db.accounts_named("rt-once").await, 1);
    assert_eq!(
        Scrape::take(&app).await.get(RETRIES) - before.get(RETRIES),
        1.0
    );

    let always = app
        .post_json("/_test/conflict?name=rt-always&times=99", &json!({}))
        .await;
    always.assert_problem(503, "transaction_conflict");
    assert_eq!(always.header("retry-after"), Some("1"));
    assert_eq!(app.db.accounts_named("rt-always").await, 0);
    assert_eq!(
        Scrape::take(&app).await.get(RETRIES) - before.get(RETRIES),
        3.0
    );
}

/// The value of `app.request_id` inside a request sent with `X-Request-Id: id`.
async fn request_id_seen(app: &TestApp, id: &str) -> Value {
    let response = app
        .client
        .get(app.url("/_test/setting?name=app.request_id"))
        .header("x-request-id", id)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    body["value"].clone()
}

/// With `DB_REQUEST_ID_SETTING=true` the transaction sees its request's id as
/// `app.request_id`, each request its own on the same pooled connections; without it,
/// nothing is set.
#[tokio::test]
async fn transactions_carry_the_request_id_only_when_configured() {
    let on = spawn_app_with(&[("DB_REQUEST_ID_SETTING", "true"), ("DB_POOL_SIZE", "1")]).await;
    assert_eq!(request_id_seen(&on, "req-one").await, "req-one");
    assert_eq!(request_id_seen(&on, "req-two").await, "req-two");

    let off = spawn_app().await;
    assert_eq!(request_id_seen(&off, "req-three").await, Value::Null);
}
