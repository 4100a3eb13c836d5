//! Test support: a database per test, cloned from a template with the tests' tiny schema,
//! and a minimal application of the tests' own, served over real HTTP.
//!
//! `DATABASE_URL` names a server and a database the tests may use to create others. The
//! template `ads_tpl_<hash of SCHEMA>` is built once, under an advisory lock so that test
//! binaries running in parallel do not race; each test then gets
//! `CREATE DATABASE ... TEMPLATE`, dropped again (`WITH (FORCE)`) when its [`TestDb`] drops.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_diesel_session::{
    Database, DatabaseUrl, Isolation, Outcome, Reason, Retry, SessionConfig, SessionError,
    SessionMiddleware, SessionObserver, TimeoutKind,
};
use actix_web::dev::{HttpServiceFactory, ServerHandle, Service, ServiceRequest};
use actix_web::{web, App, FromRequest, Handler, HttpMessage, HttpResponse, HttpServer, Responder};

use handlers::*;
use tokio::sync::{Notify, OnceCell};
use tokio_postgres::{Client, NoTls};

/// Marks every database these tests create.
const TEST_DB_PREFIX: &str = "ads_test_";

/// The schema every test database starts with:
/// - `items`, what the handlers write;
/// - `checked`, whose foreign key is checked at COMMIT only, so that a handler can write a
///   row that makes the COMMIT fail;
/// - `commit_delay`, whose deferred constraint trigger sleeps at COMMIT for the row's
///   `ms`, so that a COMMIT takes long enough for a response sent before it to be caught;
/// - `docs`, under row-level security (forced, so that no owner escapes it either): a
///   role without `BYPASSRLS` sees the rows of the tenant named by the setting
///   `app.tenant_id` only. [`RLS_USER`] is that role (created once per server, and
///   granted what it needs here: grants travel with the template);
/// - `skew`, where serializable transactions that each read the sum and add a row
///   depending on it conflict (write skew);
/// - `refused_at_commit`, whose deferred trigger fails the COMMIT with a serialization
///   failure (40001) when the row's `attempt` is 1.
const SCHEMA: &str = "
    CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
    CREATE TABLE checked (
        id bigserial PRIMARY KEY,
        item_id bigint NOT NULL REFERENCES items (id) DEFERRABLE INITIALLY DEFERRED
    );
    CREATE TABLE commit_delay (ms integer NOT NULL);
    CREATE FUNCTION sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_sleep(NEW.ms / 1000.0);
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER sleep_at_commit AFTER INSERT ON commit_delay
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleep_at_commit();
    DO $$ BEGIN
        CREATE ROLE ads_rls_user LOGIN NOSUPERUSER NOBYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$;
    CREATE TABLE docs (id bigserial PRIMARY KEY, tenant text NOT NULL, body text);
    ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
    ALTER TABLE docs FORCE ROW LEVEL SECURITY;
    CREATE POLICY docs_of_the_tenant ON docs
        USING (tenant = current_setting('app.tenant_id', true));
    GRANT SELECT, INSERT ON docs, items TO ads_rls_user;
    GRANT USAGE ON SEQUENCE docs_id_seq, items_id_seq TO ads_rls_user;
    CREATE TABLE skew (who text NOT NULL, v bigint NOT NULL);
    CREATE TABLE refused_at_commit (attempt integer NOT NULL);
    CREATE FUNCTION refuse_first_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.attempt = 1 THEN
            RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001';
        END IF;
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER refuse_first_attempt AFTER INSERT ON refused_at_commit
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_first_attempt();
";

/// A role without `SUPERUSER` or `BYPASSRLS`, made by [`SCHEMA`]; the server's trust
/// authentication lets the tests connect as it.
pub const RLS_USER: &str = "ads_rls_user";

/// Serialises template builds across test processes.
const TEMPLATE_LOCK: i64 = 0x0061_6473_5f74_706c; // "ads_tpl"

/// The slack a timing bound gets on top of the time it bounds (the suite runs with 8 test
/// threads, each with its server, client and PostgreSQL backends).
pub const SLACK: Duration = Duration::from_secs(2);

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

