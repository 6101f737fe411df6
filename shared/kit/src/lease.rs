//! SQL leases: "exactly one replica does this" (fire schedules, cull notebooks, drive rollouts, watch a cluster)
//! in the service's own database, on SQLite, PostgreSQL and MySQL/MariaDB.
//!
//! A lease is a row of `leases` (name, holder, epoch, expiry). [`Lease::acquire_or_renew`] takes the lease when it
//! is free or expired and renews it when it is already the caller's, in one conditional `UPDATE` (or an `INSERT`
//! when the row is missing). The epoch grows whenever the lease changes hands, so a write guarded by the lease
//! checks, in its own transaction, that the epoch it acquired is still current and unexpired ([`check`]): a
//! deposed holder that has not noticed yet cannot act.
//!
//! **Clock.** Expiry is stored and compared in the database's clock only (Unix milliseconds read by the SQL
//! statement itself), so replicas whose clocks disagree still agree on who holds a lease. A holder's own view
//! ([`Keeper`], [`Held::valid_until`]) counts the lease duration on its monotonic clock from the moment it *sent*
//! the renewal, which ends no later than the expiry the database recorded; only clock rates, not offsets, matter.
//!
//! Holder names must be unique per process instance (e.g. the pod name plus a random suffix): a holder that
//! comes back under the same name after its lease expired keeps the epoch if no one took the lease meanwhile.

use std::fmt;
use std::time::Duration;

use sea_orm::sea_query::{ColumnDef, Table};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::task::Background;

/// The name of the lease table.
pub const TABLE: &str = "leases";

/// Identifies one holding of a lease: it grows every time the lease changes hands, and stays the same while one
/// holder renews it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Describes why a lease operation failed or why a guarded write must not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reports a failed statement on the lease table.
    #[error("lease database statement failed: {0}")]
    Database(#[from] DbErr),
    /// Reports that the lease changed hands (or was released) after the caller acquired it at `held`.
    #[error("lease {name:?} was held at epoch {held}, but its current epoch is {}", display_epoch(*.current))]
    Superseded {
        /// The lease.
        name: String,
        /// The epoch the caller acquired.
        held: Epoch,
        /// The lease's current epoch; `None` when the lease is not held by anyone.
        current: Option<Epoch>,
    },
    /// Reports that the caller's holding expired without being renewed.
    #[error("lease {name:?} held at epoch {held} has expired")]
    Expired {
        /// The lease.
        name: String,
        /// The epoch the caller acquired.
        held: Epoch,
    },
}

fn display_epoch(epoch: Option<Epoch>) -> String {
    epoch.map_or_else(|| "none (the lease is free)".to_owned(), |epoch| epoch.to_string())
}

/// Names a lease, the replica that wants it and how long a holding lasts without renewal.
#[derive(Clone, Debug)]
pub struct Lease {
    name: String,
    holder: String,
    duration: Duration,
}

impl Lease {
    /// Describes the lease `name` as wanted by `holder` (unique per process instance) for `duration` at a time.
    pub fn new(name: impl Into<String>, holder: impl Into<String>, duration: Duration) -> Self {
        Self {
            name: name.into(),
            holder: holder.into(),
            duration,
        }
    }

    /// Returns the lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the holder this replica acts as.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Returns how long a holding lasts without renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Takes the lease if it is free or expired, or renews it if this holder already has it, until the database's
    /// now plus the duration; returns the epoch held, or `None` when another holder has the lease.
    ///
    /// # Errors
    /// Returns [`LeaseError::Database`] when a statement fails; the caller then knows nothing new about the lease.
    pub async fn acquire_or_renew(&self, db: &impl ConnectionTrait) -> Result<Option<Epoch>, LeaseError> {
        let backend = db.get_database_backend();
        let now = now_sql(backend);
        let duration_ms = i64::try_from(self.duration.as_millis()).unwrap_or(i64::MAX / 2);
        // `epoch` is assigned first: MySQL evaluates assignments left to right with the new values.
        let update = format!(
            "UPDATE leases SET epoch = CASE WHEN holder = ? THEN epoch ELSE epoch + 1 END, holder = ?, \
             expires_ms = {now} + ? WHERE name = ? AND (holder = ? OR expires_ms <= {now})"
        );
        db.execute_raw(statement(
            backend,
            &update,
            [
                self.holder.as_str().into(),
                self.holder.as_str().into(),
                duration_ms.into(),
                self.name.as_str().into(),
                self.holder.as_str().into(),
            ],
        ))
        .await?;
        if let Some(epoch) = self.held_epoch(db).await? {
            return Ok(Some(epoch));
        }
        // The row may be missing; another replica racing to insert it wins or loses cleanly.
        let insert = match backend {
            DbBackend::MySql => {
                format!("INSERT IGNORE INTO leases (name, holder, epoch, expires_ms) VALUES (?, ?, 1, {now} + ?)")
            }
            _ => format!(
                "INSERT INTO leases (name, holder, epoch, expires_ms) VALUES (?, ?, 1, {now} + ?) \
                 ON CONFLICT (name) DO NOTHING"
            ),
        };
        let inserted = db
            .execute_raw(statement(
                backend,
                &insert,
                [
                    self.name.as_str().into(),
                    self.holder.as_str().into(),
                    duration_ms.into(),
                ],
            ))
            .await?;
        if inserted.rows_affected() == 0 {
            return Ok(None);
        }
        self.held_epoch(db).await
    }

