//! `cube.workflow.v1.ScheduleService`: cron schedules of pipelines, validated whole (the expression, its time
//! zone, the window and the policies) and shown with their next fire time.

use cube_kit::identity::Principal;
use cube_kit::mask::UpdateMask;
use cube_kit::page::{decode_token, finish_page, page_size};
use std::sync::Arc;

use cube_kit::time::{Clock, timestamp, timestamp_ms};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::workflow::v1::schedule_service_server::ScheduleService;
use cube_proto::cube::workflow::v1::{
    Backfill, BackfillScheduleRequest, CatchUp as CatchUpField, CreateScheduleRequest, DeleteScheduleRequest,
    GetScheduleRequest, ListSchedulesRequest, ListSchedulesResponse, Schedule, UpdateScheduleRequest,
};
use prost::Message as _;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::access::Need;
use crate::cron::{CronProblem, CronSchedule};
use crate::dag::is_label;
use crate::firing::{CatchUp, DEFAULT_MAX_CATCH_UP, Policy};
use crate::model::schedule;
use crate::pipelines::{ListParent, Pipelines, list_parent, pipeline_name};
use crate::status;
use crate::templates::{check_etag, etag};

/// How far ahead the next fire time is looked for.
const HORIZON: chrono::TimeDelta = chrono::TimeDelta::days(40 * 366);
/// The most fires one backfill makes.
pub(crate) const MAX_BACKFILL: usize = 10_000;

/// Serves `ScheduleService`.
#[derive(Clone)]
pub(crate) struct Schedules {
    pub(crate) pipelines: Pipelines,
    /// The time schedules are read at.
    pub(crate) clock: Clock,
    /// Wakes the firer (a backfill to make, a schedule changed).
    pub(crate) firer: Arc<Notify>,
}

/// The stored schedule of a row (its output fields unset).
pub(crate) fn spec(row: &schedule::Model) -> Schedule {
    Schedule::decode(row.spec.as_slice()).unwrap_or_default()
}

/// The policy a schedule's runs start under.
pub(crate) fn policy_of(row: &schedule::Model) -> Policy {
    let spec = spec(row);
    Policy {
        max_concurrent_runs: usize::try_from(spec.max_concurrent_runs).unwrap_or(0),
        depends_on_past: spec.depends_on_past,
    }
}

/// What a schedule makes of missed fires.
pub(crate) fn catch_up_of(spec: &Schedule) -> CatchUp {
    match spec.catch_up() {
        CatchUpField::Skip => CatchUp::Skip,
        CatchUpField::All => CatchUp::All {
            max: usize::try_from(spec.max_catch_up)
                .ok()
                .filter(|max| *max > 0)
                .unwrap_or(DEFAULT_MAX_CATCH_UP),
        },
        CatchUpField::Unspecified | CatchUpField::Latest => CatchUp::Latest,
    }
}

/// The parts of `projects/{project}/pipelines/{pipeline}/schedules/{schedule}` in `field`.
fn schedule_name<'a>(field: &str, name: &'a str) -> Result<(&'a str, &'a str, &'a str), ApiError> {
    let invalid = || {
        ApiError::invalid(
            field,
            format!(
                "{name:?} is not a schedule name, projects/{{project}}/pipelines/{{pipeline}}/schedules/{{schedule}}"
            ),
        )
    };
    let (pipeline, id) = name.rsplit_once("/schedules/").ok_or_else(invalid)?;
    let (project, pipeline) = pipeline_name(field, pipeline).map_err(|_| invalid())?;
    if !is_label(id, 63) {
        return Err(invalid());
    }
    Ok((project, pipeline, id))
}

/// Milliseconds of a timestamp.
pub(crate) fn ms(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    time.map(timestamp_ms)
}

