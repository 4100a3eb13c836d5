//! Pool behaviour: exhaustion, stale connections.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{eventually, requests_while_blocked, spawn_app_with};

#[tokio::test]
async fn an_exhausted_pool_answers_503_after_the_timeout_and_readiness_still_answers() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "0.5"),
    ])
    .await;
    // Holds the only connection for 3 s.
    let holder = app.post_in_background("/_test/write-then-sleep?name=holder&ms=3000");
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.pool.status().available == 0 && app.pool.status().size == 1
        })
        .await
    );

    let started = Instant::now();
    let answer = app
        .post_json("/accounts", &json!({ "name": "starved" }))
        .await;
    let waited = started.elapsed();
    answer.assert_problem(503, "database_unavailable");
    assert_eq!(
        answer.header("retry-after"),
        Some(crate::support::RETRY_AFTER)
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(2000),
        "{waited:?}"
    );

    let started = Instant::now();
    let ready = app.get("/health/ready").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "readiness answers within its own timeout"
    );
    assert_eq!(ready.status, 200, "{}", ready.text);

    let held = holder.await.expect("join").expect("holder answered");
    assert_eq!(held.status(), 201);
    assert_eq!(app.db.accounts_named("starved").await, 0);
    assert_eq!(app.db.accounts_named("holder").await, 1);
}

#[tokio::test]
async fn terminated_connections_fail_at_most_one_request_each_with_503() {
    // One worker, one pool: three connections held at once by three requests.
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "3"),
        ("DB_MAX_OVERFLOW", "0"),
        ("HTTP_WORKERS", "1"),
    ])
    .await;
    // Open three pooled connections at once.
    let mut warm = Vec::new();
    for i in 0..3 {
        warm.push(app.post_in_background(&format!("/_test/write-then-sleep?name=warm{i}&ms=300")));
    }
    for w in warm {
        assert_eq!(w.await.expect("join").expect("answer").status(), 201);
    }
    assert_eq!(app.pool.status().size, 3);

    let killed = app.db.terminate("ledger").await;
    assert_eq!(killed, 3);

    let mut failures = 0;
    for i in 0..10 {
        let answer = app
            .post_json("/accounts", &json!({ "name": format!("after-kill-{i}") }))
            .await;
        if answer.status != 201 {
            answer.assert_problem(503, "database_unavailable");
            failures += 1;
        }
    }
    assert!(
        failures <= 3,
        "{failures} failures for 3 killed connections"
    );
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM accounts WHERE name LIKE 'after-kill-%'")
            .await,
        10 - failures
    );
    // The last request surely succeeded: the pool healed without a restart.
    let last = app
        .post_json("/accounts", &json!({ "name": "healed" }))
        .await;
    assert_eq!(last.status, 201);
}

#[tokio::test]
async fn overflow_connections_close_after_the_idle_timeout() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "3"),
        ("DB_POOL_IDLE_TIMEOUT", "1"),
        // One worker, one pool: the burst of four takes all of its overflow.
        ("HTTP_WORKERS", "1"),
    ])
    .await;
    let mut burst = Vec::new();
    for i in 0..4 {
        burst
            .push(app.post_in_background(&format!("/_test/write-then-sleep?name=burst{i}&ms=400")));
    }
    for b in burst {
        assert_eq!(b.await.expect("join").expect("answer").status(), 201);
    }
    assert_eq!(app.pool.status().size, 4, "the burst used the overflow");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.pool.status().size == 1
        })
        .await,
        "the pool shrank back to DB_POOL_SIZE"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.db.sessions("ledger", None).await == 1
        })
        .await
    );
}

#[tokio::test]
async fn connections_past_their_max_lifetime_are_replaced() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_RECYCLE", "1"),
    ])
    .await;
    app.create_account("first", 1).await;
    let before = app.db.ledger_pids().await;
    assert_eq!(before.len(), 1, "one pooled connection");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    app.create_account("second", 1).await;
    let after = app.db.ledger_pids().await;
    assert_ne!(before, after, "the old connection was closed and replaced");
}

/// Two workers with a pool each: 9 connections, 1 for the application, 4 for each worker.
const A_POOL_PER_WORKER: [(&str, &str); 3] = [
    ("HTTP_WORKERS", "2"),
    ("DB_POOL_SIZE", "4"),
    ("DB_MAX_OVERFLOW", "5"),
];

/// With a pool per worker, each worker opens and drives its own connections: a request
/// is served while the application's runtime (here the test's, which runs the server's
/// handle) cannot run at all. With connections driven on that runtime, the request
/// would wait for it.
#[tokio::test]
async fn with_a_pool_per_worker_requests_need_no_other_thread_than_their_worker() {
    let app = spawn_app_with(&A_POOL_PER_WORKER).await;
    // The server is up (each worker builds its pool as it starts; connections open on
    // first use, below).
    for i in 0..2 {
        let answer = app
            .post_json("/accounts", &json!({ "name": format!("warm-{i}") }))
            .await;
        assert_eq!(answer.status, 201);
    }
    let url = app.url("/accounts");
    // Blocks the application's runtime thread while the requests run.
    let answers = requests_while_blocked(2, Duration::from_secs(4), move |client, i| {
        client
            .post(&url)
            .json(&json!({ "name": format!("unblocked-{i}") }))
    });
    for (status, took) in answers {
        assert_eq!(status.expect("answered"), 201);
        assert!(
            took < Duration::from_secs(2),
            "served in {took:?} while the application's runtime was blocked"
        );
    }
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM accounts WHERE name LIKE 'unblocked-%'")
            .await,
        2
    );
}

/// A pool per worker splits the budget, it does not multiply it: under a burst far
/// beyond it the service holds at most `DB_POOL_SIZE + DB_MAX_OVERFLOW` pooled
/// connections, and the pools together report that as their maximum.
#[tokio::test]
async fn a_pool_per_worker_keeps_the_whole_service_within_the_budget() {
    let app = spawn_app_with(&A_POOL_PER_WORKER).await;
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let request = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client")
                .post(app.url(&format!("/_test/write-then-sleep?name=burst{i}&ms=200")));
            tokio::spawn(request.send())
        })
        .collect();
    let mut peak = 0;
    while !burst.iter().all(|b| b.is_finished()) {
        peak = peak.max(app.db.sessions("ledger", None).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for b in burst {
        assert_eq!(b.await.expect("join").expect("answer").status(), 201);
    }
    assert!(peak <= 9, "{peak} server connections for a budget of 9");
    assert!(
        peak >= 5,
        "the burst used both workers' pools (4 each): {peak}"
    );
    assert_eq!(app.pool.status().max_size, 9);
}
