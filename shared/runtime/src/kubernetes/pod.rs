//! Pods from a [`WorkloadSpec`]: the pod template shared by bare Pods and Deployments.

use std::collections::BTreeMap;

use cube_proto::cube::scheduler::v1::{AffinityTerm, Placement};
use k8s_openapi::api::core::v1::{
    Affinity, Container as KubeContainer, ContainerPort, EnvVar, EnvVarSource, LocalObjectReference,
    ObjectFieldSelector, Pod, PodAffinity, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec,
    ResourceRequirements, SecurityContext, Toleration, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::metadata::Metadata;
use crate::error::RuntimeError;
use crate::spec::{Container, RestartPolicy, WorkloadSpec};
use crate::volumes;

/// The topology a pod affinity term without one uses: the node.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

/// The Pod that runs `spec`: its containers, volumes, placement, labels and annotations, restart policy, deadline,
/// image pull secrets, service account, privileges and owner.
///
/// Fails with [`RuntimeError::Invalid`] naming the field when the spec has no containers, a container without a
/// name or image, malformed volumes, or a zero deadline.
pub fn pod(spec: &WorkloadSpec) -> Result<Pod, RuntimeError> {
    let template = pod_template(spec)?;
    let mut pod_spec = template.spec.unwrap_or_default();
    pod_spec.restart_policy = Some(restart_policy(spec.restart_policy).to_owned());
    if let Some(deadline) = spec.deadline {
        if deadline.is_zero() {
            return Err(RuntimeError::Invalid {
                field: "deadline".to_owned(),
                message: "is zero; give a deadline of at least 1 second, or none".to_owned(),
            });
        }
        // Kubernetes counts whole seconds; a deadline is never shortened.
        let seconds = deadline.as_secs() + u64::from(deadline.subsec_nanos() > 0);
        pod_spec.active_deadline_seconds = Some(i64::try_from(seconds).unwrap_or(i64::MAX));
    }
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.name = Some(spec.key.name.clone());
    metadata.namespace = Some(spec.key.namespace.clone());
    metadata.owner_references = Metadata::of(spec)?.owner_references();
    Ok(Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    })
}

/// The pod template of `spec`, as a Deployment's: everything of [`pod`] but the name, namespace, restart policy
/// (a Deployment's pods always restart), deadline (Deployments refuse one) and owner (the Deployment's controller
/// owns its pods). The labels are the spec's, with the
/// placement's pod labels added; the annotations likewise.
pub fn pod_template(spec: &WorkloadSpec) -> Result<PodTemplateSpec, RuntimeError> {
    let meta = Metadata::of(spec)?;
    if spec.containers.is_empty() {
        return Err(RuntimeError::Invalid {
            field: "containers".to_owned(),
            message: "is empty; a workload runs at least one container".to_owned(),
        });
    }
    let rendered = volumes::render(&spec.volumes, &spec.user)?;
    let placement = spec.placement.as_ref();
    let mut containers = Vec::with_capacity(spec.containers.len());
    for (index, container) in spec.containers.iter().enumerate() {
        // The placement's resources are the workload's: they go to the main container only.
        let placement = if index == 0 { placement } else { None };
        containers.push(kube_container(
            index,
            container,
            placement,
            spec.privileged,
            &rendered.mounts,
        )?);
    }
    let mut labels = meta.labels.clone();
    let mut annotations = meta.annotations.clone();
    if let Some(placement) = placement {
        labels.extend(placement.pod_labels.clone());
        annotations.extend(placement.pod_annotations.clone());
    }
    let pod_spec = PodSpec {
        containers,
        volumes: Some(rendered.volumes),
        node_selector: placement
            .filter(|p| !p.node_selector.is_empty())
            .map(|p| p.node_selector.clone().into_iter().collect()),
        affinity: placement.and_then(affinity),
        tolerations: placement
            .filter(|p| !p.tolerations.is_empty())
            .map(|p| p.tolerations.iter().map(toleration).collect()),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
            spec.image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        service_account_name: spec.service_account.clone(),
        ..PodSpec::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec),
    })
}

/// How Kubernetes spells `policy`.
pub(crate) fn restart_policy(policy: RestartPolicy) -> &'static str {
    match policy {
        RestartPolicy::Never => "Never",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Always => "Always",
    }
}

