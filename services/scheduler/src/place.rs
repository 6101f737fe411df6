//! `cube.scheduler.v1.PlacementService`: a workload's placement from its project's settings (asked of the
//! projects service with the caller's token, through the cache admission shares) and its resource strings,
//! judged against the cluster's nodes. The nodes' shapes and the verdicts are kept until the nodes' labels or
//! allocatable amounts change, so a placement is not judged against thousands of nodes on every call; the nodes
//! are looked at again at most every [`RECHECK`], so bursts of node updates (a node controller marking thousands
//! of nodes at once) do not make every call recompute them.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cube_clusters::ClusterRegistry;
use cube_kit::identity::Principal;
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::scheduler::v1::placement_service_server::PlacementService;
use cube_proto::cube::scheduler::v1::{
    AffinityTerm, PlaceRequest, Placement as PlacementMessage, Toleration as TolerationMessage,
};
use tonic::{Request, Response, Status};

use crate::DOMAIN;
use crate::inventory::{Fleet, NodeView, WORKLOAD_ANNOTATION};
use crate::placement::{
    NodeShape, Placement, PlacementConfig, ProjectPlacement, Resources, WeightedPodAffinityTerm, Workload,
    WorkloadKind, place, why_unplaceable,
};

/// Serves `PlacementService`.
#[derive(Clone)]
pub(crate) struct Placer {
    pub(crate) registry: ClusterRegistry,
    pub(crate) fleet: Arc<Fleet>,
    /// The project cache and verdicts, shared with admission.
    pub(crate) shared: Arc<crate::ask::Shared>,
    pub(crate) config: Arc<PlacementConfig>,
}

/// The node a placement is judged against: its labels, and what it offers in the placement's units, each GPU
/// vendor's resource under its own name (the inventory lists every extended resource in `other`).
fn shape(node: &NodeView) -> NodeShape {
    let mut allocatable = BTreeMap::new();
    allocatable.insert(
        "cpu".to_owned(),
        u64::try_from(node.allocatable.cpu_millis).unwrap_or(0),
    );
    allocatable.insert(
        "memory".to_owned(),
        u64::try_from(node.allocatable.memory_bytes).unwrap_or(0),
    );
    for (resource, amount) in &node.allocatable.other {
        allocatable.insert(resource.clone(), u64::try_from(*amount).unwrap_or(0));
    }
    NodeShape {
        labels: node.labels.clone(),
        allocatable,
    }
}

/// A verdict of [`why_unplaceable`] and what it was given.
type Verdict = (BTreeMap<String, String>, BTreeMap<String, u64>, Option<String>);

/// One cluster's node shapes and the verdicts reached against them.
#[derive(Debug, Default)]
struct ClusterVerdicts {
    /// The inventory's shape generation the shapes were last checked at, and when.
    generation: Option<u64>,
    checked: Option<Instant>,
    /// A hash of every node's name, labels and allocatable amounts: what a verdict depends on.
    fingerprint: Option<u64>,
    shapes: Arc<Vec<NodeShape>>,
    /// Verdicts by a hash of node selector and requests.
    verdicts: HashMap<u64, Vec<Verdict>>,
}

/// How old the node shapes a placement is judged against may be at most, when the inventory has changed since.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

/// The most verdicts kept per cluster; past it they start over.
const MAX_VERDICTS: usize = 10_000;

/// Placement's node shapes and verdicts per cluster, kept while the nodes' labels and allocatable amounts stay
/// the same (pods coming and going change neither).
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    clusters: Mutex<HashMap<String, ClusterVerdicts>>,
}

fn nodes_fingerprint(nodes: &[Arc<NodeView>]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    nodes.len().hash(&mut hasher);
    for node in nodes {
        node.name.hash(&mut hasher);
        node.labels.hash(&mut hasher);
        node.allocatable.cpu_millis.hash(&mut hasher);
        node.allocatable.memory_bytes.hash(&mut hasher);
        node.allocatable.gpus.hash(&mut hasher);
        node.allocatable.other.hash(&mut hasher);
    }
    hasher.finish()
}

