//! A COMMIT whose answer is lost is resolved, not guessed (contract section 2): the proxy
//! breaks the connection exactly at the COMMIT, after relaying every answer before it (the
//! transaction-id query's among them), and the service must find out on another
//! connection what happened before it answers.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::metrics::Scrape;
use crate::support::pg_cluster::PgCluster;
use crate::support::pgwire::CommitFault;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{
    eventually, spawn_app_on, spawn_behind_readable_proxy, within, Answer, TestApp, TestDb, SLACK,
};

/// The service through a proxy that can read its traffic (no TLS), with one pooled
/// connection and a 1 s pool timeout, and `DB_STATEMENT_TIMEOUT` of 1 s (so COMMIT's
/// client-side deadline is 2 s).
async fn spawn_readable() -> (TestApp, Proxy) {
    let (app, proxy) = spawn_behind_readable_proxy(
        TestDb::migrated().await,
        &[
            ("DB_POOL_SIZE", "1"),
            ("DB_MAX_OVERFLOW", "0"),
            ("DB_POOL_TIMEOUT", "1"),
            ("DB_STATEMENT_TIMEOUT", "1000"),
        ],
    )
    .await;
    // A first write on the connection: its COMMIT prepares the id query, so that the next
    // COMMIT pipelines it, as every COMMIT but a connection's first does.
    app.create_account("warm-up", 1).await;
    (app, proxy)
}

/// `POST /accounts` for `name`, with the answer.
async fn create(app: &TestApp, name: &str) -> Answer {
    within(
        Duration::from_secs(15),
        "the answer to a write whose COMMIT broke",
        app.post_json("/accounts", &json!({ "name": name, "balance": 7 })),
    )
    .await
}

/// Change of one `db_transactions_total` series between two scrapes.
fn transactions(before: &Scrape, after: &Scrape, outcome: &str, reason: &str) -> f64 {
    let series = format!(r#"db_transactions_total{{outcome="{outcome}",reason="{reason}"}}"#);
    after.get(&series) - before.get(&series)
}

/// (a) The COMMIT reaches the server and commits, and the connection breaks before its
/// answer reaches the service: the client gets its 201, and the row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_landed_but_whose_answer_was_lost_gets_the_handlers_201() {
    let (app, proxy) = spawn_readable().await;
    let before = Scrape::take(&app).await;
    proxy.on_next_commit(CommitFault::ForwardThenCut);

    let answer = create(&app, "landed").await;

    assert!(
        proxy.commit_fault_used(),
        "the COMMIT went through the fault"
    );
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.body["name"], "landed");
    assert_eq!(app.db.accounts_named("landed").await, 1);
    // The position after the COMMIT was never read: the answer still carries a token, the
    // highest there is, so that a read sending it back goes to the primary (contract
    // section 10) rather than trusting an older write's token.
    assert_eq!(
        answer.header("consistency-token"),
        Some("FFFFFFFF/FFFFFFFF"),
        "a committed write answers with a token"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(
        transactions(&before, &after, "commit", "commit_verified"),
        1.0
    );
    assert_eq!(transactions(&before, &after, "commit", "status"), 0.0);
    assert_eq!(
        after.get(r#"db_pool_connections_closed_total{reason="broken"}"#)
            - before.get(r#"db_pool_connections_closed_total{reason="broken"}"#),
        1.0,
        "the broken connection was closed"
    );
}

/// (b) The COMMIT never reaches the server, and the connection breaks: nothing was
/// written, the client gets 503 `database_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_reached_the_server_gets_503_database_unavailable() {
    let (app, proxy) = spawn_readable().await;
    let before = Scrape::take(&app).await;
    proxy.on_next_commit(CommitFault::SwallowThenCut);

    let answer = create(&app, "swallowed").await;

    assert!(
        proxy.commit_fault_used(),
        "the COMMIT went through the fault"
    );
    answer.assert_problem(503, "database_unavailable");
    assert_eq!(app.db.accounts_named("swallowed").await, 0);
    let after = Scrape::take(&app).await;
    assert_eq!(
        transactions(&before, &after, "rollback", "commit_verified"),
        1.0
    );
    assert_eq!(transactions(&before, &after, "commit", "status"), 0.0);
    // The service serves on.
    app.create_account("after-swallowed", 1).await;
}

/// (c) The COMMIT reaches the server, which then goes silent, and the database cannot
/// be reached for the verification either: 503 `commit_unknown` with `Retry-After`,
/// within the COMMIT's deadline plus `DB_POOL_TIMEOUT`. (The write did land: that is what
/// the answer admits it cannot rule out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_unanswered_while_the_database_is_unreachable_gets_503_commit_unknown() {
    let (app, proxy) = spawn_readable().await;
    let before = Scrape::take(&app).await;
    // New connections (the verification's) are refused; the open one stays up.
    proxy.set_mode(Mode::Refuse);
    proxy.on_next_commit(CommitFault::ForwardThenSilence);

    let started = Instant::now();
    let answer = create(&app, "in-doubt").await;
    let waited = started.elapsed();

    assert!(
        proxy.commit_fault_used(),
        "the COMMIT went through the fault"
    );
    answer.assert_problem(503, "commit_unknown");
    let bound = Duration::from_secs(2) + Duration::from_secs(1);
    assert!(
        waited >= bound - Duration::from_millis(100) && waited < bound + SLACK,
        "the COMMIT's deadline (2 s), then DB_POOL_TIMEOUT (1 s) of verification: {waited:?}"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(
        transactions(&before, &after, "unknown", "commit_unknown"),
        1.0
    );
    assert_eq!(transactions(&before, &after, "unknown", "xid_unknown"), 0.0);

    proxy.set_mode(Mode::Pass);
    assert_eq!(
        app.db.accounts_named("in-doubt").await,
        1,
        "the COMMIT reached the server: the write landed, as commit_unknown allowed"
    );
    app.create_account("after-in-doubt", 1).await;
}

/// The old backend is still alive behind a silent connection, its transaction in
/// progress (its COMMIT held back): the verification ends that backend and asks again,
/// and answers from that final status (aborted: 503 `database_unavailable`), within the
/// COMMIT's deadline plus `DB_POOL_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_still_in_progress_behind_a_silent_connection_is_ended_then_resolved() {
    let (app, proxy) = spawn_readable().await;
    let before = Scrape::take(&app).await;
    // The proxy goes silent on the connection before the COMMIT reaches the server: its
    // backend sits idle in the transaction, which stays in progress.
    proxy.on_next_commit(CommitFault::SwallowThenSilence);

    let started = Instant::now();
    let answer = create(&app, "in-progress").await;
    let waited = started.elapsed();

    assert!(
        proxy.commit_fault_used(),
        "the COMMIT went through the fault"
    );
    answer.assert_problem(503, "database_unavailable");
    assert!(waited < Duration::from_secs(3) + SLACK, "{waited:?}");
    assert_eq!(app.db.accounts_named("in-progress").await, 0);
    assert_eq!(
        app.db.sessions("ledger", Some("idle in transaction")).await,
        0,
        "the old backend was ended"
    );
    let after = Scrape::take(&app).await;
    assert_eq!(
        transactions(&before, &after, "rollback", "commit_verified"),
        1.0
    );
}

