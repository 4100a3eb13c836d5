//! Many service processes on one database, replaced one at a time as a Kubernetes rolling
//! update does (`maxSurge: 1`, `maxUnavailable: 0`): the new process is started and ready
//! before the old one gets SIGTERM, so four run at once during a step. Clients retry every
//! 503 and every connection error with the same `Idempotency-Key`, as contract section 4
//! lets them; in the end each transfer is applied exactly once and nothing else happened.
//!
//! Serial: four processes under steady traffic load both cores, and the connection budget
//! is sampled.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::binary::Binary;
use crate::support::{connect, eventually, TestDb, RETRY_AFTER, SLACK};

const POOL_SIZE: i64 = 2;
const MAX_OVERFLOW: i64 = 2;
/// Processes serving at once outside a step; one more runs during a step.
const REPLICAS: usize = 3;
const ACCOUNTS: usize = 8;
/// Large enough that no transfer of the run can overdraw an account: every transfer must
/// end in 201, so a 422 would be a defect too.
const OPENING_BALANCE: i64 = 1_000_000;
const CLIENTS: usize = 6;
const DRAIN_SECS: u64 = 1;
const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
/// How long a client keeps retrying one transfer before the test fails it.
const GIVE_UP: Duration = Duration::from_secs(20);

/// One answer (or connection error) to one attempt of a transfer.
#[derive(Debug)]
struct Attempt {
    port: u16,
    /// 0 when no response came (refused, reset, timed out).
    status: u16,
    retry_after: Option<String>,
    transfer_id: Option<i64>,
}

/// A transfer as the client meant it, with every attempt it took.
#[derive(Debug)]
struct Transfer {
    key: String,
    from: i64,
    to: i64,
    amount: i64,
    attempts: Vec<Attempt>,
}

/// The service ports a client may send to: what a Kubernetes Service's endpoints hold. A
/// process leaves it when its readiness fails, as the endpoints controller does.
#[derive(Clone, Default)]
struct Endpoints(Arc<Mutex<Vec<u16>>>);

impl Endpoints {
    fn pick(&self, n: usize) -> Option<u16> {
        let ports = self.0.lock().unwrap();
        (!ports.is_empty()).then(|| ports[n % ports.len()])
    }

    fn add(&self, port: u16) {
        self.0.lock().unwrap().push(port);
    }

    fn remove(&self, port: u16) {
        self.0.lock().unwrap().retain(|p| *p != port);
    }
}

async fn start_service(db: &TestDb) -> Binary {
    let (size, overflow) = (POOL_SIZE.to_string(), MAX_OVERFLOW.to_string());
    let (drain, timeout) = (DRAIN_SECS.to_string(), SHUTDOWN_TIMEOUT_SECS.to_string());
    let service = Binary::start(&[
        ("DATABASE_URL", db.url.as_str()),
        ("RUN_MIGRATIONS", "false"),
        ("DB_POOL_SIZE", size.as_str()),
        ("DB_MAX_OVERFLOW", overflow.as_str()),
        ("SHUTDOWN_DRAIN_SECS", drain.as_str()),
        ("SHUTDOWN_TIMEOUT_SECS", timeout.as_str()),
    ])
    .await;
    service.wait_ready().await;
    service
}

/// One client: transfers between the test's accounts, each retried with its key after a
/// 503 or a connection error until it gets another answer.
async fn client(
    worker: usize,
    accounts: Vec<i64>,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
) -> Vec<Transfer> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut transfers = Vec::new();
    let mut sent = worker;
    for n in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let from = accounts[(worker + n) % ACCOUNTS];
        let to = accounts[(worker + n + 1 + n % 3) % ACCOUNTS];
        let mut transfer = Transfer {
            key: format!("rolling-{worker}-{n}"),
            from,
            to,
            amount: 1 + (n % 5) as i64,
            attempts: Vec::new(),
        };
        let body =
            json!({ "from_account_id": from, "to_account_id": to, "amount": transfer.amount });
        let started = tokio::time::Instant::now();
        loop {
            sent += 1;
            let Some(port) = endpoints.pick(sent) else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let response = http
                .post(format!("http://127.0.0.1:{port}/transfers"))
                .header("idempotency-key", &transfer.key)
                .json(&body)
                .send()
                .await;
            let attempt = match response {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    Attempt {
                        port,
                        status,
                        retry_after,
                        transfer_id: body["id"].as_i64().filter(|_| status == 201),
                    }
                }
                Err(_) => Attempt {
                    port,
                    status: 0,
                    retry_after: None,
                    transfer_id: None,
                },
            };
            let again = matches!(attempt.status, 0 | 503) && started.elapsed() < GIVE_UP;
            transfer.attempts.push(attempt);
            if !again {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        transfers.push(transfer);
    }
    transfers
}

