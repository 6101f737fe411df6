//! Cube's watcher service: watching Kubernetes and turning changes into state transitions and notifications.
//!
//! Every cluster of the shared registry with a Kubernetes API has the Pods and Deployments Cube made, and its
//! Nodes, watched by one replica (a SQL lease per cluster; the others stand by). Each object's state (phase,
//! readiness, reason, exit code, restarts, ready replicas, a node's labels) is compared with the last one
//! published, kept by uid in the watcher's database, and only a change is recorded as an event and published as a
//! `cube.watcher.v1.WorkloadTransition` on `workload.transition` through the outbox: a re-list after a restart
//! publishes nothing for objects that did not change. In `cube up` the local runtime's processes are recorded the
//! same way. `cube.watcher.v1.EventService` pages the history and streams it live, each caller seeing the events
//! of their projects.

mod access;
mod cluster;
mod events;
mod filter;
mod fleet;
mod live;
mod local;
mod retention;
mod status;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use cube_bus::EventBus;
use cube_clusters::{ClusterRegistry, ClustersArgs};
use cube_kit::config::AuthClientArgs;
use cube_kit::identity::service_gate;
use cube_kit::{Channel, Server};
use cube_proto::cube::watcher::v1::event_service_server::EventServiceServer;
use cube_runtime::StatusStream;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

pub use cluster::lease_name;
pub use retention::Retention;

/// The `ErrorInfo` domain of the watcher's errors.
pub(crate) const DOMAIN: &str = "watcher.cube.dev";

/// The watcher's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WatcherArgs {
    /// The clusters to watch.
    #[command(flatten)]
    pub clusters: ClustersArgs,
    /// Where the last published states, the events, the outbox and the leases are stored.
    #[command(flatten)]
    pub database: cube_kit::config::DatabaseArgs,
    /// Redis for the event bus (in-process when unset).
    #[command(flatten)]
    pub redis: cube_kit::config::RedisArgs,
    /// The auth service, whose keys verify callers' tokens.
    #[command(flatten)]
    pub auth: AuthClientArgs,
    /// The projects service, which tells which projects a caller belongs to.
    #[arg(
        long = "projects-url",
        env = "CUBE_PROJECTS_URL",
        default_value = "http://cube-projects:8080"
    )]
    pub projects_url: String,
    /// How long a replica's hold on a cluster lasts without renewal: how soon another replica takes over the
    /// cluster after this one dies.
    #[arg(long = "lease-duration", env = "CUBE_WATCHER_LEASE_DURATION", default_value = "15s",
          value_parser = cube_kit::config::parse_duration)]
    pub lease_duration: Duration,
    /// How long events are kept in the history.
    #[arg(long = "event-retention", env = "CUBE_EVENT_RETENTION", default_value = "7d",
          value_parser = cube_kit::config::parse_duration)]
    pub event_retention: Duration,
    /// How many events the history keeps at most (the newest).
    #[arg(
        long = "event-retention-count",
        env = "CUBE_EVENT_RETENTION_COUNT",
        default_value_t = 1_000_000
    )]
    pub event_retention_count: u64,
}

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's name as a lease holder: unique per process.
    pub holder: String,
    /// How long a hold on a cluster lasts without renewal.
    pub lease_duration: Duration,
    /// How long events are kept.
    pub retention: Retention,
}

/// The services the watcher calls.
#[derive(Debug, Clone)]
pub struct Peers {
    /// The auth service, whose keys verify tokens.
    pub auth: Channel,
    /// The projects service, which tells memberships.
    pub projects: Channel,
}

/// The statuses of a local runtime to record as transitions (`cube up`), with the name of its cluster.
pub struct LocalStatuses {
    /// The cluster the local runtime runs, as the registry names it (`local`).
    pub cluster: String,
    /// What `LocalRuntime::open` returned besides the runtime.
    pub statuses: StatusStream,
}

/// The watcher's server and the work it does in the background, stopped when dropped.
pub struct Watcher {
    /// The gRPC server: `EventService`, health and reflection.
    pub server: Server,
    /// The cluster watches, the outbox relay, the live feed and the pruning.
    pub background: Background,
}

/// The watcher's background work: keep it while serving.
pub struct Background {
    _tasks: Vec<cube_kit::task::Background>,
    _feed: cube_kit::identity::RevocationFeed,
}