/// The service on a private cluster it can crash, through a readable proxy, with one
/// pooled connection, `DB_POOL_TIMEOUT=20` (the verification outlasts the restart) and a
/// 2 s COMMIT deadline.
struct CrashableService {
    cluster: PgCluster,
    /// The database's URL, straight to the cluster.
    url: String,
    proxy: Proxy,
    app: TestApp,
}

impl CrashableService {
    /// Starts the cluster with `settings`, the service on a migrated database, and makes a
    /// first write on its connection durable.
    async fn start(settings: &'static str) -> CrashableService {
        let cluster = PgCluster::start_with_settings(settings).await;
        let url = cluster.migrated_database("ledger").await;
        let mut through = url::Url::parse(&url).unwrap();
        let upstream = format!("127.0.0.1:{}", through.port().unwrap());
        let proxy = Proxy::start(upstream.parse().unwrap()).await;
        through.set_port(Some(proxy.port())).unwrap();
        let through = format!("{through}?sslmode=disable");
        let app = spawn_app_on(
            TestDb::not_created(),
            &[
                ("DATABASE_URL", through.as_str()),
                ("DB_POOL_SIZE", "1"),
                ("DB_MAX_OVERFLOW", "0"),
                ("DB_POOL_TIMEOUT", "20"),
                ("DB_STATEMENT_TIMEOUT", "1000"),
            ],
        )
        .await;
        app.create_account("warm-up", 1).await;
        // The private cluster runs with synchronous_commit off: make what came before the
        // crash durable, so that only the request's transaction is in doubt.
        crate::support::connect(&url)
            .await
            .batch_execute("CHECKPOINT")
            .await
            .unwrap();
        CrashableService {
            cluster,
            url,
            proxy,
            app,
        }
    }

