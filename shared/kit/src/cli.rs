//! What a service binary's `main` does: parse flags and env, start telemetry, serve until a signal.

use std::future::Future;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::config::{ServerArgs, TelemetryArgs};
use crate::metrics::RpcMetrics;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::error::BoxError;
use crate::health::Health;
use crate::server::Server;

/// The flags of a service binary (and of `cube serve <service>`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where to listen and how to treat calls.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(Debug, Parser)]
struct ServiceCommand {
    #[command(flatten)]
    args: ServeArgs,
}

/// Why a binary stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Telemetry could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// A listener could not be bound.
    #[error("binding {address}: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(BoxError),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

/// Binds `address`, naming it in the error.
///
/// # Errors
/// Returns an error when the address cannot be bound.
pub async fn bind(address: std::net::SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| RunError::Bind { address, source })
}

/// Runs one service's binary: parses its flags, serves `build()` until SIGTERM or SIGINT, and exits non-zero
/// with the reason on failure.
pub fn main(build: fn() -> Server) -> ExitCode {
    let command = ServiceCommand::parse();
    let threads = command.args.server.worker_threads;
    block_on(threads, serve(build(), command.args))
}

/// Builds the tokio runtime for `worker_threads` threads (default: the CPUs this process may use, which on
/// Linux follows the cgroup's CPU quota): single-threaded for one, multi-threaded otherwise.
///
/// # Errors
/// Returns an error when the runtime cannot be built.
pub fn runtime(worker_threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = worker_threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Runs `future` on the [`runtime`] for `worker_threads` and turns its result into the process's exit code,
/// printing the error on failure.
pub fn block_on<E: std::fmt::Display>(
    worker_threads: Option<NonZeroUsize>,
    future: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match runtime(worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `server` with its admin port until SIGTERM or SIGINT; what `main` and `cube serve` run.
///
/// # Errors
/// Returns an error when telemetry, a listener or a server fails.
pub async fn serve(server: Server, args: ServeArgs) -> Result<(), RunError> {
    let name = server.name();
    let health = server.health().clone();
    let server_args = args.server.clone();
    run(name, &args, health, |bound| async move {
        server
            .serve(bound.listener, &server_args, &bound.metrics, bound.shutdown)
            .await
    })
    .await
}

/// What [`run`] hands the gRPC server it starts.
#[derive(Debug)]
pub struct Bound {
    /// The bound gRPC listener.
    pub listener: TcpListener,
    /// Where the admin HTTP server listens.
    pub admin_address: std::net::SocketAddr,
    /// The RPC metrics, registered with the admin server's registry.
    pub metrics: RpcMetrics,
    /// Resolves on SIGTERM or SIGINT.
    pub shutdown: WaitForCancellationFutureOwned,
}

/// Runs a gRPC server and the admin HTTP server beside it until SIGTERM or SIGINT: sets up telemetry, binds
/// both listeners, and hands the gRPC listener, the RPC metrics and the shutdown signal to `serve`.
///
/// # Errors
/// Returns an error when telemetry, a listener or a server fails.
pub async fn run<F, Fut, E>(name: &'static str, args: &ServeArgs, health: Health, serve: F) -> Result<(), RunError>
where
    F: FnOnce(Bound) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let telemetry = crate::telemetry::init(name, &args.telemetry)?;
    run_with(telemetry, args, health, serve).await
}

/// Like [`run`], with telemetry already set up by the caller (so that what it did before serving was logged),
/// and flushed here when serving ends.
///
/// # Errors
/// Returns an error when a listener or a server fails.
pub async fn run_with<F, Fut, E>(
    telemetry: crate::telemetry::Telemetry,
    args: &ServeArgs,
    health: Health,
    serve: F,
) -> Result<(), RunError>
where
    F: FnOnce(Bound) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let result = serve_until_signal(args, health, serve).await;
    // Flushed here, awaited, rather than on drop: on a single-threaded runtime a blocking flush would starve the
    // exporter it waits for.
    telemetry.shutdown().await;
    result
}

async fn serve_until_signal<F, Fut, E>(args: &ServeArgs, health: Health, serve: F) -> Result<(), RunError>
where
    F: FnOnce(Bound) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let shutdown = crate::shutdown::on_signal().map_err(RunError::Signals)?;
    let mut registry = Registry::with_prefix("cube");
    let metrics = RpcMetrics::register(&mut registry);
    let listener = bind(args.server.listen).await?;
    let admin_listener = bind(args.server.admin_listen).await?;
    let admin_address = admin_listener.local_addr().map_err(RunError::Admin)?;
    let admin = crate::admin::serve(
        admin_listener,
        Arc::new(registry),
        health,
        shutdown.clone().cancelled_owned(),
    );
    let grpc = serve(Bound {
        listener,
        admin_address,
        metrics,
        shutdown: shutdown.cancelled_owned(),
    });
    let (grpc, admin) = tokio::join!(grpc, admin);
    grpc.map_err(|error| RunError::Serve(error.into()))?;
    admin.map_err(RunError::Admin)
}
