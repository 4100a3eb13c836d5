//! The commit rule, proved over real HTTP against real PostgreSQL: a response below 400 is
//! sent only after its transaction committed; an error status, a handler's error, a panic,
//! a dropped request future and a failed COMMIT leave nothing written; no connection goes
//! back to the pool inside a transaction; the observer and the error rendering see it all.
//!
//! Each test runs the tests' own small application (`support`) on a database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use actix_diesel_session::{Outcome, Reason, NO_CONNECTION_IN_TIME, RETRY_AFTER_SECS};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};

use support::{eventually, outcomes, Options, TestApp, PROBLEM_JSON, SLACK};

/// The default rendering's body for a 500: no cause.
const GENERIC_500: &str = "the server could not complete the request";

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> &str {
    response
        .headers()
        .get(&name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("a {name} header"))
}

/// Waits (bounded) until no session of the pool is inside a transaction any more: for the
/// outcomes that end off the request's path (a dropped request future rolls back in a
/// spawned task).
async fn wait_until_no_open_transaction(app: &TestApp) {
    assert!(
        eventually(SLACK, || async {
            app.session_states()
                .await
                .iter()
                .all(|s| !s.starts_with("idle in transaction") && s != "active")
        })
        .await,
        "the abandoned transaction ended: {:?}",
        app.session_states().await
    );
}

