//! The objects notebooks and serving need besides Pods, built from typed inputs: Services, ConfigMaps, Secrets
//! (image pull secrets too) and Deployments.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::metadata::Metadata;
use super::pod::pod_template;
use crate::error::RuntimeError;
use crate::spec::WorkloadSpec;

/// The type of a Secret holding registry credentials.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";

/// The key of a [`DOCKER_CONFIG_JSON_TYPE`] Secret's credentials.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// The ClusterIP Service in front of the workload `spec`: named as it, one port per container port (the same
/// number outside and inside), selecting the pods by the workload's labels.
///
/// Fails with [`RuntimeError::Invalid`] naming `containers` when no container has a port.
pub fn service(spec: &WorkloadSpec) -> Result<Service, RuntimeError> {
    let meta = Metadata::of(spec)?;
    let ports: Vec<ServicePort> = spec
        .containers
        .iter()
        .flat_map(|container| &container.ports)
        .map(|port| ServicePort {
            name: (!port.name.is_empty()).then(|| port.name.clone()),
            port: i32::from(port.container_port),
            target_port: Some(IntOrString::Int(i32::from(port.container_port))),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        })
        .collect();
    if ports.is_empty() {
        return Err(RuntimeError::Invalid {
            field: "containers[].ports".to_owned(),
            message: "are empty; a Service needs at least one container port, e.g. http 8080".to_owned(),
        });
    }
    Ok(Service {
        metadata: meta.object_meta(),
        spec: Some(ServiceSpec {
            selector: Some(meta.labels.clone()),
            ports: Some(ports),
            type_: Some("ClusterIP".to_owned()),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// A ConfigMap holding `data`.
pub fn config_map(meta: &Metadata, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: meta.object_meta(),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// An `Opaque` Secret holding `data`.
pub fn secret(meta: &Metadata, data: BTreeMap<String, Vec<u8>>) -> Secret {
    Secret {
        metadata: meta.object_meta(),
        data: Some(data.into_iter().map(|(key, value)| (key, ByteString(value))).collect()),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// A `kubernetes.io/dockerconfigjson` Secret with the credentials of `user` at `registry` (a host, `harbor.example`,
/// or `https://index.docker.io/v1/`), for a pod's `imagePullSecrets`.
///
/// Fails with [`RuntimeError::Invalid`] naming `registry` when it is empty.
pub fn image_pull_secret(meta: &Metadata, registry: &str, user: &str, password: &str) -> Result<Secret, RuntimeError> {
    if registry.is_empty() {
        return Err(RuntimeError::Invalid {
            field: "registry".to_owned(),
            message: "is empty; give the registry's host, e.g. harbor.example.com".to_owned(),
        });
    }
    let auth = STANDARD.encode(format!("{user}:{password}"));
    let config = json!({"auths": {registry: {"username": user, "password": password, "auth": auth}}});
    Ok(Secret {
        metadata: meta.object_meta(),
        data: Some(BTreeMap::from([(
            DOCKER_CONFIG_JSON_KEY.to_owned(),
            ByteString(config.to_string().into_bytes()),
        )])),
        type_: Some(DOCKER_CONFIG_JSON_TYPE.to_owned()),
        ..Secret::default()
    })
}

/// A Deployment of `replicas` pods of `spec`, built as its Pod would be (see [`pod_template`]), selecting them by the
/// workload's labels.
///
/// Fails as [`pod_template`] does.
pub fn deployment(spec: &WorkloadSpec, replicas: i32) -> Result<Deployment, RuntimeError> {
    let meta = Metadata::of(spec)?;
    let mut template = pod_template(spec)?;
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("Always".to_owned());
    }
    Ok(Deployment {
        metadata: meta.object_meta(),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(meta.labels.clone()),
                match_expressions: None,
            },
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}
