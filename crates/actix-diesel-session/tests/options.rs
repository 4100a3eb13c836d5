//! What a session middleware's options and a handler's requests change, proved over real
//! HTTP against real PostgreSQL: the isolation level, `READ ONLY` and `DEFERRABLE` of each
//! route's transactions; transaction-local settings (`settings_from`, `set_local`) with
//! row-level security, gone with the transaction; after-commit hooks, run only for a
//! transaction that committed and before the response; a handler's early commit.
//!
//! Each test runs the tests' own small application (`support`) on a database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use actix_diesel_session::{Outcome, Reason};
use reqwest::header::RETRY_AFTER;

use support::{eventually, outcomes, Options, TestApp, RLS_USER, SLACK};

/// A value that breaks SQL spliced in as a literal, in a form a header can carry.
const TRICKY: &str = r#"it's a \ "test"; --"#;

/// The same, and more that only a body can carry.
const TRICKIER: &str = "it's a \\ \"test\"; --\n'); DROP TABLE items; --\t\u{e9} E'\\'' $$";

/// A pool of one connection: every request reuses the connection the previous one gave
/// back.
fn one_connection(c: &mut actix_diesel_session::SessionConfig) {
    c.pool_size = 1;
    c.max_overflow = 0;
}

/// POSTs `body` to `path` with the header `name: value` (none when `None`); the status and
/// the text of the response.
async fn post(
    app: &TestApp,
    path: &str,
    header: Option<(&str, &str)>,
    body: &str,
) -> (u16, String) {
    let mut request = app.client.post(app.url(path)).body(body.to_owned());
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

// ---------------------------------------------------------------------------------------
// Options per route

/// Each route's middleware sets its transactions' options, which the server reports from
/// the transaction's first statement on (they travel in the BEGIN itself), and which do
/// not stick to the connection: on a pool of one, a default route after a serializable
/// read-only one is back to the defaults.
#[actix_web::test]
async fn each_route_runs_its_transactions_with_its_own_isolation_read_only_and_deferrable() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let cases = [
        ("/options/default", "read committed/off/off"),
        ("/options/repeatable-read", "repeatable read/off/off"),
        (
            "/options/serializable-read-only-deferrable",
            "serializable/on/on",
        ),
        ("/options/default", "read committed/off/off"),
        ("/options/repeatable-read", "repeatable read/off/off"),
    ];
    for (path, expected) in cases {
        let (status, body) = post(&app, path, None, "").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body, expected, "{path}");
    }
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("committed/status", cases.len())])
    );
    let sessions = app.session_states().await;
    assert_eq!(sessions, ["idle"], "one connection served them all");
    app.assert_pool_clean_and_serving("after").await;
}

/// A handler that writes on a `read_only()` route and passes the error on: a 5xx, nothing
/// written, a rollback, and the connection back in the pool clean.
#[actix_web::test]
async fn a_write_in_a_read_only_session_fails_and_rolls_back_leaving_the_connection_clean() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let response = app.post("/read-only/items/refused").await;

    assert!(
        response.status().is_server_error(),
        "a server error: {}",
        response.status()
    );
    assert_eq!(app.db.items_named("refused").await, 0, "nothing written");
    assert_eq!(app.tally.outcomes(), outcomes(&[("rolled_back/error", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// A write refused because the session asked to be read-only is a programming error: 500,
/// not the 503 with `Retry-After` that the error's class (25006, a read-only server after
/// a failover) would give, an invitation to retry a request that can never succeed.
#[actix_web::test]
async fn a_write_in_a_read_only_session_is_the_database_error_its_docs_promise() {
    let app = TestApp::spawn().await;
    let response = app.post("/read-only/items/refused").await;

    assert_eq!(response.status(), 500);
    assert!(
        response.headers().get(RETRY_AFTER).is_none(),
        "no invitation to retry"
    );
    assert_eq!(app.db.items_named("refused").await, 0);
}

/// A read on a `read_only()` route commits (its COMMIT goes out alone) and answers 200.
#[actix_web::test]
async fn a_read_in_a_read_only_session_commits_and_answers_200() {
    let app = TestApp::spawn().await;
    assert_eq!(app.post("/items/seen").await.status(), 201);

    let (status, body) = post(&app, "/read-only/count", None, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "1", "the read saw the committed row");
    assert_eq!(app.tally.ended(Outcome::Committed(Reason::Status)), 2);
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 2)]));
    app.assert_pool_clean_and_serving("after").await;
}

