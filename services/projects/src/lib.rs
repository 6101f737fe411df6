//! Cube's projects service (`cube.projects.v1`): project groups, template categories and model groups; their
//! members (users and LDAP groups, as owners, developers or viewers); their typed settings; and their quotas.
//!
//! [`Projects::start`] opens the database, makes sure `public` exists, starts adding every new user to it (from
//! auth's `user.created` events), and returns the server behind the shared authentication gate.

mod core;
pub mod model;
mod service;
mod settings;

use std::sync::Arc;
use std::time::Duration;

use cube_bus::{EventBus, Start};
use cube_kit::config::{AuthClientArgs, DatabaseArgs, RedisArgs, parse_duration};
use cube_kit::identity::{RevocationFeed, service_gate};
use cube_kit::{ApiError, Channel, Server, db};
use cube_proto::cube::auth::v1::UserCreated;
use cube_proto::cube::projects::v1::MembersChanged;
use cube_proto::cube::projects::v1::project_service_server::ProjectServiceServer;
use futures::StreamExt as _;
use prost::Message as _;

use crate::core::Core;
pub use crate::core::{MEMBERS_CHANGED, PROJECT_DELETED, PROJECT_UNDELETED};
use crate::model::Migrator;

/// The bus topic auth announces new users on.
const USER_CREATED: &str = "user.created";

/// The projects service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectsArgs {
    /// Where projects and members are stored.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis for the event bus (in-process when unset).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Where the auth service is.
    #[command(flatten)]
    pub auth: AuthClientArgs,
    /// The scheduler's gRPC URL: project clusters must be in its registry.
    #[arg(
        long = "scheduler-url",
        env = "CUBE_SCHEDULER_URL",
        default_value = "http://cube-scheduler:8080"
    )]
    pub scheduler_url: String,
    /// The services asked for a project's live workloads before it is deleted, as NAME=URL; comma-separated.
    #[arg(long = "workload-service", env = "CUBE_WORKLOAD_SERVICES", value_delimiter = ',')]
    pub workload_services: Vec<String>,
    /// How long a project's members are cached for membership checks (0 turns the cache off); changes made
    /// through any replica clear it at once.
    #[arg(long = "membership-cache-ttl", env = "CUBE_MEMBERSHIP_CACHE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub membership_cache_ttl: Duration,
}

/// Where the projects service's dependencies are, once connected.
#[derive(Debug, Clone)]
pub struct Peers {
    /// The auth service.
    pub auth: Channel,
    /// The scheduler.
    pub scheduler: Channel,
    /// The workload services, by name.
    pub workloads: Vec<(String, Channel)>,
}