impl Watcher {
    /// Starts watching the clusters of `registry` (following its reloads) and recording `local`'s processes,
    /// storing states and events in `db` and publishing transitions on `bus`; callers are verified with the auth
    /// service and their projects read from the projects service.
    ///
    /// # Errors
    /// Returns an error when the bus cannot be subscribed to.
    pub async fn start(
        registry: ClusterRegistry,
        db: DatabaseConnection,
        bus: Arc<dyn EventBus>,
        peers: Peers,
        options: Options,
        local: Option<LocalStatuses>,
    ) -> Result<Self, cube_bus::BusError> {
        let (gate, feed) = service_gate("watcher", peers.auth, &bus, &[]).await?;
        let live = live::Live::new();
        let feeds = live::subscribe(&bus).await?;
        let relay = Arc::new(Notify::new());
        let shared = fleet::Shared {
            db: db.clone(),
            relay: relay.clone(),
            live: live.clone(),
            holder: options.holder,
            lease_duration: options.lease_duration,
        };
        let mut tasks = vec![
            cube_kit::task::Background::spawn(live::follow(feeds, live.clone())),
            cube_kit::task::Background::spawn(retention::prune(db.clone(), options.retention)),
            cube_kit::task::Background::spawn(cube_kit::outbox::relay(
                db.clone(),
                bus,
                relay,
                cube_kit::outbox::RelayOptions::default(),
            )),
        ];
        if let Some(local) = local {
            tasks.push(cube_kit::task::Background::spawn(local::follow(
                local.cluster,
                local.statuses,
                shared.clone(),
            )));
        }
        tasks.push(cube_kit::task::Background::spawn(fleet::follow(registry, shared)));
        let events = events::Events {
            db,
            access: access::Access::new(peers.projects),
            live,
        };
        Ok(Self {
            server: server().authenticate(gate).add_service(EventServiceServer::new(events)),
            background: Background {
                _tasks: tasks,
                _feed: feed,
            },
        })
    }
}

/// Builds the watcher's server.
pub fn server() -> Server {
    Server::new("watcher", "cube.watcher.v1")
}

/// Why the watcher binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag or the environment is wrong.
    #[error("{0}")]
    Config(String),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] cube_kit::cli::RunError),
}

/// Serves the watcher as its own binary: reads the clusters file (again on SIGHUP), opens the database and the
/// bus, and watches until shut down.
///
/// # Errors
/// Returns why it could not start or serve.
pub async fn serve(serve: cube_kit::cli::ServeArgs, args: WatcherArgs) -> Result<(), ServeError> {
    let registry = args
        .clusters
        .registry()
        .map_err(|error| ServeError::Config(error.to_string()))?;
    let bus = cube_kit::redis::bus(&args.redis).map_err(|error| ServeError::Config(error.to_string()))?;
    let db = cube_kit::db::connect::<store::Migrator>(&args.database.database_url, args.database.migrate)
        .await
        .map_err(|error| ServeError::Config(error.to_string()))?;
    let holder = holder_name().map_err(ServeError::Config)?;
    let _reloads =
        cube_clusters::reload_on_sighup(registry.clone()).map_err(|error| ServeError::Config(error.to_string()))?;
    let peers = Peers {
        auth: Channel::remote(&args.auth.auth_url)
            .map_err(|error| ServeError::Config(format!("--auth-url: {error}")))?,
        projects: Channel::remote(&args.projects_url)
            .map_err(|error| ServeError::Config(format!("--projects-url: {error}")))?,
    };
    let options = Options {
        holder,
        lease_duration: args.lease_duration,
        retention: Retention {
            age: args.event_retention,
            count: args.event_retention_count,
        },
    };
    let watcher = Watcher::start(registry, db, bus, peers, options, None)
        .await
        .map_err(|error| ServeError::Config(format!("event bus: {error}")))?;
    let _background = watcher.background;
    cube_kit::cli::serve(watcher.server, serve).await?;
    Ok(())
}

/// A lease holder name unique to this process: the host name and a random suffix.
///
/// # Errors
/// Returns an error when no randomness is available.
pub fn holder_name() -> Result<String, String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "watcher".to_owned());
    let suffix = cube_kit::identity::jws::random_id(6).map_err(|_| "no randomness".to_owned())?;
    Ok(format!("{host}-{suffix}"))
}
