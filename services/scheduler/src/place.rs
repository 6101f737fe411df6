//! `cube.scheduler.v1.PlacementService`: a workload's placement from its project's settings (asked of the
//! projects service with the caller's token) and its resource strings, judged against the cluster's nodes.

use std::collections::BTreeMap;
use std::sync::Arc;

use cube_kit::identity::{Principal, forward_token};
use cube_kit::{ApiError, Channel, FieldViolation};
use cube_proto::cube::projects::v1::GetProjectRequest;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_server::PlacementService;
use cube_proto::cube::scheduler::v1::{
    AffinityTerm, PlaceRequest, Placement as PlacementMessage, Toleration as TolerationMessage,
};
use tonic::{Request, Response, Status};

use crate::inventory::{Fleet, NodeView};
use crate::placement::{
    NodeShape, PlacementConfig, ProjectPlacement, Resources, WeightedPodAffinityTerm, Workload, WorkloadKind, place,
    why_unplaceable,
};
use crate::{ClusterRegistry, DOMAIN};

/// Serves `PlacementService`.
#[derive(Clone)]
pub(crate) struct Placer {
    pub(crate) registry: ClusterRegistry,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) projects: Channel,
    pub(crate) config: Arc<PlacementConfig>,
}

/// The node a placement is judged against: its labels, and what it offers in the placement's units.
fn shape(node: &NodeView, config: &PlacementConfig) -> NodeShape {
    let mut allocatable = BTreeMap::new();
    allocatable.insert(
        "cpu".to_owned(),
        u64::try_from(node.allocatable.cpu_millis).unwrap_or(0),
    );
    allocatable.insert(
        "memory".to_owned(),
        u64::try_from(node.allocatable.memory_bytes).unwrap_or(0),
    );
    allocatable.insert(
        config.gpu_resource.clone(),
        u64::try_from(node.allocatable.gpus).unwrap_or(0),
    );
    for (resource, amount) in &node.allocatable.other {
        allocatable.insert(resource.clone(), u64::try_from(*amount).unwrap_or(0));
    }
    NodeShape {
        labels: node.labels.clone(),
        allocatable,
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
        Principal::of(&request)?;
        let body = request.get_ref();
        let mut violations = Vec::new();
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
        let rdma = u32::try_from(body.rdma)
            .map_err(|_| violations.push(FieldViolation::new("rdma", "must be zero or more")))
            .ok();
        let replica_label = if body.replica_label.is_empty() {
            None
        } else {
            let parsed = body
                .replica_label
                .split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()));
            if parsed.is_none() {
                violations.push(FieldViolation::new("replica_label", "must be key=value"));
            }
            parsed
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
        } = ask;

        let mut get = Request::new(GetProjectRequest {
            name: format!("projects/{project}"),
        });
        forward_token(&request, &mut get)?;
        let found = ProjectServiceClient::new(self.projects.clone()).get_project(get).await;
        let settings = match found {
            Ok(response) => response.into_inner().settings.unwrap_or_default(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(ApiError::NotFound {
                    kind: "project",
                    name: format!("projects/{project}"),
                });
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(ApiError::Unauthenticated {
                    message: status.message().to_owned(),
                });
            }
            Err(status) => {
                return Err(ApiError::Unavailable {
                    service: "projects".into(),
                    source: Box::new(status),
                });
            }
        };
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
        if let Ok(nodes) = self.fleet.nodes(&cluster) {
            let shapes: Vec<NodeShape> = nodes.iter().map(|node| shape(node, &self.config)).collect();
            if let Some(reason) = why_unplaceable(&placement, &shapes) {
                return Err(ApiError::FailedPrecondition { message: reason });
            }
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
