//! What to run: [`WorkloadSpec`] and its parts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use cube_proto::cube::scheduler::v1::Placement;
use cube_volumes::VolumeMount;
use serde::{Deserialize, Serialize};

/// Where a workload lives: its cluster (as the cluster registry names it), namespace and name. The name is the
/// workload's identity: applying a spec of a key that exists changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    /// The cluster's name (`local` for `cube up`'s local cluster).
    pub cluster: String,
    /// The namespace.
    pub namespace: String,
    /// The object's name, a DNS-1123 label.
    pub name: String,
}

impl ObjectKey {
    /// The key of `name` in `namespace` of `cluster`.
    pub fn new(cluster: impl Into<String>, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "clusters/{}/namespaces/{}/workloads/{}",
            self.cluster, self.namespace, self.name
        )
    }
}

/// A workload to run: one pod's worth of containers, with everything Kubernetes or a local process needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadSpec {
    /// Where it lives and what it is called.
    pub key: ObjectKey,
    /// Labels: at least [`labels::MANAGED_BY`] and [`labels::PROJECT`] (see [`labels::for_project`]), plus those of
    /// its owner (`cube.io/run`, `cube.io/task`, ...). Lists select by them.
    pub labels: BTreeMap<String, String>,
    /// Annotations; the scheduler's `Placement.pod_annotations` are added to them.
    pub annotations: BTreeMap<String, String>,
    /// The containers, at least one; the first is the main one (its exit decides the workload's).
    pub containers: Vec<Container>,
    /// Volume mounts in cube-studio's syntax, added to every container and rendered with cube-studio's rules
    /// (per-user `subPath` for `pvc`, `memory` as an in-memory `emptyDir`, an implicit `/dev/shm`).
    pub volumes: Vec<VolumeMount>,
    /// The user whose subdirectory per-user claims (`name(pvc):/mnt`) mount: the creator of the pipeline, notebook
    /// or service.
    pub user: String,
    /// Where the scheduler placed it (node selector, affinities, tolerations, pod labels and annotations, container
    /// requests and limits, which override the containers' own).
    pub placement: Option<Placement>,
    /// What happens when the main container exits.
    pub restart_policy: RestartPolicy,
    /// How long it may run before it is stopped as failed (`activeDeadlineSeconds`).
    pub deadline: Option<Duration>,
    /// Secrets of the namespace holding registry credentials for pulling the images.
    pub image_pull_secrets: Vec<String>,
    /// The Kubernetes service account the pod runs as.
    pub service_account: Option<String>,
    /// Whether the containers run privileged.
    pub privileged: bool,
    /// The object whose deletion deletes this one.
    pub owner: Option<Owner>,
}

/// One container of a workload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Container {
    /// The container's name, a DNS-1123 label.
    pub name: String,
    /// The image reference (recorded, not pulled, by the local runtime).
    pub image: String,
    /// The command (the image's entrypoint when empty).
    pub command: Vec<String>,
    /// The arguments.
    pub args: Vec<String>,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// Environment variables whose values are facts of the running workload (Kubernetes' downward API), after
    /// `env`.
    pub env_from_pod: Vec<(String, PodField)>,
    /// The working directory (the image's when `None`; a directory of the workload's own under the data directory
    /// for the local runtime).
    pub working_dir: Option<String>,
    /// Ports it listens on.
    pub ports: Vec<Port>,
    /// Resource requests as Kubernetes quantities (`cpu`, `memory`, `nvidia.com/gpu`).
    pub requests: BTreeMap<String, String>,
    /// Resource limits as Kubernetes quantities.
    pub limits: BTreeMap<String, String>,
}

/// A fact of a running workload an environment variable can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodField {
    /// The node it runs on (`spec.nodeName`; the machine's host name locally).
    NodeName,
    /// Its own address (`status.podIP`; `127.0.0.1` locally).
    PodIp,
    /// Its node's address (`status.hostIP`; `127.0.0.1` locally).
    HostIp,
    /// Its name (`metadata.name`).
    PodName,
    /// Its namespace (`metadata.namespace`).
    PodNamespace,
}

impl PodField {
    /// The Kubernetes field path it reads.
    pub fn field_path(self) -> &'static str {
        match self {
            Self::NodeName => "spec.nodeName",
            Self::PodIp => "status.podIP",
            Self::HostIp => "status.hostIP",
            Self::PodName => "metadata.name",
            Self::PodNamespace => "metadata.namespace",
        }
    }
}

/// A port a container listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The port's name, a DNS-1123 label of at most 15 characters (`http`).
    pub name: String,
    /// The port inside the container. The local runtime passes a free port of the machine instead, in the
    /// environment as `PORT` (the first port) and `CUBE_PORT_<NAME>` (each port, name upper-cased, `-` as `_`).
    pub container_port: u16,
}

/// What happens when the main container exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// It is never started again (tasks).
    #[default]
    Never,
    /// It is started again when it fails.
    OnFailure,
    /// It is always started again (notebooks, services).
    Always,
}

/// The object whose deletion deletes a workload (a Kubernetes owner reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its API version, `v1`, `apps/v1`.
    pub api_version: String,
    /// Its kind, `Pod`, `Deployment`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

/// The labels every object Cube makes carries (ARCHITECTURE §3).
pub mod labels {
    use std::collections::BTreeMap;

    /// `app.kubernetes.io/managed-by`, always `cube`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The value of [`MANAGED_BY`].
    pub const CUBE: &str = "cube";
    /// The project id.
    pub const PROJECT: &str = "cube.io/project";
    /// The pipeline id.
    pub const PIPELINE: &str = "cube.io/pipeline";
    /// The run id.
    pub const RUN: &str = "cube.io/run";
    /// The task id.
    pub const TASK: &str = "cube.io/task";
    /// The notebook id.
    pub const NOTEBOOK: &str = "cube.io/notebook";
    /// The inference service id.
    pub const INFERENCE_SERVICE: &str = "cube.io/inference-service";
    /// The user it runs for.
    pub const USER: &str = "cube.io/user";

    /// The labels of an object of project `project`: [`MANAGED_BY`]`=cube` and [`PROJECT`]`=<project>`.
    pub fn for_project(project: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), CUBE.to_owned()),
            (PROJECT.to_owned(), project.to_owned()),
        ])
    }
}