/// The most server connections on the database at `url` seen at once, sampled every 10 ms until `stop`
/// (the sampler's own connection left out).
async fn peak_connections(url: &str, stop: Arc<AtomicBool>) -> i64 {
    let client = connect(url).await;
    let mut peak = 0;
    while !stop.load(Ordering::SeqCst) {
        let now: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        peak = peak.max(now);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_under_keyed_transfers_applies_each_exactly_once_within_the_connection_budget(
) {
    let db = TestDb::migrated().await;
    let accounts: Vec<i64> = db
        .client()
        .await
        .query(
            "INSERT INTO accounts (name, balance) SELECT 'rolling-' || n, $1 \
             FROM generate_series(1, $2::int) AS n RETURNING id",
            &[&OPENING_BALANCE, &(ACCOUNTS as i32)],
        )
        .await
        .expect("accounts")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let opening_total = OPENING_BALANCE as i128 * ACCOUNTS as i128;

    let endpoints = Endpoints::default();
    let mut running = Vec::new();
    for _ in 0..REPLICAS {
        let service = start_service(&db).await;
        endpoints.add(service.port);
        running.push(service);
    }
    let mut served_by: Vec<u16> = running.iter().map(|s| s.port).collect();

    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (url, stop) = (db.url.clone(), sampling.clone());
        tokio::spawn(async move { peak_connections(&url, stop).await })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|w| tokio::spawn(client(w, accounts.clone(), endpoints.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The update: for each old process, start its successor, wait until it is ready, then
    // stop the old one with SIGTERM; it leaves the endpoints once its readiness fails. In
    // the second step the endpoints lag (a load balancer that does not watch readiness, or
    // slow to propagate): the old process stays in them until a while after it has exited,
    // so clients meet its closed listener and must retry with their keys.
    for step in 0..REPLICAS {
        let endpoints_lag = step == 1;
        let successor = start_service(&db).await;
        endpoints.add(successor.port);
        served_by.push(successor.port);
        let mut old = running.remove(0);
        old.signal(libc::SIGTERM);
        assert!(
            eventually(Duration::from_secs(2), || async {
                old.status("/health/ready").await != Some(200)
            })
            .await,
            "readiness fails at once after SIGTERM"
        );
        if !endpoints_lag {
            endpoints.remove(old.port);
        }
        let exit = tokio::time::timeout(
            Duration::from_secs(DRAIN_SECS + SHUTDOWN_TIMEOUT_SECS) + SLACK,
            old.child.wait(),
        )
        .await
        .expect("the old process exits within drain and shutdown timeout")
        .expect("wait");
        assert!(exit.success(), "the old process exits 0:\n{}", old.log());
        if endpoints_lag {
            tokio::time::sleep(Duration::from_millis(300)).await;
            endpoints.remove(old.port);
        }
        running.push(successor);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::SeqCst);
    let mut transfers = Vec::new();
    for client in clients {
        transfers.extend(client.await.expect("client task"));
    }
    sampling.store(true, Ordering::SeqCst);
    let peak = sampler.await.expect("sampler");

    // Every answer was a success or a 503 that says when to retry (or no answer at all).
    let mut outcomes = BTreeMap::new();
    for attempt in transfers.iter().flat_map(|t| &t.attempts) {
        *outcomes.entry(attempt.status).or_insert(0) += 1;
        assert!(
            matches!(attempt.status, 0 | 201 | 503),
            "only 201, 503 or a connection error: {attempt:?}"
        );
        if attempt.status == 503 {
            assert_eq!(
                attempt.retry_after.as_deref(),
                Some(RETRY_AFTER),
                "{attempt:?}"
            );
        }
    }
    // Retrying with the key ended every transfer in one 201, replays naming the same row.
    let mut served = HashMap::new();
    for transfer in &transfers {
        let ids: Vec<i64> = transfer
            .attempts
            .iter()
            .filter_map(|a| a.transfer_id)
            .collect();
        assert!(
            !ids.is_empty(),
            "transfer {} ended in a 201 after retries: {:?}",
            transfer.key,
            transfer.attempts
        );
        assert!(ids.iter().all(|id| *id == ids[0]), "{transfer:?}");
        for attempt in transfer.attempts.iter().filter(|a| a.status == 201) {
            *served.entry(attempt.port).or_insert(0) += 1;
        }
    }
    assert!(
        outcomes.contains_key(&0),
        "clients met a closed listener while the endpoints lagged, and retried: {outcomes:?}"
    );
    assert!(
        transfers.len() > 100,
        "traffic flowed through the update: {outcomes:?}"
    );
    for port in &served_by {
        assert!(
            served.contains_key(port),
            "every process, old and new, served transfers: {served:?}"
        );
    }

    // The database holds each transfer exactly once, and nothing else.
    let state = db.ledger_state().await;
    assert_eq!(state.transfers, transfers.len() as i64, "{outcomes:?}");
    assert_eq!(state.idempotency_keys, transfers.len() as i64);
    let mut expected: HashMap<i64, i64> =
        accounts.iter().map(|id| (*id, OPENING_BALANCE)).collect();
    for t in &transfers {
        *expected.get_mut(&t.from).unwrap() -= t.amount;
        *expected.get_mut(&t.to).unwrap() += t.amount;
    }
    for (id, balance) in &state.balances {
        assert_eq!(Some(balance), expected.get(id), "balance of account {id}");
    }
    assert_eq!(
        state.total(),
        opening_total,
        "the sum of balances is conserved"
    );

    // At most four processes at once, each within its pool and its readiness connection.
    let budget = (REPLICAS as i64 + 1) * (POOL_SIZE + MAX_OVERFLOW + 1);
    assert!(
        peak <= budget,
        "at most {budget} server connections, saw {peak}"
    );
    assert!(
        peak >= REPLICAS as i64,
        "the sampler saw the processes' connections ({peak})"
    );
}
