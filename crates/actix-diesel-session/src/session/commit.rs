//! COMMIT with the transaction's id learned on the way, and what to do when its answer is
//! lost.
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
//!   the server raised after its reader stopped reading a result, see `session::watch`).
//! - **Resolving a lost answer** ([`resolve`]) is bounded by the check-out timeout. It takes
//!   the place in the pool of the connection whose answer was lost: a fresh connection is
//!   opened in its place (the lost one is closed once it is up), so the verification
//!   neither queues behind other requests for a pooled connection (deadpool hands a freed
//!   place to the oldest waiter) nor takes a place of its own (the readiness connection
//!   would not either, but it belongs to the probes, whose answers must not queue behind a
//!   verification). The server may count one connection more for that moment, and while
//!   an old backend still alive behind a silent connection waits to be ended.
//!   `pg_xact_status` answers `committed` or `aborted`, final; `in progress` while the old
//!   backend lives on behind the dead or silent connection (still waiting for its commit
//!   record's flush, say): the verification then ends that backend, found through
//!   `pg_stat_activity.backend_xid` and its `xact_start` (which also works behind a
//!   pooler, unlike a pid remembered from the start-up, and never finds another
//!   transaction's backend), waits for it to exit and asks once more, and that answer is
//!   final. No answer within the bound: the outcome is unknown, and the client is told so
//!   (503 `commit_unknown`).
//! - **An id names one transaction only until the server restarts.** PostgreSQL does not
//!   make the handing out of an id durable by itself, so after a crash, or a failover to a
//!   standby that had not received the transaction, the same id goes to another
//!   transaction. The id therefore travels with the server's run: its postmaster's start
//!   time, and its statistics' reset time, which a crash restart by the same postmaster
//!   changes too (a manual statistics reset also does: the verification is then only more
//!   careful). A server that restarted since can only tell that the transaction did not
//!   commit (the id is "in the future" there, or aborted, or in progress in someone else's
//!   transaction), never that it did.

use std::cell::{Cell, RefCell};
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
use tokio_postgres::error::{Severity, SqlState};

use crate::connect::Connector;
use crate::pool::{DbPool, PooledConnection};
use crate::replica::{current_position, Lsn, INSERT_POSITION};

/// The transaction's identity, asked for with its COMMIT: its id, when it began, and which
/// run of the server gave it the id: when the postmaster started, and when the shared
/// statistics were last reset, which a crash restart by the same postmaster also does
/// (all as text: diesel has no `xid8` type, and the server compares the texts itself,
/// formatted by the same session settings, so that nothing is parsed back). As a query
/// with a static id: diesel caches its prepared statement by that id, so that a connection
/// prepares it once. (A `sql()` literal is never cached: every COMMIT would prepare it
/// first, a round trip during which the COMMIT would overtake it.)
#[derive(QueryId, Clone, Copy)]
struct CurrentXid;

impl Query for CurrentXid {
    type SqlType = (Nullable<Text>, Text, Text);
}

impl QueryFragment<Pg> for CurrentXid {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "SELECT pg_current_xact_id_if_assigned()::text, now()::text, \
             pg_postmaster_start_time()::text || ' ' || \
             coalesce(pg_stat_get_bgwriter_stat_reset_time()::text, '')",
        );
        Ok(())
    }
}

/// Pause between two verification attempts that failed (a connection that could not be
/// made, a server that is restarting).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What the session knows of its transaction's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TxId {
    /// Not learned (no COMMIT attempted yet, or its answer was lost too).
    #[default]
    Unknown,
    /// The transaction wrote nothing, so it has no id.
    Unassigned,
    /// The transaction's id (`xid8`), with what tells it from a later transaction that
    /// gets the same id.
    Assigned(TxIdentity),
}

/// A transaction id, pinned to its transaction. After a crash, or a failover to a standby
/// that had not received it, the server hands an id whose assignment was never made
/// durable out again: the same number, another transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxIdentity {
    /// The id.
    pub xid: u64,
    /// `now()` in the transaction: its start, as `pg_stat_activity.xact_start` shows it.
    began: String,
    /// Which run of the server gave the id (see [`CurrentXid`]).
    server_started: String,
}

/// How a COMMIT ended, from the session's point of view.
#[derive(Debug)]
pub enum CommitError {
    /// The server answered the COMMIT with an error: nothing was committed.
    Failed(DieselError),
    /// The COMMIT could not have committed, though its answer did not come: the connection
    /// broke before it was sent, or the id query ahead of it failed on the server. The
    /// error is what went wrong.
    NotCommitted(DieselError),
    /// The COMMIT was answered, but the id query ahead of it failed on the server (with
    /// this error), so the COMMIT was a ROLLBACK: `25P02` when a statement had already
    /// failed in the transaction, or whatever made the id query itself fail.
    WasRollback(DieselError),
    /// No answer came: the transaction may or may not have committed.
    AnswerLost(DieselError),
}

