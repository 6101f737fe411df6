//! The node inventory: one Kubernetes client per registered cluster, and shared watches (kube-runtime
//! reflectors) of its Nodes, of the Pods bound to them and of the Pods still waiting for a node. The node views
//! (labels, what each node offers and what its pods request) are kept up to date change by change as the watch
//! events arrive ([`NodeIndex`]), so no query rebuilds them; which pods wait and why is read from the watches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};

use cube_clusters::{ClusterConfig, ClusterRegistry};

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

    /// Takes `other` off these amounts (a pod that went), dropping extended resources that reach nothing.
    fn sub(&mut self, other: &Amounts) {
        self.cpu_millis -= other.cpu_millis;
        self.memory_bytes -= other.memory_bytes;
        self.gpus -= other.gpus;
        for (name, amount) in &other.other {
            let entry = self.other.entry(name.clone()).or_default();
            *entry -= amount;
            if *entry == 0 {
                self.other.remove(name);
            }
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
    /// The node views, updated by every event of the Node and bound Pod watches.
    index: Arc<Mutex<NodeIndex>>,
}

/// A cluster's nodes as placement sees them, ordered by name; shared, so handing them out copies nothing.
pub type Nodes = Arc<Vec<Arc<NodeView>>>;

/// How quantities are read: which resource names count as GPUs.
#[derive(Debug, Clone)]
struct Units {
    gpu_resources: Vec<String>,
}

/// What one bound pod requests of its node.
type Bound = (String, Amounts);

/// A cluster's node views kept up to date change by change: a Node event replaces that node's view, a bound Pod
/// event moves that pod's requests on and off its node's view; a watch that lists everything again (after a
/// restart) replaces the whole of its side once the list is complete.
#[derive(Debug, Default)]
struct NodeIndex {
    /// Node views by name, with what their bound pods request.
    nodes: BTreeMap<String, Arc<NodeView>>,
    /// What the unfinished pods bound to each node request, by node name (also of nodes not seen yet).
    requested: HashMap<String, Amounts>,
    /// Each unfinished bound pod's node and requests, by `namespace/name`.
    pods: HashMap<String, Bound>,
    /// Nodes listed since the Node watch restarted, applied whole when the list is complete.
    listing_nodes: Option<Vec<Node>>,
    /// Pods listed since the bound Pod watch restarted, likewise.
    listing_pods: Option<Vec<Pod>>,
    /// The views as one list, made when first asked for after a change.
    snapshot: Option<Nodes>,
    /// Grows whenever a node comes, goes, or changes its labels or allocatable amounts.
    shapes: u64,
}

/// Whether two views of a node differ in what placement judges: labels or allocatable amounts.
fn shape_changed(old: &NodeView, new: &NodeView) -> bool {
    old.labels != new.labels || old.allocatable != new.allocatable
}

fn locked(index: &Mutex<NodeIndex>) -> std::sync::MutexGuard<'_, NodeIndex> {
    index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl NodeIndex {
    /// The views in name order.
    fn snapshot(&mut self) -> Nodes {
        if let Some(snapshot) = &self.snapshot {
            return snapshot.clone();
        }
        let snapshot: Nodes = Arc::new(self.nodes.values().cloned().collect());
        self.snapshot = Some(snapshot.clone());
        snapshot
    }

    fn node_event(&mut self, units: &Units, event: &watcher::Event<Node>) {
        match event {
            watcher::Event::Apply(node) => self.apply_node(units, node),
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.as_deref().unwrap_or_default();
                if self.nodes.remove(name).is_some() {
                    self.shapes += 1;
                    self.snapshot = None;
                }
            }
            watcher::Event::Init => self.listing_nodes = Some(Vec::new()),
            watcher::Event::InitApply(node) => self.listing_nodes.get_or_insert_default().push(node.clone()),
            watcher::Event::InitDone => {
                let listed = self.listing_nodes.take().unwrap_or_default();
                let names: BTreeSet<&str> = listed.iter().filter_map(|node| node.metadata.name.as_deref()).collect();
                let before = self.nodes.len();
                self.nodes.retain(|name, _| names.contains(name.as_str()));
                if self.nodes.len() != before {
                    self.shapes += 1;
                    self.snapshot = None;
                }
                for node in &listed {
                    self.apply_node(units, node);
                }
            }
        }
    }

    fn apply_node(&mut self, units: &Units, node: &Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let view = units.view(node, self.requested.get(&name).cloned());
        match self.nodes.get(&name) {
            // Status heartbeats and the like change nothing a view holds.
            Some(old) if **old == view => return,
            Some(old) if !shape_changed(old, &view) => {}
            _ => self.shapes += 1,
        }
        self.nodes.insert(name, Arc::new(view));
        self.snapshot = None;
    }

    fn pod_event(&mut self, units: &Units, event: &watcher::Event<Pod>) {
        match event {
            watcher::Event::Apply(pod) => {
                let bound = units.bound(pod);
                self.set_pod(pod_key(pod), bound);
            }
            watcher::Event::Delete(pod) => self.set_pod(pod_key(pod), None),
            watcher::Event::Init => self.listing_pods = Some(Vec::new()),
            watcher::Event::InitApply(pod) => self.listing_pods.get_or_insert_default().push(pod.clone()),
            watcher::Event::InitDone => {
                let listed: HashMap<String, Option<Bound>> = self
                    .listing_pods
                    .take()
                    .unwrap_or_default()
                    .iter()
                    .map(|pod| (pod_key(pod), units.bound(pod)))
                    .collect();
                let gone: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|key| !listed.contains_key(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    self.set_pod(key, None);
                }
                for (key, bound) in listed {
                    self.set_pod(key, bound);
                }
            }
        }
    }

    /// Records what the pod `key` requests of which node now (`None`: nothing, it is gone or finished), moving
    /// its requests between node views as needed.
    fn set_pod(&mut self, key: String, bound: Option<Bound>) {
        let old = match &bound {
            Some(bound) => self.pods.insert(key, bound.clone()),
            None => self.pods.remove(&key),
        };
        if old == bound {
            return;
        }
        if let Some((node, amounts)) = old {
            let requested = self.requested.entry(node.clone()).or_default();
            requested.sub(&amounts);
            if *requested == Amounts::default() {
                self.requested.remove(&node);
            }
            self.refresh_requested(&node);
        }
        if let Some((node, amounts)) = bound {
            self.requested.entry(node.clone()).or_default().add(&amounts);
            self.refresh_requested(&node);
        }
    }

    /// Puts what node `name`'s pods request into its view.
    fn refresh_requested(&mut self, name: &str) {
        let requested = self.requested.get(name).cloned().unwrap_or_default();
        if let Some(view) = self.nodes.get_mut(name)
            && view.requested != requested
        {
            let mut changed = (**view).clone();
            changed.requested = requested;
            *view = Arc::new(changed);
            self.snapshot = None;
        }
    }
}

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
    units: Arc<Units>,
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
/// Hands every event to `seen` once the reflector has applied it, then counts it in `changes`.
fn drive<K>(
    cluster: String,
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<AtomicU64>,
    mut seen: impl FnMut(&watcher::Event<K>) + Send + 'static,
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
                Ok(event) => {
                    seen(&event);
                    changes.fetch_add(1, AtomicOrdering::Release)
                }
                Err(error) => {
                    tracing::warn!(%cluster, %error, "watching the cluster");
                    continue;
                }
            };
        }
    });
    (reader, task)
}

