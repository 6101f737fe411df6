//! `cube.workflow.v1.RunService`: runs of pipelines. Handlers record what the caller asked (a new run, a cancel,
//! a retry) and wake the engine, which is the only one to move runs on.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cube_kit::identity::Principal;
use cube_kit::page::{decode_token, finish_page, page_size, parse_filter};
use cube_kit::time::{now_ms, timestamp};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::scheduler::v1::{PlaceRequest, WorkloadKind};
use cube_proto::cube::workflow::v1::run_service_server::RunService;
use cube_proto::cube::workflow::v1::{
    CancelRunRequest, ClearTaskRequest, ClearTaskResponse, CreateRunRequest, DebugTaskRequest, GetRunRequest,
    GetTaskLogsRequest, ListRunsRequest, ListRunsResponse, RetryRunRequest, Run, RunState, RunTaskRequest,
    SkipRunRequest, TaskAttempt, TaskLogChunk, TaskRun, Trigger, WatchRunRequest,
};
use cube_proto::google::rpc::Status as RpcStatus;
use cube_runtime::{ObjectKey, Runtime as _, RuntimeError};
use futures::{Stream, StreamExt as _};
use ring::rand::{SecureRandom as _, SystemRandom};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::access::{Access, Need, upstream};
use crate::admission::task_workload;
use crate::dag;
use crate::engine::Engine;
use crate::launch::{self, Snapshot, template_id};
use crate::model::{run, task};
use crate::pipelines::{Pipelines, pipeline_name};
use crate::progress::State;
use crate::store::{RunQuery, RunRecord};
use crate::{status, templates};

/// How many tasks are placed at once when a run is created.
const PLACING_AT_ONCE: usize = 16;
/// How long `CancelRun` waits for the engine to end the run.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How often a watch reads the run again without being told it changed (another replica may drive it).
const WATCH_POLL: Duration = Duration::from_secs(1);

/// Serves `RunService`.
#[derive(Clone)]
pub(crate) struct Runs {
    pub(crate) engine: Arc<Engine>,
    pub(crate) pipelines: Pipelines,
    pub(crate) access: Access,
    /// The platform's environment for every task.
    pub(crate) global_env: Vec<(String, String)>,
}

/// The parts of `projects/{project}/pipelines/{pipeline}/runs/{run}` in `field`.
fn run_name<'a>(field: &str, name: &'a str) -> Result<(&'a str, &'a str, &'a str), ApiError> {
    let invalid = || {
        ApiError::invalid(
            field,
            format!("{name:?} is not a run name, projects/{{project}}/pipelines/{{pipeline}}/runs/{{run}}"),
        )
    };
    let (pipeline, run) = name.rsplit_once("/runs/").ok_or_else(invalid)?;
    let (project, pipeline) = pipeline_name(field, pipeline).map_err(|_| invalid())?;
    if !dag::is_label(run, 63) {
        return Err(invalid());
    }
    Ok((project, pipeline, run))
}

fn state_of(state: &str) -> RunState {
    match State::parse(state) {
        Some(State::Pending) => RunState::Pending,
        Some(State::Queued) => RunState::Queued,
        Some(State::Running) => RunState::Running,
        Some(State::Succeeded) => RunState::Succeeded,
        Some(State::Failed) => RunState::Failed,
        Some(State::Skipped) => RunState::Skipped,
        Some(State::Canceling) => RunState::Canceling,
        Some(State::Canceled) => RunState::Canceled,
        None => RunState::Unspecified,
    }
}

