//! Per-connection statement watch, installed through diesel's instrumentation hook.
//!
//! It does three jobs that nothing else in the stack does:
//! - **Aborted transactions.** PostgreSQL aborts a transaction on any statement error, and
//!   a later `COMMIT` of that transaction answers with the tag `ROLLBACK`, not an error.
//!   diesel does not notice, so a handler that swallowed a database error and answered 2xx
//!   would have its response sent for writes that never landed. The watch records the
//!   failure (and clears it when a savepoint rollback repairs it); the session refuses to
//!   report success for an aborted transaction.
//!
//!   A row-returning statement (`load`, `get_result`, `... RETURNING`) counts as finished
//!   once its last row, or its error, has arrived (the vendored diesel-async reports it so;
//!   see `vendor/diesel-async/PATCH.md`), so an error raised while its rows stream is seen
//!   too. One that its reader stopped reading early is finished when the reader drops it;
//!   an error the server would have raised after that is still caught before COMMIT by the
//!   transaction-id query, which fails in an aborted transaction (`session::commit`).
//! - **In-flight statement**: when the statement now running was sent, so the session can
//!   bound it, rows included, with a client-side deadline (a peer that stopped answering
//!   never trips the server's `statement_timeout`).
//! - **SQL echo** ([`crate::SessionConfig::echo`]): the statement text only. diesel's display of a query appends
//!   its bind values (` -- binds: [...]`), which may be personal data, so they are cut off;
//!   connection events carry the URL with the password and are never logged.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use diesel::connection::{Instrumentation, InstrumentationEvent};

/// diesel's `Display` of a query puts this between the SQL and its bind values.
const BINDS_MARKER: &str = " -- binds: ";

/// What the watch saw on one connection since it was installed.
#[derive(Debug, Default)]
struct Seen {
    /// Current transaction depth (1 = the top-level transaction).
    depth: u32,
    /// The shallowest depth at which a statement failed and was not rolled back since.
    aborted_at: Option<u32>,
    /// Statements sent and not yet answered (more than one when pipelined through
    /// `&AsyncPgConnection`, or when a statement future was dropped mid-flight).
    in_flight: u32,
    /// When the oldest of the unanswered statements was sent; `None` when there are none.
    in_flight_since: Option<Instant>,
    /// A statement was refused because the transaction is read-only (SQLSTATE 25006).
    refused_write: bool,
    /// The shallowest depth at which a statement failed because of a concurrent
    /// transaction (40001 serialization failure, 40P01 deadlock) and was not rolled back
    /// since: the transaction may succeed if run again. A handler that rolled back to a
    /// savepoint around the failure recovered from it, and its answer stands.
    conflict_at: Option<u32>,
    /// A statement failed because the connection broke: no answer, or the server's
    /// connection exception or shutdown (see [`crate::error::connection_broke`]).
    broke: bool,
    /// The connection has prepared the session's transaction-id query (see `session::commit`);
    /// kept across check-outs, like the prepared statement itself.
    xid_prepared: bool,
}

/// A handle on the watch's observations, kept by the session.
#[derive(Clone, Debug, Default)]
pub struct WatchHandle(Arc<Mutex<Seen>>);

impl WatchHandle {
    /// True when a statement failed inside the open transaction and no rollback (to a
    /// savepoint around it, or of the whole transaction) has happened since: the server
    /// will turn a COMMIT into a ROLLBACK.
    pub fn transaction_aborted(&self) -> bool {
        self.lock().aborted_at.is_some()
    }

    /// When the oldest unanswered statement was sent, if there is one. A statement whose
    /// future was dropped mid-flight never gets its answer recorded, so it stays here: its
    /// outcome is unknown, and the session treats the transaction accordingly.
    pub fn in_flight_since(&self) -> Option<Instant> {
        self.lock().in_flight_since
    }

    /// Whether a statement was refused because the transaction is read-only (25006): in a
    /// session that asked for `READ ONLY`, a handler that tried to write.
    pub fn refused_write(&self) -> bool {
        self.lock().refused_write
    }

    /// Whether a statement failed with a serialization failure (40001) or a deadlock
    /// (40P01) in this session and no rollback to a savepoint around it happened since
    /// (`session::retry`).
    pub fn conflict(&self) -> bool {
        self.lock().conflict_at.is_some()
    }

    /// Whether a statement of this session failed because the connection broke (or the
    /// server ended the session), as opposed to the server refusing the statement.
    pub fn connection_broke(&self) -> bool {
        self.lock().broke
    }

    /// Whether the connection has the transaction-id query prepared (`session::commit`).
    pub fn xid_prepared(&self) -> bool {
        self.lock().xid_prepared
    }