// ---------------------------------------------------------------------------------------
// Transaction-local settings

/// The application connects as a role under row-level security. `settings_from` (from the
/// `X-Tenant` header) and `set_local` (before the first `conn()`, or after a first
/// statement) scope what a request sees to its tenant; the setting ends with the
/// transaction, so the next request on the same (only) connection sees nothing.
#[actix_web::test]
async fn settings_from_and_set_local_scope_row_level_security_to_the_requests_tenant() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        user: Some(RLS_USER),
        ..Options::default()
    })
    .await;
    app.db
        .client()
        .await
        .batch_execute(
            "INSERT INTO docs (tenant, body) VALUES ('A', 'a1'), ('B', 'b1'), ('A', 'a2')",
        )
        .await
        .unwrap();

    let tenant = |t| Some(("x-tenant", t));
    for (path, header, expected) in [
        ("/docs/visible", tenant("A"), "A,A"),
        ("/docs/visible", tenant("B"), "B"),
        ("/docs/visible", None, ""),
        ("/docs/visible", tenant("C"), ""),
        ("/docs/as/B/first", None, "B"),
        ("/docs/as/A/late", None, "|A,A"),
        // After both kinds of `set_local`, the same connection, unset.
        ("/docs/visible", None, ""),
    ] {
        let (status, body) = post(&app, path, header, "").await;
        assert_eq!(status, 200, "{path} {header:?}: {body}");
        assert_eq!(body, expected, "{path} {header:?}");
    }
    let (status, leftover) = post(&app, "/setting/app.tenant_id", None, "").await;
    assert_eq!(status, 200);
    assert!(
        leftover.is_empty() || leftover == "<null>",
        "no tenant left on the pooled connection: {leftover:?}"
    );

    // Row-level security did the filtering: the application's role is the unprivileged
    // one, and all three rows are there.
    let users: Vec<String> = app
        .db
        .client()
        .await
        .query(
            "SELECT usename::text FROM pg_stat_activity WHERE application_name = $1",
            &[&app.application_name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(users, [RLS_USER], "one connection, as {RLS_USER}");
    assert_eq!(app.db.scalar("SELECT count(*) FROM docs").await, 3);
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 8)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// Names and values travel as escaped literals (in the BEGIN's message) or bound
/// parameters (after the first statement): quotes, backslashes, a semicolon and a comment
/// come back exactly, and nothing they spell is run.
#[actix_web::test]
async fn a_setting_with_quotes_and_backslashes_round_trips_exactly() {
    let app = TestApp::spawn().await;
    for value in [TRICKY, TRICKIER, ""] {
        for when in ["before", "after"] {
            let path = format!("/set-local/{when}/app.x");
            let (status, body) = post(&app, &path, None, value).await;
            assert_eq!(status, 200, "{path} {value:?}: {body}");
            assert_eq!(body, value, "{path}");
        }
    }
    let (status, body) = post(&app, "/settings-from/app.x", Some(("x-value", TRICKY)), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, TRICKY, "settings_from");

    assert_eq!(app.db.scalar("SELECT count(*) FROM items").await, 0);
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 7)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// `set_local` before the first `conn()` queues the setting for the BEGIN. A first
/// `conn()` that the handler's own timeout cuts off (allowed: the session goes back to
/// idle) leaves the queued settings for the next `conn()`, whose transaction gets them.
/// The same holds for the settings of `settings_from`, and after a check-out that timed
/// out (503) and was retried.
#[actix_web::test]
async fn a_queued_setting_survives_a_first_conn_cut_off_by_the_handlers_own_timeout() {
    let app = TestApp::spawn().await;
    let (status, body) = post(&app, "/set-local/retry/app.x", None, "kept").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "kept");
}