#[actix_web::test]
async fn a_2xx_response_is_sent_only_after_its_commit() {
    let app = TestApp::spawn().await;
    let observer = app.db.client().await;
    // The COMMIT takes 400 ms (a deferred trigger sleeps): a response sent before it
    // would reach the client while the row is still invisible.
    let started = Instant::now();
    let response = app.post("/items/committed/slow-commit/400").await;
    let visible: i64 = observer
        .query_one("SELECT count(*) FROM items WHERE name = 'committed'", &[])
        .await
        .unwrap()
        .get(0);
    let took = started.elapsed();

    assert_eq!(response.status(), 201);
    assert_eq!(
        visible, 1,
        "the row is visible from another connection the moment the client has the response"
    );
    assert!(
        took >= Duration::from_millis(400),
        "the response waited for the COMMIT ({took:?})"
    );
    assert_eq!(response.text().await.unwrap(), "committed");
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

#[actix_web::test]
async fn a_4xx_response_rolls_back_the_handlers_write() {
    let app = TestApp::spawn().await;
    let response = app.post("/items/refused/then-409").await;

    assert_eq!(response.status(), 409);
    assert_eq!(
        response.text().await.unwrap(),
        "already there",
        "the handler's own answer is sent"
    );
    assert_eq!(app.db.items_named("refused").await, 0, "nothing written");
    assert_eq!(app.tally.outcomes(), outcomes(&[("rolled_back/status", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

#[actix_web::test]
async fn a_handler_error_rolls_back_and_answers_the_errors_status() {
    let app = TestApp::spawn().await;
    let response = app.post("/items/failed/then-error").await;

    // `SessionError::Conflict`, rendered by its own `ResponseError`: 503, Retry-After.
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, RETRY_AFTER), RETRY_AFTER_SECS.to_string());
    assert_eq!(
        response.text().await.unwrap(),
        "the database aborted the transaction because of a concurrent one"
    );
    assert_eq!(app.db.items_named("failed").await, 0, "nothing written");
    assert_eq!(app.tally.outcomes(), outcomes(&[("rolled_back/error", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

#[actix_web::test]
async fn a_panicking_handler_gets_500_and_its_write_is_rolled_back() {
    let app = TestApp::spawn().await;
    let response = app.post("/items/panicked/then-panic").await;

    assert_eq!(response.status(), 500);
    assert_eq!(app.db.items_named("panicked").await, 0, "nothing written");
    assert_eq!(app.tally.outcomes(), outcomes(&[("rolled_back/panic", 1)]));
    // The worker survived the panic, and the connection the handler held went back clean.
    app.assert_pool_clean_and_serving("after").await;
}

/// A handler that swallows a database error and answers 2xx: PostgreSQL would turn the
/// COMMIT of the aborted transaction into a silent ROLLBACK, so the 2xx would lie.
#[actix_web::test]
async fn a_swallowed_database_error_turns_the_2xx_into_500_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let response = app.post("/items/swallowed/then-swallow").await;

    assert_eq!(response.status(), 500);
    assert_eq!(app.db.items_named("swallowed").await, 0, "nothing written");
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("rolled_back/commit_failed", 1)])
    );
    app.assert_pool_clean_and_serving("after").await;
}

/// The request's future is dropped (here by a middleware outside the session's, as a
/// request timeout would; a shutdown timeout does the same) while its handler holds an
/// open transaction after a write.
#[actix_web::test]
async fn a_request_future_dropped_mid_transaction_rolls_back_and_leaves_no_session_in_a_transaction(
) {
    let app = TestApp::spawn().await;
    let started = Instant::now();
    // The handler writes, then sleeps 1.5 s holding its transaction; it is cut off once
    // its transaction is seen open.
    let response = app
        .post_and_cut_off("/cut-off/dropped/then-sleep/1500")
        .await;

    assert_eq!(response.status(), 504);
    // The rollback runs in a task spawned when the request future was dropped: the 504
    // can arrive before it is done (and counted) on a loaded machine.
    wait_until_no_open_transaction(&app).await;
    assert!(
        eventually(SLACK, || async {
            app.tally.outcomes() == outcomes(&[("rolled_back/cancelled", 1)])
        })
        .await,
        "counted as a cancelled rollback: {:?}",
        app.tally.outcomes()
    );
    assert_eq!(app.db.items_named("dropped").await, 0, "rolled back");
    // Past the moment the handler would have finished and committed, had it lived on.
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(started.elapsed())).await;
    assert_eq!(app.db.items_named("dropped").await, 0, "never visible");
    app.assert_pool_clean_and_serving("after").await;
}

/// The server's graceful shutdown runs out (1 s) while a handler holds an open transaction
/// after a write: its request future is dropped with the worker.
#[actix_web::test]
async fn a_request_cut_off_by_the_shutdown_timeout_rolls_back() {
    let app = TestApp::spawn().await;
    let request = tokio::spawn(
        app.client
            .post(app.url("/items/shutdown/then-sleep/4000"))
            .send(),
    );
    app.wait_for_open_transaction().await;
    let stopping = Instant::now();
    app.stop_server().await;
    assert!(stopping.elapsed() < Duration::from_secs(1) + SLACK);

    assert!(
        request.await.unwrap().is_err(),
        "the client got no response"
    );
    wait_until_no_open_transaction(&app).await;
    assert!(
        eventually(SLACK, || async {
            app.tally.ended(Outcome::RolledBack(Reason::Cancelled)) == 1
        })
        .await,
        "{:?}",
        app.tally.outcomes()
    );
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("rolled_back/cancelled", 1)])
    );
    assert_eq!(app.db.items_named("shutdown").await, 0, "never visible");
    // No connection left in a transaction, and the pool still serves.
    assert!(app.session_states().await.iter().all(|s| s == "idle"));
    let mut conn = app
        .database
        .pool()
        .get()
        .await
        .expect("a pooled connection");
    use diesel_async::RunQueryDsl;
    diesel::sql_query("SELECT 1")
        .execute(&mut *conn)
        .await
        .expect("the pooled connection works");
}

/// Actix-web does not drop the request's future when its client disconnects
/// (actix/actix-web#3462): the handler runs to its end and its write commits, though nobody
/// receives the answer. A client that gave up cannot tell whether its write happened;
/// only a dropped request future (above) rolls back. Should Actix start cancelling on
/// disconnect, this test fails, and the one above then covers that case too.
#[actix_web::test]
async fn a_client_disconnect_does_not_cancel_the_handler_so_its_write_commits() {
    let app = TestApp::spawn().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let gave_up = impatient
        .post(app.url("/items/hung-up/then-sleep/1500"))
        .send()
        .await
        .expect_err("the client gives up before the answer");
    assert!(gave_up.is_timeout(), "{gave_up}");
    assert_eq!(
        app.db.items_named("hung-up").await,
        0,
        "not committed while the handler runs"
    );

    assert!(
        eventually(Duration::from_millis(1500) + SLACK, || async {
            app.db.items_named("hung-up").await == 1
        })
        .await,
        "the handler ran to its end and committed"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // Visible to others a moment before the session has COMMIT's answer and counts it.
    assert!(
        eventually(SLACK, || async {
            app.tally.ended(Outcome::Committed(Reason::Status)) == 1
        })
        .await
    );
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    // Likewise, the connection goes back to the pool once COMMIT's answer is in.
    wait_until_no_open_transaction(&app).await;
    app.assert_pool_clean_and_serving("after").await;
}

/// A deferred constraint fails at COMMIT: the handler's 201 must not go out.
#[actix_web::test]
async fn a_failed_commit_replaces_the_handlers_2xx_with_a_5xx_and_nothing_is_written() {
    let app = TestApp::spawn().await;
    let response = app.post("/items/deferred/failing-commit").await;

    assert_eq!(response.status(), 500);
    assert_eq!(response.text().await.unwrap(), GENERIC_500);
    assert_eq!(app.db.items_named("deferred").await, 0, "nothing written");
    assert_eq!(app.db.scalar("SELECT count(*) FROM checked").await, 0);
    assert_eq!(
        app.tally.outcomes(),
        outcomes(&[("rolled_back/commit_failed", 1)])
    );
    app.assert_pool_clean_and_serving("after").await;
}

/// With a pool of one connection, every request reuses the connection the previous one
/// gave back (or a fresh one if it was closed): after each way a transaction can end,
/// the pool's sessions are all idle, and the next request on the same pool works.
#[actix_web::test]
async fn no_connection_goes_back_to_the_pool_inside_a_transaction() {
    let app = TestApp::spawn_with(Options {
        config: |c| {
            c.pool_size = 1;
            c.max_overflow = 0;
        },
        ..Options::default()
    })
    .await;
    let cases = [
        ("/items/a/slow-commit/0", 201),
        ("/items/b/then-409", 409),
        ("/items/c/then-error", 503),
        ("/items/d/then-panic", 500),
        ("/items/e/then-swallow", 500),
        ("/items/f/failing-commit", 500),
        ("/cut-off/g/then-sleep/1000", 504),
    ];
    for (i, (path, status)) in cases.into_iter().enumerate() {
        let response = if path.starts_with("/cut-off/") {
            app.post_and_cut_off(path).await
        } else {
            app.post(path).await
        };
        assert_eq!(response.status(), status, "{path}");
        wait_until_no_open_transaction(&app).await;
        app.assert_pool_clean_and_serving(&format!("next-{i}"))
            .await;
        let sessions = app.session_states().await;
        assert!(sessions.len() <= 1, "one connection at most: {sessions:?}");
    }
    assert_eq!(app.db.items_named("a").await, 1);
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM items WHERE name NOT LIKE 'next-%'")
            .await,
        1,
        "only the 2xx's write committed"
    );
}

/// One pool, every outcome: the observer's `transaction_ended` counts each as it happened.
#[actix_web::test]
async fn the_observer_sees_how_each_transaction_ended() {
    let app = TestApp::spawn().await;
    for (path, status) in [
        ("/items/a", 201),
        ("/items/b/slow-commit/0", 201),
        ("/items/c/then-409", 409),
        ("/items/d/then-error", 503),
        ("/items/e/then-panic", 500),
        ("/items/f/failing-commit", 500),
    ] {
        assert_eq!(app.post(path).await.status(), status, "{path}");
    }
    let cut_off = app.post_and_cut_off("/cut-off/g/then-sleep/1000").await;
    assert_eq!(cut_off.status(), 504);
    wait_until_no_open_transaction(&app).await;
    // The cut-off request's rollback runs in a task spawned when its future was dropped:
    // it is counted when that task is done, which can be after the server has settled.
    let expected = outcomes(&[
        ("committed/status", 2),
        ("rolled_back/status", 1),
        ("rolled_back/error", 1),
        ("rolled_back/panic", 1),
        ("rolled_back/commit_failed", 1),
        ("rolled_back/cancelled", 1),
    ]);
    assert!(
        eventually(SLACK, || async { app.tally.outcomes() == expected }).await,
        "every outcome counted once: {:?}",
        app.tally.outcomes()
    );
    assert_eq!(app.tally.ended(Outcome::Committed(Reason::Status)), 2);
    assert_eq!(app.tally.ended(Outcome::Unknown { id_known: true }), 0);
    assert_eq!(app.tally.checkout_timeouts(), 0);
}

/// The responses the middleware makes itself (a panic's 500, a failed COMMIT's 500) are
/// the application's, and a COMMIT refused by the server (a deferred constraint) reaches
/// it as the database error, for it to map; errors its handlers return keep their own
/// rendering.
#[actix_web::test]
async fn render_errors_renders_the_responses_the_middleware_makes_itself() {
    let app = TestApp::spawn_with(Options {
        render: true,
        ..Options::default()
    })
    .await;
    for (path, code) in [
        ("/items/a/then-panic", "internal"),
        ("/items/b/failing-commit", "database"),
    ] {
        let response = app.post(path).await;
        assert_eq!(response.status(), 500, "{path}");
        assert_eq!(header(&response, CONTENT_TYPE), PROBLEM_JSON, "{path}");
        assert_eq!(
            response.text().await.unwrap(),
            format!(r#"{{"code":"{code}"}}"#),
            "{path}"
        );
    }
    let returned = app.post("/items/c/then-error").await;
    assert_eq!(returned.status(), 503);
    assert!(
        header(&returned, CONTENT_TYPE).starts_with("text/plain"),
        "a handler's own error is rendered by its type"
    );
    assert_eq!(app.db.scalar("SELECT count(*) FROM items").await, 0);
    app.assert_pool_clean_and_serving("after").await;
}

#[actix_web::test]
async fn the_default_rendering_is_plain_text_without_the_cause() {
    let app = TestApp::spawn().await;
    for path in ["/items/a/then-panic", "/items/b/failing-commit"] {
        let response = app.post(path).await;
        assert_eq!(response.status(), 500, "{path}");
        assert_eq!(
            header(&response, CONTENT_TYPE),
            "text/plain; charset=utf-8",
            "{path}"
        );
        let body = response.text().await.unwrap();
        assert_eq!(body, GENERIC_500, "{path}");
        for cause in ["panic", "COMMIT", "checked", "violates", "foreign key"] {
            assert!(!body.contains(cause), "{path}: {body}");
        }
    }
    app.assert_pool_clean_and_serving("after").await;
}

/// One connection, held by a request that sleeps in its transaction: a second request
/// waits the check-out timeout (300 ms) and gets 503, not a hang.
#[actix_web::test]
async fn an_exhausted_pool_answers_503_within_the_checkout_timeout() {
    let app = TestApp::spawn_with(Options {
        config: |c| {
            c.pool_size = 1;
            c.max_overflow = 0;
            c.checkout_timeout = Duration::from_millis(300);
        },
        ..Options::default()
    })
    .await;
    let holder = tokio::spawn(
        app.client
            .post(app.url("/items/holder/then-sleep/2000"))
            .send(),
    );
    app.wait_for_open_transaction().await;

    let started = Instant::now();
    let response = app.post("/items/waiter").await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, RETRY_AFTER), RETRY_AFTER_SECS.to_string());
    assert_eq!(response.text().await.unwrap(), NO_CONNECTION_IN_TIME);
    assert!(
        waited >= Duration::from_millis(290),
        "it waited for the check-out timeout ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(2),
        "it gave up about when the check-out timeout passed ({waited:?})"
    );
    assert!(
        !holder.is_finished(),
        "the first request still holds the connection"
    );
    assert_eq!(app.tally.checkout_timeouts(), 1);

    let held = holder.await.unwrap().expect("the first request's response");
    assert_eq!(held.status(), 201);
    assert_eq!(app.db.items_named("holder").await, 1);
    assert_eq!(app.db.items_named("waiter").await, 0);
    // The request that got no connection had no transaction to end.
    assert_eq!(app.tally.outcomes(), outcomes(&[("committed/status", 1)]));
    app.assert_pool_clean_and_serving("after").await;
}

