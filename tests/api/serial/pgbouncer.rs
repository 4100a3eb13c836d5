//! Three service processes through PgBouncer in transaction mode with four server
//! connections, under concurrent transfers and reads for 10 s (contract section 12): here,
//! not in the parallel suite, because three services and their clients keep both cores
//! busy for the whole run.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::pgbouncer::{
    assert_ledger_consistent, cluster_behind, mixed_load, open_accounts, pgbouncer_or_skip, service,
};
use crate::support::pgbouncer::PoolMode;

/// PgBouncer's server connections, all pools together.
const SERVER_CONNECTIONS: u32 = 4;
const ACCOUNTS: usize = 8;
const OPENING_BALANCE: i64 = 1000;

#[tokio::test]
async fn three_services_behind_pgbouncer_in_transaction_mode_lose_nothing_and_share_four_connections(
) {
    let Some(binary) = pgbouncer_or_skip("transaction mode load") else {
        return;
    };
    let (cluster, bouncer) =
        cluster_behind(binary, PoolMode::Transaction, SERVER_CONNECTIONS).await;
    let url = bouncer.url("ledger");
    let settings = [
        ("DB_STATEMENT_CACHE", "false"),
        ("DB_STARTUP_OPTIONS", "false"),
        ("DB_STATEMENT_TIMEOUT", "5000"),
    ];
    // Started together: their migrations race through the pooler, under the
    // transaction-level lock.
    let (a, b, c) = tokio::join!(
        service(&url, &settings),
        service(&url, &settings),
        service(&url, &settings)
    );
    let accounts = open_accounts(&a, ACCOUNTS, OPENING_BALANCE).await;

    // The cluster's own view of the backends serving the database, sampled through the
    // run (PgBouncer's connections are the only ones to `ledger`).
    let observer = cluster.client("postgres").await;
    let (stop, most) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
    );
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let now: i64 = observer
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = 'ledger' AND backend_type = 'client backend'",
                        &[],
                    )
                    .await
                    .expect("sample")
                    .get(0);
                most.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let outcome = mixed_load(&[&a, &b, &c], &accounts, 24, Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    assert!(
        outcome.failures.is_empty(),
        "{} failures, e.g. {:?}\n{}\n{}\n{}",
        outcome.failures.len(),
        &outcome.failures[..outcome.failures.len().min(5)],
        a.log(),
        b.log(),
        c.log()
    );
    // Enough traffic to have mattered, through every service.
    assert!(outcome.transfers.len() > 300, "{}", outcome.summary());
    assert!(outcome.reads > 300, "{}", outcome.summary());
    let most = most.load(Ordering::Relaxed);
    assert!(
        (1..=i64::from(SERVER_CONNECTIONS)).contains(&most),
        "server connections during the run: at most {most}"
    );
    assert_ledger_consistent(&cluster, &outcome, ACCOUNTS as i64 * OPENING_BALANCE).await;
}
