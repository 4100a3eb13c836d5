//! Posting transfers: the bookkeeping rules, applied in request order against balances
//! locked up front.
//!
//! A posting (one transfer, or a batch) locks every account it names in one statement, in
//! ascending id order ([`transfers::lock_balances`]), so concurrent postings over the same
//! accounts never deadlock whatever their direction or item order. It then applies the
//! items one by one to the locked balances in memory, with checked arithmetic: the first
//! item that fails ends the posting with its index, and the request's session rolls back
//! whatever the request wrote before (the idempotency key included). Only when every item
//! passed does it write: one `UPDATE` for all changed balances and one `INSERT` for all
//! transfers.

use std::collections::{BTreeMap, BTreeSet};

use diesel_async::AsyncPgConnection;

use crate::db::transfers::{self, NewTransfer, Transfer};
use crate::error::{ApiError, FieldError};

/// Why a posting failed, and at which item (none for failures of the database itself).
#[derive(Debug)]
pub struct Failure {
    pub index: Option<usize>,
    pub error: ApiError,
}

impl Failure {
    fn at(index: usize, error: ApiError) -> Self {
        Failure {
            index: Some(index),
            error,
        }
    }

    /// The error of a batch: a failing item's error carries its index.
    pub fn into_batch_error(self) -> ApiError {
        match self.index {
            Some(index) => ApiError::AtIndex {
                index,
                error: Box::new(self.error),
            },
            None => self.error,
        }
    }
}

impl From<diesel::result::Error> for Failure {
    fn from(error: diesel::result::Error) -> Self {
        Failure {
            index: None,
            error: error.into(),
        }
    }
}

