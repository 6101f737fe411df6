//! Cube's workflow service (`cube.workflow.v1`): job templates, DAG pipelines of tasks, and runs that never lose
//! or double a task.
//!
//! Handlers (`templates.rs`, `pipelines.rs`, `runs.rs`, `workloads.rs`) check the caller and record what was
//! asked; the engine (`engine.rs`), run by the holder of the engine lease, moves every live run on through
//! [`progress`]'s decisions and acts on the runtime of each task's cluster (Kubernetes, or local processes in
//! `cube up`). Every statement is in `store.rs`.

mod access;
mod admission;
mod args;
mod cron;
mod dag;
mod engine;
mod firer;
mod firing;
mod launch;
pub mod model;
mod pipelines;
mod progress;
mod runs;
mod schedules;
mod secrets;
mod store;
mod templates;
mod tuning;
mod usage;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cube_bus::EventBus;
use cube_clusters::ClustersArgs;
use cube_kit::config::{AuthClientArgs, DatabaseArgs, RedisArgs, parse_duration};
use cube_kit::identity::service_gate;
use cube_kit::lease::Lease;
use cube_kit::{ApiError, Channel, Server};
use cube_proto::cube::common::v1::project_workload_service_server::ProjectWorkloadServiceServer;
use cube_proto::cube::workflow::v1::job_template_service_server::JobTemplateServiceServer;
use cube_proto::cube::workflow::v1::pipeline_service_server::PipelineServiceServer;
use cube_proto::cube::workflow::v1::run_service_server::RunServiceServer;
use cube_proto::cube::workflow::v1::schedule_service_server::ScheduleServiceServer;
use cube_runtime::{LocalRuntime, Runtimes};
use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, broadcast};

use crate::access::Access;
use crate::engine::Engine;
use crate::secrets::SecretKey;
use crate::store::{ENGINE_LEASE, SCHEDULES_LEASE, Store, USAGE_LEASE};

/// The `ErrorInfo` domain of the workflow service's errors.
pub(crate) const DOMAIN: &str = "workflow.cube.dev";

/// An error as the status the caller gets.
pub(crate) fn status(error: ApiError) -> tonic::Status {
    error.status(DOMAIN)
}

/// The platform environment every task gets unless `--task-env` says otherwise (cube-studio's `GLOBAL_ENV`).
const DEFAULT_TASK_ENV: [(&str, &str); 4] = [
    ("KFJ_ARCHIVE_BASE_PATH", "/archives"),
    ("KFJ_GPU_MEM_MIN", "13G"),
    ("KFJ_GPU_MEM_MAX", "13G"),
    ("KFJ_MODEL_REPO_API_URL", ""),
];

/// The workflow service's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkflowArgs {
    /// The clusters tasks run on.
    #[command(flatten)]
    pub clusters: ClustersArgs,
    /// Where templates, pipelines, runs, the outbox and the leases are stored.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Redis for the event bus (in-process when unset).
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The auth service, whose keys verify callers' tokens.
    #[command(flatten)]
    pub auth: AuthClientArgs,
    /// The projects service: memberships and project settings.
    #[arg(
        long = "projects-url",
        env = "CUBE_PROJECTS_URL",
        default_value = "http://cube-projects:8080"
    )]
    pub projects_url: String,
    /// The scheduler, which places tasks.
    #[arg(
        long = "scheduler-url",
        env = "CUBE_SCHEDULER_URL",
        default_value = "http://cube-scheduler:8080"
    )]
    pub scheduler_url: String,
    /// Where tasks of clusters without a Kubernetes API run as local processes.
    #[arg(
        long = "local-workloads-dir",
        env = "CUBE_LOCAL_WORKLOADS_DIR",
        default_value = "/var/lib/cube/workloads"
    )]
    pub local_workloads_dir: PathBuf,
    /// The file holding the token of the workflow service's account (`CreateServiceAccount`), with which the
    /// engine admits runs and tasks for their users.
    #[arg(long = "service-token-file", env = "CUBE_SERVICE_TOKEN_FILE")]
    pub service_token_file: PathBuf,
    /// A file of at least 32 random bytes that registry passwords are sealed with (unset: templates cannot hold
    /// registry passwords).
    #[arg(long = "secret-key-file", env = "CUBE_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// How often every live run is compared with its cluster, besides the workload events that wake the engine.
    #[arg(long = "reconcile-interval", env = "CUBE_RECONCILE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How long a replica's hold on the engine lasts without renewal: how soon another replica takes over.
    #[arg(long = "lease-duration", env = "CUBE_WORKFLOW_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// A Prometheus server (`http://…`) holding the pods' `container_cpu_usage_seconds_total` and
    /// `container_memory_working_set_bytes` (cAdvisor's), from which tasks' resources are tuned (unset: no tuning).
    #[arg(long = "prometheus-url", env = "CUBE_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// Environment every task gets, `KEY=value`, comma-separated (replaces the defaults of cube-studio's
    /// `GLOBAL_ENV`: `KFJ_ARCHIVE_BASE_PATH=/archives`, `KFJ_GPU_MEM_MIN=13G`, `KFJ_GPU_MEM_MAX=13G`,
    /// `KFJ_MODEL_REPO_API_URL=`).
    #[arg(long = "task-env", env = "CUBE_TASK_ENV", value_delimiter = ',')]
    pub task_env: Vec<String>,
}

