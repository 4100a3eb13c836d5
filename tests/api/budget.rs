//! The service's server connections stay within its budget (contract section 5):
//! `DB_POOL_SIZE + DB_MAX_OVERFLOW + 1`, one more while start-up migrations are pending.
//! Under a silent server and its recovery: `serial::connect`.

use std::time::{Duration, Instant};

use crate::helpers::{eventually, spawn_app_on, TestDb};

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
