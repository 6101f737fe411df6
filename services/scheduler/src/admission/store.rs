//! Every SQL statement of admission, returning domain types; the only place that knows its tables
//! (`reservations`, one row per workload's admission, and `quota_usage`, what each quota scope holds).
//!
//! An admission adds its requests to the reserved amounts of its project and of its user inside the project (and,
//! for GPUs of a named type, to the same two scopes' rows for that type) only when every one of those rows stays
//! within its limits, atomically with storing the admission, so concurrent admissions can never over-commit:
//!
//! - PostgreSQL: one statement, one round trip ([`admit_statement`]): a CTE locks the scope rows in order
//!   (`FOR UPDATE`, which reads their latest committed amounts), counts those the amounts fit in, inserts the
//!   reservation only when all fit (or turns the same user's queued one into an admitted one), and adds the
//!   amounts to the rows only when the reservation was stored.
//! - MariaDB: one statement, one round trip: the `INSERT` of the admitted reservation, whose trigger
//!   `reservations_reserve` ([`crate::model`]) adds the amounts to the scope rows the row names with their limits,
//!   and fails the statement (undoing the insert) when any would be exceeded.
//! - SQLite, the embedded single-process backend whose writers take turns anyway: a transaction of the insert and
//!   one conditional UPDATE over the rows (`… SET cpu = cpu + r WHERE scope IN (…) AND (scope = 'projects/p' AND
//!   cpu + r <= limit OR …)`), committed only when every row was updated.
//!
//! A batch ([`Store::admit_batch`]) is one transaction on every backend (group commit): the scope rows of the
//! whole batch are locked and read once, the workloads are decided in order against the amounts as they grow,
//! and the reservations are inserted and the amounts added in a few statements, whatever the batch's size.

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use cube_kit::ApiError;
use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ColumnTrait as _, Condition, ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, EntityTrait as _,
    IntoActiveModel as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, SqlErr, Statement,
    TransactionTrait as _, Value,
};

use super::quota::{Amount, Limits, Scope, add_to, amount_of, blockers, empty_usage, fits, queued_reason, scopes_of};
use crate::model::{QUOTA_EXCEEDED, reservation, usage};

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

/// Bind parameters of a statement written by hand, numbered as PostgreSQL numbers them.
#[derive(Default)]
struct Params(Vec<Value>);

impl Params {
    /// Adds a value and returns its placeholder (`$3`).
    fn add(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }
}

/// The usage columns, in the order [`pairs`] gives them.
const USAGE_COLUMNS: [&str; 6] = [
    "cpu_millis",
    "memory_bytes",
    "gpu_millis",
    "notebooks",
    "services",
    "runs",
];

/// PostgreSQL's admission of `row` in one statement (see the module's documentation): it answers how many scope
/// rows the amounts fit in, whether the reservation was stored (inserted, or the same user's queued one of the
/// same project turned admitted), and how many rows the amounts were added to.
fn admit_statement(row: &reservation::Model, scopes: &[Scope], amount: &Amount) -> Statement {
    let mut params = Params::default();
    let rows: Vec<String> = scopes.iter().map(|scope| params.add(scope.row.clone())).collect();
    let rows = rows.join(", ");
    let mut within = Vec::new();
    for scope in scopes {
        let mut fits = vec![format!("scope = {}", params.add(scope.row.clone()))];
        for ((_, add, limit), column) in pairs(amount, &scope.limits).into_iter().zip(USAGE_COLUMNS) {
            if let Some(limit) = limit
                && add > 0
            {
                fits.push(format!("{column} + {} <= {}", params.add(add), params.add(limit)));
            }
        }
        within.push(format!("({})", fits.join(" AND ")));
    }
    let values = [
        params.add(row.workload.clone()),
        params.add(row.project.clone()),
        params.add(row.username.clone()),
        params.add(row.kind.clone()),
        params.add(row.cpu_millis),
        params.add(row.memory_bytes),
        params.add(row.gpu_millis),
        params.add(row.gpu_type.clone()),
        params.add(row.created_ms),
        params.add(row.scopes.clone()),
    ]
    .join(", ");
    let additions: Vec<String> = pairs(amount, &Limits::default())
        .into_iter()
        .zip(USAGE_COLUMNS)
        .map(|((_, add, _), column)| format!("{column} = {column} + {}", params.add(add)))
        .collect();
    let sql = format!(
        "WITH locked AS (\
           SELECT scope, cpu_millis, memory_bytes, gpu_millis, notebooks, services, runs FROM quota_usage \
           WHERE scope IN ({rows}) ORDER BY scope FOR UPDATE), \
         fitting AS (SELECT count(*) AS n FROM locked WHERE {within}), \
         stored AS (\
           INSERT INTO reservations (workload, project, username, kind, cpu_millis, memory_bytes, gpu_millis, \
             gpu_type, created_ms, scopes, state, reason, blockers) \
           SELECT {values}, 'admitted', '', '[]' FROM fitting WHERE n = {count} \
           ON CONFLICT (workload) DO UPDATE SET kind = EXCLUDED.kind, cpu_millis = EXCLUDED.cpu_millis, \
             memory_bytes = EXCLUDED.memory_bytes, gpu_millis = EXCLUDED.gpu_millis, gpu_type = EXCLUDED.gpu_type, \
             created_ms = EXCLUDED.created_ms, scopes = EXCLUDED.scopes, state = EXCLUDED.state, \
             reason = EXCLUDED.reason, blockers = EXCLUDED.blockers \
           WHERE reservations.state = 'queued' AND reservations.username = EXCLUDED.username \
             AND reservations.project = EXCLUDED.project \
           RETURNING workload), \
         reserved AS (\
           UPDATE quota_usage SET {additions} WHERE scope IN ({rows}) AND EXISTS (SELECT 1 FROM stored) \
           RETURNING scope) \
         SELECT (SELECT n FROM fitting), (SELECT count(*) FROM stored), (SELECT count(*) FROM reserved)",
        within = within.join(" OR "),
        count = scopes.len(),
        additions = additions.join(", "),
    );
    Statement::from_sql_and_values(DbBackend::Postgres, sql, params.0)
}

