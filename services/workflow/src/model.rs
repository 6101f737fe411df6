//! The workflow service's tables, as sea-orm entities, and the migrations that create them. Times are Unix
//! milliseconds. Templates and pipelines are kept as their protobuf encoding beside the columns lists filter and
//! order by; run and task states are columns, each attempt a row.

use sea_orm::{ConnectionTrait, DbBackend, Schema};
use sea_orm_migration::prelude::*;

/// Job templates.
pub mod template {
    use sea_orm::entity::prelude::*;

    /// A row of `job_templates`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_templates")]
    pub struct Model {
        /// The template id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Its creator's username.
        pub creator: String,
        /// `RELEASE` or `ALPHA`.
        pub version: String,
        /// Its category, `projects/{project}`, or empty.
        pub category: String,
        /// Its place in the category.
        pub display_order: i32,
        /// The `JobTemplate`, protobuf-encoded, without its registry password.
        pub spec: Vec<u8>,
        /// The registry password, sealed with the secret key; empty for none.
        pub registry_password: Vec<u8>,
        /// Bumped by every change: the etag.
        pub revision: i64,
        /// Created.
        pub created_ms: i64,
        /// Last changed.
        pub updated_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Pipelines.
pub mod pipeline {
    use sea_orm::entity::prelude::*;

    /// A row of `pipelines`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "pipelines")]
    pub struct Model {
        /// The project id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        /// The pipeline id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Its creator's username.
        pub creator: String,
        /// The `Pipeline`, protobuf-encoded.
        pub spec: Vec<u8>,
        /// The templates its tasks use, space-separated ids with spaces around (` a b `), for the delete check.
        #[sea_orm(column_type = "Text")]
        pub templates: String,
        /// Bumped by every change: the etag.
        pub revision: i64,
        /// Created.
        pub created_ms: i64,
        /// Last changed.
        pub updated_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Runs.
pub mod run {
    use sea_orm::entity::prelude::*;

    /// A row of `runs`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "runs")]
    pub struct Model {
        /// The run id (also the last part of its name).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The project id.
        pub project: String,
        /// The pipeline id.
        pub pipeline: String,
        /// `PENDING`, `QUEUED`, `RUNNING`, `SUCCEEDED`, `FAILED`, `CANCELING` or `CANCELED`.
        pub state: String,
        /// Why it is in it.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// `MANUAL` or `SCHEDULED`.
        pub trigger: String,
        /// The username it runs for.
        pub creator: String,
        /// The request id it was created with, unique in its pipeline.
        pub request_id: Option<String>,
        /// What it runs (a `Snapshot`, JSON): the pipeline, templates, placements and project settings as they
        /// were when it was created.
        #[sea_orm(column_type = "Text")]
        pub snapshot: String,
        /// Whether it holds admissions (its own, its tasks') not yet released: set when the run is admitted,
        /// cleared once everything it held is released after it ended.
        pub admitted: bool,
        /// Bumped by every change of the run or its tasks, for watchers.
        pub revision: i64,
        /// Created.
        pub created_ms: i64,
        /// Its first task started.
        pub started_ms: Option<i64>,
        /// Finished.
        pub ended_ms: Option<i64>,
        /// For a scheduled run: the fire time it runs for (`execution_date`).
        pub fire_ms: Option<i64>,
        /// For a scheduled run: the id of its schedule (of the same pipeline).
        pub schedule: Option<String>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The tasks of runs.
pub mod task {
    use sea_orm::entity::prelude::*;

    /// A row of `run_tasks`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "run_tasks")]
    pub struct Model {
        /// The run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run: String,
        /// The task's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// Its place in the pipeline's list.
        pub position: i32,
        /// Its state, as the run's.
        pub state: String,
        /// Why it is in it.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// Retries used since it was last (re)started: attempts that failed for the task's own reasons.
        pub retries: i32,
        /// When it waits for a retry, when that may start.
        pub next_attempt_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The attempts of tasks: each recorded before its workload is applied.
pub mod attempt {
    use sea_orm::entity::prelude::*;