/// A plain client connection (no pool, no session) to `url`, driven on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    tokio::spawn(connection);
    client
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The template database, built on first use.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            SCHEMA.hash(&mut hasher);
            let name = format!("ads_tpl_{:016x}", hasher.finish());
            // On a thread and runtime of its own: each test has its own runtime, which may
            // end before another test needs the template.
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
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("advisory lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("pg_database");
    if exists.is_none() {
        // Built under another name and renamed when complete: a template is never seen
        // half made, even after a run killed half-way.
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin.batch_execute(&sql).await.expect("create template");
        }
        {
            let (client, connection) = tokio_postgres::connect(&url_for(&building), NoTls)
                .await
                .expect("connect to the template");
            let driver = tokio::spawn(connection);
            client.batch_execute(SCHEMA).await.expect("template schema");
            drop(client);
            // Disconnected before the rename, which refuses a database in use.
            let _ = driver.await;
        }
        for sql in [
            format!("ALTER DATABASE {building} RENAME TO {name}"),
            format!("ALTER DATABASE {name} IS_TEMPLATE true"),
        ] {
            admin.batch_execute(&sql).await.expect("finish template");
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("advisory unlock");
}

/// A name no other test (in this process or another) uses.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{TEST_DB_PREFIX}{}_{}_{nanos:09}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database of one test's own, dropped when this value drops.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh database with [`SCHEMA`].
    pub async fn new() -> TestDb {
        let template = template().await;
        let name = unique_name();
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .expect("create test database");
        TestDb {
            url: url_for(&name),
            name,
        }
    }

    /// A client connected to this database, outside the application.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Rows of `items` named `name`, as another connection sees them now.
    pub async fn items_named(&self, name: &str) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM items WHERE name = $1", &[&name])
            .await
            .expect("count items")
            .get(0)
    }

    /// One `bigint` from `sql`, run outside the application.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// The `state` of every server session on this database named `application_name`.
    pub async fn session_states(&self, application_name: &str) -> Vec<String> {
        self.client()
            .await
            .query(
                "SELECT coalesce(state, '') FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2 ORDER BY pid",
                &[&self.name, &application_name],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Whether a session of `application_name` is idle inside a transaction after a
    /// statement of its own: not right after its `BEGIN`, when the handler may not even
    /// have its connection yet.
    pub async fn holds_a_written_transaction(&self, application_name: &str) -> bool {
        self.client()
            .await
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2 \
                   AND state = 'idle in transaction' AND query NOT ILIKE 'BEGIN%'",
                &[&self.name, &application_name],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run outside any runtime, or in one that is shutting down.
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

/// Polls `check` every 25 ms until it holds or `within` passes; returns whether it held.
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Logs through the test harness's capture; `RUST_LOG` sets the level (default `warn`).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
}

/// An observer that counts the session layer's events.
#[derive(Default)]
pub struct Tally {
    committed: [AtomicUsize; Reason::ALL.len()],
    rolled_back: [AtomicUsize; Reason::ALL.len()],
    unknown: AtomicUsize,
    checkout_timeouts: AtomicUsize,
    released: AtomicUsize,
    held_too_long: AtomicUsize,
    retried: AtomicUsize,
}

fn index(reason: Reason) -> usize {
    Reason::ALL
        .iter()
        .position(|r| *r == reason)
        .expect("Reason::ALL lists every reason")
}

impl Tally {
    /// How often a transaction ended with `outcome`.
    pub fn ended(&self, outcome: Outcome) -> usize {
        match outcome {
            Outcome::Committed(r) => self.committed[index(r)].load(Ordering::SeqCst),
            Outcome::RolledBack(r) => self.rolled_back[index(r)].load(Ordering::SeqCst),
            Outcome::Unknown { .. } => self.unknown.load(Ordering::SeqCst),
            other => panic!("an outcome the tests do not know: {other:?}"),
        }
    }

    /// Every outcome seen so far with its count, e.g. `{"rolled_back/panic": 1}`.
    pub fn outcomes(&self) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for reason in Reason::ALL {
            for (kind, counters) in [
                ("committed", &self.committed),
                ("rolled_back", &self.rolled_back),
            ] {
                let n = counters[index(reason)].load(Ordering::SeqCst);
                if n > 0 {
                    seen.insert(format!("{kind}/{}", reason.as_str()), n);
                }
            }
        }
        let unknown = self.unknown.load(Ordering::SeqCst);
        if unknown > 0 {
            seen.insert("unknown".to_owned(), unknown);
        }
        seen
    }

    /// Check-outs that gave up on their deadline.
    pub fn checkout_timeouts(&self) -> usize {
        self.checkout_timeouts.load(Ordering::SeqCst)
    }

    /// Connections a request gave back to the pool or closed (`connection_released`).
    pub fn released(&self) -> usize {
        self.released.load(Ordering::SeqCst)
    }

    /// Leak warnings (`held_too_long`).
    pub fn held_too_long(&self) -> usize {
        self.held_too_long.load(Ordering::SeqCst)
    }

    /// Requests run again after a conflict (`transaction_retried`).
    pub fn retried(&self) -> usize {
        self.retried.load(Ordering::SeqCst)
    }
}

/// `[(name, count), ...]` as [`Tally::outcomes`] gives it, for assertions.
pub fn outcomes(expected: &[(&str, usize)]) -> BTreeMap<String, usize> {
    expected
        .iter()
        .map(|(name, n)| ((*name).to_owned(), *n))
        .collect()
}

/// How many request-extension markers were dropped: one per request whose extensions,
/// and so whose request, were freed.
pub static DROPPED_MARKERS: AtomicUsize = AtomicUsize::new(0);

/// The marker `/extract-after/{name}` puts in its requests' extensions.
struct DropCounted;

impl Drop for DropCounted {
    fn drop(&mut self) {
        DROPPED_MARKERS.fetch_add(1, Ordering::SeqCst);
    }
}

struct Observer(Arc<Tally>);

impl SessionObserver for Observer {
    fn transaction_ended(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Committed(r) => &self.0.committed[index(r)],
            Outcome::RolledBack(r) => &self.0.rolled_back[index(r)],
            Outcome::Unknown { .. } => &self.0.unknown,
            other => panic!("an outcome the tests do not know: {other:?}"),
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    fn checkout_timed_out(&self, _kind: TimeoutKind) {
        self.0.checkout_timeouts.fetch_add(1, Ordering::SeqCst);
    }

    fn connection_released(&self, _held: Duration) {
        self.0.released.fetch_add(1, Ordering::SeqCst);
    }

    fn held_too_long(&self, _request: &actix_web::HttpRequest, _held: Duration) {
        self.0.held_too_long.fetch_add(1, Ordering::SeqCst);
    }

    fn transaction_retried(&self, _request: &actix_web::HttpRequest, _failed: u32) {
        self.0.retried.fetch_add(1, Ordering::SeqCst);
    }
}

/// The content type of the custom rendering ([`render_problem`]).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An application's own rendering of the session layer's errors.
pub fn render_problem(error: SessionError) -> HttpResponse {
    let code = match &error {
        SessionError::Unavailable(_) => "unavailable",
        SessionError::Conflict => "conflict",
        SessionError::Timeout => "timeout",
        SessionError::CommitUnknown => "commit_unknown",
        SessionError::Internal(_) => "internal",
        _ => "database",
    };
    HttpResponse::build(actix_web::ResponseError::status_code(&error))
        .content_type(PROBLEM_JSON)
        .body(format!(r#"{{"code":"{code}"}}"#))
}

/// How to set up a [`TestApp`].
pub struct Options {
    /// Applied to the tests' default configuration (a pool of 2 + 2, 5 s check-outs).
    pub config: fn(&mut SessionConfig),
    /// Whether the application renders the middleware's errors itself ([`render_problem`]).
    pub render: bool,
    /// The server's graceful shutdown timeout, in seconds.
    pub shutdown_timeout: u64,
    /// Also serve `POST /scoped/{name}` (as `/items/{name}`) from a scope wrapped in the
    /// session middleware, instead of a resource.
    pub scope: bool,
    /// The role the application connects as (`None`: the one of `DATABASE_URL`).
    pub user: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: |_| {},
            render: false,
            shutdown_timeout: 1,
            scope: false,
            user: None,
        }
    }
}

/// A resource whose one route, a POST, runs inside the session middleware. (The middleware goes on
/// each resource: see `a_session_middleware_on_a_scope_serves_its_routes`.)
fn post<F, Args>(path: &str, handler: F, db: &Database) -> impl HttpServiceFactory
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    web::resource(path)
        .route(web::post().to(handler))
        .wrap(db.middleware())
}

/// A resource whose one route, a POST, runs inside `middleware` (a session middleware with
/// options of its own).
fn post_in<F, Args>(
    path: &str,
    handler: F,
    middleware: SessionMiddleware,
) -> impl HttpServiceFactory
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    web::resource(path)
        .route(web::post().to(handler))
        .wrap(middleware)
}

