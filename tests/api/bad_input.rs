//! Every kind of bad input gets its problem+json code and writes nothing.

use serde_json::json;
use tokio_postgres::Client;

use crate::metrics::Scrape;
use crate::support::{spawn_app, spawn_app_with, Answer, TestApp};

/// Pool check-outs so far (one per session that asked for a connection).
const CHECKOUTS: &str = "db_pool_acquire_duration_seconds_count";

/// The answer a case must get.
#[derive(Debug, Clone, Copy)]
struct Want {
    status: u16,
    code: &'static str,
    /// The first `errors[].field` of a `validation_failed` body.
    field: Option<&'static str>,
    /// The `index` of a failing batch item.
    index: Option<usize>,
}

const fn problem(status: u16, code: &'static str) -> Want {
    Want {
        status,
        code,
        field: None,
        index: None,
    }
}

const BAD: Want = problem(400, "bad_request");
const MEDIA: Want = problem(415, "unsupported_media_type");
const NOT_FOUND: Want = problem(404, "not_found");
const FUNDS: Want = problem(409, "insufficient_funds");

const fn invalid(field: &'static str) -> Want {
    Want {
        field: Some(field),
        ..problem(422, "validation_failed")
    }
}

const fn at(index: usize, want: Want) -> Want {
    Want {
        index: Some(index),
        ..want
    }
}

/// One request of the table.
enum Req {
    Get(String),
    Post {
        path: &'static str,
        content_type: Option<&'static str>,
        body: Vec<u8>,
        key: Option<String>,
    },
}

fn post(path: &'static str, body: impl Into<String>) -> Req {
    Req::Post {
        path,
        content_type: Some("application/json"),
        body: body.into().into_bytes(),
        key: None,
    }
}

fn post_as(path: &'static str, content_type: Option<&'static str>, body: &str) -> Req {
    Req::Post {
        path,
        content_type,
        body: body.as_bytes().to_vec(),
        key: None,
    }
}

fn post_keyed(path: &'static str, key: String, body: String) -> Req {
    Req::Post {
        path,
        content_type: Some("application/json"),
        body: body.into_bytes(),
        key: Some(key),
    }
}

impl Req {
    fn describe(&self) -> String {
        match self {
            Req::Get(path) => format!("GET {path}"),
            Req::Post {
                path,
                content_type,
                body,
                key,
            } => format!(
                "POST {path} ({content_type:?}, key {key:?}) {}",
                String::from_utf8_lossy(body)
            ),
        }
    }

    async fn send(&self, app: &TestApp) -> Answer {
        let request = match self {
            Req::Get(path) => app.client.get(app.url(path)),
            Req::Post {
                path,
                content_type,
                body,
                key,
            } => {
                let mut request = app.client.post(app.url(path)).body(body.clone());
                if let Some(content_type) = content_type {
                    request = request.header("content-type", *content_type);
                }
                if let Some(key) = key {
                    request = request.header("idempotency-key", key.as_str());
                }
                request
            }
        };
        Answer::from(request.send().await.expect("send")).await
    }
}

/// Everything a request could have written: accounts (and balances), transfers, keys.
async fn snapshot(client: &Client) -> String {
    client
        .query_one(
            "SELECT concat_ws(' | ',
                 (SELECT string_agg(id || ':' || name || ':' || balance, ',' ORDER BY id)
                    FROM accounts),
                 (SELECT count(*) FROM transfers),
                 (SELECT count(*) FROM idempotency_keys))",
            &[],
        )
        .await
        .expect("snapshot")
        .get(0)
}

