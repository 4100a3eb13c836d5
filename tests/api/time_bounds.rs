//! What bounds what (contract section 2, "Time bounds"): `DB_POOL_TIMEOUT` bounds getting
//! a connection, never a handler's statement; a statement is bounded by the statement
//! timeout (plus a client-side margin for a server that went silent), and without one it
//! runs, or waits for a lock, as long as the server lets it; the session's own statements
//! (COMMIT, ROLLBACK, the clean-up of an abandoned request) are bounded by the statement
//! deadline, or without a statement timeout by `DB_IDLE_IN_TX_TIMEOUT` plus 1 s, so that
//! they end even on a silent server.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::metrics::Scrape;
use crate::support::pgwire::CommitFault;
use crate::support::proxy::Mode;
use crate::support::{
    eventually, spawn_app, spawn_app_with, spawn_behind_readable_proxy, within, TestApp, TestDb,
    SLACK,
};

/// Pool of one, overflow 0, `DB_POOL_TIMEOUT=1`, no statement timeout: a transfer waits
/// 3 s for a row lock held outside the service and then commits (201), while a second
/// request, which cannot get the only connection, gets 503 `database_unavailable` after
/// about the pool timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_outlasts_the_pool_timeout_which_bounds_only_check_outs() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "1"),
        ("DB_STATEMENT_TIMEOUT", "0"),
    ])
    .await;
    let from = app.create_account("lock-from", 100).await["id"]
        .as_i64()
        .unwrap();
    let to = app.create_account("lock-to", 0).await["id"]
        .as_i64()
        .unwrap();

    let locker = app.db.client().await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", &[&to])
        .await
        .unwrap();
    let locked = Instant::now();

    let transfer = {
        let request = app
            .client
            .post(app.url("/transfers"))
            .json(&json!({ "from_account_id": from, "to_account_id": to, "amount": 10 }));
        tokio::spawn(request.send())
    };
    let observer = app.db.client().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'ledger' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            waiting == 1
        })
        .await,
        "the transfer waits for the row lock"
    );

    let asked = Instant::now();
    let second = app.get(&format!("/accounts/{from}")).await;
    let waited = asked.elapsed();
    second.assert_problem(503, "database_unavailable");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(1) + SLACK,
        "the check-out gave up after the pool timeout: {waited:?}"
    );

    // The lock is held for 3 s in all: three times the pool timeout.
    tokio::time::sleep_until((locked + Duration::from_secs(3)).into()).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let answer = within(Duration::from_secs(10), "the transfer", transfer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 201);
    assert!(locked.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        app.db
            .scalar(&format!("SELECT balance FROM accounts WHERE id = {to}"))
            .await,
        10
    );
}

