//! Idempotency keys: claiming a key inside the request's transaction, recording the
//! response, and the background purge of expired keys.
//!
//! # How a key is claimed (contract section 4)
//! The claim is the first statement of the request's transaction:
//! `INSERT ... ON CONFLICT (endpoint, key) DO NOTHING`.
//! - No row with that key: the insert succeeds and the request owns the key until its
//!   transaction ends. It does its work and [`record`]s its response in the same
//!   transaction, so the key commits with the transfer or disappears with it.
//! - A row inserted by a transaction still in flight: PostgreSQL makes the insert wait on
//!   the unique index until that transaction ends (this is the waiting mechanism; nothing
//!   polls). If it commits, the insert does nothing and the next statement (a new snapshot
//!   under READ COMMITTED) reads the committed row: a replay or a conflict. If it rolls
//!   back, the insert goes through and this request applies.
//! - A committed row: the insert does nothing at once, and the row is read.
//! - A committed row older than the TTL counts as absent: it is deleted and the claim is
//!   tried again.
//!
//! A waiting request holds no other lock (the claim is its first statement), so waiting on
//! a key can never be part of a deadlock.

use std::time::Duration;

use deadpool::managed::{TimeoutType, Timeouts};
use diesel::prelude::*;
use diesel::sql_types::{Bool, Double, Int2, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::schema::idempotency_keys;
use actix_diesel_session::{spawn_periodic, DbPool};

/// `response_status` of a claimed key whose response is not recorded yet. Only the
/// claiming transaction can see such a row; it never commits in this state.
const PENDING_STATUS: i16 = 0;
/// Rows deleted per purge statement: short statements, short locks.
const PURGE_BATCH: i64 = 1000;
/// Purge statements per run at most; the rest waits for the next run.
const PURGE_MAX_BATCHES: usize = 20;
/// Longest pause between two purge runs (shorter when the TTL is shorter).
const PURGE_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Bound on one purge run (check-out and statements).
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Claims tried at most; only a purge or another takeover racing this one can need more
/// than two.
const MAX_CLAIM_ATTEMPTS: usize = 3;

/// A response recorded for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub fingerprint: String,
    pub status: i16,
    pub body: String,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's now.
    Claimed,
    /// The key was used before, by a committed request.
    Taken(StoredResponse),
}

#[derive(QueryableByName)]
struct ExistingKey {
    #[diesel(sql_type = Text)]
    fingerprint: String,
    #[diesel(sql_type = Int2)]
    response_status: i16,
    #[diesel(sql_type = Text)]
    response_body: String,
    #[diesel(sql_type = Bool)]
    expired: bool,
}

/// Claims `key` of `endpoint` for this transaction, or returns what a committed request
/// stored under it. See the module docs for the waiting behaviour.
pub async fn claim(
    conn: &mut AsyncPgConnection,
    endpoint: &str,
    key: &str,
    fingerprint: &str,
    ttl: Duration,
) -> QueryResult<Claim> {
    let ttl_secs = ttl.as_secs_f64();
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let inserted = diesel::insert_into(idempotency_keys::table)
            .values((
                idempotency_keys::endpoint.eq(endpoint),
                idempotency_keys::key.eq(key),
                idempotency_keys::fingerprint.eq(fingerprint),
                idempotency_keys::response_status.eq(PENDING_STATUS),
                idempotency_keys::response_body.eq(""),
            ))
            .on_conflict((idempotency_keys::endpoint, idempotency_keys::key))
            .do_nothing()
            .execute(conn)
            .await?;
        if inserted == 1 {
            return Ok(Claim::Claimed);
        }
        let existing: Option<ExistingKey> = diesel::sql_query(
            "SELECT fingerprint, response_status, response_body, \
                    created_at < now() - make_interval(secs => $3) AS expired \
             FROM idempotency_keys WHERE endpoint = $1 AND key = $2",
        )
        .bind::<Text, _>(endpoint)
        .bind::<Text, _>(key)
        .bind::<Double, _>(ttl_secs)
        .get_result(conn)
        .await
        .optional()?;
        match existing {
            // Deleted since the insert looked (purged or taken over): claim again.
            None => continue,
            Some(row) if row.expired => {
                diesel::sql_query(
                    "DELETE FROM idempotency_keys WHERE endpoint = $1 AND key = $2 \
                     AND created_at < now() - make_interval(secs => $3)",
                )
                .bind::<Text, _>(endpoint)
                .bind::<Text, _>(key)
                .bind::<Double, _>(ttl_secs)
                .execute(conn)
                .await?;
            }
            Some(row) => {
                return Ok(Claim::Taken(StoredResponse {
                    fingerprint: row.fingerprint,
                    status: row.response_status,
                    body: row.response_body,
                }))
            }
        }
    }
    Err(diesel::result::Error::QueryBuilderError(
        "idempotency key claim did not settle".into(),
    ))
}

