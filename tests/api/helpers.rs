//! Test support: a fresh database per test (cloned from a migrated template) and the real
//! server spawned on a free port.
//!
//! `DATABASE_URL` names a server and a database the tests may use to create others (the
//! Makefile sets it). The template `ledger_tpl_<hash of migrations/>` is built once, under
//! an advisory lock so that parallel test processes do not race; each test then gets
//! `CREATE DATABASE ... TEMPLATE`, dropped again (with FORCE) when its `TestDb` drops.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use actix_diesel_session::DbPool;
use ledger::{Application, Config};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};

/// Marks every database this suite creates.
const TEST_DB_PREFIX: &str = "ledger_test_";

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

/// The `Retry-After` value of every 503 (README, "During a database outage": `Retry-After: 1`).
pub const RETRY_AFTER: &str = "1";

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
        let config = config_for(&building, &HashMap::new());
        ledger::db::migrate::run_pending(&ledger::db::migrate::standalone_connector(&config.db))
            .await
            .expect("migrations apply to the template");
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

/// The configuration a test app runs with: small pool, fast timeouts, port 0, no start-up
/// migrations (the template is migrated). `overrides` wins.
pub fn config_for(db: &str, overrides: &HashMap<&str, String>) -> Config {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", url_for(db)),
        ("PORT", "0".to_owned()),
        ("DB_POOL_SIZE", "2".to_owned()),
        ("DB_MAX_OVERFLOW", "2".to_owned()),
        ("DB_POOL_TIMEOUT", "5".to_owned()),
        ("DB_HEALTH_TIMEOUT", "2".to_owned()),
        ("RUN_MIGRATIONS", "false".to_owned()),
        ("SHUTDOWN_DRAIN_SECS", "0".to_owned()),
    ]);
    for (k, v) in overrides {
        vars.insert(k, v.clone());
    }
    Config::from_lookup(|k| vars.get(k).cloned()).expect("valid test configuration")
}

/// A running service on its own database.
pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub pool: DbPool,
    pub client: reqwest::Client,
}

/// Logs through the test harness's capture (shown for failing tests only); `RUST_LOG`
/// raises the level, the default is `warn`.
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
}

/// Spawns the service on a fresh migrated database with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Spawns the service on a fresh migrated database with some settings overridden.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_on(TestDb::migrated().await, overrides).await
}

/// Spawns the service on the given database.
pub async fn spawn_app_on(db: TestDb, overrides: &[(&str, &str)]) -> TestApp {
    init_logging();
    let overrides: HashMap<&str, String> = overrides
        .iter()
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    let mut config = config_for(&db.name, &overrides);
    if let Some(url) = overrides.get("DATABASE_URL") {
        config.db.url = actix_diesel_session::DatabaseUrl::parse(url).expect("override URL");
    }
    let app = Application::build(config)
        .await
        .expect("application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let pool = app.pool().clone();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        db,
        pool,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> Answer {
        Answer::from(self.client.get(self.url(path)).send().await.expect("GET")).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Answer {
        Answer::from(
            self.client
                .post(self.url(path))
                .json(body)
                .send()
                .await
                .expect("POST"),
        )
        .await
    }

    /// POST with a raw body and content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Answer {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        Answer::from(req.send().await.expect("POST")).await
    }

    /// Sends a POST without waiting for it (to hold a connection while the test goes on).
    pub fn post_in_background(
        &self,
        path: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        let request = self.client.post(self.url(path));
        tokio::spawn(request.send())
    }

    pub async fn create_account(&self, name: &str, balance: i64) -> Value {
        let answer = self
            .post_json(
                "/accounts",
                &serde_json::json!({ "name": name, "balance": balance }),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body
    }
}

/// A response, read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    #[allow(clippy::wrong_self_convention, clippy::should_implement_trait)]
    pub async fn from(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `id` of every element of the body's `items` (a list page, a batch).
    pub fn item_ids(&self) -> Vec<i64> {
        self.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| item["id"].as_i64().expect("id"))
            .collect()
    }

    /// Asserts a problem+json error with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert_eq!(self.body["status"], status, "{}", self.text);
        assert_eq!(self.body["type"], "about:blank");
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
        assert_eq!(
            self.body["request_id"].as_str(),
            self.header("x-request-id"),
            "problem bodies repeat the request id"
        );
        if status == 503 {
            assert_eq!(
                self.header("retry-after"),
                Some(RETRY_AFTER),
                "a 503 tells the client when to retry"
            );
        }
    }
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

impl TestDb {
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

impl TestApp {
    /// Creates an account and returns its id.
    pub async fn account_id(&self, name: &str, balance: i64) -> i64 {
        self.create_account(name, balance).await["id"]
            .as_i64()
            .expect("account id")
    }

    /// `POST /transfers` without a key.
    pub async fn transfer(&self, from: i64, to: i64, amount: i64) -> Answer {
        self.post_json(
            "/transfers",
            &serde_json::json!({ "from_account_id": from, "to_account_id": to, "amount": amount }),
        )
        .await
    }

    /// POST a raw JSON body, with an `Idempotency-Key` when `key` is given.
    pub async fn post_keyed(&self, path: &str, key: Option<&str>, body: &str) -> Answer {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        Answer::from(req.send().await.expect("POST")).await
    }
}
