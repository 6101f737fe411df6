//! The balancer at work (`cube.scheduler.v1.BalanceService`): each round reads every cluster's nodes and waiting
//! pods from the inventory, plans with [`crate::balance::plan`], and makes the moves by setting each node's `org`
//! label. Only the replica holding a cluster's balancer lease (a `coordination.k8s.io/v1` Lease in that cluster)
//! moves its nodes; it checks the lease is still its own before each move, and each move is conditional on the
//! node's `resourceVersion`, so a plan made on a stale view is never applied. Every move is recorded in the
//! scheduler's database and published on [`MOVED_TOPIC`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cube_bus::EventBus;
use cube_clusters::ClusterRegistry;
use cube_kit::identity::Principal;
use cube_kit::page;
use cube_kit::task::Background;
use cube_kit::time::{now_ms, timestamp};
use cube_kit::{ApiError, FieldViolation};
use cube_proto::cube::scheduler::v1::balance_service_server::BalanceService;
use cube_proto::cube::scheduler::v1::{
    BalancePlan, ListNodeMovesRequest, ListNodeMovesResponse, NodeMove, PlanBalanceRequest, RunBalanceRequest,
    SkippedCluster,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prost::Message as _;
use sea_orm::{
    ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use serde::Deserialize;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::balance::{self, BalanceNode, BalancePolicy, Move, MoveReason, NodeClass, ORG_LABEL, PendingPod};
use crate::inventory::{Fleet, NodeView, WaitingPod, selector_matches};
use crate::model::node_move;

/// The bus topic each move is published on, as a `cube.scheduler.v1.NodeMove`.
pub const MOVED_TOPIC: &str = "scheduler.node.moved";

/// The name of the Lease, in each cluster, whose holder balances that cluster.
pub const LEASE_NAME: &str = "cube-scheduler-balancer";

/// The balancer's settings (`--balance-file`, JSON); every field has the default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSettings {
    /// Seconds between rounds; 0 runs rounds only when `RunBalance` asks.
    pub interval_seconds: u64,
    /// How many percentage points the most-loaded group must exceed the least-loaded by for a node to move.
    pub threshold_points: u32,
    /// Seconds pods must have waited for lack of resources before their group receives a node.
    pub pending_after_seconds: u64,
    /// Pool nodes of each class a group keeps at least.
    pub default_minimum: usize,
    /// Guaranteed minimums of particular groups.
    pub minimums: BTreeMap<String, usize>,
    /// Moves per cluster and class in one round.
    pub max_moves_per_class: usize,
    /// Only nodes matching this label selector (e.g. `pool=shared`) are balanced; empty for every node.
    pub node_selector: String,
    /// The namespace of each cluster's balancer Lease.
    pub lease_namespace: String,
    /// How long a lease holds without being renewed; a round renews it.
    pub lease_seconds: u32,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        let policy = BalancePolicy::default();
        Self {
            interval_seconds: 300,
            threshold_points: policy.threshold_points,
            pending_after_seconds: policy.pending_after.as_secs(),
            default_minimum: policy.default_minimum,
            minimums: policy.minimums,
            max_moves_per_class: policy.max_moves_per_class,
            node_selector: String::new(),
            lease_namespace: "kube-system".into(),
            lease_seconds: 60,
        }
    }
}

impl BalanceSettings {
    /// The planning policy these settings make.
    pub fn policy(&self) -> BalancePolicy {
        BalancePolicy {
            threshold_points: self.threshold_points,
            pending_after: Duration::from_secs(self.pending_after_seconds),
            default_minimum: self.default_minimum,
            minimums: self.minimums.clone(),
            max_moves_per_class: self.max_moves_per_class,
        }
    }

    /// Checks what serde cannot.
    ///
    /// # Errors
    /// Returns what is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        selector_matches(&self.node_selector, &BTreeMap::new()).map_err(|error| format!("node_selector: {error}"))?;
        if self.lease_seconds < 2 {
            return Err("lease_seconds must be at least 2".into());
        }
        if self.threshold_points > 100 {
            return Err("threshold_points must be at most 100".into());
        }
        Ok(())
    }
}

/// A cluster a round left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The cluster.
    pub cluster: String,
    /// Why.
    pub reason: String,
}

