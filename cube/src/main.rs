//! The `cube` binary: `cube up` runs the whole platform in one process on embedded defaults; `cube serve NAME`
//! runs one service, or the gateway, on its own.

use cube_runtime::LocalRuntime;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use clap::Parser;
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_gateway::cli::GatewayCommand;
use cube_gateway::{Gateway, GatewayArgs};
use cube_kit::cli::{RunError, ServeArgs};
use cube_kit::config::parse_duration;
use cube_kit::{Channel, Server};

/// The services that serve health only so far, as `cube up` wires them behind the gateway (auth, projects, the
/// scheduler and the watcher are started with their state and peers).
const SERVICES: [fn() -> Server; 2] = [cube_notebook::server, cube_serving::server];

#[derive(Debug, Parser)]
#[command(
    name = "cube",
    version,
    about = "Cube: a cloud-native machine-learning platform control plane"
)]
enum Command {
    /// Runs the whole platform in one process: every service behind the gateway, on embedded defaults
    /// (SQLite files under --data-dir, the in-process event bus, no Redis, no cluster).
    Up(UpArgs),
    /// Runs one service, or the gateway, on its own.
    #[command(subcommand)]
    Serve(ServeCommand),
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Where the gateway listens, logs and traces.
    #[command(flatten)]
    serve: ServeArgs,
    /// CORS and limits of the gateway.
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Directory for the platform's state (SQLite files, logs of local workloads).
    #[arg(long = "data-dir", env = "CUBE_DATA_DIR", default_value = ".cube")]
    data_dir: PathBuf,
    /// The password of the `admin` account created on first start; generated and printed once when unset.
    #[arg(long = "admin-password", env = "CUBE_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// How long an access token lives (e.g. 15m).
    #[arg(long = "access-token-ttl", env = "CUBE_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration)]
    access_token_ttl: Duration,
    /// How long a login session (its chain of refresh tokens) lives (e.g. 168h).
    #[arg(long = "session-ttl", env = "CUBE_SESSION_TTL", default_value = "168h", value_parser = parse_duration)]
    session_ttl: Duration,
    /// LDAP login, as `cube serve auth` takes it (off unless --ldap-server is set).
    #[command(flatten, next_help_heading = "LDAP login")]
    ldap: Box<cube_auth::ldap::LdapArgs>,
}

impl UpArgs {
    /// The flags auth runs with in `cube up`: its SQLite file under the data directory, no Redis, and the LDAP,
    /// password and token flags given to `cube up`.
    fn auth(&self) -> Result<cube_auth::AuthArgs, clap::Error> {
        let database = format!("sqlite://{}", self.data_dir.join("auth.db").display());
        let mut auth = cube_auth::AuthArgs::embedded(database, self.admin_password.clone())?;
        auth.ldap = (*self.ldap).clone();
        auth.access_token_ttl = self.access_token_ttl;
        auth.session_ttl = self.session_ttl;
        Ok(auth)
    }
}

/// Says how users log in through LDAP, when it is on: the server and how users are found, never a password.
fn ldap_summary(ldap: &cube_auth::ldap::LdapArgs) -> Option<String> {
    let server = cube_kit::db::redact(ldap.server.as_deref()?);
    let tls = if ldap.use_tls { " with StartTLS" } else { "" };
    let users = match (&ldap.username_format, &ldap.append_domain, &ldap.search) {
        (Some(format), _, _) => format!("direct bind as {format}"),
        (None, Some(domain), _) => format!("bind as USER@{domain}"),
        (None, None, Some(base)) => format!(
            "search under {base} as {}, then bind",
            ldap.bind_user.as_deref().unwrap_or("anonymous")
        ),
        (None, None, None) => "no way to find users configured".to_owned(),
    };
    Some(format!("LDAP login is on: server {server}{tls}, {users}"))
}

/// `cube serve projects`' flags.
#[derive(Debug, clap::Args)]
struct ProjectsCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    projects: cube_projects::ProjectsArgs,
}

/// `cube serve scheduler`'s flags.
#[derive(Debug, clap::Args)]
struct SchedulerCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    scheduler: cube_scheduler::SchedulerArgs,
}

/// `cube serve watcher`'s flags.
#[derive(Debug, clap::Args)]
struct WatcherCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    watcher: cube_watcher::WatcherArgs,
}

