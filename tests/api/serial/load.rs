//! The pool under load: a burst far beyond its size, and connections retired at their
//! maximum lifetime while traffic flows.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::traffic::{summary, Traffic};
use crate::support::{eventually, spawn_app_with, RETRY_AFTER, SLACK};

/// `DB_POOL_TIMEOUT` of the burst.
const POOL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long each request of the burst holds its connection. 100 of them on 5 connections
/// would queue for 4 s without the pool timeout: longer than the bound below, so the bound
/// fails if the pool timeout does not act.
const WORK: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100_clients_gets_answers_within_the_pool_timeout_and_the_pool_shrinks_back() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "3"),
        ("DB_POOL_TIMEOUT", &POOL_TIMEOUT.as_secs().to_string()),
        ("DB_POOL_IDLE_TIMEOUT", "1"),
        // Two workers share one pool: 5 connections are too few for a pool per worker.
        ("HTTP_WORKERS", "2"),
    ])
    .await;
    // The pool's size, sampled until the burst is over.
    let burst_over = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pool, over) = (app.pool.clone(), burst_over.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while !over.load(Ordering::Relaxed) {
                peak = peak.max(pool.status().size);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    let burst: Vec<_> = (0..100)
        .map(|i| {
            let (client, url) = (
                app.client.clone(),
                app.url(&format!(
                    "/_test/write-then-sleep?name=burst-{i}&ms={}",
                    WORK.as_millis()
                )),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client.post(url).send().await.expect("an answer");
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                (
                    status,
                    body["code"].as_str().map(str::to_owned),
                    retry_after,
                    started.elapsed(),
                )
            })
        })
        .collect();

    // Readiness answers on its own connection while every pooled one is taken and
    // requests queue for them.
    assert!(
        eventually(SLACK, || async {
            let status = app.pool.status();
            status.available == 0 && status.waiting > 0
        })
        .await,
        "the burst took every pooled connection: {:?}",
        app.pool.status()
    );
    let started = Instant::now();
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    // DB_HEALTH_TIMEOUT is 2 s in the tests.
    assert!(started.elapsed() < Duration::from_secs(2) + SLACK);

    let mut succeeded = 0;
    for request in burst {
        let (status, code, retry_after, took) = request.await.expect("burst task");
        match status {
            201 => succeeded += 1,
            503 => {
                assert_eq!(code.as_deref(), Some("database_unavailable"));
                assert_eq!(retry_after.as_deref(), Some(RETRY_AFTER));
            }
            other => panic!("unexpected status {other}"),
        }
        // Check-out is bounded by DB_POOL_TIMEOUT, then the work.
        assert!(
            took < POOL_TIMEOUT + WORK + SLACK,
            "{status} after {took:?}"
        );
    }
    burst_over.store(true, Ordering::Relaxed);
    assert!(succeeded >= 5, "{succeeded} successes");
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM accounts WHERE name LIKE 'burst-%'")
            .await,
        succeeded,
        "exactly the acknowledged writes were committed"
    );
    assert_eq!(
        sampler.await.expect("sampler"),
        5,
        "the burst used the whole overflow, and never more"
    );
    assert_eq!(app.pool.status().waiting, 0);

    // Back to DB_POOL_SIZE idle connections; the pool and the server agree (no leak).
    // (Fewer only if a request that got its connection just before the deadline had it
    // closed with BEGIN in flight, which a heavily loaded machine can provoke.)
    assert!(
        eventually(Duration::from_secs(5), || async {
            let status = app.pool.status();
            status.size <= 2
                && status.available == status.size
                && app.db.sessions("ledger", None).await == status.size as i64
        })
        .await,
        "pool {:?}, server sessions {}",
        app.pool.status(),
        app.db.sessions("ledger", None).await
    );
    assert_eq!(
        app.db.sessions("ledger", Some("idle in transaction")).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_replaced_at_their_max_lifetime_without_failing_a_request() {
    let app = spawn_app_with(&[
        ("DB_POOL_SIZE", "2"),
        ("DB_MAX_OVERFLOW", "0"),
        ("DB_POOL_RECYCLE", "2"),
    ])
    .await;
    let traffic = Traffic::start(&app.address, 2, Duration::from_millis(10), "lifetime");
    let mut pids = HashSet::new();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        pids.extend(app.db.ledger_pids().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcomes = traffic.stop().await;
    assert!(outcomes.len() >= 50, "{}", summary(&outcomes));
    assert!(
        outcomes.iter().all(|o| o.status == 201),
        "no request failed: {}",
        summary(&outcomes)
    );
    assert!(
        pids.len() > 2,
        "backends were replaced ({} seen for a pool of 2)",
        pids.len()
    );
}
