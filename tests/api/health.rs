//! Probes (contract section 5).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::Application;

use crate::support::{
    config_for, init_logging, spawn_app, spawn_app_on, spawn_app_with, Answer, TestDb,
};

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

/// Contract section 5: readiness is a `SELECT 1` round trip on the probe's own connection.
#[tokio::test]
async fn readiness_sends_select_1_on_the_probes_connection() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    let last: String = app
        .db
        .client()
        .await
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'ledger-health'",
            &[],
        )
        .await
        .expect("the readiness connection")
        .get(0);
    assert_eq!(last, "SELECT 1");
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

/// Backend pids of the readiness connection on `db`, through `client`.
async fn readiness_backends(client: &tokio_postgres::Client, db: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'ledger-health'",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn readiness_recovers_after_its_connection_is_killed() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    let client = app.db.client().await;
    let killed = readiness_backends(&client, &app.db.name).await;
    assert_eq!(app.db.terminate("ledger-health").await, 1);
    // The stale connection is replaced within the same probe.
    let answer = app.get("/health/ready").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let now = readiness_backends(&client, &app.db.name).await;
    assert!(now.len() == 1 && now != killed, "{killed:?} then {now:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_connection_is_replaced_once_older_than_the_pool_recycle_never_doubled() {
    const RECYCLE: Duration = Duration::from_secs(1);
    let app = spawn_app_with(&[("DB_POOL_RECYCLE", "1")]).await;
    let opened_by = Instant::now();
    assert_eq!(app.get("/readyz").await.status, 200);
    let client = app.db.client().await;
    let first = readiness_backends(&client, &app.db.name).await;
    assert_eq!(first.len(), 1);

    // Sample the server's view without pause while probes run, so that an old and a new
    // backend alive together would be seen.
    let (stop, most) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        let db = app.db.name.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let now = readiness_backends(&client, &db).await.len();
                most.fetch_max(now, Ordering::SeqCst);
            }
        })
    };
    let mut replaced_after = None;
    let probing = Instant::now();
    let check = app.db.client().await;
    while probing.elapsed() < Duration::from_secs(10) {
        let answer = app.get("/readyz").await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let now = readiness_backends(&check, &app.db.name).await;
        if now.len() == 1 && now != first {
            replaced_after = Some(opened_by.elapsed());
            break;
        }
        // Pacing: several probes a second, as a busy kubelet's would be.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    sampler.await.expect("sampler");

    let replaced_after = replaced_after.expect("the readiness connection was replaced");
    assert!(
        replaced_after >= RECYCLE,
        "replaced after {replaced_after:?}, before its lifetime"
    );
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two readiness connections at once"
    );
}

#[tokio::test]
async fn readiness_fails_on_the_first_probe_after_shutdown_begins() {
    init_logging();
    let db = TestDb::migrated().await;
    let app = Application::build(config_for(&db.name, &HashMap::new()))
        .await
        .expect("application builds");
    let (health, url) = (
        app.health(),
        format!("http://127.0.0.1:{}/readyz", app.port()),
    );
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let get = || async { client.get(&url).send().await.expect("GET").status() };
    assert_eq!(get().await, 200);

    // At once: the probe right after gets no earlier pass.
    health.start_draining();
    assert_eq!(get().await, 503);
}