// ---------------------------------------------------------------------------------------
// After-commit hooks

/// Hooks run in the order they were added, once the transaction committed, and before the
/// response goes out: a client that has the response sees what the hooks did, even a hook
/// that took 300 ms. A request that succeeds without a transaction runs its hooks too.
#[actix_web::test]
async fn after_commit_hooks_run_in_order_after_the_commit_and_before_the_response() {
    let app = TestApp::spawn().await;

    let started = Instant::now();
    let response = app.post("/hooked/slow/slow-300").await;
    let events = app.events();
    assert_eq!(response.status(), 201);
    assert_eq!(
        events,
        ["slow:first", "slow:slow"],
        "the hooks had run when the response arrived"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(app.db.items_named("slow").await, 1);

    assert_eq!(app.post("/hooked/ok/ok").await.status(), 201);
    assert_eq!(app.post("/hooked/none/no-write").await.status(), 200);
    assert_eq!(
        app.events(),
        ["slow:first", "slow:slow", "ok:1", "ok:2", "none:1"]
    );
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 2)]));
}

/// A 4xx, a handler's error, a panic and a COMMIT refused by a deferred constraint roll
/// back, and their hooks never run; a request without a transaction that answers 4xx
/// drops its hooks too. A request that commits, last, shows the hooks work.
#[actix_web::test]
async fn after_commit_hooks_never_run_for_a_request_that_did_not_commit() {
    let app = TestApp::spawn().await;
    for (path, status) in [
        ("/hooked/a/409", 409),
        ("/hooked/b/error", 503),
        ("/hooked/c/panic", 500),
        ("/hooked/d/failing-commit", 500),
        ("/hooked/e/no-write-409", 409),
    ] {
        assert_eq!(app.post(path).await.status(), status, "{path}");
        assert_eq!(app.events(), Vec::<String>::new(), "{path}: no hook ran");
    }
    assert_eq!(
        app.db.scalar("SELECT count(*) FROM items").await,
        0,
        "nothing written"
    );
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[
            ("rolled_back/status", 1),
            ("rolled_back/error", 1),
            ("rolled_back/panic", 1),
            ("rolled_back/commit_failed", 1),
        ])
    );

    assert_eq!(app.post("/hooked/f/ok").await.status(), 201);
    assert_eq!(app.events(), ["f:1", "f:2"]);
    app.assert_pool_clean_and_serving("after").await;
}

