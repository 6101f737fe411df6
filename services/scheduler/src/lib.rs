//! Cube's scheduler service (`cube.scheduler.v1`): the clusters work runs on (their registry is `cube-clusters`,
//! their health and node inventory are the scheduler's), placement, quota admission and the balancer.

pub mod admission;
mod ask;
pub mod balance;
pub mod balancer;
mod error;
pub mod inventory;
pub mod model;
mod names;
mod place;
pub mod placement;

/// The registry [`Scheduler::start`] takes and the clusters in it, re-exported so that callers of the scheduler
/// need not name `cube-clusters` themselves.
pub use cube_clusters::{ClusterConfig, ClusterRegistry, RegistryError};
pub use error::Error;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cube_bus::EventBus;
use cube_clusters::ClustersArgs;
use cube_kit::config::AuthClientArgs;
use cube_kit::identity::{Gate, Principal, RevocationFeed, service_gate};
use cube_kit::task::Background;
use cube_kit::{ApiError, Channel, Server};
use cube_proto::cube::scheduler::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use cube_proto::cube::scheduler::v1::node_service_server::{NodeService, NodeServiceServer};
use cube_proto::cube::scheduler::v1::{
    Capacity, Cluster, ClusterHealth, GetCapacityRequest, GetClusterRequest, ListClustersRequest, ListClustersResponse,
    ListNodesRequest, ListNodesResponse, Node, ReloadClustersRequest, Resources, Taint,
};

use cube_proto::cube::scheduler::v1::admission_service_server::AdmissionServiceServer;
use cube_proto::cube::scheduler::v1::balance_service_server::BalanceServiceServer;
use cube_proto::cube::scheduler::v1::placement_service_server::PlacementServiceServer;

use crate::balancer::{BalanceSettings, Balancer};
use crate::inventory::{Amounts, Fleet, InventoryOptions, NodeView, selector_matches};
use crate::placement::PlacementConfig;
use tonic::{Request, Response, Status};

/// The domain in the scheduler's `ErrorInfo`s.
pub(crate) const DOMAIN: &str = "scheduler.cube.dev";

/// The scheduler's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerArgs {
    /// The clusters work runs on.
    #[command(flatten)]
    pub clusters: ClustersArgs,
    /// Where admissions (reserved quota) are stored.
    #[command(flatten)]
    pub database: cube_kit::config::DatabaseArgs,
    /// Where the auth service is.
    #[command(flatten)]
    pub auth: AuthClientArgs,
    /// Redis for the event bus (in-process when unset).
    #[command(flatten)]
    pub redis: cube_kit::config::RedisArgs,
    /// The projects service's gRPC URL: placement reads the project's settings there.
    #[arg(
        long = "projects-url",
        env = "CUBE_PROJECTS_URL",
        default_value = "http://cube-projects:8080"
    )]
    pub projects_url: String,
    /// The placement settings (GPU, vGPU and RDMA resource names, exclusivity) as JSON; cube-studio's defaults
    /// when unset.
    #[arg(long = "placement-file", env = "CUBE_PLACEMENT_FILE")]
    pub placement_file: Option<PathBuf>,
    /// Admission's settings.
    #[command(flatten)]
    pub admission: admission::AdmissionArgs,
    /// The balancer's settings as JSON (`{"interval_seconds": 300, "threshold_points": 20, "minimums":
    /// {"vision": 5}, …}`, see `BalanceSettings`); the issue's defaults when unset.
    #[arg(long = "balance-file", env = "CUBE_BALANCE_FILE")]
    pub balance_file: Option<PathBuf>,
}

/// How the scheduler places, admits and balances; [`Default`] is `cube up`'s.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// GPU, vGPU and RDMA resource names, exclusivity.
    pub placement: PlacementConfig,
    /// Admission's settings.
    pub admission: admission::AdmissionOptions,
    /// The balancer's settings.
    pub balance: BalanceSettings,
}

fn message(cluster: &ClusterConfig, health: Result<String, String>) -> Cluster {
    let health = match health {
        Ok(version) => ClusterHealth {
            reachable: true,
            version,
            message: String::new(),
        },
        Err(message) => ClusterHealth {
            reachable: false,
            version: String::new(),
            message,
        },
    };
    Cluster {
        health: Some(health),
        name: format!("clusters/{}", cluster.name),
        default: cluster.default,
        in_cluster: cluster.in_cluster,
        pipeline_namespace: cluster.pipeline_namespace.clone(),
        notebook_namespace: cluster.notebook_namespace.clone(),
        service_namespace: cluster.service_namespace.clone(),
        service_domain: cluster.service_domain.clone(),
        external_host: cluster.external_host.clone(),
    }
}

