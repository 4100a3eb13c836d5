//! Test support: a database of each test's own and the service spawned on it (`db`, `app`),
//! and beyond that the real binary as a process, a misbehaving TCP proxy, private
//! PostgreSQL clusters (to stop the server, or to configure TLS), steady traffic.

pub mod app;
pub mod binary;
pub mod db;
pub mod pg_cluster;
pub mod pgbouncer;
pub mod pgwire;
pub mod proxy;
pub mod traffic;

use std::net::SocketAddr;
use std::time::Duration;

pub use app::{
    config_for, init_logging, spawn_app, spawn_app_on, spawn_app_with, Answer, TestApp, RETRY_AFTER,
};
pub use db::{admin_url, connect, migrate, url_for, LedgerState, TestDb, SLOW_COMMIT};
use proxy::Proxy;

/// The shared test server's address (from `DATABASE_URL`).
pub async fn shared_server_addr() -> SocketAddr {
    let url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5432);
    tokio::net::lookup_host((host, port))
        .await
        .expect("resolve the test server")
        .next()
        .expect("an address for the test server")
}

/// A proxy in front of the shared server, and `db`'s URL through it.
pub async fn proxy_to(db: &TestDb) -> (Proxy, String) {
    let proxy = Proxy::start(shared_server_addr().await).await;
    let mut url = url::Url::parse(&db.url).expect("test database URL");
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(proxy.port())).expect("port");
    (proxy, url.to_string())
}

/// The service on `db` through a proxy the test can break, with `settings` on top.
pub async fn spawn_behind_proxy(db: TestDb, settings: &[(&str, &str)]) -> (TestApp, Proxy) {
    let (proxy, url) = proxy_to(&db).await;
    let mut vars = vec![("DATABASE_URL", url.as_str())];
    vars.extend_from_slice(settings);
    (spawn_app_on(db, &vars).await, proxy)
}

/// As [`spawn_behind_proxy`], with a connection the proxy can read (no TLS), so that it
/// can break it at a given query (`Proxy::on_next_query`).
pub async fn spawn_behind_readable_proxy(
    db: TestDb,
    settings: &[(&str, &str)],
) -> (TestApp, Proxy) {
    let (proxy, url) = proxy_to(&db).await;
    let url = format!("{url}?sslmode=disable");
    let mut vars = vec![("DATABASE_URL", url.as_str())];
    vars.extend_from_slice(settings);
    (spawn_app_on(db, &vars).await, proxy)
}

/// A port nothing listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Awaits `future`, failing the test after `limit`: under a fault, a hang must fail the
/// test rather than stall the suite.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

/// The slack every timing bound of the suite gets on top of the time it bounds: "within
/// the 1 s pool timeout" is asserted as `< 1 s + SLACK`, "at once" as `< SLACK`.
///
/// CI runs 8 test threads on 2 cores, so each test's server, client and PostgreSQL backends
/// compete with seven other tests (and with whatever else the machine runs) for a quarter
/// of a core: a task that is ready can wait whole scheduler slices, several times in one
/// request. One value for every bound, generous rather than tuned, so that a bound fails only
/// when something waited for a timeout it should not have met: each test keeps what it
/// bounds at least `SLACK` away from the timeout or hang a regression would run into.
pub const SLACK: Duration = Duration::from_secs(2);

/// Sends `count` requests made by `request`, one after the other and each on a new TCP
/// connection (so Actix hands them to its workers in turn), from a thread and runtime of
/// their own, while the calling thread sleeps for `block`: each one's status (or error)
/// and how long it took. With the calling thread's runtime running the service's
/// handle, its background tasks and whatever the application's runtime drives, this
/// shows which requests need no thread but their worker's.
pub fn requests_while_blocked(
    count: usize,
    block: Duration,
    request: impl Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + 'static,
) -> Vec<(reqwest::Result<reqwest::StatusCode>, Duration)> {
    let client = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(3))
            .build()
            .expect("client");
        runtime.block_on(async {
            let mut answers = Vec::new();
            for i in 0..count {
                let started = std::time::Instant::now();
                let status = request(&client, i).send().await.map(|a| a.status());
                answers.push((status, started.elapsed()));
            }
            answers
        })
    });
    std::thread::sleep(block);
    client.join().expect("the requests' thread")
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