    /// A row of `task_attempts`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "task_attempts")]
    pub struct Model {
        /// The run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run: String,
        /// The task's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub task: String,
        /// Its number, from 1.
        #[sea_orm(primary_key, auto_increment = false)]
        pub number: i32,
        /// `PENDING`, `RUNNING`, `SUCCEEDED`, `FAILED` or `CANCELED`.
        pub state: String,
        /// Whether its workload was applied (false only between its recording and its first apply).
        pub applied: bool,
        /// The workload's name (its cluster and namespace are its task's placement's).
        pub workload: String,
        /// The node it ran on.
        pub node: String,
        /// Started.
        pub started_ms: Option<i64>,
        /// Ended.
        pub ended_ms: Option<i64>,
        /// The main container's exit code.
        pub exit_code: Option<i32>,
        /// Why it ended as it did.
        pub reason: String,
        /// The message with the reason.
        #[sea_orm(column_type = "Text")]
        pub message: String,
        /// Whether it failed for a reason outside the task.
        pub infrastructure: bool,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Cron schedules of pipelines.
pub mod schedule {
    use sea_orm::entity::prelude::*;

    /// A row of `schedules`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "schedules")]
    pub struct Model {
        /// The project id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        /// The pipeline id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub pipeline: String,
        /// The schedule id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Its creator's username (its runs run for them).
        pub creator: String,
        /// Whether it fires.
        pub enabled: bool,
        /// The `Schedule`, protobuf-encoded, without its output fields.
        pub spec: Vec<u8>,
        /// The fire time the next tick looks after: the last fire made or passed over, or, before any, when the
        /// schedule was created or enabled.
        pub since_ms: i64,
        /// The latest fire made.
        pub last_fire_ms: Option<i64>,
        /// Why the firer could not make its latest fire (the project deleted, its creator no longer allowed),
        /// empty when it could.
        #[sea_orm(column_type = "Text")]
        pub blocked_reason: String,
        /// The latest backfill's window start (inclusive).
        pub backfill_start_ms: Option<i64>,
        /// The latest backfill's window end (inclusive).
        pub backfill_end_ms: Option<i64>,
        /// Whether fires of the backfill's window may still lack runs.
        pub backfill_pending: bool,
        /// Bumped by every change: the etag.
        pub revision: i64,
        /// Created.
        pub created_ms: i64,
        /// Last changed.
        pub updated_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The fire ledger: one row per fire of a schedule, whatever the replicas, restarts or clock steps.
pub mod fire {
    use sea_orm::entity::prelude::*;

    /// A row of `schedule_fires`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "schedule_fires")]
    pub struct Model {
        /// The project id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        /// The pipeline id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub pipeline: String,
        /// The schedule id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub schedule: String,
        /// The fire time.
        #[sea_orm(primary_key, auto_increment = false)]
        pub fire_ms: i64,
        /// The run it made.
        pub run: String,
        /// Whether a backfill made it.
        pub backfill: bool,
        /// When it was made.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The highest usage of each successful task of a run, read from Prometheus, for resource tuning.
pub mod usage {
    use sea_orm::entity::prelude::*;

