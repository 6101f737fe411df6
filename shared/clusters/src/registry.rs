//! The registry of clusters and their cached Kubernetes clients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::OnceCell;

use crate::config::{ClientError, ClusterConfig, RegistryError, checked, read_cluster_file};

/// A cluster's client, built on first use and shared by every clone of the registry until a reload changes how
/// the cluster is reached.
type ClientSlot = Arc<OnceCell<kube::Client>>;

/// What a registry holds at one time: its clusters, the default first, and a client slot for each.
#[derive(Default)]
struct State {
    clusters: Arc<Vec<ClusterConfig>>,
    clients: HashMap<String, ClientSlot>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kube::Client is not Debug; which clusters hold one is what matters.
        let connected: Vec<&String> = self
            .clients
            .iter()
            .filter(|(_, slot)| slot.initialized())
            .map(|(name, _)| name)
            .collect();
        f.debug_struct("State")
            .field("clusters", &self.clusters)
            .field("connected", &connected)
            .finish()
    }
}

impl State {
    /// The state for `clusters`, keeping the client slots of `previous` whose cluster is reached the same way.
    fn following(previous: &Self, clusters: Vec<ClusterConfig>) -> Self {
        let clients = clusters
            .iter()
            .map(|cluster| {
                let kept = previous
                    .clusters
                    .iter()
                    .find(|old| old.name == cluster.name && old.same_connection(cluster))
                    .and_then(|_| previous.clients.get(&cluster.name).cloned());
                (cluster.name.clone(), kept.unwrap_or_default())
            })
            .collect();
        Self {
            clusters: Arc::new(clusters),
            clients,
        }
    }
}

/// The clusters work can run on, the default one first, with one cached Kubernetes client per cluster;
/// [`ClusterRegistry::reload`] reads its file again. Clones share the same registry.
#[derive(Debug, Clone)]
pub struct ClusterRegistry {
    state: Arc<RwLock<Arc<State>>>,
    file: Option<PathBuf>,
    built: Arc<AtomicU64>,
}

impl ClusterRegistry {
    fn with(clusters: Vec<ClusterConfig>, file: Option<PathBuf>) -> Self {
        Self {
            state: Arc::new(RwLock::new(Arc::new(State::following(&State::default(), clusters)))),
            file,
            built: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads the cluster file at `path`; [`Self::reload`] reads it again.
    ///
    /// # Errors
    /// Returns an error naming the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self::with(read_cluster_file(path)?, Some(path.to_owned())))
    }

    /// Builds a registry from clusters; the one marked default (or else the first) becomes the default.
    ///
    /// # Errors
    /// Returns what is wrong: no clusters, a bad or repeated name, several defaults.
    pub fn new(clusters: Vec<ClusterConfig>) -> Result<Self, RegistryError> {
        let clusters = checked(clusters).map_err(|reason| RegistryError::Clusters { reason })?;
        Ok(Self::with(clusters, None))
    }

    /// The registry of `cube up`: one local cluster, `local`, where work runs as processes on this machine.
    pub fn embedded() -> Self {
        let local = ClusterConfig {
            default: true,
            ..ClusterConfig::new("local", None)
        };
        Self::with(vec![local], None)
    }

    /// Reads the cluster file again and, when it is valid, replaces the registered clusters with its clusters;
    /// when it is not, the registry is left as it was. A registry not read from a file is left as it is.
    /// Clusters reached as before (same kubeconfig file, same in-cluster choice) keep their client; the clients
    /// of the others are dropped, and built again when next asked for.
    ///
    /// # Errors
    /// Returns an error naming the file and what is wrong in it.
    pub fn reload(&self) -> Result<(), RegistryError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let clusters = read_cluster_file(path)?;
        if let Ok(mut current) = self.state.write() {
            let next = State::following(&current, clusters);
            *current = Arc::new(next);
        }
        Ok(())
    }

    fn state(&self) -> Arc<State> {
        self.state.read().map(|state| state.clone()).unwrap_or_default()
    }

    /// Returns the cluster called `name`.
    pub fn get(&self, name: &str) -> Option<ClusterConfig> {
        self.clusters().iter().find(|cluster| cluster.name == name).cloned()
    }

    /// Returns every cluster, the default first.
    pub fn clusters(&self) -> Arc<Vec<ClusterConfig>> {
        self.state().clusters.clone()
    }

    /// Returns the name of the default cluster.
    pub fn default_cluster(&self) -> String {
        self.clusters()
            .first()
            .map(|cluster| cluster.name.clone())
            .unwrap_or_default()
    }

    /// Returns the names of every cluster, the default first.
    pub fn names(&self) -> Vec<String> {
        self.clusters().iter().map(|cluster| cluster.name.clone()).collect()
    }

    /// Returns the Kubernetes client of the cluster called `name`: built from its kubeconfig or in-cluster
    /// configuration the first time it is asked for, then the same client until a reload changes how the cluster
    /// is reached. A client that could not be built is tried again on the next call.
    ///
    /// # Errors
    /// Returns an error when the cluster is not registered, is local (no Kubernetes API), or its configuration
    /// does not give a client.
    pub async fn client(&self, name: &str) -> Result<kube::Client, ClientError> {
        let state = self.state();
        let Some(cluster) = state.clusters.iter().find(|cluster| cluster.name == name) else {
            return Err(ClientError::UnknownCluster {
                name: name.to_owned(),
                registered: state.clusters.iter().map(|cluster| cluster.name.clone()).collect(),
            });
        };
        if cluster.is_local() {
            return Err(ClientError::Local);
        }
        let slot = state.clients.get(name).cloned().unwrap_or_default();
        let client = slot
            .get_or_try_init(|| async {
                let client = cluster.client().await?;
                self.built.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cluster = %cluster.name, "built the cluster's kubernetes client");
                Ok::<_, ClientError>(client)
            })
            .await?;
        Ok(client.clone())
    }

    /// Returns how many Kubernetes clients this registry (and its clones) has built: a client kept across a reload
    /// is not built again, so the count tells tests and metrics whether clients are being reused.
    pub fn clients_built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Returns the names of the clusters that hold a built client now, the default first.
    pub fn cached_clients(&self) -> Vec<String> {
        let state = self.state();
        state
            .clusters
            .iter()
            .filter(|cluster| state.clients.get(&cluster.name).is_some_and(|slot| slot.initialized()))
            .map(|cluster| cluster.name.clone())
            .collect()
    }
}
