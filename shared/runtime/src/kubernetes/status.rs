//! A Pod as a [`WorkloadStatus`].

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::spec::ObjectKey;
use crate::status::{Phase, WorkloadStatus};

/// Waiting reasons that are the normal way to start, not something to report.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// The status of `pod` on `cluster`: its phase, readiness, the reason something went wrong (the pod's own, such as
/// `Evicted` or `DeadlineExceeded`, else a container waiting for a reason other than starting, such as
/// `ImagePullBackOff`, else how the main container ended, such as `OOMKilled`), the main container's exit code and
/// times, restarts summed over all containers, node, address, ports and `resourceVersion`.
pub fn pod_status(cluster: &str, pod: &Pod) -> WorkloadStatus {
    let meta = &pod.metadata;
    let key = ObjectKey::new(
        cluster,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        Some("Unknown") => Phase::Unknown,
        _ => Phase::Pending,
    };
    let mut result = WorkloadStatus::new(key, phase);
    result.labels = meta.labels.clone().unwrap_or_default();
    result.version = meta.resource_version.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    result.node = spec.and_then(|s| s.node_name.clone());
    if let Some(spec) = spec {
        for container in &spec.containers {
            for port in container.ports.iter().flatten() {
                let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) else {
                    continue;
                };
                result.ports.insert(name.clone(), number);
            }
        }
    }
    let Some(status) = status else {
        return result;
    };
    result.address = status.pod_ip.clone().filter(|ip| !ip.is_empty());
    result.ready = status
        .conditions
        .iter()
        .flatten()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True");
    let containers = status.container_statuses.as_deref().unwrap_or_default();
    result.restarts = containers
        .iter()
        .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
        .fold(0, u32::saturating_add);
    let main_name = spec.and_then(|s| s.containers.first()).map(|c| c.name.as_str());
    let main = containers
        .iter()
        .find(|c| Some(c.name.as_str()) == main_name)
        .or_else(|| containers.first());
    let terminated = main.and_then(|c| c.state.as_ref()?.terminated.as_ref());
    result.exit_code = terminated.map(|t| t.exit_code);
    result.started_at = main
        .and_then(|c| {
            let state = c.state.as_ref()?;
            state
                .running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| state.terminated.as_ref()?.started_at.as_ref())
        })
        .map(chrono_time);
    if phase.is_final() {
        result.finished_at = terminated.and_then(|t| t.finished_at.as_ref()).map(chrono_time);
    }
    let (reason, message) = if let Some(reason) = status.reason.clone() {
        (Some(reason), status.message.clone())
    } else if let Some((reason, message)) = waiting(containers) {
        (Some(reason), message)
    } else {
        (
            terminated.and_then(|t| t.reason.clone()),
            terminated.and_then(|t| t.message.clone()),
        )
    };
    result.reason = reason;
    result.message = message.filter(|m| !m.is_empty());
    result
}

/// The first reason (and message) a container waits for other than starting: `ErrImagePull`,
/// `ImagePullBackOff`, `CrashLoopBackOff`, ...
fn waiting(containers: &[ContainerStatus]) -> Option<(String, Option<String>)> {
    containers.iter().find_map(|container| {
        let waiting = container.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref().filter(|r| !STARTING.contains(r))?;
        Some((reason.to_owned(), waiting.message.clone()))
    })
}

/// A Kubernetes time as a chrono time (the epoch when out of chrono's range, which no pod reaches).
fn chrono_time(time: &Time) -> DateTime<Utc> {
    let nanos = u32::try_from(time.0.subsec_nanosecond()).unwrap_or(0);
    DateTime::from_timestamp(time.0.as_second(), nanos).unwrap_or_default()
}
