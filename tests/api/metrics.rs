//! `GET /metrics` (contract section 9) and the connection-leak warning.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, spawn_app, spawn_app_with, TestApp, SLACK};

/// One scrape, parsed: series (name plus label set, as printed) to value.
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub async fn take(app: &TestApp) -> Scrape {
        let answer = app.get("/metrics").await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Scrape::parse(&answer.text)
    }

    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("`series value`");
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            assert!(
                series.insert(key.to_owned(), value).is_none(),
                "duplicate series {key}"
            );
        }
        Scrape(series)
    }

    /// The value of one series; absent series are 0 (a counter not yet created).
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    pub fn delta(&self, before: &Scrape, series: &str) -> f64 {
        self.get(series) - before.get(series)
    }
}

const COMMITS: &str = r#"db_transactions_total{outcome="commit",reason="status"}"#;
const STATUS_ROLLBACKS: &str = r#"db_transactions_total{outcome="rollback",reason="status"}"#;
const WAIT_TIMEOUTS: &str = r#"db_pool_timeouts_total{kind="wait"}"#;

#[tokio::test]
async fn metrics_count_commits_rollbacks_timeouts_and_label_routes_by_template() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_TIMEOUT", "0.3"),
    ])
    .await;
    let before = Scrape::take(&app).await;
    // Every series that can occur exists before its first event.
    for series in [COMMITS, STATUS_ROLLBACKS, WAIT_TIMEOUTS] {
        assert!(before.has(series), "{series} missing");
        assert_eq!(before.get(series), 0.0);
    }
    assert_eq!(before.get("db_pool_connections_max"), 1.0);
    assert_eq!(before.get("db_pool_connections_min"), 1.0);
    assert_eq!(before.get(r#"db_pool_connections{state="used"}"#), 0.0);
    assert_eq!(before.get("app_draining"), 0.0);

    // A commit, then a rollback decided by the status.
    let id = app.account_id("metrics-commit", 5).await;
    assert_eq!(app.get(&format!("/accounts/{id}")).await.status, 200);
    let rolled_back = app
        .post_json("/_test/write-then-4xx?name=metrics-rollback", &json!({}))
        .await;
    assert_eq!(rolled_back.status, 409);

    // A pool timeout: the only connection is held while another request waits for it.
    let holder = app.post_in_background("/_test/write-then-sleep?name=metrics-holder&ms=2000");
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.pool.status().available == 0 && app.pool.status().size == 1
        })
        .await
    );
    let during = Scrape::take(&app).await;
    assert_eq!(during.get(r#"db_pool_connections{state="used"}"#), 1.0);
    assert_eq!(during.get(r#"db_pool_connections{state="idle"}"#), 0.0);
    app.post_json("/accounts", &json!({ "name": "metrics-starved" }))
        .await
        .assert_problem(503, "database_unavailable");
    assert_eq!(holder.await.unwrap().unwrap().status(), 201);
    assert_eq!(app.get("/no/such/route/42").await.status, 404);

    let after = Scrape::take(&app).await;
    // Commits: the account and the holder. GETs commit too (status < 400).
    assert_eq!(after.delta(&before, COMMITS), 3.0);
    assert_eq!(after.delta(&before, STATUS_ROLLBACKS), 1.0);
    assert_eq!(after.delta(&before, WAIT_TIMEOUTS), 1.0);
    for kind in ["create", "recycle"] {
        let series = format!(r#"db_pool_timeouts_total{{kind="{kind}"}}"#);
        assert_eq!(after.delta(&before, &series), 0.0, "{series}");
    }
    assert_eq!(
        after.delta(&before, "db_pool_connections_created_total"),
        1.0
    );
    // Four check-outs succeeded; the starved one is not an acquisition.
    assert_eq!(
        after.delta(&before, "db_pool_acquire_duration_seconds_count"),
        4.0
    );
    assert_eq!(
        after.delta(&before, "db_pool_connection_use_duration_seconds_count"),
        4.0
    );
    // The holder kept its connection for 2 s; the other three were quick.
    assert!(after.get("db_pool_connection_use_duration_seconds_sum") >= 2.0);
    assert_eq!(
        after.delta(
            &before,
            r#"db_pool_connection_use_duration_seconds_bucket{le="1"}"#
        ),
        3.0
    );
    assert_eq!(
        after.delta(&before, "db_pool_connection_create_duration_seconds_count"),
        1.0
    );
    assert_eq!(after.get(r#"db_pool_connections{state="idle"}"#), 1.0);
    assert_eq!(after.get("db_pool_pending_requests"), 0.0);

    // Route templates, never raw paths; unknown routes share one label.
    let http = |route: &str, method: &str, status: u16| {
        format!(
            r#"http_request_duration_seconds_count{{route="{route}",method="{method}",status="{status}"}}"#
        )
    };
    assert_eq!(after.get(&http("/accounts", "POST", 201)), 1.0);
    assert_eq!(after.get(&http("/accounts", "POST", 503)), 1.0);
    assert_eq!(after.get(&http("/accounts/{id}", "GET", 200)), 1.0);
    assert_eq!(after.get(&http("/_test/write-then-4xx", "POST", 409)), 1.0);
    assert_eq!(after.get(&http("unmatched", "GET", 404)), 1.0);
    assert_eq!(after.get(&http("/metrics", "GET", 200)), 2.0);
    assert!(
        !after
            .0
            .keys()
            .any(|k| k.contains(&format!("/accounts/{id}"))),
        "a raw path leaked into a label"
    );
}

#[tokio::test]
async fn metrics_never_touch_the_database_and_reject_other_methods() {
    let app = spawn_app().await;
    let scrape = Scrape::take(&app).await;
    assert_eq!(scrape.get("db_pool_connections_max"), 4.0);
    assert!(
        !scrape.has(r#"health_check_status{check="postgres"}"#),
        "no readiness check ran yet"
    );
    assert_eq!(app.pool.status().size, 0, "no pooled connection was opened");
    assert_eq!(app.db.sessions("ledger", None).await, 0);
    assert_eq!(app.db.sessions("ledger-health", None).await, 0);

    let post = app.post_json("/metrics", &json!({})).await;
    post.assert_problem(405, "method_not_allowed");
    assert_eq!(post.header("allow"), Some("GET"));

    // The readiness check reports its outcome.
    assert_eq!(app.get("/health/ready").await.status, 200);
    let scrape = Scrape::take(&app).await;
    assert_eq!(scrape.get(r#"health_check_status{check="postgres"}"#), 1.0);
}

#[tokio::test]
async fn a_connection_held_past_the_leak_threshold_is_reported_once_while_held() {
    let app = spawn_app_with(&[("DB_LEAK_WARN_SECS", "1")]).await;
    let leaks = r#"db_pool_leak_warnings_total{route="/_test/write-then-sleep",method="POST"}"#;

    // Quick requests never warn.
    app.create_account("leak-quick", 1).await;

    let holder = app.post_in_background("/_test/write-then-sleep?name=leak-holder&ms=2500");
    // The warning comes while the request still holds its connection.
    assert!(
        eventually(Duration::from_secs(3), || async {
            Scrape::take(&app).await.get(leaks) == 1.0
        })
        .await,
        "no leak warning while the connection was held"
    );
    assert!(!holder.is_finished(), "the holder is still running");
    assert_eq!(holder.await.unwrap().unwrap().status(), 201);

    // Once, not once per threshold (2.5 s held, 1 s threshold); nothing for the quick
    // request.
    let scrape = Scrape::take(&app).await;
    assert_eq!(scrape.get(leaks), 1.0);
    let all: f64 = scrape
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("db_pool_leak_warnings_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(all, 1.0);
}

#[tokio::test]
async fn metrics_count_transactions_and_closed_connections_by_reason() {
    let app = spawn_app_with(&[("DB_POOL_SIZE", "1"), ("DB_MAX_OVERFLOW", "0")]).await;
    let before = Scrape::take(&app).await;
    let closed = |reason: &str| format!(r#"db_pool_connections_closed_total{{reason="{reason}"}}"#);
    let rollbacks =
        |reason: &str| format!(r#"db_transactions_total{{outcome="rollback",reason="{reason}"}}"#);

    // A COMMIT that fails: counted as a rollback. The server ended the transaction, so its
    // connection goes back to the pool rather than being closed.
    let failed = app
        .post_json("/_test/commit-fails?name=m-commit", &json!({}))
        .await;
    assert_eq!(failed.status, 500, "{}", failed.text);
    let panicked = app
        .post_json("/_test/write-then-panic?name=m-panic", &json!({}))
        .await;
    assert_eq!(panicked.status, 500);
    let erred = app
        .post_json("/_test/write-then-err?name=m-err", &json!({}))
        .await;
    assert_eq!(erred.status, 422);

    // A pooled connection that the server closed fails its ping before reuse.
    app.create_account("m-before-kill", 1).await;
    let last_used = std::time::Instant::now();
    assert_eq!(app.db.terminate("ledger").await, 1);
    assert!(
        eventually(SLACK, || async { app.db.ledger_pids().await.is_empty() }).await,
        "the backend ended"
    );
    // Not synchronisation: the connection must sit idle past the 500 ms ping window, or
    // it is handed out without a ping.
    tokio::time::sleep(Duration::from_millis(600).saturating_sub(last_used.elapsed())).await;
    app.create_account("m-after-kill", 1).await;

    let after = Scrape::take(&app).await;
    assert_eq!(after.delta(&before, &rollbacks("commit_failed")), 1.0);
    assert_eq!(after.delta(&before, &rollbacks("panic")), 1.0);
    assert_eq!(after.delta(&before, &rollbacks("error")), 1.0);
    assert_eq!(after.delta(&before, COMMITS), 2.0);
    assert_eq!(after.delta(&before, &closed("broken")), 0.0);
    assert_eq!(after.delta(&before, &closed("recycle_failed")), 1.0);
    assert_eq!(
        after.delta(&before, "db_pool_connections_created_total"),
        2.0,
        "the first (reused after the failed COMMIT), one after the kill"
    );

    // Connections past DB_POOL_RECYCLE are retired (by the reaper or at check-out).
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "1"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_RECYCLE", "1"),
    ])
    .await;
    app.create_account("m-old", 1).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            Scrape::take(&app).await.get(&closed("lifetime")) == 1.0
        })
        .await,
        "the expired connection was counted"
    );
}