/// A request header's value as a transaction-local setting named `setting`, if the request
/// has the header.
fn setting_from_header(req: &ServiceRequest, header: &str, setting: &str) -> Vec<(String, String)> {
    req.headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(|v| vec![(setting.to_owned(), v.to_owned())])
        .unwrap_or_default()
}

/// What the after-commit hooks of the tests' handlers record, in the order they ran.
pub type Events = Mutex<Vec<String>>;

/// How many times each retrying handler ran, by the name in its path.
pub type Attempts = Mutex<BTreeMap<String, u32>>;

/// What the retried routes share: the attempts so far, and the barrier the first attempts
/// of two `/retry/skew` requests meet at, so that they overlap whatever the timing.
#[derive(Default)]
pub struct RetryState {
    pub attempts: Attempts,
    pub barrier: Option<tokio::sync::Barrier>,
}

/// The retry policy of the tests' retried routes: the default attempts, and a first
/// back-off of at least 50 ms, in which the transaction that won a conflict has surely
/// committed (so that the retried one does not conflict with it again).
fn quick_retry() -> Retry {
    Retry::default().backoff(Duration::from_millis(100), Duration::from_millis(100))
}

/// The tests' application on its own database, served on a free port.
pub struct TestApp {
    pub address: String,
    pub database: Database,
    pub tally: Arc<Tally>,
    pub application_name: String,
    pub client: reqwest::Client,
    /// What the after-commit hooks recorded.
    pub events: web::Data<Events>,
    /// What the retried routes share.
    pub retry: web::Data<RetryState>,
    server: ServerHandle,
    cut_off: Arc<Notify>,
    // Last: dropped after the server and the pool are closed.
    pub db: TestDb,
}