/// The problems of a schedule's fields (under `schedule.`), and its cron schedule when it has none.
fn validate(given: &Schedule) -> Result<CronSchedule, ApiError> {
    let mut found = Vec::new();
    let cron = match CronSchedule::parse(&given.cron, &given.time_zone) {
        Ok(cron) => Some(cron),
        Err(CronProblem::Expression(message)) => {
            found.push(FieldViolation::new("schedule.cron", message));
            None
        }
        Err(CronProblem::Zone(message)) => {
            found.push(FieldViolation::new("schedule.time_zone", message));
            None
        }
    };
    if let (Some(start), Some(end)) = (ms(given.start_time.as_ref()), ms(given.end_time.as_ref()))
        && end < start
    {
        found.push(FieldViolation::new("schedule.end_time", "is before start_time"));
    }
    if given.keep_newest > 0 && given.depends_on_past {
        found.push(FieldViolation::new(
            "schedule.keep_newest",
            "cannot be set with depends_on_past: a fire would cancel the run the next one waits for",
        ));
    }
    for (field, value) in [
        ("schedule.max_concurrent_runs", given.max_concurrent_runs),
        ("schedule.keep_newest", given.keep_newest),
        ("schedule.max_catch_up", given.max_catch_up),
    ] {
        if value < 0 {
            found.push(FieldViolation::new(field, "is not negative; 0 means no limit"));
        }
    }
    for (index, line) in given.global_env.lines().enumerate() {
        let line = line.trim();
        if !line.is_empty() && line.split_once('=').is_none_or(|(key, _)| key.trim().is_empty()) {
            found.push(FieldViolation::new(
                "schedule.global_env",
                format!("line {}: {line:?} is not KEY=value", index + 1),
            ));
        }
    }
    match cron {
        Some(cron) if found.is_empty() => Ok(cron),
        _ => Err(ApiError::InvalidArgument(found)),
    }
}

/// What is stored of a schedule: its message without output fields.
fn spec_of(given: &Schedule) -> Vec<u8> {
    Schedule {
        name: String::new(),
        next_fire_time: None,
        last_fire_time: None,
        blocked_reason: String::new(),
        creator: String::new(),
        create_time: None,
        update_time: None,
        etag: String::new(),
        backfill: None,
        ..given.clone()
    }
    .encode_to_vec()
}

/// The schedule a row holds, with its next fire time.
fn message(row: &schedule::Model) -> Schedule {
    let mut schedule = spec(row);
    schedule.name = format!(
        "projects/{}/pipelines/{}/schedules/{}",
        row.project, row.pipeline, row.id
    );
    schedule.enabled = row.enabled;
    schedule.creator = format!("users/{}", row.creator);
    schedule.create_time = Some(timestamp(row.created_ms));
    schedule.update_time = Some(timestamp(row.updated_ms));
    schedule.etag = etag(row.revision);
    schedule.last_fire_time = row.last_fire_ms.map(timestamp);
    schedule.blocked_reason.clone_from(&row.blocked_reason);
    if let (Some(start), Some(end)) = (row.backfill_start_ms, row.backfill_end_ms) {
        schedule.backfill = Some(Backfill {
            start_time: Some(timestamp(start)),
            end_time: Some(timestamp(end)),
            ..Backfill::default()
        });
    }
    if row.enabled
        && let Ok(cron) = CronSchedule::parse(&schedule.cron, &schedule.time_zone)
    {
        let after =
            ms(schedule.start_time.as_ref()).map_or(row.since_ms, |start| start.saturating_sub(1).max(row.since_ms));
        let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        // A cron expression that matches at all matches within decades (29 February on a Monday: 28 years).
        let until = ms(schedule.end_time.as_ref()).map_or_else(
            || {
                time(after)
                    .checked_add_signed(HORIZON)
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
            },
            time,
        );
        schedule.next_fire_time = cron
            .fires(time(after), until, 1)
            .first()
            .map(|fire| timestamp(fire.timestamp_millis()));
    }
    schedule
}

impl Schedules {
    /// The schedule a row holds, with its next fire time, what holds it back, and its backfill's progress.
    async fn shown(&self, row: &schedule::Model) -> Result<Schedule, ApiError> {
        let store = &self.pipelines.store;
        let mut schedule = message(row);
        if schedule.blocked_reason.is_empty() {
            schedule.blocked_reason = store.waiting_reason(row).await?.unwrap_or_default();
        }
        if let (Some(backfill), Some(start), Some(end)) =
            (schedule.backfill.as_mut(), row.backfill_start_ms, row.backfill_end_ms)
        {
            let cron = CronSchedule::parse(&schedule.cron, &schedule.time_zone).map_err(|problem| {
                ApiError::internal(format!(
                    "the stored schedule {} does not parse: {problem:?}",
                    schedule.name
                ))
            })?;
            let count = store.backfill_count(row, start, end).await?;
            let fires = cron.fires_ms(start.saturating_sub(1), end, MAX_BACKFILL + 1).len();
            backfill.fires = i32::try_from(fires).unwrap_or(i32::MAX);
            backfill.runs = i32::try_from(count.runs).unwrap_or(i32::MAX);
            backfill.ended = i32::try_from(count.ended).unwrap_or(i32::MAX);
            backfill.failed = i32::try_from(count.failed).unwrap_or(i32::MAX);
        }
        Ok(schedule)
    }