/// A hook that returns an error or panics is logged; the response stays the handler's
/// 201, the write stays committed, and the next hook still runs.
#[actix_web::test]
async fn a_failing_or_panicking_hook_leaves_the_response_alone_and_the_next_hook_runs() {
    let app = TestApp::spawn().await;
    for name in ["hook-error", "hook-panic"] {
        let (status, body) = post(&app, &format!("/hooked/{name}/{name}"), None, "").await;
        assert_eq!(status, 201, "{name}");
        assert_eq!(body, name, "the handler's own answer");
        assert_eq!(app.db.items_named(name).await, 1, "{name}: committed");
    }
    assert_eq!(
        app.events(),
        [
            "hook-error:1",
            "hook-error:2",
            "hook-panic:1",
            "hook-panic:2"
        ]
    );
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 2)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// Hooks that run past `after_commit_timeout` (200 ms) are cut off: the response arrives
/// soon after the bound, not after the hook's 5 s, and the hook never finishes.
#[actix_web::test]
async fn hooks_running_past_the_after_commit_timeout_are_cut_off_and_the_response_arrives() {
    let app = TestApp::spawn_with(Options {
        config: |c| c.after_commit_timeout = Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    let response = app.post("/hooked/cut/slow-5000").await;
    let took = started.elapsed();

    assert_eq!(response.status(), 201);
    assert!(
        took >= Duration::from_millis(200),
        "the hooks had their 200 ms ({took:?})"
    );
    assert!(
        took < Duration::from_millis(1500),
        "the response did not wait for the hook ({took:?})"
    );
    assert_eq!(app.events(), ["cut:first"], "the slow hook was cut off");
    assert_eq!(app.db.items_named("cut").await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.events(), ["cut:first"], "and never finished later");
    app.assert_pool_clean_and_serving("after").await;
}

// ---------------------------------------------------------------------------------------
// Early commit

/// A handler that commits (`DbSession::commit`) and then answers 500: the write stays,
/// the observer counts one commit and no rollback, the hook runs (the transaction did
/// commit), and the connection went back to the pool once, at the commit.
#[actix_web::test]
async fn an_early_commit_stays_committed_when_the_handler_then_answers_500() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let (status, body) = post(&app, "/early/early/then-500", None, "").await;

    assert_eq!(status, 500);
    assert_eq!(body, "committed early", "the handler's own answer");
    assert_eq!(app.db.items_named("early").await, 1, "committed");
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    assert_eq!(app.tally.released(), 1, "the connection was released once");
    assert_eq!(
        app.events(),
        ["early"],
        "the hook ran: the transaction committed"
    );
    let pool = app.database.pool().status();
    assert_eq!((pool.size, pool.available), (1, 1), "{pool:?}");
    assert_eq!(app.session_states().await, ["idle"]);
    app.assert_pool_clean_and_serving("after").await;
    assert_eq!(app.tally.released(), 2);
}

/// After an early commit the session is over: `conn()` is an error the handler sees.
#[actix_web::test]
async fn conn_after_an_early_commit_is_an_error_the_handler_sees() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let (status, body) = post(&app, "/early/done/then-conn", None, "").await;

    assert_eq!(status, 500, "{body}");
    assert!(body.starts_with("refused: "), "{body}");
    assert_eq!(
        app.db.items_named("done").await,
        1,
        "the early commit holds"
    );
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    assert_eq!(app.tally.released(), 1);
    app.assert_pool_clean_and_serving("after").await;
}

/// `commit()` while the handler holds the connection guard is refused, and changes
/// nothing: once the guard is dropped, the middleware commits the 201 as usual.
#[actix_web::test]
async fn an_early_commit_while_holding_the_guard_is_refused_and_the_request_commits_as_usual() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let (status, body) = post(&app, "/early/held/holding-guard", None, "").await;

    assert_eq!(status, 201, "{body}");
    assert!(body.starts_with("refused: "), "{body}");
    assert_eq!(app.db.items_named("held").await, 1);
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// An early COMMIT that a deferred constraint refuses is the handler's error (passed on
/// here: 500); nothing is written, and the connection is back in the pool clean.
#[actix_web::test]
async fn an_early_commit_refused_by_the_server_is_the_handlers_error_and_nothing_is_written() {
    let app = TestApp::spawn_with(Options {
        config: one_connection,
        ..Options::default()
    })
    .await;
    let response = app.post("/early/refused/failing-commit").await;

    assert_eq!(response.status(), 500);
    assert_eq!(app.db.items_named("refused").await, 0, "nothing written");
    assert_eq!(app.db.scalar("SELECT count(*) FROM checked").await, 0);
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("rolled_back/commit_failed", 1)])
    );
    app.assert_pool_clean_and_serving("after").await;
}

/// After an early commit the connection is back in the pool, and the request no longer
/// holds it: a handler that commits early and then takes longer than `leak_warn` is not
/// reported as holding a connection.
#[actix_web::test]
async fn a_request_that_committed_early_is_not_reported_as_holding_its_connection() {
    let app = TestApp::spawn_with(Options {
        config: |c| c.leak_warn = Some(Duration::from_millis(200)),
        ..Options::default()
    })
    .await;
    let response = app.post("/early/quick/then-sleep-700").await;
    assert_eq!(response.status(), 201);
    assert_eq!(app.tally.released(), 1, "released at the early commit");
    assert_eq!(app.tally.held_too_long(), 0, "{:?}", app.tally.outcomes());
}