/// An error the server sent (as opposed to a connection that broke).
fn server_error(error: &DieselError) -> bool {
    matches!(error, DieselError::DatabaseError(_, info)
        if diesel_async::pg::sql_state(info.as_ref()).is_some())
}

/// Commits the top-level transaction of `conn`, learning its identity on the way (see
/// the module docs); `xid` holds it as soon as it arrives, so that a caller whose future
/// is dropped mid-COMMIT (the session's deadline) still has it.
///
/// `prepared`: whether this connection has the identity query prepared already. The first
/// COMMIT of a connection asks for it and waits for the answer before it sends COMMIT (a
/// round trip, once per connection): its prepare would be a round trip during which a
/// pipelined COMMIT would overtake it. Every later COMMIT pipelines. (With diesel's
/// statement cache turned off, every COMMIT waits: the caller passes `false`.)
///
/// `sent` is set once the COMMIT has been sent: a COMMIT cut off before is not in doubt.
///
/// With `position`, the primary's WAL insert position is read after the COMMIT and stored
/// there when the COMMIT succeeded (`SELECT pg_current_wal_insert_lsn()`, simple protocol:
/// no statement is prepared, named or unnamed). It is pipelined behind the COMMIT, on the
/// same connection: no round trip of its own. It is sent after the COMMIT for sure (the
/// COMMIT's first poll writes its message into the driver's queue, as above, before the
/// position's first poll), and the server runs it only once the COMMIT is done, so the
/// position is at or past the commit record. (A COMMIT that fails leaves the position
/// query to run on its own, outside any transaction: its answer is ignored.) A failed
/// read leaves `position` empty and is logged; the COMMIT stands.
pub async fn commit(
    conn: &mut AsyncPgConnection,
    xid: &RefCell<TxId>,
    prepared: bool,
    sent: &Cell<bool>,
    position: Option<&Cell<Option<Lsn>>>,
) -> Result<(), CommitError> {
    let result = {
        let shared: &AsyncPgConnection = conn;
        let (mut for_id, mut for_commit) = (shared, shared);
        let id = async {
            let answer =
                tokio::task::coop::unconstrained(
                    CurrentXid.get_result::<(Option<String>, String, String)>(&mut for_id),
                )
                .await;
            if let Ok((id, began, server_started)) = &answer {
                *xid.borrow_mut() = match id.as_deref().map(str::parse) {
                    None => TxId::Unassigned,
                    Some(Ok(xid)) => TxId::Assigned(TxIdentity {
                        xid,
                        began: began.clone(),
                        server_started: server_started.clone(),
                    }),
                    Some(Err(_)) => TxId::Unknown,
                };
            }
            answer
        };
        // The COMMIT and, behind it, the position query: polled in this order, so sent in
        // this order.
        let commit_then_position = async {
            let read = async {
                match position {
                    Some(_) => Some(current_position(shared, INSERT_POSITION).await),
                    None => None,
                }
            };
            futures_util::future::join(for_commit.batch_execute("COMMIT"), read).await
        };
        let (id, (committed, read)) = if prepared {
            sent.set(true);
            futures_util::future::join(id, commit_then_position).await
        } else {
            match id.await {
                // Nothing was committed: the COMMIT is not sent on a connection that broke.
                Err(e) if answer_lost(&e) => return Err(CommitError::NotCommitted(e)),
                id => {
                    sent.set(true);
                    (id, commit_then_position.await)
                }
            }
        };
        let outcome = match (id, committed) {
            // The server answers in order: an error for the id query means that the
            // COMMIT after it could only roll back, whether its answer came or not.
            (Err(id_error), Err(_)) if server_error(&id_error) => {
                Err(CommitError::NotCommitted(id_error))
            }
            (_, Err(e)) if answer_lost(&e) => Err(CommitError::AnswerLost(e)),
            (_, Err(e)) => Err(CommitError::Failed(e)),
            (Err(id_error), Ok(())) if server_error(&id_error) => {
                Err(CommitError::WasRollback(id_error))
            }
            (_, Ok(())) => Ok(()),
        };
        if let (Ok(()), Some(read), Some(position)) = (&outcome, read, position) {
            match read {
                Ok(lsn) => position.set(Some(lsn)),
                Err(e) => log::error!(
                    "the WAL position after a COMMIT could not be read ({e}); answering without it"
                ),
            }
        }
        outcome
    };
    transaction_over(conn);
    result
}

