//! The node inventory: one Kubernetes client per registered cluster, and one shared watch (a kube-runtime
//! reflector) of its Nodes and of the Pods bound to them, from which every query computes labels, what each node
//! offers and what its pods request.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};

use crate::{ClusterConfig, ClusterRegistry};

/// Amounts of resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts {
    /// CPU in thousandths of a core.
    pub cpu_millis: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
    /// Whole GPUs, of every GPU resource name.
    pub gpus: i64,
    /// Other extended resources, by name.
    pub other: BTreeMap<String, i64>,
}

impl Amounts {
    /// Adds `other` to these amounts.
    pub fn add(&mut self, other: &Amounts) {
        self.cpu_millis += other.cpu_millis;
        self.memory_bytes += other.memory_bytes;
        self.gpus += other.gpus;
        for (name, amount) in &other.other {
            *self.other.entry(name.clone()).or_default() += amount;
        }
    }

    fn max(&mut self, other: &Amounts) {
        self.cpu_millis = self.cpu_millis.max(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.max(other.memory_bytes);
        self.gpus = self.gpus.max(other.gpus);
        for (name, amount) in &other.other {
            let entry = self.other.entry(name.clone()).or_default();
            *entry = (*entry).max(*amount);
        }
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its `org` label, `public` when it has none.
    pub resource_group: String,
    /// Whether its Ready condition is True.
    pub ready: bool,
    /// Whether new pods are kept off it.
    pub unschedulable: bool,
    /// Its taints: key, value, effect.
    pub taints: Vec<(String, String, String)>,
    /// What it offers to pods.
    pub allocatable: Amounts,
    /// What the unfinished pods bound to it request.
    pub requested: Amounts,
}

/// Which resource names count as GPUs.
#[derive(Debug, Clone)]
pub struct InventoryOptions {
    /// GPU resource names, e.g. `nvidia.com/gpu`.
    pub gpu_resources: Vec<String>,
}

impl Default for InventoryOptions {
    fn default() -> Self {
        Self {
            gpu_resources: vec!["nvidia.com/gpu".into()],
        }
    }
}

/// Why a cluster has no inventory.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InventoryError {
    /// No cluster of that name is registered.
    #[error("no cluster {0:?} is registered")]
    UnknownCluster(String),
    /// The cluster has no Kubernetes API (the local cluster of `cube up`) or could not be connected to.
    #[error("cluster {cluster:?} has no node inventory: {reason}")]
    Unavailable {
        /// The cluster.
        cluster: String,
        /// Why.
        reason: String,
    },
}

/// One cluster's client and watches.
struct Watched {
    client: Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A cluster of the inventory: watched, or why not.
enum Member {
    Watched(Watched),
    Unwatched(String),
}

/// The inventory of every registered cluster.
pub struct Fleet {
    clusters: BTreeMap<String, Member>,
    options: InventoryOptions,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for member in self.clusters.values() {
            if let Member::Watched(watched) = member {
                for task in &watched.tasks {
                    task.abort();
                }
            }
        }
    }
}

/// Builds a client for a registered cluster: its kubeconfig, or the pod's service account.
async fn client(cluster: &ClusterConfig) -> Result<Client, String> {
    let config = if let Some(path) = &cluster.kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|error| format!("reading the kubeconfig {}: {error}", path.display()))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|error| format!("loading the kubeconfig {}: {error}", path.display()))?
    } else if cluster.in_cluster {
        kube::Config::incluster().map_err(|error| format!("in-cluster configuration: {error}"))?
    } else {
        return Err("no Kubernetes API (no kubeconfig, not in-cluster): work runs as local processes".into());
    };
    Client::try_from(config).map_err(|error| format!("building the client: {error}"))
}

/// Drives a reflector until the task is aborted, logging watch errors (the watcher retries by itself).
fn drive<K>(cluster: String, api: Api<K>, config: watcher::Config) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                tracing::warn!(%cluster, %error, "watching the cluster");
            }
        }
    });
    (reader, task)
}

