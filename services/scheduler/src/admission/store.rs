//! Every SQL statement of admission, returning domain types; the only place that knows its tables
//! (`reservations`, one row per workload's admission, and `quota_usage`, what each quota scope holds).
//!
//! An admission adds its requests to the reserved amounts of its project and of its user inside the project (and,
//! for GPUs of a named type, to the same two scopes' rows for that type) with one conditional UPDATE over those
//! rows (`… SET cpu = cpu + r WHERE scope IN (…) AND (scope = 'projects/p' AND cpu + r <= limit OR …)`), in the
//! transaction that stores the admission, so concurrent admissions serialise on the rows and can never
//! over-commit, on SQLite, PostgreSQL and MariaDB alike.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use cube_kit::ApiError;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait as _, Condition, DatabaseConnection, DbErr, EntityTrait as _, IntoActiveModel as _, QueryFilter as _,
    QuerySelect as _, SqlErr, TransactionTrait as _,
};

use super::quota::{Amount, Limits, Scope, amount_of, empty_usage, scopes_of};
use crate::model::{reservation, usage};

pub(super) fn db_error(error: DbErr) -> ApiError {
    ApiError::internal(error)
}

/// Each usage column with the amount of it and its limit.
fn pairs(amount: &Amount, limits: &Limits) -> [(usage::Column, i64, Option<i64>); 6] {
    [
        (usage::Column::CpuMillis, amount.cpu_millis, limits.cpu_millis),
        (usage::Column::MemoryBytes, amount.memory_bytes, limits.memory_bytes),
        (usage::Column::GpuMillis, amount.gpu_millis, limits.gpu_millis),
        (usage::Column::Notebooks, amount.notebooks, limits.notebooks),
        (usage::Column::Services, amount.services, limits.services),
        (usage::Column::Runs, amount.runs, limits.runs),
    ]
}

/// Adds `amount` to every scope's row if each stays within its own limits; false (and nothing changed) when one
/// would not. One statement: every row changes (each admission counts one notebook, service or run), so the
/// admission fits exactly when every row was updated.
async fn reserve(txn: &sea_orm::DatabaseTransaction, scopes: &[Scope], amount: &Amount) -> Result<bool, ApiError> {
    let mut update =
        usage::Entity::update_many().filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())));
    for (column, add, _) in pairs(amount, &Limits::default()) {
        if add != 0 {
            update = update.col_expr(column, Expr::col(column).add(add));
        }
    }
    let mut within = Condition::any();
    for scope in scopes {
        let mut fits = Condition::all().add(usage::Column::Scope.eq(scope.row.clone()));
        for (column, add, limit) in pairs(amount, &scope.limits) {
            if let Some(limit) = limit
                && add > 0
            {
                fits = fits.add(Expr::col(column).add(add).lte(limit));
            }
        }
        within = within.add(fits);
    }
    let updated = update.filter(within).exec(txn).await.map_err(db_error)?;
    Ok(updated.rows_affected == scopes.len() as u64)
}

/// Takes `amount` off every scope's row (a release).
async fn unreserve(txn: &sea_orm::DatabaseTransaction, scopes: &[Scope], amount: &Amount) -> Result<(), ApiError> {
    let mut update =
        usage::Entity::update_many().filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())));
    for (column, amount, _) in pairs(amount, &Limits::default()) {
        if amount != 0 {
            update = update.col_expr(column, Expr::col(column).sub(amount));
        }
    }
    update.exec(txn).await.map_err(db_error)?;
    Ok(())
}

/// Whether a failed transaction lost a race (deadlock, lock wait, busy database) and may be tried again.
fn retryable(error: &ApiError) -> bool {
    let ApiError::Internal(source) = error else {
        return false;
    };
    let text = source.to_string().to_lowercase();
    ["deadlock", "lock wait", "locked", "busy", "could not serialize"]
        .iter()
        .any(|word| text.contains(word))
}

/// Runs `attempt` again while it fails for a lost race (MariaDB picks deadlock victims), up to 8 times.
pub(super) async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Err(error) if attempts < 8 && retryable(&error) => {}
            other => return other,
        }
    }
}

/// What storing an admission came to.
pub(super) enum Outcome {
    /// Reserved and stored.
    Admitted,
    /// A quota would be exceeded; nothing was written.
    Full,
    /// The workload already has an admission (or its queued one changed meanwhile); nothing was written.
    Exists,
}

/// Admission's tables in one database.
#[derive(Debug)]
pub(super) struct Store {
    db: DatabaseConnection,
    /// Usage rows known to exist: rows are never deleted, so each is looked for once.
    known_scopes: RwLock<HashSet<String>>,
}

