//! Status changes as the [`WorkloadTransition`] events the watcher and the local runtime publish.

use std::time::SystemTime;

use cube_proto::cube::watcher::v1::{ObjectKind, WorkloadState, WorkloadTransition};

use crate::spec::labels;
use crate::status::{Phase, WorkloadStatus};

/// The bus topic of [`WorkloadTransition`]s.
pub const TOPIC: &str = "workload.transition";

/// The state a phase is published as.
pub fn state_of(phase: Phase) -> WorkloadState {
    match phase {
        Phase::Pending => WorkloadState::Pending,
        Phase::Running => WorkloadState::Running,
        Phase::Succeeded => WorkloadState::Succeeded,
        Phase::Failed => WorkloadState::Failed,
        Phase::Unknown => WorkloadState::Unknown,
    }
}

/// Whether `after` differs from `before` in anything a transition reports: phase, readiness, reason, exit code,
/// container restarts, ready replicas or labels (not the message, node, address or version alone).
pub fn changed(before: &WorkloadStatus, after: &WorkloadStatus) -> bool {
    before.phase != after.phase
        || before.ready != after.ready
        || before.reason != after.reason
        || before.exit_code != after.exit_code
        || before.restarts != after.restarts
        || before.ready_replicas != after.ready_replicas
        || before.labels != after.labels
}

/// The transition of the object `uid` of `kind` from `before` (`None` when it was not known) to `after`, or
/// `None` when nothing a transition reports changed.
pub fn transition(
    kind: ObjectKind,
    uid: &str,
    before: Option<&WorkloadStatus>,
    after: &WorkloadStatus,
    time: SystemTime,
) -> Option<WorkloadTransition> {
    if before.is_some_and(|before| !changed(before, after)) {
        return None;
    }
    let mut event = base(kind, uid, after, time);
    event.from_state = before.map_or(WorkloadState::Unspecified, |before| state_of(before.phase)) as i32;
    event.to_state = state_of(after.phase) as i32;
    Some(event)
}

/// The transition of the object `uid` of `kind`, last seen as `last`, to deleted.
pub fn deleted(kind: ObjectKind, uid: &str, last: &WorkloadStatus, time: SystemTime) -> WorkloadTransition {
    let mut event = base(kind, uid, last, time);
    event.from_state = state_of(last.phase) as i32;
    event.to_state = WorkloadState::Deleted as i32;
    event.ready = false;
    event.id = format!("{}/{uid}/deleted", last.key.cluster);
    event
}

/// The fields every transition of `status` carries.
fn base(kind: ObjectKind, uid: &str, status: &WorkloadStatus, time: SystemTime) -> WorkloadTransition {
    let project = status
        .labels
        .get(labels::PROJECT)
        .map(|project| format!("projects/{project}"))
        .unwrap_or_default();
    WorkloadTransition {
        id: format!("{}/{uid}/{}", status.key.cluster, status.version),
        kind: kind as i32,
        cluster: status.key.cluster.clone(),
        namespace: status.key.namespace.clone(),
        name: status.key.name.clone(),
        uid: uid.to_owned(),
        project,
        labels: status
            .labels
            .iter()
            .filter(|(key, _)| kind == ObjectKind::Node || key.starts_with("cube.io/"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        from_state: WorkloadState::Unspecified as i32,
        to_state: WorkloadState::Unspecified as i32,
        ready: status.ready,
        reason: status.reason.clone().unwrap_or_default(),
        message: status.message.clone().unwrap_or_default(),
        exit_code: status.exit_code,
        container_restarts: i32::try_from(status.restarts).unwrap_or(i32::MAX),
        node: status.node.clone().unwrap_or_default(),
        ready_replicas: status
            .ready_replicas
            .map_or(0, |ready| i32::try_from(ready).unwrap_or(i32::MAX)),
        time: Some(time.into()),
        source_version: status.version.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ObjectKey;

    fn status(phase: Phase) -> WorkloadStatus {
        let mut status = WorkloadStatus::new(ObjectKey::new("local", "pipeline", "run-1-task-a-1"), phase);
        status.labels = labels::for_project("vision");
        status.labels.insert(labels::RUN.into(), "run-1".into());
        status.version = "7".into();
        status
    }

    #[test]
    fn a_new_object_is_a_transition_from_unspecified() {
        let event = transition(
            ObjectKind::LocalProcess,
            "u1",
            None,
            &status(Phase::Pending),
            SystemTime::now(),
        )
        .expect("a transition");
        assert_eq!(event.from_state, WorkloadState::Unspecified as i32);
        assert_eq!(event.to_state, WorkloadState::Pending as i32);
        assert_eq!(event.project, "projects/vision");
        assert_eq!(event.labels.get("cube.io/run").map(String::as_str), Some("run-1"));
        assert!(!event.labels.contains_key(labels::MANAGED_BY));
        assert_eq!(event.id, "local/u1/7");
    }

    #[test]
    fn only_changes_that_matter_are_transitions() {
        let running = status(Phase::Running);
        let mut moved = running.clone();
        moved.version = "8".into();
        moved.message = Some("still running".into());
        assert!(transition(ObjectKind::Pod, "u1", Some(&running), &moved, SystemTime::now()).is_none());
        let mut failed = moved.clone();
        failed.phase = Phase::Failed;
        failed.exit_code = Some(3);
        let event = transition(ObjectKind::Pod, "u1", Some(&running), &failed, SystemTime::now()).expect("a change");
        assert_eq!(event.from_state, WorkloadState::Running as i32);
        assert_eq!(event.to_state, WorkloadState::Failed as i32);
        assert_eq!(event.exit_code, Some(3));
        let mut restarted = running.clone();
        restarted.restarts = 1;
        assert!(transition(ObjectKind::Pod, "u1", Some(&running), &restarted, SystemTime::now()).is_some());
    }

    #[test]
    fn deletion_is_a_transition_to_deleted() {
        let event = deleted(ObjectKind::Pod, "u1", &status(Phase::Running), SystemTime::now());
        assert_eq!(event.from_state, WorkloadState::Running as i32);
        assert_eq!(event.to_state, WorkloadState::Deleted as i32);
        assert_eq!(event.id, "local/u1/deleted");
    }
}
