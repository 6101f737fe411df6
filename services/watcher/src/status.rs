//! What Deployments and Nodes are, as workload statuses (Pods are read by the runtime's `pod_status`).

use cube_runtime::{ObjectKey, Phase, WorkloadStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;

/// A Deployment: running once a replica is ready, ready when all are, with its ready replicas.
pub(crate) fn deployment_status(cluster: &str, deployment: &Deployment) -> WorkloadStatus {
    let meta = &deployment.metadata;
    let key = ObjectKey::new(
        cluster,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    let wanted = deployment.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|status| status.ready_replicas)
        .unwrap_or(0);
    let mut status = WorkloadStatus::new(key, if ready > 0 { Phase::Running } else { Phase::Pending });
    status.labels = meta.labels.clone().unwrap_or_default();
    status.ready = ready >= wanted;
    status.ready_replicas = Some(u32::try_from(ready).unwrap_or(0));
    status.version = meta.resource_version.clone().unwrap_or_default();
    status
}

/// A Node: running while Ready, failed while NotReady, unknown while its kubelet is silent; its labels.
pub(crate) fn node_status(cluster: &str, node: &Node) -> WorkloadStatus {
    let meta = &node.metadata;
    let key = ObjectKey::new(cluster, "", meta.name.clone().unwrap_or_default());
    let ready = node
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|condition| condition.type_ == "Ready"));
    let phase = match ready.map(|condition| condition.status.as_str()) {
        Some("True") => Phase::Running,
        Some("False") => Phase::Failed,
        _ => Phase::Unknown,
    };
    let mut status = WorkloadStatus::new(key, phase);
    status.labels = meta.labels.clone().unwrap_or_default();
    status.ready = phase == Phase::Running;
    status.reason = ready.and_then(|condition| condition.reason.clone());
    status.message = ready.and_then(|condition| condition.message.clone());
    status.node = meta.name.clone();
    status.version = meta.resource_version.clone().unwrap_or_default();
    status
}