    /// Records that the connection has the transaction-id query prepared.
    pub fn set_xid_prepared(&self) {
        self.lock().xid_prepared = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The instrumentation itself; see the module docs.
pub struct StatementWatch {
    seen: WatchHandle,
    echo: bool,
}

impl StatementWatch {
    /// A fresh watch and the handle that reads it.
    pub fn new(echo: bool) -> (Self, WatchHandle) {
        let seen = WatchHandle::default();
        (
            StatementWatch {
                seen: seen.clone(),
                echo,
            },
            seen,
        )
    }

    /// The handle for a new session on this watch's connection, with what the watch saw
    /// during earlier check-outs forgotten. (A watch stays installed on its connection:
    /// installing a fresh one at every check-out costs three allocations.)
    pub fn reuse(&mut self) -> WatchHandle {
        let mut seen = self.seen.lock();
        *seen = Seen {
            xid_prepared: seen.xid_prepared,
            ..Seen::default()
        };
        drop(seen);
        self.seen.clone()
    }

    /// The watch of `conn`, installed now if it has none yet, ready for a new session.
    pub fn attach(conn: &mut diesel_async::AsyncPgConnection, echo: bool) -> WatchHandle {
        use diesel_async::AsyncConnection;
        // diesel-async panics if the instrumentation is shared, which it only is while a
        // statement future of the connection is alive: never for a connection that sits
        // in the pool. Should that ever change, a fresh watch replaces the old one.
        let reused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.instrumentation()
                .downcast_mut::<StatementWatch>()
                .map(StatementWatch::reuse)
        }));
        if let Ok(Some(handle)) = reused {
            return handle;
        }
        let (watch, handle) = StatementWatch::new(echo);
        conn.set_instrumentation(watch);
        handle
    }
}

impl Instrumentation for StatementWatch {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { query, .. } => {
                {
                    let mut seen = self.seen.lock();
                    seen.in_flight += 1;
                    if seen.in_flight == 1 {
                        seen.in_flight_since = Some(Instant::now());
                    }
                }
                if self.echo {
                    let text = query.to_string();
                    let sql = text
                        .split_once(BINDS_MARKER)
                        .map_or(text.as_str(), |(sql, _)| sql);
                    log::info!(target: "actix_diesel_session::sql", "{sql}");
                }
            }
            InstrumentationEvent::FinishQuery { error, .. } => {
                let mut seen = self.seen.lock();
                seen.in_flight = seen.in_flight.saturating_sub(1);
                if seen.in_flight == 0 {
                    // With pipelined statements this keeps the first one's start: the
                    // deadline then errs on the early side, never the late one.
                    seen.in_flight_since = None;
                }
                // Only a server-side error aborts the transaction; NotFound and decoding
                // errors happen in the client after a successful statement.
                if error.is_some_and(crate::error::connection_broke) {
                    seen.broke = true;
                }
                if let Some(diesel::result::Error::DatabaseError(_, info)) = error {
                    use tokio_postgres::error::SqlState;
                    let depth = seen.depth;
                    match diesel_async::pg::sql_state(info.as_ref()) {
                        Some(SqlState::READ_ONLY_SQL_TRANSACTION) => seen.refused_write = true,
                        Some(SqlState::T_R_SERIALIZATION_FAILURE)
                        | Some(SqlState::T_R_DEADLOCK_DETECTED) => {
                            // Outside a transaction (depth 0) too: a COMMIT's failure.
                            seen.conflict_at =
                                Some(seen.conflict_at.map_or(depth, |d| d.min(depth)));
                        }
                        _ => {}
                    }
                    if depth > 0 {
                        seen.aborted_at = Some(seen.aborted_at.map_or(depth, |d| d.min(depth)));
                    }
                }
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.seen.lock().depth = depth.get();
            }
            InstrumentationEvent::CommitTransaction { depth, .. } => {
                self.seen.lock().depth = depth.get() - 1;
            }
            InstrumentationEvent::RollbackTransaction { depth, .. } => {
                let mut seen = self.seen.lock();
                seen.depth = depth.get() - 1;
                if seen.aborted_at.is_some_and(|d| d >= depth.get()) {
                    seen.aborted_at = None;
                }
                // Rolled back to a savepoint around the conflict: recovered. (A rollback of
                // the whole transaction, depth 1, keeps it: that is the session's own,
                // and the conflict is why.)
                if depth.get() > 1 && seen.conflict_at.is_some_and(|d| d >= depth.get()) {
                    seen.conflict_at = None;
                }
            }
            _ => {}
        }
    }
}
