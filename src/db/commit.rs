//! COMMIT with the transaction's id learned on the way, and what to do when its answer is
//! lost (contract section 2, "Every answer tells the truth about the commit").
//!
//! When the connection breaks, or the server goes silent, while a COMMIT is under way, the
//! client cannot tell from that connection whether the transaction committed. PostgreSQL
//! can: `pg_xact_status(xid)` answers for a recent transaction id from any connection. So
//! the session learns the id before the COMMIT is processed, and asks on another
//! connection when the COMMIT's answer does not arrive:
//!
//! - **Learning the id costs no round trip.** [`commit`] sends
//!   `SELECT pg_current_xact_id_if_assigned()` as an extended-protocol query with its own
//!   Sync, pipelined ahead of the simple-protocol `COMMIT` on the same connection (two
//!   futures polled together on a shared borrow: diesel-async's pipelining). The server
//!   flushes the id's answer at that Sync, before it even reads the COMMIT, so the id
//!   arrives even when the COMMIT's answer is lost. (In the same simple-protocol message
//!   as the COMMIT it would not: the server flushes a message's output only at its end.)
//!   The id query is sent first for sure: its statement is prepared (by the first COMMIT
//!   of the connection, which waits for the id before it sends COMMIT), so its first poll
//!   writes Bind/Execute/Sync into the driver's queue without waiting (polled outside the
//!   task's cooperative budget, whose exhaustion could otherwise make it yield before it
//!   sends), and the COMMIT is queued after it.
//!   And an id that arrived while the COMMIT's answer did not was necessarily answered
//!   before the COMMIT ran: the server answers in order, on one socket.
//! - A transaction that wrote nothing has no id (NULL): its COMMIT changes nothing, so a
//!   lost answer does not matter and the handler's response is sent.
//! - The id query also tells an aborted transaction apart: in a transaction where a
//!   statement failed, it fails too (25P02), and the COMMIT that follows is really a
//!   ROLLBACK. That catches a swallowed error that the statement watch cannot see (one
//!   the server raised after its reader stopped reading a result, see `db::watch`).
//! - **Resolving a lost answer** ([`resolve`]) is bounded by `DB_POOL_TIMEOUT` and uses a
//!   pooled connection: the request's own connection is closed first, which frees its
//!   place in the pool, so the verification never grows the connection budget (the
//!   readiness connection would not either, but it belongs to the probes, whose answers
//!   must not queue behind a verification). `pg_xact_status` answers:
//!   `committed` or `aborted`, final; `in progress` while the old backend lives on behind
//!   the dead or silent connection (still waiting for its COMMIT's WAL flush, say): the
//!   verification then ends that backend, found through `pg_stat_activity.backend_xid`
//!   (which also works behind a pooler, unlike a pid remembered from the start-up), waits
//!   for it to exit and asks once more, and that answer is final. No answer within the
//!   bound: the outcome is unknown, and the client is told so (503 `commit_unknown`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::{QueryResult, QueryableByName};
use diesel_async::{
    AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
    TransactionManager,
};

use tokio_postgres::error::SqlState;

use super::pool::DbPool;
use crate::metrics::db::DbMetrics;

/// `SELECT pg_current_xact_id_if_assigned()::text`, as a query with a static id: diesel
/// caches its prepared statement by that id, so that a connection prepares it once. (A
/// `sql()` literal is never cached: every COMMIT would prepare it first, a round trip
/// during which the COMMIT would overtake it.)
#[derive(QueryId, Clone, Copy)]
struct CurrentXid;

impl Query for CurrentXid {
    type SqlType = Nullable<Text>;
}

impl QueryFragment<Pg> for CurrentXid {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // `xid8` has no diesel type: the id travels as text.
        out.push_sql("SELECT pg_current_xact_id_if_assigned()::text");
        Ok(())
    }
}

/// Pause between two verification attempts that failed (a pooled connection that was cut
/// too, a server that is restarting).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What the session knows of its transaction's id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TxId {
    /// Not learned (no COMMIT attempted yet, or its answer was lost too).
    #[default]
    Unknown,
    /// The transaction wrote nothing, so it has no id.
    Unassigned,
    /// The transaction's id (`xid8`).
    Assigned(u64),
}

/// How a COMMIT ended, from the session's point of view.
#[derive(Debug)]
pub enum CommitError {
    /// The server answered with an error: nothing was committed.
    Failed(DieselError),
    /// The server answered, but a statement had failed in the transaction, so the COMMIT
    /// was a ROLLBACK.
    WasRollback,
    /// No answer came: the transaction may or may not have committed.
    AnswerLost(DieselError),
}