impl Fleet {
    /// Connects to every registered cluster that has a Kubernetes API and starts watching its Nodes and bound
    /// Pods; a cluster that cannot be connected to is kept, with the reason, and reported unhealthy.
    pub async fn connect(registry: &ClusterRegistry, options: InventoryOptions) -> Self {
        let mut clusters = BTreeMap::new();
        for cluster in registry.clusters() {
            let member = match client(cluster).await {
                Ok(client) => {
                    let (nodes, node_task) = drive(
                        cluster.name.clone(),
                        Api::<Node>::all(client.clone()),
                        watcher::Config::default(),
                    );
                    // Only pods bound to a node and not finished request anything of it.
                    let bound = watcher::Config::default()
                        .fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed");
                    let (pods, pod_task) = drive(cluster.name.clone(), Api::<Pod>::all(client.clone()), bound);
                    Member::Watched(Watched {
                        client,
                        nodes,
                        pods,
                        tasks: vec![node_task, pod_task],
                    })
                }
                Err(reason) => {
                    tracing::info!(cluster = %cluster.name, %reason, "no node inventory for the cluster");
                    Member::Unwatched(reason)
                }
            };
            clusters.insert(cluster.name.clone(), member);
        }
        Self { clusters, options }
    }

    fn watched(&self, cluster: &str) -> Result<&Watched, InventoryError> {
        match self.clusters.get(cluster) {
            Some(Member::Watched(watched)) => Ok(watched),
            Some(Member::Unwatched(reason)) => Err(InventoryError::Unavailable {
                cluster: cluster.to_owned(),
                reason: reason.clone(),
            }),
            None => Err(InventoryError::UnknownCluster(cluster.to_owned())),
        }
    }

    /// Waits until the cluster's first list of Nodes and Pods is in (at most `timeout`).
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched or the lists take longer.
    pub async fn ready(&self, cluster: &str, timeout: Duration) -> Result<(), InventoryError> {
        let watched = self.watched(cluster)?;
        let both = async {
            let (nodes, pods) = tokio::join!(watched.nodes.wait_until_ready(), watched.pods.wait_until_ready());
            nodes.is_ok() && pods.is_ok()
        };
        match tokio::time::timeout(timeout, both).await {
            Ok(true) => Ok(()),
            _ => Err(InventoryError::Unavailable {
                cluster: cluster.to_owned(),
                reason: format!("its nodes and pods were not listed within {timeout:?}"),
            }),
        }
    }

