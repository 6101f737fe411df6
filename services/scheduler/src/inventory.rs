//! The node inventory: one Kubernetes client per registered cluster, and shared watches (kube-runtime
//! reflectors) of its Nodes, of the Pods bound to them and of the Pods still waiting for a node, from which every
//! query computes labels, what each node offers and what its pods request, and which pods wait and why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};

use crate::{ClusterConfig, ClusterRegistry};

/// The pod annotation naming the workload a pod belongs to (`projects/vision/notebooks/alice-lab`), as admitted:
/// the workload services set it on every pod, and admission reconciles its reservations with the pods that carry
/// it.
pub const WORKLOAD_ANNOTATION: &str = "scheduler.cube.dev/workload";

/// Amounts of resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts {
    /// CPU in thousandths of a core.
    pub cpu_millis: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
    /// Whole GPUs, of every GPU resource name.
    pub gpus: i64,
    /// Every extended resource by name, each GPU resource included.
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

/// A pod no node has been found for yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The workload it belongs to ([`WORKLOAD_ANNOTATION`]).
    pub workload: Option<String>,
    /// The node labels it must match (`spec.nodeSelector`).
    pub node_selector: BTreeMap<String, String>,
    /// What it requests.
    pub requests: Amounts,
    /// Since when it has waited: when the scheduler last found no node for it, or else when it was created.
    pub since: Option<SystemTime>,
    /// What the scheduler said when it found no node (`0/5 nodes are available: 3 Insufficient cpu, …`), if it
    /// has tried.
    pub unschedulable: Option<String>,
}

impl WaitingPod {
    /// How long it has waited by `now`.
    pub fn waited(&self, now: SystemTime) -> Duration {
        self.since
            .and_then(|since| now.duration_since(since).ok())
            .unwrap_or_default()
    }

    /// Whether it waits because no node matching its selector has room (or none matches at all), rather than
    /// for another reason (a volume, an image, or the scheduler not having tried yet).
    pub fn lacks_resources(&self) -> bool {
        self.unschedulable
            .as_deref()
            .is_some_and(|message| message.contains("Insufficient") || message.contains("didn't match"))
    }
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
#[derive(Clone)]
struct Watch {
    client: Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    waiting: Store<Pod>,
    /// How many changes the watches have applied: the inventory's generation.
    changes: Arc<AtomicU64>,
    /// The node views of one generation, computed once for every query of that generation.
    views: Arc<Mutex<Option<Generation>>>,
}

/// Node views as of one generation of a cluster's watches.
type Generation = (u64, Arc<Vec<NodeView>>);

/// A cluster of the inventory: the configuration it was connected with, and its watches or why it has none.
struct Member {
    config: ClusterConfig,
    watch: Result<Watch, String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The inventory of every registered cluster; [`Fleet::reload`] follows a changed registry.
pub struct Fleet {
    clusters: RwLock<BTreeMap<String, Arc<Member>>>,
    options: InventoryOptions,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .clusters
            .read()
            .map(|clusters| clusters.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Fleet")
            .field("clusters", &names)
            .finish_non_exhaustive()
    }
}

/// Drives a reflector until the task is aborted, logging watch errors (the watcher retries by itself).
/// Counts every change the reflector applies in `changes`.
fn drive<K>(
    cluster: String,
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<AtomicU64>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                // The store has the change by now.
                Ok(_) => changes.fetch_add(1, AtomicOrdering::Release),
                Err(error) => {
                    tracing::warn!(%cluster, %error, "watching the cluster");
                    continue;
                }
            };
        }
    });
    (reader, task)
}

