//! How a run moves on: given its tasks, their attempts, what the runtime reports of the attempts' workloads and
//! the time, the next state of each, which attempts to start and which workloads to delete. A plain function
//! over plain values; the engine reads them from the store and the runtime, and writes and acts on the result.

use std::collections::{BTreeSet, HashMap, HashSet};

use cube_runtime::{Phase, WorkloadStatus, reasons};

/// A run's, task's or attempt's state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum State {
    /// Not started.
    Pending,
    /// Waiting for quota.
    Queued,
    /// Started.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished badly.
    Failed,
    /// Skipped (tasks).
    Skipped,
    /// Being canceled (runs).
    Canceling,
    /// Canceled.
    Canceled,
}

impl State {
    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Queued => "QUEUED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Skipped => "SKIPPED",
            Self::Canceling => "CANCELING",
            Self::Canceled => "CANCELED",
        }
    }

    /// The state of a stored name.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Skipped,
            Self::Canceling,
            Self::Canceled,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }

    /// Whether nothing more happens in it.
    pub(crate) fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped | Self::Canceled)
    }

    /// Whether a run in it still has work to do.
    pub(crate) fn is_live(self) -> bool {
        !self.is_final()
    }
}

/// When a failure is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryOn {
    /// The program failed.
    Failure,
    /// It could not run.
    Error,
    /// Both.
    Always,
}

/// A task's retry policy, with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Retry {
    /// Retries after the first attempt.
    pub(crate) limit: i32,
    /// Which failures.
    pub(crate) on: RetryOn,
    /// The first wait, ms.
    pub(crate) backoff_ms: i64,
    /// Each further wait's factor.
    pub(crate) factor: f64,
    /// The longest wait, ms.
    pub(crate) max_backoff_ms: i64,
}

impl Retry {
    /// The wait before retry number `retry` (from 1).
    pub(crate) fn backoff(&self, retry: i32) -> i64 {
        let exponent = retry.saturating_sub(1).clamp(0, 60);
        let wait = (self.backoff_ms as f64) * self.factor.max(1.0).powi(exponent);
        (wait.min(self.max_backoff_ms as f64)).max(0.0) as i64
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// Its number, from 1.
    pub(crate) number: i32,
    /// Its state: pending, running, succeeded, failed or canceled.
    pub(crate) state: State,
    /// Whether its workload was applied.
    pub(crate) applied: bool,
    /// Its workload's name.
    pub(crate) workload: String,
    /// Its node.
    pub(crate) node: String,
    /// Started, ms.
    pub(crate) started_ms: Option<i64>,
    /// Ended, ms.
    pub(crate) ended_ms: Option<i64>,
    /// The exit code.
    pub(crate) exit_code: Option<i32>,
    /// Why it ended so.
    pub(crate) reason: String,
    /// The message with the reason.
    pub(crate) message: String,
    /// Whether the failure was outside the task.
    pub(crate) infrastructure: bool,
}

/// One task of a run, with what the pipeline says of it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskProgress {
    /// Its name.
    pub(crate) name: String,
    /// Its state.
    pub(crate) state: State,
    /// Why.
    pub(crate) reason: String,
    /// Retries used.
    pub(crate) retries: i32,
    /// When the next attempt may start, ms.
    pub(crate) next_attempt_ms: Option<i64>,
    /// The tasks that must succeed first.
    pub(crate) upstream: Vec<String>,
    /// Whether it is skipped.
    pub(crate) skip: bool,
    /// Its retry policy.
    pub(crate) retry: Retry,
    /// How long an attempt may run, ms.
    pub(crate) timeout_ms: Option<i64>,
    /// Its attempts, oldest first.
    pub(crate) attempts: Vec<Attempt>,
}