/// The services the workflow service calls.
#[derive(Debug, Clone)]
pub struct Peers {
    /// The auth service, whose keys verify tokens.
    pub auth: Channel,
    /// The projects service.
    pub projects: Channel,
    /// The scheduler.
    pub scheduler: Channel,
}

/// How the workflow service runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// This replica's name as a lease holder: unique per process.
    pub holder: String,
    /// How long a hold on the engine lasts without renewal.
    pub lease_duration: Duration,
    /// How often live runs are reconciled.
    pub reconcile_interval: Duration,
    /// The environment every task gets.
    pub task_env: Vec<(String, String)>,
    /// The file registry passwords are sealed with.
    pub secret_key_file: Option<PathBuf>,
    /// The token of the workflow service's account.
    pub service_token: String,
    /// The time schedules fire by (the system's, or a test's).
    pub clock: cube_kit::time::Clock,
    /// The Prometheus server tasks' usage is read from, if any.
    pub prometheus_url: Option<String>,
}

impl Options {
    /// The options of a replica named `holder` holding the service-account token `service_token`, with the
    /// defaults of the flags.
    pub fn new(holder: String, service_token: String) -> Self {
        Self {
            holder,
            service_token,
            lease_duration: Duration::from_secs(15),
            reconcile_interval: Duration::from_secs(2),
            task_env: DEFAULT_TASK_ENV
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            secret_key_file: None,
            clock: cube_kit::time::Clock::System,
            prometheus_url: None,
        }
    }
}

/// Why the workflow service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The event bus failed.
    #[error("event bus: {0}")]
    Bus(#[from] cube_bus::BusError),
    /// A flag or file is wrong.
    #[error("{0}")]
    Config(String),
}

/// The workflow service and its background work.
pub struct Workflow {
    /// The gRPC server: the workflow services, `ProjectWorkloadService`, health and reflection.
    pub server: Server,
    /// The engine, the event consumer and the lease: keep while serving.
    pub background: Background,
}

/// The workflow service's background work, stopped when dropped.
pub struct Background {
    _tasks: Vec<cube_kit::task::Background>,
    _feed: cube_kit::identity::RevocationFeed,
}

impl Workflow {
    /// Starts the workflow service on `db`, running tasks through `runtimes`, hearing of workload changes on
    /// `bus`, and asking `peers`.
    ///
    /// # Errors
    /// Returns why it cannot start.
    pub async fn start(
        runtimes: Runtimes,
        db: DatabaseConnection,
        bus: Arc<dyn EventBus>,
        peers: Peers,
        options: Options,
    ) -> Result<Self, StartError> {
        let key = match &options.secret_key_file {
            Some(path) => Some(Arc::new(SecretKey::read(path).map_err(StartError::Config)?)),
            None => None,
        };
        let (gate, feed) = service_gate("workflow", peers.auth, &bus, &[]).await?;
        let store = Store::new(db.clone());
        let engine = Arc::new(Engine {
            store: store.clone(),
            runtime: runtimes,
            wake: Arc::new(Notify::new()),
            changes: broadcast::channel(1024).0,
            interval: options.reconcile_interval,
            key: key.clone(),
            admission: admission::Admission::new(peers.scheduler.clone(), options.service_token.clone()),
        });
        let keeper = Lease::new(ENGINE_LEASE, options.holder.clone(), options.lease_duration).keep(db.clone());
        let access = Access::new(peers.projects, peers.scheduler);
        let pipelines = pipelines::Pipelines {
            store: store.clone(),
            access: access.clone(),
        };
        let runs = runs::Runs {
            engine: engine.clone(),
            pipelines: pipelines.clone(),
            access: access.clone(),
            global_env: options.task_env,
        };
        let firer = Arc::new(firer::Firer {
            runs: runs.clone(),
            clock: options.clock.clone(),
            wake: Arc::new(Notify::new()),
            token: options.service_token,
        });
        let fires = Lease::new(SCHEDULES_LEASE, options.holder.clone(), options.lease_duration).keep(db.clone());
        let relay = Arc::new(Notify::new());
        let mut tasks = vec![
            cube_kit::task::Background::spawn(engine::run(engine.clone(), keeper)),
            cube_kit::task::Background::spawn(engine::follow_transitions(
                bus.clone(),
                options.holder.clone(),
                engine.wake.clone(),
            )),
            cube_kit::task::Background::spawn(firer::run(firer.clone(), fires)),
            cube_kit::task::Background::spawn(cube_kit::outbox::relay(
                db.clone(),
                bus,
                relay.clone(),
                cube_kit::outbox::RelayOptions::default(),
            )),
        ];
        if let Some(url) = &options.prometheus_url {
            let usage = Arc::new(usage::Usage {
                store: store.clone(),
                access: access.clone(),
                prometheus: usage::Prometheus::new(url),
                token: firer.token.clone(),
                relay,
            });
            let keeper = Lease::new(USAGE_LEASE, options.holder.clone(), options.lease_duration).keep(db);
            tasks.push(cube_kit::task::Background::spawn(usage::run(usage, keeper)));
        }
        let server = server()
            .authenticate(gate)
            .add_service(JobTemplateServiceServer::new(templates::Templates {
                store: store.clone(),
                key,
                access: access.clone(),
            }))
            .add_service(PipelineServiceServer::new(pipelines.clone()))
            .add_service(ScheduleServiceServer::new(schedules::Schedules {
                pipelines,
                clock: options.clock,
                firer: firer.wake.clone(),
            }))
            .add_service(RunServiceServer::new(runs))
            .add_service(ProjectWorkloadServiceServer::new(workloads::Workloads {
                store,
                access,
            }));
        Ok(Self {
            server,
            background: Background {
                _tasks: tasks,
                _feed: feed,
            },
        })
    }
}

