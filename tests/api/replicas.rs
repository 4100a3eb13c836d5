//! Read replicas (contract section 10): a real streaming replica of a private primary,
//! made with `pg_basebackup -R` from the installed server binaries. Each test has its own
//! pair, since pausing replay or stopping the replica would disturb any other test.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::metrics::Scrape;
use crate::support::pg_cluster::PgCluster;
use crate::support::{eventually, spawn_app_on, TestApp, TestDb, SLACK};

const ON_REPLICA: &str = r#"db_reads_total{target="replica",reason="replica"}"#;
const LAGGING: &str = r#"db_reads_total{target="primary",reason="lagging"}"#;
const DOWN: &str = r#"db_reads_total{target="primary",reason="down"}"#;

/// A primary with the service's schema, a streaming replica of it, and the service on
/// both, with `settings` on top.
async fn replicated(settings: &[(&str, &str)]) -> (PgCluster, PgCluster, TestApp) {
    let primary = PgCluster::start().await;
    let url = primary.migrated_database("ledger").await;
    let replica = primary.start_replica().await;
    let replica_url = replica.url("ledger");
    let mut vars = vec![
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_REPLICA_URLS", replica_url.as_str()),
    ];
    vars.extend_from_slice(settings);
    let app = spawn_app_on(TestDb::not_created(), &vars).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            replica_check(&app).await["status"] == "pass"
        })
        .await,
        "the replica becomes eligible: {}",
        app.get("/health").await.text
    );
    (primary, replica, app)
}

/// The replica's entry of `postgres-replica:lag` in `/health`.
async fn replica_check(app: &TestApp) -> Value {
    let health = app.get("/health").await;
    assert_eq!(health.status, 200, "{}", health.text);
    health.body["checks"]["postgres-replica:lag"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_on_a_current_replica_and_writes_never_do() {
    let (primary, replica, app) = replicated(&[]).await;
    let health = app.get("/health").await;
    assert_eq!(health.body["status"], "pass", "{}", health.text);
    let port = url::Url::parse(&replica.url("ledger"))
        .unwrap()
        .port()
        .unwrap();
    let name = format!("127.0.0.1:{port}");
    assert_eq!(
        health.body["checks"]["postgres-replica:responseTime"][0]["componentId"], name,
        "{}",
        health.text
    );
    assert!(!health.text.contains("postgres://"), "{}", health.text);

    // Writes: each would fail on a hot standby (25006, a 503), so all succeeding is proof
    // that none went there.
    let before = Scrape::take(&app).await;
    let a = app.account_id("a", 100).await;
    let b = app.account_id("b", 0).await;
    for _ in 0..5 {
        assert_eq!(app.transfer(a, b, 1).await.status, StatusCode::CREATED);
    }
    let after_writes = Scrape::take(&app).await;
    assert_eq!(
        after_writes.get(ON_REPLICA),
        before.get(ON_REPLICA),
        "no write counted as a read"
    );

    // Reads: served by the replica once it has replayed the writes.
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.get(&format!("/accounts/{b}")).await.body["balance"] == 5
        })
        .await
    );
    for _ in 0..10 {
        assert_eq!(app.get("/transfers?limit=10").await.item_ids().len(), 5);
    }
    let after_reads = Scrape::take(&app).await;
    assert!(
        after_reads.get(ON_REPLICA) - after_writes.get(ON_REPLICA) >= 10.0,
        "reads counted on the replica"
    );
    // The replica's own view: the service's pooled sessions are there.
    let on_replica = replica
        .client("ledger")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ledger'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert!(on_replica >= 1, "the service's sessions on the replica");
    let lag = after_reads.get(&format!(r#"db_replica_lag_seconds{{replica="{name}"}}"#));
    assert!(lag < 1.0, "lag {lag}");
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_reads_stay_on_the_replica_until_the_lag_passes_the_maximum() {
    let (primary, replica, app) = replicated(&[("DB_REPLICA_MAX_LAG", "500")]).await;
    let a = app.account_id("a", 100).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.get(&format!("/accounts/{a}")).await.status == 200
        })
        .await
    );
    let standby = replica.client("ledger").await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A write after the pause: the replica does not have it.
    let before = Scrape::take(&app).await;
    let written = Instant::now();
    let b = app.account_id("b", 1).await;
    let mut answers = Vec::new();
    while written.elapsed() < Duration::from_millis(500) + SLACK {
        let answer = app.get(&format!("/accounts/{b}")).await;
        answers.push((written.elapsed(), answer.status.as_u16()));
        if answer.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale = answers.iter().filter(|(_, s)| *s == 404).count();
    let first_fresh = answers.iter().find(|(_, s)| *s == 200).map(|(t, _)| *t);
    println!("answers after the write: {answers:?}");
    assert!(stale >= 1, "the replica served reads at first: {answers:?}");
    let first_fresh = first_fresh.expect("the primary serves reads once the lag passed 500 ms");
    // Only once the lag measured from the write's sample passed 500 ms (the write's
    // response came back at most a little after its COMMIT).
    assert!(
        first_fresh >= Duration::from_millis(400),
        "the primary took over too early: {answers:?}"
    );
    let after = Scrape::take(&app).await;
    assert!(after.delta(&before, LAGGING) >= 1.0);
    assert_eq!(replica_check(&app).await["status"], "warn");
    assert_eq!(app.get("/health").await.body["status"], "warn");

    // Replay resumed: the replica is current again and serves reads.
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async {
            replica_check(&app).await["status"] == "pass"
        })
        .await
    );
    let resumed = Scrape::take(&app).await;
    assert_eq!(app.get(&format!("/accounts/{b}")).await.status, 200);
    assert_eq!(Scrape::take(&app).await.delta(&resumed, ON_REPLICA), 1.0);
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_replica_under_read_traffic_fails_no_read() {
    let (primary, replica, app) = replicated(&[]).await;
    let a = app.account_id("a", 100).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.get(&format!("/accounts/{a}")).await.status == 200
        })
        .await
    );
    let before = Scrape::take(&app).await;
    let stop_at = Instant::now() + Duration::from_millis(500);
    let end = stop_at + Duration::from_millis(1500);
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let (client, url) = (
                app.client.clone(),
                app.url(&if i % 2 == 0 {
                    format!("/accounts/{a}")
                } else {
                    "/transfers".to_owned()
                }),
            );
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < end {
                    let status = match client.get(&url).send().await {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep_until(stop_at.into()).await;
    replica.stop().await;
    let mut reads = 0;
    for reader in readers {
        let statuses = reader.await.unwrap();
        reads += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "every read answered 200: {statuses:?}"
        );
    }
    let after = Scrape::take(&app).await;
    println!(
        "{reads} reads; on the replica {}, on the primary as down {}",
        after.delta(&before, ON_REPLICA),
        after.delta(&before, DOWN)
    );
    assert!(after.delta(&before, ON_REPLICA) >= 1.0);
    // Down: health warns (200), never fails.
    let health = app.get("/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "warn", "{}", health.text);
    assert_eq!(app.get("/health/ready").await.status, 200);
    assert_eq!(app.get(&format!("/accounts/{a}")).await.status, 200);
    drop(primary);
}