/// A run and its tasks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunProgress {
    /// The run id.
    pub(crate) id: String,
    /// Its state.
    pub(crate) state: State,
    /// Why.
    pub(crate) reason: String,
    /// How many tasks may run at once (0: any).
    pub(crate) parallelism: i32,
    /// Its first task started, ms.
    pub(crate) started_ms: Option<i64>,
    /// It finished, ms.
    pub(crate) ended_ms: Option<i64>,
    /// The tasks in the pipeline's order.
    pub(crate) tasks: Vec<TaskProgress>,
}

/// What the engine does besides writing the new state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Effects {
    /// Workloads to delete before the new state is written (canceled or timed-out attempts).
    pub(crate) delete: Vec<String>,
    /// Attempts (task, number) to apply after the new state is written: new ones, and recorded ones whose
    /// apply a crash interrupted.
    pub(crate) apply: Vec<(String, i32)>,
}

/// What admission decided for the tasks [`ready`] named: the granted ones may start; the held ones wait, with
/// the reason (the quota and resource that block them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Quota {
    /// Tasks whose admission holds.
    pub(crate) granted: HashSet<String>,
    /// Tasks a quota holds back, with why.
    pub(crate) held: HashMap<String, String>,
}

/// The tasks of `run` that would start at `now`: pending or queued, everything upstream succeeded or skipped,
/// their retry wait over, not skipped themselves, as many as the parallelism leaves room for. They need an
/// admission first.
pub(crate) fn ready(run: &RunProgress, now: i64) -> Vec<String> {
    if !matches!(run.state, State::Pending | State::Queued | State::Running) {
        return Vec::new();
    }
    let state: HashMap<&str, State> = run.tasks.iter().map(|task| (task.name.as_str(), task.state)).collect();
    let running = run.tasks.iter().filter(|task| task.state == State::Running).count();
    let room = usize::try_from(run.parallelism)
        .ok()
        .filter(|limit| *limit > 0)
        .map_or(usize::MAX, |limit| limit.saturating_sub(running));
    run.tasks
        .iter()
        .filter(|task| matches!(task.state, State::Pending | State::Queued) && !task.skip)
        .filter(|task| task.next_attempt_ms.is_none_or(|at| at <= now))
        .filter(|task| {
            task.upstream
                .iter()
                .all(|upstream| matches!(state.get(upstream.as_str()), Some(State::Succeeded | State::Skipped)))
        })
        .take(room)
        .map(|task| task.name.clone())
        .collect()
}

/// Reasons that mean an attempt failed for something outside the task: tried again without counting.
const INFRASTRUCTURE: [&str; 5] = [reasons::LOST, "Evicted", "NodeLost", "Preempted", "Shutdown"];
/// Reasons that mean the workload could not run at all (`RETRY_ON_ERROR`).
const ERRORS: [&str; 5] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerError",
    "Unschedulable",
];

/// Moves `run` on, given the statuses of its workloads by name (those the runtime listed) at `now` (ms) and
/// what admission decided for the tasks [`ready`] named: only granted tasks start. The engine takes the two
/// halves apart ([`observe_run`], then [`start_ready`]) to ask admission about what is ready once the statuses
/// are taken in, so that a task starts in the same step its upstream ends.
#[cfg(test)]
pub(crate) fn step(
    run: &mut RunProgress,
    observed: &HashMap<String, WorkloadStatus>,
    now: i64,
    quota: &Quota,
) -> Effects {
    let mut effects = observe_run(run, observed, now);
    start_ready(run, now, quota, &mut effects);
    effects
}

/// The first half of a step: takes in the statuses of `run`'s workloads by name (those the runtime listed) at
/// `now` (ms), or carries a cancel out.
pub(crate) fn observe_run(run: &mut RunProgress, observed: &HashMap<String, WorkloadStatus>, now: i64) -> Effects {
    let mut effects = Effects::default();
    if run.state.is_final() {
        return effects;
    }
    if run.state == State::Canceling {
        cancel(run, now, &mut effects);
        return effects;
    }
    for task in &mut run.tasks {
        observe(task, observed, now, &mut effects);
    }
    effects
}

