//! The transaction-per-request guarantee (contract section 2), proven against PostgreSQL.

use std::time::Duration;

use actix_web::test as actix_test;
use serde_json::json;

use crate::metrics::Scrape;
use crate::support::{eventually, spawn_app, spawn_app_with, TestApp, TestDb, SLACK};

/// One pooled connection and no overflow: a replaced connection shows as a new backend.
const POOL_OF_ONE: [(&str, &str); 2] = [("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")];

/// The backend of the only pooled connection (opened by a first write), and the metrics
/// before the request under test.
async fn one_warm_connection(app: &TestApp) -> (Vec<i32>, Scrape) {
    app.create_account("warm", 1).await;
    let pids = app.db.ledger_pids().await;
    assert_eq!(pids.len(), 1, "one pooled connection");
    (pids, Scrape::take(app).await)
}

/// Asserts that the request since `before` ended its transaction with a ROLLBACK that kept
/// the connection: the same backend serves the next request, and no connection was closed
/// or opened. (Skipping the ROLLBACK and closing the connection also leaves no row.)
async fn assert_rolled_back_on_the_same_connection(
    app: &TestApp,
    pids: &[i32],
    before: &Scrape,
    reason: &str,
) {
    app.create_account("after-rollback", 1).await;
    assert_eq!(
        app.db.ledger_pids().await,
        pids,
        "the connection was rolled back and reused, not replaced"
    );
    let after = Scrape::take(app).await;
    let delta = |series: &str| after.get(series) - before.get(series);
    assert_eq!(
        delta(r#"db_pool_connections_closed_total{reason="broken"}"#),
        0.0,
        "no connection was closed"
    );
    assert_eq!(delta("db_pool_connections_created_total"), 0.0);
    assert_eq!(
        delta(&format!(
            r#"db_transactions_total{{outcome="rollback",reason="{reason}"}}"#
        )),
        1.0
    );
}

#[tokio::test]
async fn a_4xx_status_rolls_back_earlier_writes() {
    let app = spawn_app_with(&POOL_OF_ONE).await;
    let (pids, before) = one_warm_connection(&app).await;
    let answer = app
        .post_json("/_test/write-then-4xx?name=r4xx", &json!({}))
        .await;
    assert_eq!(answer.status, 409);
    assert_eq!(app.db.accounts_named("r4xx").await, 0);
    assert_rolled_back_on_the_same_connection(&app, &pids, &before, "status").await;
}

#[tokio::test]
async fn a_handler_error_rolls_back_earlier_writes() {
    let app = spawn_app_with(&POOL_OF_ONE).await;
    let (pids, before) = one_warm_connection(&app).await;
    let answer = app
        .post_json("/_test/write-then-err?name=rerr", &json!({}))
        .await;
    answer.assert_problem(422, "validation_failed");
    assert_eq!(app.db.accounts_named("rerr").await, 0);
    assert_rolled_back_on_the_same_connection(&app, &pids, &before, "error").await;
}

#[tokio::test]
async fn a_panic_rolls_back_answers_500_and_the_server_keeps_serving() {
    let app = spawn_app_with(&POOL_OF_ONE).await;
    let (pids, before) = one_warm_connection(&app).await;
    let answer = app
        .post_json("/_test/write-then-panic?name=rpanic-first", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    assert_eq!(app.db.accounts_named("rpanic-first").await, 0);
    assert_rolled_back_on_the_same_connection(&app, &pids, &before, "panic").await;
    for _ in 0..3 {
        let answer = app
            .post_json("/_test/write-then-panic?name=rpanic", &json!({}))
            .await;
        answer.assert_problem(500, "internal");
        assert!(
            !answer.text.contains("panics after"),
            "no panic text in the body"
        );
    }
    assert_eq!(app.db.accounts_named("rpanic").await, 0);
    // With a pool of one, this only works if every panic gave the connection back clean.
    app.create_account("after-panic", 1).await;
    assert_eq!(
        app.db.sessions("ledger", Some("idle in transaction")).await,
        0
    );
}

#[tokio::test]
async fn a_failing_commit_turns_the_2xx_into_a_5xx() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/commit-fails?name=rcommit", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    assert_eq!(app.db.accounts_named("rcommit").await, 0);
    // The pool still works afterwards.
    app.create_account("after-commit-failure", 1).await;
}

#[tokio::test]
async fn a_swallowed_statement_error_cannot_be_reported_as_success() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/swallowed-error?name=rswallow", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    assert_eq!(app.db.accounts_named("rswallow").await, 0);
}