/// Commits a transaction that has no id to learn (a `READ ONLY` one): the COMMIT alone.
/// Its answer lost changes nothing, since it wrote nothing: `xid` says so.
pub async fn commit_alone(
    conn: &mut AsyncPgConnection,
    xid: &RefCell<TxId>,
    sent: &Cell<bool>,
) -> Result<(), CommitError> {
    *xid.borrow_mut() = TxId::Unassigned;
    sent.set(true);
    let result = match conn.batch_execute("COMMIT").await {
        Ok(()) => Ok(()),
        Err(e) if answer_lost(&e) => Err(CommitError::AnswerLost(e)),
        Err(e) => Err(CommitError::Failed(e)),
    };
    transaction_over(conn);
    result
}

/// The COMMIT went around diesel's transaction manager (which needs the connection
/// exclusively, and so could not be pipelined with the id query): tell it the
/// transaction is over, whatever the answer was (a COMMIT that fails ends the transaction
/// too). A connection whose answer was lost is closed anyway.
fn transaction_over(conn: &mut AsyncPgConnection) {
    if let TransactionManagerStatus::Valid(status) =
        AnsiTransactionManager::transaction_manager_status_mut(conn)
    {
        if status.transaction_depth().is_some() {
            let _ = status.change_transaction_depth(TransactionDepthChange::DecreaseDepth);
        }
    }
}

