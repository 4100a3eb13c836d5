//! Read replicas (contract section 10): a real streaming replica of a private primary,
//! made with `pg_basebackup -R` from the installed server binaries. Each test has its own
//! pair, since pausing replay or stopping the replica would disturb any other test.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::metrics::Scrape;
use crate::support::pg_cluster::PgCluster;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{eventually, requests_while_blocked, spawn_app_on, TestApp, TestDb, SLACK};

const ON_REPLICA: &str = r#"db_reads_total{target="replica",reason="replica"}"#;
const LAGGING: &str = r#"db_reads_total{target="primary",reason="lagging"}"#;
const DOWN: &str = r#"db_reads_total{target="primary",reason="down"}"#;
const RECYCLE_FAILED: &str = r#"db_pool_connections_closed_total{reason="recycle_failed"}"#;

/// A primary with the service's schema, a streaming replica of it, and the service on
/// both, with `settings` on top.
async fn replicated(settings: &[(&str, &str)]) -> (PgCluster, PgCluster, TestApp) {
    replicated_with("", "", settings).await
}

/// [`replicated`], with `server` (`-c name=value` options) for both servers, and
/// `ledger_sql` run in the primary's database before the replica is made from it.
async fn replicated_with(
    server: &'static str,
    ledger_sql: &str,
    settings: &[(&str, &str)],
) -> (PgCluster, PgCluster, TestApp) {
    let primary = PgCluster::start_with_settings(server).await;
    let url = primary.migrated_database("ledger").await;
    if !ledger_sql.is_empty() {
        primary
            .client("ledger")
            .await
            .batch_execute(ledger_sql)
            .await
            .unwrap();
    }
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

/// A hot standby refuses `SERIALIZABLE`, also as the default: with the database's
/// `default_transaction_isolation` at `serializable` (set on the primary, so the replica
/// has it too), a bare `BEGIN READ ONLY` there fails at its first statement, and so do a
/// bare `SELECT` of the lag measurement and a `SELECT 1` ping. The replica still serves
/// the reads, its lag is measured, and its idle connections pass their ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_on_the_replica_also_when_the_default_isolation_is_serializable() {
    let (primary, replica, app) = replicated_with(
        "",
        "ALTER DATABASE ledger SET default_transaction_isolation = 'serializable'",
        &[],
    )
    .await;
    // `SHOW` takes no snapshot: the standby answers it.
    let shown = replica
        .client("ledger")
        .await
        .simple_query("SHOW default_transaction_isolation")
        .await
        .unwrap();
    let default = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(default.as_deref(), Some("serializable"));

    let a = readable_account(&app).await;
    let before = Scrape::take(&app).await;
    for _ in 0..3 {
        // Past the 500 ms after which an idle connection is pinged before its reuse.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let one = app.get(&format!("/accounts/{a}")).await;
        assert_eq!(one.status, 200, "{}", one.text);
        let page = app.get("/transfers").await;
        assert_eq!(page.status, 200, "{}", page.text);
    }
    let after = Scrape::take(&app).await;
    assert_eq!(
        after.delta(&before, ON_REPLICA),
        6.0,
        "every read on the replica"
    );
    assert_eq!(after.delta(&before, RECYCLE_FAILED), 0.0, "no ping failed");
    assert_eq!(replica_check(&app).await["status"], "pass");
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_reads_stay_on_the_replica_until_the_lag_passes_the_maximum() {
    let (primary, replica, app) = replicated(&[("DB_REPLICA_MAX_LAG", "500")]).await;
    readable_account(&app).await;
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
    let a = readable_account(&app).await;
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
    // And its lag is unknown, not the last value measured: an alert on it fires.
    let port = url::Url::parse(&replica.url("ledger"))
        .unwrap()
        .port()
        .unwrap();
    let lag_series = format!(r#"db_replica_lag_seconds{{replica="127.0.0.1:{port}"}}"#);
    assert!(
        eventually(Duration::from_secs(5), || async {
            Scrape::take(&app).await.get(&lag_series).is_infinite()
        })
        .await,
        "the lag of a stopped replica is +Inf"
    );
    drop(primary);
}

const BY_TOKEN: &str = r#"db_reads_total{target="primary",reason="token"}"#;

/// The `Consistency-Token` of a write's answer, checked against the contract's pattern.
fn token_of(answer: &crate::support::Answer) -> String {
    let token = answer
        .header("consistency-token")
        .unwrap_or_else(|| panic!("a write's 2xx carries a token: {:?}", answer.headers))
        .to_owned();
    let (high, low) = token.split_once('/').expect("X/Y");
    for part in [high, low] {
        assert!(
            (1..=8).contains(&part.len())
                && part
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
            "{token}"
        );
    }
    token
}

async fn get_with_token(app: &TestApp, path: &str, token: &str) -> crate::support::Answer {
    crate::support::Answer::from(
        app.client
            .get(app.url(path))
            .header("consistency-token", token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn every_2xx_to_a_write_carries_a_consistency_token_and_a_malformed_one_is_400() {
    let app = crate::support::spawn_app().await;
    let a = app
        .post_json(
            "/accounts",
            &serde_json::json!({ "name": "a", "balance": 10 }),
        )
        .await;
    let first = token_of(&a);
    let a = a.body["id"].as_i64().unwrap();
    let b = app.account_id("b", 0).await;
    let body = format!(r#"{{"from_account_id":{a},"to_account_id":{b},"amount":1}}"#);
    let created = app.post_keyed("/transfers", Some("k-1"), &body).await;
    assert_eq!(created.status, 201);
    let second = token_of(&created);
    let replay = app.post_keyed("/transfers", Some("k-1"), &body).await;
    assert!(replay.status.is_success(), "{}", replay.text);
    let third = token_of(&replay);
    assert!(lsn(&first) < lsn(&second) && lsn(&second) <= lsn(&third));
    // Reads and failed writes carry none.
    assert!(app
        .get("/accounts")
        .await
        .header("consistency-token")
        .is_none());
    assert!(app
        .transfer(a, b, 1_000)
        .await
        .header("consistency-token")
        .is_none());

    // A token the client kept is accepted without replicas; a malformed one is refused.
    assert_eq!(get_with_token(&app, "/accounts", &first).await.status, 200);
    for bad in [
        "",
        "0/16b3748",
        "0-16B3748",
        "123456789/0",
        "0/1/2",
        "token",
    ] {
        get_with_token(&app, "/accounts", bad)
            .await
            .assert_problem(400, "bad_request");
    }
}

/// A write's token is at or past its own commit record, found in the write-ahead log by
/// the transaction's id (`pg_walinspect`): the position is read after the COMMIT, not
/// before it (it is pipelined behind the COMMIT, on the same connection).
#[tokio::test]
async fn a_writes_token_is_at_or_past_its_commit_record_in_the_wal() {
    let app = crate::support::spawn_app().await;
    let a = app.account_id("a", 100).await;
    let b = app.account_id("b", 0).await;
    let db = app.db.client().await;
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .await
        .unwrap();
    for _ in 0..5 {
        let start: String = db
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let created = app.transfer(a, b, 1).await;
        assert_eq!(created.status, 201, "{}", created.text);
        let token = token_of(&created);
        let id = created.body["id"].as_i64().unwrap();
        let commit_end: String = db
            .query_one(
                "SELECT r.end_lsn::text FROM transfers t, \
                 pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn()) r \
                 WHERE t.id = $2 AND r.resource_manager = 'Transaction' \
                 AND r.record_type = 'COMMIT' AND r.xid::text = t.xmin::text",
                &[&start, &id],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            lsn(&token) >= lsn(&commit_end),
            "token {token} before the end of the commit record, {commit_end}"
        );
    }
}

fn lsn(t: &str) -> u64 {
    let (h, l) = t.split_once('/').unwrap();
    (u64::from_str_radix(h, 16).unwrap() << 32) | u64::from_str_radix(l, 16).unwrap()
}

/// The token is checked after routing: a path no route knows stays 404 and a method the
/// resource does not declare stays 405, whatever the header holds (found by the fuzzer:
/// `TRACE /accounts` with a malformed token was answered 400).
#[tokio::test]
async fn a_malformed_token_does_not_hide_404_or_405() {
    let app = crate::support::spawn_app().await;
    get_with_token(&app, "/nowhere", "token")
        .await
        .assert_problem(404, "not_found");
    let trace = crate::support::Answer::from(
        app.client
            .request(reqwest::Method::TRACE, app.url("/accounts"))
            .header("consistency-token", "token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    trace.assert_problem(405, "method_not_allowed");
    // On a declared method it is still refused, probes included.
    get_with_token(&app, "/health/live", "token")
        .await
        .assert_problem(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_the_writes_token_sees_it_also_while_replay_is_paused() {
    let (primary, replica, app) = replicated(&[]).await;
    // Current replica: the token's read is served there, and sees the write.
    for i in 0..5 {
        let created = app
            .post_json("/accounts", &serde_json::json!({ "name": format!("c{i}") }))
            .await;
        let token = token_of(&created);
        let id = created.body["id"].as_i64().unwrap();
        let read = get_with_token(&app, &format!("/accounts/{id}"), &token).await;
        assert_eq!(read.status, 200, "read-your-writes: {}", read.text);
    }

    let standby = replica.client("ledger").await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = Scrape::take(&app).await;
    let created = app
        .post_json("/accounts", &serde_json::json!({ "name": "paused" }))
        .await;
    let token = token_of(&created);
    let id = created.body["id"].as_i64().unwrap();
    let path = format!("/accounts/{id}");
    // With the token: the primary, which has it. Without: the (stale) replica.
    assert_eq!(get_with_token(&app, &path, &token).await.status, 200);
    assert_eq!(
        app.get(&path).await.status,
        404,
        "served by the paused replica"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(after.delta(&before, BY_TOKEN), 1.0);
    assert_eq!(after.delta(&before, ON_REPLICA), 1.0);

    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let resumed = Scrape::take(&app).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            get_with_token(&app, &path, &token).await.status == 200
                && Scrape::take(&app).await.delta(&resumed, ON_REPLICA) >= 1.0
        })
        .await,
        "once replayed, the token's reads go to the replica again"
    );
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_replica_connection_breaks_mid_statement_is_answered_by_the_primary() {
    let (primary, replica, app) = replicated(&[]).await;
    let before = Scrape::take(&app).await;
    let started = Instant::now();
    let (read, standby) = sleeping_read_on_replica(&app, &replica, 1500).await;
    // The read's statement is running on the replica: end its backend there, as a crash
    // or a restart of the replica would.
    standby
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {SLEEPING_READ}"
        ))
        .await
        .unwrap();
    answered_by_the_primary_once_more(read, started, 1500, &app, &before).await;
    drop(primary);
}

/// An account made through the service, once a read of it answers 200 (from the replica
/// as soon as it has replayed the account and its lag allows).
async fn readable_account(app: &TestApp) -> i64 {
    let a = app.account_id("a", 100).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            app.get(&format!("/accounts/{a}")).await.status == 200
        })
        .await
    );
    a
}

/// The service's read of `/_test/read-sleep`, running, in `pg_stat_activity`.
const SLEEPING_READ: &str =
    "application_name = 'ledger' AND query LIKE '%pg_sleep%' AND state = 'active'";

/// Starts a read that sleeps `ms` on the server, checks that it runs on `replica`, and
/// gives back the pending answer and a client of the replica's database.
async fn sleeping_read_on_replica(
    app: &TestApp,
    replica: &PgCluster,
    ms: u64,
) -> (
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    tokio_postgres::Client,
) {
    let request = app
        .client
        .get(app.url(&format!("/_test/read-sleep?name=r&ms={ms}")));
    let read = tokio::spawn(request.send());
    let standby = replica.client("ledger").await;
    assert!(
        sleeping_read_runs_on(&standby).await,
        "the read runs on the replica"
    );
    (read, standby)
}

/// Checks that the sleeping read begun at `started` on a replica was answered 200 after
/// running again in full (`ms`) on the primary: one read began on the replica, one was
/// sent to the primary because its replica failed.
async fn answered_by_the_primary_once_more(
    read: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    started: Instant,
    ms: u64,
    app: &TestApp,
    before: &Scrape,
) {
    let answer = read.await.unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(answer.status(), 200, "answered by the primary, once more");
    assert!(
        took >= Duration::from_millis(ms),
        "ran again in full: {took:?}"
    );
    let after = Scrape::take(app).await;
    assert_eq!(after.delta(before, ON_REPLICA), 1.0);
    assert_eq!(after.delta(before, DOWN), 1.0, "run again on the primary");
}

/// Whether the sleeping read is seen running on the server of `client` within a second.
async fn sleeping_read_runs_on(client: &tokio_postgres::Client) -> bool {
    eventually(Duration::from_secs(1), || async {
        client
            .query_one(
                &format!("SELECT count(*) FROM pg_stat_activity WHERE {SLEEPING_READ}"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await
}

/// A read that its own statement timeout cancels on its replica (57014) is answered as a
/// timeout at once: run again on the primary, it would take as long again and load the
/// primary, for the same answer. The replica is not counted as down either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_times_out_on_its_replica_is_not_run_again_on_the_primary() {
    let (primary, _replica, app) = replicated(&[("DB_STATEMENT_TIMEOUT", "500")]).await;
    let before = Scrape::take(&app).await;
    let started = Instant::now();
    let answer = app.get("/_test/read-sleep?name=r&ms=3000").await;
    let took = started.elapsed();
    answer.assert_problem(503, "timeout");
    assert!(
        took < Duration::from_millis(900),
        "answered after one statement timeout: {took:?}"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(after.delta(&before, ON_REPLICA), 1.0);
    assert_eq!(
        after.delta(&before, DOWN),
        0.0,
        "not run again on the primary"
    );
    assert_eq!(replica_check(&app).await["status"], "pass");
    drop(primary);
}

/// A read whose statement replay cancels on its replica (a recovery conflict: the standby
/// waits no time, `max_standby_streaming_delay=0`, for a read whose snapshot still sees
/// rows that a `VACUUM` on the primary removed) is run again on the primary, which
/// answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_by_a_recovery_conflict_is_answered_by_the_primary() {
    let (primary, replica, app) = replicated_with(
        "-c max_standby_streaming_delay=0",
        "CREATE TABLE conflict_probe (id int) WITH (autovacuum_enabled = false); \
         INSERT INTO conflict_probe SELECT generate_series(1, 100)",
        &[],
    )
    .await;
    let before = Scrape::take(&app).await;
    let started = Instant::now();
    let (read, standby) = sleeping_read_on_replica(&app, &replica, 2000).await;
    // Rows the read's snapshot still sees, removed on the primary: replaying their removal
    // conflicts with the read.
    let writer = primary.client("ledger").await;
    writer
        .batch_execute("DELETE FROM conflict_probe")
        .await
        .unwrap();
    writer.batch_execute("VACUUM conflict_probe").await.unwrap();

    answered_by_the_primary_once_more(read, started, 2000, &app, &before).await;
    // It was a recovery conflict, as the standby counts them (once the cancelled backend
    // has flushed its statistics: within a second of going idle, or ten when busy).
    assert!(
        eventually(Duration::from_secs(12), || async {
            standby
                .query_one(
                    "SELECT confl_snapshot + confl_lock FROM pg_stat_database_conflicts \
                     WHERE datname = 'ledger'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                >= 1
        })
        .await,
        "the standby counted a recovery conflict"
    );
    drop(primary);
}

/// A replica that accepts connections and never answers (each of its measurements waits
/// out the probe timeout) delays the measurement of neither the primary nor the other
/// replica: a read that hands back a write's token is served by the current replica
/// within a few measurement intervals of the write, not once the silent one gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_delays_the_measurement_of_no_other_server() {
    let primary = PgCluster::start().await;
    let url = primary.migrated_database("ledger").await;
    let replica = primary.start_replica().await;
    let silent = Proxy::start(format!("127.0.0.1:{}", replica.port()).parse().unwrap()).await;
    silent.set_mode(Mode::Silent);
    let urls = format!(
        "{},postgres://postgres@127.0.0.1:{}/ledger",
        replica.url("ledger"),
        silent.port()
    );
    let app = spawn_app_on(
        TestDb::not_created(),
        &[
            ("DATABASE_URL", url.as_str()),
            ("DATABASE_REPLICA_URLS", urls.as_str()),
            ("DB_HEALTH_TIMEOUT", "3000"),
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            replica_check(&app).await["status"] == "pass"
        })
        .await,
        "the current replica becomes eligible: {}",
        app.get("/health").await.text
    );
    for i in 0..3 {
        let created = app
            .post_json("/accounts", &serde_json::json!({ "name": format!("s{i}") }))
            .await;
        let token = token_of(&created);
        let path = format!("/accounts/{}", created.body["id"].as_i64().unwrap());
        let written = Instant::now();
        let before = Scrape::take(&app).await;
        let mut on_replica = None;
        while written.elapsed() < Duration::from_secs(4) {
            assert_eq!(get_with_token(&app, &path, &token).await.status, 200);
            if Scrape::take(&app).await.delta(&before, ON_REPLICA) >= 1.0 {
                on_replica = Some(written.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let on_replica = on_replica.expect("the token's reads reach the current replica");
        assert!(
            on_replica < Duration::from_secs(1),
            "measured while the silent replica was waited for: {on_replica:?}"
        );
    }
    drop(primary);
}

/// With a pool per worker, each worker has a pool of each replica too, opened and driven
/// by that worker: reads on the replica are served while the application's runtime (here
/// the test's, which also runs the lag measurements) cannot run at all. With the replica's
/// connections driven on that runtime, the reads would wait for it.
#[tokio::test]
async fn with_a_pool_per_worker_replica_reads_need_no_other_thread_than_their_worker() {
    // Primary: 10 connections, 2 the application's, 4 per worker; replica: 10, 1 shared,
    // 5 + 4 for the workers.
    let (primary, _replica, app) = replicated(&[
        ("HTTP_WORKERS", "2"),
        ("DB_POOL_SIZE", "5"),
        ("DB_MAX_OVERFLOW", "5"),
    ])
    .await;
    let id = readable_account(&app).await;
    let url = app.url(&format!("/accounts/{id}"));
    // Each worker once, on a fresh TCP connection (Actix hands them out in turn), so
    // that both have built their pools.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(3))
            .build()
            .expect("client")
    };
    for _ in 0..2 {
        assert_eq!(fresh().get(&url).send().await.expect("read").status(), 200);
    }
    let before = Scrape::take(&app).await;
    // Blocks the application's runtime thread while the reads run (well within the
    // maximum lag, so the replica stays eligible).
    let reads =
        requests_while_blocked(2, Duration::from_secs(2), move |client, _| client.get(&url));
    for (status, took) in reads {
        assert_eq!(status.expect("answered"), StatusCode::OK);
        assert!(
            took < Duration::from_secs(1),
            "served in {took:?} while the application's runtime was blocked"
        );
    }
    let after = Scrape::take(&app).await;
    assert_eq!(
        after.delta(&before, ON_REPLICA),
        2.0,
        "both reads ran on the replica"
    );
    // The replica's budget split, not multiplied: 1 shared + 5 + 4; the primary's too.
    assert_eq!(app.pool.replicas()[0].pool.max_size, 10);
    assert_eq!(app.pool.status().max_size, 10);
    drop(primary);
}
