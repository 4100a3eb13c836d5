//! Start-up migrations.

use std::time::Duration;

use crate::support::{eventually, spawn_app_on, TestDb};

#[tokio::test]
async fn start_up_applies_migrations_to_an_empty_database() {
    let app = spawn_app_on(TestDb::empty().await, &[("RUN_MIGRATIONS", "true")]).await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    app.create_account("migrated", 1).await;
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'accounts_balance_check'")
            .await,
        1,
        "accounts has CHECK (balance >= 0)"
    );
}

#[tokio::test]
async fn a_service_started_before_its_database_exists_migrates_once_it_appears() {
    let db = TestDb::not_created();
    let app = spawn_app_on(
        db,
        &[("RUN_MIGRATIONS", "true"), ("DB_HEALTH_TIMEOUT", "1")],
    )
    .await;
    assert_eq!(app.get("/health/live").await.status, 200);
    assert_eq!(app.get("/health/ready").await.status, 503);

    app.db.create_now("").await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.get("/health/ready").await.status == 200
        })
        .await,
        "readiness recovered without a restart"
    );
    app.create_account("late", 1).await;
}

#[tokio::test]
async fn migrate_command_applies_and_is_idempotent() {
    let db = TestDb::empty().await;
    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .current_dir(std::env::temp_dir())
            .output()
            .expect("run ledger migrate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM __diesel_schema_migrations")
            .await,
        1
    );
}