impl Store {
    /// The tables in `db`.
    pub(super) fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            known_scopes: RwLock::new(HashSet::new()),
        }
    }

    /// The admission of `workload`, if it has one.
    pub(super) async fn find(&self, workload: &str) -> Result<Option<reservation::Model>, ApiError> {
        reservation::Entity::find_by_id(workload.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// The usage rows of `scopes` that exist, by row.
    pub(super) async fn usage_of(&self, scopes: &[Scope]) -> Result<HashMap<String, usage::Model>, ApiError> {
        Ok(usage::Entity::find()
            .filter(usage::Column::Scope.is_in(scopes.iter().map(|scope| scope.row.clone())))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| (row.scope.clone(), row))
            .collect())
    }

    /// The usage rows of a project (`projects/{p}`) and of its GPU types (`projects/{p}#gpu-type=…`).
    pub(super) async fn project_rows(&self, scope: &str) -> Result<Vec<usage::Model>, ApiError> {
        // The type rows `projects/{p}#gpu-type=…` sort between `…#gpu-type=` and `…#gpu-type>`.
        usage::Entity::find()
            .filter(
                Condition::any().add(usage::Column::Scope.eq(scope.to_owned())).add(
                    Condition::all()
                        .add(usage::Column::Scope.gt(format!("{scope}#gpu-type=")))
                        .add(usage::Column::Scope.lt(format!("{scope}#gpu-type>"))),
                ),
            )
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// The admitted reservations made at or before `cutoff_ms` (Unix ms).
    pub(super) async fn admitted_before(&self, cutoff_ms: i64) -> Result<Vec<reservation::Model>, ApiError> {
        reservation::Entity::find()
            .filter(reservation::Column::State.eq("admitted"))
            .filter(reservation::Column::CreatedMs.lte(cutoff_ms))
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Makes sure the usage rows of `scopes` exist.
    pub(super) async fn ensure_scopes(&self, scopes: &[Scope]) -> Result<(), ApiError> {
        let db = &self.db;
        let missing: Vec<String> = {
            let known = self.known_scopes.read().unwrap_or_else(PoisonError::into_inner);
            scopes
                .iter()
                .filter(|scope| !known.contains(&scope.row))
                .map(|scope| scope.row.clone())
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let present: HashSet<String> = usage::Entity::find()
            .select_only()
            .column(usage::Column::Scope)
            .filter(usage::Column::Scope.is_in(missing.clone()))
            .into_tuple::<String>()
            .all(db)
            .await
            .map_err(db_error)?
            .into_iter()
            .collect();
        for scope in missing.iter().filter(|scope| !present.contains(*scope)) {
            // Outside any transaction, so a racing insert's duplicate key aborts nothing: the row exists either way.
            if let Err(error) = usage::Entity::insert(empty_usage(scope).into_active_model())
                .exec(db)
                .await
            {
                let exists = usage::Entity::find_by_id(scope.clone())
                    .one(db)
                    .await
                    .map_err(db_error)?
                    .is_some();
                if !exists {
                    return Err(db_error(error));
                }
            }
        }
        self.known_scopes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(missing);
        Ok(())
    }

    /// Stores `row` as admitted and reserves `amount` in every scope, in one transaction; `replacing` replaces
    /// the queued admission the same user made of the workload.
    pub(super) async fn try_admit(
        &self,
        row: &reservation::Model,
        scopes: &[Scope],
        amount: &Amount,
        replacing: bool,
    ) -> Result<Outcome, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        if replacing {
            let deleted = reservation::Entity::delete_many()
                .filter(reservation::Column::Workload.eq(row.workload.clone()))
                .filter(reservation::Column::Username.eq(row.username.clone()))
                .filter(reservation::Column::State.eq("queued"))
                .exec(&txn)
                .await
                .map_err(db_error)?;
            if deleted.rows_affected != 1 {
                txn.rollback().await.map_err(db_error)?;
                return Ok(Outcome::Exists);
            }
        }
        if let Err(error) = reservation::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&txn)
            .await
        {
            txn.rollback().await.map_err(db_error)?;
            return match error.sql_err() {
                Some(SqlErr::UniqueConstraintViolation(_)) => Ok(Outcome::Exists),
                _ => Err(db_error(error)),
            };
        }
        if !reserve(&txn, scopes, amount).await? {
            txn.rollback().await.map_err(db_error)?;
            return Ok(Outcome::Full);
        }
        txn.commit().await.map_err(db_error)?;
        Ok(Outcome::Admitted)
    }

    /// Stores a queued admission (`was_queued`: over the same user's queued one), or returns the admission
    /// another call stored for the workload meanwhile.
    pub(super) async fn store_queued(
        &self,
        row: &reservation::Model,
        was_queued: bool,
    ) -> Result<reservation::Model, ApiError> {
        let db = &self.db;
        let stored = if was_queued {
            let updated = reservation::Entity::update_many()
                .col_expr(reservation::Column::Reason, Expr::value(row.reason.clone()))
                .col_expr(reservation::Column::Blockers, Expr::value(row.blockers.clone()))
                .col_expr(reservation::Column::CreatedMs, Expr::value(row.created_ms))
                .filter(reservation::Column::Workload.eq(row.workload.clone()))
                .filter(reservation::Column::Username.eq(row.username.clone()))
                .filter(reservation::Column::State.eq("queued"))
                .exec(db)
                .await
                .map_err(db_error)?;
            updated.rows_affected == 1
        } else {
            reservation::Entity::insert(row.clone().into_active_model())
                .exec(db)
                .await
                .is_ok()
        };
        if stored {
            return Ok(row.clone());
        }
        reservation::Entity::find_by_id(row.workload.clone())
            .one(db)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::internal("a reservation could neither be written nor read"))
    }

    /// Deletes the reservation as it was read and gives back what it held, in one transaction; false when it
    /// changed or went meanwhile.
    pub(super) async fn release_row(&self, row: &reservation::Model) -> Result<bool, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let deleted = reservation::Entity::delete_many()
            .filter(reservation::Column::Workload.eq(row.workload.clone()))
            .filter(reservation::Column::State.eq(row.state.clone()))
            .filter(reservation::Column::CreatedMs.eq(row.created_ms))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if deleted.rows_affected != 1 {
            txn.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        if row.state == "admitted" {
            unreserve(&txn, &scopes_of(row), &amount_of(row)).await?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }
}