/// Records the response of a claimed key, in the claiming transaction.
pub async fn record(
    conn: &mut AsyncPgConnection,
    endpoint: &str,
    key: &str,
    status: i16,
    body: &str,
) -> QueryResult<()> {
    let updated = diesel::update(idempotency_keys::table.find((endpoint, key)))
        .set((
            idempotency_keys::response_status.eq(status),
            idempotency_keys::response_body.eq(body),
        ))
        .execute(conn)
        .await?;
    if updated == 1 {
        Ok(())
    } else {
        // Not a missing resource the client asked for (that would map to 404): the row this
        // transaction claimed is gone, which is an internal invariant failure (500).
        Err(diesel::result::Error::QueryBuilderError(
            "the claimed idempotency key row is missing".into(),
        ))
    }
}

/// Deletes up to one batch of keys older than `ttl`; returns how many. Rows locked by a
/// request taking an expired key over are skipped, never waited for.
pub async fn purge_batch(conn: &mut AsyncPgConnection, ttl: Duration) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM idempotency_keys WHERE (endpoint, key) IN ( \
           SELECT endpoint, key FROM idempotency_keys \
            WHERE created_at < now() - make_interval(secs => $1) \
            ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<Double, _>(ttl.as_secs_f64())
    .bind::<diesel::sql_types::BigInt, _>(PURGE_BATCH)
    .execute(conn)
    .await
}

/// Deletes expired keys in bounded batches on one pooled connection, each batch in a short
/// transaction of its own: an explicit one, because its statement carries parameters and
/// is therefore prepared under a name, which a transaction pooler (PgBouncer in
/// transaction mode) keeps on one server connection only within a transaction. Returns
/// how many it deleted.
///
/// It never queues for a connection: when traffic holds every pooled connection, this run
/// is skipped (returns 0) and the next one tries again. Expired keys are already ignored
/// by [`claim`], so a late purge costs only disk space.
pub async fn purge_expired(pool: &DbPool, ttl: Duration) -> Result<usize, String> {
    let no_wait = Timeouts {
        wait: Some(Duration::ZERO),
        ..pool.timeouts()
    };
    let mut conn = match pool.timeout_get(&no_wait).await {
        Ok(conn) => conn,
        Err(deadpool::managed::PoolError::Timeout(TimeoutType::Wait)) => {
            log::debug!("every pooled connection is busy; idempotency key purge skipped");
            return Ok(0);
        }
        Err(e) => return Err(e.to_string()),
    };
    let work = async {
        let mut total = 0;
        for _ in 0..PURGE_MAX_BATCHES {
            let deleted = conn
                .transaction(async |conn| purge_batch(conn, ttl).await)
                .await?;
            total += deleted;
            if i64::try_from(deleted).map_or(true, |n| n < PURGE_BATCH) {
                break;
            }
        }
        Ok::<_, diesel::result::Error>(total)
    };
    let outcome = tokio::time::timeout(PURGE_TIMEOUT, work).await;
    match outcome {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => {
            // A statement may still run on it: never hand it back to the pool.
            drop(deadpool::managed::Object::take(conn));
            Err(format!("purge did not finish within {PURGE_TIMEOUT:?}"))
        }
    }
}

/// How often the purge runs: four times per TTL (a key outlives its TTL by at most a
/// quarter of it), at least once a second and at most once a minute.
pub fn purge_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_secs(1), PURGE_MAX_INTERVAL)
}

/// Starts the purge task on the current Tokio runtime, off the request path. It holds only
/// a weak reference to the pool and ends when the pool is dropped or closed.
pub fn spawn_purger(pool: &DbPool, ttl: Duration) {
    // The first run comes one interval after start-up, not at once: start-up already has
    // enough to do (migrations, first connections).
    let every = purge_interval(ttl);
    let first = tokio::time::Instant::now() + every;
    spawn_periodic(pool, first, every, move |pool| async move {
        match purge_expired(&pool, ttl).await {
            Ok(0) => {}
            Ok(n) => log::debug!("purged {n} expired idempotency key(s)"),
            Err(e) => log::warn!("purging expired idempotency keys failed: {e}"),
        }
    });
}
