//! TLS to PostgreSQL (contract section 8), against private clusters with TLS on and off.

use std::time::Duration;

use actix_diesel_session::Connector;
use actix_diesel_session::DatabaseUrl;
use diesel::sql_types::Bool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::support::pg_cluster::{PgCluster, ServerTls};
use crate::support::{spawn_app_on, TestApp, TestDb};

/// Sent in every URL; trust authentication ignores it, and it must never show.
const PASSWORD: &str = "tls-hunter2-secret";

/// A certificate authority made for one test.
struct TestCa(CertifiedIssuer<'static, KeyPair>);

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        TestCa(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A server certificate valid for the DNS name `localhost` only (not for 127.0.0.1).
    fn issue_for_localhost(&self) -> ServerTls {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.0)
            .unwrap();
        ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn pem(&self) -> String {
        self.0.pem()
    }
}

fn connector(url: &str) -> Connector {
    let url = DatabaseUrl::parse(url).expect("valid URL");
    Connector::new(&url, "ledger-tls-test", None, None, Duration::from_secs(5))
}

/// Whether the session runs over TLS, asked on the connection itself.
async fn uses_tls(conn: &mut AsyncPgConnection) -> bool {
    diesel::select(diesel::dsl::sql::<Bool>(
        "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    ))
    .get_result(conn)
    .await
    .expect("pg_stat_ssl")
}

/// Connects through the service's connector; returns whether TLS is in use.
async fn connects(url: &str) -> bool {
    let mut conn = connector(url)
        .establish()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    uses_tls(&mut conn).await
}

/// Fails to connect; returns the error text, checked to name no secret.
async fn refused(url: &str) -> String {
    let Err(e) = connector(url).establish().await else {
        panic!("{url} connected");
    };
    let text = e.to_string();
    assert!(!text.contains(PASSWORD), "{text}");
    text
}

/// The service on the cluster's database with this URL, migrating at start-up.
async fn spawn_on(url: &str) -> TestApp {
    spawn_app_on(
        TestDb::not_created(),
        &[
            ("DATABASE_URL", url),
            ("RUN_MIGRATIONS", "true"),
            ("DB_HEALTH_TIMEOUT", "2"),
        ],
    )
    .await
}

/// Readiness fails with an `output` that says why and names no secret.
async fn assert_not_ready(app: &TestApp, expected: &[&str]) {
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    let output = ready.body["checks"]["postgres:responseTime"][0]["output"]
        .as_str()
        .unwrap_or_else(|| panic!("no output: {}", ready.text))
        .to_owned();
    for part in expected {
        assert!(output.contains(part), "{part:?} not in {output:?}");
    }
    assert!(!ready.text.contains(PASSWORD), "{}", ready.text);
    let answer = app
        .post_json("/accounts", &serde_json::json!({ "name": "never" }))
        .await;
    answer.assert_problem(503, "database_unavailable");
    assert!(!answer.text.contains(PASSWORD));
}

#[tokio::test]
async fn sslmodes_connect_and_verify_as_libpq_does_against_a_tls_server() {
    let ca = TestCa::new("ledger test CA");
    let other_ca = TestCa::new("some other CA");
    let cluster = PgCluster::start_with_tls(ca.issue_for_localhost()).await;
    let ca_file = cluster.write_public("ca.pem", &ca.pem());
    let other_ca_file = cluster.write_public("other-ca.pem", &other_ca.pem());
    let (ca_file, other_ca_file) = (ca_file.display(), other_ca_file.display());
    let url = |host: &str, query: &str| cluster.url_with(host, PASSWORD, query);

    // Encryption without verification, as in libpq.
    assert!(connects(&url("127.0.0.1", "sslmode=require")).await);
    assert!(connects(&url("127.0.0.1", "sslmode=prefer")).await);
    assert!(
        connects(&url("127.0.0.1", "")).await,
        "prefer is the default"
    );
    assert!(!connects(&url("127.0.0.1", "sslmode=disable")).await);
    // verify-ca checks the chain but not the name (the certificate is for `localhost`).
    assert!(
        connects(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca_file}")
        ))
        .await
    );
    // verify-full checks both.
    let verified = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca_file}"),
    );
    assert!(connects(&verified).await);

    let wrong_host = url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca_file}"),
    );
    let error = refused(&wrong_host).await;
    assert!(
        error.contains("certificate") && error.contains("sslmode=verify-full"),
        "{error}"
    );
    let wrong_ca = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other_ca_file}"),
    );
    let error = refused(&wrong_ca).await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    // require with a root certificate verifies the chain, as libpq does.
    refused(&url(
        "localhost",
        &format!("sslmode=require&sslrootcert={other_ca_file}"),
    ))
    .await;

    // The service itself: migrations, the pool and readiness all go over verified TLS.
    let app = spawn_on(&verified).await;
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    app.create_account("over-tls", 1).await;
    let admin = cluster.client("postgres").await;
    let sessions: Vec<(String, bool)> = admin
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name IN ('ledger', 'ledger-health') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        sessions,
        [
            ("ledger".to_owned(), true),
            ("ledger-health".to_owned(), true)
        ]
    );

    // A failed verification keeps the service up but not ready, and says why.
    let app = spawn_on(&wrong_host).await;
    assert_eq!(app.get("/health/live").await.status, 200);
    assert_not_ready(&app, &["certificate", "sslmode=verify-full"]).await;
    let app = spawn_on(&wrong_ca).await;
    assert_not_ready(&app, &["UnknownIssuer"]).await;
}

#[tokio::test]
async fn require_fails_closed_against_a_server_without_tls() {
    let cluster = PgCluster::start().await;
    let url = |query: &str| cluster.url_with("127.0.0.1", PASSWORD, query);

    let error = refused(&url("sslmode=require")).await;
    assert!(error.contains("TLS"), "{error}");
    refused(&url("sslmode=verify-full")).await;
    // prefer falls back to plain text when the server offers no TLS.
    assert!(!connects(&url("sslmode=prefer")).await);

    let app = spawn_on(&url("sslmode=require")).await;
    assert_eq!(app.get("/health/live").await.status, 200);
    assert_not_ready(&app, &["TLS", "sslmode=require"]).await;
    let admin = cluster.client("postgres").await;
    let service_sessions: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'ledger%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(service_sessions, 0, "nothing connected in plain text");
}
