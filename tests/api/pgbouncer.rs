//! Behind a real PgBouncer (contract section 12): session mode, and the timeouts applied
//! with `SET LOCAL` behind transaction mode. The 10 s load through transaction mode with
//! three service processes is `serial::pgbouncer`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::binary::Binary;
use crate::support::eventually;
use crate::support::pg_cluster::PgCluster;
use crate::support::pgbouncer::{PgBouncer, PoolMode};

/// The installed PgBouncer, or `None` after printing why the test is skipped.
pub fn pgbouncer_or_skip(test: &str) -> Option<std::path::PathBuf> {
    match PgBouncer::available() {
        Ok(binary) => Some(binary),
        Err(reason) => {
            eprintln!("skipping {test}: {reason}");
            None
        }
    }
}

/// A private cluster with an empty database `ledger`, and PgBouncer in front of it.
pub async fn cluster_behind(
    binary: std::path::PathBuf,
    mode: PoolMode,
    server_connections: u32,
) -> (PgCluster, PgBouncer) {
    let cluster = PgCluster::start().await;
    cluster
        .client("postgres")
        .await
        .batch_execute("CREATE DATABASE ledger")
        .await
        .expect("create database");
    let bouncer = PgBouncer::start(binary, &cluster, mode, server_connections).await;
    (cluster, bouncer)
}

/// Starts the service binary on `url` (migrating at start-up, through whatever `url`
/// points at) and waits until it is ready.
pub async fn service(url: &str, vars: &[(&str, &str)]) -> Binary {
    let mut all = vec![("DATABASE_URL", url), ("RUN_MIGRATIONS", "true")];
    all.extend_from_slice(vars);
    let service = Binary::start(&all).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            service.status("/health/ready").await == Some(200)
        })
        .await,
        "the service became ready behind PgBouncer:\n{}",
        service.log()
    );
    service
}

/// Opens `count` accounts of `balance` each through `service`; their ids.
pub async fn open_accounts(service: &Binary, count: usize, balance: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    for n in 0..count {
        let response = service
            .client
            .post(service.url("/accounts"))
            .json(&json!({ "name": format!("pooled-{n}"), "balance": balance }))
            .send()
            .await
            .expect("create account");
        assert_eq!(response.status().as_u16(), 201);
        let body: serde_json::Value = response.json().await.expect("account body");
        ids.push(body["id"].as_i64().expect("account id"));
    }
    ids
}

/// What a mixed load did.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Ids of the transfers answered 201.
    pub transfers: Vec<i64>,
    /// Reads answered 200.
    pub reads: usize,
    /// Answers in the 4xx range (an overdrawn account's 422, say): allowed.
    pub client_errors: usize,
    /// Answers in the 5xx range, and requests with no answer at all, with what came.
    pub failures: Vec<String>,
}

impl LoadOutcome {
    /// The counts, for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} transfers, {} reads, {} 4xx, {} failures",
            self.transfers.len(),
            self.reads,
            self.client_errors,
            self.failures.len()
        )
    }
}

/// Runs `clients` concurrent clients for `duration`, spread over `services`, each one
/// alternating transfers between `accounts` (amounts 1 to 3, pairs rotating so that the
/// same rows are contended from every service) and reads of an account and of its
/// transfers.
pub async fn mixed_load(
    services: &[&Binary],
    accounts: &[i64],
    clients: usize,
    duration: Duration,
) -> LoadOutcome {
    let deadline = Instant::now() + duration;
    let issued = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let base = services[c % services.len()].url("");
            let client = services[c % services.len()].client.clone();
            let (accounts, issued) = (accounts.to_vec(), issued.clone());
            tokio::spawn(async move {
                let mut outcome = LoadOutcome::default();
                let n = accounts.len();
                while Instant::now() < deadline {
                    let i = issued.fetch_add(1, Ordering::Relaxed);
                    let (from, to) = (accounts[(c + i) % n], accounts[(c + 3 * i + 1) % n]);
                    let request = if i % 2 == 0 && from != to {
                        client.post(format!("{base}/transfers")).json(&json!({
                            "from_account_id": from,
                            "to_account_id": to,
                            "amount": 1 + (i % 3) as i64,
                        }))
                    } else if i % 4 == 1 {
                        client.get(format!("{base}/accounts/{from}"))
                    } else {
                        client.get(format!("{base}/transfers?account_id={to}&limit=5"))
                    };
                    match request.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            match status {
                                201 => outcome
                                    .transfers
                                    .push(body["id"].as_i64().expect("transfer id")),
                                200 => outcome.reads += 1,
                                400..=499 => outcome.client_errors += 1,
                                _ => outcome.failures.push(format!("{status} {body}")),
                            }
                        }
                        Err(e) => outcome.failures.push(format!("no answer: {e}")),
                    }
                }
                outcome
            })
        })
        .collect();
    let mut all = LoadOutcome::default();
    for task in tasks {
        let outcome = task.await.expect("load client");
        all.transfers.extend(outcome.transfers);
        all.reads += outcome.reads;
        all.client_errors += outcome.client_errors;
        all.failures.extend(outcome.failures);
    }
    all
}

