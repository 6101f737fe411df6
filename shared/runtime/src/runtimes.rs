//! The runtime of each registered cluster: [`Runtimes`] picks, by a workload key's cluster, the local runtime (a
//! cluster with neither a kubeconfig nor in-cluster configuration) or a Kubernetes runtime on that cluster's cached
//! client, so that a service holds one value and never asks which kind a cluster is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cube_clusters::{ClientError, ClusterConfig, ClusterRegistry};

use crate::kubernetes::KubernetesRuntime;
use crate::local::LocalRuntime;
use crate::{LogStream, ObjectKey, Runtime, RuntimeError, WorkloadSpec, WorkloadStatus};

/// The runtimes of every cluster of a registry, which may be reloaded while they are in use.
#[derive(Clone)]
pub struct Runtimes {
    registry: ClusterRegistry,
    local: Arc<LocalRuntime>,
    /// Kubernetes runtimes made so far, with the configuration each was made for: a reload that changes how a
    /// cluster is reached makes a new one, and the others keep what they discovered (the autoscaling version).
    kubernetes: Arc<Mutex<HashMap<String, (ClusterConfig, KubernetesRuntime)>>>,
}

/// The runtime of one cluster.
#[derive(Clone)]
pub enum ClusterRuntime {
    /// Local processes.
    Local(Arc<LocalRuntime>),
    /// A Kubernetes cluster.
    Kubernetes(KubernetesRuntime),
}

impl Runtimes {
    /// The runtimes of `registry`'s clusters, local clusters running on `local`.
    pub fn new(registry: ClusterRegistry, local: Arc<LocalRuntime>) -> Self {
        Self {
            registry,
            local,
            kubernetes: Arc::default(),
        }
    }

    /// The registry the clusters come from.
    pub fn registry(&self) -> &ClusterRegistry {
        &self.registry
    }

    /// The runtime of the cluster the registry names `cluster`.
    ///
    /// # Errors
    /// Returns [`RuntimeError::Invalid`] (field `cluster`) for a cluster that is not registered, and
    /// [`RuntimeError::Unavailable`] when its client cannot be built.
    pub async fn cluster(&self, cluster: &str) -> Result<ClusterRuntime, RuntimeError> {
        let Some(config) = self.registry.get(cluster) else {
            return Err(RuntimeError::Invalid {
                field: "cluster".into(),
                message: format!(
                    "no cluster {cluster:?} is registered; registered: {:?}",
                    self.registry.names()
                ),
            });
        };
        if config.is_local() {
            return Ok(ClusterRuntime::Local(self.local.clone()));
        }
        if let Some(runtime) = self.cached(cluster, &config) {
            return Ok(ClusterRuntime::Kubernetes(runtime));
        }
        let client = self.registry.client(cluster).await.map_err(|error| match error {
            ClientError::UnknownCluster { .. } => RuntimeError::Invalid {
                field: "cluster".into(),
                message: error.to_string(),
            },
            other => RuntimeError::Unavailable(format!("cluster {cluster:?}: {other}")),
        })?;
        let runtime = KubernetesRuntime::new(cluster, client);
        self.kubernetes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cluster.to_owned(), (config, runtime.clone()));
        Ok(ClusterRuntime::Kubernetes(runtime))
    }

    /// The Kubernetes runtime made for `cluster`, while it is still reached as `config` says.
    fn cached(&self, cluster: &str, config: &ClusterConfig) -> Option<KubernetesRuntime> {
        let made = self.kubernetes.lock().unwrap_or_else(PoisonError::into_inner);
        made.get(cluster)
            .filter(|(made_for, _)| made_for.same_connection(config))
            .map(|(_, runtime)| runtime.clone())
    }
}

impl Runtime for ClusterRuntime {
    async fn apply(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, RuntimeError> {
        match self {
            Self::Local(runtime) => runtime.apply(spec).await,
            Self::Kubernetes(runtime) => runtime.apply(spec).await,
        }
    }

    async fn delete(&self, key: &ObjectKey, grace: Duration) -> Result<bool, RuntimeError> {
        match self {
            Self::Local(runtime) => runtime.delete(key, grace).await,
            Self::Kubernetes(runtime) => runtime.delete(key, grace).await,
        }
    }

    async fn status(&self, key: &ObjectKey) -> Result<Option<WorkloadStatus>, RuntimeError> {
        match self {
            Self::Local(runtime) => runtime.status(key).await,
            Self::Kubernetes(runtime) => runtime.status(key).await,
        }
    }

    async fn list(
        &self,
        cluster: &str,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        match self {
            Self::Local(runtime) => runtime.list(cluster, namespace, labels).await,
            Self::Kubernetes(runtime) => runtime.list(cluster, namespace, labels).await,
        }
    }

    async fn logs(&self, key: &ObjectKey, follow: bool) -> Result<LogStream, RuntimeError> {
        match self {
            Self::Local(runtime) => runtime.logs(key, follow).await,
            Self::Kubernetes(runtime) => runtime.logs(key, follow).await,
        }
    }
}

/// Every operation goes to the runtime of the key's (or the named) cluster.
impl Runtime for Runtimes {
    async fn apply(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, RuntimeError> {
        self.cluster(&spec.key.cluster).await?.apply(spec).await
    }

    async fn delete(&self, key: &ObjectKey, grace: Duration) -> Result<bool, RuntimeError> {
        self.cluster(&key.cluster).await?.delete(key, grace).await
    }

    async fn status(&self, key: &ObjectKey) -> Result<Option<WorkloadStatus>, RuntimeError> {
        self.cluster(&key.cluster).await?.status(key).await
    }

    async fn list(
        &self,
        cluster: &str,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        self.cluster(cluster).await?.list(cluster, namespace, labels).await
    }

    async fn logs(&self, key: &ObjectKey, follow: bool) -> Result<LogStream, RuntimeError> {
        self.cluster(&key.cluster).await?.logs(key, follow).await
    }
}