    /// Returns the epoch at which this holder holds the lease, unexpired, if it does.
    async fn held_epoch(&self, db: &impl ConnectionTrait) -> Result<Option<Epoch>, LeaseError> {
        let backend = db.get_database_backend();
        let select = format!(
            "SELECT epoch FROM leases WHERE name = ? AND holder = ? AND expires_ms > {}",
            now_sql(backend)
        );
        let row = db
            .query_one_raw(statement(
                backend,
                &select,
                [self.name.as_str().into(), self.holder.as_str().into()],
            ))
            .await?;
        Ok(row.map(|row| row.try_get_by_index::<i64>(0)).transpose()?.map(Epoch))
    }

    /// Gives the lease up if this holder has it, so another replica can take it at once (under a new epoch);
    /// returns whether it was held.
    ///
    /// # Errors
    /// Returns [`LeaseError::Database`] when the statement fails; the lease then expires on its own.
    pub async fn release(&self, db: &impl ConnectionTrait) -> Result<bool, LeaseError> {
        let backend = db.get_database_backend();
        let released = db
            .execute_raw(statement(
                backend,
                "UPDATE leases SET holder = '', expires_ms = 0 WHERE name = ? AND holder = ?",
                [self.name.as_str().into(), self.holder.as_str().into()],
            ))
            .await?;
        Ok(released.rows_affected() > 0)
    }

    /// Starts a [`Keeper`] that takes this lease when it can and renews it every third of its duration.
    pub fn keep(self, db: DatabaseConnection) -> Keeper {
        let (sender, state) = watch::channel(None);
        let task = Background::spawn(keep(db.clone(), self.clone(), sender));
        Keeper {
            lease: self,
            db,
            state,
            task,
        }
    }
}

/// Checks, inside the transaction `txn` of a write the lease guards, that the lease `name` is still held at
/// `epoch` and unexpired, by the database's clock.
///
/// Call it first in the transaction. On PostgreSQL and MySQL/MariaDB the lease row is read `FOR UPDATE`, and on
/// SQLite the transaction takes the database's write lock before reading it, so in both cases the lease cannot
/// change hands until the transaction ends. The epoch under that lock is what excludes a deposed holder; the
/// expiry check on top refuses a holder that has stopped renewing even before anyone else takes the lease.
///
/// # Errors
/// Returns [`LeaseError::Superseded`] when another holder took the lease or it was released,
/// [`LeaseError::Expired`] when the holding lapsed, and [`LeaseError::Database`] when the statement fails; the
/// guarded write must then roll back.
pub async fn check(txn: &impl ConnectionTrait, name: &str, epoch: Epoch) -> Result<(), LeaseError> {
    let backend = txn.get_database_backend();
    let lock = match backend {
        DbBackend::Sqlite => {
            // A write first makes this a writing transaction, waiting for other writers (the busy timeout), so
            // the read below cannot be overtaken; a read first would make the guarded write fail with "database
            // is locked" whenever a renewal commits in between.
            txn.execute_raw(statement(
                backend,
                "UPDATE leases SET epoch = epoch WHERE name = ?",
                [name.into()],
            ))
            .await?;
            ""
        }
        _ => " FOR UPDATE",
    };
    let select = format!(
        "SELECT epoch, holder, expires_ms, {} FROM leases WHERE name = ?{lock}",
        now_sql(backend)
    );
    let row = txn.query_one_raw(statement(backend, &select, [name.into()])).await?;
    let Some(row) = row else {
        return Err(LeaseError::Superseded {
            name: name.to_owned(),
            held: epoch,
            current: None,
        });
    };
    let current = Epoch(row.try_get_by_index::<i64>(0)?);
    let holder: String = row.try_get_by_index(1)?;
    let expires_ms: i64 = row.try_get_by_index(2)?;
    let now_ms: i64 = row.try_get_by_index(3)?;
    if current != epoch || holder.is_empty() {
        return Err(LeaseError::Superseded {
            name: name.to_owned(),
            held: epoch,
            current: (!holder.is_empty()).then_some(current),
        });
    }
    if expires_ms <= now_ms {
        return Err(LeaseError::Expired {
            name: name.to_owned(),
            held: epoch,
        });
    }
    Ok(())
}

/// One holding of a lease, as its [`Keeper`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The epoch held.
    pub epoch: Epoch,
    /// Until when, on this process's monotonic clock, the holding lasts if it is not renewed: the lease duration
    /// counted from when the last successful renewal was sent, so it ends no later than the database's expiry.
    pub valid_until: Instant,
}

