//! HorizontalPodAutoscalers, in the `autoscaling` version the API server serves: `v2` from Kubernetes 1.23,
//! `v2beta2` before. Both have the same shape for what Cube sets, so one builder makes either as a
//! [`DynamicObject`].

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::metadata::Metadata;
use crate::error::RuntimeError;

/// The API group of HorizontalPodAutoscalers.
pub const GROUP: &str = "autoscaling";

/// The versions Cube can write, the preferred first.
pub const VERSIONS: [&str; 2] = ["v2", "v2beta2"];

/// The kind.
pub const KIND: &str = "HorizontalPodAutoscaler";

/// How a Deployment scales: between `min_replicas` and `max_replicas`, to keep the average CPU and memory use of its
/// pods (as a percentage of their requests) at the targets given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscaling {
    /// The fewest replicas, at least 1.
    pub min_replicas: i32,
    /// The most replicas, at least `min_replicas`.
    pub max_replicas: i32,
    /// The target average CPU utilisation in percent of the request.
    pub cpu_utilization: Option<i32>,
    /// The target average memory utilisation in percent of the request.
    pub memory_utilization: Option<i32>,
}

/// The resource of HorizontalPodAutoscalers in `version` (`v2` or `v2beta2`).
pub fn api_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, version, KIND), "horizontalpodautoscalers")
}

/// A HorizontalPodAutoscaler of `resource` (from [`api_resource`]) named as `meta` says, scaling the Deployment
/// `deployment` of the same namespace as `scaling` says.
///
/// Fails with [`RuntimeError::Invalid`] naming the field when the replica bounds are out of order or below 1, a
/// target is not above 0, or there is no target.
pub fn autoscaler(
    resource: &ApiResource,
    meta: &Metadata,
    deployment: &str,
    scaling: Autoscaling,
) -> Result<DynamicObject, RuntimeError> {
    let invalid = |field: &str, message: String| RuntimeError::Invalid {
        field: field.to_owned(),
        message,
    };
    if scaling.min_replicas < 1 {
        return Err(invalid(
            "min_replicas",
            format!("is {}; at least 1 replica runs", scaling.min_replicas),
        ));
    }
    if scaling.max_replicas < scaling.min_replicas {
        return Err(invalid(
            "max_replicas",
            format!(
                "is {}, below min_replicas {}",
                scaling.max_replicas, scaling.min_replicas
            ),
        ));
    }
    let mut metrics = Vec::new();
    for (name, target) in [("cpu", scaling.cpu_utilization), ("memory", scaling.memory_utilization)] {
        let Some(target) = target else { continue };
        if target < 1 {
            return Err(invalid(
                &format!("{name}_utilization"),
                format!("is {target}; give a percentage above 0, e.g. 80"),
            ));
        }
        metrics.push(json!({
            "type": "Resource",
            "resource": {"name": name, "target": {"type": "Utilization", "averageUtilization": target}},
        }));
    }
    if metrics.is_empty() {
        return Err(invalid(
            "cpu_utilization",
            "and memory_utilization are both absent; give at least one target, e.g. 80".to_owned(),
        ));
    }
    let mut object = DynamicObject::new(&meta.key.name, resource).data(json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": metrics,
        }
    }));
    object.metadata = meta.object_meta();
    Ok(object)
}