/// The statement watch stays installed on its connection across check-outs: on a reused
/// connection it must still see a swallowed error (the request is refused), and what it saw
/// then must not leak into the next request on that connection (which commits).
#[tokio::test]
async fn a_reused_connection_still_catches_a_swallowed_error_and_then_commits() {
    let app = spawn_app_with(&[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")]).await;
    app.create_account("rwatch-first", 1).await;
    let pids = app.db.ledger_pids().await;
    let answer = app
        .post_json("/_test/swallowed-error?name=rwatch-swallow", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    app.create_account("rwatch-after", 1).await;
    assert_eq!(
        app.db.ledger_pids().await,
        pids,
        "one connection served all three"
    );
    assert_eq!(app.db.accounts_named("rwatch-after").await, 1);
    assert_eq!(app.db.accounts_named("rwatch-swallow").await, 0);
}

/// A real database error inside a nested unit of work aborts the transaction only up to
/// the savepoint: once it is rolled back, the outer transaction goes on and commits.
#[tokio::test]
async fn a_database_error_inside_a_savepoint_is_recovered_and_the_outer_writes_commit() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/savepoint-db-error?name=rsavedb", &json!({}))
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["nested_failed"], true);
    assert_eq!(app.db.accounts_named("rsavedb").await, 1);
    assert_eq!(app.db.accounts_named("rsavedb-after").await, 1);
    assert_eq!(app.db.accounts_named("rsavedb-inner").await, 0);
}

#[tokio::test]
async fn nested_units_of_work_roll_back_to_their_savepoint_only() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/savepoint?name=rsave", &json!({}))
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["nested_failed"], true);
    assert_eq!(app.db.accounts_named("rsave").await, 1);
    assert_eq!(app.db.accounts_named("rsave-inner").await, 0);
}