/// Keeps a lease in the background: takes it when free, renews it every third of its duration, and reports each
/// change on a watch channel (`Some` while held, `None` once lost or never taken).
///
/// Dropping the keeper stops renewing without releasing, as a crash would: the lease expires on its own. Call
/// [`Keeper::release`] to hand it over at once.
#[derive(Debug)]
pub struct Keeper {
    lease: Lease,
    db: DatabaseConnection,
    state: watch::Receiver<Option<Held>>,
    task: Background,
}

impl Keeper {
    /// Returns a receiver of the keeper's view of the lease, to wait for it or to notice its loss.
    pub fn watch(&self) -> watch::Receiver<Option<Held>> {
        self.state.clone()
    }

    /// Returns the epoch held now, if the last renewal is still valid.
    pub fn current(&self) -> Option<Epoch> {
        let held = (*self.state.borrow())?;
        (Instant::now() < held.valid_until).then_some(held.epoch)
    }

    /// Waits for the next tick of a loop that works only while this replica holds the lease: `interval` after the
    /// last, or sooner when `wake` is notified; a tick at which the lease is not held is passed over. Returns the
    /// epoch held at the tick, for the tick's writes to [`check`].
    pub async fn tick(&self, wake: &tokio::sync::Notify, interval: Duration) -> Epoch {
        loop {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
            if let Some(epoch) = self.current() {
                return epoch;
            }
        }
    }

    /// Stops renewing and releases the lease, so another replica can take it at once.
    ///
    /// # Errors
    /// Returns [`LeaseError::Database`] when the release fails; the lease then expires on its own.
    pub async fn release(self) -> Result<bool, LeaseError> {
        drop(self.task);
        self.lease.release(&self.db).await
    }
}

/// The keeper's loop: one attempt every third of the duration, reporting changes on `sender`.
async fn keep(db: DatabaseConnection, lease: Lease, sender: watch::Sender<Option<Held>>) {
    let period = (lease.duration / 3).max(Duration::from_millis(1));
    let mut held: Option<Held> = None;
    let publish = |held: Option<Held>| {
        sender.send_if_modified(|state| {
            let changed = *state != held;
            *state = held;
            changed
        });
    };
    loop {
        if let Some(current) = held
            && Instant::now() >= current.valid_until
        {
            tracing::warn!(lease = %lease.name, epoch = %current.epoch, "lease expired before it could be renewed");
            held = None;
            publish(held);
        }
        let started = Instant::now();
        let attempt = lease.acquire_or_renew(&db);
        let outcome = match held {
            // A renewal that outlasts the holding must not leave this replica believing it still holds.
            Some(current) => tokio::select! {
                outcome = attempt => Some(outcome),
                () = tokio::time::sleep_until(current.valid_until) => None,
            },
            None => Some(attempt.await),
        };
        held = match outcome {
            Some(Ok(Some(epoch))) => {
                if held.is_none_or(|previous| previous.epoch != epoch) {
                    tracing::info!(lease = %lease.name, holder = %lease.holder, %epoch, "lease acquired");
                }
                Some(Held {
                    epoch,
                    valid_until: started + lease.duration,
                })
            }
            Some(Ok(None)) => {
                if let Some(previous) = held {
                    tracing::warn!(lease = %lease.name, epoch = %previous.epoch, "lease lost to another holder");
                }
                None
            }
            Some(Err(error)) => {
                tracing::warn!(lease = %lease.name, %error, "renewing the lease");
                held
            }
            None => held,
        };
        publish(held);
        let wake = match held {
            Some(current) => (started + period).min(current.valid_until),
            None => started + period,
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// Returns the migration that creates the lease table, for a service's own migrator; it runs on SQLite,
/// PostgreSQL and MySQL/MariaDB.
pub fn migration() -> Box<dyn MigrationTrait> {
    Box::new(CreateLeases)
}

/// Creates `leases`.
struct CreateLeases;

impl MigrationName for CreateLeases {
    fn name(&self) -> &str {
        "m20261203_900002_cube_kit_leases"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateLeases {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(sea_orm::sea_query::Alias::new(TABLE))
                    .col(ColumnDef::new("name").string_len(200).not_null().primary_key())
                    .col(ColumnDef::new("holder").string_len(200).not_null())
                    .col(ColumnDef::new("epoch").big_integer().not_null())
                    .col(ColumnDef::new("expires_ms").big_integer().not_null())
                    .to_owned(),
            )
            .await
    }
}

/// Returns an SQL expression for the database's clock in Unix milliseconds, as a 64-bit integer.
fn now_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        DbBackend::MySql => {
            "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000 AS SIGNED)"
        }
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// Builds a statement from SQL written with `?` placeholders, numbering them `$1`, `$2`, … for PostgreSQL.
fn statement<const N: usize>(backend: DbBackend, sql: &str, values: [Value; N]) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut numbered = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                numbered.push('$');
                numbered.push_str(&n.to_string());
            } else {
                numbered.push(c);
            }
        }
        numbered
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}