/// The error for a cluster name that is not registered.
pub(crate) fn unknown_cluster(name: &str, registry: &ClusterRegistry) -> Error {
    Error::UnknownCluster {
        name: name.to_owned(),
        registered: registry.names(),
    }
}

/// Reads the cluster file again and makes the inventory follow it.
///
/// # Errors
/// Returns why the file was refused; nothing changes then.
pub async fn reload(registry: &ClusterRegistry, fleet: &Fleet) -> Result<(), RegistryError> {
    registry.reload()?;
    fleet.reload(registry).await;
    tracing::info!(clusters = ?registry.names(), "reloaded the cluster file");
    Ok(())
}

/// Serves `ClusterService` and `NodeService`.
#[derive(Clone)]
struct Clusters {
    registry: ClusterRegistry,
    fleet: Arc<Fleet>,
}

impl Clusters {
    /// The registered cluster named in `field` as `clusters/{cluster}`.
    fn cluster(&self, field: &str, name: &str) -> Result<ClusterConfig, Error> {
        let id = names::cluster_id(field, name).map_err(|violation| ApiError::InvalidArgument(vec![violation]))?;
        self.registry
            .get(&id)
            .ok_or_else(|| unknown_cluster(name, &self.registry))
    }

    /// Every registered cluster with its health.
    async fn list(&self) -> ListClustersResponse {
        let clusters = self.registry.clusters();
        let healths = futures::future::join_all(clusters.iter().map(|cluster| self.fleet.health(&cluster.name))).await;
        ListClustersResponse {
            clusters: clusters
                .iter()
                .zip(healths)
                .map(|(cluster, health)| message(cluster, health))
                .collect(),
        }
    }

    /// The nodes of a cluster, or why there are none to show.
    fn nodes(&self, cluster: &ClusterConfig) -> Result<inventory::Nodes, Error> {
        self.fleet.nodes(&cluster.name).map_err(|error| {
            Error::from(ApiError::FailedPrecondition {
                message: error.to_string(),
            })
        })
    }
}

fn amounts(amounts: &Amounts) -> Resources {
    Resources {
        cpu_millis: amounts.cpu_millis,
        memory_bytes: amounts.memory_bytes,
        gpus: amounts.gpus,
        other: amounts.other.clone().into_iter().collect(),
    }
}