/// Starts watching the Nodes, bound Pods and waiting Pods of a cluster that has a Kubernetes API, through the
/// registry's client for it; a cluster that cannot be connected to is kept, with the reason, and reported unhealthy.
async fn member(registry: &ClusterRegistry, cluster: &ClusterConfig, units: &Arc<Units>) -> Member {
    match registry.client(&cluster.name).await.map_err(|error| error.to_string()) {
        Ok(client) => {
            let changes = Arc::new(AtomicU64::new(0));
            let index = Arc::new(Mutex::new(NodeIndex::default()));
            let (nodes, node_task) = drive(
                cluster.name.clone(),
                Api::<Node>::all(client.clone()),
                watcher::Config::default(),
                changes.clone(),
                {
                    let (index, units) = (index.clone(), units.clone());
                    move |event| locked(&index).node_event(&units, event)
                },
            );
            // Only pods bound to a node and not finished request anything of it.
            let bound =
                watcher::Config::default().fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed");
            let (pods, pod_task) = drive(
                cluster.name.clone(),
                Api::<Pod>::all(client.clone()),
                bound,
                changes.clone(),
                {
                    let (index, units) = (index.clone(), units.clone());
                    move |event| locked(&index).pod_event(&units, event)
                },
            );
            let unbound = watcher::Config::default().fields("spec.nodeName=,status.phase=Pending");
            let (waiting, waiting_task) = drive(
                cluster.name.clone(),
                Api::<Pod>::all(client.clone()),
                unbound,
                changes.clone(),
                |_| {},
            );
            Member {
                config: cluster.clone(),
                watch: Ok(Watch {
                    client,
                    nodes,
                    pods,
                    waiting,
                    changes,
                    index,
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
            units: Arc::new(Units {
                gpu_resources: options.gpu_resources,
            }),
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
            let kept = current
                .get(&cluster.name)
                .filter(|member| member.config.same_connection(cluster));
            let member = match kept {
                Some(member) => member.clone(),
                None => Arc::new(member(registry, cluster, &self.units).await),
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

    /// Returns a number that grows whenever a node of the cluster comes, goes, or changes its labels or
    /// allocatable amounts (not when pods come and go), so a caller can keep what it derived from the nodes'
    /// shapes until it changes.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn shape_generation(&self, cluster: &str) -> Result<u64, InventoryError> {
        let watch = self.watch(cluster)?;
        Ok(locked(&watch.index).shapes)
    }

    /// Returns the cluster's nodes, ordered by name, with what their pods request, as of the last watch event.
    /// The views are kept up to date event by event, so this copies no node.
    ///
    /// # Errors
    /// Returns an error when the cluster is not watched.
    pub fn nodes(&self, cluster: &str) -> Result<Nodes, InventoryError> {
        let watch = self.watch(cluster)?;
        Ok(locked(&watch.index).snapshot())
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
                    requests: self.units.pod_requests(pod),
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
}

impl Units {
    /// The node a pod is bound to and what it requests of it; `None` for a pod not bound or finished.
    fn bound(&self, pod: &Pod) -> Option<Bound> {
        let node = pod.spec.as_ref()?.node_name.clone()?;
        let finished = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        (!finished).then(|| (node, self.pod_requests(pod)))
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
                gpu if self.gpu_resources.iter().any(|known| known == gpu) => {
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

    fn units() -> Units {
        Units {
            gpu_resources: vec!["nvidia.com/gpu".into()],
        }
    }

    fn node(name: &str, org: &str, cpu: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"org": org}},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "nvidia.com/gpu": "4"},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap_or_else(|error| panic!("{error}"))
    }

    fn pod(name: &str, node: &str, cpu: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"nodeName": node, "containers": [{"name": "main",
                "resources": {"requests": {"cpu": cpu, "nvidia.com/gpu": "1"}}}]},
            "status": {"phase": phase},
        }))
        .unwrap_or_else(|error| panic!("{error}"))
    }

    /// What each node's pods request, by node, as the index holds it.
    fn requested(index: &mut NodeIndex) -> Vec<(String, i64, i64)> {
        index
            .snapshot()
            .iter()
            .map(|view| (view.name.clone(), view.requested.cpu_millis, view.requested.gpus))
            .collect()
    }

    #[test]
    fn node_views_follow_each_watch_event_without_a_rebuild() {
        let units = units();
        let mut index = NodeIndex::default();
        // A pod may be seen before its node.
        index.pod_event(&units, &watcher::Event::Apply(pod("early", "b", "500m", "Running")));
        for name in ["b", "a"] {
            index.node_event(&units, &watcher::Event::Apply(node(name, "vision", "8")));
        }
        assert_eq!(requested(&mut index), [("a".into(), 0, 0), ("b".into(), 500, 1)]);
        let shapes = index.shapes;

        index.pod_event(&units, &watcher::Event::Apply(pod("p", "a", "2", "Running")));
        assert_eq!(requested(&mut index), [("a".into(), 2000, 1), ("b".into(), 500, 1)]);
        // The same pod again, a heartbeat of a node: nothing changes, the same list is handed out.
        let before = index.snapshot();
        index.pod_event(&units, &watcher::Event::Apply(pod("p", "a", "2", "Running")));
        index.node_event(&units, &watcher::Event::Apply(node("a", "vision", "8")));
        assert!(
            Arc::ptr_eq(&before, &index.snapshot()),
            "unchanged views are not copied"
        );
        assert_eq!(index.shapes, shapes, "pods do not change the nodes' shapes");

        // Finished or deleted pods give their requests back.
        index.pod_event(&units, &watcher::Event::Apply(pod("p", "a", "2", "Succeeded")));
        index.pod_event(&units, &watcher::Event::Delete(pod("early", "b", "500m", "Running")));
        assert_eq!(requested(&mut index), [("a".into(), 0, 0), ("b".into(), 0, 0)]);
        assert!(index.pods.is_empty() && index.requested.is_empty());

        // A label change is a new shape; a deleted node goes.
        index.node_event(&units, &watcher::Event::Apply(node("a", "speech", "8")));
        assert_eq!(index.shapes, shapes + 1);
        assert_eq!(index.snapshot()[0].resource_group, "speech");
        index.node_event(&units, &watcher::Event::Delete(node("b", "vision", "8")));
        assert_eq!(index.shapes, shapes + 2);
        assert_eq!(requested(&mut index), [("a".into(), 0, 0)]);
    }

    #[test]
    fn a_watch_that_lists_again_replaces_its_side_once_the_list_is_complete() {
        let units = units();
        let mut index = NodeIndex::default();
        for name in ["a", "b"] {
            index.node_event(&units, &watcher::Event::Apply(node(name, "vision", "8")));
        }
        index.pod_event(&units, &watcher::Event::Apply(pod("gone", "a", "1", "Running")));
        index.pod_event(&units, &watcher::Event::Apply(pod("kept", "b", "1", "Running")));

        // The watches restart; while listing, the views stay as they were.
        index.node_event(&units, &watcher::Event::Init);
        index.pod_event(&units, &watcher::Event::Init);
        index.node_event(&units, &watcher::Event::InitApply(node("b", "vision", "16")));
        index.node_event(&units, &watcher::Event::InitApply(node("c", "vision", "8")));
        index.pod_event(&units, &watcher::Event::InitApply(pod("kept", "b", "1", "Running")));
        index.pod_event(&units, &watcher::Event::InitApply(pod("new", "c", "3", "Running")));
        assert_eq!(requested(&mut index), [("a".into(), 1000, 1), ("b".into(), 1000, 1)]);

        index.node_event(&units, &watcher::Event::InitDone);
        index.pod_event(&units, &watcher::Event::InitDone);
        assert_eq!(requested(&mut index), [("b".into(), 1000, 1), ("c".into(), 3000, 1)]);
        assert_eq!(index.snapshot()[0].allocatable.cpu_millis, 16_000);
        assert!(
            !index.requested.contains_key("a"),
            "the pod missing from the list was dropped"
        );
    }

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
