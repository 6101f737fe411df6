//! The `cube` binary: `cube up` runs the whole platform in one process on embedded defaults; `cube serve NAME`
//! runs one service, or the gateway, on its own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cube_gateway::cli::GatewayCommand;
use cube_gateway::{Gateway, GatewayArgs};
use cube_kit::cli::{RunError, ServeArgs};
use cube_kit::{Channel, Server};

/// Every Cube service, as `cube up` wires them behind the gateway.
const SERVICES: [fn() -> Server; 7] = [
    cube_auth::server,
    cube_projects::server,
    cube_scheduler::server,
    cube_workflow::server,
    cube_notebook::server,
    cube_serving::server,
    cube_watcher::server,
];

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
}

#[derive(Debug, clap::Subcommand)]
enum ServeCommand {
    /// Users, password and LDAP login, tokens and RBAC.
    Auth(ServeArgs),
    /// Project groups, membership roles, settings and quotas.
    Projects(ServeArgs),
    /// Clusters, node inventory, placement and quota admission.
    Scheduler(ServeArgs),
    /// Job templates, pipelines, runs and schedules.
    Workflow(ServeArgs),
    /// Notebook lifecycle.
    Notebook(ServeArgs),
    /// Inference services.
    Serving(ServeArgs),
    /// Kubernetes watches and notifications.
    Watcher(ServeArgs),
    /// The gateway in front of separately deployed services.
    Gateway(GatewayCommand),
}

fn main() -> ExitCode {
    match Command::parse() {
        Command::Up(args) => cube_kit::cli::block_on(args.serve.server.worker_threads, up(args)),
        Command::Serve(ServeCommand::Gateway(command)) => cube_gateway::cli::main(command),
        Command::Serve(ServeCommand::Auth(args)) => serve(cube_auth::server, args),
        Command::Serve(ServeCommand::Projects(args)) => serve(cube_projects::server, args),
        Command::Serve(ServeCommand::Scheduler(args)) => serve(cube_scheduler::server, args),
        Command::Serve(ServeCommand::Workflow(args)) => serve(cube_workflow::server, args),
        Command::Serve(ServeCommand::Notebook(args)) => serve(cube_notebook::server, args),
        Command::Serve(ServeCommand::Serving(args)) => serve(cube_serving::server, args),
        Command::Serve(ServeCommand::Watcher(args)) => serve(cube_watcher::server, args),
    }
}

fn serve(build: fn() -> Server, args: ServeArgs) -> ExitCode {
    cube_kit::cli::block_on(args.server.worker_threads, cube_kit::cli::serve(build(), args))
}

/// Why `cube up` failed.
#[derive(Debug, thiserror::Error)]
enum UpError {
    #[error("creating the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Run(#[from] RunError),
}

async fn up(args: UpArgs) -> Result<(), UpError> {
    std::fs::create_dir_all(&args.data_dir).map_err(|source| UpError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    let mut gateway = Gateway::from_args(&args.gateway).map_err(RunError::from)?;
    for build in SERVICES {
        let server = build();
        let package = server.package().to_owned();
        let routes = server.into_routes().map_err(|error| RunError::Serve(error.into()))?;
        gateway = gateway.route(&package, Channel::in_process(routes));
    }
    let health = gateway.health().clone();
    let server_args = args.serve.server.clone();
    let data_dir = args.data_dir.clone();
    cube_kit::cli::run("cube", &args.serve, health, |bound| async move {
        let address = bound
            .listener
            .local_addr()
            .map_err(|error| RunError::Serve(error.into()))?;
        tracing::info!(data_dir = %data_dir.display(), services = SERVICES.len(), "cube is up");
        // The one line scripts and people wait for.
        println!(
            "cube is up: gateway listening on http://{address} (metrics on http://{}/metrics)",
            bound.admin_address
        );
        gateway
            .serve(bound.listener, &server_args, &bound.metrics, bound.shutdown)
            .await
            .map_err(RunError::from)
    })
    .await?;
    Ok(())
}