/// A run's message without its tasks and pipeline (lists).
fn summary(row: &run::Model) -> Run {
    Run {
        name: format!("projects/{}/pipelines/{}/runs/{}", row.project, row.pipeline, row.id),
        state: state_of(&row.state) as i32,
        reason: row.reason.clone(),
        trigger: match row.trigger.as_str() {
            "SCHEDULED" => Trigger::Scheduled,
            "TASK" => Trigger::Task,
            "DEBUG" => Trigger::Debug,
            _ => Trigger::Manual,
        } as i32,
        creator: format!("users/{}", row.creator),
        pipeline: None,
        tasks: Vec::new(),
        create_time: Some(timestamp(row.created_ms)),
        start_time: row.started_ms.map(timestamp),
        end_time: row.ended_ms.map(timestamp),
        request_id: row.request_id.clone().unwrap_or_default(),
        schedule: row
            .schedule
            .as_ref()
            .map(|id| format!("projects/{}/pipelines/{}/schedules/{id}", row.project, row.pipeline))
            .unwrap_or_default(),
        fire_time: row.fire_ms.map(timestamp),
    }
}

/// A run's whole message: its pipeline as it ran, and every task with its attempts.
pub(crate) fn message(record: &RunRecord) -> Run {
    let snapshot = Snapshot::decode(&record.run.snapshot).unwrap_or_default();
    let mut run = summary(&record.run);
    run.tasks = record
        .tasks
        .iter()
        .map(|row| {
            let placement = snapshot.placements.get(&row.name).cloned().unwrap_or_default();
            TaskRun {
                name: row.name.clone(),
                state: state_of(&row.state) as i32,
                reason: row.reason.clone(),
                next_attempt_time: row.next_attempt_ms.map(timestamp),
                attempts: record
                    .attempts
                    .get(&row.name)
                    .into_iter()
                    .flatten()
                    .map(|attempt| {
                        let state = state_of(&attempt.state);
                        let code = match state {
                            RunState::Succeeded | RunState::Running | RunState::Pending => Code::Ok,
                            RunState::Canceled => Code::Cancelled,
                            _ if attempt.reason == cube_runtime::reasons::DEADLINE_EXCEEDED => Code::DeadlineExceeded,
                            _ if attempt.infrastructure => Code::Unavailable,
                            _ => Code::Aborted,
                        };
                        TaskAttempt {
                            number: attempt.number,
                            state: state as i32,
                            cluster: placement.cluster.clone(),
                            namespace: placement.namespace.clone(),
                            pod: attempt.workload.clone(),
                            node: attempt.node.clone(),
                            start_time: attempt.started_ms.map(timestamp),
                            end_time: attempt.ended_ms.map(timestamp),
                            exit_code: attempt.exit_code,
                            reason: attempt.reason.clone(),
                            status: Some(RpcStatus {
                                code: code as i32,
                                message: if attempt.message.is_empty() {
                                    attempt.reason.clone()
                                } else {
                                    attempt.message.clone()
                                },
                                details: Vec::new(),
                            }),
                            infrastructure: attempt.infrastructure,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    run.pipeline = Some(snapshot.pipeline);
    run
}

/// A new run id: a letter and nine lowercase letters or digits.
fn new_run_id() -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0_u8; 10];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal("no randomness"))?;
    Ok(bytes
        .iter()
        .enumerate()
        .map(|(index, byte)| {
            let range = if index == 0 { 26 } else { ALPHABET.len() };
            char::from(ALPHABET[usize::from(*byte) % range])
        })
        .collect())
}

/// What a new run runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// The whole pipeline (`CreateRun`).
    Pipeline,
    /// One task alone (`RunTask`).
    Task(&'a str),
    /// One task's pod, sleeping this long for a shell (`DebugTask`).
    Debug(&'a str, Duration),
}

impl Scope<'_> {
    /// The trigger its runs are stored with.
    fn trigger(self) -> &'static str {
        match self {
            Self::Pipeline => "MANUAL",
            Self::Task(_) => "TASK",
            Self::Debug(..) => "DEBUG",
        }
    }
}

/// The fire a scheduled run is made for.
#[derive(Debug, Clone)]
pub(crate) struct Fire {
    /// The schedule's id.
    pub(crate) schedule: String,
    /// The fire time.
    pub(crate) fire_ms: i64,
    /// The fire time as its tasks see it, `execution_date`.
    pub(crate) execution_date: String,
    /// The schedule's `KEY=value` lines, added to the pipeline's global environment.
    pub(crate) env: String,
}

/// Who a new run is made by and for.
pub(crate) struct Maker<'a> {
    /// The user it runs for.
    pub(crate) creator: &'a str,
    /// Carries the credentials its project is read and its tasks placed with: the caller's own, or the service
    /// account's acting for `creator`.
    pub(crate) credentials: &'a Request<()>,
}

/// How long a debug pod lives when the caller does not say.
const DEBUG_DEFAULT: Duration = Duration::from_secs(2 * 3600);
/// The shortest and longest life of a debug pod.
const DEBUG_RANGE: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(24 * 3600));