fn node_message(cluster: &str, node: &NodeView) -> Node {
    Node {
        name: format!("clusters/{cluster}/nodes/{}", node.name),
        labels: node.labels.clone().into_iter().collect(),
        resource_group: node.resource_group.clone(),
        ready: node.ready,
        unschedulable: node.unschedulable,
        taints: node
            .taints
            .iter()
            .map(|(key, value, effect)| Taint {
                key: key.clone(),
                value: value.clone(),
                effect: effect.clone(),
            })
            .collect(),
        allocatable: Some(amounts(&node.allocatable)),
        requested: Some(amounts(&node.requested)),
        gpu_type: node.labels.get("gpu-type").cloned().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl ClusterService for Clusters {
    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        Principal::of(&request).map_err(|error| error.status(DOMAIN))?;
        Ok(Response::new(self.list().await))
    }

    async fn reload_clusters(
        &self,
        request: Request<ReloadClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        let reload = async {
            let caller = Principal::of(&request)?;
            if !caller.is_admin() {
                return Err(ApiError::PermissionDenied {
                    permission: "clusters.reload".into(),
                });
            }
            reload(&self.registry, &self.fleet)
                .await
                .map_err(|error| ApiError::invalid("clusters_file", error.to_string()))?;
            Ok(self.list().await)
        };
        reload.await.map(Response::new).map_err(|error| error.status(DOMAIN))
    }

    async fn get_cluster(&self, request: Request<GetClusterRequest>) -> Result<Response<Cluster>, Status> {
        let get = async {
            Principal::of(&request)?;
            let cluster = self.cluster("name", &request.get_ref().name)?;
            let health = self.fleet.health(&cluster.name).await;
            Ok::<_, Error>(message(&cluster, health))
        };
        get.await.map(Response::new).map_err(Error::status)
    }
}

#[tonic::async_trait]
impl NodeService for Clusters {
    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let list = || {
            Principal::of(&request)?;
            let body = request.get_ref();
            let cluster = self.cluster("parent", &body.parent)?;
            let mut nodes = Vec::new();
            for node in self.nodes(&cluster)?.iter() {
                let selected = selector_matches(&body.label_selector, &node.labels)
                    .map_err(|message| ApiError::invalid("label_selector", message))?;
                if selected && (body.resource_group.is_empty() || node.resource_group == body.resource_group) {
                    nodes.push(node_message(&cluster.name, node));
                }
            }
            Ok::<_, Error>(ListNodesResponse { nodes })
        };
        list().map(Response::new).map_err(Error::status)
    }

    async fn get_capacity(&self, request: Request<GetCapacityRequest>) -> Result<Response<Capacity>, Status> {
        let capacity = || {
            Principal::of(&request)?;
            let body = request.get_ref();
            let cluster = self.cluster("cluster", &body.cluster)?;
            let mut allocatable = Amounts::default();
            let mut requested = Amounts::default();
            let mut count = 0;
            for node in self.nodes(&cluster)?.iter() {
                let counted = node.ready
                    && !node.unschedulable
                    && (body.resource_group.is_empty() || node.resource_group == body.resource_group);
                if counted {
                    count += 1;
                    allocatable.add(&node.allocatable);
                    requested.add(&node.requested);
                }
            }
            Ok::<_, Error>(Capacity {
                cluster: format!("clusters/{}", cluster.name),
                resource_group: body.resource_group.clone(),
                nodes: count,
                allocatable: Some(amounts(&allocatable)),
                requested: Some(amounts(&requested)),
            })
        };
        capacity().map(Response::new).map_err(Error::status)
    }
}

/// The services the scheduler calls.
#[derive(Debug, Clone)]
pub struct Peers {
    /// The auth service, whose keys verify tokens.
    pub auth: Channel,
    /// The projects service, whose settings placement reads.
    pub projects: Channel,
}

/// A started scheduler: its server, the revocation feed to keep while serving, and its clusters.
#[derive(Debug)]
pub struct Scheduler {
    /// The gRPC server.
    pub server: Server,
    /// Keep alive while serving.
    pub feed: RevocationFeed,
    /// The registered clusters.
    pub registry: ClusterRegistry,
    /// Their inventory.
    pub fleet: Arc<Fleet>,
    /// The scheduler's own background work (reconciling reservations, balancing), stopped when dropped.
    pub background: Vec<Background>,
}

impl Scheduler {
    /// Builds the scheduler over `registry`, verifying tokens with the auth service behind `auth`.
    ///
    /// # Errors
    /// Returns an error when the revocation events cannot be subscribed to.
    pub async fn start(
        registry: ClusterRegistry,
        peers: Peers,
        bus: &Arc<dyn EventBus>,
        options: Options,
        db: sea_orm::DatabaseConnection,
    ) -> Result<Self, cube_bus::BusError> {
        let Options {
            placement,
            admission,
            balance,
        } = options;
        let (gate, feed): (Gate, RevocationFeed) = service_gate("scheduler", peers.auth, bus, &[]).await?;
        let mut gpu_resources: Vec<String> = placement.gpu_vendors.values().cloned().collect();
        gpu_resources.push(placement.gpu_resource.clone());
        gpu_resources.sort();
        gpu_resources.dedup();
        let fleet = Arc::new(Fleet::connect(&registry, InventoryOptions { gpu_resources }).await);
        let moves_db = db.clone();
        let admissions = admission::Admissions::new(
            db,
            peers.projects.clone(),
            registry.clone(),
            fleet.clone(),
            bus.clone(),
            &placement,
            admission,
        )
        .await?;
        let replica = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "scheduler".into()),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let balancer = Arc::new(Balancer::new(
            registry.clone(),
            fleet.clone(),
            moves_db,
            bus.clone(),
            balance,
            replica,
        ));
        let background: Vec<Background> = admissions
            .reconcile()
            .into_iter()
            .chain(balancer.every_round())
            .collect();
        let placer = place::Placer {
            registry: registry.clone(),
            fleet: fleet.clone(),
            shared: admissions.shared(),
            config: Arc::new(placement),
        };
        let clusters = Clusters {
            registry: registry.clone(),
            fleet: fleet.clone(),
        };
        let server = Server::new("scheduler", "cube.scheduler.v1")
            .authenticate(gate)
            .add_service(ClusterServiceServer::new(clusters.clone()))
            .add_service(NodeServiceServer::new(clusters))
            .add_service(PlacementServiceServer::new(placer))
            .add_service(AdmissionServiceServer::new(admissions))
            .add_service(BalanceServiceServer::new(balancer::Balancing(balancer)));
        Ok(Self {
            server,
            feed,
            registry,
            fleet,
            background,
        })
    }
}

