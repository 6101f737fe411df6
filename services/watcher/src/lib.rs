//! Cube's watcher service: watching Kubernetes and turning changes into state transitions and notifications.
//!
//! Every cluster of the shared registry with a Kubernetes API has the Pods and Deployments Cube made, and its
//! Nodes, watched by one replica (a SQL lease per cluster; the others stand by). Each object's state (phase,
//! readiness, reason, exit code, restarts, ready replicas, a node's labels) is compared with the last one
//! published, kept by uid in the watcher's database, and a `cube.watcher.v1.WorkloadTransition` is published on
//! `workload.transition` through the outbox only when it changed: a re-list after a restart publishes nothing for
//! objects that did not change. Its API (package
//! `cube.watcher.v1`: event history and live streams) arrives with the rest of its issue; until then the server
//! answers health and reflection only.

mod cluster;
mod fleet;
mod status;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use cube_bus::EventBus;
use cube_clusters::{ClusterRegistry, ClustersArgs};
use cube_kit::Server;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

pub use cluster::lease_name;

/// The watcher's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WatcherArgs {
    /// The clusters to watch.
    #[command(flatten)]
    pub clusters: ClustersArgs,
    /// Where the last published states, the outbox and the leases are stored.
    #[command(flatten)]
    pub database: cube_kit::config::DatabaseArgs,
    /// Redis for the event bus (in-process when unset).
    #[command(flatten)]
    pub redis: cube_kit::config::RedisArgs,
    /// How long a replica's hold on a cluster lasts without renewal: how soon another replica takes over the
    /// cluster after this one dies.
    #[arg(long = "lease-duration", env = "CUBE_WATCHER_LEASE_DURATION", default_value = "15s",
          value_parser = cube_kit::config::parse_duration)]
    pub lease_duration: Duration,
}

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's name as a lease holder: unique per process.
    pub holder: String,
    /// How long a hold on a cluster lasts without renewal.
    pub lease_duration: Duration,
}

/// The watcher's server and the work it does in the background, stopped when dropped.
pub struct Watcher {
    /// The gRPC server (health and reflection).
    pub server: Server,
    /// The cluster watches and the outbox relay.
    pub background: Background,
}

/// The watcher's background work: keep it while serving.
pub struct Background {
    _tasks: Vec<cube_kit::task::Background>,
}

impl Watcher {
    /// Starts watching the clusters of `registry` (following its reloads), storing states in `db` and publishing
    /// transitions on `bus`.
    pub fn start(registry: ClusterRegistry, db: DatabaseConnection, bus: Arc<dyn EventBus>, options: Options) -> Self {
        let relay = Arc::new(Notify::new());
        let shared = fleet::Shared {
            db: db.clone(),
            relay: relay.clone(),
            holder: options.holder,
            lease_duration: options.lease_duration,
        };
        let follow = cube_kit::task::Background::spawn(fleet::follow(registry, shared));
        let relaying = cube_kit::task::Background::spawn(cube_kit::outbox::relay(
            db,
            bus,
            relay,
            cube_kit::outbox::RelayOptions::default(),
        ));
        Self {
            server: server(),
            background: Background {
                _tasks: vec![follow, relaying],
            },
        }
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
    let bus =
        cube_kit::redis::bus(args.redis.redis_url.as_deref()).map_err(|error| ServeError::Config(error.to_string()))?;
    let db = cube_kit::db::connect::<store::Migrator>(&args.database.database_url, args.database.migrate)
        .await
        .map_err(|error| ServeError::Config(error.to_string()))?;
    let holder = holder_name().map_err(ServeError::Config)?;
    let _reloads =
        cube_clusters::reload_on_sighup(registry.clone()).map_err(|error| ServeError::Config(error.to_string()))?;
    let watcher = Watcher::start(
        registry,
        db,
        bus,
        Options {
            holder,
            lease_duration: args.lease_duration,
        },
    );
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
