//! Graceful shutdown of the real binary (contract section 5): on SIGTERM or SIGINT the
//! service fails readiness at once, keeps serving for `SHUTDOWN_DRAIN_SECS`, then stops
//! accepting, lets in-flight requests finish and commit, closes the pool and exits 0. A
//! request that outlives `SHUTDOWN_TIMEOUT_SECS` is dropped and rolled back.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::binary::Binary;
use crate::support::{eventually, Answer, TestDb, SLACK};

/// actix checks every second whether its workers' connections are done, and the process
/// needs a moment to close the pool and exit: the bound beyond drain + in-flight time.
const EXIT_MARGIN: Duration = Duration::from_secs(1).checked_add(SLACK).unwrap();

/// The `ledger` binary, running on its own port against a test database.
struct Service(Binary);

impl std::ops::Deref for Service {
    type Target = Binary;

    fn deref(&self) -> &Binary {
        &self.0
    }
}

impl Service {
    /// Starts the binary against `db` (migrated already) with `vars` on top, and waits
    /// until it is ready.
    async fn start(db: &TestDb, vars: &[(&str, &str)]) -> Service {
        let mut all = vec![
            ("DATABASE_URL", db.url.as_str()),
            ("RUN_MIGRATIONS", "false"),
            // A pool per worker of 4 (with 9 connections, 1 the application's): the
            // in-flight writes (3) may all land on one worker, and the drain requests
            // must not wait behind them.
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "7"),
            ("RUST_LOG", "info"),
        ];
        all.extend_from_slice(vars);
        let service = Service(Binary::start(&all).await);
        service.wait_ready().await;
        service
    }

    async fn get(&self, path: &str) -> Answer {
        Answer::from(self.client.get(self.url(path)).send().await.expect("GET")).await
    }

    /// A POST on its own in a task; `None` if no response came.
    fn spawn_post(&self, path: &str) -> tokio::task::JoinHandle<Option<Answer>> {
        let (client, url) = (self.client.clone(), self.url(path));
        tokio::spawn(async move {
            match client.post(url).json(&json!({})).send().await {
                Ok(response) => Some(Answer::from(response).await),
                Err(_) => None,
            }
        })
    }

    /// Waits for the process to exit; returns its status, or `None` after `within`.
    async fn exit(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.0.child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait"))
    }
}