/// Without a statement timeout a ROLLBACK is bounded by `DB_IDLE_IN_TX_TIMEOUT` plus 1 s
/// (the server gives up on a quiet client's transaction after as long), not by the pool
/// timeout: against a server that goes silent at the ROLLBACK, the handler's 409 still
/// reaches the client within that bound, and the connection is closed (the server rolls
/// back when it sees the socket close), never pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_statement_timeout_a_rollback_on_a_silent_server_ends_within_the_idle_timeout() {
    let (app, proxy) = spawn_behind_readable_proxy(
        TestDb::migrated().await,
        &[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "0.2"),
            ("DB_STATEMENT_TIMEOUT", "0"),
            ("DB_IDLE_IN_TX_TIMEOUT", "1000"),
        ],
    )
    .await;
    let before = Scrape::take(&app).await;
    proxy.on_next_query("ROLLBACK", CommitFault::SwallowThenSilence);
    let started = Instant::now();
    let answer = within(
        Duration::from_secs(10),
        "the 409",
        app.post_json("/_test/write-then-4xx?name=silent-rollback", &json!({})),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        proxy.commit_fault_used(),
        "the ROLLBACK met the silent server"
    );
    assert_eq!(answer.status, 409);
    // The ROLLBACK's 2 s (1 s idle timeout plus 1 s), not the pool timeout's 0.2 s.
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(2) + SLACK,
        "ROLLBACK was bounded by the idle timeout plus 1 s: {waited:?}"
    );
    assert_eq!(
        app.pool.status().size,
        0,
        "the connection was closed, not pooled"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(
        after.get(r#"db_pool_connections_closed_total{reason="broken"}"#)
            - before.get(r#"db_pool_connections_closed_total{reason="broken"}"#),
        1.0
    );
    proxy.set_mode(Mode::Pass);
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.db.accounts_named("silent-rollback").await == 0
                && app.db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await,
        "the server rolled the write back"
    );
}

/// With a statement timeout, a statement the server does not end (here its own timeout is
/// switched off for the transaction, as behind a pooler that drops it) is cut off by the
/// client-side deadline, the statement timeout plus 1 s, and not by `DB_POOL_TIMEOUT`
/// (shorter here): 503 `timeout`, nothing committed, the server asked to cancel it.
#[tokio::test]
async fn a_statement_the_server_does_not_end_is_cut_off_at_the_statement_timeout_plus_margin() {
    let app = spawn_app_with(&[
        ("DB_POOL_TIMEOUT", "0.5"),
        ("DB_STATEMENT_TIMEOUT", "1000"),
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
    ])
    .await;
    assert_cut_off_at_2_s(
        &app,
        "/_test/write-then-pg-sleep?name=unended&ms=8000&no_server_timeout=true",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.db.sessions("ledger", Some("active")).await == 0
        })
        .await,
        "the abandoned statement stopped running on the server"
    );
    // The connection was closed, not pooled: the pool of one serves at once.
    app.create_account("after-deadline", 1).await;
    assert_eq!(app.db.accounts_named("unended").await, 0);
}

/// A statement that a handler abandons (its own timeout around it) is cancelled on the
/// server when the session closes the connection, like one cut off by the deadline: no
/// backend keeps running it, or holding its locks, a second later.
#[tokio::test]
async fn a_statement_abandoned_by_its_handler_is_cancelled_on_the_server() {
    let app = spawn_app().await;
    let answer = app
        .post_json(
            "/_test/abandoned-statement?name=abandon-cancel&ms=20000",
            &json!({}),
        )
        .await;
    answer.assert_problem(500, "internal");
    let answered = Instant::now();
    let observer = app.db.client().await;
    assert!(
        eventually(Duration::from_secs(1) + SLACK, || async {
            let running: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'ledger' AND query LIKE '%pg_sleep%' \
                     AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            running == 0
        })
        .await,
        "the abandoned statement still runs {:?} after the answer",
        answered.elapsed()
    );
    assert_eq!(app.db.accounts_named("abandon-cancel").await, 0);
}

/// A result whose rows keep streaming is one statement in flight until its last row: a
/// server that stalls mid-result (here it makes a 10 kB row every 500 ms, with its own
/// statement timeout off) cannot hold the request past the statement deadline, although
/// the statement started answering at once.
#[tokio::test]
async fn rows_still_streaming_are_bounded_by_the_statement_deadline() {
    let app = spawn_app_with(&[("DB_STATEMENT_TIMEOUT", "1000")]).await;
    // Control: a short result is read in full.
    let control = app
        .post_json(
            "/_test/slow-rows?name=-&rows=2&ms=100&no_server_timeout=true",
            &json!({}),
        )
        .await;
    assert_eq!(control.status, 200, "{}", control.text);
    assert_eq!(control.body["rows"], 2);

    // Not after the 6 s the rows take.
    assert_cut_off_at_2_s(
        &app,
        "/_test/slow-rows?name=-&rows=12&ms=500&no_server_timeout=true",
    )
    .await;
}

/// POSTs to `path` and asserts the answer: 503 `timeout` at the client-side statement
/// deadline of `DB_STATEMENT_TIMEOUT=1000` (1 s, plus the 1 s margin).
async fn assert_cut_off_at_2_s(app: &TestApp, path: &str) {
    let started = Instant::now();
    let answer = app.post_json(path, &json!({})).await;
    let waited = started.elapsed();
    answer.assert_problem(503, "timeout");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(2) + SLACK,
        "cut off at the statement deadline: {waited:?}"
    );
}
