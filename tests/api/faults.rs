//! Faults the service must ride out without a restart: the database restarting, every
//! connection cut, connections refused, and a database that stops answering (a black
//! hole: TCP still acknowledges, so keepalives never fire and only the service's own
//! deadlines help), at start-up too.
//!
//! The restart runs against a private cluster (it stops the server); the others put a
//! proxy between the service and the shared server and break only the proxied traffic.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::metrics::Scrape;
use crate::support::pg_cluster::PgCluster;
use crate::support::proxy::{Mode, Proxy};
use crate::support::traffic::{summary, Outcome, Traffic};
use crate::support::{
    eventually, proxy_to, spawn_app_on, spawn_behind_proxy, within, Answer, TestApp, TestDb, SLACK,
};

/// A 503 that does not wait for a connection that cannot come must be this quick: at once,
/// give or take the suite's slack (the pool timeout in these tests is 5 s, well beyond it).
const FAST: Duration = SLACK;
/// No answer of these tests may take this long; a hang fails the test instead of the suite.
const HANG: Duration = Duration::from_secs(10);

/// Asserts that every acknowledged (201) write of `outcomes` is in the database.
async fn assert_acknowledged_writes_present(client: &tokio_postgres::Client, outcomes: &[Outcome]) {
    let stored: HashSet<i64> = client
        .query("SELECT id FROM accounts", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acknowledged: Vec<i64> = outcomes.iter().filter_map(|o| o.id).collect();
    assert!(!acknowledged.is_empty());
    let lost: Vec<i64> = acknowledged
        .iter()
        .copied()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

async fn readiness(app: &TestApp) -> (u16, Duration) {
    let started = Instant::now();
    let answer = within(HANG, "readiness", app.get("/health/ready")).await;
    (answer.status.as_u16(), started.elapsed())
}

/// Asserts that readiness fails, and within `limit`.
async fn assert_not_ready_within(app: &TestApp, limit: Duration) {
    let (status, took) = readiness(app).await;
    assert_eq!(
        status, 503,
        "readiness while the database cannot be reached"
    );
    assert!(took < limit, "readiness took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_fails_requests_fast_and_the_service_recovers_by_itself() {
    let cluster = PgCluster::start().await;
    let url = cluster.migrated_database("ledger").await;
    let app = spawn_app_on(
        TestDb::not_created(),
        &[
            ("DATABASE_URL", &url),
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "2"),
            ("DB_POOL_TIMEOUT", "5"),
            ("DB_HEALTH_TIMEOUT", "1"),
        ],
    )
    .await;
    let traffic = Traffic::start(&app.address, 3, Duration::from_millis(20), "restart");
    assert!(
        eventually(Duration::from_secs(5), || async {
            readiness(&app).await.0 == 200 && app.pool.status().size > 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.stop().await;
    let down = Instant::now();
    // Two seconds down: liveness passes, readiness fails within its own timeout.
    while down.elapsed() < Duration::from_secs(2) {
        assert_eq!(app.get("/health/live").await.status, 200);
        assert_not_ready_within(&app, Duration::from_secs(1) + SLACK).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.restart().await;
    let up = Instant::now();
    assert!(
        eventually(Duration::from_secs(1) + SLACK, || async {
            readiness(&app).await.0 == 200
        })
        .await,
        "readiness is back within its 1 s timeout of the database accepting connections"
    );
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = traffic.stop().await;
    println!(
        "outcomes {}; readiness back {:?} after the database; slowest 503 {:?}",
        summary(&outcomes),
        recovered - up,
        outcomes
            .iter()
            .filter(|o| o.status == 503)
            .map(|o| o.elapsed)
            .max()
    );

    let client = cluster.client("ledger").await;
    for o in &outcomes {
        match (o.status, o.code.as_deref()) {
            (201, _) => {}
            (503, Some("database_unavailable")) => {
                assert!(o.elapsed < FAST, "a 503 took {:?}", o.elapsed);
                let stored: i64 = client
                    .query_one("SELECT count(*) FROM accounts WHERE name = $1", &[&o.name])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(stored, 0, "{} was answered 503 but committed", o.name);
            }
            // A COMMIT under way when the server shut down (57P01) may have committed; the
            // server cannot be asked until it is back, for at most DB_POOL_TIMEOUT.
            (503, Some("commit_unknown")) => {
                assert!(
                    o.elapsed < Duration::from_secs(5) + SLACK,
                    "{:?}",
                    o.elapsed
                );
            }
            _ => panic!(
                "only successes, 503 database_unavailable and commit_unknown: {}",
                summary(&outcomes)
            ),
        }
    }
    let during_outage = outcomes
        .iter()
        .filter(|o| o.started >= down && o.ended() <= up)
        .count();
    assert!(
        during_outage >= 10,
        "traffic kept flowing (and failing fast) during the outage: {}",
        summary(&outcomes)
    );
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= recovered).collect();
    assert!(after.len() >= 10, "{}", summary(&outcomes));
    assert!(
        after.iter().all(|o| o.status == 201),
        "every request after recovery succeeds: {}",
        summary(&outcomes)
    );
    let db = cluster.client("ledger").await;
    assert_acknowledged_writes_present(&db, &outcomes).await;
    // Dead connections were discarded, not leaked: the pool and the server agree.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let sessions: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ledger'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            sessions == app.pool.status().size as i64
        })
        .await
    );
}

/// Connections cut at random under write traffic: at most one request fails per cut
/// connection; every 201 is in the database, no `database_unavailable` write is, and a
/// COMMIT whose answer was lost is resolved on another connection (`commit_unknown` only
/// where its transaction's id was lost with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_every_connection_fails_at_most_one_request_per_connection() {
    let (app, proxy) = spawn_behind_proxy(
        TestDb::migrated().await,
        &[("DB_POOL_SIZE", "2"), ("DB_MAX_OVERFLOW", "2")],
    )
    .await;
    let traffic = Traffic::start(&app.address, 4, Duration::from_millis(5), "cut");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut cut = 0;
    for _ in 0..3 {
        cut += proxy.cut_all();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let last_cut = Instant::now();
    // Traffic goes on after the last cut: five more writes commit. Waited for rather
    // than given a fixed 300 ms, which a loaded machine (new connections, TLS) can miss.
    let committed = || {
        app.db
            .scalar("SELECT count(*) FROM accounts WHERE name LIKE 'cut-%'")
    };
    let at_last_cut = committed().await;
    let went_on = eventually(SLACK, || async { committed().await >= at_last_cut + 5 }).await;
    let outcomes = traffic.stop().await;

    println!("{cut} connections cut; outcomes {}", summary(&outcomes));
    assert!(cut >= 3, "connections were open to cut: {cut}");
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 201).collect();
    assert!(
        failures.len() <= cut,
        "{} failures for {cut} cut connections: {}",
        failures.len(),
        summary(&outcomes)
    );
    for f in &failures {
        assert_eq!(f.status, 503, "{}", summary(&outcomes));
        match f.code.as_deref() {
            // A plain 503 is never sent for a write that committed.
            Some("database_unavailable") => assert_eq!(
                app.db.accounts_named(&f.name).await,
                0,
                "{} was answered 503 database_unavailable but committed",
                f.name
            ),
            Some("commit_unknown") => {}
            other => panic!("unexpected failure {other:?}: {}", summary(&outcomes)),
        }
    }
    // The server stayed reachable, so a COMMIT whose answer was lost was resolved: it is
    // unknown only when the transaction's id was lost with it (a cut within the round
    // trip of the two pipelined answers), never because the server could not be asked.
    let after = Scrape::take(&app).await;
    let unknown = outcomes
        .iter()
        .filter(|o| o.code.as_deref() == Some("commit_unknown"))
        .count() as f64;
    assert_eq!(
        after.get(r#"db_transactions_total{outcome="unknown",reason="xid_unknown"}"#),
        unknown
    );
    assert_eq!(
        after.get(r#"db_transactions_total{outcome="unknown",reason="commit_unknown"}"#),
        0.0
    );
    assert!(
        went_on && outcomes.iter().filter(|o| o.started >= last_cut).count() >= 5,
        "traffic went on after the last cut: {}",
        summary(&outcomes)
    );
    assert_eq!(readiness(&app).await.0, 200);
    assert_acknowledged_writes_present(&app.db.client().await, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_fail_requests_fast_until_the_database_accepts_again() {
    let (app, proxy) = spawn_behind_proxy(
        TestDb::migrated().await,
        &[("DB_POOL_TIMEOUT", "5"), ("DB_HEALTH_TIMEOUT", "1")],
    )
    .await;
    app.create_account("before", 1).await;
    assert_eq!(readiness(&app).await.0, 200);

    proxy.set_mode(Mode::Refuse);
    proxy.cut_all();
    for i in 0..5 {
        let started = Instant::now();
        let answer = within(
            HANG,
            "request",
            app.post_json("/accounts", &json!({ "name": format!("refused-{i}") })),
        )
        .await;
        answer.assert_problem(503, "database_unavailable");
        assert!(started.elapsed() < FAST, "{:?}", started.elapsed());
        assert_not_ready_within(&app, FAST).await;
    }

    proxy.set_mode(Mode::Pass);
    app.create_account("after", 1).await;
    assert_eq!(readiness(&app).await.0, 200);
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM accounts WHERE name LIKE 'refused-%'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_database_fails_check_outs_and_readiness_within_their_timeouts() {
    let (app, proxy) = spawn_behind_proxy(
        TestDb::migrated().await,
        &[
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "1"),
            ("DB_HEALTH_TIMEOUT", "1"),
        ],
    )
    .await;
    // Two pooled connections, idle for longer than the ping window...
    let empty = json!({});
    let (a, b) = tokio::join!(
        app.post_json("/_test/write-then-sleep?name=warm-a&ms=200", &empty),
        app.post_json("/_test/write-then-sleep?name=warm-b&ms=200", &empty),
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (201, 201));
    assert_eq!(app.pool.status().size, 2);
    assert_eq!(readiness(&app).await.0, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // ...then one of them used again: LIFO hands it out next, without a ping.
    app.create_account("warm-c", 1).await;

    proxy.set_mode(Mode::BlackHole);
    // In LIFO order: BEGIN on the recently used connection hangs, then the ping of the
    // long-idle one, then connecting a new one. The outer check-out deadline ends each.
    let cases = ["begin-hangs", "ping-hangs", "connect-hangs"];
    for case in cases {
        let started = Instant::now();
        let answer = within(
            HANG,
            case,
            app.post_json("/accounts", &json!({ "name": case })),
        )
        .await;
        let took = started.elapsed();
        answer.assert_problem(503, "database_unavailable");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(1) + SLACK,
            "{case}: {took:?}"
        );
    }
    assert_eq!(
        app.pool.status().size,
        0,
        "the connections that hung were discarded"
    );
    // Readiness fails within its own timeout: first its connection's ping hangs, then
    // reconnecting does.
    for _ in 0..2 {
        assert_not_ready_within(&app, Duration::from_secs(1) + SLACK).await;
    }
    let started = Instant::now();
    assert_eq!(app.get("/health/live").await.status, 200);
    assert!(started.elapsed() < SLACK, "liveness answers at once");

    proxy.set_mode(Mode::Pass);
    app.create_account("after-black-hole", 1).await;
    assert_eq!(readiness(&app).await.0, 200);
    // Nothing of the failed requests was written, and the abandoned sessions ended.
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await
    );
    for case in cases {
        assert_eq!(app.db.accounts_named(case).await, 0, "{case}");
    }
}

/// The service behind a proxy with a single pooled connection, a 1 s pool timeout and a
/// 1 s statement timeout (so a 2 s client-side statement deadline: the statement timeout
/// plus the 1 s margin).
async fn one_connection_behind_proxy() -> (TestApp, Proxy) {
    spawn_behind_proxy(
        TestDb::migrated().await,
        &[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "1"),
            ("DB_STATEMENT_TIMEOUT", "1000"),
        ],
    )
    .await
}

/// The client-side deadline of a statement under [`one_connection_behind_proxy`].
const STATEMENT_DEADLINE: Duration = Duration::from_secs(2);

/// Makes the database go silent, then waits for the answer to `request`: the answer and
/// how long it took from the moment the database went silent.
async fn black_hole_then_answer(
    proxy: &Proxy,
    request: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) -> (Answer, Duration) {
    proxy.set_mode(Mode::BlackHole);
    let holed = Instant::now();
    let answer = within(HANG, "the request that met the silent database", async {
        Answer::from(request.await.expect("request task").expect("POST")).await
    })
    .await;
    (answer, holed.elapsed())
}

/// Lets traffic through again: the service serves a write, and no transaction of its is
/// left open on the server.
async fn recovers_with_no_open_transaction(app: &TestApp, proxy: &Proxy, name: &str) {
    proxy.set_mode(Mode::Pass);
    app.create_account(name, 1).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            app.db.sessions("ledger", Some("idle in transaction")).await == 0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_mid_statement_gets_503_timeout_and_a_new_connection() {
    let (app, proxy) = one_connection_behind_proxy().await;
    let path = |name: &str| format!("/_test/write-then-pg-sleep?name={name}&ms=600");
    // Control: the same request succeeds when the database answers.
    let control = app.post_json(&path("control"), &json!({})).await;
    assert_eq!(control.status, 200, "{}", control.text);

    let request = app.post_in_background(&path("mid-statement"));
    let observer = app.db.client().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            let running: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name = 'ledger' AND state = 'active' AND query LIKE '%pg_sleep%'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            running == 1
        })
        .await,
        "the statement is running"
    );
    let (answer, waited) = black_hole_then_answer(&proxy, request).await;
    answer.assert_problem(503, "timeout");
    assert!(
        waited < STATEMENT_DEADLINE + SLACK,
        "the client-side statement deadline fired: {waited:?}"
    );
    assert_eq!(app.pool.status().size, 0, "the connection was discarded");

    recovers_with_no_open_transaction(&app, &proxy, "after-mid-statement").await;
    assert_eq!(app.db.accounts_named("mid-statement").await, 0);
    assert_eq!(app.db.accounts_named("control").await, 1);
}

/// A check-out made from a local task the handler awaits (not from the handler's own
/// future) is bounded by `DB_POOL_TIMEOUT` too: the middleware's timer must wake that task
/// when BEGIN hangs on a connection handed out without a ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_out_in_a_local_task_gives_up_at_the_pool_timeout() {
    let (app, proxy) = one_connection_behind_proxy().await;
    let path = |name: &str| format!("/_test/write-in-local-task?name={name}");
    // Control, which also leaves the connection recently used: the next check-out skips
    // the ping and goes straight to BEGIN.
    let control = app.post_json(&path("local-control"), &json!({})).await;
    assert_eq!(control.status, 201, "{}", control.text);

    proxy.set_mode(Mode::BlackHole);
    let holed = Instant::now();
    let answer = within(
        HANG,
        "check-out in a local task",
        app.post_json(&path("local-hang"), &json!({})),
    )
    .await;
    let waited = holed.elapsed();
    answer.assert_problem(503, "database_unavailable");
    assert!(
        waited < Duration::from_secs(1) + SLACK,
        "the check-out deadline reached the local task: {waited:?}"
    );

    recovers_with_no_open_transaction(&app, &proxy, "after-local-hang").await;
    assert_eq!(app.db.accounts_named("local-hang").await, 0);
    assert_eq!(app.db.accounts_named("local-control").await, 1);
}

/// Start-up against a database that accepts TCP but never answers: the service starts
/// (live 200, ready 503), and a migration attempt stuck in the connection handshake must
/// not stop the background retries once the database answers new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_retried_past_a_connection_attempt_that_hangs() {
    let db = TestDb::empty().await;
    let (proxy, url) = proxy_to(&db).await;
    proxy.set_mode(Mode::BlackHole);
    let app = spawn_app_on(
        db,
        &[
            ("DATABASE_URL", &url),
            ("RUN_MIGRATIONS", "true"),
            ("DB_POOL_TIMEOUT", "1"),
            ("DB_HEALTH_TIMEOUT", "1"),
        ],
    )
    .await;
    assert_eq!(app.get("/health/live").await.status, 200);
    assert_not_ready_within(&app, Duration::from_secs(1) + SLACK).await;

    // The attempts under way stay stuck for good; new connections get answers.
    proxy.freeze_open();
    assert!(
        eventually(Duration::from_secs(6), || async {
            readiness(&app).await.0 == 200
        })
        .await,
        "migrations were applied by a later attempt"
    );
    app.create_account("migrated-late", 1).await;
}