impl TestApp {
    /// The application with the default options.
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        init_logging();
        let db = TestDb::new().await;
        let application_name = format!("ads-{}", &db.name[TEST_DB_PREFIX.len()..]);
        let mut config = SessionConfig::default();
        config.application_name = application_name.clone();
        config.pool_size = 2;
        config.max_overflow = 2;
        config.checkout_timeout = Duration::from_secs(5);
        (options.config)(&mut config);
        let tally = Arc::new(Tally::default());
        let mut url = url::Url::parse(&db.url).expect("test database URL");
        if let Some(user) = options.user {
            url.set_username(user).expect("a URL with a user");
        }
        let url = DatabaseUrl::parse(url.as_str()).expect("test database URL");
        let mut builder = Database::builder(url, config).observer(Observer(tally.clone()));
        if options.render {
            builder = builder.render_errors(render_problem);
        }
        let database = builder.build().expect("database");

        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let address = format!(
            "http://{}",
            listener.local_addr().expect("the listener's address")
        );
        let app_db = database.clone();
        let scope = options.scope;
        let cut_off = Arc::new(Notify::new());
        let app_cut_off = cut_off.clone();
        let events = web::Data::new(Events::default());
        let app_events = events.clone();
        let retry = web::Data::new(RetryState {
            attempts: Attempts::default(),
            barrier: Some(tokio::sync::Barrier::new(2)),
        });
        let app_retry = retry.clone();
        let server =
            HttpServer::new(move || {
                let (db, cut_off) = (&app_db, app_cut_off.clone());
                App::new()
                .app_data(app_events.clone())
                .app_data(app_retry.clone())
                .service(post("/items/{name}", insert, db))
                .service(post("/items/{name}/then-409", insert_then_409, db))
                .service(post("/items/{name}/then-error", insert_then_error, db))
                .service(post("/items/{name}/then-panic", insert_then_panic, db))
                .service(post("/items/{name}/then-swallow", insert_then_swallow, db))
                .service(post("/items/{name}/then-sleep/{ms}", insert_then_sleep, db))
                .service(post(
                    "/items/{name}/slow-commit/{ms}",
                    insert_with_slow_commit,
                    db,
                ))
                .service(post(
                    "/items/{name}/failing-commit",
                    insert_with_failing_commit,
                    db,
                ))
                .service(
                    // Outside the session middleware, something that drops the request's
                    // future when the test says so ([`TestApp::post_and_cut_off`]), as a
                    // request timeout or a shutdown would.
                    web::resource("/cut-off/{name}/then-sleep/{ms}")
                        .route(web::post().to(insert_then_sleep))
                        .wrap(db.middleware())
                        .wrap_fn(move |req, service| {
                            let (call, cut_off) = (service.call(req), cut_off.clone());
                            async move {
                                tokio::select! {
                                    result = call => result,
                                    () = cut_off.notified() => Err(
                                        actix_web::error::ErrorGatewayTimeout("request cut off"),
                                    ),
                                }
                            }
                        }),
                )
                .service(
                    web::resource("/no-session/panic")
                        .route(web::post().to(panic_without_session))
                        .wrap(db.middleware()),
                )
                .service(
                    // Counts the drops of each request's extensions (through a marker the
                    // inner wrapper puts there), while the outer one extracts the session
                    // again from the finished response's request, as an audit middleware
                    // might: that must not keep the request alive.
                    web::resource("/extract-after/{name}")
                        .route(web::post().to(insert))
                        .wrap_fn(|req, service| {
                            req.extensions_mut().insert(DropCounted);
                            service.call(req)
                        })
                        .wrap(db.middleware())
                        .wrap_fn(|req, service| {
                            let call = service.call(req);
                            async move {
                                let res = call.await?;
                                let mut payload = actix_web::dev::Payload::None;
                                let _late = actix_diesel_session::DbSession::from_request(
                                    res.request(),
                                    &mut payload,
                                )
                                .await;
                                Ok(res)
                            }
                        }),
                )
                // Session options per route.
                .service(post("/options/default", show_options, db))
                .service(post_in(
                    "/options/repeatable-read",
                    show_options,
                    db.middleware().isolation(Isolation::RepeatableRead),
                ))
                .service(post_in(
                    "/options/serializable-read-only-deferrable",
                    show_options,
                    db.middleware()
                        .isolation(Isolation::Serializable)
                        .read_only()
                        .deferrable(),
                ))
                .service(post_in(
                    "/read-only/items/{name}",
                    insert,
                    db.middleware().read_only(),
                ))
                .service(post_in(
                    "/read-only/count",
                    count_items,
                    db.middleware().read_only(),
                ))
                // Transaction-local settings.
                .service(post_in(
                    "/docs/visible",
                    visible_docs,
                    db.middleware()
                        .settings_from(|req| setting_from_header(req, "x-tenant", "app.tenant_id")),
                ))
                .service(post("/docs/as/{tenant}/{when}", docs_as, db))
                .service(post("/setting/{name}", read_setting, db))
                .service(post("/set-local/{when}/{name}", set_local_then_read, db))
                .service(post_in(
                    "/settings-from/app.x",
                    read_app_x,
                    db.middleware()
                        .settings_from(|req| setting_from_header(req, "x-value", "app.x")),
                ))
                // After-commit hooks and early commits.
                .service(post("/hooked/{name}/{how}", hooked, db))
                .service(post("/early/{name}/{how}", commit_early, db))
                .service(post("/abandon-statement", abandon_statement, db))
                // Retries after a conflict.
                .service(post_in(
                    "/retry/skew/{who}",
                    add_to_skew,
                    db.middleware()
                        .isolation(Isolation::Serializable)
                        .retry(quick_retry()),
                ))
                .service(
                    // Inside a resource's session middleware without retries, a route's
                    // that retries takes the session over.
                    web::resource("/retry/always/{name}")
                        .route(
                            web::post()
                                .to(always_conflict)
                                .wrap(db.middleware().retry(quick_retry())),
                        )
                        .wrap(db.middleware()),
                )
                .service(post_in(
                    "/retry/small-body/{name}",
                    always_conflict,
                    db.middleware().retry(quick_retry().body_limit(4)),
                ))
                .service(post("/no-retry/always/{name}", always_conflict, db))
                .service(post_in(
                    "/retry/recovered/{name}/{how}",
                    recovered_conflict,
                    db.middleware().retry(quick_retry()),
                ))
                .service(post("/no-retry/recovered/{name}/{how}", recovered_conflict, db))
                .service(post_in(
                    "/retry/escaping/{name}",
                    conflict_then_escape,
                    db.middleware().retry(quick_retry()),
                ))
                .service(post_in(
                    "/retry/at-commit/{name}",
                    conflict_at_first_commit,
                    db.middleware().retry(quick_retry()),
                ))
                .configure(|cfg| {
                    if scope {
                        cfg.service(
                            web::scope("/scoped")
                                .wrap(db.middleware())
                                .route("/{name}", web::post().to(insert))
                                .route("/{name}/then-panic", web::post().to(insert_then_panic)),
                        );
                    }
                })
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(options.shutdown_timeout)
            .listen(listener)
            .expect("listen")
            .run();
        let handle = server.handle();
        tokio::spawn(server);
        TestApp {
            address,
            database,
            tally,
            application_name,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            server: handle,
            events,
            retry,
            cut_off,
            db,
        }
    }

    /// What the after-commit hooks recorded so far.
    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// POSTs to `path` (no body) and returns the response; panics if none came.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// POSTs to `path`, a `/cut-off/...` route, and once its handler holds an open
    /// transaction, drops the request's future; returns the response (504).
    pub async fn post_and_cut_off(&self, path: &str) -> reqwest::Response {
        let request = tokio::spawn(self.client.post(self.url(path)).send());
        self.wait_for_open_transaction().await;
        self.cut_off.notify_one();
        request
            .await
            .expect("the request task")
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// The states of the pool's server sessions now.
    pub async fn session_states(&self) -> Vec<String> {
        self.db.session_states(&self.application_name).await
    }

    /// Waits (bounded) until one of the pool's sessions is idle inside a transaction after
    /// a statement past its `BEGIN`: a handler wrote and holds its transaction open. (Right
    /// after the `BEGIN` the session is idle in a transaction too, while the handler is
    /// still waiting for its connection: a request cut off then ends no transaction.)
    pub async fn wait_for_open_transaction(&self) {
        assert!(
            eventually(SLACK, || async {
                self.db
                    .holds_a_written_transaction(&self.application_name)
                    .await
            })
            .await,
            "a handler holds an open transaction: {:?}",
            self.session_states().await
        );
    }

    /// The pool holds no connection inside a transaction: every one of its server
    /// sessions is `idle` now (none `idle in transaction`, aborted or not, none `active`),
    /// and a following request on the same pool writes and commits.
    pub async fn assert_pool_clean_and_serving(&self, next: &str) {
        // Waited for, within the slack: a backend can show `active` for a moment after the
        // response while it reads the last message of a pipeline (a Sync after an error),
        // on a loaded machine. A connection left inside a transaction stays so, and fails.
        let clean = eventually(SLACK, || async {
            self.session_states().await.iter().all(|s| s == "idle")
        })
        .await;
        let states = self.session_states().await;
        assert!(
            clean,
            "every pooled connection is idle, none in a transaction: {states:?}"
        );
        let response = self.post(&format!("/items/{next}")).await;
        assert_eq!(response.status(), 201, "a following request works");
        assert_eq!(
            self.db.items_named(next).await,
            1,
            "and its write committed"
        );
    }

    /// Stops the server (in-flight requests get the shutdown timeout) and waits for it.
    pub async fn stop_server(&self) {
        self.server.stop(true).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sent at once; the server stops on its own threads.
        drop(self.server.stop(false));
        self.database.close();
    }
}

/// The application's handlers (in a module of their own: `RunQueryDsl`'s `load` would
/// shadow the atomics' above).
mod handlers {
    use std::time::Duration;

    use std::sync::PoisonError;

    use actix_diesel_session::{DbSession, SessionError};
    use actix_web::{web, HttpResponse};
    use diesel::sql_types::{BigInt, Integer, Text};
    use diesel::QueryableByName;
    use diesel_async::RunQueryDsl;

    use super::{Events, RetryState};

    /// What a test handler answers with.
    type Answer = Result<HttpResponse, SessionError>;

    async fn write(db: &DbSession, name: &str) -> Result<(), SessionError> {
        let mut conn = db.conn().await?;
        diesel::sql_query("INSERT INTO items (name) VALUES ($1)")
            .bind::<Text, _>(name)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn insert(db: DbSession, name: web::Path<String>) -> Answer {
        write(&db, &name).await?;
        Ok(HttpResponse::Created().body(name.into_inner()))
    }

    pub async fn insert_then_409(db: DbSession, name: web::Path<String>) -> Answer {
        write(&db, &name).await?;
        Ok(HttpResponse::Conflict().body("already there"))
    }

    pub async fn insert_then_error(db: DbSession, name: web::Path<String>) -> Answer {
        write(&db, &name).await?;
        // An error that did not come from the database: the transaction is healthy, and only
        // the session's rule keeps it from committing.
        Err(SessionError::Conflict)
    }

    pub async fn panic_without_session() -> HttpResponse {
        panic!("test handler panics without taking its session");
    }

    pub async fn insert_then_panic(db: DbSession, name: web::Path<String>) -> Answer {
        // The guard is held while the handler panics.
        let mut conn = db.conn().await?;
        diesel::sql_query("INSERT INTO items (name) VALUES ($1)")
            .bind::<Text, _>(name.as_str())
            .execute(&mut *conn)
            .await?;
        panic!("test handler panics after its write");
    }

    pub async fn insert_then_swallow(db: DbSession, name: web::Path<String>) -> Answer {
        write(&db, &name).await?;
        // The same name again fails on the server (unique violation), which aborts the
        // transaction; the handler ignores the error and answers success anyway.
        let again = write(&db, &name).await;
        assert!(again.is_err(), "the second insert fails");
        Ok(HttpResponse::Created().finish())
    }

    pub async fn insert_then_sleep(db: DbSession, path: web::Path<(String, u64)>) -> Answer {
        let (name, ms) = path.into_inner();
        // The guard is held across the sleep: the handler holds its transaction open.
        let mut conn = db.conn().await?;
        diesel::sql_query("INSERT INTO items (name) VALUES ($1)")
            .bind::<Text, _>(name.as_str())
            .execute(&mut *conn)
            .await?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        drop(conn);
        Ok(HttpResponse::Created().body(name))
    }

    pub async fn insert_with_slow_commit(db: DbSession, path: web::Path<(String, i32)>) -> Answer {
        let (name, ms) = path.into_inner();
        write(&db, &name).await?;
        diesel::sql_query("INSERT INTO commit_delay (ms) VALUES ($1)")
            .bind::<Integer, _>(ms)
            .execute(&mut *db.conn().await?)
            .await?;
        Ok(HttpResponse::Created().body(name))
    }

    pub async fn insert_with_failing_commit(db: DbSession, name: web::Path<String>) -> Answer {
        write(&db, &name).await?;
        // A reference to no item: accepted now, refused at COMMIT.
        diesel::sql_query("INSERT INTO checked (item_id) VALUES (-1)")
            .execute(&mut *db.conn().await?)
            .await?;
        Ok(HttpResponse::Created().body(name.into_inner()))
    }

    #[derive(QueryableByName)]
    struct TransactionIsolation {
        #[diesel(sql_type = Text)]
        transaction_isolation: String,
    }

    #[derive(QueryableByName)]
    struct TransactionReadOnly {
        #[diesel(sql_type = Text)]
        transaction_read_only: String,
    }

    #[derive(QueryableByName)]
    struct TransactionDeferrable {
        #[diesel(sql_type = Text)]
        transaction_deferrable: String,
    }

    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = Text)]
        value: String,
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    /// The transaction's isolation level, read-only and deferrable settings as the server
    /// reports them (`read committed/off/off`), from the transaction's first statements.
    pub async fn show_options(db: DbSession) -> Answer {
        let mut conn = db.conn().await?;
        let isolation = diesel::sql_query("SHOW transaction_isolation")
            .get_result::<TransactionIsolation>(&mut *conn)
            .await?
            .transaction_isolation;
        let read_only = diesel::sql_query("SHOW transaction_read_only")
            .get_result::<TransactionReadOnly>(&mut *conn)
            .await?
            .transaction_read_only;
        let deferrable = diesel::sql_query("SHOW transaction_deferrable")
            .get_result::<TransactionDeferrable>(&mut *conn)
            .await?
            .transaction_deferrable;
        Ok(HttpResponse::Ok().body(format!("{isolation}/{read_only}/{deferrable}")))
    }

    pub async fn count_items(db: DbSession) -> Answer {
        let n = diesel::sql_query("SELECT count(*) AS n FROM items")
            .get_result::<Count>(&mut *db.conn().await?)
            .await?
            .n;
        Ok(HttpResponse::Ok().body(n.to_string()))
    }

    /// The tenants of the `docs` rows the session sees, in row order (`A,B,A`).
    async fn tenants_visible(db: &DbSession) -> Result<String, SessionError> {
        Ok(diesel::sql_query(
            "SELECT coalesce(string_agg(tenant, ',' ORDER BY id), '') AS value FROM docs",
        )
        .get_result::<Value>(&mut *db.conn().await?)
        .await?
        .value)
    }

    /// `current_setting(name, true)`, or `<null>` when the setting does not exist.
    async fn setting(db: &DbSession, name: &str) -> Result<String, SessionError> {
        Ok(
            diesel::sql_query("SELECT coalesce(current_setting($1, true), '<null>') AS value")
                .bind::<Text, _>(name)
                .get_result::<Value>(&mut *db.conn().await?)
                .await?
                .value,
        )
    }

    pub async fn visible_docs(db: DbSession) -> Answer {
        Ok(HttpResponse::Ok().body(tenants_visible(&db).await?))
    }

    /// Sets `app.tenant_id` with `set_local`: before the first `conn()` (`first`: it goes
    /// out with the BEGIN), or after a first statement (`late`, answering what the session
    /// saw before and after: `|A`).
    pub async fn docs_as(db: DbSession, path: web::Path<(String, String)>) -> Answer {
        let (tenant, when) = path.into_inner();
        let body = match when.as_str() {
            "first" => {
                db.set_local("app.tenant_id", &tenant).await?;
                tenants_visible(&db).await?
            }
            "late" => {
                let before = tenants_visible(&db).await?;
                db.set_local("app.tenant_id", &tenant).await?;
                format!("{before}|{}", tenants_visible(&db).await?)
            }
            other => return Ok(HttpResponse::BadRequest().body(other.to_owned())),
        };
        Ok(HttpResponse::Ok().body(body))
    }

    pub async fn read_setting(db: DbSession, name: web::Path<String>) -> Answer {
        Ok(HttpResponse::Ok().body(setting(&db, &name).await?))
    }

    pub async fn read_app_x(db: DbSession) -> Answer {
        Ok(HttpResponse::Ok().body(setting(&db, "app.x").await?))
    }

    /// Sets `name` to the request's body with `set_local` and answers the setting as the
    /// transaction then sees it. `when`: `before` the first `conn()`, `after` a first
    /// statement, or `retry`: before a first `conn()` that the handler's own timeout cuts
    /// off (the check-out or BEGIN is under way), then a second one.
    pub async fn set_local_then_read(
        db: DbSession,
        path: web::Path<(String, String)>,
        value: String,
    ) -> Answer {
        let (when, name) = path.into_inner();
        match when.as_str() {
            "before" => db.set_local(&name, &value).await?,
            "after" => {
                setting(&db, "transaction_isolation").await?;
                db.set_local(&name, &value).await?;
            }
            "retry" => {
                db.set_local(&name, &value).await?;
                let first = tokio::time::timeout(Duration::ZERO, db.conn()).await;
                if first.is_ok() {
                    return Ok(HttpResponse::Conflict().body("the first conn() was not cut off"));
                }
            }
            other => return Ok(HttpResponse::BadRequest().body(other.to_owned())),
        }
        Ok(HttpResponse::Ok().body(setting(&db, &name).await?))
    }

    /// An after-commit hook that records `event`.
    fn record(
        events: &web::Data<Events>,
        event: String,
    ) -> impl FnOnce() -> std::future::Ready<Result<(), String>> + 'static {
        let events = events.clone();
        move || {
            events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(event);
            std::future::ready(Ok(()))
        }
    }

