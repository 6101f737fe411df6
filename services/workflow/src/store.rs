//! The workflow service's one store: every SQL statement it runs, returning domain values. Changes of runs go
//! through the run's `revision`: a write names the revision it read and fails (`Aborted`) when another write
//! came first, so the engine and the handlers never overwrite each other's changes.

use std::collections::HashMap;

use cube_kit::ApiError;
use cube_kit::lease::{self, Epoch};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::sea_query::{Expr, ExprTrait as _, OnConflict, Query, SimpleExpr};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait as _, PaginatorTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _, TransactionTrait as _,
};

use crate::firing::{Previous, Surroundings};
use crate::model::{attempt, fire, pipeline, run, schedule, task, template, usage};
use crate::progress::{Attempt, RunProgress, State};

/// The lease whose holder drives runs.
pub(crate) const ENGINE_LEASE: &str = "workflow-engine";
/// The lease whose holder makes schedules' fires.
pub(crate) const SCHEDULES_LEASE: &str = "workflow-schedules";
/// The lease whose holder samples tasks' usage.
pub(crate) const USAGE_LEASE: &str = "workflow-usage";

/// A database failure, as an API error whose detail stays in the logs.
pub(crate) fn db_error(error: sea_orm::DbErr) -> ApiError {
    ApiError::internal(error)
}

/// The workflow service's store.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: DatabaseConnection,
}

/// The live run states, as stored.
const LIVE: [State; 4] = [State::Pending, State::Queued, State::Running, State::Canceling];

fn live_states() -> Vec<&'static str> {
    LIVE.iter().map(|state| state.as_str()).collect()
}

/// A page of runs: which, and where the page starts.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunQuery {
    /// The project id.
    pub(crate) project: String,
    /// The pipeline id, or `None` for every pipeline of the project.
    pub(crate) pipeline: Option<String>,
    /// Only runs in this state.
    pub(crate) state: Option<String>,
    /// Only runs of this user.
    pub(crate) creator: Option<String>,
    /// Only runs of this trigger.
    pub(crate) trigger: Option<String>,
    /// Only runs created at or after this, ms.
    pub(crate) created_from: Option<i64>,
    /// Only runs created before this, ms.
    pub(crate) created_before: Option<i64>,
    /// The last run of the previous page: (created, id).
    pub(crate) after: Option<(i64, String)>,
    /// How many, one more than the page size.
    pub(crate) limit: u64,
}

/// The reason stored on a run that waits for its project's quota (the run passed its schedule's policy).
pub(crate) const WAITING_FOR_QUOTA: &str = "waiting for quota: ";

/// The runs schedule `schedule` of `project`'s `pipeline` made: those of its fire ledger. The ledger goes with the
/// schedule, so one made again under a deleted one's id sees only its own runs, never the old one's.
fn made_by(project: &str, pipeline: &str, schedule: &str) -> SimpleExpr {
    run::Column::Id.in_subquery(
        Query::select()
            .column(fire::Column::Run)
            .from(fire::Entity)
            .and_where(fire::Column::Project.eq(project))
            .and_where(fire::Column::Pipeline.eq(pipeline))
            .and_where(fire::Column::Schedule.eq(schedule))
            .to_owned(),
    )
}

/// A fire to record: its schedule, its time, whether a backfill makes it, and the run it makes.
#[derive(Debug, Clone)]
pub(crate) struct NewFire {
    /// The schedule.
    pub(crate) schedule: schedule::Model,
    /// The fire time.
    pub(crate) fire_ms: i64,
    /// Whether a backfill makes it.
    pub(crate) backfill: bool,
    /// The run, with `fire_ms` and `schedule` set.
    pub(crate) run: run::Model,
    /// The run's tasks.
    pub(crate) tasks: Vec<task::Model>,
}

/// How far a schedule's backfill got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BackfillCount {
    /// Fires of the window with a run.
    pub(crate) runs: i64,
    /// Of those, runs ended.
    pub(crate) ended: i64,
    /// Of those, runs failed or canceled.
    pub(crate) failed: i64,
}

/// A successful task whose usage is not sampled yet.
#[derive(Debug, Clone)]
pub(crate) struct Unsampled {
    /// Its run.
    pub(crate) run: run::Model,
    /// Its successful attempt.
    pub(crate) attempt: attempt::Model,
}

/// A run's row with its tasks and attempts.
#[derive(Debug, Clone)]
pub(crate) struct RunRecord {
    /// The run.
    pub(crate) run: run::Model,
    /// Its tasks, in order.
    pub(crate) tasks: Vec<task::Model>,
    /// Its attempts by task, oldest first.
    pub(crate) attempts: HashMap<String, Vec<attempt::Model>>,
}

impl Store {
    /// The store on `db`.
    pub(crate) fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    // Templates.

    /// Stores a new template; `AlreadyExists` when its id is taken.
    pub(crate) async fn insert_template(&self, row: template::Model) -> Result<(), ApiError> {
        let id = row.id.clone();
        let result = template::Entity::insert(template::ActiveModel::from(row))
            .on_conflict(OnConflict::column(template::Column::Id).do_nothing().to_owned())
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        if result == 0 {
            return Err(ApiError::AlreadyExists {
                kind: "job template",
                name: format!("jobTemplates/{id}"),
            });
        }
        Ok(())
    }