/// `cube serve workflow`'s flags.
#[derive(Debug, clap::Args)]
struct WorkflowCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    workflow: cube_workflow::WorkflowArgs,
}

/// `cube serve auth`'s flags.
#[derive(Debug, clap::Args)]
struct AuthCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    auth: cube_auth::AuthArgs,
}

#[derive(Debug, clap::Subcommand)]
enum ServeCommand {
    /// Users, password and LDAP login, tokens and RBAC.
    Auth(Box<AuthCommand>),
    /// Project groups, membership roles, settings and quotas.
    Projects(Box<ProjectsCommand>),
    /// Clusters, node inventory, placement and quota admission.
    Scheduler(Box<SchedulerCommand>),
    /// Job templates, pipelines, runs and schedules.
    Workflow(Box<WorkflowCommand>),
    /// Notebook lifecycle.
    Notebook(ServeArgs),
    /// Inference services.
    Serving(ServeArgs),
    /// Kubernetes watches and notifications.
    Watcher(Box<WatcherCommand>),
    /// The gateway in front of separately deployed services.
    Gateway(GatewayCommand),
}

fn main() -> ExitCode {
    match Command::parse() {
        Command::Up(args) => cube_kit::cli::block_on(args.serve.server.worker_threads, up(args)),
        Command::Serve(ServeCommand::Gateway(command)) => cube_gateway::cli::main(command),
        Command::Serve(ServeCommand::Auth(command)) => {
            let AuthCommand { serve, auth } = *command;
            cube_kit::cli::block_on(serve.server.worker_threads, cube_auth::serve(serve, auth))
        }
        Command::Serve(ServeCommand::Projects(command)) => {
            let ProjectsCommand { serve, projects } = *command;
            cube_kit::cli::block_on(serve.server.worker_threads, cube_projects::serve(serve, projects))
        }
        Command::Serve(ServeCommand::Scheduler(command)) => {
            let SchedulerCommand { serve, scheduler } = *command;
            cube_kit::cli::block_on(serve.server.worker_threads, cube_scheduler::serve(serve, scheduler))
        }
        Command::Serve(ServeCommand::Workflow(command)) => {
            let WorkflowCommand { serve, workflow } = *command;
            cube_kit::cli::block_on(serve.server.worker_threads, cube_workflow::serve(serve, workflow))
        }
        Command::Serve(ServeCommand::Notebook(args)) => serve(cube_notebook::server, args),
        Command::Serve(ServeCommand::Serving(args)) => serve(cube_serving::server, args),
        Command::Serve(ServeCommand::Watcher(command)) => {
            let WatcherCommand { serve, watcher } = *command;
            cube_kit::cli::block_on(serve.server.worker_threads, cube_watcher::serve(serve, watcher))
        }
    }
}

fn serve(build: fn() -> Server, args: ServeArgs) -> ExitCode {
    cube_kit::cli::block_on(args.server.worker_threads, cube_kit::cli::serve(build(), args))
}

/// Tells people how to log in through the gateway with grpcurl.
fn print_login_help(address: std::net::SocketAddr, bootstrap: Option<&cube_auth::Bootstrap>) {
    let password = match bootstrap {
        Some(cube_auth::Bootstrap {
            generated_password: Some(password),
            ..
        }) => {
            println!("created the admin account: username admin, password {password} (shown only now)");
            password.clone()
        }
        Some(_) => "<the --admin-password you gave>".to_owned(),
        None => "<the admin password from the first start>".to_owned(),
    };
    println!(
        "log in: grpcurl -plaintext -d '{{\"username\":\"admin\",\"password\":\"{password}\"}}' {address} \
         cube.auth.v1.AuthService/Login"
    );
    println!(
        "then:   grpcurl -plaintext -H \"authorization: Bearer <accessToken>\" {address} cube.auth.v1.AuthService/WhoAmI"
    );
}

