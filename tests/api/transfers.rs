//! `/transfers` (contract section 4): every endpoint's success path and every error code,
//! each error proven to leave the database exactly as it was.

use std::time::Instant;

use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, Answer, TestApp, SLOW_COMMIT};

/// Asserts the problem and that the ledger did not change.
async fn assert_rejected(
    app: &TestApp,
    answer: &Answer,
    status: u16,
    code: &str,
    before: &crate::support::LedgerState,
) {
    answer.assert_problem(status, code);
    assert_eq!(
        &app.db.ledger_state().await,
        before,
        "a {status} changed the database: {}",
        answer.text
    );
}

#[tokio::test]
async fn a_transfer_moves_money_and_is_committed_before_the_201() {
    let app = spawn_app().await;
    let alice = app.account_id("alice", 1000).await;
    let bob = app.account_id("bob", 5).await;

    let answer = app.transfer(alice, bob, 250).await;

    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let id = answer.body["id"].as_i64().expect("id");
    assert_eq!(
        answer.header("location"),
        Some(format!("/transfers/{id}").as_str())
    );
    assert_eq!(answer.body["from_account_id"], alice);
    assert_eq!(answer.body["to_account_id"], bob);
    assert_eq!(answer.body["amount"], 250);
    assert!(answer.body["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(answer.body.as_object().expect("object").len(), 5);
    assert!(answer.header("idempotent-replayed").is_none());
    let state = app.db.ledger_state().await;
    assert_eq!(state.balances, vec![(alice, 750), (bob, 255)]);
    assert_eq!(state.transfers, 1);
    assert_eq!(state.idempotency_keys, 0, "no key, no key row");

    let fetched = app.get(&format!("/transfers/{id}")).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, answer.body);
    // The whole balance may move.
    assert_eq!(app.transfer(alice, bob, 750).await.status, 201);
    assert_eq!(
        app.db.ledger_state().await.balances,
        vec![(alice, 0), (bob, 1005)]
    );
}

/// As for accounts: with a COMMIT made slow on purpose (a deferred trigger on `transfers`
/// sleeps in it), the transfer and both balances are visible to another connection the
/// moment the 201's headers arrive, and the request took at least as long as the COMMIT.
#[tokio::test]
async fn a_slow_commit_finishes_before_the_transfer_gets_its_201() {
    let app = spawn_app().await;
    let alice = app.account_id("alice", 1000).await;
    let bob = app.account_id("bob", 5).await;
    app.db.slow_commits("transfers").await;
    // Connected and prepared beforehand: nothing but one round trip follows the answer.
    let observer = app.db.client().await;
    let state = observer
        .prepare(
            "SELECT (SELECT count(*) FROM transfers), \
                    (SELECT balance FROM accounts WHERE id = $1), \
                    (SELECT balance FROM accounts WHERE id = $2)",
        )
        .await
        .expect("prepare");

    let started = Instant::now();
    let response = app
        .client
        .post(app.url("/transfers"))
        .json(&json!({ "from_account_id": alice, "to_account_id": bob, "amount": 250 }))
        .send()
        .await
        .expect("POST");
    let row = observer
        .query_one(&state, &[&alice, &bob])
        .await
        .expect("state");
    let took = started.elapsed();

    assert_eq!(response.status(), 201);
    let seen: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        seen,
        (1, 750, 255),
        "the transfer was committed when the 201 arrived"
    );
    assert!(
        took >= SLOW_COMMIT,
        "the 201 waited for the COMMIT: {took:?}"
    );
}

#[tokio::test]
async fn unknown_accounts_get_404_and_change_nothing() {
    let app = spawn_app().await;
    let alice = app.account_id("alice", 1000).await;
    let bob = app.account_id("bob", 0).await;
    let before = app.db.ledger_state().await;
    for (from, to) in [
        (alice, bob + 100),
        (bob + 100, alice),
        (0, alice),
        (alice, 0),
        (-1, bob),
        (alice, i64::MIN),
    ] {
        let answer = app.transfer(from, to, 10).await;
        assert_rejected(&app, &answer, 404, "not_found", &before).await;
        assert!(
            answer.body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("account")),
            "{}",
            answer.text
        );
    }
}

#[tokio::test]
async fn insufficient_funds_get_409_with_the_numbers_and_change_nothing() {
    let app = spawn_app().await;
    let poor = app.account_id("poor", 100).await;
    let rich = app.account_id("rich", 10_000).await;
    let before = app.db.ledger_state().await;

    let answer = app.transfer(poor, rich, 250).await;

    assert_rejected(&app, &answer, 409, "insufficient_funds", &before).await;
    assert_eq!(
        answer.body["detail"],
        format!("account {poor} has 100, transfer needs 250")
    );
    let answer = app.transfer(poor, rich, 101).await;
    assert_rejected(&app, &answer, 409, "insufficient_funds", &before).await;
}