fn ask_hash(selector: &BTreeMap<String, String>, requests: &BTreeMap<String, u64>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    selector.hash(&mut hasher);
    requests.hash(&mut hasher);
    hasher.finish()
}

impl Verdicts {
    /// Says why no node of the placement's cluster could ever run it ([`why_unplaceable`]); `None` when one
    /// could or when the cluster has no node inventory (the local cluster of `cube up`).
    fn judge(&self, fleet: &Fleet, placement: &Placement) -> Option<String> {
        let cluster = &placement.cluster;
        // Pods coming and going leave the shapes as they are: only a node's labels or allocatable amounts count.
        let generation = fleet.shape_generation(cluster).ok()?;
        let key = ask_hash(&placement.node_selector, &placement.requests);
        let lock = || self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
        let shapes = {
            let mut clusters = lock();
            match clusters.get_mut(cluster) {
                Some(known)
                    if known.generation == Some(generation)
                        || known.checked.is_some_and(|checked| checked.elapsed() < RECHECK) =>
                {
                    let found = known.verdicts.get(&key).and_then(|verdicts| {
                        verdicts.iter().find(|(selector, requests, _)| {
                            *selector == placement.node_selector && *requests == placement.requests
                        })
                    });
                    if let Some((_, _, verdict)) = found {
                        return verdict.clone();
                    }
                    Some(known.shapes.clone())
                }
                // One call looks at the nodes again; the others meanwhile judge against the shapes as they were.
                Some(known) => {
                    known.checked = Some(Instant::now());
                    None
                }
                None => None,
            }
        };
        let shapes = match shapes {
            Some(shapes) => shapes,
            None => {
                let nodes = fleet.nodes(cluster).ok()?;
                let fingerprint = nodes_fingerprint(&nodes);
                let unchanged = lock()
                    .get(cluster)
                    .is_some_and(|known| known.fingerprint == Some(fingerprint));
                let shapes = (!unchanged).then(|| Arc::new(nodes.iter().map(|node| shape(node)).collect()));
                let mut clusters = lock();
                let known = clusters.entry(cluster.clone()).or_default();
                if let Some(shapes) = shapes
                    && known.fingerprint != Some(fingerprint)
                {
                    known.shapes = shapes;
                    known.fingerprint = Some(fingerprint);
                    known.verdicts.clear();
                }
                known.generation = Some(generation);
                known.checked = Some(Instant::now());
                known.shapes.clone()
            }
        };
        let verdict = why_unplaceable(placement, &shapes);
        let mut clusters = lock();
        if let Some(known) = clusters.get_mut(cluster)
            && Arc::ptr_eq(&known.shapes, &shapes)
        {
            if known.verdicts.len() >= MAX_VERDICTS {
                known.verdicts.clear();
            }
            let same = known.verdicts.entry(key).or_default();
            if !same
                .iter()
                .any(|(selector, requests, _)| *selector == placement.node_selector && *requests == placement.requests)
            {
                same.push((
                    placement.node_selector.clone(),
                    placement.requests.clone(),
                    verdict.clone(),
                ));
            }
        }
        verdict
    }
}

fn terms(terms: &[WeightedPodAffinityTerm]) -> Vec<AffinityTerm> {
    terms
        .iter()
        .map(|term| AffinityTerm {
            weight: term.weight,
            match_labels: term.match_labels.clone().into_iter().collect(),
            topology_key: term.topology_key.clone(),
        })
        .collect()
}

