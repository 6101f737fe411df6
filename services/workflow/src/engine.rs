//! The engine: the one loop that moves runs on. The replica holding the engine lease reads each live run, asks
//! the runtime for the run's workloads (a reconcile, so that a lost event delays a transition but never loses
//! it), lets [`progress::step`] decide, and acts: workloads of canceled and timed-out attempts are deleted before
//! the new state is written; new attempts are written, then applied under their deterministic names, so that a
//! crash in between re-applies the same name instead of making a second workload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cube_bus::EventBus;
use cube_kit::ApiError;
use cube_kit::lease::{Epoch, Keeper};
use cube_proto::cube::watcher::v1::WorkloadTransition;
use cube_runtime::kubernetes::{Metadata, image_pull_secret};
use cube_runtime::{ClusterRuntime, ObjectKey, Runtime as _, RuntimeError, Runtimes, labels};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::{Notify, broadcast};

use crate::admission::{Admission, TaskAsk, Verdict, run_workload, task_workload};
use crate::firing;
use crate::launch::{self, RunContext, Snapshot};
use crate::model::attempt;
use crate::progress::{self, Attempt, Quota, Retry, RetryOn, RunProgress, State, TaskProgress};
use crate::secrets::SecretKey;
use crate::store::{RunRecord, Store};

/// The engine's parts, shared with the handlers (which wake it and follow its changes).
pub(crate) struct Engine {
    /// The store.
    pub(crate) store: Store,
    /// The runtimes of the registered clusters.
    pub(crate) runtime: Runtimes,
    /// Wakes the loop before its next round.
    pub(crate) wake: Arc<Notify>,
    /// The ids of runs that changed, for `WatchRun` and `CancelRun`.
    pub(crate) changes: broadcast::Sender<String>,
    /// How often every live run is reconciled, events or not.
    pub(crate) interval: Duration,
    /// The key registry passwords are sealed with.
    pub(crate) key: Option<Arc<SecretKey>>,
    /// The scheduler's admission of runs and tasks.
    pub(crate) admission: Admission,
}

/// What applying an attempt's workload came to: done, or the error and whether it is a refusal for good.
type Applied = Result<(), (String, bool)>;

/// Up to how many live workloads a run's step asks for one by one rather than listing the run's.
const ASKED_ONE_BY_ONE: usize = 16;
/// How many workloads of one run are applied at once.
const APPLYING_AT_ONCE: usize = 64;
/// The default retry policy's first wait.
const DEFAULT_BACKOFF_MS: i64 = 10_000;
/// The default retry policy's longest wait.
const DEFAULT_MAX_BACKOFF_MS: i64 = 600_000;

/// Drives runs while `keeper` holds the engine lease.
pub(crate) async fn run(engine: Arc<Engine>, keeper: Keeper) {
    loop {
        let epoch = keeper.tick(&engine.wake, engine.interval).await;
        let live = match engine.store.live_runs().await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "listing live runs");
                continue;
            }
        };
        for id in live {
            let advanced = match advance(&engine, epoch, &id).await {
                Err(error) => refused(&engine, &id, error).await,
                done => done,
            };
            match advanced {
                Ok(true) => {
                    let _ = engine.changes.send(id);
                    // What changed may let more start (a skipped task, a freed slot): look again at once.
                    engine.wake.notify_one();
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, run = %id, "advancing a run"),
            }
        }
    }
}