    /// Schedule `name` (in `field`), if the caller may do what `need` says with it.
    async fn find<T>(
        &self,
        request: &Request<T>,
        field: &str,
        name: &str,
        need: Need,
        permission: &str,
    ) -> Result<(Principal, schedule::Model), ApiError> {
        let (project, pipeline, id) = schedule_name(field, name)?;
        let caller = self
            .pipelines
            .access
            .check(request, project, need, ("schedule", name), permission)
            .await?;
        let row = self
            .pipelines
            .store
            .schedule(project, pipeline, id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                kind: "schedule",
                name: name.to_owned(),
            })?;
        Ok((caller, row))
    }

    async fn create(&self, request: Request<CreateScheduleRequest>) -> Result<Schedule, ApiError> {
        let body = request.get_ref();
        let (caller, pipeline) = self
            .pipelines
            .find(&request, "parent", &body.parent, Need::Write, "schedules.create")
            .await?;
        if !is_label(&body.schedule_id, 63) {
            return Err(ApiError::invalid(
                "schedule_id",
                format!(
                    "{:?} is not a schedule id: lowercase letters, digits and '-', starting with a letter and \
                     ending with a letter or digit, at most 63 characters",
                    body.schedule_id
                ),
            ));
        }
        let given = body.schedule.clone().unwrap_or_default();
        validate(&given)?;
        let now = self.clock.now_ms();
        let row = schedule::Model {
            project: pipeline.project.clone(),
            pipeline: pipeline.id.clone(),
            id: body.schedule_id.clone(),
            creator: caller.username.clone(),
            enabled: given.enabled,
            spec: spec_of(&given),
            since_ms: now,
            last_fire_ms: None,
            blocked_reason: String::new(),
            backfill_start_ms: None,
            backfill_end_ms: None,
            backfill_pending: false,
            revision: 1,
            created_ms: now,
            updated_ms: now,
        };
        self.pipelines.store.insert_schedule(row.clone()).await?;
        self.firer.notify_one();
        self.shown(&row).await
    }

    async fn get(&self, request: Request<GetScheduleRequest>) -> Result<Schedule, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, row) = self.find(&request, "name", &name, Need::Read, "schedules.get").await?;
        self.shown(&row).await
    }

    async fn list(&self, request: Request<ListSchedulesRequest>) -> Result<ListSchedulesResponse, ApiError> {
        let body = request.get_ref();
        let ListParent {
            project,
            pipeline,
            hidden,
        } = list_parent(&body.parent)?;
        let size = page_size(body.page_size)?;
        let after = decode_token(&body.page_token)?;
        self.pipelines
            .access
            .check(&request, project, Need::Read, hidden, "schedules.list")
            .await?;
        let mut rows = self
            .pipelines
            .store
            .list_schedules(project, pipeline, after, size + 1)
            .await?;
        let next_page_token = finish_page(&mut rows, size, |row| (row.pipeline.clone(), row.id.clone()));
        let mut schedules = Vec::with_capacity(rows.len());
        for row in &rows {
            schedules.push(self.shown(row).await?);
        }
        Ok(ListSchedulesResponse {
            schedules,
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateScheduleRequest>) -> Result<Schedule, ApiError> {
        let body = request.get_ref();
        let given = body.schedule.clone().unwrap_or_default();
        let (_, row) = self
            .find(&request, "schedule.name", &given.name, Need::Write, "schedules.update")
            .await?;
        check_etag(&given.name, &given.etag, row.revision)?;
        let mut schedule = message(&row);
        // The fields the mask may name, each copied from the request when it does.
        macro_rules! take {
            ($($field:ident),*) => {
                let mask = UpdateMask::parse(body.update_mask.as_ref(), &[$(stringify!($field)),*])?;
                $(if mask.wants(stringify!($field)) { schedule.$field = given.$field.clone(); })*
            };
        }
        take!(
            display_name,
            cron,
            time_zone,
            start_time,
            end_time,
            enabled,
            global_env,
            max_concurrent_runs,
            keep_newest,
            depends_on_past,
            catch_up,
            max_catch_up
        );
        validate(&schedule)?;
        let now = self.clock.now_ms();
        let updated = schedule::Model {
            enabled: schedule.enabled,
            spec: spec_of(&schedule),
            // Enabled again: nothing from while it was off is caught up.
            since_ms: if schedule.enabled && !row.enabled {
                now
            } else {
                row.since_ms
            },
            revision: row.revision + 1,
            updated_ms: now,
            ..row.clone()
        };
        self.pipelines
            .store
            .update_schedule(updated.clone(), row.revision)
            .await?;
        self.firer.notify_one();
        let row = self
            .pipelines
            .store
            .schedule(&row.project, &row.pipeline, &row.id)
            .await?
            .unwrap_or(updated);
        self.shown(&row).await
    }

    async fn backfill(&self, request: Request<BackfillScheduleRequest>) -> Result<Schedule, ApiError> {
        let body = request.get_ref();
        let (_, row) = self
            .find(&request, "name", &body.name, Need::Write, "schedules.backfill")
            .await?;
        let now = self.clock.now_ms();
        let mut found = Vec::new();
        let start = body.start_time.as_ref().map(timestamp_ms);
        let end = body.end_time.as_ref().map(timestamp_ms);
        if start.is_none() {
            found.push(FieldViolation::new(
                "start_time",
                "is required: a backfill covers a bounded window",
            ));
        }
        match (start, end) {
            (_, None) => found.push(FieldViolation::new(
                "end_time",
                "is required: a backfill covers a bounded window",
            )),
            (_, Some(end)) if end > now => found.push(FieldViolation::new(
                "end_time",
                "is in the future; fires to come are the schedule's own",
            )),
            (Some(start), Some(end)) if end < start => {
                found.push(FieldViolation::new("end_time", "is before start_time"));
            }
            _ => {}
        }
        let (Some(start), Some(end)) = (start, end) else {
            return Err(ApiError::InvalidArgument(found));
        };
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        let given = spec(&row);
        let cron = CronSchedule::parse(&given.cron, &given.time_zone).map_err(|problem| {
            ApiError::internal(format!("the stored schedule {} does not parse: {problem:?}", body.name))
        })?;
        if cron.fires_ms(start.saturating_sub(1), end, MAX_BACKFILL + 1).len() > MAX_BACKFILL {
            return Err(ApiError::invalid(
                "start_time",
                format!("the window holds more than {MAX_BACKFILL} fires; backfill it in parts"),
            ));
        }
        let store = &self.pipelines.store;
        store.start_backfill(&row, start, end).await?;
        self.firer.notify_one();
        let row = store
            .schedule(&row.project, &row.pipeline, &row.id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                kind: "schedule",
                name: body.name.clone(),
            })?;
        self.shown(&row).await
    }

    async fn delete(&self, request: Request<DeleteScheduleRequest>) -> Result<(), ApiError> {
        let body = request.get_ref();
        let (_, row) = self
            .find(&request, "name", &body.name, Need::Write, "schedules.delete")
            .await?;
        check_etag(&body.name, &body.etag, row.revision)?;
        self.pipelines.store.delete_schedule(&row).await
    }
}

#[tonic::async_trait]
impl ScheduleService for Schedules {
    async fn create_schedule(&self, request: Request<CreateScheduleRequest>) -> Result<Response<Schedule>, Status> {
        self.create(request).await.map(Response::new).map_err(status)
    }

    async fn get_schedule(&self, request: Request<GetScheduleRequest>) -> Result<Response<Schedule>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_schedules(
        &self,
        request: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn update_schedule(&self, request: Request<UpdateScheduleRequest>) -> Result<Response<Schedule>, Status> {
        self.update(request).await.map(Response::new).map_err(status)
    }

    async fn backfill_schedule(&self, request: Request<BackfillScheduleRequest>) -> Result<Response<Schedule>, Status> {
        self.backfill(request).await.map(Response::new).map_err(status)
    }

    async fn delete_schedule(&self, request: Request<DeleteScheduleRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }
}