/// Whether a new TCP connection to `port` is accepted.
async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// The whole drain sequence after `signal`, with writes in flight and new ones arriving.
async fn drains_then_exits_0_with_every_acknowledged_write_committed(signal: libc::c_int) {
    // New requests go out during the first second of the drain window; the window lasts
    // SLACK longer, so that the last of them is served well before the listener closes.
    const DRAIN: Duration = Duration::from_secs(1).checked_add(SLACK).unwrap();
    const SENDING: Duration = DRAIN.checked_sub(SLACK).unwrap();
    // In-flight writes outlast the drain window.
    const IN_FLIGHT: Duration = DRAIN.checked_add(Duration::from_secs(1)).unwrap();
    let db = TestDb::migrated().await;
    let mut service = Service::start(
        &db,
        &[
            ("SHUTDOWN_DRAIN_SECS", &DRAIN.as_secs().to_string()),
            ("SHUTDOWN_TIMEOUT_SECS", "10"),
        ],
    )
    .await;
    // Writes that outlast the drain window, in flight once their transactions are open.
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            service.spawn_post(&format!(
                "/_test/write-then-sleep?name=in-flight-{i}&ms={}",
                IN_FLIGHT.as_millis()
            ))
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.sessions("ledger", Some("idle in transaction")).await == 3
        })
        .await
    );

    service.signal(signal);
    let signalled = Instant::now();

    // Readiness fails at once; liveness does not.
    assert!(
        eventually(SLACK, || async {
            service.get("/health/ready").await.status == 503
        })
        .await,
        "readiness failed at once:\n{}",
        service.log()
    );
    let ready = service.get("/health/ready").await;
    assert_eq!(
        ready.body["checks"]["service:shutdown"][0]["status"],
        "fail"
    );
    assert_eq!(service.get("/health/live").await.status, 200);

    // New requests are served during the drain window, on new connections and on
    // kept-alive ones.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut drained = 0;
    loop {
        for client in [&fresh, &service.client] {
            let answer = Answer::from(
                client
                    .post(service.url("/accounts"))
                    .json(&json!({ "name": format!("drain-{drained}") }))
                    .send()
                    .await
                    .expect("served during the drain window"),
            )
            .await;
            assert_eq!(answer.status, 201, "{}", answer.text);
            drained += 1;
        }
        if signalled.elapsed() >= SENDING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(drained >= 2, "{drained} requests during the drain window");

    // Then the listener stops accepting.
    assert!(
        eventually(DRAIN + SLACK, || async { !accepts(service.port).await }).await,
        "the listener closed after the drain window"
    );
    let closed = signalled.elapsed();
    assert!(
        closed >= DRAIN - Duration::from_millis(100),
        "closed after {closed:?}"
    );

    // In-flight requests finished and committed; the process exits 0.
    for request in in_flight {
        let answer = request
            .await
            .expect("task")
            .expect("in-flight request answered");
        assert_eq!(answer.status, 201, "{}", answer.text);
    }
    let status = service
        .exit(DRAIN + IN_FLIGHT + EXIT_MARGIN)
        .await
        .unwrap_or_else(|| panic!("no exit in time:\n{}", service.log()));
    let exited = signalled.elapsed();
    println!("listener closed {closed:?}, exit {exited:?} after the signal");
    assert!(status.success(), "{status:?}\n{}", service.log());
    assert!(exited <= DRAIN + IN_FLIGHT + EXIT_MARGIN, "{exited:?}");

    for i in 0..3 {
        assert_eq!(db.accounts_named(&format!("in-flight-{i}")).await, 1);
    }
    for n in 0..drained {
        assert_eq!(
            db.accounts_named(&format!("drain-{n}")).await,
            1,
            "drain-{n}"
        );
    }
    assert_eq!(db.sessions("ledger", None).await, 0, "the pool was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_drains_finishes_in_flight_writes_and_exits_0() {
    drains_then_exits_0_with_every_acknowledged_write_committed(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_shuts_down_as_gracefully_as_sigterm() {
    drains_then_exits_0_with_every_acknowledged_write_committed(libc::SIGINT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outliving_the_shutdown_timeout_is_dropped_and_rolled_back() {
    let db = TestDb::migrated().await;
    let mut service = Service::start(
        &db,
        &[("SHUTDOWN_DRAIN_SECS", "0"), ("SHUTDOWN_TIMEOUT_SECS", "1")],
    )
    .await;
    let overdue = service.spawn_post("/_test/write-then-sleep?name=overdue&ms=30000");
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.sessions("ledger", Some("idle in transaction")).await == 1
        })
        .await
    );

    service.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = service
        .exit(Duration::from_secs(1) + EXIT_MARGIN)
        .await
        .unwrap_or_else(|| panic!("no exit in time:\n{}", service.log()));
    assert!(status.success(), "{status:?}\n{}", service.log());
    assert!(signalled.elapsed() <= Duration::from_secs(1) + EXIT_MARGIN);

    let answer = overdue.await.expect("task");
    assert!(
        answer.as_ref().is_none_or(|a| a.status != 201),
        "the dropped request was not acknowledged: {answer:?}"
    );
    // Rolled back: by the session when the worker drops the request future, or by the
    // server when the process's sockets close, whichever comes first. Never committed.
    assert_eq!(db.accounts_named("overdue").await, 0);
    assert!(
        eventually(Duration::from_secs(3), || async {
            db.sessions("ledger", None).await == 0
        })
        .await,
        "no session left behind, idle in transaction or otherwise"
    );
}

/// A statement still running when the shutdown timeout cuts its request off is cancelled
/// on the server, also when its worker's runtime is the one stopping (a pool per worker):
/// closing the socket alone would leave the backend running it, holding its locks, until
/// it ends (PostgreSQL notices a closed client only when it next writes to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_outliving_the_shutdown_timeout_is_cancelled_on_the_server() {
    let db = TestDb::migrated().await;
    let mut service = Service::start(
        &db,
        &[
            ("SHUTDOWN_DRAIN_SECS", "0"),
            ("SHUTDOWN_TIMEOUT_SECS", "1"),
            ("HTTP_WORKERS", "2"),
        ],
    )
    .await;
    let overdue = service.spawn_post("/_test/write-then-pg-sleep?name=overdue&ms=60000");
    assert!(
        eventually(Duration::from_secs(5), || async {
            db.sessions("ledger", Some("active")).await == 1
        })
        .await,
        "the request's pg_sleep runs"
    );

    service.signal(libc::SIGTERM);
    let status = service
        .exit(Duration::from_secs(1) + EXIT_MARGIN)
        .await
        .unwrap_or_else(|| panic!("no exit in time:\n{}", service.log()));
    assert!(status.success(), "{status:?}\n{}", service.log());
    let answer = overdue.await.expect("task");
    assert!(
        answer.as_ref().is_none_or(|a| a.status != 201),
        "the cut-off request was not acknowledged: {answer:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            db.sessions("ledger", None).await == 0
        })
        .await,
        "the backend running the statement ended, cancelled: {} left\n{}",
        db.sessions("ledger", None).await,
        service.log()
    );
    assert_eq!(db.accounts_named("overdue").await, 0);
}

