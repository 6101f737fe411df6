//! Cube's scheduler service (`cube.scheduler.v1`): the registry of clusters work runs on. Node inventory,
//! placement, quota admission and the balancer arrive with the issue that builds them.

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

pub use error::Error;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use cube_bus::EventBus;
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
use serde::Deserialize;
use tonic::{Request, Response, Status};

/// The domain in the scheduler's `ErrorInfo`s.
pub(crate) const DOMAIN: &str = "scheduler.cube.dev";

/// The scheduler's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerArgs {
    /// The cluster file: JSON `{"clusters": [{"name": "dev", "default": true, "kubeconfig": "/path", …}]}`.
    #[arg(long = "clusters-file", env = "CUBE_CLUSTERS_FILE")]
    pub clusters_file: PathBuf,
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

/// One cluster as the cluster file describes it.
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
    /// Whether to reach it through the scheduler's own service account.
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

    /// Connects a client to the cluster's API server: through its kubeconfig, or the pod's service account.
    ///
    /// # Errors
    /// Returns why not, e.g. that the cluster has no Kubernetes API.
    pub async fn client(&self) -> Result<kube::Client, String> {
        let config = if let Some(path) = &self.kubeconfig {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|error| format!("reading the kubeconfig {}: {error}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|error| format!("loading the kubeconfig {}: {error}", path.display()))?
        } else if self.in_cluster {
            kube::Config::incluster().map_err(|error| format!("in-cluster configuration: {error}"))?
        } else {
            return Err("no Kubernetes API (no kubeconfig, not in-cluster): work runs as local processes".into());
        };
        kube::Client::try_from(config).map_err(|error| format!("building the client: {error}"))
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

/// Why a cluster file was refused.
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
}

/// The clusters work can run on, the default one first; [`ClusterRegistry::reload`] reads its file again.
/// Clones share the same registry.
#[derive(Debug, Clone)]
pub struct ClusterRegistry {
    clusters: Arc<RwLock<Arc<Vec<ClusterConfig>>>>,
    file: Option<PathBuf>,
}

/// Checks a name against DNS-label rules (2 to 63 lowercase letters, digits and dashes, starting with a letter).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (2..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Reads and checks a cluster file.
fn read_cluster_file(path: &Path) -> Result<Vec<ClusterConfig>, RegistryError> {
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
fn checked(mut clusters: Vec<ClusterConfig>) -> Result<Vec<ClusterConfig>, String> {
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

impl ClusterRegistry {
    /// Reads the cluster file at `path`; [`Self::reload`] reads it again.
    ///
    /// # Errors
    /// Returns an error naming the file and what is wrong in it.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            clusters: Arc::new(RwLock::new(Arc::new(read_cluster_file(path)?))),
            file: Some(path.to_owned()),
        })
    }

    /// Builds a registry from clusters; the one marked default (or else the first) becomes the default.
    ///
    /// # Errors
    /// Returns what is wrong: no clusters, a bad or repeated name, several defaults.
    pub fn new(clusters: Vec<ClusterConfig>) -> Result<Self, String> {
        Ok(Self {
            clusters: Arc::new(RwLock::new(Arc::new(checked(clusters)?))),
            file: None,
        })
    }

    /// The registry of `cube up`: one local cluster, `local`, where work runs as processes on this machine.
    pub fn embedded() -> Self {
        let local = ClusterConfig {
            default: true,
            ..ClusterConfig::new("local", None)
        };
        Self {
            clusters: Arc::new(RwLock::new(Arc::new(vec![local]))),
            file: None,
        }
    }

    /// Reads the cluster file again and, when it is valid, replaces the registered clusters with its clusters;
    /// when it is not, the registry is left as it was. A registry not read from a file is left as it is.
    ///
    /// # Errors
    /// Returns an error naming the file and what is wrong in it.
    pub fn reload(&self) -> Result<(), RegistryError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let clusters = read_cluster_file(path)?;
        if let Ok(mut current) = self.clusters.write() {
            *current = Arc::new(clusters);
        }
        Ok(())
    }

    /// Returns the cluster called `name`.
    pub fn get(&self, name: &str) -> Option<ClusterConfig> {
        self.clusters().iter().find(|cluster| cluster.name == name).cloned()
    }

    /// Returns every cluster, the default first.
    pub fn clusters(&self) -> Arc<Vec<ClusterConfig>> {
        self.clusters
            .read()
            .map(|clusters| clusters.clone())
            .unwrap_or_default()
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
    let registry = ClusterRegistry::load(&args.clusters_file)?;
    let placement: PlacementConfig = settings_file("--placement-file", args.placement_file.as_deref())?;
    let auth =
        Channel::remote(&args.auth.auth_url).map_err(|error| ServeError::Config(format!("--auth-url: {error}")))?;
    let projects =
        Channel::remote(&args.projects_url).map_err(|error| ServeError::Config(format!("--projects-url: {error}")))?;
    let bus =
        cube_kit::redis::bus(args.redis.redis_url.as_deref()).map_err(|error| ServeError::Config(error.to_string()))?;
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
    let _reloads = reload_on_sighup(scheduler.registry, scheduler.fleet).map_err(ServeError::Config)?;
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

/// Reloads the cluster file on every SIGHUP until the returned task is dropped.
fn reload_on_sighup(registry: ClusterRegistry, fleet: Arc<Fleet>) -> Result<Background, String> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| format!("listening for SIGHUP: {error}"))?;
    Ok(Background::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(error) = reload(&registry, &fleet).await {
                tracing::error!(%error, "SIGHUP: the cluster file was not reloaded");
            }
        }
    }))
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
