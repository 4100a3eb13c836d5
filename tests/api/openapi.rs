//! `GET /openapi.json` (contract section 11): the document, and that it describes the
//! routes the service has, no more and no fewer.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, Answer, TestApp};

/// Every operation of contract sections 3, 4, 5 and 9, and the document's own.
const CONTRACT_OPERATIONS: &[(&str, &str)] = &[
    ("GET", "/accounts"),
    ("POST", "/accounts"),
    ("GET", "/accounts/{id}"),
    ("GET", "/transfers"),
    ("POST", "/transfers"),
    ("POST", "/transfers/batch"),
    ("GET", "/transfers/{id}"),
    ("GET", "/health"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

async fn document(app: &TestApp) -> Value {
    let answer = app.get("/openapi.json").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    answer.body
}

/// (METHOD, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    op
}

/// The `code`s the document allows for `status` of an operation.
fn documented_codes(doc: &Value, method: &str, path: &str, status: u16) -> Vec<String> {
    let response = &operation(doc, method, path)["responses"][status.to_string()];
    let schema = &response["content"]["application/problem+json"]["schema"];
    let all_of = schema["allOf"]
        .as_array()
        .unwrap_or_else(|| panic!("{method} {path} {status}: no problem schema in {response}"));
    assert_eq!(all_of[0]["$ref"], "#/components/schemas/Problem");
    all_of[1]["properties"]["code"]["enum"]
        .as_array()
        .expect("code enum")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect()
}

/// Asserts that `answer` is one the document allows for the operation: a documented
/// status, and for a problem, a documented code.
fn assert_documented(doc: &Value, method: &str, path: &str, answer: &Answer) {
    let status = answer.status.as_u16();
    let responses = &operation(doc, method, path)["responses"];
    assert!(
        responses.get(status.to_string()).is_some(),
        "{method} {path} answered {status}, which the document does not list: {}",
        answer.text
    );
    if status >= 400 {
        let code = answer.body["code"].as_str().expect("problem code");
        let codes = documented_codes(doc, method, path, status);
        assert!(
            codes.iter().any(|c| c == code),
            "{method} {path} answered {status} {code}; the document lists {codes:?}"
        );
    }
}

/// A request for a documented path, with `{id}` filled in.
async fn send(app: &TestApp, method: &str, path: &str) -> Answer {
    let url = app.url(&path.replace("{id}", "1"));
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = app.client.request(method.clone(), url);
    if method == Method::POST {
        request = request.json(&json!({}));
    }
    Answer::from(request.send().await.expect("request")).await
}

fn is_unrouted(answer: &Answer) -> bool {
    answer.status == 404
        && answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("no route for"))
}

#[tokio::test]
async fn openapi_the_document_is_openapi_3_1_json() {
    let app = spawn_app().await;

    let doc = document(&app).await;

    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3.1."), "{version}");
    assert_eq!(doc["info"]["title"], "ledger");
}

#[tokio::test]
async fn openapi_describes_exactly_the_contract_operations_and_no_test_routes() {
    let app = spawn_app().await;

    let doc = document(&app).await;

    let expected: BTreeSet<(String, String)> = CONTRACT_OPERATIONS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(operations(&doc), expected);
    // The suite's build has the test and benchmark routes (this one answers), yet the
    // document leaves them out.
    let bench = app.get("/_bench/accounts/1").await;
    assert!(!is_unrouted(&bench), "{}", bench.text);
    let text = doc.to_string();
    assert!(!text.contains("/_test") && !text.contains("/_bench"));
}

/// Actix cannot list its routes, so the document is made of the registrations themselves
/// (`openapi::Endpoint`); this proves the two agree from the outside: every documented
/// operation is routed, and on every documented path the router serves exactly the
/// documented methods (its 405's `Allow` is built from the registered ones).
#[tokio::test]
async fn openapi_every_documented_operation_is_routed_and_no_other_method_is() {
    let app = spawn_app().await;
    let doc = document(&app).await;

    for (method, path) in operations(&doc) {
        let answer = send(&app, &method, &path).await;
        assert!(
            !is_unrouted(&answer) && answer.status != 405,
            "{method} {path} is documented but not routed: {}",
            answer.text
        );
    }
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        let documented: BTreeSet<String> = METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_uppercase())
            .collect();
        let answer = send(&app, "DELETE", path).await;
        answer.assert_problem(405, "method_not_allowed");
        let allowed: BTreeSet<String> = answer
            .header("allow")
            .expect("Allow")
            .split(", ")
            .map(str::to_owned)
            .collect();
        assert_eq!(allowed, documented, "{path}");
    }
}

fn created_links(op: &Value) -> &Value {
    &op["responses"]["201"]["links"]
}

