//! Probes (contract section 5).

use std::time::{Duration, Instant};

use crate::helpers::{spawn_app, spawn_app_on, Answer, TestDb};

/// A URL whose server refuses connections, with a password that must never show.
const UNREACHABLE: &str = "postgres://ledger:hunter2-secret@127.0.0.1:1/ledger";

fn assert_health_shape(answer: &Answer, status: &str) {
    assert_eq!(
        answer.header("content-type"),
        Some("application/health+json")
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert_eq!(answer.body["status"], status, "{}", answer.text);
}

#[tokio::test]
async fn probes_pass_when_the_database_answers() {
    let app = spawn_app().await;
    for path in ["/health/live", "/livez"] {
        let answer = app.get(path).await;
        assert_eq!(answer.status, 200);
        assert_health_shape(&answer, "pass");
    }
    for path in ["/health/ready", "/readyz", "/health"] {
        let answer = app.get(path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text);
        assert_health_shape(&answer, "pass");
        let rt = &answer.body["checks"]["postgres:responseTime"][0];
        assert_eq!(rt["status"], "pass");
        assert_eq!(rt["observedUnit"], "ms");
        assert!(rt["observedValue"].as_f64().is_some());
    }
    let detail = app.get("/health").await;
    let conns = &detail.body["checks"]["postgres:connections"][0];
    assert_eq!(conns["max"], 4);
    assert_eq!(conns["observedUnit"], "connections");
    // The probe used its own connection, not the pool.
    assert_eq!(app.pool.status().size, 0);
    assert_eq!(app.db.sessions("ledger-health", None).await, 1);
}

#[tokio::test]
async fn with_the_database_unreachable_live_passes_and_ready_fails_without_secrets() {
    let app = spawn_app_on(
        TestDb::not_created(),
        &[
            ("DATABASE_URL", UNREACHABLE),
            ("RUN_MIGRATIONS", "true"),
            ("DB_HEALTH_TIMEOUT", "1"),
        ],
    )
    .await;

    let live = app.get("/health/live").await;
    assert_eq!(live.status, 200);
    assert_health_shape(&live, "pass");

    for path in ["/health/ready", "/readyz", "/health"] {
        let started = Instant::now();
        let answer = app.get(path).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path} answered within its timeout"
        );
        assert_eq!(answer.status, 503, "{path}");
        assert_health_shape(&answer, "fail");
        let rt = &answer.body["checks"]["postgres:responseTime"][0];
        assert_eq!(rt["status"], "fail");
        assert!(rt["output"].as_str().is_some_and(|o| !o.is_empty()));
        assert!(!answer.text.contains("hunter2"), "{}", answer.text);
    }
    // API requests fail fast with 503, also without secrets.
    let answer = app
        .post_json("/accounts", &serde_json::json!({ "name": "x" }))
        .await;
    answer.assert_problem(503, "database_unavailable");
    assert!(!answer.text.contains("hunter2"));
}

#[tokio::test]
async fn readiness_recovers_after_its_connection_is_killed() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    assert_eq!(app.db.terminate("ledger-health").await, 1);
    // The stale connection is replaced within the same probe.
    let answer = app.get("/health/ready").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}