/// What an error while moving run `id` on means: when the scheduler refused the run's user for good (not a member
/// of the project any more, a malformed request), the run is canceled with the reason (its pods deleted);
/// anything else is tried again.
async fn refused(engine: &Engine, id: &str, error: ApiError) -> Result<bool, ApiError> {
    if !matches!(
        error,
        ApiError::NotFound { .. } | ApiError::PermissionDenied { .. } | ApiError::InvalidArgument(_)
    ) {
        return Err(error);
    }
    let Some(record) = engine.store.run_record(id).await? else {
        return Ok(false);
    };
    if State::parse(&record.run.state).is_none_or(State::is_final) {
        return Err(error);
    }
    let reason = format!(
        "the scheduler refused to admit the run for {}: {error}",
        record.run.creator
    );
    match engine.store.cancel_run(id, record.run.revision, &reason).await {
        Ok(()) => Ok(true),
        // Changed meanwhile: decided again next round.
        Err(ApiError::Aborted { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Wakes the engine whenever a workload of a run changes state.
pub(crate) async fn follow_transitions(bus: Arc<dyn EventBus>, instance: String, wake: Arc<Notify>) {
    let mut deliveries = match bus
        .subscribe(
            cube_runtime::transition::TOPIC,
            &format!("workflow-{instance}"),
            &instance,
        )
        .await
    {
        Ok(deliveries) => deliveries,
        Err(error) => {
            tracing::warn!(%error, "subscribing to workload transitions; runs move on at each reconcile only");
            return;
        }
    };
    while let Some(delivery) = deliveries.next().await {
        let Ok(delivery) = delivery else { continue };
        if WorkloadTransition::decode(delivery.payload.clone())
            .is_ok_and(|event| event.labels.contains_key(labels::RUN))
        {
            wake.notify_one();
        }
        let _ = delivery.ack().await;
    }
}

/// Moves run `id` on once. Returns whether anything changed.
async fn advance(engine: &Engine, epoch: Epoch, id: &str) -> Result<bool, ApiError> {
    let Some(record) = engine.store.run_record(id).await? else {
        return Ok(false);
    };
    let run = &record.run;
    let snapshot = Snapshot::decode(&run.snapshot).map_err(ApiError::internal)?;
    let before = progress_of(&record, &snapshot);
    if before.state.is_final() {
        // Ended, still holding admissions: release them all.
        release_all(engine, &record).await?;
        return Ok(false);
    }
    if matches!(before.state, State::Pending | State::Queued) && !run.admitted {
        // A scheduled run first waits for what its schedule's policy says.
        if let Some(reason) = held_by_schedule(engine, run).await? {
            if before.state == State::Queued && before.reason == reason {
                return Ok(false);
            }
            return engine.store.hold_run(id, run.revision, &reason).await;
        }
        let workload = run_workload(&run.project, &run.pipeline, id);
        let verdict = engine
            .admission
            .admit_run(&run.creator, &run.project, &workload)
            .await?;
        let queued = match &verdict {
            Verdict::Admitted => None,
            // Still waiting for the same reason: nothing to write.
            Verdict::Queued(reason) if before.state == State::Queued && before.reason.ends_with(reason.as_str()) => {
                return Ok(false);
            }
            Verdict::Queued(reason) => Some(reason.as_str()),
        };
        engine.store.admission_of_run(id, run.revision, queued).await?;
        // Read again next round, admitted or not.
        engine.wake.notify_one();
        return Ok(true);
    }
    let needs_look = before.state == State::Canceling || before.tasks.iter().any(|task| task.state == State::Running);
    let observed = if needs_look {
        match observe(&engine.runtime, id, &snapshot, &before).await {
            Ok(observed) => observed,
            // Without the runtime's answer nothing is decided: a missing workload would look deleted.
            Err(error) => {
                tracing::debug!(%error, run = %id, "cluster unavailable; trying again");
                return Ok(false);
            }
        }
    } else {
        HashMap::new()
    };
    let now = cube_kit::time::now_ms();
    let mut after = before.clone();
    let mut effects = progress::observe_run(&mut after, &observed, now);
    // What ended gives back what it held at once (its pod is over), so that what comes next can use it.
    let ended: Vec<String> = before
        .tasks
        .iter()
        .zip(&after.tasks)
        .filter(|(old, new)| new.state.is_final() && !old.state.is_final())
        .map(|(_, new)| task_workload(&run.project, &run.pipeline, id, &new.name))
        .collect();
    engine.admission.release_each(&run.creator, ended).await?;
    // Readiness is judged on what was just observed: a task starts in the step its upstream ends.
    let quota = if after.state == State::Canceling || after.state.is_final() {
        Quota::default()
    } else {
        admit_ready(engine, &record, &snapshot, &after, now).await?
    };
    progress::start_ready(&mut after, now, &quota, &mut effects);
    for name in &effects.delete {
        if let Some(key) = key_of(&snapshot, &after, name) {
            match engine.runtime.delete(&key, Duration::ZERO).await {
                Ok(_) | Err(RuntimeError::NotFound(_)) => {}
                Err(error) => return Err(runtime_error(error)),
            }
        }
    }
    if after != before && !engine.store.save_progress(epoch, run.revision, &before, &after).await? {
        // Changed meanwhile (canceled, retried): read again next round.
        engine.wake.notify_one();
        return Ok(false);
    }
    let context = RunContext {
        project: &run.project,
        pipeline: &run.pipeline,
        run: id,
        creator: &run.creator,
        snapshot: &snapshot,
    };
    // Attempts are independent once recorded: their workloads are applied side by side.
    let mut applying = Vec::new();
    for (task_name, number) in &effects.apply {
        let Some(task) = snapshot.task(task_name) else { continue };
        let (context, snapshot, number) = (&context, &snapshot, *number);
        applying.push(async move {
            let result = match launch::workload(context, task, number) {
                Ok(mut spec) => match with_pull_secret(engine, snapshot, task, &mut spec).await {
                    Ok(()) => engine.runtime.apply(&spec).await.map(drop),
                    Err(error) => Err(error),
                }
                .map_err(|error| (error.to_string(), is_refusal(&error))),
                Err(problem) => Err((problem, true)),
            };
            (task.name.clone(), number, result)
        });
    }
    let outcomes: Vec<(String, i32, Applied)> = futures::stream::iter(applying)
        .buffer_unordered(APPLYING_AT_ONCE)
        .collect()
        .await;
    let mut applied = Vec::new();
    let mut refused = false;
    for (task_name, number, result) in outcomes {
        match result {
            Ok(()) => applied.push((task_name, number)),
            Err((message, true)) => {
                refused = true;
                engine.store.refuse_attempt(id, &task_name, number, &message).await?;
            }
            Err((message, false)) => tracing::warn!(run = %id, task = %task_name, %message, "applying an attempt"),
        }
    }
    if !applied.is_empty() {
        engine.store.mark_applied(id, &applied).await?;
    }
    // An ended run gives back everything, its own admission too.
    if after.state.is_final() {
        release_all(engine, &record).await?;
    }
    Ok(after != before || refused)
}

/// Why scheduled run `run` may not start yet under its schedule's policy (`None`: it may, or it has no schedule
/// any more).
async fn held_by_schedule(engine: &Engine, run: &crate::model::run::Model) -> Result<Option<String>, ApiError> {
    let Some(id) = &run.schedule else {
        return Ok(None);
    };
    let Some(schedule) = engine.store.schedule(&run.project, &run.pipeline, id).await? else {
        return Ok(None);
    };
    let policy = crate::schedules::policy_of(&schedule);
    if policy == firing::Policy::default() {
        return Ok(None);
    }
    let around = engine.store.surroundings(run).await?;
    Ok(match firing::verdict(policy, &around) {
        firing::Verdict::Start => None,
        firing::Verdict::Wait(reason) | firing::Verdict::Blocked(reason) => Some(reason),
    })
}

/// Admits the tasks of `run` that would start now; what admission granted and what it holds back.
async fn admit_ready(
    engine: &Engine,
    record: &RunRecord,
    snapshot: &Snapshot,
    run: &RunProgress,
    now: i64,
) -> Result<Quota, ApiError> {
    let row = &record.run;
    let asks: Vec<(String, TaskAsk)> = progress::ready(run, now)
        .into_iter()
        .filter_map(|name| {
            let task = snapshot.task(&name)?;
            let template = snapshot.template(task)?;
            let (cpu, memory, gpu) = launch::pod_resources(task, template);
            let workload = task_workload(&row.project, &row.pipeline, &row.id, &name);
            Some((
                name,
                TaskAsk {
                    workload,
                    cpu,
                    memory,
                    gpu,
                },
            ))
        })
        .collect();
    let mut quota = Quota::default();
    if asks.is_empty() {
        return Ok(quota);
    }
    let tasks: Vec<TaskAsk> = asks.iter().map(|(_, ask)| ask.clone()).collect();
    let verdicts: HashMap<String, Verdict> = engine
        .admission
        .admit_tasks(&row.creator, &row.project, &tasks)
        .await?
        .into_iter()
        .collect();
    for (name, ask) in asks {
        match verdicts.get(&ask.workload) {
            Some(Verdict::Admitted) => {
                quota.granted.insert(name);
            }
            Some(Verdict::Queued(reason)) => {
                quota.held.insert(name, reason.clone());
            }
            None => {}
        }
    }
    Ok(quota)
}

/// Releases everything an ended run holds (its tasks' admissions and its own) and records it.
async fn release_all(engine: &Engine, record: &RunRecord) -> Result<(), ApiError> {
    let run = &record.run;
    let tasks = record
        .tasks
        .iter()
        .map(|task| task_workload(&run.project, &run.pipeline, &run.id, &task.name))
        .collect();
    engine.admission.release_each(&run.creator, tasks).await?;
    let workload = run_workload(&run.project, &run.pipeline, &run.id);
    engine.admission.release(&run.creator, &workload).await?;
    engine.store.released(&run.id).await
}

/// Makes sure the namespace of `spec` holds the image pull secret of `task`'s template, when the template has
/// registry credentials and the task runs on Kubernetes, and names it in `spec` (and in `HUBSECRET`, as
/// cube-studio did).
async fn with_pull_secret(
    engine: &Engine,
    snapshot: &Snapshot,
    task: &cube_proto::cube::workflow::v1::Task,
    spec: &mut cube_runtime::WorkloadSpec,
) -> Result<(), RuntimeError> {
    let Some(template) = snapshot.template(task) else {
        return Ok(());
    };
    if template.registry_user.is_empty() || !template.has_registry_password {
        return Ok(());
    }
    let ClusterRuntime::Kubernetes(cluster) = engine.runtime.cluster(&spec.key.cluster).await? else {
        return Ok(());
    };
    let id = launch::template_id(&template.name);
    let sealed = engine
        .store
        .template(id)
        .await
        .map_err(|error| RuntimeError::Unavailable(error.to_string()))?
        .map(|row| row.registry_password)
        .unwrap_or_default();
    let password = engine
        .key
        .as_ref()
        .and_then(|key| key.open(&sealed))
        .ok_or_else(|| RuntimeError::Invalid {
            field: "registry_password".to_owned(),
            message: format!(
                "the registry password of {} cannot be read with this service's secret key",
                template.name
            ),
        })?;
    let name = format!("registry-{id}");
    let key = ObjectKey::new(spec.key.cluster.clone(), spec.key.namespace.clone(), name.clone());
    let meta = Metadata::new(key, labels::for_project(&spec.labels[labels::PROJECT]))?;
    let secret = image_pull_secret(
        &meta,
        launch::registry_of(&spec.containers[0].image),
        &template.registry_user,
        &String::from_utf8_lossy(&password),
    )?;
    cluster.apply_object(&secret).await?;
    spec.image_pull_secrets.push(name.clone());
    for container in &mut spec.containers {
        if let Some(slot) = container.env.iter_mut().find(|(key, _)| key == "HUBSECRET") {
            slot.1.clone_from(&name);
        }
    }
    Ok(())
}

/// Whether the runtime refused a workload for good (not a passing failure).
fn is_refusal(error: &RuntimeError) -> bool {
    matches!(error, RuntimeError::Invalid { .. })
}

fn runtime_error(error: RuntimeError) -> ApiError {
    ApiError::Unavailable {
        service: "runtime".to_owned(),
        source: Box::new(error),
    }
}

/// The key of the workload `name` of a task of `run`.
fn key_of(snapshot: &Snapshot, run: &RunProgress, name: &str) -> Option<ObjectKey> {
    let task = run
        .tasks
        .iter()
        .find(|task| task.attempts.iter().any(|attempt| attempt.workload == name))?;
    let placement = snapshot.placements.get(&task.name)?;
    Some(ObjectKey::new(
        placement.cluster.clone(),
        placement.namespace.clone(),
        name,
    ))
}

/// The statuses of run `id`'s live workloads, by name: each asked for by its key when there are few (a step of a
/// long chain then costs the same at its first task and its thousandth), or every workload of the run listed from
/// each cluster and namespace its tasks are placed in.
async fn observe(
    runtime: &Runtimes,
    id: &str,
    snapshot: &Snapshot,
    run: &RunProgress,
) -> Result<HashMap<String, cube_runtime::WorkloadStatus>, RuntimeError> {
    let live: Vec<ObjectKey> = run
        .tasks
        .iter()
        .filter(|task| task.state == State::Running)
        .filter_map(|task| task.attempts.last())
        .filter(|attempt| attempt.state.is_live())
        .filter_map(|attempt| key_of(snapshot, run, &attempt.workload))
        .collect();
    let mut observed = HashMap::new();
    if live.len() <= ASKED_ONE_BY_ONE {
        for key in live {
            if let Some(status) = runtime.status(&key).await? {
                observed.insert(key.name, status);
            }
        }
        return Ok(observed);
    }
    let places: BTreeSet<(&str, &str)> = snapshot
        .placements
        .values()
        .map(|placement| (placement.cluster.as_str(), placement.namespace.as_str()))
        .collect();
    let selector = BTreeMap::from([(labels::RUN.to_owned(), id.to_owned())]);
    for (cluster, namespace) in places {
        for status in runtime.list(cluster, Some(namespace), &selector).await? {
            observed.insert(status.key.name.clone(), status);
        }
    }
    Ok(observed)
}

/// A run's progress as the store and its snapshot tell it.
pub(crate) fn progress_of(record: &RunRecord, snapshot: &Snapshot) -> RunProgress {
    let tasks = record
        .tasks
        .iter()
        .map(|row| {
            let task = snapshot.task(&row.name).cloned().unwrap_or_default();
            let policy = task.retry.unwrap_or_default();
            let ms = |duration: Option<prost_types::Duration>, default: i64| {
                duration.map_or(default, |d| {
                    d.seconds
                        .saturating_mul(1000)
                        .saturating_add(i64::from(d.nanos / 1_000_000))
                })
            };
            TaskProgress {
                name: row.name.clone(),
                state: State::parse(&row.state).unwrap_or(State::Pending),
                reason: row.reason.clone(),
                retries: row.retries,
                next_attempt_ms: row.next_attempt_ms,
                upstream: task.upstream.clone(),
                skip: task.skip,
                retry: Retry {
                    limit: policy.limit.max(0),
                    on: match policy.retry_on {
                        2 => RetryOn::Error,
                        3 => RetryOn::Always,
                        _ => RetryOn::Failure,
                    },
                    backoff_ms: ms(policy.backoff, DEFAULT_BACKOFF_MS),
                    factor: if policy.backoff_factor >= 1.0 {
                        policy.backoff_factor
                    } else {
                        2.0
                    },
                    max_backoff_ms: ms(policy.max_backoff, DEFAULT_MAX_BACKOFF_MS),
                },
                timeout_ms: Some(ms(task.timeout, 0)).filter(|ms| *ms > 0),
                attempts: record
                    .attempts
                    .get(&row.name)
                    .map(|rows| rows.iter().map(attempt_of).collect())
                    .unwrap_or_default(),
            }
        })
        .collect();
    RunProgress {
        id: record.run.id.clone(),
        state: State::parse(&record.run.state).unwrap_or(State::Pending),
        reason: record.run.reason.clone(),
        parallelism: snapshot.pipeline.parallelism,
        started_ms: record.run.started_ms,
        ended_ms: record.run.ended_ms,
        tasks,
    }
}

fn attempt_of(row: &attempt::Model) -> Attempt {
    Attempt {
        number: row.number,
        state: State::parse(&row.state).unwrap_or(State::Failed),
        applied: row.applied,
        workload: row.workload.clone(),
        node: row.node.clone(),
        started_ms: row.started_ms,
        ended_ms: row.ended_ms,
        exit_code: row.exit_code,
        reason: row.reason.clone(),
        message: row.message.clone(),
        infrastructure: row.infrastructure,
    }
}