/// Builds the workflow server, before its services are added.
pub fn server() -> Server {
    Server::new("workflow", "cube.workflow.v1")
}

/// Why the workflow binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// It could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] cube_kit::cli::RunError),
}

/// The `KEY=value` pairs of `--task-env`, or the defaults when it is not given.
///
/// # Errors
/// Names a pair without `=`.
pub fn task_env(pairs: &[String]) -> Result<Vec<(String, String)>, StartError> {
    if pairs.is_empty() {
        return Ok(Options::new(String::new(), String::new()).task_env);
    }
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.trim().to_owned(), value.to_owned()))
                .ok_or_else(|| StartError::Config(format!("--task-env {pair:?}: expected KEY=value")))
        })
        .collect()
}

/// Serves the workflow service as its own binary until SIGTERM or SIGINT.
///
/// # Errors
/// Returns why it could not start or serve.
pub async fn serve(serve: cube_kit::cli::ServeArgs, args: WorkflowArgs) -> Result<(), ServeError> {
    let config = |error: &dyn std::fmt::Display| StartError::Config(error.to_string());
    let registry = args.clusters.registry().map_err(|error| config(&error))?;
    let _reloads = cube_clusters::reload_on_sighup(registry.clone()).map_err(|error| config(&error))?;
    let bus = cube_kit::redis::bus(&args.redis).map_err(|error| config(&error))?;
    let db = cube_kit::db::connect::<model::Migrator>(&args.database.database_url, args.database.migrate)
        .await
        .map_err(|error| config(&error))?;
    cube_kit::db::private_directory(&args.local_workloads_dir)
        .map_err(|error| StartError::Config(format!("--local-workloads-dir: {error}")))?;
    let (local, _statuses) = LocalRuntime::open(&args.local_workloads_dir)
        .await
        .map_err(|error| config(&error))?;
    let remote = |flag: &str, url: &str| {
        Channel::remote(url).map_err(|error| StartError::Config(format!("{flag} {url:?}: {error}")))
    };
    let peers = Peers {
        auth: remote("--auth-url", &args.auth.auth_url)?,
        projects: remote("--projects-url", &args.projects_url)?,
        scheduler: remote("--scheduler-url", &args.scheduler_url)?,
    };
    // The process id tells an operator (and the replica tests) which process holds a lease.
    let holder = format!(
        "workflow-{}-{}",
        std::process::id(),
        cube_kit::identity::jws::random_id(6).map_err(|_| StartError::Config("no randomness".into()))?
    );
    let token = std::fs::read_to_string(&args.service_token_file)
        .map(|token| token.trim().to_owned())
        .map_err(|error| {
            StartError::Config(format!(
                "--service-token-file {}: {error}",
                args.service_token_file.display()
            ))
        })?;
    let options = Options {
        lease_duration: args.lease_duration,
        reconcile_interval: args.reconcile_interval,
        task_env: task_env(&args.task_env)?,
        secret_key_file: args.secret_key_file.clone(),
        prometheus_url: args.prometheus_url.clone(),
        ..Options::new(holder, token)
    };
    let workflow = Workflow::start(Runtimes::new(registry, Arc::new(local)), db, bus, peers, options).await?;
    let _background = workflow.background;
    cube_kit::cli::serve(workflow.server, serve).await?;
    Ok(())
}