/// A round's outcome.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// The moves planned (by [`Balancer::plan`]) or made (by [`Balancer::run`], recorded).
    pub moves: Vec<(Move, Option<node_move::Model>)>,
    /// Clusters left alone.
    pub skipped: Vec<Skipped>,
}

/// Balances the registered clusters.
pub struct Balancer {
    registry: ClusterRegistry,
    fleet: Arc<Fleet>,
    db: DatabaseConnection,
    bus: Arc<dyn EventBus>,
    settings: BalanceSettings,
    replica: String,
    /// One round at a time in this replica.
    round: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("replica", &self.replica)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn class_name(class: NodeClass) -> &'static str {
    class.label()
}

fn reason_text(movement: &Move, settings: &BalanceSettings) -> String {
    match &movement.reason {
        MoveReason::Imbalance {
            from_load_percent,
            to_load_percent,
        } => format!(
            "load {to_load_percent:.0}% in {} vs {from_load_percent:.0}% in {}, more than {} points apart",
            movement.to_group, movement.from_group, settings.threshold_points
        ),
        MoveReason::Pending { pods, longest } => format!(
            "{pods} pod(s) of {} waited for {} nodes for lack of resources, the longest {}s (more than {}s)",
            movement.to_group,
            movement.class,
            longest.as_secs(),
            settings.pending_after_seconds
        ),
    }
}

/// What the planner needs of a node.
fn balance_node(node: &NodeView) -> BalanceNode {
    let amount = |value: i64| u64::try_from(value).unwrap_or(0);
    BalanceNode {
        name: node.name.clone(),
        labels: node.labels.clone(),
        allocatable: balance::Resources {
            cpu_millis: amount(node.allocatable.cpu_millis),
            memory_bytes: amount(node.allocatable.memory_bytes),
            gpus: amount(node.allocatable.gpus),
        },
        requested: balance::Resources {
            cpu_millis: amount(node.requested.cpu_millis),
            memory_bytes: amount(node.requested.memory_bytes),
            gpus: amount(node.requested.gpus),
        },
        ready: node.ready && !node.unschedulable,
    }
}

/// A waiting pod the balancer can help: it asks for training nodes (`train=true`) of a class and a group.
fn pending_pod(pod: &WaitingPod, now: SystemTime) -> Option<PendingPod> {
    let is = |label: &str| pod.node_selector.get(label).is_some_and(|value| value == "true");
    if !is("train") {
        return None;
    }
    let class = if is("gpu") {
        NodeClass::Gpu
    } else if is("cpu") {
        NodeClass::Cpu
    } else {
        return None;
    };
    Some(PendingPod {
        resource_group: pod.node_selector.get(ORG_LABEL).cloned().unwrap_or_default(),
        class,
        pending_for: pod.waited(now),
        insufficient_resources: pod.lacks_resources(),
    })
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Whether the lease is free for `replica`: unheld, held by it, or not renewed in time.
fn lease_free(spec: &LeaseSpec, replica: &str) -> Result<(), String> {
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() || holder == replica {
        return Ok(());
    }
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let expires = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|time| time.0 + k8s_openapi::jiff::SignedDuration::from_secs(seconds));
    match expires {
        Some(expires) if expires > k8s_openapi::jiff::Timestamp::now() => {
            Err(format!("replica {holder} holds the balancer lease until {expires}"))
        }
        _ => Ok(()),
    }
}