/// Commits the top-level transaction of `conn`, learning its id on the way (see the
/// module docs); `xid` holds the id as soon as it arrives, so that a caller whose future
/// is dropped mid-COMMIT (the session's deadline) still has it.
///
/// `prepared`: whether this connection has the id query prepared already. The first
/// COMMIT of a connection asks for the id and waits for it before it sends COMMIT (a round
/// trip, once per connection): its prepare would be a round trip during which a pipelined
/// COMMIT would overtake it. Every later COMMIT pipelines.
pub async fn commit(
    conn: &mut AsyncPgConnection,
    xid: &Cell<TxId>,
    prepared: bool,
) -> Result<(), CommitError> {
    let result = {
        let shared: &AsyncPgConnection = conn;
        let (mut for_id, mut for_commit) = (shared, shared);
        let id = async {
            let answer = tokio::task::coop::unconstrained(
                CurrentXid.get_result::<Option<String>>(&mut for_id),
            )
            .await;
            if let Ok(id) = &answer {
                xid.set(match id.as_deref().map(str::parse) {
                    None => TxId::Unassigned,
                    Some(Ok(id)) => TxId::Assigned(id),
                    Some(Err(_)) => TxId::Unknown,
                });
            }
            answer
        };
        let (id, committed) = if prepared {
            futures_util::future::join(id, for_commit.batch_execute("COMMIT")).await
        } else {
            let id = id.await;
            (id, for_commit.batch_execute("COMMIT").await)
        };
        match (id, committed) {
            (_, Err(e)) if answer_lost(&e) => Err(CommitError::AnswerLost(e)),
            (_, Err(e)) => Err(CommitError::Failed(e)),
            (Err(DieselError::DatabaseError(..)), Ok(())) => Err(CommitError::WasRollback),
            (_, Ok(())) => Ok(()),
        }
    };
    // The COMMIT went around diesel's transaction manager (which needs the connection
    // exclusively, and so could not be pipelined with the id query): tell it the
    // transaction is over, whatever the answer was (a COMMIT that fails ends the
    // transaction too). A connection whose answer was lost is closed anyway.
    if let TransactionManagerStatus::Valid(status) =
        AnsiTransactionManager::transaction_manager_status_mut(conn)
    {
        if status.transaction_depth().is_some() {
            let _ = status.change_transaction_depth(TransactionDepthChange::DecreaseDepth);
        }
    }
    result
}

/// True when an error means the COMMIT's answer did not arrive, or came from a server
/// that ended the session (57P01..57P03, class 08: a backend terminated while it waited
/// for its commit record's flush may have committed), rather than a refusal (any other
/// error: the transaction did not commit).
pub fn answer_lost(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(kind, info) => {
            match diesel_async::pg::sql_state(info.as_ref()) {
                Some(code) => {
                    matches!(
                        code,
                        SqlState::ADMIN_SHUTDOWN
                            | SqlState::CRASH_SHUTDOWN
                            | SqlState::CANNOT_CONNECT_NOW
                    ) || code.code().starts_with("08")
                }
                None => matches!(
                    kind,
                    DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection
                ),
            }
        }
        _ => false,
    }
}

/// What verification found out about a transaction whose COMMIT answer was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// It committed (or wrote nothing): the handler's response stands.
    Committed,
    /// It did not commit.
    Aborted,
    /// The server could not be asked in time.
    Unknown,
}

/// Finds out whether the transaction `xid` committed, on a pooled connection, within
/// `bound`; see the module docs.
pub async fn resolve(pool: &DbPool, metrics: &DbMetrics, xid: TxId, bound: Duration) -> Resolution {
    let xid = match xid {
        TxId::Unassigned => return Resolution::Committed,
        TxId::Unknown => return Resolution::Unknown,
        TxId::Assigned(xid) => xid,
    };
    let deadline = Instant::now() + bound;
    let asked = tokio::time::timeout_at(deadline.into(), async {
        loop {
            match ask(pool, metrics, xid, deadline).await {
                Ok(Some(resolution)) => return resolution,
                Ok(None) => return Resolution::Unknown,
                Err(e) => {
                    log::warn!("could not ask the server about transaction {xid}: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    })
    .await;
    asked.unwrap_or(Resolution::Unknown)
}

/// One verification on one pooled connection: `Ok(None)` when the server's final answer
/// is still "in progress" or it no longer knows the id.
async fn ask(
    pool: &DbPool,
    metrics: &DbMetrics,
    xid: u64,
    deadline: Instant,
) -> Result<Option<Resolution>, String> {
    let mut conn = metrics.acquire(pool).await.map_err(|e| e.to_string())?;
    let conn: &mut AsyncPgConnection = &mut conn;
    let first = xact_status(conn, xid).await.map_err(|e| e.to_string())?;
    if first.as_deref() != Some("in progress") {
        return Ok(final_answer(first.as_deref()));
    }
    // The old backend still runs the transaction: end it, and wait for it to exit (as
    // long as the bound allows), so that the next answer is final.
    let wait_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis();
    let wait_ms = i64::try_from(wait_ms).unwrap_or(i64::MAX).max(1);
    let ended = diesel::sql_query(
        "SELECT coalesce(bool_and(pg_terminate_backend(pid, $1)), true) AS ended \
         FROM pg_stat_activity WHERE backend_xid = xid($2::xid8)",
    )
    .bind::<BigInt, _>(wait_ms)
    .bind::<Text, _>(xid.to_string())
    .get_result::<Ended>(conn)
    .await
    .map_err(|e| e.to_string())?;
    log::warn!(
        "transaction {xid} was still in progress behind a lost connection; its backend was \
         ended{}",
        if ended.ended {
            ""
        } else {
            " (but had not exited in time)"
        }
    );
    let second = xact_status(conn, xid).await.map_err(|e| e.to_string())?;
    Ok(final_answer(second.as_deref()))
}

/// `pg_xact_status(xid)`: `committed`, `aborted`, `in progress`, or NULL for an id too old
/// to know. (`xid8` has no diesel type: the id travels as text, cast on the server.)
async fn xact_status(
    conn: &mut AsyncPgConnection,
    xid: u64,
) -> Result<Option<String>, DieselError> {
    diesel::sql_query("SELECT pg_xact_status($1::xid8)::text AS status")
        .bind::<Text, _>(xid.to_string())
        .get_result::<XactStatus>(conn)
        .await
        .map(|row| row.status)
}

#[derive(QueryableByName)]
struct XactStatus {
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
}

#[derive(QueryableByName)]
struct Ended {
    #[diesel(sql_type = Bool)]
    ended: bool,
}

fn final_answer(status: Option<&str>) -> Option<Resolution> {
    match status {
        Some("committed") => Some(Resolution::Committed),
        Some("aborted") => Some(Resolution::Aborted),
        _ => None,
    }
}