    /// Asks the cluster's API server for its version (at most 2 s): `Ok(version)` or why it is unreachable.
    pub async fn health(&self, cluster: &str) -> Result<String, String> {
        let watched = self.watched(cluster).map_err(|error| error.to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), watched.client.apiserver_version()).await {
            Ok(Ok(info)) => Ok(info.git_version),
            Ok(Err(error)) => Err(format!("the API server refused: {error}")),
            Err(_) => Err("the API server did not answer within 2 s".into()),
        }
    }

    /// Returns the cluster's nodes, ordered by name, with what their pods request.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn nodes(&self, cluster: &str) -> Result<Vec<NodeView>, InventoryError> {
        let watched = self.watched(cluster)?;
        let mut requested: BTreeMap<String, Amounts> = BTreeMap::new();
        for pod in watched.pods.state() {
            let Some(spec) = &pod.spec else { continue };
            let Some(node) = &spec.node_name else { continue };
            let finished = pod
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
            if finished {
                continue;
            }
            requested.entry(node.clone()).or_default().add(&self.pod_requests(&pod));
        }
        let mut views: Vec<NodeView> = watched
            .nodes
            .state()
            .iter()
            .map(|node| self.view(node, requested.remove(&node.metadata.name.clone().unwrap_or_default())))
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    /// What a pod requests: the larger of its containers' sum and any one init container (Kubernetes' rule).
    fn pod_requests(&self, pod: &Pod) -> Amounts {
        let Some(spec) = &pod.spec else {
            return Amounts::default();
        };
        let requests = |container: &k8s_openapi::api::core::v1::Container| {
            container
                .resources
                .as_ref()
                .and_then(|resources| resources.requests.as_ref())
                .map(|requests| self.amounts(requests))
                .unwrap_or_default()
        };
        let mut total = Amounts::default();
        for container in &spec.containers {
            total.add(&requests(container));
        }
        for container in spec.init_containers.iter().flatten() {
            total.max(&requests(container));
        }
        total
    }

    fn amounts(&self, quantities: &BTreeMap<String, Quantity>) -> Amounts {
        let mut amounts = Amounts::default();
        for (name, quantity) in quantities {
            match name.as_str() {
                "cpu" => amounts.cpu_millis += quantity_millis(&quantity.0).unwrap_or(0),
                "memory" => amounts.memory_bytes += quantity_millis(&quantity.0).unwrap_or(0) / 1000,
                "pods" | "ephemeral-storage" => {}
                gpu if self.options.gpu_resources.iter().any(|known| known == gpu) => {
                    amounts.gpus += quantity_millis(&quantity.0).unwrap_or(0) / 1000;
                }
                other if other.contains('/') => {
                    *amounts.other.entry(other.to_owned()).or_default() +=
                        quantity_millis(&quantity.0).unwrap_or(0) / 1000;
                }
                _ => {}
            }
        }
        amounts
    }

    fn view(&self, node: &Node, requested: Option<Amounts>) -> NodeView {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|status| status.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|condition| condition.type_ == "Ready"))
            .is_some_and(|condition| condition.status == "True");
        let spec = node.spec.as_ref();
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            resource_group: labels.get("org").cloned().unwrap_or_else(|| "public".into()),
            labels,
            ready,
            unschedulable: spec.and_then(|spec| spec.unschedulable).unwrap_or(false),
            taints: spec
                .and_then(|spec| spec.taints.as_ref())
                .map(|taints| {
                    taints
                        .iter()
                        .map(|taint| {
                            (
                                taint.key.clone(),
                                taint.value.clone().unwrap_or_default(),
                                taint.effect.clone(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            allocatable: status
                .and_then(|status| status.allocatable.as_ref())
                .map(|allocatable| self.amounts(allocatable))
                .unwrap_or_default(),
            requested: requested.unwrap_or_default(),
        }
    }
}

/// Parses a Kubernetes quantity (`500m`, `2`, `1.5`, `16Gi`, `1k`, `1e3`) into thousandths of its unit;
/// `None` for anything else.
pub fn quantity_millis(text: &str) -> Option<i64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => 10f64.powi(exponent[1..].parse().ok()?),
        _ => return None,
    };
    let millis = (number * factor * 1000.0).round();
    (millis.is_finite() && millis.abs() < 9.0e18).then_some(millis as i64)
}

/// Whether `labels` match a selector of terms `k=v`, `k==v`, `k!=v`, `k` (exists) and `!k` (absent), joined by
/// commas.
///
/// # Errors
/// Returns a message naming a malformed term.
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let mut matches = true;
    for term in selector.split(',').map(str::trim).filter(|term| !term.is_empty()) {
        let holds = if let Some((key, value)) = term.split_once("!=") {
            labels.get(key.trim()).is_none_or(|actual| actual != value.trim())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(key.trim()).is_some_and(|actual| actual == value.trim())
        } else if let Some(key) = term.strip_prefix('!') {
            !labels.contains_key(key.trim())
        } else if term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
            labels.contains_key(term)
        } else {
            return Err(format!(
                "{term:?} is not a selector term: use key=value, key!=value, key or !key, joined by commas"
            ));
        };
        matches &= holds;
    }
    Ok(matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_in_thousandths() {
        assert_eq!(quantity_millis("500m"), Some(500));
        assert_eq!(quantity_millis("2"), Some(2000));
        assert_eq!(quantity_millis("1.5"), Some(1500));
        assert_eq!(quantity_millis("1Ki"), Some(1_024_000));
        assert_eq!(quantity_millis("16Gi"), Some(16 * (1 << 30) * 1000));
        assert_eq!(quantity_millis("1k"), Some(1_000_000));
        assert_eq!(quantity_millis("1e3"), Some(1_000_000));
        for bad in ["", "x", "1Qi", "1..2"] {
            assert_eq!(quantity_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn selectors_match_equality_and_existence() -> Result<(), String> {
        let labels: BTreeMap<String, String> = [("gpu", "true"), ("org", "vision")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert!(selector_matches("gpu=true,org==vision", &labels)?);
        assert!(selector_matches("gpu,!cpu,org!=public", &labels)?);
        assert!(!selector_matches("gpu=false", &labels)?);
        assert!(!selector_matches("cpu", &labels)?);
        assert!(selector_matches("", &labels)?);
        assert!(selector_matches("gpu in (true)", &labels).is_err());
        Ok(())
    }
}