fn transfer(from: i64, to: i64, amount: impl std::fmt::Display) -> String {
    format!(r#"{{"from_account_id": {from}, "to_account_id": {to}, "amount": {amount}}}"#)
}

fn batch(items: &[String]) -> String {
    format!(r#"{{"transfers": [{}]}}"#, items.join(", "))
}

/// Every field of every body, query and path at its edges and in every wrong shape, each
/// answered with the contract's status and code (and field or index) in problem+json, none
/// writing anything, and those the request alone decides checking out no connection: no
/// 500 from PostgreSQL refusing a value, no array taken for an object, no `*/json` media
/// type taken for `application/json`.
#[tokio::test]
async fn every_edge_value_and_wrong_shape_gets_the_contracts_answer_and_writes_nothing() {
    let app = spawn_app().await;
    let (a, b) = (app.account_id("a", 100).await, app.account_id("b", 0).await);
    let full = app.account_id("full", i64::MAX).await;
    let (max, min) = (i64::MAX, i64::MIN);
    let ok = transfer(a, b, 1);
    let one = batch(std::slice::from_ref(&ok));
    let hundred_and_one = vec![ok.clone(); 101];
    let long_name = "é".repeat(101);
    // Past serde_json's recursion limit (128), through the wrapper's extra frames.
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));

    let cases: Vec<(Req, Want)> = vec![
        // POST /accounts: text.
        (
            post("/accounts", r#"{"name": "a\u0000b"}"#),
            invalid("name"),
        ),
        (post("/accounts", r#"{"name": "\u0000"}"#), invalid("name")),
        (post("/accounts", r#"{"name": ""}"#), invalid("name")),
        (post("/accounts", r#"{"name": " \t\n "}"#), invalid("name")),
        (
            post("/accounts", r#"{"name": "\u3000\u00a0"}"#),
            invalid("name"),
        ),
        (
            post("/accounts", json!({ "name": long_name }).to_string()),
            invalid("name"),
        ),
        (post("/accounts", r#"{"name": "\ud800"}"#), BAD),
        (post("/accounts", r#"{"name": "\udc00x"}"#), BAD),
        (post("/accounts", r#"{"name": null}"#), BAD),
        (post("/accounts", r#"{"name": 5}"#), BAD),
        (post("/accounts", r#"{"name": ["x"]}"#), BAD),
        (post("/accounts", r#"{"name": {"x": 1}}"#), BAD),
        (post("/accounts", r#"{"name": "x", "name": "y"}"#), BAD),
        (post("/accounts", format!(r#"{{"name": {deep}}}"#)), BAD),
        (post("/accounts", "\u{feff}{\"name\": \"bom\"}"), BAD),
        // POST /accounts: the balance.
        (
            post("/accounts", r#"{"name": "x", "balance": -1}"#),
            invalid("balance"),
        ),
        (
            post("/accounts", format!(r#"{{"name": "x", "balance": {min}}}"#)),
            invalid("balance"),
        ),
        (
            post(
                "/accounts",
                r#"{"name": "x", "balance": 9223372036854775808}"#,
            ),
            BAD,
        ),
        (
            post(
                "/accounts",
                r#"{"name": "x", "balance": -9223372036854775809}"#,
            ),
            BAD,
        ),
        (post("/accounts", r#"{"name": "x", "balance": 1e400}"#), BAD),
        (post("/accounts", r#"{"name": "x", "balance": 1.0}"#), BAD),
        (post("/accounts", r#"{"name": "x", "balance": 1e3}"#), BAD),
        (post("/accounts", r#"{"name": "x", "balance": "10"}"#), BAD),
        (post("/accounts", r#"{"name": "x", "balance": null}"#), BAD),
        (post("/accounts", r#"{"name": "x", "balance": true}"#), BAD),
        (
            post("/accounts", r#"{"name": "x", "balance": 1, "balance": 2}"#),
            BAD,
        ),
        // POST /accounts: the body's shape.
        (post("/accounts", r#"["arr", 5]"#), BAD),
        (post("/accounts", r#"["arr"]"#), BAD),
        (post("/accounts", r#"[]"#), BAD),
        (post("/accounts", r#"[{"name": "x"}]"#), BAD),
        (post("/accounts", r#""x""#), BAD),
        (post("/accounts", "5"), BAD),
        (post("/accounts", "null"), BAD),
        (post("/accounts", "{}"), BAD),
        (post("/accounts", ""), BAD),
        (post("/accounts", r#"{"name": "x"} {"name": "y"}"#), BAD),
        (post("/accounts", r#"{"name": "x",}"#), BAD),
        (post("/accounts", r#"{"name": "x", "id": 7}"#), BAD),
        (
            Req::Post {
                path: "/accounts",
                content_type: Some("application/json"),
                body: b"{\"name\": \"\xff\"}".to_vec(),
                key: None,
            },
            BAD,
        ),
        // POST /accounts: media types.
        (post_as("/accounts", None, r#"{"name": "x"}"#), MEDIA),
        (
            post_as("/accounts", Some("text/plain"), r#"{"name": "x"}"#),
            MEDIA,
        ),
        (
            post_as("/accounts", Some("text/json"), r#"{"name": "x"}"#),
            MEDIA,
        ),
        (
            post_as(
                "/accounts",
                Some("application/vnd.x+json"),
                r#"{"name": "x"}"#,
            ),
            MEDIA,
        ),
        (
            post_as(
                "/accounts",
                Some("application/problem+json"),
                r#"{"name": "x"}"#,
            ),
            MEDIA,
        ),
        (
            post_as(
                "/accounts",
                Some("application/json-seq"),
                r#"{"name": "x"}"#,
            ),
            MEDIA,
        ),
        (
            post_as(
                "/accounts",
                Some("application/x-www-form-urlencoded"),
                "name=x",
            ),
            MEDIA,
        ),
        (
            post_as(
                "/accounts",
                Some("application/json; charset=latin1"),
                r#"{"name": "x"}"#,
            ),
            MEDIA,
        ),
        (
            post_as("/accounts", Some("json"), r#"{"name": "x"}"#),
            MEDIA,
        ),
        // POST /transfers.
        (post("/transfers", format!("[{a}, {b}, 1]")), BAD),
        (post("/transfers", "[1, 2, 3]"), BAD),
        (post("/transfers", format!("[[{a}, {b}, 1]]")), BAD),
        (post_as("/transfers", Some("text/json"), &ok), MEDIA),
        (
            post_as("/transfers", Some("application/problem+json"), &ok),
            MEDIA,
        ),
        (post("/transfers", transfer(a, b, 0)), invalid("amount")),
        (post("/transfers", transfer(a, b, -1)), invalid("amount")),
        (post("/transfers", transfer(a, b, min)), invalid("amount")),
        (
            post("/transfers", transfer(a, a, 1)),
            invalid("to_account_id"),
        ),
        (post("/transfers", transfer(a, b, 101)), FUNDS),
        (post("/transfers", transfer(a, b, max)), FUNDS),
        (post("/transfers", transfer(a, full, 1)), invalid("amount")),
        (post("/transfers", transfer(0, b, 1)), NOT_FOUND),
        (post("/transfers", transfer(-1, b, 1)), NOT_FOUND),
        (post("/transfers", transfer(min, b, 1)), NOT_FOUND),
        (post("/transfers", transfer(max, b, 1)), NOT_FOUND),
        (post("/transfers", transfer(a, max, 1)), NOT_FOUND),
        (post("/transfers", transfer(a, 0, 1)), NOT_FOUND),
        (post("/transfers", transfer(a, b, "1.0")), BAD),
        (post("/transfers", transfer(a, b, "1e3")), BAD),
        (post("/transfers", transfer(a, b, r#""1""#)), BAD),
        (post("/transfers", transfer(a, b, "null")), BAD),
        (post("/transfers", transfer(a, b, "[1]")), BAD),
        (
            post("/transfers", transfer(a, b, "9223372036854775808")),
            BAD,
        ),
        (
            post("/transfers", transfer(a, b, "99999999999999999999999")),
            BAD,
        ),
        (
            post(
                "/transfers",
                format!(r#"{{"from_account_id": "{a}", "to_account_id": {b}, "amount": 1}}"#),
            ),
            BAD,
        ),
        (
            post(
                "/transfers",
                format!(r#"{{"from_account_id": {a}.0, "to_account_id": {b}, "amount": 1}}"#),
            ),
            BAD,
        ),
        (
            post(
                "/transfers",
                format!(r#"{{"from_account_id": {a}, "to_account_id": {b}}}"#),
            ),
            BAD,
        ),
        (
            post(
                "/transfers",
                format!(
                    r#"{{"from_account_id": {a}, "to_account_id": {b}, "amount": 1, "amount": 2}}"#
                ),
            ),
            BAD,
        ),
        (
            post(
                "/transfers",
                format!(
                    r#"{{"from_account_id": {a}, "to_account_id": {b}, "amount": 1, "memo": "x"}}"#
                ),
            ),
            BAD,
        ),
        // POST /transfers/batch.
        (post("/transfers/batch", format!("[[[{a}, {b}, 1]]]")), BAD),
        (post("/transfers/batch", format!("[[{a}, {b}, 1]]")), BAD),
        (
            post(
                "/transfers/batch",
                format!(r#"{{"transfers": [[{a}, {b}, 1]]}}"#),
            ),
            at(0, BAD),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[ok.clone(), format!("[{a}, {b}, 1]")]),
            ),
            at(1, BAD),
        ),
        (
            post("/transfers/batch", batch(&[ok.clone(), "5".to_owned()])),
            at(1, BAD),
        ),
        (
            post("/transfers/batch", batch(&[ok.clone(), "null".to_owned()])),
            at(1, BAD),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[ok.clone(), transfer(a, b, "1.5")]),
            ),
            at(1, BAD),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[
                    ok.clone(),
                    format!(
                        r#"{{"from_account_id": {a}, "to_account_id": {b}, "amount": 1, "amount": 2}}"#
                    ),
                ]),
            ),
            at(1, BAD),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[
                    ok.clone(),
                    format!(
                        r#"{{"from_account_id": {a}, "to_account_id": {b}, "amount": 1, "x": 2}}"#
                    ),
                ]),
            ),
            at(1, BAD),
        ),
        (
            post("/transfers/batch", batch(&[ok.clone(), transfer(a, b, 0)])),
            at(1, invalid("amount")),
        ),
        (
            post("/transfers/batch", batch(&[ok.clone(), transfer(b, b, 1)])),
            at(1, invalid("to_account_id")),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[ok.clone(), transfer(a, full, 1)]),
            ),
            at(1, invalid("amount")),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[ok.clone(), transfer(a, b, 100)]),
            ),
            at(1, FUNDS),
        ),
        (
            post(
                "/transfers/batch",
                batch(&[ok.clone(), transfer(a, max, 1)]),
            ),
            at(1, NOT_FOUND),
        ),
        (
            post("/transfers/batch", batch(&[transfer(min, b, 1)])),
            at(0, NOT_FOUND),
        ),
        (post("/transfers/batch", batch(&[])), invalid("transfers")),
        (
            post("/transfers/batch", batch(&hundred_and_one)),
            invalid("transfers"),
        ),
        (
            post(
                "/transfers/batch",
                format!(r#"{{"transfers": {{"0": {ok}}}}}"#),
            ),
            BAD,
        ),
        (post("/transfers/batch", r#"{"transfers": null}"#), BAD),
        (
            post("/transfers/batch", format!(r#"{{"transfers": {deep}}}"#)),
            at(0, BAD),
        ),
        (post("/transfers/batch", "{}"), BAD),
        (
            post(
                "/transfers/batch",
                format!(r#"{{"transfers": [{ok}], "transfers": [{ok}]}}"#),
            ),
            BAD,
        ),
        (
            post(
                "/transfers/batch",
                format!(r#"{{"transfers": [{ok}], "extra": 1}}"#),
            ),
            BAD,
        ),
        (post_as("/transfers/batch", Some("text/json"), &one), MEDIA),
        (
            post_as("/transfers/batch", Some("application/vnd.x+json"), &one),
            MEDIA,
        ),
        // Idempotency-Key (headers cannot carry NUL; reqwest refuses control characters).
        (post_keyed("/transfers", "k".repeat(256), ok.clone()), BAD),
        (
            post_keyed("/transfers", "a key".to_owned(), ok.clone()),
            BAD,
        ),
        (post_keyed("/transfers", "clé".to_owned(), ok.clone()), BAD),
        // Paths.
        (Req::Get("/accounts/abc".into()), BAD),
        (Req::Get("/accounts/1.0".into()), BAD),
        (Req::Get("/accounts/1e3".into()), BAD),
        (Req::Get("/accounts/%00".into()), BAD),
        (Req::Get("/accounts/9223372036854775808".into()), BAD),
        (Req::Get("/accounts/-9223372036854775809".into()), BAD),
        (Req::Get("/accounts/0".into()), NOT_FOUND),
        (Req::Get("/accounts/-1".into()), NOT_FOUND),
        (Req::Get(format!("/accounts/{max}")), NOT_FOUND),
        (Req::Get(format!("/accounts/{min}")), NOT_FOUND),
        (Req::Get("/transfers/abc".into()), BAD),
        (Req::Get("/transfers/9223372036854775808".into()), BAD),
        (Req::Get("/transfers/0".into()), NOT_FOUND),
        (Req::Get(format!("/transfers/{max}")), NOT_FOUND),
        (Req::Get(format!("/transfers/{min}")), NOT_FOUND),
        // Query strings.
        (Req::Get("/accounts?limit=0".into()), invalid("limit")),
        (Req::Get("/accounts?limit=-1".into()), invalid("limit")),
        (Req::Get("/accounts?limit=1001".into()), invalid("limit")),
        (Req::Get(format!("/accounts?limit={max}")), invalid("limit")),
        (Req::Get(format!("/accounts?limit={min}")), invalid("limit")),
        (Req::Get("/accounts?limit=9223372036854775808".into()), BAD),
        (Req::Get("/accounts?limit=1.0".into()), BAD),
        (Req::Get("/accounts?limit=1e3".into()), BAD),
        (Req::Get("/accounts?limit=ten".into()), BAD),
        (Req::Get("/accounts?limit=".into()), BAD),
        (Req::Get("/accounts?limit=%00".into()), BAD),
        (Req::Get("/accounts?limit=1&limit=2".into()), BAD),
        (
            Req::Get("/accounts?after_id=9223372036854775808".into()),
            BAD,
        ),
        (Req::Get("/accounts?after_id=x".into()), BAD),
        (Req::Get("/accounts?limt=5".into()), BAD),
        (Req::Get("/transfers?limit=0".into()), invalid("limit")),
        (Req::Get("/transfers?limit=1001".into()), invalid("limit")),
        (Req::Get("/transfers?account_id=x".into()), BAD),
        (
            Req::Get("/transfers?account_id=9223372036854775808".into()),
            BAD,
        ),
        (
            Req::Get("/transfers?after_id=-9223372036854775809".into()),
            BAD,
        ),
        (Req::Get("/transfers?acount_id=1".into()), BAD),
    ];

    let client = app.db.client().await;
    let mut before = snapshot(&client).await;
    let mut wrong = Vec::new();
    for (req, want) in &cases {
        let checkouts = Scrape::take(&app).await.get(CHECKOUTS);
        let answer = req.send(&app).await;
        let after = snapshot(&client).await;
        // Compared with the state just before this case, so that one case's write does
        // not show as every later case's.
        let written = after != before;
        before = after;
        if needs_no_connection(want) && Scrape::take(&app).await.get(CHECKOUTS) != checkouts {
            wrong.push(format!("{}: checked out a connection", req.describe()));
        }
        if let Some(problem) = mismatch(&answer, want, written) {
            wrong.push(format!("{}: {problem}: {}", req.describe(), answer.text));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases answered wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// Answers that the request alone decides: they must come before any check-out. (An
/// overflowing credit, a missing account or a short balance need the database.)
fn needs_no_connection(want: &Want) -> bool {
    match want.status {
        400 | 415 => true,
        422 => matches!(want.field, Some("name" | "balance" | "limit" | "transfers")),
        _ => false,
    }
}

/// What is wrong with `answer` for `want`, if anything.
fn mismatch(answer: &Answer, want: &Want, written: bool) -> Option<String> {
    let body = &answer.body;
    let checks = [
        (answer.status.as_u16() == want.status, "status"),
        (
            answer.header("content-type") == Some("application/problem+json"),
            "content type",
        ),
        (body["code"] == want.code, "code"),
        (body["status"] == want.status, "body status"),
        (
            want.field
                .is_none_or(|field| body["errors"][0]["field"] == field),
            "errors[0].field",
        ),
        (
            body["index"].as_u64() == want.index.map(|i| i as u64),
            "index",
        ),
        (!written, "it wrote to the database"),
    ];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| *what)
        .collect();
    (!failed.is_empty()).then(|| format!("wanted {want:?}, wrong {}", failed.join(", ")))
}

/// The edges the contract allows are accepted, and stored as sent (after trimming).
#[tokio::test]
async fn edge_values_the_contract_allows_are_accepted() {
    let app = spawn_app().await;
    // 100 characters after trimming, 200 bytes, with whitespace around.
    let name = "é".repeat(100);
    let answer = app
        .post_json(
            "/accounts",
            &json!({ "name": format!(" \t{name}\u{3000}") }),
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["name"], name.as_str());
    // Outside the BMP (a JSON surrogate pair) and noncharacters: PostgreSQL takes them.
    let answer = app
        .post_raw(
            "/accounts",
            Some("application/json"),
            r#"{"name": "\ud83d\ude00 \udbff\udfff \uffff \u0001"}"#,
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["name"], "\u{1f600} \u{10ffff} \u{ffff} \u{1}");
    let full = app.account_id("full", i64::MAX).await;
    let zero = app.account_id("zero", 0).await;

    for content_type in [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
    ] {
        let answer = app
            .post_raw("/accounts", Some(content_type), r#"{"name": "typed"}"#)
            .await;
        assert_eq!(answer.status, 201, "{content_type}: {}", answer.text);
    }
    // Whitespace and key order are free; escapes of ordinary characters too.
    let answer = app
        .post_raw(
            "/transfers",
            Some("application/json"),
            format!(
                "\n {{ \"amount\" : {} , \"to_account_id\":{zero},\"from_account_id\":{full} }} \n",
                i64::MAX
            ),
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["amount"], i64::MAX);

    let key = "k".repeat(255);
    let answer = app
        .post_keyed(
            "/transfers/batch",
            Some(&key),
            &batch(&[transfer(zero, full, 1), transfer(full, zero, 1)]),
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);

    for path in [
        "/accounts?limit=1".to_owned(),
        "/accounts?limit=1000".to_owned(),
        "/accounts?after_id=-1".to_owned(),
        format!("/accounts?after_id={}", i64::MIN),
        format!("/accounts?after_id={}", i64::MAX),
        "/transfers?account_id=0&limit=1&after_id=0".to_owned(),
        format!("/transfers?account_id={}", i64::MIN),
        "/accounts?".to_owned(),
    ] {
        let answer = app.get(&path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text);
    }
    assert_eq!(app.get("/accounts?limit=1").await.item_ids().len(), 1);
    assert!(app
        .get(&format!("/accounts?after_id={}", i64::MAX))
        .await
        .item_ids()
        .is_empty());
}

#[tokio::test]
async fn invalid_account_bodies_get_422_and_write_nothing() {
    let app = spawn_app().await;
    let long = "x".repeat(101);
    for (body, field) in [
        (json!({ "name": "" }), "name"),
        (json!({ "name": "   " }), "name"),
        (json!({ "name": long }), "name"),
        (json!({ "name": "ok", "balance": -1 }), "balance"),
    ] {
        let answer = app.post_json("/accounts", &body).await;
        answer.assert_problem(422, "validation_failed");
        assert_eq!(answer.body["errors"][0]["field"], field, "{body}");
    }
    // 100 characters (not bytes) is fine.
    assert_eq!(
        app.post_json("/accounts", &json!({ "name": "é".repeat(100) }))
            .await
            .status,
        201
    );
    assert_eq!(app.db.scalar("SELECT count(*) FROM accounts").await, 1);
}

#[tokio::test]
async fn malformed_bodies_get_400_and_write_nothing() {
    let app = spawn_app().await;
    for body in [
        r#"{"name": "x""#,
        r#"not json"#,
        r#"{"name": 5}"#,
        r#"{"name": "x", "balance": "10"}"#,
        r#"{"name": "x", "balance": 1.5}"#,
        r#"{"name": "x", "balance": 9223372036854775808}"#,
        r#"{"name": "x", "colour": "red"}"#,
        r#"{"balance": 10}"#,
        r#"[]"#,
    ] {
        app.post_raw("/accounts", Some("application/json"), body)
            .await
            .assert_problem(400, "bad_request");
    }
    assert_eq!(app.db.scalar("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test]
async fn bodies_without_json_content_type_get_415() {
    let app = spawn_app().await;
    app.post_raw("/accounts", None, r#"{"name": "x"}"#)
        .await
        .assert_problem(415, "unsupported_media_type");
    app.post_raw("/accounts", Some("text/plain"), r#"{"name": "x"}"#)
        .await
        .assert_problem(415, "unsupported_media_type");
    assert_eq!(app.db.scalar("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let app = spawn_app_with(&[("HTTP_BODY_LIMIT", "1024")]).await;
    let body = json!({ "name": "x".repeat(2000) }).to_string();
    app.post_raw("/accounts", Some("application/json"), body)
        .await
        .assert_problem(413, "payload_too_large");
    assert_eq!(app.db.scalar("SELECT count(*) FROM accounts").await, 0);
}

#[tokio::test]
async fn unknown_routes_get_404_and_wrong_methods_405_with_allow() {
    let app = spawn_app().await;
    app.get("/nope").await.assert_problem(404, "not_found");

    let answer = crate::support::Answer::from(
        app.client
            .delete(app.url("/accounts"))
            .send()
            .await
            .expect("DELETE"),
    )
    .await;
    answer.assert_problem(405, "method_not_allowed");
    let allow = answer.header("allow").expect("Allow header");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");

    let answer = app.post_json("/accounts/1", &json!({})).await;
    answer.assert_problem(405, "method_not_allowed");
    assert_eq!(answer.header("allow"), Some("GET"));

    let answer = app.post_json("/health/live", &json!({})).await;
    assert_eq!(answer.status, 405);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_sane_one_is_kept() {
    let app = spawn_app().await;
    let answer = app.get("/health/live").await;
    assert!(answer.header("x-request-id").is_some_and(|v| v.len() >= 16));

    let kept = crate::support::Answer::from(
        app.client
            .get(app.url("/nope"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(kept.header("x-request-id"), Some("abc-123"));
    assert_eq!(kept.body["request_id"], "abc-123");

    let replaced = crate::support::Answer::from(
        app.client
            .get(app.url("/nope"))
            .header("x-request-id", "bad id\twith tabs")
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_ne!(replaced.header("x-request-id"), Some("bad id\twith tabs"));
}