    /// The template `id`.
    pub(crate) async fn template(&self, id: &str) -> Result<Option<template::Model>, ApiError> {
        template::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// The templates of `ids`, by id.
    pub(crate) async fn templates(&self, ids: &[String]) -> Result<HashMap<String, template::Model>, ApiError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(template::Entity::find()
            .filter(template::Column::Id.is_in(ids.iter().cloned()))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|row| (row.id.clone(), row))
            .collect())
    }

    /// A page of templates visible to `viewer` (`None`: every template), in (category, order, id) order, after
    /// `after`.
    pub(crate) async fn list_templates(
        &self,
        viewer: Option<&str>,
        filters: &[(template::Column, String)],
        after: Option<(String, i32, String)>,
        limit: u64,
    ) -> Result<Vec<template::Model>, ApiError> {
        let mut query = template::Entity::find();
        if let Some(viewer) = viewer {
            query = query.filter(
                Condition::any()
                    .add(template::Column::Version.eq("RELEASE"))
                    .add(template::Column::Creator.eq(viewer)),
            );
        }
        for (column, value) in filters {
            query = query.filter(column.eq(value.clone()));
        }
        if let Some((category, order, id)) = after {
            query = query.filter(
                Condition::any()
                    .add(template::Column::Category.gt(category.clone()))
                    .add(
                        Condition::all()
                            .add(template::Column::Category.eq(category.clone()))
                            .add(template::Column::DisplayOrder.gt(order)),
                    )
                    .add(
                        Condition::all()
                            .add(template::Column::Category.eq(category))
                            .add(template::Column::DisplayOrder.eq(order))
                            .add(template::Column::Id.gt(id)),
                    ),
            );
        }
        query
            .order_by_asc(template::Column::Category)
            .order_by_asc(template::Column::DisplayOrder)
            .order_by_asc(template::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Replaces a template read at `revision`; `Aborted` when it changed since.
    pub(crate) async fn update_template(&self, row: template::Model, revision: i64) -> Result<(), ApiError> {
        let id = row.id.clone();
        let result = template::Entity::update_many()
            .set(template::ActiveModel {
                id: NotSet,
                creator: NotSet,
                created_ms: NotSet,
                // Every other column is written (`from` alone marks them unchanged, and nothing would be).
                ..template::ActiveModel::from(row).reset_all()
            })
            .filter(template::Column::Id.eq(id.clone()))
            .filter(template::Column::Revision.eq(revision))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("job template", &format!("jobTemplates/{id}")));
        }
        Ok(())
    }

    /// Deletes template `id` read at `revision`, unless a pipeline uses it.
    pub(crate) async fn delete_template(&self, id: &str, revision: i64) -> Result<(), ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let user = pipeline::Entity::find()
            .filter(pipeline::Column::Templates.contains(format!(" {id} ")))
            .one(&txn)
            .await
            .map_err(db_error)?;
        if let Some(user) = user {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "job template jobTemplates/{id} is used by pipeline projects/{}/pipelines/{}",
                    user.project, user.id
                ),
            });
        }
        let result = template::Entity::delete_many()
            .filter(template::Column::Id.eq(id))
            .filter(template::Column::Revision.eq(revision))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("job template", &format!("jobTemplates/{id}")));
        }
        txn.commit().await.map_err(db_error)
    }

    // Pipelines.

    /// Stores a new pipeline; `AlreadyExists` when its id is taken in its project.
    pub(crate) async fn insert_pipeline(&self, row: pipeline::Model) -> Result<(), ApiError> {
        let name = format!("projects/{}/pipelines/{}", row.project, row.id);
        let result = pipeline::Entity::insert(pipeline::ActiveModel::from(row))
            .on_conflict(
                OnConflict::columns([pipeline::Column::Project, pipeline::Column::Id])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        if result == 0 {
            return Err(ApiError::AlreadyExists { kind: "pipeline", name });
        }
        Ok(())
    }

    /// Pipeline `id` of `project`.
    pub(crate) async fn pipeline(&self, project: &str, id: &str) -> Result<Option<pipeline::Model>, ApiError> {
        pipeline::Entity::find_by_id((project.to_owned(), id.to_owned()))
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// A page of `project`'s pipelines after `after`, by id.
    pub(crate) async fn list_pipelines(
        &self,
        project: &str,
        creator: Option<&str>,
        after: Option<String>,
        limit: u64,
    ) -> Result<Vec<pipeline::Model>, ApiError> {
        let mut query = pipeline::Entity::find().filter(pipeline::Column::Project.eq(project));
        if let Some(creator) = creator {
            query = query.filter(pipeline::Column::Creator.eq(creator));
        }
        if let Some(after) = after {
            query = query.filter(pipeline::Column::Id.gt(after));
        }
        query
            .order_by_asc(pipeline::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Replaces a pipeline read at `revision`; `Aborted` when it changed since.
    pub(crate) async fn update_pipeline(&self, row: pipeline::Model, revision: i64) -> Result<(), ApiError> {
        write_pipeline(&self.db, row, revision).await
    }

    /// Deletes a pipeline read at `revision`, unless one of its runs is live.
    pub(crate) async fn delete_pipeline(&self, project: &str, id: &str, revision: i64) -> Result<(), ApiError> {
        let name = format!("projects/{project}/pipelines/{id}");
        let txn = self.db.begin().await.map_err(db_error)?;
        let live = run::Entity::find()
            .filter(run::Column::Project.eq(project))
            .filter(run::Column::Pipeline.eq(id))
            .filter(run::Column::State.is_in(live_states()))
            .one(&txn)
            .await
            .map_err(db_error)?;
        if let Some(live) = live {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "pipeline {name} has a live run, {name}/runs/{}; cancel it first",
                    live.id
                ),
            });
        }
        let result = pipeline::Entity::delete_many()
            .filter(pipeline::Column::Project.eq(project))
            .filter(pipeline::Column::Id.eq(id))
            .filter(pipeline::Column::Revision.eq(revision))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("pipeline", &name));
        }
        // Its schedules and their fires go with it.
        schedule::Entity::delete_many()
            .filter(schedule::Column::Project.eq(project))
            .filter(schedule::Column::Pipeline.eq(id))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        fire::Entity::delete_many()
            .filter(fire::Column::Project.eq(project))
            .filter(fire::Column::Pipeline.eq(id))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)
    }

    // Schedules.

    /// Stores a new schedule; `AlreadyExists` when its id is taken in its pipeline.
    pub(crate) async fn insert_schedule(&self, row: schedule::Model) -> Result<(), ApiError> {
        let name = format!(
            "projects/{}/pipelines/{}/schedules/{}",
            row.project, row.pipeline, row.id
        );
        let result = schedule::Entity::insert(schedule::ActiveModel::from(row))
            .on_conflict(
                OnConflict::columns([
                    schedule::Column::Project,
                    schedule::Column::Pipeline,
                    schedule::Column::Id,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        if result == 0 {
            return Err(ApiError::AlreadyExists { kind: "schedule", name });
        }
        Ok(())
    }

    /// Schedule `id` of `project`'s `pipeline`.
    pub(crate) async fn schedule(
        &self,
        project: &str,
        pipeline: &str,
        id: &str,
    ) -> Result<Option<schedule::Model>, ApiError> {
        schedule::Entity::find_by_id((project.to_owned(), pipeline.to_owned(), id.to_owned()))
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// A page of `project`'s schedules (of `pipeline`, or of every pipeline), after `after` (pipeline, id).
    pub(crate) async fn list_schedules(
        &self,
        project: &str,
        pipeline: Option<&str>,
        after: Option<(String, String)>,
        limit: u64,
    ) -> Result<Vec<schedule::Model>, ApiError> {
        let mut query = schedule::Entity::find().filter(schedule::Column::Project.eq(project));
        if let Some(pipeline) = pipeline {
            query = query.filter(schedule::Column::Pipeline.eq(pipeline));
        }
        if let Some((pipeline, id)) = after {
            query = query.filter(
                Condition::any()
                    .add(schedule::Column::Pipeline.gt(pipeline.clone()))
                    .add(
                        Condition::all()
                            .add(schedule::Column::Pipeline.eq(pipeline))
                            .add(schedule::Column::Id.gt(id)),
                    ),
            );
        }
        query
            .order_by_asc(schedule::Column::Pipeline)
            .order_by_asc(schedule::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Replaces what a user sets of a schedule read at `revision` (the firer's columns are left alone; `since_ms`
    /// only ever moves forward); `Aborted` when it changed since.
    pub(crate) async fn update_schedule(&self, row: schedule::Model, revision: i64) -> Result<(), ApiError> {
        let name = format!(
            "projects/{}/pipelines/{}/schedules/{}",
            row.project, row.pipeline, row.id
        );
        let (project, pipeline, id, since) = (row.project.clone(), row.pipeline.clone(), row.id.clone(), row.since_ms);
        let result = schedule::Entity::update_many()
            .set(schedule::ActiveModel {
                project: NotSet,
                pipeline: NotSet,
                id: NotSet,
                creator: NotSet,
                created_ms: NotSet,
                since_ms: NotSet,
                last_fire_ms: NotSet,
                blocked_reason: NotSet,
                backfill_start_ms: NotSet,
                backfill_end_ms: NotSet,
                backfill_pending: NotSet,
                // Every other column is written (`from` alone marks them unchanged, and nothing would be).
                ..schedule::ActiveModel::from(row).reset_all()
            })
            .col_expr(schedule::Column::SinceMs, forward(since))
            .filter(schedule::Column::Project.eq(project))
            .filter(schedule::Column::Pipeline.eq(pipeline))
            .filter(schedule::Column::Id.eq(id))
            .filter(schedule::Column::Revision.eq(revision))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("schedule", &name));
        }
        Ok(())
    }

    /// Deletes a schedule read at `revision`; `Aborted` when it changed since.
    pub(crate) async fn delete_schedule(&self, row: &schedule::Model) -> Result<(), ApiError> {
        let name = format!(
            "projects/{}/pipelines/{}/schedules/{}",
            row.project, row.pipeline, row.id
        );
        let txn = self.db.begin().await.map_err(db_error)?;
        let result = schedule::Entity::delete_many()
            .filter(schedule::Column::Project.eq(row.project.clone()))
            .filter(schedule::Column::Pipeline.eq(row.pipeline.clone()))
            .filter(schedule::Column::Id.eq(row.id.clone()))
            .filter(schedule::Column::Revision.eq(row.revision))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("schedule", &name));
        }
        // Its fires go with it: a schedule made again under its id fires afresh.
        fire::Entity::delete_many()
            .filter(fire::Column::Project.eq(row.project.clone()))
            .filter(fire::Column::Pipeline.eq(row.pipeline.clone()))
            .filter(fire::Column::Schedule.eq(row.id.clone()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)
    }

    // Fires.

    /// The schedules the firer looks at: the enabled ones and those with a backfill to make.
    pub(crate) async fn schedules_to_fire(&self) -> Result<Vec<schedule::Model>, ApiError> {
        schedule::Entity::find()
            .filter(
                Condition::any()
                    .add(schedule::Column::Enabled.eq(true))
                    .add(schedule::Column::BackfillPending.eq(true)),
            )
            .order_by_asc(schedule::Column::Project)
            .order_by_asc(schedule::Column::Pipeline)
            .order_by_asc(schedule::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Records a fire and its run, fenced by the schedules lease held at `epoch`, and cancels the schedule's
    /// older live runs beyond its newest `keep_newest`. Returns `false`, writing nothing, when the fire has a run
    /// already.
    pub(crate) async fn record_fire(&self, epoch: Epoch, fire: NewFire, keep_newest: usize) -> Result<bool, ApiError> {
        let NewFire {
            schedule,
            fire_ms,
            backfill,
            run,
            tasks,
        } = fire;
        let txn = self.db.begin().await.map_err(db_error)?;
        lease::check(&txn, SCHEDULES_LEASE, epoch)
            .await
            .map_err(|error| ApiError::Aborted {
                message: error.to_string(),
            })?;
        let inserted = fire::Entity::insert(fire::ActiveModel::from(fire::Model {
            project: schedule.project.clone(),
            pipeline: schedule.pipeline.clone(),
            schedule: schedule.id.clone(),
            fire_ms,
            run: run.id.clone(),
            backfill,
            created_ms: run.created_ms,
        }))
        .on_conflict(
            OnConflict::columns([
                fire::Column::Project,
                fire::Column::Pipeline,
                fire::Column::Schedule,
                fire::Column::FireMs,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await
        .map_err(db_error)?;
        if inserted == 0 {
            return Ok(false);
        }
        let id = run.id.clone();
        run::Entity::insert(run::ActiveModel::from(run))
            .exec_without_returning(&txn)
            .await
            .map_err(db_error)?;
        if !tasks.is_empty() {
            task::Entity::insert_many(tasks.into_iter().map(task::ActiveModel::from))
                .exec_without_returning(&txn)
                .await
                .map_err(db_error)?;
        }
        if keep_newest > 0 {
            let live: Vec<(String, Option<i64>)> = run::Entity::find()
                .select_only()
                .column(run::Column::Id)
                .column(run::Column::FireMs)
                .filter(made_by(&schedule.project, &schedule.pipeline, &schedule.id))
                .filter(run::Column::State.is_in([State::Pending, State::Queued, State::Running].map(State::as_str)))
                .into_tuple()
                .all(&txn)
                .await
                .map_err(db_error)?;
            let live: Vec<(String, i64)> = live.into_iter().map(|(id, fire)| (id, fire.unwrap_or(0))).collect();
            let old = crate::firing::superseded(keep_newest, &live);
            if !old.is_empty() {
                run::Entity::update_many()
                    .col_expr(run::Column::State, Expr::value(State::Canceling.as_str()))
                    .col_expr(
                        run::Column::Reason,
                        Expr::value(format!(
                            "canceled by the scheduled run {id}: the schedule keeps its newest {keep_newest} runs"
                        )),
                    )
                    .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
                    .filter(run::Column::Id.is_in(old))
                    // One that ended meanwhile stays as it ended.
                    .filter(
                        run::Column::State.is_in([State::Pending, State::Queued, State::Running].map(State::as_str)),
                    )
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
            }
        }
        if !backfill {
            schedule::Entity::update_many()
                .col_expr(schedule::Column::LastFireMs, Expr::value(fire_ms))
                .col_expr(schedule::Column::BlockedReason, Expr::value(""))
                .filter(schedule_key(&schedule))
                .filter(
                    Condition::any()
                        .add(schedule::Column::LastFireMs.is_null())
                        .add(schedule::Column::LastFireMs.lt(fire_ms)),
                )
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// Records that a schedule's fires up to `since_ms` are decided (never moving back), and why its latest
    /// fire could not be made (`None`: leave the reason as it is).
    pub(crate) async fn pass_schedule(
        &self,
        row: &schedule::Model,
        since_ms: i64,
        blocked: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut update = schedule::Entity::update_many()
            .col_expr(schedule::Column::SinceMs, forward(since_ms))
            .filter(schedule_key(row));
        if let Some(reason) = blocked {
            update = update.col_expr(schedule::Column::BlockedReason, Expr::value(truncate(reason, 2000)));
        }
        update.exec(&self.db).await.map_err(db_error)?;
        Ok(())
    }

    /// The fire times of a schedule in `[from_ms, to_ms]` that have a run.
    pub(crate) async fn fired(&self, row: &schedule::Model, from_ms: i64, to_ms: i64) -> Result<Vec<i64>, ApiError> {
        fire::Entity::find()
            .select_only()
            .column(fire::Column::FireMs)
            .filter(fire::Column::Project.eq(row.project.clone()))
            .filter(fire::Column::Pipeline.eq(row.pipeline.clone()))
            .filter(fire::Column::Schedule.eq(row.id.clone()))
            .filter(fire::Column::FireMs.between(from_ms, to_ms))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Sets a schedule's backfill window, pending, without changing its revision (a backfill is not an edit).
    pub(crate) async fn start_backfill(&self, row: &schedule::Model, from_ms: i64, to_ms: i64) -> Result<(), ApiError> {
        schedule::Entity::update_many()
            .col_expr(schedule::Column::BackfillStartMs, Expr::value(from_ms))
            .col_expr(schedule::Column::BackfillEndMs, Expr::value(to_ms))
            .col_expr(schedule::Column::BackfillPending, Expr::value(true))
            .filter(schedule_key(row))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Records that the backfill of `from_ms..=to_ms` has made every fire (unless a newer backfill replaced it).
    pub(crate) async fn end_backfill(&self, row: &schedule::Model, from_ms: i64, to_ms: i64) -> Result<(), ApiError> {
        schedule::Entity::update_many()
            .col_expr(schedule::Column::BackfillPending, Expr::value(false))
            .filter(schedule_key(row))
            .filter(schedule::Column::BackfillStartMs.eq(from_ms))
            .filter(schedule::Column::BackfillEndMs.eq(to_ms))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// How far the runs of a schedule's fires in `[from_ms, to_ms]` got.
    pub(crate) async fn backfill_count(
        &self,
        row: &schedule::Model,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<BackfillCount, ApiError> {
        let states: Vec<String> = run::Entity::find()
            .select_only()
            .column(run::Column::State)
            .filter(made_by(&row.project, &row.pipeline, &row.id))
            .filter(run::Column::FireMs.between(from_ms, to_ms))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut count = BackfillCount::default();
        for state in states.iter().filter_map(|state| State::parse(state)) {
            count.runs += 1;
            if state.is_final() {
                count.ended += 1;
            }
            if matches!(state, State::Failed | State::Canceled) {
                count.failed += 1;
            }
        }
        Ok(count)
    }

    /// Why a schedule's oldest waiting run waits, if one does.
    pub(crate) async fn waiting_reason(&self, row: &schedule::Model) -> Result<Option<String>, ApiError> {
        run::Entity::find()
            .select_only()
            .column(run::Column::Reason)
            .filter(made_by(&row.project, &row.pipeline, &row.id))
            .filter(run::Column::State.eq(State::Queued.as_str()))
            .order_by_asc(run::Column::FireMs)
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// What a scheduled run depends on: the pipeline's other manual and scheduled runs going (a
    /// scheduled run counts once it passed its schedule's policy), and the schedule's previous run.
    pub(crate) async fn surroundings(&self, run: &run::Model) -> Result<Surroundings, ApiError> {
        let others = Condition::all()
            .add(run::Column::Project.eq(run.project.clone()))
            .add(run::Column::Pipeline.eq(run.pipeline.clone()))
            .add(run::Column::Trigger.is_in(["MANUAL", "SCHEDULED"]))
            .add(run::Column::Id.ne(run.id.clone()));
        let held_by_policy = Condition::all()
            .add(run::Column::Schedule.is_not_null())
            .add(run::Column::Admitted.eq(false))
            .add(run::Column::Reason.not_like(format!("{WAITING_FOR_QUOTA}%")));
        let active_runs = run::Entity::find()
            .filter(others)
            .filter(run::Column::State.is_in(live_states()))
            .filter(held_by_policy.not())
            .count(&self.db)
            .await
            .map_err(db_error)?;
        let previous = match (&run.schedule, run.fire_ms) {
            (Some(schedule), Some(fire_ms)) => run::Entity::find()
                .filter(made_by(&run.project, &run.pipeline, schedule))
                .filter(run::Column::FireMs.lt(fire_ms))
                .order_by_desc(run::Column::FireMs)
                .one(&self.db)
                .await
                .map_err(db_error)?
                .map(|row| Previous {
                    name: format!("projects/{}/pipelines/{}/runs/{}", row.project, row.pipeline, row.id),
                    state: State::parse(&row.state).unwrap_or(State::Pending),
                }),
            _ => None,
        };
        Ok(Surroundings {
            active_runs: usize::try_from(active_runs).unwrap_or(usize::MAX),
            previous,
        })
    }

    /// Holds a run read at `revision` back (`QUEUED`) for `reason`. Returns `false`, writing nothing, when the
    /// run changed since.
    pub(crate) async fn hold_run(&self, id: &str, revision: i64, reason: &str) -> Result<bool, ApiError> {
        let result = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(State::Queued.as_str()))
            .col_expr(run::Column::Reason, Expr::value(truncate(reason, 2000)))
            .col_expr(run::Column::Revision, Expr::value(revision + 1))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Revision.eq(revision))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(result.rows_affected == 1)
    }

    /// Marks a run read at `revision` that failed or was canceled as skipped, for `reason`; `Aborted` when it
    /// changed since.
    pub(crate) async fn skip_run(&self, id: &str, revision: i64, reason: &str) -> Result<(), ApiError> {
        let result = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(State::Skipped.as_str()))
            .col_expr(run::Column::Reason, Expr::value(truncate(reason, 2000)))
            .col_expr(run::Column::Revision, Expr::value(revision + 1))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Revision.eq(revision))
            .filter(run::Column::State.is_in([State::Failed, State::Canceled].map(State::as_str)))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("run", id));
        }
        Ok(())
    }

    // Usage.

    /// Up to `limit` successful attempts of pipeline runs (manual or scheduled) that ended in
    /// `(from_ms, until_ms)` and whose usage is not sampled yet, oldest first, with their runs.
    pub(crate) async fn unsampled(&self, from_ms: i64, until_ms: i64, limit: u64) -> Result<Vec<Unsampled>, ApiError> {
        use sea_orm::sea_query::Query;
        let sampled = Query::select()
            .expr(Expr::val(1))
            .from(usage::Entity)
            .and_where(Expr::col((usage::Entity, usage::Column::Run)).equals((attempt::Entity, attempt::Column::Run)))
            .and_where(Expr::col((usage::Entity, usage::Column::Task)).equals((attempt::Entity, attempt::Column::Task)))
            .to_owned();
        let attempts = attempt::Entity::find()
            .filter(attempt::Column::State.eq(State::Succeeded.as_str()))
            .filter(attempt::Column::EndedMs.gt(from_ms))
            .filter(attempt::Column::EndedMs.lt(until_ms))
            .filter(Expr::exists(sampled).not())
            .order_by_asc(attempt::Column::EndedMs)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let ids: Vec<String> = attempts.iter().map(|attempt| attempt.run.clone()).collect();
        let runs: HashMap<String, run::Model> = run::Entity::find()
            .filter(run::Column::Id.is_in(ids))
            .filter(run::Column::Trigger.is_in(["MANUAL", "SCHEDULED"]))
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|run| (run.id.clone(), run))
            .collect();
        let mut found = Vec::new();
        for attempt in attempts {
            match runs.get(&attempt.run) {
                Some(run) => found.push(Unsampled {
                    run: run.clone(),
                    attempt,
                }),
                // A task's or a debug run's: never sampled, so recorded as such.
                None => {
                    self.insert_usage(usage::Model {
                        run: attempt.run.clone(),
                        task: attempt.task.clone(),
                        project: String::new(),
                        pipeline: String::new(),
                        cpu_millis: None,
                        memory_bytes: None,
                        ended_ms: attempt.ended_ms.unwrap_or(0),
                    })
                    .await?;
                }
            }
        }
        Ok(found)
    }

    /// Records a task's usage (once).
    pub(crate) async fn insert_usage(&self, row: usage::Model) -> Result<(), ApiError> {
        usage::Entity::insert(usage::ActiveModel::from(row))
            .on_conflict(
                OnConflict::columns([usage::Column::Run, usage::Column::Task])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// The newest `limit` usage samples of a pipeline's task that have both CPU and memory, after its newest `skip`,
    /// newest first.
    pub(crate) async fn usage_of(
        &self,
        project: &str,
        pipeline: &str,
        task: &str,
        skip: u64,
        limit: u64,
    ) -> Result<Vec<usage::Model>, ApiError> {
        usage::Entity::find()
            .filter(usage::Column::Project.eq(project))
            .filter(usage::Column::Pipeline.eq(pipeline))
            .filter(usage::Column::Task.eq(task))
            .filter(usage::Column::CpuMillis.is_not_null())
            .filter(usage::Column::MemoryBytes.is_not_null())
            .order_by_desc(usage::Column::EndedMs)
            .offset(skip)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Announces `event` on `topic` through the outbox, in one transaction with `tuned` (a pipeline read at a
    /// revision, with new task resources) when given; `Aborted`, announcing nothing, when the pipeline changed since.
    pub(crate) async fn announce(
        &self,
        topic: &str,
        event: &impl prost::Message,
        tuned: Option<(pipeline::Model, i64)>,
    ) -> Result<(), ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        if let Some((row, revision)) = tuned {
            write_pipeline(&txn, row, revision).await?;
        }
        cube_kit::outbox::enqueue(&txn, topic, event)
            .await
            .map_err(ApiError::internal)?;
        txn.commit().await.map_err(db_error)
    }

    // Runs.

    /// The run of `project`'s `pipeline` created with `request_id`.
    pub(crate) async fn run_by_request(
        &self,
        project: &str,
        pipeline: &str,
        request_id: &str,
    ) -> Result<Option<run::Model>, ApiError> {
        run::Entity::find()
            .filter(run::Column::Project.eq(project))
            .filter(run::Column::Pipeline.eq(pipeline))
            .filter(run::Column::RequestId.eq(request_id))
            .one(&self.db)
            .await
            .map_err(db_error)
    }

    /// Stores a new run and its tasks. A run first marks for canceling the live runs it replaces: a manual run
    /// the pipeline's earlier manual runs; a `TASK` or `DEBUG` run the earlier ones of its trigger for its task.
    /// Returns `false` when a run with its request id exists (a concurrent call won).
    pub(crate) async fn insert_run(&self, row: run::Model, tasks: Vec<task::Model>) -> Result<bool, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let replaced = match row.trigger.as_str() {
            "MANUAL" => Some(Condition::all()),
            "TASK" | "DEBUG" => tasks.first().map(|task| run_of_task(&task.name)),
            _ => None,
        };
        if let Some(condition) = replaced {
            let reason = format!("replaced by the {} run {}", row.trigger.to_lowercase(), row.id);
            run::Entity::update_many()
                .col_expr(run::Column::State, Expr::value(State::Canceling.as_str()))
                .col_expr(run::Column::Reason, Expr::value(reason))
                .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
                .filter(run::Column::Project.eq(row.project.clone()))
                .filter(run::Column::Pipeline.eq(row.pipeline.clone()))
                .filter(run::Column::Trigger.eq(row.trigger.clone()))
                .filter(run::Column::State.is_in([State::Pending, State::Queued, State::Running].map(State::as_str)))
                .filter(condition)
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        let inserted = run::Entity::insert(run::ActiveModel::from(row))
            .on_conflict(
                OnConflict::columns([run::Column::Project, run::Column::Pipeline, run::Column::RequestId])
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await
            .map_err(db_error)?;
        if inserted == 0 {
            return Ok(false);
        }
        if !tasks.is_empty() {
            task::Entity::insert_many(tasks.into_iter().map(task::ActiveModel::from))
                .exec_without_returning(&txn)
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// Run `id` with its tasks and attempts.
    pub(crate) async fn run_record(&self, id: &str) -> Result<Option<RunRecord>, ApiError> {
        record(&self.db, id).await
    }

    /// A page of runs, newest first.
    pub(crate) async fn list_runs(&self, query: &RunQuery) -> Result<Vec<run::Model>, ApiError> {
        let mut select = run::Entity::find().filter(run::Column::Project.eq(query.project.clone()));
        if let Some(pipeline) = &query.pipeline {
            select = select.filter(run::Column::Pipeline.eq(pipeline.clone()));
        }
        if let Some(state) = &query.state {
            select = select.filter(run::Column::State.eq(state.clone()));
        }
        if let Some(creator) = &query.creator {
            select = select.filter(run::Column::Creator.eq(creator.clone()));
        }
        if let Some(trigger) = &query.trigger {
            select = select.filter(run::Column::Trigger.eq(trigger.clone()));
        }
        if let Some(from) = query.created_from {
            select = select.filter(run::Column::CreatedMs.gte(from));
        }
        if let Some(before) = query.created_before {
            select = select.filter(run::Column::CreatedMs.lt(before));
        }
        if let Some((created, id)) = &query.after {
            // A row comparison, which the index on (…, created_ms, id) answers by seeking, whatever the depth.
            select = select.filter(
                Expr::tuple([Expr::col(run::Column::CreatedMs), Expr::col(run::Column::Id)])
                    .lt(Expr::tuple([Expr::value(*created), Expr::value(id.clone())])),
            );
        }
        select
            .order_by_desc(run::Column::CreatedMs)
            .order_by_desc(run::Column::Id)
            .limit(query.limit)
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// The ids of the runs the engine has work on, oldest first: the live ones, and the ended ones that still
    /// hold admissions.
    pub(crate) async fn live_runs(&self) -> Result<Vec<String>, ApiError> {
        run::Entity::find()
            .select_only()
            .column(run::Column::Id)
            .filter(
                Condition::any()
                    .add(run::Column::State.is_in(live_states()))
                    .add(run::Column::Admitted.eq(true)),
            )
            .order_by_asc(run::Column::CreatedMs)
            .into_tuple::<String>()
            .all(&self.db)
            .await
            .map_err(db_error)
    }

    /// Whether `project` has live runs, and their names.
    pub(crate) async fn live_runs_of(&self, project: &str) -> Result<Vec<String>, ApiError> {
        let rows: Vec<(String, String)> = run::Entity::find()
            .select_only()
            .column(run::Column::Pipeline)
            .column(run::Column::Id)
            .filter(run::Column::Project.eq(project))
            .filter(run::Column::State.is_in(live_states()))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(pipeline, id)| format!("projects/{project}/pipelines/{pipeline}/runs/{id}"))
            .collect())
    }

    /// Records what admission said of a run read at `revision`: admitted (it holds its admission from now on) or
    /// queued for `reason`. Returns `false`, writing nothing, when the run changed since.
    pub(crate) async fn admission_of_run(
        &self,
        id: &str,
        revision: i64,
        queued: Option<&str>,
    ) -> Result<bool, ApiError> {
        let mut update = run::Entity::update_many()
            .col_expr(run::Column::Revision, Expr::value(revision + 1))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Revision.eq(revision));
        update = match queued {
            Some(reason) => update
                .col_expr(run::Column::State, Expr::value(State::Queued.as_str()))
                .col_expr(run::Column::Reason, Expr::value(format!("{WAITING_FOR_QUOTA}{reason}"))),
            None => update.col_expr(run::Column::Admitted, Expr::value(true)),
        };
        Ok(update.exec(&self.db).await.map_err(db_error)?.rows_affected == 1)
    }

    /// Records that an ended run released everything it held.
    pub(crate) async fn released(&self, id: &str) -> Result<(), ApiError> {
        run::Entity::update_many()
            .col_expr(run::Column::Admitted, Expr::value(false))
            .filter(run::Column::Id.eq(id))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Marks a live run read at `revision` for canceling, for `reason`; `Aborted` when it changed since.
    pub(crate) async fn cancel_run(&self, id: &str, revision: i64, reason: &str) -> Result<(), ApiError> {
        let result = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(State::Canceling.as_str()))
            .col_expr(run::Column::Reason, Expr::value(truncate(reason, 2000)))
            .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Revision.eq(revision))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("run", id));
        }
        Ok(())
    }

    /// Marks for canceling the live `TASK` and `DEBUG` runs of `project`'s `pipeline` that run `task`, returning
    /// their ids.
    pub(crate) async fn clear_task(&self, project: &str, pipeline: &str, task: &str) -> Result<Vec<String>, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let ids: Vec<String> = run::Entity::find()
            .select_only()
            .column(run::Column::Id)
            .filter(run::Column::Project.eq(project))
            .filter(run::Column::Pipeline.eq(pipeline))
            .filter(run::Column::Trigger.is_in(["TASK", "DEBUG"]))
            .filter(run::Column::State.is_in([State::Pending, State::Queued, State::Running].map(State::as_str)))
            .filter(run_of_task(task))
            .order_by_asc(run::Column::Id)
            .into_tuple()
            .all(&txn)
            .await
            .map_err(db_error)?;
        if !ids.is_empty() {
            run::Entity::update_many()
                .col_expr(run::Column::State, Expr::value(State::Canceling.as_str()))
                .col_expr(
                    run::Column::Reason,
                    Expr::value(format!("cleared by ClearTask of {task}")),
                )
                .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
                .filter(run::Column::Id.is_in(ids.clone()))
                .filter(run::Column::State.is_in([State::Pending, State::Queued, State::Running].map(State::as_str)))
                .exec(&txn)
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        Ok(ids)
    }

    /// Sets the tasks `again` of a finished run read at `revision` pending again (their retries reset, their
    /// attempts kept), and the run pending.
    pub(crate) async fn retry_run(&self, id: &str, revision: i64, again: &[String]) -> Result<(), ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let result = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(State::Pending.as_str()))
            .col_expr(run::Column::Reason, Expr::value("retried"))
            .col_expr(run::Column::EndedMs, Expr::value(Option::<i64>::None))
            .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Revision.eq(revision))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Err(changed("run", id));
        }
        task::Entity::update_many()
            .col_expr(task::Column::State, Expr::value(State::Pending.as_str()))
            .col_expr(task::Column::Reason, Expr::value("retried"))
            .col_expr(task::Column::Retries, Expr::value(0))
            .col_expr(task::Column::NextAttemptMs, Expr::value(Option::<i64>::None))
            .filter(task::Column::Run.eq(id))
            .filter(task::Column::Name.is_in(again.iter().cloned()))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)
    }

    /// Writes what the engine decided for a run it read as `before` (at revision `revision`), fenced by the
    /// engine's lease: the run, the tasks and attempts that changed, and new attempts. Returns `false`, writing
    /// nothing, when the run changed since it was read.
    pub(crate) async fn save_progress(
        &self,
        epoch: Epoch,
        revision: i64,
        before: &RunProgress,
        after: &RunProgress,
    ) -> Result<bool, ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        lease::check(&txn, ENGINE_LEASE, epoch)
            .await
            .map_err(|error| ApiError::Aborted {
                message: error.to_string(),
            })?;
        let result = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value(after.state.as_str()))
            .col_expr(run::Column::Reason, Expr::value(after.reason.clone()))
            .col_expr(run::Column::StartedMs, Expr::value(after.started_ms))
            .col_expr(run::Column::EndedMs, Expr::value(after.ended_ms))
            .col_expr(run::Column::Revision, Expr::value(revision + 1))
            .filter(run::Column::Id.eq(after.id.clone()))
            .filter(run::Column::Revision.eq(revision))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        if result.rows_affected == 0 {
            return Ok(false);
        }
        for (old, new) in before.tasks.iter().zip(&after.tasks) {
            if (old.state, &old.reason, old.retries, old.next_attempt_ms)
                != (new.state, &new.reason, new.retries, new.next_attempt_ms)
            {
                task::Entity::update_many()
                    .col_expr(task::Column::State, Expr::value(new.state.as_str()))
                    .col_expr(task::Column::Reason, Expr::value(new.reason.clone()))
                    .col_expr(task::Column::Retries, Expr::value(new.retries))
                    .col_expr(task::Column::NextAttemptMs, Expr::value(new.next_attempt_ms))
                    .filter(task::Column::Run.eq(after.id.clone()))
                    .filter(task::Column::Name.eq(new.name.clone()))
                    .exec(&txn)
                    .await
                    .map_err(db_error)?;
            }
            for attempt in &new.attempts {
                let earlier = old.attempts.iter().find(|was| was.number == attempt.number);
                if earlier == Some(attempt) {
                    continue;
                }
                save_attempt(&txn, &after.id, &new.name, attempt, earlier.is_some()).await?;
            }
        }
        txn.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// Ends an attempt the runtime refused to run (its workload is invalid) as failed, so the task's retry
    /// policy decides what follows.
    pub(crate) async fn refuse_attempt(
        &self,
        run: &str,
        task: &str,
        number: i32,
        message: &str,
    ) -> Result<(), ApiError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        attempt::Entity::update_many()
            .col_expr(attempt::Column::State, Expr::value(State::Failed.as_str()))
            .col_expr(attempt::Column::Applied, Expr::value(true))
            .col_expr(attempt::Column::EndedMs, Expr::value(cube_kit::time::now_ms()))
            .col_expr(attempt::Column::Reason, Expr::value("Refused"))
            .col_expr(attempt::Column::Message, Expr::value(truncate(message, 4000)))
            .filter(attempt::Column::Run.eq(run))
            .filter(attempt::Column::Task.eq(task))
            .filter(attempt::Column::Number.eq(number))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        run::Entity::update_many()
            .col_expr(run::Column::Revision, Expr::col(run::Column::Revision).add(1))
            .filter(run::Column::Id.eq(run))
            .exec(&txn)
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)
    }

    /// Marks attempts applied (their workloads exist).
    pub(crate) async fn mark_applied(&self, run: &str, applied: &[(String, i32)]) -> Result<(), ApiError> {
        for (task, number) in applied {
            attempt::Entity::update_many()
                .col_expr(attempt::Column::Applied, Expr::value(true))
                .filter(attempt::Column::Run.eq(run))
                .filter(attempt::Column::Task.eq(task.clone()))
                .filter(attempt::Column::Number.eq(*number))
                .exec(&self.db)
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }
}

/// Inserts or updates one attempt.
async fn save_attempt(
    txn: &DatabaseTransaction,
    run: &str,
    task: &str,
    attempt: &Attempt,
    exists: bool,
) -> Result<(), ApiError> {
    let row = attempt::ActiveModel {
        run: Set(run.to_owned()),
        task: Set(task.to_owned()),
        number: Set(attempt.number),
        state: Set(attempt.state.as_str().to_owned()),
        applied: Set(attempt.applied),
        workload: Set(attempt.workload.clone()),
        node: Set(attempt.node.clone()),
        started_ms: Set(attempt.started_ms),
        ended_ms: Set(attempt.ended_ms),
        exit_code: Set(attempt.exit_code),
        reason: Set(truncate(&attempt.reason, 200)),
        message: Set(truncate(&attempt.message, 4000)),
        infrastructure: Set(attempt.infrastructure),
    };
    if exists {
        attempt::Entity::update_many()
            .set(row)
            .filter(attempt::Column::Run.eq(run))
            .filter(attempt::Column::Task.eq(task))
            .filter(attempt::Column::Number.eq(attempt.number))
            .exec(txn)
            .await
            .map_err(db_error)?;
    } else {
        attempt::Entity::insert(row)
            .exec_without_returning(txn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Runs that have a task named `name`.
fn run_of_task(name: &str) -> Condition {
    Condition::all().add(
        run::Column::Id.in_subquery(
            sea_orm::sea_query::Query::select()
                .column(task::Column::Run)
                .from(task::Entity)
                .and_where(task::Column::Name.eq(name))
                .to_owned(),
        ),
    )
}

/// At most `limit` characters of `text`.
fn truncate(text: &str, limit: usize) -> String {
    text.chars().take(limit).collect()
}

/// Run `id` with its tasks and attempts, read through `db`.
async fn record(db: &impl ConnectionTrait, id: &str) -> Result<Option<RunRecord>, ApiError> {
    let Some(run) = run::Entity::find_by_id(id.to_owned()).one(db).await.map_err(db_error)? else {
        return Ok(None);
    };
    let tasks = task::Entity::find()
        .filter(task::Column::Run.eq(id))
        .order_by_asc(task::Column::Position)
        .all(db)
        .await
        .map_err(db_error)?;
    let mut attempts: HashMap<String, Vec<attempt::Model>> = HashMap::new();
    for row in attempt::Entity::find()
        .filter(attempt::Column::Run.eq(id))
        .order_by_asc(attempt::Column::Number)
        .all(db)
        .await
        .map_err(db_error)?
    {
        attempts.entry(row.task.clone()).or_default().push(row);
    }
    Ok(Some(RunRecord { run, tasks, attempts }))
}

/// Replaces a pipeline read at `revision` through `db`; `Aborted` when it changed since.
async fn write_pipeline(db: &impl ConnectionTrait, row: pipeline::Model, revision: i64) -> Result<(), ApiError> {
    let name = format!("projects/{}/pipelines/{}", row.project, row.id);
    let (project, id) = (row.project.clone(), row.id.clone());
    let result = pipeline::Entity::update_many()
        .set(pipeline::ActiveModel {
            project: NotSet,
            id: NotSet,
            creator: NotSet,
            created_ms: NotSet,
            // Every other column is written (`from` alone marks them unchanged, and nothing would be).
            ..pipeline::ActiveModel::from(row).reset_all()
        })
        .filter(pipeline::Column::Project.eq(project))
        .filter(pipeline::Column::Id.eq(id))
        .filter(pipeline::Column::Revision.eq(revision))
        .exec(db)
        .await
        .map_err(db_error)?;
    if result.rows_affected == 0 {
        return Err(changed("pipeline", &name));
    }
    Ok(())
}

/// A schedule's `since_ms` moved to `since_ms` if that is later, never back.
fn forward(since_ms: i64) -> sea_orm::sea_query::SimpleExpr {
    Expr::case(schedule::Column::SinceMs.lt(since_ms), since_ms)
        .finally(Expr::col(schedule::Column::SinceMs))
        .into()
}

/// The row of schedule `row`.
fn schedule_key(row: &schedule::Model) -> Condition {
    Condition::all()
        .add(schedule::Column::Project.eq(row.project.clone()))
        .add(schedule::Column::Pipeline.eq(row.pipeline.clone()))
        .add(schedule::Column::Id.eq(row.id.clone()))
}

/// The error of a write that lost to a concurrent change.
fn changed(kind: &str, name: &str) -> ApiError {
    ApiError::Aborted {
        message: format!("{kind} {name} changed since it was read; read it again and retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_row(id: &str, trigger: &str, state: State) -> run::Model {
        run::Model {
            id: id.to_owned(),
            project: "vision".to_owned(),
            pipeline: "daily".to_owned(),
            state: state.as_str().to_owned(),
            reason: String::new(),
            trigger: trigger.to_owned(),
            creator: "lena".to_owned(),
            request_id: None,
            snapshot: String::new(),
            admitted: false,
            revision: 1,
            created_ms: 1,
            started_ms: None,
            ended_ms: None,
            fire_ms: None,
            schedule: None,
        }
    }

    #[tokio::test]
    async fn a_schedule_changes_only_from_the_revision_it_was_read_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("workflow.db").display());
        let store = Store::new(
            cube_kit::db::connect::<crate::model::Migrator>(&url, true)
                .await
                .expect("database"),
        );
        let row = schedule::Model {
            project: "vision".to_owned(),
            pipeline: "daily".to_owned(),
            id: "nightly".to_owned(),
            creator: "lena".to_owned(),
            enabled: true,
            spec: Vec::new(),
            since_ms: 1,
            last_fire_ms: None,
            blocked_reason: String::new(),
            backfill_start_ms: None,
            backfill_end_ms: None,
            backfill_pending: false,
            revision: 1,
            created_ms: 1,
            updated_ms: 1,
        };
        store.insert_schedule(row.clone()).await.expect("inserting");
        let changed = schedule::Model {
            enabled: false,
            revision: 2,
            ..row.clone()
        };
        store
            .update_schedule(changed.clone(), 1)
            .await
            .expect("updating at revision 1");
        assert!(matches!(
            store.update_schedule(changed, 1).await,
            Err(ApiError::Aborted { .. })
        ));
        let read = store.schedule("vision", "daily", "nightly").await.expect("reading");
        assert_eq!(read.map(|row| (row.enabled, row.revision)), Some((false, 2)));
    }

    #[tokio::test]
    async fn a_manual_run_replaces_live_manual_runs_and_never_scheduled_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("workflow.db").display());
        let store = Store::new(
            cube_kit::db::connect::<crate::model::Migrator>(&url, true)
                .await
                .expect("database"),
        );
        for row in [
            run_row("manual2", "MANUAL", State::Succeeded),
            run_row("cron1", "SCHEDULED", State::Running),
            run_row("manual1", "MANUAL", State::Running),
        ] {
            assert!(store.insert_run(row, Vec::new()).await.expect("inserted"));
        }
        assert!(
            store
                .insert_run(run_row("manual3", "MANUAL", State::Pending), Vec::new())
                .await
                .expect("inserted")
        );
        let state = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .run_record(id)
                    .await
                    .expect("read")
                    .map(|record| (record.run.state, record.run.reason))
                    .expect("stored")
            }
        };
        assert_eq!(
            state("manual1").await,
            ("CANCELING".to_owned(), "replaced by the manual run manual3".to_owned())
        );
        assert_eq!(state("manual2").await.0, "SUCCEEDED", "finished runs stay as they are");
        assert_eq!(state("cron1").await.0, "RUNNING", "scheduled runs are never replaced");
        assert_eq!(state("manual3").await.0, "PENDING");
    }

    #[tokio::test]
    async fn a_request_id_makes_one_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("workflow.db").display());
        let store = Store::new(
            cube_kit::db::connect::<crate::model::Migrator>(&url, true)
                .await
                .expect("database"),
        );
        let with_request = |id: &str| run::Model {
            request_id: Some("nightly-42".to_owned()),
            ..run_row(id, "SCHEDULED", State::Pending)
        };
        assert!(
            store
                .insert_run(with_request("first"), Vec::new())
                .await
                .expect("inserted")
        );
        assert!(
            !store
                .insert_run(with_request("second"), Vec::new())
                .await
                .expect("answered")
        );
        let found = store
            .run_by_request("vision", "daily", "nightly-42")
            .await
            .expect("read");
        assert_eq!(found.map(|row| row.id).as_deref(), Some("first"));
    }
}