/// Whether a database error is MariaDB's reserve trigger saying a quota would be exceeded.
fn quota_exceeded(error: &DbErr) -> bool {
    error.to_string().contains(QUOTA_EXCEEDED)
}

/// One workload of a batch: its reservation as admitted, the scopes it reserves in and what it reserves.
pub(super) struct BatchItem {
    pub(super) row: reservation::Model,
    pub(super) scopes: Vec<Scope>,
    pub(super) amount: Amount,
}

/// What a batch came to for one workload.
pub(super) enum Batched {
    /// Reserved and stored, as given.
    Admitted(reservation::Model),
    /// A quota would be exceeded: stored queued, with its blockers.
    Queued(reservation::Model),
    /// The workload already had an admission other than the same user's queued one in the same project; nothing
    /// was written for it.
    Exists(reservation::Model),
}

/// The most rows one multi-row INSERT of a batch carries (13 values each, well within every backend's limit on
/// bind parameters).
const INSERT_CHUNK: usize = 500;

/// Reads one amount of a usage row.
type UsageField = fn(&usage::Model) -> i64;

/// Admission's tables in one database.
#[derive(Debug)]
pub(super) struct Store {
    db: DatabaseConnection,
    backend: DbBackend,
    /// Usage rows known to exist: rows are never deleted, so each is looked for once.
    known_scopes: RwLock<HashSet<String>>,
}

impl Store {
    /// The tables in `db`.
    pub(super) fn new(db: DatabaseConnection) -> Self {
        Self {
            backend: db.get_database_backend(),
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

    /// Stores `row` as admitted and reserves `amount` in every scope (whose limits `row.scopes` also holds),
    /// atomically; `replacing` replaces the queued admission the same user made of the workload in the same
    /// project (PostgreSQL does that whenever there is one). One statement on PostgreSQL and, for a new workload,
    /// on MariaDB; a transaction otherwise.
    pub(super) async fn try_admit(
        &self,
        row: &reservation::Model,
        scopes: &[Scope],
        amount: &Amount,
        replacing: bool,
    ) -> Result<Outcome, ApiError> {
        match self.backend {
            DbBackend::Postgres => self.admit_in_one_statement(row, scopes, amount).await,
            DbBackend::MySql => self.admit_by_trigger(row, replacing).await,
            _ => self.admit_in_transaction(row, scopes, amount, replacing).await,
        }
    }

    /// PostgreSQL: [`admit_statement`].
    async fn admit_in_one_statement(
        &self,
        row: &reservation::Model,
        scopes: &[Scope],
        amount: &Amount,
    ) -> Result<Outcome, ApiError> {
        let answer = self
            .db
            .query_one_raw(admit_statement(row, scopes, amount))
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError::internal("the admission statement returned no row"))?;
        let count = |index: usize| answer.try_get_by_index::<i64>(index).map_err(db_error);
        let (fitting, stored, reserved) = (count(0)?, count(1)?, count(2)?);
        if stored == 1 {
            if reserved != scopes.len() as i64 {
                return Err(ApiError::internal(format!(
                    "an admission was stored but reserved in {reserved} of {} usage rows",
                    scopes.len()
                )));
            }
            return Ok(Outcome::Admitted);
        }
        if fitting < scopes.len() as i64 {
            return Ok(Outcome::Full);
        }
        Ok(Outcome::Exists)
    }

    /// MariaDB: the insert, whose trigger reserves (see [`crate::model`]); replacing the same user's queued
    /// admission deletes it first, in one transaction with the insert.
    async fn admit_by_trigger(&self, row: &reservation::Model, replacing: bool) -> Result<Outcome, ApiError> {
        if !replacing {
            return match reservation::Entity::insert(row.clone().into_active_model())
                .exec_without_returning(&self.db)
                .await
            {
                Ok(_) => Ok(Outcome::Admitted),
                Err(error) if quota_exceeded(&error) => Ok(Outcome::Full),
                Err(error) => match error.sql_err() {
                    Some(SqlErr::UniqueConstraintViolation(_)) => Ok(Outcome::Exists),
                    _ => Err(db_error(error)),
                },
            };
        }
        let txn = self.db.begin().await.map_err(db_error)?;
        if !Self::delete_queued(&txn, row).await? {
            txn.rollback().await.map_err(db_error)?;
            return Ok(Outcome::Exists);
        }
        match reservation::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {
                txn.commit().await.map_err(db_error)?;
                Ok(Outcome::Admitted)
            }
            Err(error) if quota_exceeded(&error) => {
                txn.rollback().await.map_err(db_error)?;
                Ok(Outcome::Full)
            }
            Err(error) => {
                txn.rollback().await.map_err(db_error)?;
                Err(db_error(error))
            }
        }
    }