/// Every transfer answered 201 is in the database, there are no others, and the balances
/// still add up to what was opened.
pub async fn assert_ledger_consistent(cluster: &PgCluster, outcome: &LoadOutcome, total: i64) {
    let db = cluster.client("ledger").await;
    let rows = db
        .query("SELECT id FROM transfers ORDER BY id", &[])
        .await
        .expect("transfers");
    let mut stored: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let mut answered = outcome.transfers.clone();
    answered.sort_unstable();
    stored.sort_unstable();
    assert_eq!(
        stored, answered,
        "the stored transfers are exactly the 201s"
    );
    let sum: i64 = db
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum, total, "the sum of balances is conserved");
}

/// Session mode hands a client one server connection for its whole connection: the
/// statement cache may stay on, and only the start-up options must go (PgBouncer refuses
/// `options`). A short mixed load: no 5xx, nothing lost.
#[tokio::test]
async fn behind_pgbouncer_in_session_mode_transfers_and_reads_all_succeed() {
    let Some(binary) = pgbouncer_or_skip("session mode") else {
        return;
    };
    let (cluster, bouncer) = cluster_behind(binary, PoolMode::Session, 6).await;
    let url = bouncer.url("ledger");
    // Two pooled connections and the readiness one fit in PgBouncer's six.
    let service = service(
        &url,
        &[
            ("DB_STARTUP_OPTIONS", "false"),
            ("DB_POOL_SIZE", "2"),
            ("DB_MAX_OVERFLOW", "0"),
        ],
    )
    .await;
    let accounts = open_accounts(&service, 6, 1000).await;

    let outcome = mixed_load(&[&service], &accounts, 6, Duration::from_secs(3)).await;

    assert!(
        outcome.failures.is_empty(),
        "{} failures, e.g. {:?}\n{}",
        outcome.failures.len(),
        &outcome.failures[..outcome.failures.len().min(5)],
        service.log()
    );
    assert!(outcome.transfers.len() > 20, "{}", outcome.summary());
    assert!(outcome.reads > 20, "{}", outcome.summary());
    assert_ledger_consistent(&cluster, &outcome, 6 * 1000).await;
}

/// Behind transaction mode, without start-up options, the timeouts are set with
/// `SET LOCAL` in each `BEGIN`'s message: visible inside the transaction, and the server
/// cancels a statement past the statement timeout (503 `timeout` at the server's
/// timeout, well before the client-side deadline one margin later).
#[tokio::test]
async fn behind_pgbouncer_in_transaction_mode_the_timeouts_apply_without_startup_options() {
    let Some(binary) = pgbouncer_or_skip("timeouts behind transaction mode") else {
        return;
    };
    let (_cluster, bouncer) = cluster_behind(binary, PoolMode::Transaction, 2).await;
    let service = service(
        &bouncer.url("ledger"),
        &[
            ("DB_STATEMENT_CACHE", "false"),
            ("DB_STARTUP_OPTIONS", "false"),
            ("DB_STATEMENT_TIMEOUT", "400"),
            ("DB_IDLE_IN_TX_TIMEOUT", "7000"),
        ],
    )
    .await;
    let setting = |name: &'static str| {
        let service = &service;
        async move {
            let response = service
                .client
                .get(service.url(&format!("/_test/setting?name={name}")))
                .send()
                .await
                .expect("setting");
            assert_eq!(response.status().as_u16(), 200);
            let body: serde_json::Value = response.json().await.expect("setting body");
            body["value"].as_str().unwrap_or_default().to_owned()
        }
    };
    // Several times: each transaction may run on another server connection.
    for _ in 0..4 {
        assert_eq!(setting("statement_timeout").await, "400ms");
        assert_eq!(setting("idle_in_transaction_session_timeout").await, "7s");
    }

    let started = Instant::now();
    let response = service
        .client
        .post(service.url("/_test/pg-sleep?name=slow&ms=10000"))
        .json(&json!({}))
        .send()
        .await
        .expect("pg-sleep");
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("timeout")),
        "{body}"
    );
    assert!(
        elapsed < Duration::from_millis(1200),
        "the server's timeout (400 ms) ended it, not the client-side deadline (1.4 s): {elapsed:?}"
    );
    // `SET LOCAL` ended with each transaction: a client of its own, outside any
    // transaction, finds the server connections as PgBouncer opened them.
    let (raw, connection) = tokio_postgres::connect(&bouncer.url("ledger"), tokio_postgres::NoTls)
        .await
        .expect("connect through pgbouncer");
    tokio::spawn(connection);
    for _ in 0..4 {
        let rows = raw
            .simple_query("SHOW statement_timeout")
            .await
            .expect("show");
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(value.as_deref(), Some("0"));
    }
}