impl Balancer {
    /// A balancer of `registry`'s clusters, seen through `fleet`, recording moves in `db` and publishing them on
    /// `bus`, as replica `replica`.
    pub fn new(
        registry: ClusterRegistry,
        fleet: Arc<Fleet>,
        db: DatabaseConnection,
        bus: Arc<dyn EventBus>,
        settings: BalanceSettings,
        replica: String,
    ) -> Self {
        Self {
            registry,
            fleet,
            db,
            bus,
            settings,
            replica,
            round: tokio::sync::Mutex::new(()),
        }
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The clusters named (`clusters/{cluster}`), or every registered one.
    fn clusters(&self, names: &[String]) -> Result<Vec<String>, Error> {
        if names.is_empty() {
            return Ok(self.registry.names());
        }
        names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let id = crate::names::cluster_id(&format!("clusters[{index}]"), name)
                    .map_err(|violation| ApiError::InvalidArgument(vec![violation]))?;
                self.registry
                    .get(&id)
                    .map(|cluster| cluster.name)
                    .ok_or_else(|| crate::unknown_cluster(name, &self.registry))
            })
            .collect()
    }

    /// One cluster's nodes and waiting pods as the planner takes them, or why it cannot be planned.
    async fn view(&self, cluster: &str) -> Result<(Vec<BalanceNode>, Vec<PendingPod>), String> {
        self.fleet
            .ready(cluster, Duration::from_secs(10))
            .await
            .map_err(|error| error.to_string())?;
        let nodes = self.fleet.nodes(cluster).map_err(|error| error.to_string())?;
        let waiting = self.fleet.waiting(cluster).map_err(|error| error.to_string())?;
        let now = SystemTime::now();
        let mut chosen = Vec::new();
        for node in nodes.iter() {
            // Checked in `BalanceSettings::check`, so it parses.
            if selector_matches(&self.settings.node_selector, &node.labels).unwrap_or(false) {
                chosen.push(balance_node(node));
            }
        }
        Ok((chosen, waiting.iter().filter_map(|pod| pending_pod(pod, now)).collect()))
    }

    /// Plans a round over `clusters` (empty: all) without moving anything.
    ///
    /// # Errors
    /// Returns an error naming a cluster that is not registered.
    pub async fn plan(&self, clusters: &[String]) -> Result<Round, Error> {
        let mut round = Round::default();
        let mut inputs = Vec::new();
        for cluster in self.clusters(clusters)? {
            match self.view(&cluster).await {
                Ok((nodes, pending)) => inputs.push((cluster, nodes, pending)),
                Err(reason) => round.skipped.push(Skipped { cluster, reason }),
            }
        }
        round.moves = balance::plan(&inputs, &self.settings.policy())
            .into_iter()
            .map(|movement| (movement, None))
            .collect();
        Ok(round)
    }

    /// Runs a round over `clusters` (empty: all): in each cluster whose lease this replica holds or can take,
    /// plans and makes the moves, recording and publishing each.
    ///
    /// # Errors
    /// Returns an error naming a cluster that is not registered, or when a move cannot be recorded.
    pub async fn run(&self, clusters: &[String]) -> Result<Round, Error> {
        let _one_round = self.round.lock().await;
        let mut round = Round::default();
        for cluster in self.clusters(clusters)? {
            let client = match self.fleet.client(&cluster) {
                Ok(client) => client,
                Err(error) => {
                    round.skipped.push(Skipped {
                        cluster,
                        reason: error.to_string(),
                    });
                    continue;
                }
            };
            let deadline = match self.take_lease(&client).await {
                Ok(deadline) => deadline,
                Err(reason) => {
                    round.skipped.push(Skipped { cluster, reason });
                    continue;
                }
            };
            let (nodes, pending) = match self.view(&cluster).await {
                Ok(view) => view,
                Err(reason) => {
                    round.skipped.push(Skipped { cluster, reason });
                    continue;
                }
            };
            let planned = balance::plan(&[(cluster.clone(), nodes, pending)], &self.settings.policy());
            for movement in planned {
                if Instant::now() >= deadline {
                    round.skipped.push(Skipped {
                        cluster: cluster.clone(),
                        reason: "the round outlasted this replica's lease; the rest waits for the next round".into(),
                    });
                    break;
                }
                match self.make(&client, &movement).await {
                    Ok(()) => {
                        let record = self.record(&movement).await?;
                        round.moves.push((movement, Some(record)));
                    }
                    Err(reason) => {
                        tracing::warn!(%cluster, node = %movement.node, %reason, "a planned move was not made");
                    }
                }
            }
        }
        Ok(round)
    }

    /// Takes or renews the cluster's lease; returns until when moves may be made under it.
    async fn take_lease(&self, client: &Client) -> Result<Instant, String> {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &self.settings.lease_namespace);
        let seconds = i32::try_from(self.settings.lease_seconds).unwrap_or(i32::MAX);
        let started = Instant::now();
        let existing = leases
            .get_opt(LEASE_NAME)
            .await
            .map_err(|error| format!("reading the balancer lease: {error}"))?;
        match existing {
            None => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        namespace: Some(self.settings.lease_namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.replica.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(micro_now()),
                        renew_time: Some(micro_now()),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(|error| format!("another replica took the balancer lease first ({error})"))?;
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                lease_free(spec, &self.replica)?;
                if spec.holder_identity.as_deref() != Some(self.replica.as_str()) {
                    spec.holder_identity = Some(self.replica.clone());
                    spec.acquire_time = Some(micro_now());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(micro_now());
                // Carries the resourceVersion read, so a replica that changed the lease meanwhile wins.
                leases
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
                    .map_err(|error| format!("another replica changed the balancer lease first ({error})"))?;
            }
        }
        // Moves stop a third of the lease before it could expire, leaving room for clock drift and slow calls.
        Ok(started + Duration::from_secs(u64::from(self.settings.lease_seconds)) * 2 / 3)
    }

    /// Sets the node's `org` label, only if the node still belongs to the group the plan took it from.
    async fn make(&self, client: &Client, movement: &Move) -> Result<(), String> {
        let nodes: Api<Node> = Api::all(client.clone());
        let node = nodes
            .get(&movement.node)
            .await
            .map_err(|error| format!("reading the node: {error}"))?;
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let group = labels
            .get(ORG_LABEL)
            .filter(|org| !org.is_empty())
            .map_or(balance::PUBLIC_GROUP, String::as_str);
        if group != movement.from_group {
            return Err(format!("the node moved to {group} since the plan was made"));
        }
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": node.metadata.resource_version,
                "labels": {ORG_LABEL: movement.to_group},
            }
        });
        nodes
            .patch(&movement.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|error| format!("labelling the node: {error}"))?;
        tracing::info!(
            cluster = %movement.cluster,
            node = %movement.node,
            from = %movement.from_group,
            to = %movement.to_group,
            reason = %reason_text(movement, &self.settings),
            "moved a node"
        );
        Ok(())
    }

    /// Records a move made and publishes it.
    async fn record(&self, movement: &Move) -> Result<node_move::Model, ApiError> {
        let row = node_move::Model {
            id: uuid::Uuid::now_v7().to_string(),
            cluster: movement.cluster.clone(),
            node: movement.node.clone(),
            class: class_name(movement.class).into(),
            from_group: movement.from_group.clone(),
            to_group: movement.to_group.clone(),
            reason: reason_text(movement, &self.settings),
            replica: self.replica.clone(),
            created_ms: now_ms(),
        };
        node_move::Entity::insert(sea_orm::IntoActiveModel::into_active_model(row.clone()))
            .exec(&self.db)
            .await
            .map_err(ApiError::internal)?;
        let event = message(movement, Some(&row), &self.settings);
        if let Err(error) = self.bus.publish(MOVED_TOPIC, event.encode_to_vec().into()).await {
            tracing::warn!(%error, node = %movement.node, "a move was recorded but not published");
        }
        Ok(row)
    }

    /// Runs a round every `interval_seconds` until the returned task is dropped; none when rounds run only on
    /// request.
    pub fn every_round(self: &Arc<Self>) -> Option<Background> {
        let interval = Duration::from_secs(self.settings.interval_seconds);
        if interval.is_zero() {
            return None;
        }
        let balancer = self.clone();
        Some(Background::spawn(async move {
            // The first round waits one interval, for the inventory to fill and the replicas to settle.
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match balancer.run(&[]).await {
                    Ok(round) => {
                        for skipped in &round.skipped {
                            tracing::debug!(cluster = %skipped.cluster, reason = %skipped.reason, "not balanced this round");
                        }
                    }
                    Err(error) => tracing::error!(%error, "a balancing round failed"),
                }
            }
        }))
    }

    async fn list(&self, body: &ListNodeMovesRequest) -> Result<ListNodeMovesResponse, Error> {
        let cluster = match body.parent.as_str() {
            "clusters/-" => None,
            parent => {
                let id = crate::names::cluster_id("parent", parent).map_err(|violation| {
                    ApiError::InvalidArgument(vec![FieldViolation::new(
                        violation.field,
                        format!("{} (or clusters/- for every cluster)", violation.description),
                    )])
                })?;
                if self.registry.get(&id).is_none() {
                    return Err(crate::unknown_cluster(parent, &self.registry));
                }
                Some(id)
            }
        };
        let size = page::page_size(body.page_size)?;
        let after: Option<String> = page::decode_token(&body.page_token)?;
        let mut query = node_move::Entity::find().order_by_desc(node_move::Column::Id);
        if let Some(cluster) = cluster {
            query = query.filter(node_move::Column::Cluster.eq(cluster));
        }
        if let Some(after) = after {
            query = query.filter(node_move::Column::Id.lt(after));
        }
        let mut rows = query.limit(size + 1).all(&self.db).await.map_err(ApiError::internal)?;
        let next_page_token = page::finish_page(&mut rows, size, |row| row.id.clone());
        Ok(ListNodeMovesResponse {
            moves: rows.iter().map(stored_message).collect(),
            next_page_token,
        })
    }
}