/// True when an error means the COMMIT's answer did not arrive, or came from a server
/// that ended the session or itself (severity `FATAL` or `PANIC`: a backend terminated
/// while it waited for its commit record's flush, a failed flush, may have committed),
/// rather than a refusal (any other error: the transaction did not commit).
pub fn answer_lost(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(kind, info) => {
            match diesel_async::pg::sql_state(info.as_ref()) {
                Some(code) => {
                    matches!(
                        diesel_async::pg::severity(info.as_ref()),
                        Some(Severity::Fatal | Severity::Panic)
                    ) || matches!(
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
    /// The server could not be asked in time, or its answer cannot be trusted.
    Unknown,
}

/// Finds out whether the transaction `xid` committed, within `bound`; see the module
/// docs. `in_doubt` is the pooled connection the COMMIT was sent on: its place in the pool
/// serves the verification, on a fresh connection (so that the verification neither
/// queues behind other requests for a pooled one nor takes a place of its own), and is
/// given up when it is over. Without one, the verification checks a connection out.
pub async fn resolve(
    in_doubt: Option<Detached>,
    connector: &Connector,
    pool: &DbPool,
    xid: &TxId,
    bound: Duration,
) -> Resolution {
    let id = match xid {
        TxId::Unassigned => return Resolution::Committed,
        TxId::Unknown => return Resolution::Unknown,
        TxId::Assigned(id) => id,
    };
    let deadline = Instant::now() + bound;
    let mut place = in_doubt;
    let asked = tokio::time::timeout_at(deadline.into(), async {
        let mut failures = 0_u32;
        loop {
            let attempt = async {
                match place.as_mut() {
                    Some(place) => {
                        let fresh = connector.establish().await.map_err(|e| e.to_string())?;
                        // The broken connection is closed here; the fresh one takes its place.
                        let conn = place.replace(fresh).ok_or("no connection to ask on")?;
                        ask_in_transaction(conn, id, deadline)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    None => {
                        let mut pooled = pool.get().await.map_err(|e| e.to_string())?;
                        ask_in_transaction(&mut pooled, id, deadline)
                            .await
                            .map_err(|e| e.to_string())
                    }
                }
            };
            match attempt.await {
                Ok(resolution) => return resolution,
                Err(e) => {
                    // Once per lost COMMIT; retries every RETRY_PAUSE would flood the log.
                    if failures == 0 {
                        log::warn!("could not ask the server about transaction {}: {e}", id.xid);
                    }
                    failures += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    })
    .await;
    // Dropping `place` gives it up, with whatever query may still be under way on it.
    asked.unwrap_or(Resolution::Unknown)
}

/// A pooled connection that never goes back to the pool: dropping it closes it and frees
/// its place. It holds the connection whose COMMIT's answer was lost, then the ones the
/// verification opens in its place (whatever is left on them, a query under way, a
/// transaction state diesel never saw, must not reach the next request).
pub struct Detached(Option<Box<PooledConnection>>);

impl Detached {
    /// Takes `conn` out of the pool's hands until it is dropped.
    pub fn new(conn: Box<PooledConnection>) -> Detached {
        Detached(Some(conn))
    }

    /// Closes the connection held and holds `fresh` in its place. (`None` only after
    /// `Drop`, which is the only one to empty it.)
    fn replace(&mut self, fresh: AsyncPgConnection) -> Option<&mut AsyncPgConnection> {
        let place: &mut AsyncPgConnection = self.0.as_mut()?;
        drop(std::mem::replace(place, fresh));
        Some(place)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool::managed::Object::take(*conn));
        }
    }
}

/// [`ask`] inside a transaction of its own, rolled back (it writes nothing): its queries
/// carry parameters, so they are prepared under a name, and behind a transaction pooler a
/// named statement prepared outside a transaction may be executed on another server
/// connection, or not at all. Through diesel's transaction manager, so that a pooled
/// connection left inside it (the bound cut the verification off) is discarded, never
/// reused.
async fn ask_in_transaction(
    conn: &mut AsyncPgConnection,
    id: &TxIdentity,
    deadline: Instant,
) -> Result<Resolution, DieselError> {
    AnsiTransactionManager::begin_transaction(conn).await?;
    let asked = ask(conn, id, deadline).await;
    // The answer stands whatever the ROLLBACK does: a connection it failed on is broken
    // in diesel's eyes, so the pool discards it, and a verification place is closed anyway.
    let _ = AnsiTransactionManager::rollback_transaction(conn).await;
    asked
}

/// One verification on one connection. The server's final "in progress", or an id it
/// no longer knows, leave the outcome unknown.
async fn ask(
    conn: &mut AsyncPgConnection,
    id: &TxIdentity,
    deadline: Instant,
) -> Result<Resolution, DieselError> {
    let first = match xact_status(conn, id).await? {
        Asked::Answered(first) => first,
        Asked::NotYetGiven => return Ok(Resolution::Aborted),
    };
    if first.status.as_deref() != Some("in progress") || !first.same_server {
        return Ok(final_answer(&first));
    }
    // The old backend still runs the transaction: end it (found by id and start time, so
    // never another transaction's backend), then ask until it has exited and the answer
    // is final, or the bound passes. (No waiting inside one statement: the connection's
    // own statement timeout could cut it short.)
    let ended = diesel::sql_query(
        // In the aggregate, not the WHERE clause: the server may test WHERE conditions in
        // any order, and must only signal the rows that match.
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS ended \
         FROM pg_stat_activity WHERE backend_xid = xid($1::xid8) AND xact_start::text = $2",
    )
    .bind::<Text, _>(id.xid.to_string())
    .bind::<Text, _>(&id.began)
    .get_result::<Ended>(conn)
    .await?;
    log::warn!(
        "transaction {} was still in progress behind a lost connection; {} backend(s) ended",
        id.xid,
        ended.ended
    );
    loop {
        match xact_status(conn, id).await? {
            Asked::NotYetGiven => return Ok(Resolution::Aborted),
            Asked::Answered(now) if now.status.as_deref() != Some("in progress") => {
                return Ok(final_answer(&now));
            }
            Asked::Answered(_) if Instant::now() >= deadline => return Ok(Resolution::Unknown),
            Asked::Answered(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// The server's answer about a transaction id.
enum Asked {
    Answered(XactStatus),
    /// The id is "in the future" (22023): the server never made its assignment durable
    /// (it restarted, or is a standby promoted before it got it), so the transaction did
    /// not commit there.
    NotYetGiven,
}

/// `pg_xact_status(xid)` (`committed`, `aborted`, `in progress`, or NULL for an id too old
/// to know), and whether the server is the one that gave the id (it did not restart).
async fn xact_status(conn: &mut AsyncPgConnection, id: &TxIdentity) -> Result<Asked, DieselError> {
    let asked = diesel::sql_query(
        "SELECT pg_xact_status($1::xid8)::text AS status, \
         pg_postmaster_start_time()::text || ' ' || \
         coalesce(pg_stat_get_bgwriter_stat_reset_time()::text, '') = $2 AS same_server",
    )
    .bind::<Text, _>(id.xid.to_string())
    .bind::<Text, _>(&id.server_started)
    .get_result::<XactStatus>(conn)
    .await;
    match asked {
        Ok(status) => Ok(Asked::Answered(status)),
        Err(DieselError::DatabaseError(_, info))
            if diesel_async::pg::sql_state(info.as_ref())
                == Some(SqlState::INVALID_PARAMETER_VALUE) =>
        {
            Ok(Asked::NotYetGiven)
        }
        Err(e) => Err(e),
    }
}

#[derive(QueryableByName)]
struct XactStatus {
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = Bool)]
    same_server: bool,
}

#[derive(QueryableByName)]
struct Ended {
    #[diesel(sql_type = BigInt)]
    ended: i64,
}

/// The outcome a status gives. On a server that restarted (or took over) since the id was
/// given, the id may belong to a later transaction: "committed" may be that one's, so it
/// proves nothing; anything else means ours never became durable there.
fn final_answer(asked: &XactStatus) -> Resolution {
    match (asked.status.as_deref(), asked.same_server) {
        (Some("committed"), true) => Resolution::Committed,
        (Some("aborted"), true) => Resolution::Aborted,
        (Some("committed"), false) | (None, _) => Resolution::Unknown,
        (Some(_), false) => Resolution::Aborted,
        (Some(_), true) => Resolution::Unknown,
    }
}