    /// Sends `POST /accounts` for `name` in the background, its COMMIT held back by the
    /// proxy (the server never sees it, and its backend waits in the transaction);
    /// returns once the COMMIT is held.
    async fn post_held_at_commit(
        &self,
        name: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        self.proxy.on_next_commit(CommitFault::SwallowThenSilence);
        let request = self
            .app
            .client
            .post(self.app.url("/accounts"))
            .json(&json!({ "name": name, "balance": 7 }));
        let request = tokio::spawn(request.send());
        assert!(
            eventually(Duration::from_secs(10), || async {
                self.proxy.commit_fault_used()
            })
            .await,
            "the COMMIT reached the proxy"
        );
        request
    }

    /// Rows of `accounts` with this name, read straight from the cluster.
    async fn accounts_named(&self, name: &str) -> i64 {
        crate::support::connect(&self.url)
            .await
            .query_one("SELECT count(*) FROM accounts WHERE name = $1", &[&name])
            .await
            .unwrap()
            .get(0)
    }
}

/// The answer to a request sent in the background.
async fn answer_of(request: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) -> Answer {
    Answer::from(
        within(Duration::from_secs(30), "the answer", request)
            .await
            .unwrap()
            .unwrap(),
    )
    .await
}

/// The server crashes and recovers while a COMMIT's answer is lost (the COMMIT never
/// reached it): after recovery the transaction's id may be handed out again, so the
/// verification must not take the restarted server's word about that id for the old
/// transaction's. It learns that the transaction did not commit there (the id is aborted,
/// or not handed out yet), and the client gets 503 `database_unavailable`, not a
/// `commit_unknown` that would wait out the pool timeout, and never a 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_across_a_server_crash_is_resolved_by_the_restarted_server() {
    let on = CrashableService::start("").await;
    let request = on.post_held_at_commit("crashed").await;
    on.cluster.crash().await;
    on.cluster.restart().await;
    let restarted = Instant::now();

    let answer = answer_of(request).await;
    answer.assert_problem(503, "database_unavailable");
    assert!(
        restarted.elapsed() < Duration::from_secs(2) + SLACK,
        "resolved once the server was back, not at the pool timeout: {:?}",
        restarted.elapsed()
    );
    assert_eq!(on.accounts_named("crashed").await, 0);
}

/// A crash restart by the same postmaster (one backend killed: the postmaster ends the
/// others and recovers) loses what was not flushed, the handing out of the transaction's
/// id among it; here the server then gives that id to another transaction, which commits.
/// `pg_xact_status` now says "committed", about someone else: the verification must see
/// that the server restarted since the id was given (its postmaster start time did not
/// change, its statistics' reset time did), and answer 503 `commit_unknown`, never the
/// handler's 201 for a write that was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_handed_out_again_after_a_crash_restart_is_never_taken_for_the_lost_commit() {
    // The WAL writer waits 10 s, so that the transaction's records are still unflushed
    // when the server crashes.
    let on = CrashableService::start("-c wal_writer_delay=10s").await;
    // The verification cannot reach the server until the id has been handed out again.
    on.proxy.set_mode(Mode::Refuse);
    let request = on.post_held_at_commit("reused").await;
    let admin = crate::support::connect(&on.url).await;
    let row = admin
        .query_one(
            "SELECT pid, backend_xid::text::bigint FROM pg_stat_activity \
             WHERE application_name = 'ledger' AND backend_xid IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    let (pid, xid): (i32, i64) = (row.get(0), row.get(1));
    let reset_time = "SELECT pg_stat_get_bgwriter_stat_reset_time()::text";
    let before: String = admin.query_one(reset_time, &[]).await.unwrap().get(0);
    drop(admin);

    // SAFETY: kill has no memory-safety preconditions; the pid is the cluster's backend.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Burn ids on the recovered server until one transaction commits with ours.
    let deadline = Instant::now() + Duration::from_secs(15);
    // A connection to the server after its crash restart (one made before the postmaster
    // reacted to the kill would be closed under us).
    let client = loop {
        assert!(Instant::now() < deadline, "the server did not come back");
        if let Ok((client, connection)) =
            tokio_postgres::connect(&on.url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let after = client.query_one(reset_time, &[]).await;
            if after.is_ok_and(|row| row.get::<_, String>(0) != before) {
                break client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut reused = false;
    for _ in 0..100_000 {
        let given: i64 = client
            .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .await
            .unwrap()
            .get(0);
        if given >= xid {
            reused = given == xid;
            break;
        }
    }
    assert!(
        reused,
        "the recovered server handed transaction id {xid} out again"
    );

    on.proxy.set_mode(Mode::Pass);
    answer_of(request)
        .await
        .assert_problem(503, "commit_unknown");
    assert_eq!(on.accounts_named("reused").await, 0);
}