/// The second half of a step: starts the ready tasks admission granted (those it holds wait `QUEUED` with its
/// reason), within the parallelism, and sets the run's state from its tasks'.
pub(crate) fn start_ready(run: &mut RunProgress, now: i64, quota: &Quota, effects: &mut Effects) {
    if run.state.is_final() || run.state == State::Canceling {
        return;
    }
    let finished: HashMap<String, State> = run.tasks.iter().map(|task| (task.name.clone(), task.state)).collect();
    let mut running = run.tasks.iter().filter(|task| task.state == State::Running).count();
    let limit = usize::try_from(run.parallelism).ok().filter(|limit| *limit > 0);
    let run_id = run.id.clone();
    for task in &mut run.tasks {
        if !matches!(task.state, State::Pending | State::Queued) {
            continue;
        }
        let blocked: Vec<&str> = task
            .upstream
            .iter()
            .filter(|upstream| !matches!(finished.get(*upstream), Some(State::Succeeded | State::Skipped)))
            .map(String::as_str)
            .collect();
        if !blocked.is_empty() {
            let failed: Vec<&str> = blocked
                .iter()
                .copied()
                .filter(|upstream| matches!(finished.get(*upstream), Some(State::Failed | State::Canceled)))
                .collect();
            task.reason = if failed.is_empty() {
                format!("waiting for {}", blocked.join(", "))
            } else {
                format!("not started: {} did not succeed", failed.join(", "))
            };
            continue;
        }
        if task.skip {
            task.state = State::Skipped;
            task.reason = "skipped by the pipeline".to_owned();
            continue;
        }
        if task.next_attempt_ms.is_some_and(|at| at > now) {
            continue;
        }
        if limit.is_some_and(|limit| running >= limit) {
            task.reason = format!("waiting: {} tasks run at once at most", run.parallelism);
            continue;
        }
        if let Some(reason) = quota.held.get(&task.name) {
            task.state = State::Queued;
            task.reason = format!("waiting for quota: {reason}");
            continue;
        }
        if !quota.granted.contains(&task.name) {
            // Ready only now: admitted on the next step.
            continue;
        }
        let number = task.attempts.last().map_or(1, |last| last.number + 1);
        task.attempts.push(Attempt {
            number,
            state: State::Pending,
            applied: false,
            workload: crate::launch::workload_name(&task.name, &run_id, number),
            node: String::new(),
            started_ms: None,
            ended_ms: None,
            exit_code: None,
            reason: String::new(),
            message: String::new(),
            infrastructure: false,
        });
        task.state = State::Running;
        task.reason = String::new();
        task.next_attempt_ms = None;
        effects.apply.push((task.name.clone(), number));
        running += 1;
    }
    // Skipped tasks may have unblocked others: the next step starts them.
    settle(run, now);
}

/// Whether a task can still run: pending with no failed or canceled task upstream (directly or further up).
fn can_still_run(run: &RunProgress) -> BTreeSet<String> {
    let state: HashMap<&str, State> = run.tasks.iter().map(|task| (task.name.as_str(), task.state)).collect();
    let mut dead: BTreeSet<String> = run
        .tasks
        .iter()
        .filter(|task| matches!(task.state, State::Failed | State::Canceled))
        .map(|task| task.name.clone())
        .collect();
    // Propagate through the DAG until nothing changes (the DAG is small and acyclic).
    loop {
        let before = dead.len();
        for task in &run.tasks {
            if task.upstream.iter().any(|upstream| dead.contains(upstream)) {
                dead.insert(task.name.clone());
            }
        }
        if dead.len() == before {
            break;
        }
    }
    run.tasks
        .iter()
        .filter(|task| {
            matches!(state.get(task.name.as_str()), Some(State::Pending | State::Queued)) && !dead.contains(&task.name)
        })
        .map(|task| task.name.clone())
        .collect()
}

