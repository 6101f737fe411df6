//! `cube.workflow.v1.ScheduleService`: cron schedules of pipelines, validated whole (the expression, its time
//! zone, the window and the policies) and shown with their next fire time.

use cube_kit::identity::Principal;
use cube_kit::page::{decode_token, finish_page, page_size};
use cube_kit::time::{now_ms, timestamp};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::workflow::v1::schedule_service_server::ScheduleService;
use cube_proto::cube::workflow::v1::{
    CreateScheduleRequest, DeleteScheduleRequest, GetScheduleRequest, ListSchedulesRequest, ListSchedulesResponse,
    Schedule, UpdateScheduleRequest,
};
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::access::Need;
use crate::cron::{CronProblem, CronSchedule};
use crate::dag::is_label;
use crate::model::schedule;
use crate::pipelines::{ListParent, Pipelines, list_parent, pipeline_name};
use crate::status;
use crate::templates::{check_etag, etag};

/// How far ahead the next fire time is looked for.
const HORIZON: chrono::TimeDelta = chrono::TimeDelta::days(40 * 366);

/// Serves `ScheduleService`.
#[derive(Clone)]
pub(crate) struct Schedules {
    pub(crate) pipelines: Pipelines,
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
fn ms(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    time.map(|time| time.seconds.saturating_mul(1000) + i64::from(time.nanos / 1_000_000))
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
        ..given.clone()
    }
    .encode_to_vec()
}

/// The schedule a row holds, with its next fire time.
fn message(row: &schedule::Model) -> Schedule {
    let mut schedule = Schedule::decode(row.spec.as_slice()).unwrap_or_default();
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
        let now = now_ms();
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
            revision: 1,
            created_ms: now,
            updated_ms: now,
        };
        self.pipelines.store.insert_schedule(row.clone()).await?;
        Ok(message(&row))
    }

    async fn get(&self, request: Request<GetScheduleRequest>) -> Result<Schedule, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, row) = self.find(&request, "name", &name, Need::Read, "schedules.get").await?;
        Ok(message(&row))
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
        Ok(ListSchedulesResponse {
            schedules: rows.iter().map(message).collect(),
            next_page_token,
        })
    }

    async fn update(&self, request: Request<UpdateScheduleRequest>) -> Result<Schedule, ApiError> {
        let body = request.get_ref();
        let given = body.schedule.clone().unwrap_or_default();
        let paths = body.update_mask.clone().map(|mask| mask.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "name the fields to change, or * for all",
            ));
        }
        let (_, row) = self
            .find(&request, "schedule.name", &given.name, Need::Write, "schedules.update")
            .await?;
        check_etag(&given.name, &given.etag, row.revision)?;
        const FIELDS: [&str; 14] = [
            "display_name",
            "cron",
            "time_zone",
            "start_time",
            "end_time",
            "enabled",
            "global_env",
            "max_concurrent_runs",
            "keep_newest",
            "depends_on_past",
            "catch_up",
            "max_catch_up",
            "*",
            "",
        ];
        let mut schedule = message(&row);
        let every = paths.iter().any(|path| path == "*");
        let wanted = |name: &str| every || paths.iter().any(|path| path == name);
        let mut found = Vec::new();
        for path in &paths {
            if path.is_empty() || !FIELDS.contains(&path.as_str()) {
                found.push(FieldViolation::new(
                    "update_mask",
                    format!("{path:?} cannot be changed; the mask accepts {:?}", &FIELDS[..13]),
                ));
            }
        }
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        macro_rules! take {
            ($($field:ident),*) => {
                $(if wanted(stringify!($field)) { schedule.$field = given.$field.clone(); })*
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
        let now = now_ms();
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
        Ok(message(&updated))
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

    async fn delete_schedule(&self, request: Request<DeleteScheduleRequest>) -> Result<Response<()>, Status> {
        self.delete(request).await.map(Response::new).map_err(status)
    }
}