    /// A row of `task_usage`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "task_usage")]
    pub struct Model {
        /// The run id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub run: String,
        /// The task's name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub task: String,
        /// The project id.
        pub project: String,
        /// The pipeline id.
        pub pipeline: String,
        /// The highest CPU its pod used, millicores; `None` when Prometheus had no samples of it.
        pub cpu_millis: Option<i64>,
        /// The highest memory its pod used, bytes; `None` when Prometheus had no samples of it.
        pub memory_bytes: Option<i64>,
        /// When its successful attempt ended.
        pub ended_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The workflow service's migrations.
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTables),
            cube_kit::outbox::migration(),
            cube_kit::lease::migration(),
            Box::new(CreateSchedules),
            Box::new(AddBackfills),
            Box::new(CreateTaskUsage),
        ]
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261204_000001_create_workflow_tables"
    }
}

/// Creates `entity`'s table, its columns `large` (name and MySQL type) big enough for a 1,000-task pipeline on
/// MySQL, whose `blob` and `text` stop at 64 KiB.
async fn create(
    manager: &SchemaManager<'_>,
    entity: impl sea_orm::EntityTrait,
    large: &[(&str, &str)],
) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let connection = manager.get_connection();
    connection
        .execute(&Schema::new(backend).create_table_from_entity(entity))
        .await?;
    if backend == DbBackend::MySql {
        for (column, kind) in large {
            connection
                .execute_unprepared(&format!(
                    "ALTER TABLE {} MODIFY {column} {kind} NOT NULL",
                    entity.table_name()
                ))
                .await?;
        }
    }
    Ok(())
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        create(manager, template::Entity, &[("spec", "LONGBLOB")]).await?;
        create(manager, pipeline::Entity, &[("spec", "LONGBLOB")]).await?;
        create(manager, run::Entity, &[("snapshot", "LONGTEXT")]).await?;
        create(manager, task::Entity, &[]).await?;
        create(manager, attempt::Entity, &[]).await?;
        let index = |name: &str, table: &str, columns: &[&str], unique: bool| {
            let mut index = Index::create();
            index.name(name).table(Alias::new(table));
            for column in columns {
                index.col(Alias::new(*column));
            }
            if unique {
                index.unique();
            }
            index.to_owned()
        };
        for statement in [
            // ListRuns' keyset orders: a project's runs, and a pipeline's, newest first.
            index("idx_runs_project", "runs", &["project", "created_ms", "id"], false),
            index(
                "idx_runs_pipeline",
                "runs",
                &["project", "pipeline", "created_ms", "id"],
                false,
            ),
            // The engine's list of live runs.
            index("idx_runs_state", "runs", &["state"], false),
            index("idx_runs_request", "runs", &["project", "pipeline", "request_id"], true),
        ] {
            manager.create_index(statement).await?;
        }
        Ok(())
    }
}

struct CreateSchedules;

impl MigrationName for CreateSchedules {
    fn name(&self) -> &str {
        "m20261205_000001_create_schedules"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateSchedules {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        create(manager, schedule::Entity, &[]).await?;
        create(manager, fire::Entity, &[]).await?;
        // Runs carry the fire time of the schedule that made them: a database made before has `runs` without
        // the columns (a fresh one has them from the entity). One column per statement: SQLite alters one thing
        // at a time.
        for (name, column) in [
            (
                "fire_ms",
                ColumnDef::new(Alias::new("fire_ms")).big_integer().null().to_owned(),
            ),
            (
                "schedule",
                ColumnDef::new(Alias::new("schedule")).string().null().to_owned(),
            ),
        ] {
            if manager.has_column("runs", name).await? {
                continue;
            }
            manager
                .alter_table(Table::alter().table(Alias::new("runs")).add_column(column).to_owned())
                .await?;
        }
        // The firer's list of enabled schedules.
        manager
            .create_index(
                Index::create()
                    .name("idx_schedules_enabled")
                    .table(Alias::new("schedules"))
                    .col(Alias::new("enabled"))
                    .to_owned(),
            )
            .await
    }
}

struct AddBackfills;

impl MigrationName for AddBackfills {
    fn name(&self) -> &str {
        "m20261206_000001_add_schedule_backfills"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddBackfills {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // A database made before has `schedules` without them (a fresh one has them from the entity).
        for (name, column) in [
            (
                "backfill_start_ms",
                ColumnDef::new(Alias::new("backfill_start_ms"))
                    .big_integer()
                    .null()
                    .to_owned(),
            ),
            (
                "backfill_end_ms",
                ColumnDef::new(Alias::new("backfill_end_ms"))
                    .big_integer()
                    .null()
                    .to_owned(),
            ),
            (
                "backfill_pending",
                ColumnDef::new(Alias::new("backfill_pending"))
                    .boolean()
                    .not_null()
                    .default(false)
                    .to_owned(),
            ),
        ] {
            if manager.has_column("schedules", name).await? {
                continue;
            }
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new("schedules"))
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

struct CreateTaskUsage;

impl MigrationName for CreateTaskUsage {
    fn name(&self) -> &str {
        "m20261206_000002_create_task_usage"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateTaskUsage {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        create(manager, usage::Entity, &[]).await?;
        // A task's newest samples.
        manager
            .create_index(
                Index::create()
                    .name("idx_task_usage_task")
                    .table(Alias::new("task_usage"))
                    .col(Alias::new("project"))
                    .col(Alias::new("pipeline"))
                    .col(Alias::new("task"))
                    .col(Alias::new("ended_ms"))
                    .to_owned(),
            )
            .await
    }
}
