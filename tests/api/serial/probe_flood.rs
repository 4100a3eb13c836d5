//! Readiness survives a probe flood (contract section 5): hundreds of concurrent probes
//! over a slow link share round trips, so none queues past `DB_HEALTH_TIMEOUT` and the
//! readiness connection is never given up on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::binary::Binary;
use crate::support::{eventually, proxy_to, TestDb};

const PROBERS: usize = 300;
const FLOOD_FOR: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// What the test's own client adds to an answer's time: its share of two busy cores, with
/// 300 other requests in flight on the same runtime.
const CLIENT_SLACK: Duration = Duration::from_millis(500);

/// Backend pids of the readiness connection on `db`.
async fn readiness_backends(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'ledger-health'",
            &[&db.name],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_flood_over_a_slow_link_keeps_readiness_passing_on_one_connection() {
    // Arrange: 10 ms each way adds 20 ms to every round trip, as a database in another
    // zone does; 300 probes taking turns would need 6 s, three times the timeout.
    let db = TestDb::migrated().await;
    let (proxy, url) = proxy_to(&db).await;
    proxy.set_latency(Duration::from_millis(10));
    let service = Arc::new(
        Binary::start(&[
            ("DATABASE_URL", &url),
            ("RUN_MIGRATIONS", "false"),
            ("DB_HEALTH_TIMEOUT", "2"),
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "2"),
            ("HTTP_WORKERS", "2"),
        ])
        .await,
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            service.status("/readyz").await == Some(200)
        })
        .await,
        "ready before the flood:\n{}",
        service.log()
    );
    let before = readiness_backends(&db).await;
    assert_eq!(before.len(), 1, "{before:?}");

    // Act: the flood, while readiness is polled as Kubernetes would.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let flood: Vec<_> = (0..PROBERS)
        .map(|_| {
            let (service, stop) = (service.clone(), stop.clone());
            let (answered, failed) = (answered.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let status = service.status("/health").await;
                    answered.fetch_add(1, Ordering::SeqCst);
                    if status != Some(200) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let mut polls = Vec::new();
    let started = Instant::now();
    while started.elapsed() < FLOOD_FOR {
        let sent = Instant::now();
        let status = service.status("/readyz").await;
        polls.push((status, sent.elapsed()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in flood {
        task.await.expect("prober");
    }
    let after = readiness_backends(&db).await;

    // Assert
    let late: Vec<_> = polls
        .iter()
        .filter(|(status, took)| *status != Some(200) || *took > HEALTH_TIMEOUT + CLIENT_SLACK)
        .collect();
    let (answered, failed) = (
        answered.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    eprintln!(
        "{} readiness polls, {} failed or late; {answered} flood probes, {failed} not 200",
        polls.len(),
        late.len()
    );
    assert!(late.is_empty(), "polls failed or late: {late:?}");
    assert_eq!(failed, 0, "flood probes that were not 200 (of {answered})");
    assert_eq!(before, after, "the readiness connection was replaced");
}