/// A move as the API shows it; `row` when it was made.
fn message(movement: &Move, row: Option<&node_move::Model>, settings: &BalanceSettings) -> NodeMove {
    let mut out = NodeMove {
        name: row
            .map(|row| format!("clusters/{}/nodeMoves/{}", row.cluster, row.id))
            .unwrap_or_default(),
        node: format!("clusters/{}/nodes/{}", movement.cluster, movement.node),
        class: class_name(movement.class).into(),
        from_group: movement.from_group.clone(),
        to_group: movement.to_group.clone(),
        reason: reason_text(movement, settings),
        replica: row.map(|row| row.replica.clone()).unwrap_or_default(),
        create_time: row.map(|row| timestamp(row.created_ms)),
        ..NodeMove::default()
    };
    match &movement.reason {
        MoveReason::Imbalance {
            from_load_percent,
            to_load_percent,
        } => {
            out.from_load_percent = *from_load_percent;
            out.to_load_percent = *to_load_percent;
        }
        MoveReason::Pending { pods, longest } => {
            out.waiting_pods = i32::try_from(*pods).unwrap_or(i32::MAX);
            out.longest_wait = Some(prost_types::Duration {
                seconds: i64::try_from(longest.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(longest.subsec_nanos()).unwrap_or(0),
            });
        }
    }
    out
}

/// A recorded move as the API shows it.
fn stored_message(row: &node_move::Model) -> NodeMove {
    NodeMove {
        name: format!("clusters/{}/nodeMoves/{}", row.cluster, row.id),
        node: format!("clusters/{}/nodes/{}", row.cluster, row.node),
        class: row.class.clone(),
        from_group: row.from_group.clone(),
        to_group: row.to_group.clone(),
        reason: row.reason.clone(),
        replica: row.replica.clone(),
        create_time: Some(timestamp(row.created_ms)),
        ..NodeMove::default()
    }
}

fn plan_message(round: &Round, settings: &BalanceSettings) -> BalancePlan {
    BalancePlan {
        moves: round
            .moves
            .iter()
            .map(|(movement, row)| message(movement, row.as_ref(), settings))
            .collect(),
        skipped: round
            .skipped
            .iter()
            .map(|skipped| SkippedCluster {
                cluster: format!("clusters/{}", skipped.cluster),
                reason: skipped.reason.clone(),
            })
            .collect(),
    }
}

/// Serves `BalanceService`.
#[derive(Debug, Clone)]
pub(crate) struct Balancing(pub(crate) Arc<Balancer>);

#[tonic::async_trait]
impl BalanceService for Balancing {
    async fn plan_balance(&self, request: Request<PlanBalanceRequest>) -> Result<Response<BalancePlan>, Status> {
        let plan = async {
            Principal::of(&request)?;
            let round = self.0.plan(&request.get_ref().clusters).await?;
            Ok::<_, Error>(plan_message(&round, &self.0.settings))
        };
        plan.await.map(Response::new).map_err(Error::status)
    }

    async fn run_balance(&self, request: Request<RunBalanceRequest>) -> Result<Response<BalancePlan>, Status> {
        let run = async {
            if !Principal::of(&request)?.is_admin() {
                return Err(Error::from(ApiError::PermissionDenied {
                    permission: "balance.run".into(),
                }));
            }
            let round = self.0.run(&request.get_ref().clusters).await?;
            Ok(plan_message(&round, &self.0.settings))
        };
        run.await.map(Response::new).map_err(Error::status)
    }

    async fn list_node_moves(
        &self,
        request: Request<ListNodeMovesRequest>,
    ) -> Result<Response<ListNodeMovesResponse>, Status> {
        let list = async {
            Principal::of(&request)?;
            self.0.list(request.get_ref()).await
        };
        list.await.map(Response::new).map_err(Error::status)
    }
}