/// Connects to a cluster that has a Kubernetes API and starts watching its Nodes, its bound Pods and its waiting
/// Pods; a cluster that cannot be connected to is kept, with the reason, and reported unhealthy.
async fn member(cluster: &ClusterConfig) -> Member {
    match cluster.client().await {
        Ok(client) => {
            let changes = Arc::new(AtomicU64::new(0));
            let (nodes, node_task) = drive(
                cluster.name.clone(),
                Api::<Node>::all(client.clone()),
                watcher::Config::default(),
                changes.clone(),
            );
            // Only pods bound to a node and not finished request anything of it.
            let bound =
                watcher::Config::default().fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed");
            let (pods, pod_task) = drive(
                cluster.name.clone(),
                Api::<Pod>::all(client.clone()),
                bound,
                changes.clone(),
            );
            let unbound = watcher::Config::default().fields("spec.nodeName=,status.phase=Pending");
            let (waiting, waiting_task) = drive(
                cluster.name.clone(),
                Api::<Pod>::all(client.clone()),
                unbound,
                changes.clone(),
            );
            Member {
                config: cluster.clone(),
                watch: Ok(Watch {
                    client,
                    nodes,
                    pods,
                    waiting,
                    changes,
                    views: Arc::new(Mutex::new(None)),
                }),
                tasks: vec![node_task, pod_task, waiting_task],
            }
        }
        Err(reason) => {
            tracing::info!(cluster = %cluster.name, %reason, "no node inventory for the cluster");
            Member {
                config: cluster.clone(),
                watch: Err(reason),
                tasks: Vec::new(),
            }
        }
    }
}

impl Fleet {
    /// Connects to every registered cluster (see [`member`]).
    pub async fn connect(registry: &ClusterRegistry, options: InventoryOptions) -> Self {
        let fleet = Self {
            clusters: RwLock::new(BTreeMap::new()),
            options,
        };
        fleet.reload(registry).await;
        fleet
    }

    /// Follows the registry: connects to clusters that are new or reached differently now (another kubeconfig,
    /// or in-cluster), and stops watching clusters that are gone. The others keep their watches.
    pub async fn reload(&self, registry: &ClusterRegistry) {
        let current: BTreeMap<String, Arc<Member>> = self.clusters.read().map(|c| c.clone()).unwrap_or_default();
        let mut next = BTreeMap::new();
        for cluster in registry.clusters().iter() {
            // Only how the cluster is reached matters to its watches; a new default or namespace keeps them.
            let kept = current.get(&cluster.name).filter(|member| {
                member.config.kubeconfig == cluster.kubeconfig && member.config.in_cluster == cluster.in_cluster
            });
            let member = match kept {
                Some(member) => member.clone(),
                None => Arc::new(member(cluster).await),
            };
            next.insert(cluster.name.clone(), member);
        }
        if let Ok(mut clusters) = self.clusters.write() {
            *clusters = next;
        }
    }

    fn watch(&self, cluster: &str) -> Result<Watch, InventoryError> {
        let clusters = self
            .clusters
            .read()
            .map_err(|_| InventoryError::UnknownCluster(cluster.to_owned()))?;
        match clusters.get(cluster).map(|member| &member.watch) {
            Some(Ok(watch)) => Ok(watch.clone()),
            Some(Err(reason)) => Err(InventoryError::Unavailable {
                cluster: cluster.to_owned(),
                reason: reason.clone(),
            }),
            None => Err(InventoryError::UnknownCluster(cluster.to_owned())),
        }
    }