/// Sets the run's state from its tasks'.
fn settle(run: &mut RunProgress, now: i64) {
    let live = run.tasks.iter().any(|task| task.state == State::Running);
    let startable = can_still_run(run);
    if live || !startable.is_empty() {
        if run.state != State::Running {
            run.state = State::Running;
            run.reason = String::new();
        }
        if live && run.started_ms.is_none() {
            run.started_ms = Some(now);
        }
        return;
    }
    let failed: Vec<&str> = run
        .tasks
        .iter()
        .filter(|task| task.state == State::Failed)
        .map(|task| task.name.as_str())
        .collect();
    if failed.is_empty() {
        run.state = State::Succeeded;
        run.reason = String::new();
    } else {
        run.state = State::Failed;
        run.reason = format!("failed: {}", failed.join(", "));
    }
    run.started_ms.get_or_insert(now);
    run.ended_ms = Some(now);
}

/// Cancels every live attempt and unfinished task, and the run.
fn cancel(run: &mut RunProgress, now: i64, effects: &mut Effects) {
    for task in &mut run.tasks {
        if let Some(attempt) = task.attempts.last_mut()
            && attempt.state.is_live()
        {
            attempt.state = State::Canceled;
            attempt.ended_ms = Some(now);
            attempt.reason = "Canceled".to_owned();
            attempt.message = "the run was canceled".to_owned();
            effects.delete.push(attempt.workload.clone());
        }
        if !task.state.is_final() {
            task.state = State::Canceled;
            task.reason = "the run was canceled".to_owned();
            task.next_attempt_ms = None;
        }
    }
    run.state = State::Canceled;
    run.ended_ms = Some(now);
}

