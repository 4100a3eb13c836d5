//! A database of each test's own (cloned from a migrated template), and plain connections
//! to the test server.
//!
//! `DATABASE_URL` names a server and a database the tests may use to create others (the
//! Makefile sets it). The template `ledger_tpl_<hash of migrations/>` is built once, under
//! an advisory lock so that parallel test processes do not race; each test then gets
//! `CREATE DATABASE ... TEMPLATE`, dropped again (with FORCE) when its `TestDb` drops.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

use super::config_for;

/// Marks every database this suite creates.
const TEST_DB_PREFIX: &str = "ledger_test_";

/// The server-admin URL from the environment.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `admin_url` with another database name.
pub fn url_for(db: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    url.set_path(db);
    url.to_string()
}

/// A plain client connection (no pool, no session) to `url`.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    tokio::spawn(connection);
    client
}

fn migrations_hash() -> u64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = walk(&dir);
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.strip_prefix(&dir)
            .expect("under migrations/")
            .hash(&mut hasher);
        std::fs::read(&f)
            .expect("readable migration")
            .hash(&mut hasher);
    }
    hasher.finish()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("migrations/ exists") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The migrated template database, built on first use.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("ledger_tpl_{:016x}", migrations_hash());
            // Runs on its own thread and runtime: the OnceCell may be initialised from any
            // test's runtime, and that runtime may end before another test needs it.
            let built = name.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(build_template(&built));
            })
            .join()
            .expect("template build");
            name
        })
        .await
}

async fn build_template(name: &str) {
    let admin = connect(&admin_url()).await;
    // Serialises template builds across test processes (cargo test, nextest).
    admin
        .execute("SELECT pg_advisory_lock(7346527)", &[])
        .await
        .expect("advisory lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("pg_database");
    if exists.is_none() {
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building}"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin.batch_execute(&sql).await.expect("create template");
        }
        migrate(&building, &url_for(&building)).await;
        for sql in [
            format!("ALTER DATABASE {building} RENAME TO {name}"),
            format!("ALTER DATABASE {name} IS_TEMPLATE true"),
        ] {
            admin.batch_execute(&sql).await.expect("finish template");
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock(7346527)", &[])
        .await
        .expect("advisory unlock");
}

/// Applies the service's migrations to database `name` at `url`, over a connection of
/// their own (no pool, no service).
pub async fn migrate(name: &str, url: &str) {
    let config = config_for(name, &[("DATABASE_URL", url.to_owned())].into());
    ledger::db::migrate::run_pending(&ledger::db::migrate::standalone_connector(&config.db))
        .await
        .unwrap_or_else(|e| panic!("migrations apply to {name}: {e:?}"));
}

/// How much longer a COMMIT takes on a table made slow with [`TestDb::slow_commits`].
pub const SLOW_COMMIT: Duration = Duration::from_millis(500);

/// A database of one test's own, dropped when this value drops.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh, migrated database.
    pub async fn migrated() -> TestDb {
        let template = template().await;
        Self::create(&format!("TEMPLATE {template}")).await
    }

    /// A fresh, empty database (no schema).
    pub async fn empty() -> TestDb {
        Self::create("").await
    }

    /// A name for a database that does not exist yet (dropped at the end if created).
    pub fn not_created() -> TestDb {
        let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        TestDb {
            url: url_for(&name),
            name,
        }
    }

    async fn create(options: &str) -> TestDb {
        let db = Self::not_created();
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {} {options}", db.name))
            .await
            .expect("create test database");
        db
    }

    /// A client connected to this database, outside the service.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// One `bigint` from a query run outside the service.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// Rows of `accounts` with this name.
    pub async fn accounts_named(&self, name: &str) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM accounts WHERE name = $1", &[&name])
            .await
            .expect("count accounts")
            .get(0)
    }

    /// Sessions of the service on this database, by `application_name` and state.
    pub async fn sessions(&self, application_name: &str, state: Option<&str>) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 \
                 AND ($3::text IS NULL OR state = $3)",
                &[&self.name, &application_name, &state],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }

    /// Whether no backend of the service on this database runs a statement or sits inside a
    /// transaction: whatever a request left behind (a statement it stopped waiting for, a
    /// transaction on a connection it closed) has been settled by the server.
    pub async fn ledger_settled(&self) -> bool {
        self.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'ledger' AND state <> 'idle'",
                &[&self.name],
            )
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0)
            == 0
    }

    /// Backend PIDs of the service's pooled connections on this database.
    pub async fn ledger_pids(&self) -> Vec<i32> {
        self.client()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'ledger'",
                &[&self.name],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Terminates every backend of the service on this database; returns how many.
    pub async fn terminate(&self, application_name: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2",
                &[&self.name, &application_name],
            )
            .await
            .expect("terminate")
            .get(0)
    }

    /// Makes every COMMIT that wrote rows of `table` take `SLOW_COMMIT` longer per row: a
    /// deferred constraint trigger fires at COMMIT, before the commit record is written,
    /// and sleeps. Until it returns, no other connection sees the rows. Only this test's
    /// database gets it; nothing of the migrations changes.
    pub async fn slow_commits(&self, table: &str) {
        let seconds = SLOW_COMMIT.as_secs_f64();
        self.client()
            .await
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END$$; \
                 CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON {table} \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            ))
            .await
            .expect("slow COMMIT trigger");
    }

    /// Creates the database now (for tests that start the service before it exists).
    pub async fn create_now(&self, options: &str) {
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE DATABASE {} {options}", self.name))
            .await
            .expect("create database");
    }

    /// Reads balances and row counts in one snapshot, outside the service.
    pub async fn ledger_state(&self) -> LedgerState {
        let mut client = self.client().await;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .expect("snapshot transaction");
        let balances = tx
            .query("SELECT id, balance FROM accounts ORDER BY id", &[])
            .await
            .expect("balances")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let transfers = tx
            .query_one("SELECT count(*) FROM transfers", &[])
            .await
            .expect("count transfers")
            .get(0);
        let idempotency_keys = tx
            .query_one("SELECT count(*) FROM idempotency_keys", &[])
            .await
            .expect("count keys")
            .get(0);
        tx.commit().await.expect("end snapshot");
        LedgerState {
            balances,
            transfers,
            idempotency_keys,
        }
    }

    /// Sessions of the service that wait on a lock while running a statement whose text
    /// contains `fragment`.
    pub async fn waiting_on_lock(&self, fragment: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'ledger' AND wait_event_type = 'Lock' \
                 AND query LIKE '%' || $2 || '%'",
                &[&self.name, &fragment],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run outside any runtime (or inside one that is shutting down): use a
        // thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The ledger tables at one moment, to prove that a request changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerState {
    /// `(id, balance)` of every account, by id.
    pub balances: Vec<(i64, i64)>,
    pub transfers: i64,
    pub idempotency_keys: i64,
}

impl LedgerState {
    /// The sum of all balances (wide enough for balances near `i64::MAX`).
    pub fn total(&self) -> i128 {
        self.balances.iter().map(|(_, b)| i128::from(*b)).sum()
    }
}
