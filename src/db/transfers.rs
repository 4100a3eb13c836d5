//! Transfers: the row type and its queries, plus the two account-row statements a posting
//! needs (lock, set balances). Functions take `&mut AsyncPgConnection`; the transaction
//! around them belongs to the request's session.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::schema::{accounts, transfers};

/// A transfer, as stored and as served.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable, Serialize)]
#[diesel(table_name = transfers)]
pub struct Transfer {
    pub id: i64,
    pub from_account_id: i64,
    pub to_account_id: i64,
    pub amount: i64,
    pub created_at: DateTime<Utc>,
}

/// A transfer to insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Insertable)]
#[diesel(table_name = transfers)]
pub struct NewTransfer {
    pub from_account_id: i64,
    pub to_account_id: i64,
    pub amount: i64,
}

/// Locks the account rows of `ids` and returns `(id, balance)` for those that exist.
///
/// One statement, `... WHERE id = ANY($1) ORDER BY id FOR UPDATE`: PostgreSQL locks the
/// rows as the sorted scan returns them, so every posting takes its locks in ascending id
/// order and two postings over the same accounts (in either direction, or two batches in
/// opposite orders) queue behind each other instead of deadlocking.
pub async fn lock_balances(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
) -> QueryResult<Vec<(i64, i64)>> {
    accounts::table
        .filter(accounts::id.eq_any(ids))
        .order(accounts::id.asc())
        .select((accounts::id, accounts::balance))
        .for_update()
        .load(conn)
        .await
}

/// Sets the balances of locked accounts in one statement; returns the rows updated.
pub async fn set_balances(
    conn: &mut AsyncPgConnection,
    balances: &[(i64, i64)],
) -> QueryResult<usize> {
    let (ids, values): (Vec<i64>, Vec<i64>) = balances.iter().copied().unzip();
    diesel::sql_query(
        "UPDATE accounts AS a SET balance = v.balance \
         FROM unnest($1::bigint[], $2::bigint[]) AS v(id, balance) WHERE a.id = v.id",
    )
    .bind::<Array<BigInt>, _>(ids)
    .bind::<Array<BigInt>, _>(values)
    .execute(conn)
    .await
}

/// Inserts transfers in one statement and returns them in the order given (the ids are
/// drawn from the sequence row by row, in that order).
pub async fn insert_all(
    conn: &mut AsyncPgConnection,
    rows: &[NewTransfer],
) -> QueryResult<Vec<Transfer>> {
    let mut inserted: Vec<Transfer> = diesel::insert_into(transfers::table)
        .values(rows)
        .returning(Transfer::as_returning())
        .get_results(conn)
        .await?;
    inserted.sort_by_key(|t| t.id);
    Ok(inserted)
}

/// One transfer, or `None`.
pub async fn find(conn: &mut AsyncPgConnection, id: i64) -> QueryResult<Option<Transfer>> {
    transfers::table
        .find(id)
        .select(Transfer::as_select())
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` transfers with ids above `after_id`, by id; with `account_id`, only those
/// with that account on either side.
///
/// Either side is a keyset range scan of its own index (`transfers_from_account_id_id_idx`,
/// `transfers_to_account_id_id_idx`), each cut at `limit`, merged by id: an `OR` across the
/// two columns could use neither index in id order. A transfer never names the same
/// account twice (a CHECK constraint), so `UNION ALL` yields no duplicates.
pub async fn list(
    conn: &mut AsyncPgConnection,
    account_id: Option<i64>,
    after_id: i64,
    limit: i64,
) -> QueryResult<Vec<Transfer>> {
    let Some(account_id) = account_id else {
        return transfers::table
            .filter(transfers::id.gt(after_id))
            .order(transfers::id.asc())
            .limit(limit)
            .select(Transfer::as_select())
            .load(conn)
            .await;
    };
    diesel::sql_query(
        "SELECT id, from_account_id, to_account_id, amount, created_at FROM ( \
           (SELECT id, from_account_id, to_account_id, amount, created_at FROM transfers \
             WHERE from_account_id = $1 AND id > $2 ORDER BY id LIMIT $3) \
           UNION ALL \
           (SELECT id, from_account_id, to_account_id, amount, created_at FROM transfers \
             WHERE to_account_id = $1 AND id > $2 ORDER BY id LIMIT $3) \
         ) AS t ORDER BY id LIMIT $3",
    )
    .bind::<BigInt, _>(account_id)
    .bind::<BigInt, _>(after_id)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}