/// After an early commit the request's deadline timer lets go of the statement watch of
/// the connection it gave back, which the pool hands, watch included, to the next request.
/// Here the next request abandons a statement (its own timeout drops the statement's
/// future: its session then closes the connection), which leaves that watch reporting a
/// statement in flight; the first request, only sleeping, must not be cut off by it (it
/// would be answered 503 instead of its 201, its one transaction counted twice).
#[actix_web::test]
async fn a_request_that_committed_early_is_not_cut_off_by_the_next_user_of_its_connection() {
    let app = TestApp::spawn_with(Options {
        config: |c| {
            one_connection(c);
            c.statement_timeout = Some(Duration::from_millis(500));
        },
        ..Options::default()
    })
    .await;
    let first = tokio::spawn(
        app.client
            .post(app.url("/early/first/then-sleep-3000"))
            .send(),
    );
    assert!(
        eventually(SLACK, || async { app.db.items_named("first").await == 1 }).await,
        "the first request committed early"
    );
    let second = app.post("/abandon-statement").await;
    assert!(second.status().is_server_error(), "{}", second.status());

    let first = first.await.unwrap().expect("the first request's response");
    let status = first.status();
    let body = first.text().await.unwrap();
    assert_eq!(status, 201, "{body} {:?}", app.tally.outcomes());
    assert_eq!(app.tally.ended(Outcome::Committed(Reason::Status)), 1);
    assert_eq!(
        app.tally.ended(Outcome::Committed(Reason::CommitVerified)),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Retries after a conflict

/// The rows of `skew` as `(who, v)`, in order of `v`.
async fn skew_rows(app: &TestApp) -> Vec<(String, i64)> {
    app.db
        .client()
        .await
        .query("SELECT who, v FROM skew ORDER BY v, who", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Two serializable requests that each read the sum and add a row depending on it, made
/// to overlap (their first attempts meet at a barrier after the read): one of them fails
/// with a serialization failure, is rolled back and run again with its body, and both
/// answer 201. The retry counter rose by exactly one, the table holds one of the two
/// serial outcomes, and each request's after-commit hook ran once: the failed attempt's
/// hook went with it.
#[actix_web::test]
async fn concurrent_serializable_requests_that_conflict_both_succeed_after_one_retry() {
    let app = TestApp::spawn().await;
    let (a, b) = tokio::join!(
        post(&app, "/retry/skew/a", None, "1"),
        post(&app, "/retry/skew/b", None, "10"),
    );
    assert_eq!((a.0, b.0), (201, 201), "both succeed: {a:?} {b:?}");
    assert_eq!(app.tally.retried(), 1, "exactly one retry");
    let attempts = app.retry.attempts.lock().unwrap().clone();
    assert_eq!(
        attempts
            .values()
            .copied()
            .collect::<Vec<_>>()
            .iter()
            .sum::<u32>(),
        3,
        "three handler runs in all: {attempts:?}"
    );
    let rows = skew_rows(&app).await;
    let a_first = vec![("a".to_owned(), 1), ("b".to_owned(), 11)];
    let b_first = vec![("b".to_owned(), 10), ("a".to_owned(), 11)];
    assert!(
        rows == a_first || rows == b_first,
        "the outcome of one of the serial orders: {rows:?}"
    );
    let mut events = app.events();
    events.sort();
    assert_eq!(events, ["skew:a", "skew:b"], "one hook per request");
    assert_eq!(
        app.tally.ended(Outcome::Committed(Reason::Status)),
        2,
        "{:?}",
        app.tally.outcomes()
    );
}

/// A request whose every attempt conflicts runs exactly the configured number of times
/// (3), each with the whole body, then answers 503 with `Retry-After`; nothing of it is
/// written and no hook runs. The retrying middleware here wraps the route inside a
/// resource's session middleware without retries, and takes the session over.
#[actix_web::test]
async fn a_request_that_always_conflicts_answers_503_after_exactly_the_configured_attempts() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(app.url("/retry/always/x"))
        .body("the body")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key(RETRY_AFTER));
    assert_eq!(app.retry.attempts.lock().unwrap()["x"], 3);
    assert_eq!(app.tally.retried(), 2);
    assert_eq!(
        app.events(),
        vec![r#"x read "the body""#; 3],
        "each attempt read the body"
    );
    assert_eq!(app.db.items_named("x").await, 0);
    assert!(app.session_states().await.iter().all(|s| s == "idle"));
}

/// Without a retry policy, a conflict is answered at once: one attempt, 503.
#[actix_web::test]
async fn a_conflict_without_a_retry_policy_answers_503_at_once() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/no-retry/always/y", None, "").await;
    assert_eq!(status, 503);
    assert_eq!(app.retry.attempts.lock().unwrap()["y"], 1);
    assert_eq!(app.tally.retried(), 0);
}

/// A conflict the handler recovered from, by rolling back to a savepoint around it, is
/// no reason to run the request again: its own 422 rolls back once and is the answer, and
/// its 201 commits, both after one attempt.
#[actix_web::test]
async fn a_conflict_recovered_at_a_savepoint_is_not_retried_and_the_handlers_answer_stands() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/retry/recovered/r422/422", None, "").await;
    assert_eq!(status, 422);
    assert_eq!(app.retry.attempts.lock().unwrap()["r422"], 1);
    assert_eq!(app.db.items_named("r422").await, 0, "the 422 rolled back");
    let (status, _) = post(&app, "/retry/recovered/r201/201", None, "").await;
    assert_eq!(status, 201);
    assert_eq!(app.retry.attempts.lock().unwrap()["r201"], 1);
    assert_eq!(app.db.items_named("r201").await, 1, "the 201 committed");
    assert_eq!(app.tally.retried(), 0);
}

/// A conflict the handler swallowed, answering 201 in a transaction the conflict aborted,
/// is told to the client as the conflict it is: 503 (worth a retry), not a 500, and, with
/// a retry policy, run again until the attempts are spent.
#[actix_web::test]
async fn a_swallowed_conflict_is_answered_503_or_retried() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/no-retry/recovered/s1/swallowed", None, "").await;
    assert_eq!(status, 503);
    assert_eq!(app.retry.attempts.lock().unwrap()["s1"], 1);
    let (status, _) = post(&app, "/retry/recovered/s2/swallowed", None, "").await;
    assert_eq!(status, 503);
    assert_eq!(app.retry.attempts.lock().unwrap()["s2"], 3);
    assert_eq!(app.tally.retried(), 2);
}