#[tokio::test]
async fn openapi_lists_each_operations_problem_codes_and_headers() {
    let app = spawn_app().await;
    let doc = document(&app).await;

    assert_eq!(
        documented_codes(&doc, "POST", "/transfers", 409),
        ["insufficient_funds", "idempotency_conflict"]
    );
    assert_eq!(
        documented_codes(&doc, "GET", "/accounts", 422),
        ["validation_failed"]
    );
    assert_eq!(
        documented_codes(&doc, "POST", "/transfers/batch", 503),
        [
            "commit_unknown",
            "database_unavailable",
            "transaction_conflict",
            "timeout"
        ]
    );
    let post = operation(&doc, "POST", "/transfers");
    let key = post["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .expect("Idempotency-Key");
    assert_eq!(key["in"], "header");
    assert_eq!(key["schema"]["pattern"], "^[!-~]{1,255}$");
    let created = &post["responses"]["201"]["headers"];
    for header in [
        "Location",
        "Idempotent-Replayed",
        "X-Request-Id",
        "Consistency-Token",
    ] {
        assert!(created.get(header).is_some(), "201 lacks {header}");
    }
    // Every operation takes a token back (a malformed one is 400); only writes give one.
    for (method, path) in operations(&doc) {
        let op = operation(&doc, &method, &path);
        let token = op["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "Consistency-Token"))
            .unwrap_or_else(|| panic!("{method} {path} takes Consistency-Token"));
        assert_eq!(token["in"], "header");
        assert_eq!(token["schema"]["pattern"], "^[0-9A-F]{1,8}/[0-9A-F]{1,8}$");
        assert!(
            documented_codes(&doc, &method, &path, 400).contains(&"bad_request".to_owned()),
            "{method} {path}: a malformed token is 400 bad_request"
        );
        let gives = op["responses"]
            .as_object()
            .unwrap()
            .iter()
            .any(|(status, r)| {
                status.starts_with('2') && r["headers"].get("Consistency-Token").is_some()
            });
        assert_eq!(
            gives,
            method == "POST",
            "{method} {path}: only writes answer a token"
        );
    }
    // The stateful chain the fuzzer follows: create an account, transfer from it, read it.
    let account_links = &operation(&doc, "POST", "/accounts")["responses"]["201"]["links"];
    assert_eq!(
        account_links["TransferFromAccount"]["requestBody"]["from_account_id"],
        "$response.body#/id"
    );
    assert_eq!(
        created_links(post)["GetTransfer"]["operationId"],
        "get_transfer"
    );
    // Every response of every operation names X-Request-Id, and every 503 Retry-After.
    for (method, path) in operations(&doc) {
        let responses = operation(&doc, &method, &path)["responses"]
            .as_object()
            .expect("responses");
        for (status, response) in responses {
            let headers = &response["headers"];
            assert!(
                headers.get("X-Request-Id").is_some(),
                "{method} {path} {status}"
            );
            let problem = response["content"]
                .get("application/problem+json")
                .is_some();
            if status == "503" && problem {
                assert!(headers.get("Retry-After").is_some(), "{method} {path}");
            }
        }
    }
    // Summaries and descriptions are for readers of the document, not rustdoc.
    assert!(
        !doc.to_string().contains("[`"),
        "rustdoc link syntax in the document"
    );
}

#[tokio::test]
async fn openapi_states_the_bounds_and_refuses_unknown_fields() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let schemas = &doc["components"]["schemas"];

    for name in ["CreateAccount", "TransferRequest", "BatchRequest"] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
    }
    assert_eq!(
        schemas["TransferRequest"]["properties"]["amount"]["minimum"],
        1
    );
    assert_eq!(
        schemas["BatchRequest"]["properties"]["transfers"]["maxItems"],
        100
    );
    for path in ["/accounts", "/transfers"] {
        let limit = operation(&doc, "GET", path)["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .find(|p| p["name"] == "limit")
            .expect("limit");
        assert_eq!(limit["schema"]["minimum"], 1);
        assert_eq!(limit["schema"]["maximum"], 1000);
    }
    for path in ["/accounts/{id}", "/transfers/{id}"] {
        let id = &operation(&doc, "GET", path)["parameters"][0];
        assert_eq!((&id["name"], &id["in"]), (&json!("id"), &json!("path")));
        assert_eq!(id["schema"]["minimum"], 1);
    }
}

/// The answers the service really gives are the ones the document lists.
#[tokio::test]
async fn openapi_real_answers_match_the_document() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let from = app.account_id("from", 100).await;
    let to = app.account_id("to", 0).await;

    let answers = [
        ("POST", "/transfers", app.transfer(from, to, 10).await),
        ("POST", "/transfers", app.transfer(from, to, 1000).await),
        ("POST", "/transfers", app.transfer(from, from, 1).await),
        ("POST", "/transfers", app.transfer(from, 999, 1).await),
        (
            "POST",
            "/transfers",
            app.post_raw("/transfers", None, "{}").await,
        ),
        (
            "POST",
            "/transfers",
            app.post_keyed("/transfers", Some(" "), "{}").await,
        ),
        (
            "POST",
            "/accounts",
            app.post_json("/accounts", &json!({"name": " "})).await,
        ),
        (
            "POST",
            "/accounts",
            app.post_json("/accounts", &json!({"name": "x", "extra": 1}))
                .await,
        ),
        ("GET", "/accounts", app.get("/accounts?limit=0").await),
        ("GET", "/accounts", app.get("/accounts?limit=2").await),
        (
            "GET",
            "/transfers",
            app.get("/transfers?account_id=x").await,
        ),
        ("GET", "/accounts/{id}", app.get("/accounts/abc").await),
        ("GET", "/accounts/{id}", app.get("/accounts/0").await),
        ("GET", "/transfers/{id}", app.get("/transfers/1").await),
    ];

    let statuses: Vec<u16> = answers.iter().map(|(_, _, a)| a.status.as_u16()).collect();
    assert_eq!(
        statuses,
        [201, 409, 422, 404, 415, 400, 422, 400, 422, 200, 400, 400, 404, 200]
    );
    for (method, path, answer) in &answers {
        assert_documented(&doc, method, path, answer);
        // A token the service gives is one the document announces, and a write's 2xx has one.
        let documented = operation(&doc, method, path)["responses"][answer.status.as_str()]
            ["headers"]
            .get("Consistency-Token")
            .is_some();
        assert_eq!(
            answer.header("consistency-token").is_some(),
            documented,
            "{method} {path} {}",
            answer.status
        );
    }
}