/// What the scheduler's refusal to place task `index` means to the caller.
fn placement_error(index: usize, status: Status) -> ApiError {
    match status.code() {
        Code::InvalidArgument => ApiError::invalid(format!("pipeline.tasks[{index}]"), status.message().to_owned()),
        Code::FailedPrecondition | Code::ResourceExhausted => ApiError::FailedPrecondition {
            message: format!("task {index} cannot be placed: {}", status.message()),
        },
        _ => upstream("scheduler", status),
    }
}

impl Runs {
    /// Run `name` (in `field`) with its tasks, if the caller may do what `need` says with it.
    async fn find<T>(
        &self,
        request: &Request<T>,
        field: &str,
        name: &str,
        need: Need,
        permission: &str,
    ) -> Result<(Principal, RunRecord), ApiError> {
        let (project, pipeline, id) = run_name(field, name)?;
        let caller = self
            .access
            .check(request, project, need, ("run", name), permission)
            .await?;
        match self.engine.store.run_record(id).await? {
            Some(record) if record.run.project == project && record.run.pipeline == pipeline => Ok((caller, record)),
            _ => Err(ApiError::NotFound {
                kind: "run",
                name: name.to_owned(),
            }),
        }
    }

    /// Starts a run of the pipeline named in `field` (`parent`) of what `scope` says, for the caller of
    /// `request`, idempotent by `request_id`.
    async fn start<T>(
        &self,
        request: &Request<T>,
        (field, parent): (&str, &str),
        request_id: &str,
        scope: Scope<'_>,
    ) -> Result<Run, ApiError> {
        if request_id.chars().count() > 64 {
            return Err(ApiError::invalid("request_id", "is longer than 64 characters"));
        }
        let (caller, row) = self
            .pipelines
            .find(request, field, parent, Need::Write, "runs.create")
            .await?;
        let store = &self.engine.store;
        if !request_id.is_empty()
            && let Some(existing) = store.run_by_request(&row.project, &row.id, request_id).await?
        {
            return self.current(&existing.id).await;
        }
        let credentials = Request::from_parts(request.metadata().clone(), tonic::Extensions::default(), ());
        let maker = Maker {
            creator: &caller.username,
            credentials: &credentials,
        };
        let (mut run, tasks) = self.prepare(&maker, &row, scope, None).await?;
        run.request_id = (!request_id.is_empty()).then(|| request_id.to_owned());
        let id = run.id.clone();
        if !store.insert_run(run, tasks).await? {
            // A concurrent call with the same request id won: answer with its run.
            if let Some(existing) = store.run_by_request(&row.project, &row.id, request_id).await? {
                return self.current(&existing.id).await;
            }
        }
        self.engine.wake.notify_one();
        self.current(&id).await
    }