/// The checks of one transfer that need no database: a positive amount, two different
/// accounts (422), ids that can exist (404 for ids <= 0).
pub fn check(transfer: &NewTransfer) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if transfer.amount <= 0 {
        errors.push(FieldError::new("amount", "must be > 0"));
    }
    if transfer.from_account_id == transfer.to_account_id {
        errors.push(FieldError::new(
            "to_account_id",
            "must differ from from_account_id",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    for id in [transfer.from_account_id, transfer.to_account_id] {
        if id <= 0 {
            return Err(unknown_account(id));
        }
    }
    Ok(())
}

/// The failure a posting ends with whatever the database holds, if there is one: the
/// first item failing [`check`]. Lets a handler answer without checking out a connection.
pub fn check_first(items: &[NewTransfer]) -> Result<(), Failure> {
    match items.first().map(check) {
        Some(Err(error)) => Err(Failure::at(0, error)),
        _ => Ok(()),
    }
}

fn unknown_account(id: i64) -> ApiError {
    ApiError::NotFound(format!("account {id} does not exist"))
}

/// Applies `items` in order to `balances` (id → balance of every existing account they
/// name), stopping at the first that fails.
pub fn apply(balances: &mut BTreeMap<i64, i64>, items: &[NewTransfer]) -> Result<(), Failure> {
    for (index, item) in items.iter().enumerate() {
        apply_one(balances, item).map_err(|error| Failure::at(index, error))?;
    }
    Ok(())
}

fn apply_one(balances: &mut BTreeMap<i64, i64>, item: &NewTransfer) -> Result<(), ApiError> {
    check(item)?;
    let (from, to, amount) = (item.from_account_id, item.to_account_id, item.amount);
    let from_balance = *balances.get(&from).ok_or_else(|| unknown_account(from))?;
    let to_balance = *balances.get(&to).ok_or_else(|| unknown_account(to))?;
    if from_balance < amount {
        return Err(ApiError::InsufficientFunds(format!(
            "account {from} has {from_balance}, transfer needs {amount}"
        )));
    }
    let Some(new_to) = to_balance.checked_add(amount) else {
        return Err(ApiError::Validation(vec![FieldError::new(
            "amount",
            format!("would overflow the balance of account {to}"),
        )]));
    };
    balances.insert(from, from_balance - amount);
    balances.insert(to, new_to);
    Ok(())
}

/// Posts `items` atomically within the caller's transaction and returns the transfers in
/// request order. On failure nothing is written by this function (the caller's session
/// rolls back anything else).
pub async fn post(
    conn: &mut AsyncPgConnection,
    items: &[NewTransfer],
) -> Result<Vec<Transfer>, Failure> {
    // Items after the first one that fails its own checks can never be applied: lock and
    // apply only those before it; if they all pass, that item's failure is the answer.
    let checked = items
        .iter()
        .position(|item| check(item).is_err())
        .unwrap_or(items.len());
    let (head, rest) = items.split_at(checked);
    let mut changed = Vec::new();
    if !head.is_empty() {
        let ids: BTreeSet<i64> = head
            .iter()
            .flat_map(|t| [t.from_account_id, t.to_account_id])
            .collect();
        let ids: Vec<i64> = ids.into_iter().collect();
        let before: BTreeMap<i64, i64> = transfers::lock_balances(conn, &ids)
            .await?
            .into_iter()
            .collect();
        let mut after = before.clone();
        apply(&mut after, head)?;
        changed = after
            .into_iter()
            .filter(|(id, balance)| before.get(id) != Some(balance))
            .collect();
    }
    if let Some(Err(error)) = rest.first().map(check) {
        return Err(Failure::at(checked, error));
    }
    if !changed.is_empty() {
        let updated = transfers::set_balances(conn, &changed).await?;
        if updated != changed.len() {
            return Err(Failure {
                index: None,
                error: ApiError::internal(format!(
                    "updated {updated} of {} locked accounts",
                    changed.len()
                )),
            });
        }
    }
    let posted = transfers::insert_all(conn, items).await?;
    if posted.len() != items.len() {
        return Err(Failure {
            index: None,
            error: ApiError::internal("transfer insert returned fewer rows than sent"),
        });
    }
    Ok(posted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(from: i64, to: i64, amount: i64) -> NewTransfer {
        NewTransfer {
            from_account_id: from,
            to_account_id: to,
            amount,
        }
    }

    fn code(result: Result<(), Failure>) -> (Option<usize>, &'static str) {
        match result {
            Ok(()) => (None, "ok"),
            Err(f) => (f.index, f.error.code()),
        }
    }

    #[test]
    fn items_apply_in_order_and_the_first_failure_wins() {
        let mut balances = BTreeMap::from([(1, 100), (2, 0)]);
        assert_eq!(
            code(apply(&mut balances, &[t(1, 2, 60), t(2, 1, 10)])),
            (None, "ok")
        );
        assert_eq!(balances, BTreeMap::from([(1, 50), (2, 50)]));

        let mut balances = BTreeMap::from([(1, 100), (2, 0)]);
        let result = apply(&mut balances, &[t(1, 2, 60), t(1, 2, 60), t(1, 3, 0)]);
        assert_eq!(code(result), (Some(1), "insufficient_funds"));
    }

    #[test]
    fn overflow_is_a_validation_error_and_never_wraps() {
        let mut balances = BTreeMap::from([(1, 10), (2, i64::MAX - 5)]);
        assert_eq!(
            code(apply(&mut balances, &[t(1, 2, 6)])),
            (Some(0), "validation_failed")
        );
        assert_eq!(
            code(apply(&mut balances, &[t(1, 2, 5)])),
            (None, "ok"),
            "exactly i64::MAX fits"
        );
    }

    #[test]
    fn static_checks_come_before_lookups() {
        let mut balances = BTreeMap::new();
        assert_eq!(
            code(apply(&mut balances, &[t(1, 1, 5)])),
            (Some(0), "validation_failed")
        );
        assert_eq!(
            code(apply(&mut balances, &[t(0, 1, 5)])),
            (Some(0), "not_found")
        );
        assert_eq!(
            code(apply(&mut balances, &[t(1, 2, -5)])),
            (Some(0), "validation_failed")
        );
        assert_eq!(
            code(apply(&mut balances, &[t(1, 2, 5)])),
            (Some(0), "not_found")
        );
    }
}