/// A request in flight across a graceful stop commits on its pooled connection, after
/// warming a connection up on another TCP connection (which, with two workers, Actix
/// hands to the other worker). `budget` is `DB_POOL_SIZE + DB_MAX_OVERFLOW` (all of it
/// `DB_POOL_SIZE`).
async fn a_request_across_a_graceful_stop_commits(workers: &str, budget: &str) {
    crate::support::init_logging();
    let db = TestDb::migrated().await;
    let overrides = std::collections::HashMap::from([
        ("DB_POOL_SIZE", budget.to_owned()),
        ("DB_MAX_OVERFLOW", "0".to_owned()),
        ("SHUTDOWN_TIMEOUT_SECS", "10".to_owned()),
        ("HTTP_WORKERS", workers.to_owned()),
    ]);
    let app = ledger::Application::build(crate::support::config_for(&db.name, &overrides))
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    // A fresh TCP connection per request: Actix hands connections to its workers in turn.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };

    // The first worker opens a pooled connection (with one pool, the only one), then
    // goes idle.
    let warm = fresh()
        .post(format!("{base}/accounts"))
        .json(&json!({ "name": "warm", "balance": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 201);
    // The next one, on the other worker, holds a connection across the stop (with one
    // pool, the first worker's; with a pool per worker, its own worker's): it has written
    // and still holds its transaction when the stop begins.
    let slow = tokio::spawn(
        fresh()
            .post(format!(
                "{base}/_test/write-then-sleep?name=across-stop&ms={}",
                (SLACK + Duration::from_secs(1)).as_millis()
            ))
            .send(),
    );
    assert!(
        eventually(SLACK, || async {
            db.sessions("ledger", Some("idle in transaction")).await == 1
        })
        .await,
        "the request wrote and holds its transaction"
    );
    assert!(!slow.is_finished(), "the request is in flight at the stop");
    handle.stop(true).await;
    let answer = Answer::from(slow.await.unwrap().unwrap()).await;
    server.await.unwrap().unwrap();

    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(db.accounts_named("across-stop").await, 1);
}

/// With one pool for two workers (a budget of one connection is too small for a pool
/// per worker), a graceful stop lets every worker's in-flight request commit, even when
/// the worker that opened the request's pooled connection is idle and stops first: that
/// pool's connections are driven by the application's runtime, not by the worker that
/// happened to open them.
#[tokio::test]
async fn a_graceful_stop_keeps_connections_opened_by_an_idle_worker_alive() {
    a_request_across_a_graceful_stop_commits("2", "1").await;
}

/// With a pool per worker, each worker drives its own connections, and the idle worker
/// that stops first takes only its own down: the other worker's request across the stop
/// commits on its worker's connection.
#[tokio::test]
async fn a_graceful_stop_with_a_pool_per_worker_lets_the_busy_worker_commit() {
    // 9 connections: 1 for the application, 4 for each worker.
    a_request_across_a_graceful_stop_commits("2", "9").await;
}

/// With a single worker, pooled connections are driven by that worker's own runtime (no
/// cross-thread wake-up per round trip), which stops only after its last in-flight
/// request: a request across a graceful stop still commits on its connection.
#[tokio::test]
async fn a_graceful_stop_with_one_worker_keeps_the_connections_it_drives_alive() {
    a_request_across_a_graceful_stop_commits("1", "1").await;
}