/// The middleware may wrap a scope: it keeps no clone of the request while the scope's
/// router, which needs the request unshared to record the matched resource
/// (`HttpRequest::match_info_mut` unwraps `Rc::get_mut`), routes it.
#[actix_web::test]
async fn a_session_middleware_on_a_scope_serves_its_routes() {
    let app = TestApp::spawn_with(Options {
        scope: true,
        ..Options::default()
    })
    .await;
    let response = app.post("/scoped/in-scope").await;
    assert_eq!(response.status(), 201);
    assert_eq!(app.db.items_named("in-scope").await, 1);

    // Inside a scope too, a panic is answered (with the request the session learned when
    // the handler extracted it) and rolled back.
    let response = app.post("/scoped/scope-panic/then-panic").await;
    assert_eq!(response.status(), 500);
    assert_eq!(app.db.items_named("scope-panic").await, 0);
}

/// A panic in a handler that never took its session is still answered with a 500 (there
/// was nothing to roll back), not with a dropped connection.
#[actix_web::test]
async fn a_panic_in_a_handler_without_a_session_is_answered_500() {
    let app = TestApp::spawn().await;
    let response = app.post("/no-session/panic").await;
    assert_eq!(response.status(), 500);
    app.assert_pool_clean_and_serving("after").await;
}

/// The middleware's handle on the request is dropped when it is done, even when something
/// outside it extracts the session again from the finished response's request: every
/// request is freed.
#[actix_web::test]
async fn no_request_is_kept_alive_by_its_session() {
    let app = TestApp::spawn().await;
    let before = support::DROPPED_MARKERS.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..3 {
        let response = app.post(&format!("/extract-after/freed-{i}")).await;
        assert_eq!(response.status(), 201);
    }
    assert!(
        eventually(SLACK, || async {
            support::DROPPED_MARKERS.load(std::sync::atomic::Ordering::SeqCst) - before >= 3
        })
        .await,
        "every request's extensions were dropped"
    );
}