impl Placer {
    async fn place(&self, request: Request<PlaceRequest>) -> Result<PlacementMessage, ApiError> {
        let caller = Principal::of(&request)?;
        let body = request.get_ref();
        let mut violations = Vec::new();
        // The workload is optional; when named, it lies under the project as `Admit` requires.
        if !body.workload.is_empty() {
            let named = match crate::names::project_id("project", &body.project) {
                Ok(project) => crate::names::workload_in("workload", &body.workload, &project),
                Err(_) => crate::names::workload_project("workload", &body.workload).map(|_| ()),
            };
            if let Err(violation) = named {
                violations.push(violation);
            }
        }
        let ask = crate::ask::read(
            crate::ask::Fields {
                project: &body.project,
                kind: body.kind(),
                cpu: &body.cpu,
                memory: &body.memory,
                gpu: &body.gpu,
            },
            &mut violations,
        );
        if body.kind() == cube_proto::cube::scheduler::v1::WorkloadKind::Run {
            violations.push(FieldViolation::new(
                "kind",
                "a run is not placed: place each of its tasks as WORKLOAD_KIND_TASK",
            ));
        }
        let rdma = u32::try_from(body.rdma)
            .map_err(|_| violations.push(FieldViolation::new("rdma", "must be zero or more")))
            .ok();
        let replica_label = if body.replica_label.is_empty() {
            None
        } else {
            crate::names::label("replica_label", &body.replica_label)
                .map_err(|violation| violations.push(violation))
                .ok()
        };
        let (Some(ask), Some(rdma), true) = (ask, rdma, violations.is_empty()) else {
            return Err(ApiError::InvalidArgument(violations));
        };
        let crate::ask::Ask {
            project,
            kind,
            cpu,
            memory,
            gpu,
            ..
        } = ask;

        let shared = &self.shared;
        let view = shared.projects.view(&request, &caller, &project).await?;
        let settings = &view.settings;
        let cluster = if settings.cluster.is_empty() {
            self.registry.default_cluster()
        } else {
            settings.cluster.clone()
        };
        let namespace = match kind {
            WorkloadKind::Train => settings.pipeline_namespace.clone(),
            WorkloadKind::Notebook => settings.notebook_namespace.clone(),
            WorkloadKind::Service => settings.service_namespace.clone(),
        };
        let workload = Workload {
            kind,
            resources: Resources { cpu, memory, gpu, rdma },
            replica_label,
        };
        let project_placement = ProjectPlacement {
            cluster: cluster.clone(),
            namespace,
            resource_group: settings.resource_group.clone(),
            node_selector: settings.node_selector.clone().into_iter().collect(),
        };
        let placement = place(&workload, &project_placement, &self.config)
            .map_err(|error| ApiError::invalid(error.field(), error.to_string()))?;
        // A cluster with a node inventory judges the placement; the local cluster of `cube up` has none.
        if let Some(reason) = shared.verdicts.judge(&self.fleet, &placement) {
            return Err(ApiError::FailedPrecondition { message: reason });
        }
        let mut pod_annotations = HashMap::new();
        if !body.workload.is_empty() {
            pod_annotations.insert(WORKLOAD_ANNOTATION.to_owned(), body.workload.clone());
        }
        Ok(PlacementMessage {
            cluster: format!("clusters/{}", placement.cluster),
            namespace: placement.namespace.clone(),
            node_selector: placement.node_selector.clone().into_iter().collect(),
            requests: placement.request_quantities().into_iter().collect(),
            limits: placement.limit_quantities().into_iter().collect(),
            pod_labels: placement.pod_labels.clone().into_iter().collect(),
            pod_affinity: terms(&placement.affinity.pod_affinity),
            pod_anti_affinity: terms(&placement.affinity.pod_anti_affinity),
            tolerations: placement
                .tolerations
                .iter()
                .map(|toleration| TolerationMessage {
                    key: toleration.key.clone(),
                    operator: toleration.operator.clone(),
                    value: toleration.value.clone().unwrap_or_default(),
                    effect: toleration.effect.clone().unwrap_or_default(),
                })
                .collect(),
            pod_annotations,
        })
    }
}

#[tonic::async_trait]
impl PlacementService for Placer {
    async fn place(&self, request: Request<PlaceRequest>) -> Result<Response<PlacementMessage>, Status> {
        Placer::place(self, request)
            .await
            .map(Response::new)
            .map_err(|error| error.status(DOMAIN))
    }
}