/// The Kubernetes container of `container`, the `index`th of its spec.
fn kube_container(
    index: usize,
    container: &Container,
    placement: Option<&Placement>,
    privileged: bool,
    mounts: &[k8s_openapi::api::core::v1::VolumeMount],
) -> Result<KubeContainer, RuntimeError> {
    let invalid = |field: &str, message: &str| RuntimeError::Invalid {
        field: format!("containers[{index}].{field}"),
        message: message.to_owned(),
    };
    if container.name.is_empty() {
        return Err(invalid("name", "is empty; name the container, e.g. main"));
    }
    if container.image.is_empty() {
        return Err(invalid("image", "is empty; give an image reference, e.g. python:3.12"));
    }
    let mut requests = container.requests.clone();
    let mut limits = container.limits.clone();
    if let Some(placement) = placement {
        requests.extend(placement.requests.clone());
        limits.extend(placement.limits.clone());
    }
    let quantities = |map: BTreeMap<String, String>| {
        (!map.is_empty()).then(|| map.into_iter().map(|(k, v)| (k, Quantity(v))).collect())
    };
    Ok(KubeContainer {
        name: container.name.clone(),
        image: Some(container.image.clone()),
        command: (!container.command.is_empty()).then(|| container.command.clone()),
        args: (!container.args.is_empty()).then(|| container.args.clone()),
        env: (!container.env.is_empty() || !container.env_from_pod.is_empty()).then(|| {
            let literal = container.env.iter().map(|(name, value)| EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                value_from: None,
            });
            let from_pod = container.env_from_pod.iter().map(|(name, field)| EnvVar {
                name: name.clone(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: field.field_path().to_owned(),
                        api_version: None,
                    }),
                    ..EnvVarSource::default()
                }),
            });
            literal.chain(from_pod).collect()
        }),
        working_dir: container.working_dir.clone(),
        ports: (!container.ports.is_empty()).then(|| {
            container
                .ports
                .iter()
                .map(|port| ContainerPort {
                    name: (!port.name.is_empty()).then(|| port.name.clone()),
                    container_port: i32::from(port.container_port),
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                })
                .collect()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(requests),
            limits: quantities(limits),
            ..ResourceRequirements::default()
        }),
        security_context: privileged.then(|| SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }),
        volume_mounts: (!mounts.is_empty()).then(|| mounts.to_vec()),
        ..KubeContainer::default()
    })
}

/// The preferred pod affinity and anti-affinity of `placement`, if it has any.
fn affinity(placement: &Placement) -> Option<Affinity> {
    let terms = |terms: &[AffinityTerm]| -> Option<Vec<WeightedPodAffinityTerm>> {
        (!terms.is_empty()).then(|| terms.iter().map(weighted_term).collect())
    };
    let near = terms(&placement.pod_affinity);
    let away = terms(&placement.pod_anti_affinity);
    if near.is_none() && away.is_none() {
        return None;
    }
    Some(Affinity {
        pod_affinity: near.map(|terms| PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(terms),
            ..PodAffinity::default()
        }),
        pod_anti_affinity: away.map(|terms| PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(terms),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    })
}

/// A preferred pod (anti-)affinity term of the placement; a term without a topology is per node.
fn weighted_term(term: &AffinityTerm) -> WeightedPodAffinityTerm {
    let topology_key = if term.topology_key.is_empty() {
        HOSTNAME_TOPOLOGY.to_owned()
    } else {
        term.topology_key.clone()
    };
    WeightedPodAffinityTerm {
        weight: term.weight,
        pod_affinity_term: PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some(term.match_labels.clone().into_iter().collect()),
                match_expressions: None,
            }),
            topology_key,
            ..PodAffinityTerm::default()
        },
    }
}

/// A toleration of the placement; empty strings are absent fields.
fn toleration(toleration: &cube_proto::cube::scheduler::v1::Toleration) -> Toleration {
    let given = |text: &String| (!text.is_empty()).then(|| text.clone());
    Toleration {
        key: given(&toleration.key),
        operator: given(&toleration.operator),
        value: given(&toleration.value),
        effect: given(&toleration.effect),
        toleration_seconds: None,
    }
}
