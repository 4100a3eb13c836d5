use std::time::Instant;

use serde_json::json;

use crate::support::{spawn_app, SLOW_COMMIT};

#[tokio::test]
async fn created_account_is_committed_before_the_client_sees_201() {
    let app = spawn_app().await;

    let answer = app
        .post_json(
            "/accounts",
            &json!({ "name": "  Alice  ", "balance": 1000 }),
        )
        .await;

    assert_eq!(answer.status, 201, "{}", answer.text);
    let id = answer.body["id"].as_i64().expect("id");
    assert_eq!(
        answer.header("location"),
        Some(format!("/accounts/{id}").as_str())
    );
    assert_eq!(answer.body["name"], "Alice", "the name is trimmed");
    assert_eq!(answer.body["balance"], 1000);
    assert!(answer.body["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(app.db.accounts_named("Alice").await, 1);
}

/// A read after the answer would also pass for a COMMIT sent just after the response. Here
/// the COMMIT itself is slow (a deferred trigger sleeps in it), so only a service that
/// waits for it before answering can pass: the row is visible to another connection the
/// moment the 201's headers arrive, and the request took at least as long as the COMMIT.
#[tokio::test]
async fn a_slow_commit_finishes_before_the_201_is_sent() {
    let app = spawn_app().await;
    app.db.slow_commits("accounts").await;
    // Connected and prepared beforehand: nothing but one round trip follows the answer.
    let observer = app.db.client().await;
    let count = observer
        .prepare("SELECT count(*) FROM accounts WHERE name = $1")
        .await
        .expect("prepare");

    let started = Instant::now();
    let response = app
        .client
        .post(app.url("/accounts"))
        .json(&json!({ "name": "slow-commit", "balance": 7 }))
        .send()
        .await
        .expect("POST");
    let visible: i64 = observer
        .query_one(&count, &[&"slow-commit"])
        .await
        .expect("count")
        .get(0);
    let took = started.elapsed();

    assert_eq!(response.status(), 201);
    assert_eq!(visible, 1, "the row was committed when the 201 arrived");
    assert!(
        took >= SLOW_COMMIT,
        "the 201 waited for the COMMIT: {took:?}"
    );
}

#[tokio::test]
async fn balance_defaults_to_zero() {
    let app = spawn_app().await;
    let account = app.create_account("Bob", 0).await;
    let answer = app
        .post_json("/accounts", &json!({ "name": "Carol" }))
        .await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.body["balance"], 0);
    assert_eq!(account["balance"], 0);
}

#[tokio::test]
async fn get_returns_the_account_and_404_for_unknown_ids() {
    let app = spawn_app().await;
    let account = app.create_account("Dave", 5).await;
    let id = account["id"].as_i64().expect("id");

    let answer = app.get(&format!("/accounts/{id}")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, account);

    for missing in [id + 1000, 0, -3] {
        app.get(&format!("/accounts/{missing}"))
            .await
            .assert_problem(404, "not_found");
    }
    app.get("/accounts/abc")
        .await
        .assert_problem(400, "bad_request");
    app.get("/accounts/99999999999999999999")
        .await
        .assert_problem(400, "bad_request");
}

#[tokio::test]
async fn list_pages_with_keyset_pagination() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.account_id(&format!("acc-{i}"), i).await);
    }

    let first = app.get("/accounts?limit=2").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.item_ids(), ids[..2]);
    assert_eq!(first.body["next_after_id"], ids[1]);

    let second = app
        .get(&format!("/accounts?limit=2&after_id={}", ids[1]))
        .await;
    assert_eq!(second.item_ids(), ids[2..4]);

    let last = app
        .get(&format!("/accounts?limit=2&after_id={}", ids[3]))
        .await;
    assert_eq!(last.body["items"].as_array().expect("items").len(), 1);
    assert_eq!(
        last.body["next_after_id"],
        serde_json::Value::Null,
        "a short page ends the list"
    );

    let all = app.get("/accounts").await;
    assert_eq!(
        all.body["items"].as_array().expect("items").len(),
        5,
        "default limit is 50"
    );
    assert_eq!(all.body["next_after_id"], serde_json::Value::Null);

    // A full page points further even when the next page is empty.
    let exact = app.get("/accounts?limit=5").await;
    assert_eq!(exact.body["next_after_id"], ids[4]);
    let empty = app
        .get(&format!("/accounts?limit=5&after_id={}", ids[4]))
        .await;
    assert_eq!(empty.body["items"], json!([]));
    assert_eq!(empty.body["next_after_id"], serde_json::Value::Null);
}

#[tokio::test]
async fn list_rejects_out_of_range_limits() {
    let app = spawn_app().await;
    for limit in ["0", "1001", "-1"] {
        let answer = app.get(&format!("/accounts?limit={limit}")).await;
        answer.assert_problem(422, "validation_failed");
        assert_eq!(answer.body["errors"][0]["field"], "limit");
    }
    app.get("/accounts?limit=ten")
        .await
        .assert_problem(400, "bad_request");
    app.get("/accounts?after_id=1.5")
        .await
        .assert_problem(400, "bad_request");
    assert_eq!(app.get("/accounts?limit=1000").await.status, 200);
}
