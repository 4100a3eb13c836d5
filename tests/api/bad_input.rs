//! Every kind of bad input gets its problem+json code and writes nothing.

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

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

    let answer = crate::helpers::Answer::from(
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

    let kept = crate::helpers::Answer::from(
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

    let replaced = crate::helpers::Answer::from(
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
