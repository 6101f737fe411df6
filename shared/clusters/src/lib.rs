//! The clusters Cube runs work on: the clusters file (`--clusters-file`), its checks, reloading it on SIGHUP, and
//! one cached Kubernetes client per cluster. A cluster with neither a kubeconfig nor `in_cluster` is *local*: its
//! work runs as processes on this machine (`cube up`'s `local` cluster).
//!
//! The scheduler and every service that runs workloads share this registry; what a service builds on top of it
//! (the scheduler's node watches, say) follows a reload through [`on_sighup`].

mod config;
mod registry;

use std::future::Future;
use std::path::PathBuf;

use cube_kit::task::Background;

pub use config::{ClientError, ClusterConfig, RegistryError, dns_label, valid_name};
pub use registry::ClusterRegistry;

/// The clusters file flag that every service running work flattens into its own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ClustersArgs {
    /// The cluster file: JSON `{"clusters": [{"name": "dev", "default": true, "kubeconfig": "/path", …}]}`; a
    /// cluster with neither `kubeconfig` nor `"in_cluster": true` runs work as local processes. Read again on
    /// SIGHUP.
    #[arg(long = "clusters-file", env = "CUBE_CLUSTERS_FILE")]
    pub clusters_file: PathBuf,
}

impl ClustersArgs {
    /// Reads the clusters file the flag names into a registry.
    ///
    /// # Errors
    /// Returns an error naming the file and what is wrong in it.
    pub fn registry(&self) -> Result<ClusterRegistry, RegistryError> {
        ClusterRegistry::load(&self.clusters_file)
    }
}

/// Why reloading on SIGHUP could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("listening for SIGHUP: {0}")]
pub struct SignalError(#[from] std::io::Error);

/// Reloads `registry` from its file on every SIGHUP, until the returned task is dropped (a service drops it with
/// its other background work when its server shuts down). A refused file is logged and changes nothing.
///
/// # Errors
/// Returns an error when the SIGHUP handler cannot be installed.
pub fn reload_on_sighup(registry: ClusterRegistry) -> Result<Background, SignalError> {
    on_sighup(move || {
        let registry = registry.clone();
        async move {
            registry.reload()?;
            tracing::info!(clusters = ?registry.names(), "reloaded the cluster file");
            Ok(())
        }
    })
}

/// Runs `reload` on every SIGHUP, until the returned task is dropped: for a service whose own state follows the
/// registry, `reload` reloads the registry and then that state (the scheduler restarts the watches of changed
/// clusters). A refused file is logged.
///
/// # Errors
/// Returns an error when the SIGHUP handler cannot be installed.
pub fn on_sighup<F, Fut>(mut reload: F) -> Result<Background, SignalError>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), RegistryError>> + Send,
{
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(Background::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(error) = reload().await {
                tracing::error!(%error, "SIGHUP: the cluster file was not reloaded");
            }
        }
    }))
}
