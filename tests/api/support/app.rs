//! The service spawned in the test process on a free port, on a test's own database, and
//! the client that talks to it.

use std::collections::HashMap;

use actix_diesel_session::Database;
use ledger::{Application, Config};
use reqwest::StatusCode;
use serde_json::Value;

use super::{url_for, TestDb};

/// The `Retry-After` value of every 503 (README, "During a database outage": `Retry-After: 1`).
pub const RETRY_AFTER: &str = "1";

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
    /// The session layer's database: `pool.status()` is all its pools together.
    pub pool: Database,
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
    let pool = app.database().clone();
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