    /// Deletes the queued admission `row`'s user made of its workload in its project; false when there is none.
    async fn delete_queued(txn: &sea_orm::DatabaseTransaction, row: &reservation::Model) -> Result<bool, ApiError> {
        let deleted = reservation::Entity::delete_many()
            .filter(reservation::Column::Workload.eq(row.workload.clone()))
            .filter(reservation::Column::Username.eq(row.username.clone()))
            .filter(reservation::Column::Project.eq(row.project.clone()))
            .filter(reservation::Column::State.eq("queued"))
            .exec(txn)
            .await
            .map_err(db_error)?;
        Ok(deleted.rows_affected == 1)
    }

    /// SQLite: the insert and the conditional UPDATE in one transaction.
    async fn admit_in_transaction(
        &self,
        row: &reservation::Model,
        scopes: &[Scope],
        amount: &Amount,
        replacing: bool,
    ) -> Result<Outcome, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        if replacing && !Self::delete_queued(&txn, row).await? {
            txn.rollback().await.map_err(db_error)?;
            return Ok(Outcome::Exists);
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

    /// Admits a batch of workloads of one user in one transaction (group commit), each all or nothing: each new
    /// workload (or one the user queued before in the same project) is admitted when it fits in every scope after
    /// the workloads before it in `items`, and queued with its blockers otherwise; one that has another admission
    /// is left as it is. The scope rows are locked (PostgreSQL, MariaDB) or the database is written (SQLite)
    /// before anything is decided, so concurrent admissions never over-commit. The scope rows must exist
    /// ([`Self::ensure_scopes`]).
    pub(super) async fn admit_batch(&self, items: &[BatchItem]) -> Result<Vec<Batched>, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let decided = self.decide_batch(&txn, items).await;
        match decided {
            Ok(outcomes) => {
                txn.commit().await.map_err(db_error)?;
                Ok(outcomes)
            }
            Err(error) => {
                txn.rollback().await.map_err(db_error)?;
                Err(error)
            }
        }
    }

