//! Database errors are answered by their SQLSTATE (contract section 1), never by the
//! server's message, whose text follows its `lc_messages`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::spawn_app;

/// Each SQLSTATE, raised under the message 'zz', gets the contract's status and code; every
/// 503 carries `Retry-After`, the 500 does not, and no body repeats the server's message.
#[tokio::test]
async fn each_sqlstate_gets_its_contract_code_whatever_the_message() {
    let app = spawn_app().await;
    let expected = [
        ("40001", 503, "transaction_conflict"),
        ("40P01", 503, "transaction_conflict"),
        ("57014", 503, "timeout"),
        ("55P03", 503, "timeout"),
        ("57P01", 503, "database_unavailable"),
        ("57P02", 503, "database_unavailable"),
        ("57P03", 503, "database_unavailable"),
        ("08000", 503, "database_unavailable"),
        ("08003", 503, "database_unavailable"),
        ("08006", 503, "database_unavailable"),
        ("25006", 503, "database_unavailable"),
        ("22012", 500, "internal"),
    ];
    for (sqlstate, status, code) in expected {
        let answer = app
            .post_json(&format!("/_test/raise?code={sqlstate}"), &json!({}))
            .await;
        assert_eq!(
            answer.body["code"], code,
            "SQLSTATE {sqlstate}: {}",
            answer.text
        );
        answer.assert_problem(status, code);
        if status == 503 {
            assert_eq!(
                answer.header("retry-after"),
                Some("1"),
                "SQLSTATE {sqlstate}"
            );
        } else {
            assert_eq!(answer.header("retry-after"), None, "SQLSTATE {sqlstate}");
        }
        assert!(
            !answer.text.contains("zz"),
            "SQLSTATE {sqlstate}: {}",
            answer.text
        );
    }
}

/// The test route raises only allow-listed codes; anything else never reaches SQL.
#[tokio::test]
async fn the_raise_route_refuses_a_code_outside_its_allow_list() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/raise?code=40P01'%3B--", &json!({}))
        .await;
    answer.assert_problem(400, "bad_request");
}

/// A real lock timeout (55P03): the row is locked by another connection, the request sets
/// `lock_timeout` to 100 ms for its transaction and waits for the row: 503 `timeout`, from
/// the server, long before the client-side deadline (`DB_POOL_TIMEOUT`, 5 s in tests).
#[tokio::test]
async fn a_lock_wait_past_the_lock_timeout_gets_503_timeout() {
    let app = spawn_app().await;
    let id = app.account_id("locked", 10).await;
    let holder = app.db.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("SELECT id FROM accounts WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .unwrap();

    let started = Instant::now();
    let answer = app
        .post_json(&format!("/_test/lock-account?id={id}"), &json!({}))
        .await;
    let waited = started.elapsed();
    answer.assert_problem(503, "timeout");
    assert_eq!(answer.header("retry-after"), Some("1"));
    // At least the lock timeout (it waited on the lock); the upper bound leaves 2 s of
    // slack for 8 test threads on 2 cores and stays below the 5 s client-side deadline.
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // Once the lock is gone the same route gets the row: the 503 was the lock's.
    holder.batch_execute("ROLLBACK").await.unwrap();
    let answer = app
        .post_json(&format!("/_test/lock-account?id={id}"), &json!({}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}
