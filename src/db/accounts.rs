//! Accounts: the row type and its queries. Functions take `&mut AsyncPgConnection`; the
//! transaction around them belongs to the request's session.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::schema::accounts;

/// An account, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize, utoipa::ToSchema)]
#[diesel(table_name = accounts)]
pub struct Account {
    pub id: i64,
    pub name: String,
    pub balance: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Insertable)]
#[diesel(table_name = accounts)]
struct NewAccount<'a> {
    name: &'a str,
    balance: i64,
}

/// Inserts an account.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    name: &str,
    balance: i64,
) -> QueryResult<Account> {
    diesel::insert_into(accounts::table)
        .values(NewAccount { name, balance })
        .returning(Account::as_returning())
        .get_result(conn)
        .await
}

/// One account, or `None`.
pub async fn find(conn: &mut AsyncPgConnection, id: i64) -> QueryResult<Option<Account>> {
    accounts::table
        .find(id)
        .select(Account::as_select())
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` accounts with ids above `after_id`, by id (keyset pagination on the
/// primary key).
pub async fn list(
    conn: &mut AsyncPgConnection,
    after_id: i64,
    limit: i64,
) -> QueryResult<Vec<Account>> {
    accounts::table
        .filter(accounts::id.gt(after_id))
        .order(accounts::id.asc())
        .limit(limit)
        .select(Account::as_select())
        .load(conn)
        .await
}
