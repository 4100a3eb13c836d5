//! Connection attempts are bounded as a whole and leave nothing behind, and the service's
//! server connections stay within its budget (contract section 5): `DB_POOL_SIZE +
//! DB_MAX_OVERFLOW + 1`, one more while start-up migrations are pending. Under a silent
//! server and its recovery: `serial::connect`.

use std::time::{Duration, Instant};

use actix_diesel_session::Connector;
use actix_diesel_session::DatabaseUrl;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{eventually, spawn_app_on, within, TestDb};

/// The migrations' advisory lock key (`src/db/migrate.rs`): "ledger" in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x6c65_6467_6572;

#[tokio::test]
async fn a_migration_that_outlasts_the_start_up_wait_is_never_joined_by_a_second() {
    // Arrange: holding the migrations' lock makes the first attempt outlast start-up's
    // wait (DB_HEALTH_TIMEOUT) while it is connected.
    let db = TestDb::migrated().await;
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("lock");
    let app = spawn_app_on(
        db,
        &[
            ("RUN_MIGRATIONS", "true"),
            ("DB_HEALTH_TIMEOUT", "0.5"),
            ("DB_POOL_TIMEOUT", "0.5"),
        ],
    )
    .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.db.sessions("ledger-migrate", None).await == 1
        })
        .await,
        "the first attempt is connected, waiting for the lock"
    );

    // Act: the retries (after 0.5 s, 1 s, 2 s) would each have opened a connection of
    // their own beside it: watch across the first three.
    let mut most = 0;
    let watching = Instant::now();
    while watching.elapsed() < Duration::from_secs(4) {
        most = most.max(app.db.sessions("ledger-migrate", None).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.get("/health/ready").await.status, 503, "still pending");
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .expect("unlock");

    // Assert
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.get("/health/ready").await.status == 200
        })
        .await,
        "ready once the migrations ran"
    );
    assert_eq!(most, 1, "migration connections at once");
}

/// A server that accepts and never answers, and a connector to it whose attempts are
/// bounded by `attempt`.
async fn silent_server(attempt: Duration) -> (TcpListener, Connector) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let url =
        DatabaseUrl::parse(&format!("postgres://ledger@127.0.0.1:{port}/ledger")).expect("URL");
    (
        listener,
        Connector::new(&url, "ledger", None, None, attempt),
    )
}

/// Waits until the client closes `socket` (end of stream, or a reset); what it sent before
/// (its start-up packet) is read and ignored.
async fn closed_by_client(mut socket: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

#[tokio::test]
async fn an_attempt_the_server_never_answers_fails_within_its_timeout_and_closes_its_socket() {
    const ATTEMPT: Duration = Duration::from_millis(300);
    let (listener, connector) = silent_server(ATTEMPT).await;
    let started = Instant::now();
    let attempt = tokio::spawn(async move { connector.establish().await.map(|_| ()) });
    let (socket, _) = listener.accept().await.expect("accept");

    // The driver's connect timeout ends with the TCP connect; the start-up exchange after
    // it is bounded too.
    let outcome = within(Duration::from_secs(10), "the attempt", attempt)
        .await
        .expect("attempt task");
    let took = started.elapsed();
    assert!(outcome.is_err());
    // Slack for a loaded 2-core machine.
    assert!(took < ATTEMPT + Duration::from_millis(700), "took {took:?}");
    within(
        Duration::from_secs(2),
        "the socket closed",
        closed_by_client(socket),
    )
    .await;
}

#[tokio::test]
async fn an_attempt_given_up_by_its_caller_closes_its_socket() {
    let (listener, connector) = silent_server(Duration::from_secs(60)).await;
    let attempt = tokio::spawn(async move { connector.establish().await.map(|_| ()) });
    let (socket, _) = listener.accept().await.expect("accept");

    // The caller stops waiting (a check-out deadline, a probe's timeout): nothing may go
    // on connecting in the background.
    attempt.abort();
    within(
        Duration::from_secs(2),
        "the socket closed",
        closed_by_client(socket),
    )
    .await;
}
