//! Transfers: the row type and its queries, plus the two account-row statements a posting
//! needs (lock, set balances). Functions take `&mut AsyncPgConnection`; the transaction
//! around them belongs to the request's session.
//!
//! # Statements and plans
//! A single transfer is the hot path, so its three statements are written to cost what the
//! same SQL costs when pgbench sends it (`make bench` compares the two):
//! - **Prepared once per connection.** diesel caches a prepared statement only when its
//!   text cannot vary: never for `sql_query`, its own `UPDATE`s or `Insertable` inserts.
//!   Anything else is prepared anew on every call: an extra round trip, a parse, and a
//!   `Close`. So the update is a query fragment with a static query id, and one transfer
//!   is inserted as a tuple of columns.
//! - **One plan, reused.** PostgreSQL plans a prepared statement for its parameter values
//!   (a custom plan) until a generic plan looks as cheap. With an array parameter
//!   (`id = ANY($1)`, `unnest($1)`) the generic plan must guess the array's length and
//!   never looks as cheap, so every execution is planned again, which roughly doubled
//!   the server's CPU per transfer. With two scalar parameters per side, the estimates
//!   do not depend on the values and the generic plan is kept. Postings that touch two
//!   accounts use those; larger batches use the array forms.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::schema::{accounts, transfers};

/// A transfer, as stored and as served.
#[derive(
    Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable, Serialize, utoipa::ToSchema,
)]
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

/// Locks the account rows of `ids` (ascending, no duplicates) and returns `(id, balance)`
/// for those that exist.
///
/// One statement, `... ORDER BY id FOR UPDATE`: PostgreSQL locks the rows as the sorted
/// scan returns them, so every posting takes its locks in ascending id order and two
/// postings over the same accounts (in either direction, or two batches in opposite
/// orders) queue behind each other instead of deadlocking. Two accounts (every single
/// transfer) are named by two parameters, more by one array (see the module docs).
pub async fn lock_balances(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
) -> QueryResult<Vec<(i64, i64)>> {
    if let [a, b] = *ids {
        return accounts::table
            .filter(accounts::id.eq(a).or(accounts::id.eq(b)))
            .order(accounts::id.asc())
            .select((accounts::id, accounts::balance))
            .for_update()
            .load(conn)
            .await;
    }
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
    if let [first, second] = *balances {
        return SetTwoBalances { first, second }.execute(conn).await;
    }
    let (ids, balances): (Vec<i64>, Vec<i64>) = balances.iter().copied().unzip();
    SetBalances { ids, balances }.execute(conn).await
}

/// `UPDATE accounts AS a SET balance = v.balance FROM unnest($1::bigint[], $2::bigint[])
/// AS v(id, balance) WHERE a.id = v.id`, prepared once per connection (its text never
/// varies, so it declares a static query id; see the module docs).
struct SetBalances {
    ids: Vec<i64>,
    balances: Vec<i64>,
}