/// Why the scheduler binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The cluster file is unusable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A flag, or a file or service it names, is unusable.
    #[error("{0}")]
    Config(String),
    /// The event bus failed.
    #[error("event bus: {0}")]
    Bus(#[from] cube_bus::BusError),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] cube_kit::cli::RunError),
}

/// Runs the scheduler on its own until SIGTERM or SIGINT.
///
/// # Errors
/// Returns why it could not start or stopped serving.
pub async fn serve(serve: cube_kit::cli::ServeArgs, args: SchedulerArgs) -> Result<(), ServeError> {
    let registry = args.clusters.registry()?;
    let placement: PlacementConfig = settings_file("--placement-file", args.placement_file.as_deref())?;
    let auth =
        Channel::remote(&args.auth.auth_url).map_err(|error| ServeError::Config(format!("--auth-url: {error}")))?;
    let projects =
        Channel::remote(&args.projects_url).map_err(|error| ServeError::Config(format!("--projects-url: {error}")))?;
    let bus = cube_kit::redis::bus(&args.redis).map_err(|error| ServeError::Config(error.to_string()))?;
    let db = cube_kit::db::connect::<model::Migrator>(&args.database.database_url, args.database.migrate)
        .await
        .map_err(|error| ServeError::Config(error.to_string()))?;
    let balance: BalanceSettings = settings_file("--balance-file", args.balance_file.as_deref())?;
    balance
        .check()
        .map_err(|error| ServeError::Config(format!("--balance-file: {error}")))?;
    let options = Options {
        placement,
        admission: args.admission.options(),
        balance,
    };
    let scheduler = Scheduler::start(registry, Peers { auth, projects }, &bus, options, db).await?;
    let _feed = scheduler.feed;
    let _background = scheduler.background;
    let (registry, fleet) = (scheduler.registry, scheduler.fleet);
    let _reloads = cube_clusters::on_sighup(move || {
        let (registry, fleet) = (registry.clone(), fleet.clone());
        async move { reload(&registry, &fleet).await }
    })
    .map_err(|error| ServeError::Config(error.to_string()))?;
    cube_kit::cli::serve(scheduler.server, serve).await?;
    Ok(())
}

/// The JSON settings file the flag `flag` names, or the defaults when it names none.
fn settings_file<T: serde::de::DeserializeOwned + Default>(flag: &str, path: Option<&Path>) -> Result<T, ServeError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| ServeError::Config(format!("reading {flag} {}: {error}", path.display())))?;
    serde_json::from_str(&text).map_err(|error| ServeError::Config(format!("{flag} {}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_files_are_read_or_refused_naming_the_flag() {
        let none: BalanceSettings = settings_file("--balance-file", None).expect("defaults");
        assert_eq!(none, BalanceSettings::default());
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("balance.json");
        std::fs::write(&path, r#"{"threshold_points": 35, "minimums": {"vision": 5}}"#).expect("writing");
        let read: BalanceSettings = settings_file("--balance-file", Some(&path)).expect("settings");
        assert_eq!((read.threshold_points, read.policy().minimum("vision")), (35, 5));
        std::fs::write(&path, r#"{"threshold": 35}"#).expect("writing");
        let error = settings_file::<BalanceSettings>("--balance-file", Some(&path)).expect_err("unknown field");
        assert!(error.to_string().starts_with("--balance-file"), "{error}");
        assert!(error.to_string().contains("threshold"), "{error}");
        let missing = dir.path().join("missing.json");
        let error = settings_file::<PlacementConfig>("--placement-file", Some(&missing)).expect_err("no file");
        assert!(error.to_string().starts_with("reading --placement-file"), "{error}");
    }
}
