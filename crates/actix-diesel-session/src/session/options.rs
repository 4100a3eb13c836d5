//! What a [`super::SessionMiddleware`] asks of its sessions: transaction options sent in
//! the `BEGIN` itself, and per-request settings sent in the same message.

use std::fmt::Write;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;

use super::retry::Retry;
use crate::error::SessionError;

/// The isolation level of a session's transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isolation {
    /// Every statement sees the rows committed before it began: PostgreSQL's own default.
    /// Asked for explicitly, it is stated in the `BEGIN`, whatever the server's (or the
    /// role's, or the database's) `default_transaction_isolation` says.
    #[default]
    ReadCommitted,
    /// Every statement sees the snapshot taken at the transaction's first statement.
    RepeatableRead,
    /// As if the transactions ran one after another; a conflict aborts one of them
    /// (SQLSTATE 40001, [`SessionError::Conflict`]).
    Serializable,
}

/// Per-request settings: computed from the request when its session is created.
pub(crate) type SettingsFn = Arc<dyn Fn(&ServiceRequest) -> Vec<(String, String)> + Send + Sync>;

/// The options of one middleware's sessions.
#[derive(Clone)]
pub(crate) struct TxOptions {
    /// The isolation level the session asked for; `None`: the server's default.
    pub(crate) isolation: Option<Isolation>,
    pub(crate) read_only: bool,
    pub(crate) deferrable: bool,
    pub(crate) settings: Option<SettingsFn>,
    /// Whether, and how, a conflict runs the request again (`session::retry`).
    pub(crate) retry: Option<Retry>,
    /// Whether a committed read-write session learns the WAL position after its COMMIT
    /// ([`super::SessionMiddleware::commit_position`]).
    pub(crate) commit_position: bool,
    /// [`TxOptions::begin_sql`], made once.
    pub(crate) begin: String,
    /// [`TxOptions::replica_begin_sql`], made once.
    pub(crate) replica_begin: String,
}

impl Default for TxOptions {
    fn default() -> Self {
        TxOptions {
            isolation: None,
            read_only: false,
            deferrable: false,
            settings: None,
            retry: None,
            commit_position: false,
            begin: "BEGIN".to_owned(),
            replica_begin: "BEGIN ISOLATION LEVEL REPEATABLE READ".to_owned(),
        }
    }
}

impl TxOptions {
    /// The `BEGIN` statement these options ask for: `BEGIN` alone for the defaults.
    pub(crate) fn begin_sql(&self) -> String {
        self.begin_at(self.isolation)
    }

    /// The `BEGIN` statement on a replica, which always states the isolation level. A hot
    /// standby refuses `SERIALIZABLE` ("cannot use serializable mode in a hot standby"),
    /// also when it is only the default (`default_transaction_isolation` of the server,
    /// the role or the database, which replicates from the primary): then the
    /// transaction's first statement fails. A session that asked for no level runs at
    /// `REPEATABLE READ` there: the highest level a standby offers, so a read-only
    /// route's statements (a page and its total, say) see one snapshot, where under
    /// `READ COMMITTED` the replay going on between them could show each a different
    /// state. Its snapshot lives only as long as the request's transaction, and a
    /// statement that replay cancels for holding it (a recovery conflict) is run again on
    /// the primary. `SERIALIZABLE` sessions never run on a replica.
    pub(crate) fn replica_begin_sql(&self) -> String {
        self.begin_at(Some(self.isolation.unwrap_or(Isolation::RepeatableRead)))
    }

    fn begin_at(&self, isolation: Option<Isolation>) -> String {
        let mut sql = String::from("BEGIN");
        match isolation {
            None => {}
            Some(Isolation::ReadCommitted) => sql.push_str(" ISOLATION LEVEL READ COMMITTED"),
            Some(Isolation::RepeatableRead) => sql.push_str(" ISOLATION LEVEL REPEATABLE READ"),
            Some(Isolation::Serializable) => sql.push_str(" ISOLATION LEVEL SERIALIZABLE"),
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        sql
    }
}

/// `begin` followed, in the same simple-protocol message (one round trip, one implicit
/// transaction block the `BEGIN` turns into the session's), by one
/// `set_config(name, value, true)` per setting: local to the transaction, so that a
/// setting can never outlive it and reach the next user of the connection, even behind a
/// pooler. Names and values are SQL string literals, escaped (never spliced in as SQL).
pub(crate) fn begin_with_settings(
    begin: &str,
    settings: &[(String, String)],
) -> Result<String, SessionError> {
    let mut sql = String::with_capacity(begin.len() + 48 * settings.len());
    sql.push_str(begin);
    for (name, value) in settings {
        sql.push_str("; SELECT set_config(");
        literal(&mut sql, name)?;
        sql.push_str(", ");
        literal(&mut sql, value)?;
        sql.push_str(", true)");
    }
    Ok(sql)
}

/// Appends `text` as an escape string literal (`E'...'`): a backslash and a quote are
/// escaped, whatever `standard_conforming_strings` says. A NUL cannot be in a PostgreSQL
/// text value at all.
fn literal(sql: &mut String, text: &str) -> Result<(), SessionError> {
    if text.contains('\0') {
        return Err(SessionError::internal(
            "a session setting's name or value contains a NUL character",
        ));
    }
    sql.push_str("E'");
    for c in text.chars() {
        match c {
            '\\' => sql.push_str("\\\\"),
            '\'' => sql.push_str("\\'"),
            c => {
                let _ = sql.write_char(c);
            }
        }
    }
    sql.push('\'');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_in_the_begin_itself() {
        let default = TxOptions::default();
        assert_eq!(default.begin_sql(), "BEGIN");
        assert_eq!(
            TxOptions {
                read_only: true,
                ..TxOptions::default()
            }
            .replica_begin_sql(),
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        );
        let read_committed = TxOptions {
            isolation: Some(Isolation::ReadCommitted),
            read_only: true,
            ..TxOptions::default()
        };
        assert_eq!(
            read_committed.begin_sql(),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY"
        );
        assert_eq!(
            read_committed.replica_begin_sql(),
            read_committed.begin_sql()
        );
        let all = TxOptions {
            isolation: Some(Isolation::Serializable),
            read_only: true,
            deferrable: true,
            ..TxOptions::default()
        };
        assert_eq!(
            all.begin_sql(),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
        );
    }

    #[test]
    fn settings_are_escaped_literals() {
        let sql = begin_with_settings(
            "BEGIN",
            &[("app.tenant".to_owned(), r"it's a \ test';--".to_owned())],
        )
        .unwrap_or_default();
        assert_eq!(
            sql,
            r"BEGIN; SELECT set_config(E'app.tenant', E'it\'s a \\ test\';--', true)"
        );
        assert!(begin_with_settings("BEGIN", &[("a".to_owned(), "x\0y".to_owned())]).is_err());
    }
}