#[tokio::test]
async fn a_connection_guard_that_escapes_its_handler_never_commits() {
    let app = spawn_app().await;
    let late_rollback = r#"db_transactions_total{outcome="rollback",reason="cancelled"}"#;
    let before = Scrape::take(&app).await;
    let answer = app
        .post_json("/_test/escaping-guard?name=rescape", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    // The escaped task writes, then drops the guard, which rolls the late work back and
    // gives the connection back.
    assert!(
        eventually(SLACK + Duration::from_secs(1), || async {
            let status = app.pool.status();
            Scrape::take(&app).await.get(late_rollback) - before.get(late_rollback) == 1.0
                && status.available == status.size
        })
        .await,
        "the escaped guard was dropped and its transaction ended"
    );
    assert_eq!(app.db.accounts_named("rescape").await, 0);
    assert_eq!(
        app.db.sessions("ledger", Some("idle in transaction")).await,
        0
    );
    app.create_account("after-escape", 1).await;
}

#[tokio::test]
async fn a_route_without_a_session_checks_out_no_connection() {
    let app = spawn_app().await;
    assert_eq!(app.pool.status().size, 0);
    for path in ["/_test/no-session", "/health/live", "/livez", "/nope"] {
        let answer = app.get(path).await;
        assert!(answer.status.as_u16() < 500, "{path}");
    }
    // Bad input is rejected by the extractors before the session is ever used.
    let answer = app
        .post_raw("/accounts", Some("application/json"), "{")
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(app.pool.status().size, 0, "no pooled connection was opened");
    assert_eq!(app.db.sessions("ledger", None).await, 0);
}

/// Dropping the request future mid-transaction (what a shutdown timeout or a worker
/// restart does) rolls back, and no session stays idle in transaction.
#[actix_rt::test]
async fn a_cancelled_request_rolls_back_and_leaves_no_open_transaction() {
    crate::support::init_logging();
    let db = TestDb::migrated().await;
    let config = crate::support::config_for(&db.name, &Default::default());
    let metrics = actix_web::web::Data::new(ledger::metrics::Metrics::new(&config.db));
    let sessions =
        actix_diesel_session::Database::builder(config.db.url.clone(), config.db.session_config(2))
            .observer(metrics.db().clone())
            .build()
            .expect("pool");
    let pool = sessions.clone();
    // The test thread builds the service: it is the worker whose pool the request uses.
    let health = actix_web::web::Data::new(ledger::health::Health::new(&sessions));
    let state = ledger::app::AppState {
        db: actix_web::web::Data::new(sessions),
        health,
        metrics,
        body_limit: config.http_body_limit,
        idempotency_ttl: config.idempotency_ttl,
        request_id_setting: config.db.request_id_setting,
    };
    let service = actix_test::init_service(ledger::app::app(state)).await;

    let request = actix_test::TestRequest::post()
        .uri("/_test/write-then-sleep?name=rcancel&ms=5000")
        .to_request();
    let mut call = Box::pin(actix_test::call_service(&service, request));
    // Dropped once its write is done and its transaction is open, not after a guess.
    let holding = eventually(SLACK + Duration::from_secs(1), || async {
        db.sessions("ledger", Some("idle in transaction")).await == 1
    });
    tokio::select! {
        _ = &mut call => panic!("the request finished before it could be cancelled"),
        held = holding => assert!(held, "the request wrote and holds its transaction"),
    }
    drop(call);

    // The row was written inside the open transaction; it must never become visible.
    assert!(
        eventually(Duration::from_secs(3), || async {
            db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await,
        "the cancelled transaction was rolled back"
    );
    assert_eq!(db.accounts_named("rcancel").await, 0);
    // The connection went back clean (or was closed): the pool serves again.
    let mut conn = pool.pool_here().get().await.expect("connection");
    use diesel_async::RunQueryDsl;
    diesel::sql_query("SELECT 1")
        .execute(&mut *conn)
        .await
        .expect("usable");
}

/// Actix does not cancel a handler when its client disconnects (actix/actix-web#3462):
/// the handler runs to completion and its transaction commits. A client that gave up cannot
/// know the outcome; the write is durable, and a retry with an Idempotency-Key is safe.
#[tokio::test]
async fn a_client_disconnect_does_not_cancel_the_handler_which_commits() {
    let app = spawn_app().await;
    // The handler holds its transaction long enough for the test to see it and hang up.
    let request = app.post_in_background(&format!(
        "/_test/write-then-sleep?name=rdisconnect&ms={}",
        (SLACK + Duration::from_secs(1)).as_millis()
    ));
    assert!(
        eventually(SLACK, || async {
            app.db.sessions("ledger", Some("idle in transaction")).await == 1
        })
        .await,
        "the handler wrote and holds its transaction"
    );
    assert!(
        !request.is_finished(),
        "the client disconnects before the answer"
    );
    request.abort();
    assert!(request.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(
        app.db.accounts_named("rdisconnect").await,
        0,
        "not committed yet when the client hung up"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.db.accounts_named("rdisconnect").await == 1
        })
        .await,
        "the handler ran to completion and committed"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await
    );
}

/// The server cancels a statement past `DB_STATEMENT_TIMEOUT`: 503 `timeout`, the write
/// before it rolled back, and the same connection serves the next request.
#[tokio::test]
async fn a_statement_past_the_statement_timeout_gets_503_timeout_and_the_connection_is_kept() {
    let app = spawn_app_with(&[
        ("DB_STATEMENT_TIMEOUT", "200"),
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
    ])
    .await;
    app.create_account("warm", 1).await;
    let before = app.db.ledger_pids().await;
    assert_eq!(before.len(), 1);

    let started = std::time::Instant::now();
    let answer = app
        .post_json("/_test/pg-sleep?name=slow&ms=10000", &json!({}))
        .await;
    answer.assert_problem(503, "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(200) + SLACK,
        "{:?}",
        started.elapsed()
    );

    app.create_account("after-timeout", 1).await;
    assert_eq!(
        app.db.ledger_pids().await,
        before,
        "the connection was reused, not replaced"
    );
}

/// A handler that abandons a pending `conn()` (its own timeout) can ask again.
#[tokio::test]
async fn an_abandoned_check_out_leaves_the_session_usable() {
    let app = spawn_app_with(&POOL_OF_ONE).await;
    // Held past the impatient request's 100 ms attempt even when that request is slow to
    // arrive (SLACK), and released before its second attempt meets the 5 s pool timeout.
    let holder = app.post_in_background("/_test/write-then-sleep?name=hold&ms=3000");
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.pool.status().available == 0 && app.pool.status().size == 1
        })
        .await
    );
    let answer = app
        .post_json(
            "/_test/impatient-then-write?name=patient&ms=100",
            &json!({}),
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["gave_up_first"], true);
    assert_eq!(holder.await.unwrap().unwrap().status(), 201);
    assert_eq!(app.db.accounts_named("patient").await, 1);
}