    /// A new run of pipeline `row` of what `scope` says (for `fire`, when a schedule makes it), made by `maker`:
    /// the pipeline, its templates and the project's settings as they are now, and each task placed by the
    /// scheduler. Nothing is stored.
    pub(crate) async fn prepare(
        &self,
        maker: &Maker<'_>,
        row: &crate::model::pipeline::Model,
        scope: Scope<'_>,
        fire: Option<&Fire>,
    ) -> Result<(run::Model, Vec<task::Model>), ApiError> {
        let store = &self.engine.store;
        let parent = format!("projects/{}/pipelines/{}", row.project, row.id);
        let mut pipeline = crate::pipelines::message(row);
        if pipeline.tasks.is_empty() {
            return Err(ApiError::FailedPrecondition {
                message: format!("{parent} has no tasks to run"),
            });
        }
        if let Scope::Task(name) | Scope::Debug(name, _) = scope {
            let Some(mut task) = pipeline.tasks.iter().find(|task| task.name == name).cloned() else {
                return Err(ApiError::invalid("task", format!("{parent} has no task {name:?}")));
            };
            // The task runs alone, even when the pipeline skips it.
            task.upstream.clear();
            task.skip = false;
            if let Scope::Debug(_, duration) = scope {
                // The pod ends by itself; the timeout only catches one that does not.
                task.retry = None;
                task.timeout = Some(prost_types::Duration {
                    seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX) + 60,
                    nanos: 0,
                });
            }
            pipeline.tasks = vec![task];
        }
        // What the tasks see of the fire (cube-studio's `execution_date`), after the pipeline's own environment.
        let created_ms = now_ms();
        let execution_date = match fire {
            Some(fire) => {
                pipeline.global_env = format!("{}\n{}", pipeline.global_env, fire.env);
                fire.execution_date.clone()
            }
            None => chrono::DateTime::from_timestamp_millis(created_ms)
                .map(|at| at.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
        };
        pipeline.global_env = format!("{}\n{}={execution_date}", pipeline.global_env, launch::EXECUTION_DATE)
            .trim_start()
            .to_owned();
        // The templates as they are now: the run keeps them, so later edits change later runs only.
        let ids: Vec<String> = pipeline
            .tasks
            .iter()
            .map(|task| template_id(&task.template).to_owned())
            .collect();
        let rows = store.templates(&ids).await?;
        let mut snapshot = Snapshot {
            templates: rows
                .values()
                .map(|row| (row.id.clone(), templates::message(row)))
                .collect(),
            global_env: self.global_env.clone(),
            debug_seconds: match scope {
                Scope::Debug(_, duration) => Some(duration.as_secs()),
                Scope::Pipeline | Scope::Task(_) => None,
            },
            ..Snapshot::default()
        };
        for (index, task) in pipeline.tasks.iter().enumerate() {
            if !snapshot.templates.contains_key(template_id(&task.template)) {
                return Err(ApiError::FailedPrecondition {
                    message: format!("task {index} ({}) uses {}, which was deleted", task.name, task.template),
                });
            }
        }
        let project = self.access.project(maker.credentials, &row.project).await?;
        let id = new_run_id()?;
        snapshot.project_volumes = project
            .settings
            .map(|settings| settings.volume_mounts)
            .unwrap_or_default();
        let asks: Vec<_> = pipeline
            .tasks
            .iter()
            .enumerate()
            .map(|(index, task)| {
                let template = &snapshot.templates[template_id(&task.template)];
                let (cpu, memory, gpu) = launch::pod_resources(task, template);
                let ask = PlaceRequest {
                    project: format!("projects/{}", row.project),
                    kind: WorkloadKind::Task as i32,
                    cpu,
                    memory,
                    gpu,
                    workload: task_workload(&row.project, &row.id, &id, &task.name),
                    ..PlaceRequest::default()
                };
                // Each placement is asked with the maker's credentials.
                let from = Request::from_parts(maker.credentials.metadata().clone(), tonic::Extensions::default(), ());
                let (access, name, selector) = (self.access.clone(), task.name.clone(), task.node_selector.clone());
                async move {
                    let mut placement = access
                        .place(&from, ask)
                        .await
                        .map_err(|status| placement_error(index, status))?;
                    // The scheduler names the cluster as a resource (`clusters/{cluster}`); runtimes by its id.
                    if let Some(id) = placement.cluster.strip_prefix("clusters/") {
                        placement.cluster = id.to_owned();
                    }
                    for (key, value) in selector.split(',').filter_map(|pair| pair.split_once('=')) {
                        placement
                            .node_selector
                            .insert(key.trim().to_owned(), value.trim().to_owned());
                    }
                    Ok::<_, ApiError>((name, placement))
                }
            })
            .collect();
        let placements: Vec<_> = futures::stream::iter(asks).buffered(PLACING_AT_ONCE).collect().await;
        for placed in placements {
            let (name, placement) = placed?;
            snapshot.placements.insert(name, placement);
        }
        snapshot.pipeline = pipeline;
        let tasks = snapshot
            .pipeline
            .tasks
            .iter()
            .enumerate()
            .map(|(position, task)| task::Model {
                run: id.clone(),
                name: task.name.clone(),
                position: i32::try_from(position).unwrap_or(i32::MAX),
                state: State::Pending.as_str().to_owned(),
                reason: String::new(),
                retries: 0,
                next_attempt_ms: None,
            })
            .collect();
        let run = run::Model {
            id,
            project: row.project.clone(),
            pipeline: row.id.clone(),
            state: State::Pending.as_str().to_owned(),
            reason: String::new(),
            trigger: if fire.is_some() { "SCHEDULED" } else { scope.trigger() }.to_owned(),
            creator: maker.creator.to_owned(),
            request_id: None,
            snapshot: snapshot.encode(),
            admitted: false,
            revision: 1,
            created_ms,
            started_ms: None,
            ended_ms: None,
            fire_ms: fire.map(|fire| fire.fire_ms),
            schedule: fire.map(|fire| fire.schedule.clone()),
        };
        Ok((run, tasks))
    }