#[tokio::test]
async fn invalid_transfers_get_422_naming_the_fields_and_change_nothing() {
    let app = spawn_app().await;
    let alice = app.account_id("alice", 1000).await;
    let bob = app.account_id("bob", 0).await;
    let before = app.db.ledger_state().await;
    for (from, to, amount, fields) in [
        (alice, bob, 0, vec!["amount"]),
        (alice, bob, -5, vec!["amount"]),
        (alice, bob, i64::MIN, vec!["amount"]),
        (alice, alice, 10, vec!["to_account_id"]),
        (bob, bob, 0, vec!["amount", "to_account_id"]),
        // The rule comes before the lookup: an invalid transfer between unknown accounts.
        (999, 999, 10, vec!["to_account_id"]),
    ] {
        let answer = app.transfer(from, to, amount).await;
        assert_rejected(&app, &answer, 422, "validation_failed", &before).await;
        let named: Vec<&str> = answer.body["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .map(|e| e["field"].as_str().expect("field"))
            .collect();
        assert_eq!(named, fields, "{}", answer.text);
        assert!(answer.body["errors"][0]["message"].is_string());
    }
}

#[tokio::test]
async fn a_credit_that_would_overflow_the_balance_gets_422_and_never_wraps() {
    let app = spawn_app().await;
    let full = app.account_id("full", i64::MAX - 10).await;
    let payer = app.account_id("payer", 100).await;
    let before = app.db.ledger_state().await;

    let answer = app.transfer(payer, full, 11).await;

    assert_rejected(&app, &answer, 422, "validation_failed", &before).await;
    assert_eq!(answer.body["errors"][0]["field"], "amount");
    // Up to the very last unit is fine.
    assert_eq!(app.transfer(payer, full, 10).await.status, 201);
    assert_eq!(
        app.db.ledger_state().await.balances,
        vec![(full, i64::MAX), (payer, 90)]
    );
}

#[tokio::test]
async fn malformed_transfer_requests_get_400_413_415_and_change_nothing() {
    let app = spawn_app_with(&[("HTTP_BODY_LIMIT", "2048")]).await;
    let alice = app.account_id("alice", 1000).await;
    let bob = app.account_id("bob", 0).await;
    let before = app.db.ledger_state().await;
    let valid = json!({ "from_account_id": alice, "to_account_id": bob, "amount": 1 });

    for body in [
        "{".to_owned(),
        "null".to_owned(),
        "[]".to_owned(),
        format!(r#"{{"from_account_id": {alice}, "to_account_id": {bob}}}"#),
        format!(r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": "5"}}"#),
        format!(r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": 1.5}}"#),
        format!(r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": null}}"#),
        format!(
            r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": 9223372036854775808}}"#
        ),
        format!(
            r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": -9223372036854775809}}"#
        ),
        format!(r#"{{"from_account_id": "{alice}", "to_account_id": {bob}, "amount": 1}}"#),
        format!(
            r#"{{"from_account_id": {alice}, "to_account_id": {bob}, "amount": 1, "memo": "x"}}"#
        ),
    ] {
        let answer = app
            .post_raw("/transfers", Some("application/json"), body.clone())
            .await;
        assert_rejected(&app, &answer, 400, "bad_request", &before).await;
        let batch = format!(r#"{{"transfers": [{body}]}}"#);
        let answer = app
            .post_raw("/transfers/batch", Some("application/json"), batch)
            .await;
        assert_rejected(&app, &answer, 400, "bad_request", &before).await;
    }
    for path in ["/transfers", "/transfers/batch"] {
        let body = if path == "/transfers" {
            valid.to_string()
        } else {
            json!({ "transfers": [valid] }).to_string()
        };
        for content_type in [None, Some("text/plain")] {
            let answer = app.post_raw(path, content_type, body.clone()).await;
            assert_rejected(&app, &answer, 415, "unsupported_media_type", &before).await;
        }
        let huge = format!(r#"{{"pad": "{}"}}"#, "x".repeat(4096));
        let answer = app.post_raw(path, Some("application/json"), huge).await;
        assert_rejected(&app, &answer, 413, "payload_too_large", &before).await;
    }
    for body in [
        r#"{"items": []}"#,
        r#"{"transfers": {}}"#,
        r#"{"transfers": [], "extra": 1}"#,
    ] {
        let answer = app
            .post_raw("/transfers/batch", Some("application/json"), body)
            .await;
        assert_rejected(&app, &answer, 400, "bad_request", &before).await;
    }
}

#[tokio::test]
async fn transfer_paths_answer_404_405_and_400_as_the_contract_says() {
    let app = spawn_app().await;
    let alice = app.account_id("alice", 10).await;
    let bob = app.account_id("bob", 0).await;
    let id = app.transfer(alice, bob, 1).await.body["id"]
        .as_i64()
        .expect("id");
    let before = app.db.ledger_state().await;

    for missing in [id + 1000, 0, -1] {
        let answer = app.get(&format!("/transfers/{missing}")).await;
        assert_rejected(&app, &answer, 404, "not_found", &before).await;
    }
    for bad in ["abc", "1.5", "99999999999999999999"] {
        let answer = app.get(&format!("/transfers/{bad}")).await;
        assert_rejected(&app, &answer, 400, "bad_request", &before).await;
    }
    for (method, path, allow) in [
        (
            reqwest::Method::DELETE,
            "/transfers".to_owned(),
            "GET, POST",
        ),
        (reqwest::Method::GET, "/transfers/batch".to_owned(), "POST"),
        (reqwest::Method::PUT, "/transfers/batch".to_owned(), "POST"),
        (reqwest::Method::POST, format!("/transfers/{id}"), "GET"),
        (reqwest::Method::DELETE, format!("/transfers/{id}"), "GET"),
    ] {
        let answer = Answer::from(
            app.client
                .request(method.clone(), app.url(&path))
                .send()
                .await
                .expect("request"),
        )
        .await;
        assert_rejected(&app, &answer, 405, "method_not_allowed", &before).await;
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
    }
    let answer = app.get("/transfers/1/extra").await;
    assert_rejected(&app, &answer, 404, "not_found", &before).await;
}

#[tokio::test]
async fn a_batch_applies_its_items_in_order_in_one_transaction() {
    let app = spawn_app().await;
    let a = app.account_id("a", 100).await;
    let b = app.account_id("b", 0).await;
    let c = app.account_id("c", 0).await;
    let items = json!([
        { "from_account_id": a, "to_account_id": b, "amount": 100 },
        // Spends what the first item brought in.
        { "from_account_id": b, "to_account_id": c, "amount": 70 },
        { "from_account_id": c, "to_account_id": a, "amount": 20 },
    ]);

    let answer = app
        .post_json("/transfers/batch", &json!({ "transfers": items }))
        .await;

    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("location").is_none());
    let got = answer.body["items"].as_array().expect("items");
    assert_eq!(got.len(), 3);
    for (item, sent) in got.iter().zip(items.as_array().expect("sent")) {
        for field in ["from_account_id", "to_account_id", "amount"] {
            assert_eq!(item[field], sent[field], "items come back in request order");
        }
    }
    let returned = answer.item_ids();
    assert!(returned.windows(2).all(|w| w[0] < w[1]), "{returned:?}");
    let state = app.db.ledger_state().await;
    assert_eq!(state.balances, vec![(a, 20), (b, 30), (c, 50)]);
    assert_eq!(state.transfers, 3);
    for (id, item) in returned.iter().zip(got) {
        assert_eq!(&app.get(&format!("/transfers/{id}")).await.body, item);
    }
}

#[tokio::test]
async fn a_batch_whose_third_item_fails_applies_nothing_and_names_index_2() {
    let app = spawn_app().await;
    let a = app.account_id("a", 100).await;
    let b = app.account_id("b", 0).await;
    let full = app.account_id("full", i64::MAX).await;
    let before = app.db.ledger_state().await;
    let ok = |from: i64, to: i64, amount: i64| json!({ "from_account_id": from, "to_account_id": to, "amount": amount });
    for (third, status, code) in [
        // Only 40 left after the first two items.
        (ok(a, b, 41), 409, "insufficient_funds"),
        (ok(a, b + 1000, 1), 404, "not_found"),
        (ok(a, 0, 1), 404, "not_found"),
        (ok(a, b, 0), 422, "validation_failed"),
        (ok(b, b, 1), 422, "validation_failed"),
        (ok(b, full, 1), 422, "validation_failed"),
        (
            json!({ "from_account_id": a, "to_account_id": b }),
            400,
            "bad_request",
        ),
        (
            json!({ "from_account_id": a, "to_account_id": b, "amount": 1, "x": 1 }),
            400,
            "bad_request",
        ),
        (json!("not an object"), 400, "bad_request"),
    ] {
        let body = json!({ "transfers": [ok(a, b, 50), ok(a, b, 10), third, ok(a, b, 1)] });

        let answer = app.post_json("/transfers/batch", &body).await;

        assert_rejected(&app, &answer, status, code, &before).await;
        assert_eq!(answer.body["index"], 2, "{}", answer.text);
    }
    // The first failing item decides, even when a later one is also invalid.
    let body = json!({ "transfers": [ok(a, b, 50), ok(a, b, 60), ok(a, a, 0)] });
    let answer = app.post_json("/transfers/batch", &body).await;
    assert_rejected(&app, &answer, 409, "insufficient_funds", &before).await;
    assert_eq!(answer.body["index"], 1);
    let body = json!({ "transfers": [ok(a, a, 1), ok(a, b, 1000)] });
    let answer = app.post_json("/transfers/batch", &body).await;
    assert_rejected(&app, &answer, 422, "validation_failed", &before).await;
    assert_eq!(answer.body["index"], 0);
    assert_eq!(answer.body["errors"][0]["field"], "to_account_id");
}

#[tokio::test]
async fn a_batch_holds_1_to_100_items() {
    let app = spawn_app_with(&[("HTTP_BODY_LIMIT", "1000000")]).await;
    let a = app.account_id("a", 1000).await;
    let b = app.account_id("b", 0).await;
    let item = json!({ "from_account_id": a, "to_account_id": b, "amount": 1 });
    let before = app.db.ledger_state().await;
    for n in [0, 101, 1000] {
        let body = json!({ "transfers": vec![item.clone(); n] });
        let answer = app.post_json("/transfers/batch", &body).await;
        assert_rejected(&app, &answer, 422, "validation_failed", &before).await;
        assert_eq!(answer.body["errors"][0]["field"], "transfers");
        assert!(answer.body.get("index").is_none());
    }
    for n in [1, 100] {
        let body = json!({ "transfers": vec![item.clone(); n] });
        let answer = app.post_json("/transfers/batch", &body).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.item_ids().len(), n);
    }
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 101);
    assert_eq!(state.balances, vec![(a, 899), (b, 101)]);
}

#[tokio::test]
async fn list_pages_by_id_and_filters_by_either_side() {
    let app = spawn_app().await;
    let a = app.account_id("a", 1000).await;
    let b = app.account_id("b", 1000).await;
    let c = app.account_id("c", 1000).await;
    let mut all = Vec::new();
    let mut with_a = Vec::new();
    for (from, to) in [(a, b), (b, c), (c, a), (b, c), (a, c), (c, b), (b, a)] {
        let id = app.transfer(from, to, 1).await.body["id"]
            .as_i64()
            .expect("id");
        all.push(id);
        if from == a || to == a {
            with_a.push(id);
        }
    }

    let page = app.get("/transfers").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.item_ids(), all, "default limit 50, by id");
    assert_eq!(page.body["next_after_id"], Value::Null);

    // Walk the filtered list two at a time.
    let mut seen: Vec<i64> = Vec::new();
    let mut after = 0;
    loop {
        let page = app
            .get(&format!(
                "/transfers?account_id={a}&limit=2&after_id={after}"
            ))
            .await;
        assert_eq!(page.status, 200, "{}", page.text);
        let got = page.item_ids();
        seen.extend(&got);
        match page.body["next_after_id"].as_i64() {
            Some(next) => {
                assert_eq!(got.len(), 2, "only full pages point further");
                assert_eq!(Some(&next), got.last());
                after = next;
            }
            None => break,
        }
    }
    assert_eq!(seen, with_a);
    for t in app.get(&format!("/transfers?account_id={a}")).await.body["items"]
        .as_array()
        .expect("items")
    {
        assert!(t["from_account_id"] == a || t["to_account_id"] == a);
    }

    let after_third = app
        .get(&format!("/transfers?limit=2&after_id={}", all[2]))
        .await;
    assert_eq!(after_third.item_ids(), all[3..5]);
    assert_eq!(after_third.body["next_after_id"], all[4]);
    let unknown = app.get("/transfers?account_id=424242").await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.body["items"], json!([]));
    assert_eq!(unknown.body["next_after_id"], Value::Null);
}

#[tokio::test]
async fn list_rejects_bad_parameters() {
    let app = spawn_app().await;
    for limit in ["0", "1001", "-5"] {
        let answer = app.get(&format!("/transfers?limit={limit}")).await;
        answer.assert_problem(422, "validation_failed");
        assert_eq!(answer.body["errors"][0]["field"], "limit");
    }
    for query in [
        "limit=ten",
        "after_id=1.5",
        "account_id=x",
        "account_id=99999999999999999999",
        "acount_id=1",
    ] {
        app.get(&format!("/transfers?{query}"))
            .await
            .assert_problem(400, "bad_request");
    }
    assert_eq!(app.get("/transfers?limit=1000").await.status, 200);
}