/// Folds what the runtime reports of a task's live attempt into it, stops it at its timeout, and decides what a
/// finished attempt means for the task.
fn observe(task: &mut TaskProgress, observed: &HashMap<String, WorkloadStatus>, now: i64, effects: &mut Effects) {
    let Some(attempt) = task.attempts.last_mut() else {
        return;
    };
    if task.state != State::Running {
        return;
    }
    // An attempt that ended without the runtime (refused by it) is decided on below.
    if attempt.state.is_live() {
        match observed.get(&attempt.workload) {
            None if !attempt.applied => {
                // Recorded, and the process stopped before applying it: apply it now, under the same name.
                effects.apply.push((task.name.clone(), attempt.number));
                return;
            }
            None => {
                attempt.state = State::Failed;
                attempt.ended_ms = Some(now);
                attempt.reason = reasons::DELETED.to_owned();
                attempt.message = "its workload disappeared".to_owned();
                attempt.infrastructure = true;
            }
            Some(status) => {
                attempt.applied = true;
                if let Some(node) = &status.node {
                    node.clone_into(&mut attempt.node);
                }
                if let Some(started) = status.started_at {
                    attempt.started_ms.get_or_insert(started.timestamp_millis());
                }
                match status.phase {
                    Phase::Pending | Phase::Unknown => {
                        attempt.reason = status.reason.clone().unwrap_or_default();
                    }
                    Phase::Running => {
                        attempt.state = State::Running;
                        attempt.started_ms.get_or_insert(now);
                        attempt.reason.clear();
                    }
                    Phase::Succeeded => {
                        attempt.state = State::Succeeded;
                        attempt.exit_code = status.exit_code.or(Some(0));
                        attempt.reason = status.reason.clone().unwrap_or_else(|| "Completed".to_owned());
                        attempt.ended_ms = Some(status.finished_at.map_or(now, |at| at.timestamp_millis()));
                    }
                    Phase::Failed => {
                        let reason = status.reason.clone().unwrap_or_else(|| "Error".to_owned());
                        attempt.state = State::Failed;
                        attempt.exit_code = status.exit_code;
                        attempt.infrastructure = INFRASTRUCTURE.contains(&reason.as_str());
                        attempt.reason = reason;
                        attempt.message = status.message.clone().unwrap_or_default();
                        attempt.ended_ms = Some(status.finished_at.map_or(now, |at| at.timestamp_millis()));
                    }
                }
                if attempt.state == State::Pending
                    && status.reason.as_deref().is_some_and(|reason| ERRORS.contains(&reason))
                    && matches!(task.retry.on, RetryOn::Error | RetryOn::Always)
                {
                    // A pod that cannot start waits forever: for a task that retries errors, it is a failure.
                    attempt.state = State::Failed;
                    attempt.ended_ms = Some(now);
                    attempt.message = status.message.clone().unwrap_or_default();
                    effects.delete.push(attempt.workload.clone());
                }
            }
        }
        if let Some(timeout) = task.timeout_ms
            && attempt.state.is_live()
            && attempt.started_ms.is_some_and(|started| now - started >= timeout)
        {
            attempt.state = State::Failed;
            attempt.ended_ms = Some(now);
            attempt.reason = reasons::DEADLINE_EXCEEDED.to_owned();
            attempt.message = format!("stopped after its timeout of {} s", timeout / 1000);
            effects.delete.push(attempt.workload.clone());
        }
    }
    match attempt.state {
        State::Succeeded => {
            task.state = State::Succeeded;
            task.reason.clear();
        }
        State::Failed if attempt.infrastructure => {
            task.state = State::Pending;
            task.reason = format!("attempt {} was lost ({}); trying again", attempt.number, attempt.reason);
            task.next_attempt_ms = Some(now);
        }
        State::Failed => {
            let error = ERRORS.contains(&attempt.reason.as_str());
            let retried = match task.retry.on {
                RetryOn::Always => true,
                RetryOn::Failure => !error,
                RetryOn::Error => error,
            };
            if retried && task.retries < task.retry.limit {
                task.retries += 1;
                let wait = task.retry.backoff(task.retries);
                task.state = State::Pending;
                task.next_attempt_ms = Some(now + wait);
                task.reason = format!(
                    "attempt {} failed ({}); retry {} of {} in {} ms",
                    attempt.number, attempt.reason, task.retries, task.retry.limit, wait
                );
            } else {
                task.state = State::Failed;
                task.reason = format!(
                    "attempt {} failed: {}{}",
                    attempt.number,
                    attempt.reason,
                    attempt
                        .exit_code
                        .map(|code| format!(" (exit code {code})"))
                        .unwrap_or_default()
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cube_runtime::ObjectKey;

    fn task(name: &str, upstream: &[&str]) -> TaskProgress {
        TaskProgress {
            name: name.to_owned(),
            state: State::Pending,
            reason: String::new(),
            retries: 0,
            next_attempt_ms: None,
            upstream: upstream.iter().map(|name| (*name).to_owned()).collect(),
            skip: false,
            retry: Retry {
                limit: 0,
                on: RetryOn::Failure,
                backoff_ms: 1000,
                factor: 2.0,
                max_backoff_ms: 5000,
            },
            timeout_ms: None,
            attempts: Vec::new(),
        }
    }

    fn run(tasks: Vec<TaskProgress>, parallelism: i32) -> RunProgress {
        RunProgress {
            id: "r1".into(),
            state: State::Pending,
            reason: String::new(),
            parallelism,
            started_ms: None,
            ended_ms: None,
            tasks,
        }
    }

    fn status(name: &str, phase: Phase, exit: Option<i32>, reason: Option<&str>) -> (String, WorkloadStatus) {
        let mut status = WorkloadStatus::new(ObjectKey::new("c", "ns", name), phase);
        status.exit_code = exit;
        status.reason = reason.map(str::to_owned);
        (name.to_owned(), status)
    }

    /// Admission granting every task.
    fn granted(run: &RunProgress) -> Quota {
        Quota {
            granted: run.tasks.iter().map(|task| task.name.clone()).collect(),
            held: HashMap::new(),
        }
    }

    /// One step with every task admitted.
    fn go(run: &mut RunProgress, observed: &HashMap<String, WorkloadStatus>, now: i64) -> Effects {
        let quota = granted(run);
        step(run, observed, now, &quota)
    }

    fn started(effects: &Effects) -> Vec<&str> {
        effects.apply.iter().map(|(task, _)| task.as_str()).collect()
    }

    #[test]
    fn a_diamond_runs_in_order() {
        let mut diamond = run(
            vec![
                task("a", &[]),
                task("b", &["a"]),
                task("c", &["a"]),
                task("d", &["b", "c"]),
            ],
            0,
        );
        assert_eq!(started(&go(&mut diamond, &HashMap::new(), 0)), ["a"]);
        assert_eq!(diamond.state, State::Running);
        // Recorded and applied: the runtime reports it running, then done.
        let seen = HashMap::from([status("a-r1-1", Phase::Succeeded, Some(0), None)]);
        assert_eq!(started(&go(&mut diamond, &seen, 1)), ["b", "c"]);
        let seen = HashMap::from([
            status("a-r1-1", Phase::Succeeded, Some(0), None),
            status("b-r1-1", Phase::Succeeded, Some(0), None),
            status("c-r1-1", Phase::Running, None, None),
        ]);
        assert!(started(&go(&mut diamond, &seen, 2)).is_empty());
        let seen = HashMap::from([
            status("b-r1-1", Phase::Succeeded, Some(0), None),
            status("c-r1-1", Phase::Succeeded, Some(0), None),
        ]);
        assert_eq!(started(&go(&mut diamond, &seen, 3)), ["d"]);
        let seen = HashMap::from([status("d-r1-1", Phase::Succeeded, Some(0), None)]);
        go(&mut diamond, &seen, 4);
        assert_eq!(diamond.state, State::Succeeded);
        assert_eq!(diamond.ended_ms, Some(4));
    }

    #[test]
    fn parallelism_holds_on_a_fan_out() {
        let mut tasks = vec![task("root", &[])];
        tasks.extend((0..10).map(|i| task(&format!("t{i}"), &["root"])));
        let mut fan = run(tasks, 2);
        go(&mut fan, &HashMap::new(), 0);
        let seen = HashMap::from([status("root-r1-1", Phase::Succeeded, Some(0), None)]);
        assert_eq!(started(&go(&mut fan, &seen, 1)), ["t0", "t1"]);
        let seen = HashMap::from([
            status("t0-r1-1", Phase::Succeeded, Some(0), None),
            status("t1-r1-1", Phase::Running, None, None),
        ]);
        assert_eq!(started(&go(&mut fan, &seen, 2)), ["t2"]);
        assert_eq!(fan.tasks[5].reason, "waiting: 2 tasks run at once at most");
    }

    #[test]
    fn a_failing_task_retries_with_backoff_then_fails_the_run() {
        let mut failing = task("a", &[]);
        failing.retry.limit = 2;
        let mut one = run(vec![failing, task("b", &["a"])], 0);
        go(&mut one, &HashMap::new(), 0);
        let seen = HashMap::from([status("a-r1-1", Phase::Failed, Some(1), Some("Error"))]);
        assert!(started(&go(&mut one, &seen, 10)).is_empty());
        assert_eq!(one.tasks[0].next_attempt_ms, Some(1010));
        assert!(started(&go(&mut one, &seen, 1009)).is_empty());
        assert_eq!(started(&go(&mut one, &seen, 1010)), ["a"]);
        let seen = HashMap::from([status("a-r1-2", Phase::Failed, Some(1), Some("Error"))]);
        go(&mut one, &seen, 1020);
        assert_eq!(one.tasks[0].next_attempt_ms, Some(3020), "the second wait doubles");
        assert_eq!(started(&go(&mut one, &seen, 3020)), ["a"]);
        let seen = HashMap::from([status("a-r1-3", Phase::Failed, Some(3), Some("Error"))]);
        go(&mut one, &seen, 4000);
        assert_eq!(one.tasks[0].state, State::Failed);
        assert_eq!(one.tasks[0].reason, "attempt 3 failed: Error (exit code 3)");
        assert_eq!(one.tasks[1].state, State::Pending);
        assert_eq!(one.state, State::Failed);
        assert_eq!(one.reason, "failed: a");
    }

    #[test]
    fn lost_attempts_are_tried_again_without_counting() {
        let mut one = run(vec![task("a", &[])], 0);
        go(&mut one, &HashMap::new(), 0);
        let seen = HashMap::from([status("a-r1-1", Phase::Failed, None, Some(reasons::LOST))]);
        go(&mut one, &seen, 5);
        assert_eq!(started(&go(&mut one, &seen, 5)), ["a"]);
        assert_eq!(one.tasks[0].retries, 0);
        assert!(one.tasks[0].attempts[0].infrastructure);
    }

    #[test]
    fn a_recorded_attempt_that_was_never_applied_is_applied_again_under_its_name() {
        let mut one = run(vec![task("a", &[])], 0);
        go(&mut one, &HashMap::new(), 0);
        // The process died after recording attempt 1 and before applying it.
        assert_eq!(go(&mut one, &HashMap::new(), 1).apply, [("a".to_owned(), 1)]);
        assert_eq!(one.tasks[0].attempts.len(), 1);
    }

    #[test]
    fn a_timeout_stops_the_attempt() {
        let mut slow = task("a", &[]);
        slow.timeout_ms = Some(1000);
        let mut one = run(vec![slow], 0);
        go(&mut one, &HashMap::new(), 0);
        let seen = HashMap::from([status("a-r1-1", Phase::Running, None, None)]);
        go(&mut one, &seen, 100);
        let effects = go(&mut one, &seen, 1100);
        assert_eq!(effects.delete, ["a-r1-1"]);
        assert_eq!(one.tasks[0].attempts[0].reason, reasons::DEADLINE_EXCEEDED);
        assert_eq!(one.state, State::Failed);
    }

    #[test]
    fn canceling_deletes_live_workloads_and_ends_at_once() {
        let mut two = run(vec![task("a", &[]), task("b", &["a"])], 0);
        go(&mut two, &HashMap::new(), 0);
        two.state = State::Canceling;
        let effects = go(&mut two, &HashMap::new(), 7);
        assert_eq!(effects.delete, ["a-r1-1"]);
        assert_eq!(two.state, State::Canceled);
        assert_eq!(two.tasks[1].state, State::Canceled);
    }

    #[test]
    fn skipped_tasks_let_downstream_run() {
        let mut skipped = task("a", &[]);
        skipped.skip = true;
        let mut two = run(vec![skipped, task("b", &["a"])], 0);
        go(&mut two, &HashMap::new(), 0);
        assert_eq!(two.tasks[0].state, State::Skipped);
        assert_eq!(started(&go(&mut two, &HashMap::new(), 1)), ["b"]);
    }

    #[test]
    fn quota_holds_tasks_back_with_the_reason_and_ready_names_what_would_start() {
        let mut fan = run(vec![task("a", &[]), task("b", &[]), task("c", &["a"])], 0);
        assert_eq!(ready(&fan, 0), ["a", "b"]);
        let quota = Quota {
            granted: HashSet::from(["a".to_owned()]),
            held: HashMap::from([("b".to_owned(), "cpu 0.8 of 1 in use".to_owned())]),
        };
        assert_eq!(started(&step(&mut fan, &HashMap::new(), 0, &quota)), ["a"]);
        assert_eq!(fan.tasks[1].state, State::Queued);
        assert_eq!(fan.tasks[1].reason, "waiting for quota: cpu 0.8 of 1 in use");
        assert_eq!(fan.state, State::Running, "a run with a queued task goes on");
        assert_eq!(ready(&fan, 1), ["b"], "a queued task is asked for again");
        let limited = run(vec![task("a", &[]), task("b", &[]), task("c", &[])], 2);
        assert_eq!(ready(&limited, 0), ["a", "b"], "no more than the parallelism");
    }
}