/// A panic inside a nested unit of work leaves a savepoint open: one ROLLBACK would only
/// undo the savepoint, so the connection must be closed, never pooled inside a transaction.
#[tokio::test]
async fn a_panic_inside_a_nested_unit_of_work_never_pools_an_open_transaction() {
    let app = spawn_app_with(&[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")]).await;
    let answer = app
        .post_json("/_test/nested-panic?name=rnpanic", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await,
        "no pooled connection sits inside a transaction"
    );
    assert_eq!(app.db.accounts_named("rnpanic").await, 0);
    assert_eq!(app.db.accounts_named("rnpanic-inner").await, 0);
    // The pool of one still serves.
    app.create_account("after-nested-panic", 1).await;
}

/// A nested unit of work cut short by the handler's own timeout, then a 2xx: COMMIT would
/// only release the savepoint. The client must not get the 2xx, and nothing may commit.
#[tokio::test]
async fn a_nested_unit_of_work_cut_short_cannot_be_acknowledged() {
    let app = spawn_app_with(&[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")]).await;
    let answer = app
        .post_json("/_test/nested-timeout?name=rncut", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    // The savepoint's statement outlives the request on the server: wait until it is over
    // and its transaction ended.
    assert!(
        eventually(SLACK + Duration::from_secs(1), || app.db.ledger_settled()).await,
        "the abandoned statement and its transaction ended"
    );
    assert_eq!(app.db.accounts_named("rncut").await, 0);
    assert_eq!(
        app.db.sessions("ledger", Some("idle in transaction")).await,
        0
    );
    app.create_account("after-nested-cut", 1).await;
}

/// A statement future dropped mid-flight leaves its outcome unknown (here a valid INSERT
/// that the server runs after the handler stopped waiting): no 2xx, nothing committed.
#[tokio::test]
async fn an_abandoned_statement_cannot_be_acknowledged() {
    let app = spawn_app().await;
    let answer = app
        .post_json("/_test/abandoned-statement?name=rabandon", &json!({}))
        .await;
    answer.assert_problem(500, "internal");
    // The INSERT outlives the request on the server: its fate is settled only once it is
    // over and its transaction ended.
    assert!(
        eventually(SLACK + Duration::from_secs(1), || app.db.ledger_settled()).await,
        "the abandoned statement and its transaction ended"
    );
    assert_eq!(app.db.accounts_named("rabandon").await, 0);
    assert_eq!(app.db.accounts_named("late").await, 0);
}