/// Why `cube up` failed.
#[derive(Debug, thiserror::Error)]
enum UpError {
    #[error("creating the data directory {path} (mode 0700): {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("auth: {0}")]
    Auth(#[from] cube_auth::StartError),
    #[error("reading the AUTH_LDAP_* environment: {0}")]
    LdapEnvironment(#[from] clap::Error),
    #[error("projects: {0}")]
    Projects(#[from] cube_projects::StartError),
    #[error("scheduler: {0}")]
    Scheduler(#[from] cube_bus::BusError),
    #[error("watcher: {0}")]
    Watcher(String),
    #[error("workflow: {0}")]
    Workflow(#[from] cube_workflow::StartError),
}

async fn up(args: UpArgs) -> Result<(), UpError> {
    // Logging starts first, so that what starting does (tightening the data directory, migrations) is logged.
    let telemetry = cube_kit::telemetry::init("cube", &args.serve.telemetry).map_err(RunError::from)?;
    match start(&args).await {
        Ok(started) => serve_up(args, telemetry, started).await,
        Err(error) => {
            telemetry.shutdown().await;
            Err(error)
        }
    }
}

/// The platform `cube up` started, ready to serve.
struct Started {
    gateway: Gateway,
    bootstrap: Option<cube_auth::Bootstrap>,
    /// The services' background work (outbox relays, revocation feeds, event consumers): kept while serving.
    background: Vec<Box<dyn std::any::Any + Send>>,
}

async fn start(args: &UpArgs) -> Result<Started, UpError> {
    // The directory holds auth's signing keys and every password hash: its owner's alone.
    cube_kit::db::private_directory(&args.data_dir).map_err(|source| UpError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    let mut gateway = Gateway::from_args(&args.gateway).map_err(RunError::from)?;
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let auth = cube_auth::Auth::start(&args.auth()?, bus.clone()).await?;
    let bootstrap = auth.bootstrap.clone();
    // Each service that acts without a caller gets an account of its own, made anew on every start.
    let workflow_token = auth
        .service_accounts
        .renew("workflow")
        .await
        .map_err(|error| UpError::Workflow(cube_workflow::StartError::Config(error.to_string())))?;
    let mut background: Vec<Box<dyn std::any::Any + Send>> = vec![Box::new(auth.background)];
    let auth_routes = auth
        .server
        .into_routes()
        .map_err(|error| RunError::Serve(error.into()))?;
    let auth_channel = Channel::in_process(auth_routes);
    gateway = gateway.route("cube.auth.v1", auth_channel.clone());
    // The scheduler reads projects' settings and projects checks clusters with the scheduler: the scheduler's
    // channel to projects is bound once projects is built.
    let (projects_for_scheduler, projects_late) = Channel::late();
    let scheduler = cube_scheduler::Scheduler::start(
        cube_clusters::ClusterRegistry::embedded(),
        cube_scheduler::Peers {
            auth: auth_channel.clone(),
            projects: projects_for_scheduler,
        },
        &bus,
        cube_scheduler::Options::default(),
        cube_kit::db::connect::<cube_scheduler::model::Migrator>(
            &format!("sqlite://{}", args.data_dir.join("scheduler.db").display()),
            true,
        )
        .await
        .map_err(|error| RunError::Serve(error.into()))?,
    )
    .await?;
    background.push(Box::new(scheduler.feed));
    let scheduler_channel = Channel::in_process(
        scheduler
            .server
            .into_routes()
            .map_err(|error| RunError::Serve(error.into()))?,
    );
    gateway = gateway.route("cube.scheduler.v1", scheduler_channel.clone());
    // Projects asks the workflow service for live runs before deleting a project, and the workflow service asks
    // projects for memberships: the channel to the workflow service is bound once it is built.
    let (workflow_for_projects, workflow_late) = Channel::late();
    let projects = cube_projects::Projects::start(
        &cube_kit::config::DatabaseArgs {
            database_url: format!("sqlite://{}", args.data_dir.join("projects.db").display()),
            migrate: true,
        },
        cube_projects::Peers {
            auth: auth_channel.clone(),
            scheduler: scheduler_channel.clone(),
            workloads: vec![("workflow".to_owned(), workflow_for_projects)],
        },
        bus.clone(),
        Duration::from_secs(2),
    )
    .await?;
    background.push(Box::new(projects.background));
    let projects_routes = projects
        .server
        .into_routes()
        .map_err(|error| RunError::Serve(error.into()))?;
    let projects_channel = Channel::in_process(projects_routes);
    projects_late.bind(projects_channel.clone());
    gateway = gateway.route("cube.projects.v1", projects_channel.clone());
    // The local cluster has no Kubernetes API to watch: the watcher records the local runtime's processes instead,
    // and keeps its state apart.
    let local_dir = args.data_dir.join("local");
    cube_kit::db::private_directory(&local_dir).map_err(|source| UpError::DataDir {
        path: local_dir.clone(),
        source,
    })?;
    let (local, statuses) = LocalRuntime::open(&local_dir)
        .await
        .map_err(|error| UpError::Watcher(error.to_string()))?;
    let watcher = cube_watcher::Watcher::start(
        cube_clusters::ClusterRegistry::embedded(),
        cube_kit::db::connect::<cube_watcher::store::Migrator>(
            &format!("sqlite://{}", args.data_dir.join("watcher.db").display()),
            true,
        )
        .await
        .map_err(|error| RunError::Serve(error.into()))?,
        bus.clone(),
        cube_watcher::Peers {
            auth: auth_channel.clone(),
            projects: projects_channel.clone(),
        },
        cube_watcher::Options {
            holder: cube_watcher::holder_name().map_err(UpError::Watcher)?,
            lease_duration: Duration::from_secs(15),
            retention: cube_watcher::Retention {
                age: Duration::from_secs(7 * 86_400),
                count: 1_000_000,
            },
        },
        Some(cube_watcher::LocalStatuses {
            cluster: "local".to_owned(),
            statuses,
        }),
    )
    .await?;
    background.push(Box::new(watcher.background));
    // The runtime the workload services run local work on; its processes outlive a restart of `cube up`.
    let local = Arc::new(local);
    let workflow = cube_workflow::Workflow::start(
        cube_runtime::Runtimes::new(cube_clusters::ClusterRegistry::embedded(), local.clone()),
        cube_kit::db::connect::<cube_workflow::model::Migrator>(
            &format!("sqlite://{}", args.data_dir.join("workflow.db").display()),
            true,
        )
        .await
        .map_err(|error| RunError::Serve(error.into()))?,
        bus.clone(),
        cube_workflow::Peers {
            auth: auth_channel.clone(),
            projects: projects_channel.clone(),
            scheduler: scheduler_channel,
        },
        cube_workflow::Options::new(cube_watcher::holder_name().map_err(UpError::Watcher)?, workflow_token),
    )
    .await?;
    background.push(Box::new(local));
    background.push(Box::new(workflow.background));
    let workflow_channel = Channel::in_process(
        workflow
            .server
            .into_routes()
            .map_err(|error| RunError::Serve(error.into()))?,
    );
    workflow_late.bind(workflow_channel.clone());
    gateway = gateway.route("cube.workflow.v1", workflow_channel);
    gateway = gateway.route(
        "cube.watcher.v1",
        Channel::in_process(
            watcher
                .server
                .into_routes()
                .map_err(|error| RunError::Serve(error.into()))?,
        ),
    );
    for build in SERVICES {
        let server = build();
        let package = server.package().to_owned();
        let routes = server.into_routes().map_err(|error| RunError::Serve(error.into()))?;
        gateway = gateway.route(&package, Channel::in_process(routes));
    }
    Ok(Started {
        gateway,
        bootstrap,
        background,
    })
}

async fn serve_up(args: UpArgs, telemetry: cube_kit::telemetry::Telemetry, started: Started) -> Result<(), UpError> {
    let Started {
        gateway,
        bootstrap,
        background,
    } = started;
    let health = gateway.health().clone();
    let server_args = args.serve.server.clone();
    let data_dir = args.data_dir.clone();
    let ldap = ldap_summary(&args.ldap);
    cube_kit::cli::run_with(telemetry, &args.serve, health, |bound| async move {
        let address = bound
            .listener
            .local_addr()
            .map_err(|error| RunError::Serve(error.into()))?;
        tracing::info!(data_dir = %data_dir.display(), services = SERVICES.len() + 4, "cube is up");
        // The one line scripts and people wait for.
        println!(
            "cube is up: gateway listening on http://{address} (metrics on http://{}/metrics)",
            bound.admin_address
        );
        print_login_help(address, bootstrap.as_ref());
        if let Some(ldap) = &ldap {
            tracing::info!(summary = %ldap, "ldap login on");
            println!("{ldap}");
        }
        gateway
            .serve(bound.listener, &server_args, &bound.metrics, bound.shutdown)
            .await
            .map_err(RunError::from)
    })
    .await?;
    drop(background);
    Ok(())
}