impl QueryId for SetBalances {
    type QueryId = SetBalances;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for SetBalances {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE accounts AS a SET balance = v.balance FROM unnest(");
        out.push_bind_param::<Array<BigInt>, _>(&self.ids)?;
        out.push_sql("::bigint[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.balances)?;
        out.push_sql("::bigint[]) AS v(id, balance) WHERE a.id = v.id");
        Ok(())
    }
}

/// The same update for exactly two accounts, with scalar parameters (`unnest(ARRAY[$1,
/// $2]::bigint[], ARRAY[$3, $4]::bigint[])`), so that PostgreSQL keeps one generic plan
/// for it (see the module docs).
struct SetTwoBalances {
    first: (i64, i64),
    second: (i64, i64),
}

impl QueryId for SetTwoBalances {
    type QueryId = SetTwoBalances;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for SetTwoBalances {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE accounts AS a SET balance = v.balance FROM unnest(ARRAY[");
        out.push_bind_param::<BigInt, _>(&self.first.0)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.second.0)?;
        out.push_sql("]::bigint[], ARRAY[");
        out.push_bind_param::<BigInt, _>(&self.first.1)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.second.1)?;
        out.push_sql("]::bigint[]) AS v(id, balance) WHERE a.id = v.id");
        Ok(())
    }
}

/// Inserts transfers in one statement and returns them in the order given (the ids are
/// drawn from the sequence row by row, in that order).
///
/// A single transfer goes in as a tuple of columns, whose text is fixed and which diesel
/// therefore keeps prepared (see the module docs).
pub async fn insert_all(
    conn: &mut AsyncPgConnection,
    rows: &[NewTransfer],
) -> QueryResult<Vec<Transfer>> {
    if let [row] = rows {
        return diesel::insert_into(transfers::table)
            .values(single(row))
            .returning(Transfer::as_returning())
            .get_results(conn)
            .await;
    }
    let mut inserted: Vec<Transfer> = diesel::insert_into(transfers::table)
        .values(rows)
        .returning(Transfer::as_returning())
        .get_results(conn)
        .await?;
    inserted.sort_by_key(|t| t.id);
    Ok(inserted)
}

/// The values of one transfer as a tuple of columns (see [`insert_all`]).
fn single(
    row: &NewTransfer,
) -> (
    diesel::dsl::Eq<transfers::from_account_id, i64>,
    diesel::dsl::Eq<transfers::to_account_id, i64>,
    diesel::dsl::Eq<transfers::amount, i64>,
) {
    (
        transfers::from_account_id.eq(row.from_account_id),
        transfers::to_account_id.eq(row.to_account_id),
        transfers::amount.eq(row.amount),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cacheable(query: &impl QueryFragment<Pg>) -> bool {
        matches!(query.is_safe_to_cache_prepared(&Pg), Ok(true))
    }

    /// The statements of a single transfer must stay prepared and take scalar parameters
    /// (see the module docs): each that does not costs a round trip, or a plan, per transfer.
    #[test]
    fn the_statements_of_a_single_transfer_are_prepared_once_with_scalar_parameters() {
        let row = NewTransfer {
            from_account_id: 1,
            to_account_id: 2,
            amount: 3,
        };
        let lock = accounts::table
            .filter(accounts::id.eq(1).or(accounts::id.eq(2)))
            .order(accounts::id.asc())
            .select((accounts::id, accounts::balance))
            .for_update();
        let set = SetTwoBalances {
            first: (1, 10),
            second: (2, 20),
        };
        let insert = diesel::insert_into(transfers::table)
            .values(single(&row))
            .returning(Transfer::as_returning());
        assert!(cacheable(&lock) && cacheable(&set) && cacheable(&insert));
        let sql = |q: &dyn Fn() -> String| q().split(" -- ").next().map(str::to_owned);
        assert_eq!(
            sql(&|| diesel::debug_query::<Pg, _>(&lock).to_string()),
            Some(
                "SELECT \"accounts\".\"id\", \"accounts\".\"balance\" FROM \"accounts\" WHERE \
                 ((\"accounts\".\"id\" = $1) OR (\"accounts\".\"id\" = $2)) ORDER BY \
                 \"accounts\".\"id\" ASC FOR UPDATE"
                    .to_owned()
            )
        );
        assert_eq!(
            sql(&|| diesel::debug_query::<Pg, _>(&set).to_string()),
            Some(
                "UPDATE accounts AS a SET balance = v.balance FROM unnest(ARRAY[$1, $2]::bigint[], \
                 ARRAY[$3, $4]::bigint[]) AS v(id, balance) WHERE a.id = v.id"
                    .to_owned()
            )
        );
        let many = SetBalances {
            ids: vec![1, 2, 3],
            balances: vec![10, 20, 30],
        };
        assert!(cacheable(&many));
        // What the batch insert sends is not cacheable, which is why one transfer avoids it.
        let rows = [row, row];
        let batch = diesel::insert_into(transfers::table).values(&rows[..]);
        assert!(!cacheable(&batch));
    }
}