    fn explode() -> Result<(), String> {
        panic!("an after-commit hook panics");
    }

    /// Writes `name` and adds after-commit hooks that record `name:...`, then ends as `how`
    /// says: `ok` (201), `409`, `error`, `panic`, `failing-commit` (a deferred constraint
    /// fails at COMMIT); `hook-error` and `hook-panic` (a first hook fails, a second
    /// records); `slow-{ms}` (a first hook records `name:first`, a second sleeps `ms`, then
    /// records `name:slow`); `no-write` (200) and `no-write-409`, which never take a
    /// connection.
    pub async fn hooked(
        db: DbSession,
        path: web::Path<(String, String)>,
        events: web::Data<Events>,
    ) -> Answer {
        let (name, how) = path.into_inner();
        if let Some(ms) = how.strip_prefix("slow-") {
            let ms: u64 = ms.parse().unwrap_or(0);
            db.after_commit(record(&events, format!("{name}:first")));
            let slow = record(&events, format!("{name}:slow"));
            db.after_commit(move || async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                slow().await
            });
            write(&db, &name).await?;
            return Ok(HttpResponse::Created().body(name));
        }
        match how.as_str() {
            "no-write" => {
                db.after_commit(record(&events, format!("{name}:1")));
                return Ok(HttpResponse::Ok().finish());
            }
            "no-write-409" => {
                db.after_commit(record(&events, format!("{name}:1")));
                return Ok(HttpResponse::Conflict().finish());
            }
            "hook-error" => db.after_commit(|| async { Err("the hook failed".to_owned()) }),
            "hook-panic" => db.after_commit(|| async { explode() }),
            _ => {}
        }
        db.after_commit(record(&events, format!("{name}:1")));
        write(&db, &name).await?;
        db.after_commit(record(&events, format!("{name}:2")));
        match how.as_str() {
            "ok" | "hook-error" | "hook-panic" => Ok(HttpResponse::Created().body(name)),
            "409" => Ok(HttpResponse::Conflict().finish()),
            "error" => Err(SessionError::Conflict),
            "panic" => panic!("test handler panics after adding its hooks"),
            "failing-commit" => {
                diesel::sql_query("INSERT INTO checked (item_id) VALUES (-1)")
                    .execute(&mut *db.conn().await?)
                    .await?;
                Ok(HttpResponse::Created().body(name))
            }
            other => Ok(HttpResponse::BadRequest().body(other.to_owned())),
        }
    }

    /// Writes `name`, then commits early (`DbSession::commit`) and goes on as `how` says:
    /// `then-500` (adds a hook recording `name`, commits, answers 500), `then-conn` (asks
    /// for the connection again: 500 `refused: ...` when the session refuses, 200 when it
    /// allows it), `holding-guard` (commits while holding the connection guard: 201
    /// `refused: ...` when the session refuses, then the middleware commits; 200 when it
    /// allows it), `failing-commit` (a deferred constraint fails at the early COMMIT; the
    /// error is passed on), `then-sleep-{ms}` (sleeps `ms` after the COMMIT, answers 201).
    pub async fn commit_early(
        db: DbSession,
        path: web::Path<(String, String)>,
        events: web::Data<Events>,
    ) -> Answer {
        let (name, how) = path.into_inner();
        if how == "holding-guard" {
            let mut conn = db.conn().await?;
            diesel::sql_query("INSERT INTO items (name) VALUES ($1)")
                .bind::<Text, _>(name.as_str())
                .execute(&mut *conn)
                .await?;
            let early = db.commit().await;
            drop(conn);
            return Ok(match early {
                Err(e) => HttpResponse::Created().body(format!("refused: {e}")),
                Ok(()) => HttpResponse::Ok().body("committed while the guard was held"),
            });
        }
        write(&db, &name).await?;
        if how == "failing-commit" {
            diesel::sql_query("INSERT INTO checked (item_id) VALUES (-1)")
                .execute(&mut *db.conn().await?)
                .await?;
        }
        if how == "then-500" {
            db.after_commit(record(&events, name.clone()));
        }
        db.commit().await?;
        if let Some(ms) = how.strip_prefix("then-sleep-") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            return Ok(HttpResponse::Created().body(name));
        }
        match how.as_str() {
            "then-500" => Ok(HttpResponse::InternalServerError().body("committed early")),
            "then-conn" => Ok(match db.conn().await {
                Err(e) => HttpResponse::InternalServerError().body(format!("refused: {e}")),
                Ok(_) => HttpResponse::Ok().body("conn() after the commit was allowed"),
            }),
            "failing-commit" => Ok(HttpResponse::Created().body(name)),
            other => Ok(HttpResponse::BadRequest().body(other.to_owned())),
        }
    }

    /// Counts an attempt of the request named `name`; the number of this one.
    fn attempt(state: &RetryState, name: &str) -> u32 {
        let mut attempts = state
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = attempts.entry(name.to_owned()).or_default();
        *n += 1;
        *n
    }

    #[derive(QueryableByName)]
    struct Sum {
        #[diesel(sql_type = BigInt)]
        sum: i64,
    }

    /// Write skew: reads the sum of `skew`, then adds a row of the sum plus the body's
    /// number. Two of these run serially leave `{x, x + y}`; run concurrently under
    /// `SERIALIZABLE`, one of them fails (40001). Each request's first attempt waits, after
    /// its read, for the other's, so that they overlap. Its after-commit hook records
    /// `skew:{who}`.
    pub async fn add_to_skew(
        db: DbSession,
        who: web::Path<String>,
        body: String,
        state: web::Data<RetryState>,
        events: web::Data<Events>,
    ) -> Answer {
        let n = attempt(&state, &who);
        let x: i64 = body
            .trim()
            .parse()
            .map_err(|_| SessionError::internal("body"))?;
        db.after_commit(record(&events, format!("skew:{who}")));
        let sum = diesel::sql_query("SELECT coalesce(sum(v), 0)::bigint AS sum FROM skew")
            .get_result::<Sum>(&mut *db.conn().await?)
            .await?
            .sum;
        if n == 1 {
            if let Some(barrier) = &state.barrier {
                let met = tokio::time::timeout(Duration::from_secs(10), barrier.wait()).await;
                assert!(met.is_ok(), "the other request's first attempt came");
            }
        }
        diesel::sql_query("INSERT INTO skew (who, v) VALUES ($1, $2)")
            .bind::<Text, _>(who.as_str())
            .bind::<BigInt, _>(sum + x)
            .execute(&mut *db.conn().await?)
            .await?;
        Ok(HttpResponse::Created().body(format!("{who}: attempt {n}")))
    }

    /// Writes, records the body it read, then raises a serialization failure (40001) on
    /// the server, every time.
    pub async fn always_conflict(
        db: DbSession,
        name: web::Path<String>,
        body: String,
        state: web::Data<RetryState>,
        events: web::Data<Events>,
    ) -> Answer {
        attempt(&state, &name);
        events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("{name} read {body:?}"));
        db.after_commit(record(&events, format!("{name}:committed")));
        write(&db, &name).await?;
        diesel::sql_query(
            "DO $$ BEGIN RAISE EXCEPTION 'conflict by design' USING ERRCODE = '40001'; END $$",
        )
        .execute(&mut *db.conn().await?)
        .await?;
        Ok(HttpResponse::Created().finish())
    }

    /// A serialization failure the handler recovers from: raised inside a nested unit of
    /// work (a savepoint, which rolls back), after which the handler writes a row and
    /// answers 422 as its own decision (`how` = `422`) or 201 (`201`). Or, with `how` =
    /// `swallowed`, raised in the transaction itself and ignored, answering 201.
    pub async fn recovered_conflict(
        db: DbSession,
        path: web::Path<(String, String)>,
        state: web::Data<RetryState>,
    ) -> Answer {
        use diesel_async::AsyncConnection;
        let (name, how) = path.into_inner();
        attempt(&state, &name);
        let raise =
            "DO $$ BEGIN RAISE EXCEPTION 'conflict by design' USING ERRCODE = '40001'; END $$";
        let mut conn = db.conn().await?;
        if how == "swallowed" {
            let swallowed = diesel::sql_query(raise).execute(&mut *conn).await;
            assert!(swallowed.is_err(), "the server raised it");
        } else {
            let nested = conn
                .transaction::<(), diesel::result::Error, _>(async |conn| {
                    diesel::sql_query(raise).execute(conn).await?;
                    Ok(())
                })
                .await;
            assert!(nested.is_err(), "the server raised it inside the savepoint");
            drop(conn);
            write(&db, &name).await?;
        }
        Ok(match how.as_str() {
            "422" => HttpResponse::UnprocessableEntity().finish(),
            _ => HttpResponse::Created().finish(),
        })
    }

    /// Meets a serialization failure, then lets its connection guard outlive it (moved into
    /// a task that holds it for 300 ms) and answers 201.
    pub async fn conflict_then_escape(
        db: DbSession,
        name: web::Path<String>,
        state: web::Data<RetryState>,
    ) -> Answer {
        attempt(&state, &name);
        let mut conn = db.conn().await?;
        let raised = diesel::sql_query(
            "DO $$ BEGIN RAISE EXCEPTION 'conflict by design' USING ERRCODE = '40001'; END $$",
        )
        .execute(&mut *conn)
        .await;
        assert!(raised.is_err(), "the server raised it");
        actix_web::rt::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(conn);
        });
        Ok(HttpResponse::Created().finish())
    }

    /// Writes a row whose COMMIT fails with a serialization failure on the first attempt
    /// only; the after-commit hook records `{name}:committed`.
    pub async fn conflict_at_first_commit(
        db: DbSession,
        name: web::Path<String>,
        state: web::Data<RetryState>,
        events: web::Data<Events>,
    ) -> Answer {
        let n = attempt(&state, &name);
        db.after_commit(record(&events, format!("{name}:committed {n}")));
        diesel::sql_query("INSERT INTO refused_at_commit (attempt) VALUES ($1)")
            .bind::<Integer, _>(i32::try_from(n).unwrap_or(i32::MAX))
            .execute(&mut *db.conn().await?)
            .await?;
        Ok(HttpResponse::Created().finish())
    }

    /// Starts a statement and drops its future mid-flight (the handler's own timeout), as
    /// a handler may: the statement's outcome is unknown, so the session closes the
    /// connection instead of committing.
    pub async fn abandon_statement(db: DbSession) -> Answer {
        let mut conn = db.conn().await?;
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            diesel::sql_query("SELECT pg_sleep(0.3)").execute(&mut *conn),
        )
        .await;
        drop(conn);
        Ok(match cut {
            Err(_) => HttpResponse::Ok().body("statement abandoned"),
            Ok(_) => HttpResponse::Conflict().body("the statement was not cut off"),
        })
    }
}