    /// Cancels the live `TASK` and `DEBUG` runs of a pipeline's task and waits (a while) for them to end.
    async fn clear(&self, request: Request<ClearTaskRequest>) -> Result<ClearTaskResponse, ApiError> {
        let body = request.get_ref();
        let (_, row) = self
            .pipelines
            .find(&request, "pipeline", &body.pipeline, Need::Write, "runs.cancel")
            .await?;
        if !crate::pipelines::message(&row)
            .tasks
            .iter()
            .any(|task| task.name == body.task)
        {
            return Err(ApiError::invalid(
                "task",
                format!("{} has no task {:?}", body.pipeline, body.task),
            ));
        }
        let mut changes = self.engine.changes.subscribe();
        let ids = self.engine.store.clear_task(&row.project, &row.id, &body.task).await?;
        self.engine.wake.notify_one();
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let mut runs = Vec::with_capacity(ids.len());
            for id in &ids {
                runs.push(self.current(id).await?);
            }
            if runs.iter().all(|run| run.state != RunState::Canceling as i32) || tokio::time::Instant::now() >= deadline
            {
                return Ok(ClearTaskResponse { runs });
            }
            let _ = tokio::time::timeout(WATCH_POLL / 4, changes.recv()).await;
        }
    }

    /// Run `id` as stored now.
    async fn current(&self, id: &str) -> Result<Run, ApiError> {
        let record = self
            .engine
            .store
            .run_record(id)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                kind: "run",
                name: id.to_owned(),
            })?;
        Ok(message(&record))
    }

    async fn get(&self, request: Request<GetRunRequest>) -> Result<Run, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, record) = self.find(&request, "name", &name, Need::Read, "runs.get").await?;
        Ok(message(&record))
    }

    async fn list(&self, request: Request<ListRunsRequest>) -> Result<ListRunsResponse, ApiError> {
        let body = request.get_ref();
        let crate::pipelines::ListParent {
            project,
            pipeline,
            hidden,
        } = crate::pipelines::list_parent(&body.parent)?;
        let size = page_size(body.page_size)?;
        let mut query = RunQuery {
            project: project.to_owned(),
            pipeline: pipeline.map(str::to_owned),
            after: decode_token(&body.page_token)?,
            limit: size + 1,
            ..RunQuery::default()
        };
        let mut found = Vec::new();
        for condition in parse_filter(
            &body.filter,
            &["state", "creator", "trigger", "created_after", "created_before"],
        )? {
            let value = condition.value;
            match condition.field.as_str() {
                "state" => match State::parse(&value.to_uppercase()) {
                    Some(state) => query.state = Some(state.as_str().to_owned()),
                    None => found.push(FieldViolation::new("filter", format!("{value:?} is not a run state"))),
                },
                "creator" => query.creator = Some(value.strip_prefix("users/").unwrap_or(&value).to_owned()),
                "trigger" => match value.to_uppercase().as_str() {
                    trigger @ ("MANUAL" | "SCHEDULED" | "TASK" | "DEBUG") => query.trigger = Some(trigger.to_owned()),
                    _ => found.push(FieldViolation::new(
                        "filter",
                        "trigger is MANUAL, SCHEDULED, TASK or DEBUG",
                    )),
                },
                field => match chrono::DateTime::parse_from_rfc3339(&value) {
                    Ok(time) if field == "created_after" => query.created_from = Some(time.timestamp_millis()),
                    Ok(time) => query.created_before = Some(time.timestamp_millis()),
                    Err(_) => found.push(FieldViolation::new(
                        "filter",
                        format!("{field}: {value:?} is not an RFC 3339 time"),
                    )),
                },
            }
        }
        if !found.is_empty() {
            return Err(ApiError::InvalidArgument(found));
        }
        self.access
            .check(&request, project, Need::Read, hidden, "runs.list")
            .await?;
        let mut rows = self.engine.store.list_runs(&query).await?;
        let next_page_token = finish_page(&mut rows, size, |row| (row.created_ms, row.id.clone()));
        Ok(ListRunsResponse {
            runs: rows.iter().map(summary).collect(),
            next_page_token,
        })
    }

    async fn cancel(&self, request: Request<CancelRunRequest>) -> Result<Run, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, mut record) = self.find(&request, "name", &name, Need::Write, "runs.cancel").await?;
        let mut changes = self.engine.changes.subscribe();
        let store = &self.engine.store;
        loop {
            let state = State::parse(&record.run.state).unwrap_or(State::Pending);
            if state.is_final() {
                return Ok(message(&record));
            }
            if state == State::Canceling {
                break;
            }
            match store
                .cancel_run(&record.run.id, record.run.revision, "canceled by a user")
                .await
            {
                Ok(()) => break,
                // Changed meanwhile: read it again and decide again.
                Err(ApiError::Aborted { .. }) => {
                    record = store
                        .run_record(&record.run.id)
                        .await?
                        .ok_or_else(|| ApiError::NotFound {
                            kind: "run",
                            name: name.clone(),
                        })?;
                }
                Err(error) => return Err(error),
            }
        }
        self.engine.wake.notify_one();
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            let now = self.current(&record.run.id).await?;
            if now.state == RunState::Canceled as i32 || tokio::time::Instant::now() >= deadline {
                return Ok(now);
            }
            let _ = tokio::time::timeout(WATCH_POLL / 4, changes.recv()).await;
        }
    }

    async fn retry(&self, request: Request<RetryRunRequest>) -> Result<Run, ApiError> {
        let body = request.get_ref();
        let (_, record) = self
            .find(&request, "name", &body.name, Need::Write, "runs.retry")
            .await?;
        let state = State::parse(&record.run.state).unwrap_or(State::Pending);
        if !state.is_final() {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "{} is still {}; retry it once it has finished",
                    body.name,
                    state.as_str()
                ),
            });
        }
        let snapshot = Snapshot::decode(&record.run.snapshot).map_err(ApiError::internal)?;
        let again: Vec<String> = if body.from_task.is_empty() {
            record
                .tasks
                .iter()
                .filter(|task| {
                    matches!(
                        State::parse(&task.state),
                        Some(State::Failed | State::Canceled | State::Pending)
                    )
                })
                .map(|task| task.name.clone())
                .collect()
        } else {
            if snapshot.task(&body.from_task).is_none() {
                return Err(ApiError::invalid(
                    "from_task",
                    format!("the run has no task {:?}", body.from_task),
                ));
            }
            dag::downstream(&snapshot.pipeline.tasks, &body.from_task)
                .into_iter()
                .collect()
        };
        if again.is_empty() {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "every task of {} succeeded or was skipped; name from_task to run some again",
                    body.name
                ),
            });
        }
        self.engine
            .store
            .retry_run(&record.run.id, record.run.revision, &again)
            .await?;
        self.engine.wake.notify_one();
        self.current(&record.run.id).await
    }

    async fn skip(&self, request: Request<SkipRunRequest>) -> Result<Run, ApiError> {
        let name = request.get_ref().name.clone();
        let (caller, record) = self.find(&request, "name", &name, Need::Write, "runs.skip").await?;
        let state = State::parse(&record.run.state).unwrap_or(State::Pending);
        if !matches!(state, State::Failed | State::Canceled) {
            return Err(ApiError::FailedPrecondition {
                message: format!(
                    "{name} is {}; only a run that failed or was canceled can be skipped",
                    state.as_str()
                ),
            });
        }
        let reason = format!(
            "skipped by users/{}; it was {}: {}",
            caller.username,
            state.as_str(),
            record.run.reason
        );
        self.engine
            .store
            .skip_run(&record.run.id, record.run.revision, &reason)
            .await?;
        // Runs waiting for it (depends_on_past) may start.
        self.engine.wake.notify_one();
        self.current(&record.run.id).await
    }

    async fn watch(&self, request: Request<WatchRunRequest>) -> Result<ReceiverStream<Result<Run, Status>>, ApiError> {
        let name = request.get_ref().name.clone();
        let (_, record) = self.find(&request, "name", &name, Need::Read, "runs.get").await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let engine = self.engine.clone();
        let mut changes = engine.changes.subscribe();
        tokio::spawn(async move {
            let id = record.run.id.clone();
            let mut revision = record.run.revision;
            let mut finished = State::parse(&record.run.state).is_some_and(State::is_final);
            if sender.send(Ok(message(&record))).await.is_err() {
                return;
            }
            while !finished {
                tokio::select! {
                    () = sender.closed() => return,
                    _ = tokio::time::timeout(WATCH_POLL, changes.recv()) => {}
                }
                let record = match engine.store.run_record(&id).await {
                    Ok(Some(record)) => record,
                    Ok(None) => return,
                    Err(error) => {
                        let _ = sender.send(Err(status(error))).await;
                        return;
                    }
                };
                if record.run.revision == revision {
                    continue;
                }
                revision = record.run.revision;
                finished = State::parse(&record.run.state).is_some_and(State::is_final);
                if sender.send(Ok(message(&record))).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(receiver))
    }

    async fn logs(&self, request: Request<GetTaskLogsRequest>) -> Result<LogStream, ApiError> {
        let body = request.get_ref();
        let (_, record) = self.find(&request, "run", &body.run, Need::Read, "runs.get").await?;
        let attempts = record.attempts.get(&body.task).ok_or_else(|| {
            if record.tasks.iter().any(|task| task.name == body.task) {
                ApiError::FailedPrecondition {
                    message: format!("task {} of {} has not started", body.task, body.run),
                }
            } else {
                ApiError::invalid("task", format!("the run has no task {:?}", body.task))
            }
        })?;
        let attempt = if body.attempt == 0 {
            attempts.last()
        } else {
            attempts.iter().find(|attempt| attempt.number == body.attempt)
        }
        .ok_or_else(|| ApiError::invalid("attempt", format!("task {} has no attempt {}", body.task, body.attempt)))?;
        let snapshot = Snapshot::decode(&record.run.snapshot).map_err(ApiError::internal)?;
        let placement = snapshot.placements.get(&body.task).cloned().unwrap_or_default();
        let key = ObjectKey::new(placement.cluster, placement.namespace, attempt.workload.clone());
        let stream = self
            .engine
            .runtime
            .logs(&key, body.follow)
            .await
            .map_err(|error| match error {
                RuntimeError::NotFound(_) => ApiError::NotFound {
                    kind: "task attempt's workload (deleted, or its node is gone)",
                    name: key.to_string(),
                },
                other => ApiError::Unavailable {
                    service: format!("cluster {}", key.cluster),
                    source: Box::new(other),
                },
            })?;
        Ok(Box::pin(stream.map(|chunk| {
            chunk
                .map(|data| TaskLogChunk { data: data.to_vec() })
                .map_err(|error| Status::unavailable(format!("reading the log: {error}")))
        })))
    }
}

/// A stream of log chunks.
type LogStream = Pin<Box<dyn Stream<Item = Result<TaskLogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RunService for Runs {
    async fn create_run(&self, request: Request<CreateRunRequest>) -> Result<Response<Run>, Status> {
        let body = request.get_ref();
        self.start(&request, ("parent", &body.parent), &body.request_id, Scope::Pipeline)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn run_task(&self, request: Request<RunTaskRequest>) -> Result<Response<Run>, Status> {
        let body = request.get_ref();
        self.start(
            &request,
            ("pipeline", &body.pipeline),
            &body.request_id,
            Scope::Task(&body.task),
        )
        .await
        .map(Response::new)
        .map_err(status)
    }

    async fn debug_task(&self, request: Request<DebugTaskRequest>) -> Result<Response<Run>, Status> {
        let body = request.get_ref();
        let duration = match &body.duration {
            None => Ok(DEBUG_DEFAULT),
            Some(duration) => u64::try_from(duration.seconds)
                .ok()
                .map(Duration::from_secs)
                .filter(|duration| (DEBUG_RANGE.0..=DEBUG_RANGE.1).contains(duration))
                .ok_or_else(|| ApiError::invalid("duration", "is from 1 minute (60s) to 24 hours (86400s)")),
        }
        .map_err(status)?;
        self.start(
            &request,
            ("pipeline", &body.pipeline),
            &body.request_id,
            Scope::Debug(&body.task, duration),
        )
        .await
        .map(Response::new)
        .map_err(status)
    }

    async fn clear_task(&self, request: Request<ClearTaskRequest>) -> Result<Response<ClearTaskResponse>, Status> {
        self.clear(request).await.map(Response::new).map_err(status)
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        self.get(request).await.map(Response::new).map_err(status)
    }

    async fn list_runs(&self, request: Request<ListRunsRequest>) -> Result<Response<ListRunsResponse>, Status> {
        self.list(request).await.map(Response::new).map_err(status)
    }

    async fn cancel_run(&self, request: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        self.cancel(request).await.map(Response::new).map_err(status)
    }

    async fn skip_run(&self, request: Request<SkipRunRequest>) -> Result<Response<Run>, Status> {
        self.skip(request).await.map(Response::new).map_err(status)
    }

    async fn retry_run(&self, request: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        self.retry(request).await.map(Response::new).map_err(status)
    }

    type WatchRunStream = ReceiverStream<Result<Run, Status>>;

    async fn watch_run(&self, request: Request<WatchRunRequest>) -> Result<Response<Self::WatchRunStream>, Status> {
        self.watch(request).await.map(Response::new).map_err(status)
    }

    type GetTaskLogsStream = LogStream;

    async fn get_task_logs(
        &self,
        request: Request<GetTaskLogsRequest>,
    ) -> Result<Response<Self::GetTaskLogsStream>, Status> {
        self.logs(request).await.map(Response::new).map_err(status)
    }
}