    async fn decide_batch(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        items: &[BatchItem],
    ) -> Result<Vec<Batched>, ApiError> {
        let mut rows: Vec<String> = items
            .iter()
            .flat_map(|item| item.scopes.iter().map(|scope| scope.row.clone()))
            .collect();
        rows.sort();
        rows.dedup();
        // Locked in one order by every batch and statement, so they wait for each other rather than deadlock.
        let mut locking = usage::Entity::find()
            .filter(usage::Column::Scope.is_in(rows.clone()))
            .order_by_asc(usage::Column::Scope);
        if self.backend != DbBackend::Sqlite {
            locking = locking.lock_exclusive();
        } else {
            // SQLite has no row locks: a write first takes the database's write lock for the transaction.
            usage::Entity::update_many()
                .col_expr(usage::Column::Runs, Expr::col(usage::Column::Runs))
                .filter(usage::Column::Scope.is_in(rows.clone()))
                .exec(txn)
                .await
                .map_err(db_error)?;
        }
        let mut used: HashMap<String, usage::Model> = locking
            .all(txn)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| (row.scope.clone(), row))
            .collect();
        let before = used.clone();
        let workloads: Vec<String> = items.iter().map(|item| item.row.workload.clone()).collect();
        let mut existing: HashMap<String, reservation::Model> = HashMap::new();
        for chunk in workloads.chunks(INSERT_CHUNK) {
            for row in reservation::Entity::find()
                .filter(reservation::Column::Workload.is_in(chunk.to_vec()))
                .all(txn)
                .await
                .map_err(db_error)?
            {
                existing.insert(row.workload.clone(), row);
            }
        }
        let mut outcomes = Vec::with_capacity(items.len());
        let mut replaced = Vec::new();
        let mut stored = Vec::new();
        for item in items {
            if let Some(found) = existing.get(&item.row.workload) {
                let replaceable =
                    found.state == "queued" && found.username == item.row.username && found.project == item.row.project;
                if !replaceable {
                    outcomes.push(Batched::Exists(found.clone()));
                    continue;
                }
                replaced.push(found.workload.clone());
            }
            if fits(&item.scopes, &item.amount, &used) {
                add_to(&item.scopes, &item.amount, &mut used);
                stored.push(item.row.clone());
                outcomes.push(Batched::Admitted(item.row.clone()));
            } else {
                let blockers = blockers(&item.scopes, &item.amount, &used);
                let row = reservation::Model {
                    state: "queued".into(),
                    reason: queued_reason(&blockers),
                    blockers: serde_json::to_string(&blockers).unwrap_or_else(|_| "[]".into()),
                    ..item.row.clone()
                };
                stored.push(row.clone());
                outcomes.push(Batched::Queued(row));
            }
        }
        if let Some(username) = items.first().map(|item| item.row.username.clone()) {
            for chunk in replaced.chunks(INSERT_CHUNK) {
                let deleted = reservation::Entity::delete_many()
                    .filter(reservation::Column::Workload.is_in(chunk.to_vec()))
                    .filter(reservation::Column::Username.eq(username.clone()))
                    .filter(reservation::Column::State.eq("queued"))
                    .exec(txn)
                    .await
                    .map_err(db_error)?;
                if deleted.rows_affected != chunk.len() as u64 {
                    return Err(ApiError::Aborted {
                        message: "queued admissions of the batch changed while it was being written; ask again".into(),
                    });
                }
            }
        }
        for chunk in stored.chunks(INSERT_CHUNK) {
            // MariaDB's trigger reserves each admitted row as it is inserted, checking its limits again: with the
            // rows locked and decided in the same order, every check passes.
            reservation::Entity::insert_many(chunk.iter().cloned().map(sea_orm::IntoActiveModel::into_active_model))
                .exec_without_returning(txn)
                .await
                .map_err(db_error)?;
        }
        if self.backend != DbBackend::MySql {
            Self::add_usage(txn, &before, &used).await?;
        }
        Ok(outcomes)
    }

    /// Sets each usage row from what it held (`before`) to what it holds now (`after`), in one statement that adds
    /// the difference (`cpu_millis = cpu_millis + CASE scope WHEN … END`).
    async fn add_usage(
        txn: &sea_orm::DatabaseTransaction,
        before: &HashMap<String, usage::Model>,
        after: &HashMap<String, usage::Model>,
    ) -> Result<(), ApiError> {
        let changed: Vec<(&usage::Model, usage::Model)> = after
            .values()
            .filter_map(|now| {
                let was = before
                    .get(&now.scope)
                    .cloned()
                    .unwrap_or_else(|| empty_usage(&now.scope));
                (was != *now).then_some((now, was))
            })
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let columns: [(usage::Column, UsageField); 6] = [
            (usage::Column::CpuMillis, |row| row.cpu_millis),
            (usage::Column::MemoryBytes, |row| row.memory_bytes),
            (usage::Column::GpuMillis, |row| row.gpu_millis),
            (usage::Column::Notebooks, |row| row.notebooks),
            (usage::Column::Services, |row| row.services),
            (usage::Column::Runs, |row| row.runs),
        ];
        let mut update = usage::Entity::update_many()
            .filter(usage::Column::Scope.is_in(changed.iter().map(|(now, _)| now.scope.clone())));
        for (column, value) in columns {
            let mut case = sea_orm::sea_query::CaseStatement::new();
            for (now, was) in &changed {
                case = case.case(
                    usage::Column::Scope.eq(now.scope.clone()),
                    Expr::val(value(now) - value(was)),
                );
            }
            update = update.col_expr(column, Expr::col(column).add(Expr::expr(case.finally(Expr::val(0i64)))));
        }
        let updated = update.exec(txn).await.map_err(db_error)?;
        if updated.rows_affected != changed.len() as u64 {
            return Err(ApiError::internal(format!(
                "a batch reserved in {} of {} usage rows",
                updated.rows_affected,
                changed.len()
            )));
        }
        Ok(())
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
