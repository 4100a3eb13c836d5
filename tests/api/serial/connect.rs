//! Connection attempts are bounded end to end and never left behind (contract sections 5
//! and 6): against a server that accepts and then says nothing, the service's attempts
//! stay within its connection budget, and when the server recovers it never holds more
//! than `DB_POOL_SIZE + DB_MAX_OVERFLOW + 1` server connections (one more while
//! migrations are pending).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::binary::Binary;
use crate::support::proxy::Mode;
use crate::support::{admin_url, connect, proxy_to, within, TestDb};

const POOL_SIZE: usize = 2;
const MAX_OVERFLOW: usize = 2;
/// Requests that each need a pooled connection, one after another per client.
const CLIENTS: usize = 8;
const SILENT_FOR: Duration = Duration::from_secs(5);

/// Server connections of the service on `db`, by `application_name`.
async fn server_connections(admin: &tokio_postgres::Client, db: &str) -> HashMap<String, usize> {
    admin
        .query(
            "SELECT application_name, count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'ledger%' GROUP BY 1",
            &[&db],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| (row.get(0), usize::try_from(row.get::<_, i64>(1)).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_against_a_silent_server_stay_bounded_and_the_recovery_stays_in_budget() {
    // Arrange: the service behind a server that accepts and never answers, from the start
    // (so the start-up migrations are pending and retried too).
    let db = TestDb::migrated().await;
    let (proxy, url) = proxy_to(&db).await;
    proxy.set_mode(Mode::Silent);
    let service = Arc::new(
        Binary::start(&[
            ("DATABASE_URL", &url),
            ("DB_POOL_SIZE", &POOL_SIZE.to_string()),
            ("DB_MAX_OVERFLOW", &MAX_OVERFLOW.to_string()),
            ("DB_POOL_TIMEOUT", "0.5"),
            ("DB_HEALTH_TIMEOUT", "0.5"),
            ("RUN_MIGRATIONS", "true"),
            ("HTTP_WORKERS", "2"),
        ])
        .await,
    );
    // Pool + overflow, the readiness connection, the migrations' connection.
    let attempt_budget = POOL_SIZE + MAX_OVERFLOW + 1 + 1;
    // What it holds idle (its listener, a copy per worker; the start-up's HTTP
    // connection and migration attempt, if open, count as spare), plus one keep-alive HTTP
    // connection per client and the readiness poller, plus the database attempts, plus 2
    // spare for an HTTP connection being replaced.
    let socket_budget = service.sockets() + (CLIENTS + 1) + attempt_budget + 2;

    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let mut traffic = Vec::new();
    for _ in 0..CLIENTS {
        let (service, stop) = (service.clone(), stop.clone());
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // 503 while the server is silent, 404 (no such account) once it answers.
                let status = service.status("/accounts/1").await;
                assert!(matches!(status, Some(503 | 404)), "{status:?}");
                // Pacing, so that the recovered service is not spun flat out.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    {
        let (service, stop, ready) = (service.clone(), stop.clone(), ready.clone());
        traffic.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if service.status("/readyz").await == Some(200) {
                    ready.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    // Act 1: 5 s of requests against the silent server.
    let (mut most_attempts, mut most_sockets) = (0, 0);
    let silent = Instant::now();
    while silent.elapsed() < SILENT_FOR {
        most_attempts = most_attempts.max(proxy.open());
        most_sockets = most_sockets.max(service.sockets());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Act 2: the server answers again; watch its connections until the service is ready
    // (migrations applied late, by their backoff) and one more second of traffic.
    let admin = connect(&admin_url()).await;
    proxy.set_mode(Mode::Pass);
    let mut worst: Option<HashMap<String, usize>> = None;
    let mut over_budget = Vec::new();
    let mut ready_at = None;
    within(Duration::from_secs(30), "recovery", async {
        loop {
            let now = server_connections(&admin, &db.name).await;
            let count = |name: &str| now.get(name).copied().unwrap_or(0);
            let migrating = count("ledger-migrate");
            let total: usize = now.values().sum();
            if count("ledger") > POOL_SIZE + MAX_OVERFLOW
                || count("ledger-health") > 1
                || migrating > 1
                || total > POOL_SIZE + MAX_OVERFLOW + 1 + migrating
            {
                over_budget.push(now.clone());
            }
            if worst
                .as_ref()
                .is_none_or(|w| w.values().sum::<usize>() < total)
            {
                worst = Some(now);
            }
            if ready.load(Ordering::SeqCst) {
                let at = *ready_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in traffic {
        task.await.expect("traffic task");
    }

    // Assert
    eprintln!(
        "silent: at most {most_attempts} attempts, {most_sockets} sockets; \
         recovery: at most {worst:?}"
    );
    assert!(
        most_attempts <= attempt_budget,
        "{most_attempts} connection attempts open at once against the silent server \
         (budget {attempt_budget}):\n{}",
        service.log()
    );
    assert!(
        most_sockets <= socket_budget,
        "the service held {most_sockets} sockets (budget {socket_budget})"
    );
    assert!(
        over_budget.is_empty(),
        "server connections over budget during the recovery: {over_budget:?}"
    );
    assert_eq!(service.status("/accounts/1").await, Some(404));
}