    /// Returns the cluster's Kubernetes client.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn client(&self, cluster: &str) -> Result<Client, InventoryError> {
        Ok(self.watch(cluster)?.client)
    }

    /// Waits until the cluster's first list of Nodes and Pods is in (at most `timeout`).
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched or the lists take longer.
    pub async fn ready(&self, cluster: &str, timeout: Duration) -> Result<(), InventoryError> {
        let watch = self.watch(cluster)?;
        let all = async {
            let (nodes, pods, waiting) = tokio::join!(
                watch.nodes.wait_until_ready(),
                watch.pods.wait_until_ready(),
                watch.waiting.wait_until_ready()
            );
            nodes.is_ok() && pods.is_ok() && waiting.is_ok()
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(true) => Ok(()),
            _ => Err(InventoryError::Unavailable {
                cluster: cluster.to_owned(),
                reason: format!("its nodes and pods were not listed within {timeout:?}"),
            }),
        }
    }

    /// Asks the cluster's API server for its version (at most 2 s): `Ok(version)` or why it is unreachable.
    pub async fn health(&self, cluster: &str) -> Result<String, String> {
        let watch = self.watch(cluster).map_err(|error| error.to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), watch.client.apiserver_version()).await {
            Ok(Ok(info)) => Ok(info.git_version),
            Ok(Err(error)) => Err(format!("the API server refused: {error}")),
            Err(_) => Err("the API server did not answer within 2 s".into()),
        }
    }

    /// Returns the cluster's generation: a number that grows with every change to its nodes or pods, so a caller
    /// can keep what it derived from [`Self::nodes`] until it changes.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn generation(&self, cluster: &str) -> Result<u64, InventoryError> {
        Ok(self.watch(cluster)?.changes.load(AtomicOrdering::Acquire))
    }

    /// Returns the cluster's nodes, ordered by name, with what their pods request. They are computed once per
    /// [generation](Self::generation).
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn nodes(&self, cluster: &str) -> Result<Arc<Vec<NodeView>>, InventoryError> {
        let watch = self.watch(cluster)?;
        let generation = watch.changes.load(AtomicOrdering::Acquire);
        if let Ok(cached) = watch.views.lock()
            && let Some((seen, views)) = cached.as_ref()
            && *seen == generation
        {
            return Ok(views.clone());
        }
        let views = Arc::new(self.compute_nodes(&watch));
        if let Ok(mut cached) = watch.views.lock() {
            *cached = Some((generation, views.clone()));
        }
        Ok(views)
    }

    fn compute_nodes(&self, watch: &Watch) -> Vec<NodeView> {
        let mut requested: BTreeMap<String, Amounts> = BTreeMap::new();
        for pod in watch.pods.state() {
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
        let mut views: Vec<NodeView> = watch
            .nodes
            .state()
            .iter()
            .map(|node| self.view(node, requested.remove(&node.metadata.name.clone().unwrap_or_default())))
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Returns the cluster's pods that wait for a node, ordered by namespace and name.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn waiting(&self, cluster: &str) -> Result<Vec<WaitingPod>, InventoryError> {
        let watch = self.watch(cluster)?;
        let mut pods: Vec<WaitingPod> = watch
            .waiting
            .state()
            .iter()
            .filter(|pod| pod.spec.as_ref().is_some_and(|spec| spec.node_name.is_none()))
            .map(|pod| {
                let scheduled = pod
                    .status
                    .as_ref()
                    .and_then(|status| status.conditions.as_ref())
                    .and_then(|conditions| conditions.iter().find(|condition| condition.type_ == "PodScheduled"))
                    .filter(|condition| condition.status == "False");
                let since = scheduled
                    .and_then(|condition| condition.last_transition_time.as_ref())
                    .or(pod.metadata.creation_timestamp.as_ref())
                    .map(|time| SystemTime::from(time.0));
                WaitingPod {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    workload: workload_of(pod),
                    node_selector: pod
                        .spec
                        .as_ref()
                        .and_then(|spec| spec.node_selector.clone())
                        .unwrap_or_default(),
                    requests: self.pod_requests(pod),
                    since,
                    unschedulable: scheduled
                        .filter(|condition| condition.reason.as_deref() == Some("Unschedulable"))
                        .map(|condition| condition.message.clone().unwrap_or_default()),
                }
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(pods)
    }

    /// Returns the workloads ([`WORKLOAD_ANNOTATION`]) that have an unfinished pod in the cluster, bound or
    /// waiting.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn workloads(&self, cluster: &str) -> Result<BTreeSet<String>, InventoryError> {
        let watch = self.watch(cluster)?;
        Ok(watch
            .pods
            .state()
            .iter()
            .chain(watch.waiting.state().iter())
            .filter_map(|pod| workload_of(pod))
            .collect())
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
                // GPUs of every vendor count in `gpus`, and each vendor's own in `other`.
                gpu if self.options.gpu_resources.iter().any(|known| known == gpu) => {
                    let count = quantity_millis(&quantity.0).unwrap_or(0) / 1000;
                    amounts.gpus += count;
                    *amounts.other.entry(gpu.to_owned()).or_default() += count;
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

fn workload_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(WORKLOAD_ANNOTATION))
        .cloned()
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
