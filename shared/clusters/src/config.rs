//! One cluster as the clusters file describes it, the file's checks, and connecting a client to a cluster.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One cluster as the clusters file describes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name (DNS-label rules).
    pub name: String,
    /// Whether projects without a cluster setting run here.
    #[serde(default)]
    pub default: bool,
    /// The kubeconfig file reaching it; none for in-cluster or for `cube up`'s local cluster.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Whether to reach it through the service's own service account.
    #[serde(default)]
    pub in_cluster: bool,
    /// Default namespace of pipelines.
    #[serde(default = "pipeline")]
    pub pipeline_namespace: String,
    /// Default namespace of notebooks.
    #[serde(default = "jupyter")]
    pub notebook_namespace: String,
    /// Default namespace of inference services.
    #[serde(default = "service")]
    pub service_namespace: String,
    /// The service DNS domain.
    #[serde(default = "cluster_local")]
    pub service_domain: String,
    /// The host users reach notebooks and services at.
    #[serde(default)]
    pub external_host: String,
}

/// Why no Kubernetes client could be had for a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No cluster of that name is registered.
    #[error("no cluster {name:?} is registered; registered: {registered:?}")]
    UnknownCluster {
        /// The name asked for.
        name: String,
        /// The names that are registered, the default first.
        registered: Vec<String>,
    },
    /// The cluster is local: it has no Kubernetes API.
    #[error("no Kubernetes API (no kubeconfig, not in-cluster): work runs as local processes")]
    Local,
    /// The kubeconfig file could not be read or parsed.
    #[error("reading the kubeconfig {path}: {source}")]
    ReadKubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What kube said.
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig was read but does not describe a usable connection.
    #[error("loading the kubeconfig {path}: {source}")]
    LoadKubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// What kube said.
        source: kube::config::KubeconfigError,
    },
    /// The pod's service account could not be used.
    #[error("in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client could not be built from a valid configuration.
    #[error("building the client: {0}")]
    Build(#[source] kube::Error),
}

impl ClusterConfig {
    /// A cluster with the default namespaces (`pipeline`, `jupyter`, `service`) and domain (`cluster.local`),
    /// reached through `kubeconfig`; with none, a cluster with no Kubernetes API, like `cube up`'s `local`.
    pub fn new(name: impl Into<String>, kubeconfig: Option<PathBuf>) -> Self {
        Self {
            name: name.into(),
            default: false,
            kubeconfig,
            in_cluster: false,
            pipeline_namespace: pipeline(),
            notebook_namespace: jupyter(),
            service_namespace: service(),
            service_domain: cluster_local(),
            external_host: String::new(),
        }
    }

    /// Tells whether the cluster is local: with neither a kubeconfig nor `in_cluster` it has no Kubernetes API,
    /// and its work runs as processes on this machine (`cube up`'s `local` cluster).
    pub fn is_local(&self) -> bool {
        self.kubeconfig.is_none() && !self.in_cluster
    }

    /// Tells whether `other` is reached the same way (same kubeconfig file, same in-cluster choice), so that a
    /// client or watch of one serves the other; names, namespaces and the default flag do not matter.
    pub fn same_connection(&self, other: &Self) -> bool {
        self.kubeconfig == other.kubeconfig && self.in_cluster == other.in_cluster
    }

    /// Connects a new client to the cluster's API server: through its kubeconfig, or the pod's service account.
    /// [`crate::ClusterRegistry::client`] keeps one per cluster; this builds another each time.
    ///
    /// # Errors
    /// Returns why not, e.g. that the cluster is local and has no Kubernetes API.
    pub async fn client(&self) -> Result<kube::Client, ClientError> {
        let config = if let Some(path) = &self.kubeconfig {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|source| ClientError::ReadKubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::LoadKubeconfig {
                    path: path.clone(),
                    source,
                })?
        } else if self.in_cluster {
            kube::Config::incluster().map_err(ClientError::InCluster)?
        } else {
            return Err(ClientError::Local);
        };
        kube::Client::try_from(config).map_err(ClientError::Build)
    }
}

fn pipeline() -> String {
    "pipeline".into()
}
fn jupyter() -> String {
    "jupyter".into()
}
fn service() -> String {
    "service".into()
}
fn cluster_local() -> String {
    "cluster.local".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    clusters: Vec<ClusterConfig>,
}

/// Why a clusters file, or a list of clusters, was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("reading the cluster file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("the cluster file {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what is expected.
        reason: String,
    },
    /// A list of clusters given in code is not valid.
    #[error("the clusters are not valid: {reason}")]
    Clusters {
        /// What is wrong, and what is expected.
        reason: String,
    },
}

/// Checks a name against DNS-label rules (2 to 63 lowercase letters, digits and dashes, starting with a letter),
/// the rule project ids follow too.
pub fn valid_name(name: &str) -> bool {
    cube_kit::names::is_project_id(name)
}

pub use cube_kit::names::dns_label;

/// Reads and checks a clusters file; the default cluster comes first.
pub(crate) fn read_cluster_file(path: &Path) -> Result<Vec<ClusterConfig>, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| RegistryError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let file: ClusterFile = serde_json::from_str(&text).map_err(|error| {
        invalid(format!(
            "{error}; expected {{\"clusters\": [{{\"name\": \"dev\", \"default\": true, \"kubeconfig\": \"/path\"}}]}}"
        ))
    })?;
    checked(file.clusters).map_err(invalid)
}

/// Checks clusters and puts the default one (the one marked, or else the first) first.
pub(crate) fn checked(mut clusters: Vec<ClusterConfig>) -> Result<Vec<ClusterConfig>, String> {
    if clusters.is_empty() {
        return Err("it lists no clusters".into());
    }
    for (index, cluster) in clusters.iter().enumerate() {
        if !valid_name(&cluster.name) {
            return Err(format!(
                "clusters[{index}].name {:?} must be 2 to 63 lowercase letters, digits and dashes, starting with a letter",
                cluster.name
            ));
        }
        if clusters[..index].iter().any(|other| other.name == cluster.name) {
            return Err(format!("clusters[{index}].name {:?} appears twice", cluster.name));
        }
    }
    match clusters.iter().filter(|cluster| cluster.default).count() {
        0 => clusters[0].default = true,
        1 => {}
        _ => return Err("more than one cluster is marked default".into()),
    }
    clusters.sort_by_key(|cluster| !cluster.default);
    Ok(clusters)
}
