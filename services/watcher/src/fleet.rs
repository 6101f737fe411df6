//! The clusters being watched follow the registry: a cluster added by a reload is watched within a second, one
//! removed (or now reached differently) stops; local clusters have nothing to watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_kit::task::Background;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

use crate::cluster::ClusterWatch;
use crate::live::Live;

/// How often the registry is compared with the watches running.
const FOLLOW: Duration = Duration::from_secs(1);

/// What every cluster's watch shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) db: DatabaseConnection,
    pub(crate) relay: Arc<Notify>,
    pub(crate) live: Arc<Live>,
    pub(crate) holder: String,
    pub(crate) lease_duration: Duration,
}

/// Runs forever: starts and stops cluster watches as the registry changes.
pub(crate) async fn follow(registry: ClusterRegistry, shared: Shared) {
    // Each watch stops when its entry goes (or the follower with all of them).
    let mut running: HashMap<String, (ClusterConfig, Background)> = HashMap::new();
    loop {
        let wanted: Vec<ClusterConfig> = registry
            .clusters()
            .iter()
            .filter(|cluster| !cluster.is_local())
            .cloned()
            .collect();
        running.retain(|name, (config, _)| {
            let keep = wanted
                .iter()
                .any(|cluster| &cluster.name == name && cluster.same_connection(config));
            if !keep {
                tracing::info!(cluster = %name, "no longer watching the cluster");
            }
            keep
        });
        for cluster in wanted {
            if running.contains_key(&cluster.name) {
                continue;
            }
            match registry.client(&cluster.name).await {
                Ok(client) => {
                    let watch = ClusterWatch {
                        cluster: cluster.name.clone(),
                        client,
                        db: shared.db.clone(),
                        relay: shared.relay.clone(),
                        live: shared.live.clone(),
                        holder: shared.holder.clone(),
                        lease_duration: shared.lease_duration,
                    };
                    tracing::info!(cluster = %cluster.name, "watching the cluster");
                    running.insert(cluster.name.clone(), (cluster, Background::spawn(watch.run())));
                }
                Err(error) => tracing::warn!(cluster = %cluster.name, %error, "no client for the cluster yet"),
            }
        }
        tokio::time::sleep(FOLLOW).await;
    }
}