/// Why the projects service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] db::DbError),
    /// The event bus failed.
    #[error("event bus: {0}")]
    Bus(#[from] cube_bus::BusError),
    /// Setting up failed.
    #[error("setting up projects: {0}")]
    Setup(#[from] ApiError),
    /// A URL or flag is invalid.
    #[error("{0}")]
    Flag(String),
}

/// A started projects service.
#[derive(Debug)]
pub struct Projects {
    /// The gRPC server.
    pub server: Server,
    /// Keep alive while serving: event consumers, the purge loop, the revocation feed.
    pub background: Background,
}

/// Background work that stops when dropped.
#[derive(Debug)]
pub struct Background {
    _tasks: Vec<cube_kit::task::Background>,
    _feed: RevocationFeed,
}

impl Projects {
    /// Opens the database, makes sure `public` exists, follows `user.created` and membership changes on `bus`,
    /// and builds the server.
    ///
    /// # Errors
    /// Returns why the service cannot start.
    pub async fn start(
        database: &DatabaseArgs,
        peers: Peers,
        bus: Arc<dyn EventBus>,
        membership_cache_ttl: Duration,
    ) -> Result<Self, StartError> {
        let db = db::connect::<Migrator>(&database.database_url, database.migrate).await?;
        service::ensure_public(&db).await?;
        let (gate, feed) = service_gate("projects", peers.auth.clone(), &bus, &[]).await?;
        let core = Arc::new(Core::new(
            db,
            peers.auth,
            peers.scheduler,
            peers.workloads,
            bus.clone(),
            membership_cache_ttl,
        ));
        let instance = cube_kit::identity::jws::random_id(9).map_err(|_| StartError::Flag("no randomness".into()))?;
        // Every replica shares one group for new users (each joins `public` once), and has a group of its own
        // for membership changes (each forgets what it cached).
        let mut users = bus.subscribe(USER_CREATED, "projects", &instance).await?;
        let mut changes = bus
            .subscribe_instance(
                MEMBERS_CHANGED,
                &format!("projects-members-{instance}"),
                &instance,
                Start::Latest,
            )
            .await?;
        let joining = {
            let core = core.clone();
            cube_kit::task::Background::spawn(async move {
                while let Some(delivery) = users.next().await {
                    let Ok(delivery) = delivery else { continue };
                    let Ok(event) = UserCreated::decode(delivery.payload.clone()) else {
                        tracing::warn!(id = %delivery.id, "undecodable user.created event");
                        let _ = delivery.ack().await;
                        continue;
                    };
                    let Some(username) = event.user.strip_prefix("users/") else {
                        continue;
                    };
                    match service::join_public(&core, username).await {
                        // Unacknowledged events come back: a failure here is retried.
                        Ok(()) => {
                            if let Err(error) = delivery.ack().await {
                                tracing::warn!(%error, "acknowledging user.created");
                            }
                        }
                        Err(error) => tracing::warn!(%error, username, "adding a new user to public"),
                    }
                }
            })
        };
        let forgetting = {
            let core = core.clone();
            cube_kit::task::Background::spawn(async move {
                while let Some(delivery) = changes.next().await {
                    let Ok(delivery) = delivery else { continue };
                    if let Ok(event) = MembersChanged::decode(delivery.payload.clone())
                        && let Some(project) = event.project.strip_prefix("projects/")
                    {
                        core.forget(project);
                    }
                    let _ = delivery.ack().await;
                }
            })
        };
        let purging = {
            let core = core.clone();
            cube_kit::task::Background::spawn(async move {
                loop {
                    if let Err(error) = service::purge(&core).await {
                        tracing::warn!(%error, "purging deleted projects");
                    }
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            })
        };
        let relay = cube_kit::task::Background::spawn(cube_kit::outbox::relay(
            core.db.clone(),
            bus.clone(),
            core.outbox.clone(),
            cube_kit::outbox::RelayOptions::default(),
        ));
        let server = Server::new("projects", "cube.projects.v1")
            .authenticate(gate)
            .add_service(ProjectServiceServer::new(service::Projects(core)));
        Ok(Self {
            server,
            background: Background {
                _tasks: vec![joining, forgetting, purging, relay],
                _feed: feed,
            },
        })
    }
}

/// Why the projects binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The service could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] cube_kit::cli::RunError),
}

/// Connects to the peers the flags name.
///
/// # Errors
/// Returns an error naming the flag whose URL is invalid.
pub fn peers(args: &ProjectsArgs) -> Result<Peers, StartError> {
    let remote = |flag: &str, url: &str| {
        Channel::remote(url).map_err(|error| StartError::Flag(format!("{flag} {url:?}: {error}")))
    };
    let mut workloads = Vec::new();
    for entry in &args.workload_services {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| StartError::Flag(format!("--workload-service {entry:?}: expected NAME=URL")))?;
        workloads.push((name.to_owned(), remote("--workload-service", url)?));
    }
    Ok(Peers {
        auth: remote("--auth-url", &args.auth.auth_url)?,
        scheduler: remote("--scheduler-url", &args.scheduler_url)?,
        workloads,
    })
}

/// Runs the projects service on its own until SIGTERM or SIGINT.
///
/// # Errors
/// Returns why it could not start or stopped serving.
pub async fn serve(serve: cube_kit::cli::ServeArgs, args: ProjectsArgs) -> Result<(), ServeError> {
    let bus = cube_kit::redis::bus(&args.redis).map_err(|error| StartError::Flag(error.to_string()))?;
    let projects = Projects::start(&args.database, peers(&args)?, bus, args.membership_cache_ttl).await?;
    let _background = projects.background;
    cube_kit::cli::serve(projects.server, serve).await?;
    Ok(())
}