/// A request whose connection guard outlived its handler is not run again after a
/// conflict: its connection is still out, and a second attempt would hold a second one
/// (the hold-and-wait that starves a pool). It is answered 500 after one attempt.
#[actix_web::test]
async fn a_conflict_whose_connection_guard_escaped_is_answered_500_without_a_retry() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/retry/escaping/e", None, "").await;
    assert_eq!(status, 500);
    assert_eq!(app.retry.attempts.lock().unwrap()["e"], 1);
    assert_eq!(app.tally.retried(), 0);
}

/// A body larger than the retry policy's limit is not kept: the handler still reads all
/// of it, and the conflict is answered without a retry.
#[actix_web::test]
async fn a_body_past_the_retry_limit_reaches_the_handler_whole_and_is_not_retried() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/retry/small-body/z", None, "0123456789").await;
    assert_eq!(status, 503);
    assert_eq!(app.retry.attempts.lock().unwrap()["z"], 1);
    assert_eq!(app.events(), [r#"z read "0123456789""#]);
    assert_eq!(app.tally.retried(), 0);
}

/// A COMMIT refused with a serialization failure rolled back, so the request runs again:
/// the second attempt commits, its hook runs, and the first attempt's does not.
#[actix_web::test]
async fn a_commit_refused_with_a_serialization_failure_is_retried() {
    let app = TestApp::spawn().await;
    let (status, _) = post(&app, "/retry/at-commit/c", None, "").await;
    assert_eq!(status, 201);
    assert_eq!(app.retry.attempts.lock().unwrap()["c"], 2);
    assert_eq!(app.tally.retried(), 1);
    assert_eq!(
        app.db
            .scalar("SELECT coalesce(max(attempt), 0)::bigint FROM refused_at_commit")
            .await,
        2
    );
    assert_eq!(app.events(), ["c:committed 2"]);
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("committed/status", 1), ("rolled_back/commit_failed", 1)])
    );
}
