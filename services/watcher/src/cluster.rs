//! Watching one cluster: while this replica holds the cluster's lease, the Pods and Deployments Cube made
//! (`app.kubernetes.io/managed-by=cube`) and every Node are followed, each change compared with the last published
//! state of its uid and turned into a transition. A (re)list — at the start, after a restart of the watch, after
//! `410 Gone` — publishes nothing for objects that did not change, what changed meanwhile, and deletion for
//! objects that vanished meanwhile.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use cube_kit::lease::{Epoch, Held, Lease};
use cube_proto::cube::watcher::v1::ObjectKind;
use cube_runtime::WorkloadStatus;
use cube_runtime::kubernetes::pod_status;
use cube_runtime::labels;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use sea_orm::DatabaseConnection;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use crate::live::Live;
use crate::status::{deployment_status, node_status};
use crate::store::{self, Fence, StoreError};

/// The name of the lease that makes one replica the watcher of `cluster`.
pub fn lease_name(cluster: &str) -> String {
    format!("watcher/clusters/{cluster}")
}

/// What a cluster's watches need.
pub(crate) struct ClusterWatch {
    pub(crate) cluster: String,
    pub(crate) client: Client,
    pub(crate) db: DatabaseConnection,
    /// Wakes the outbox relay after each stored transition.
    pub(crate) relay: Arc<Notify>,
    /// Tells event streams after each stored transition.
    pub(crate) live: Arc<Live>,
    /// This replica's name as a lease holder.
    pub(crate) holder: String,
    /// How long a holding lasts without renewal.
    pub(crate) lease_duration: Duration,
}

impl ClusterWatch {
    /// Runs until aborted: waits for the cluster's lease, watches while it holds it, and starts over when it loses
    /// it or a watch fails.
    pub(crate) async fn run(self) {
        let name = lease_name(&self.cluster);
        let keeper = Lease::new(name.clone(), self.holder.clone(), self.lease_duration).keep(self.db.clone());
        let mut held = keeper.watch();
        loop {
            let Some(epoch) = next_holding(&mut held).await else {
                return;
            };
            tracing::info!(cluster = %self.cluster, %epoch, "watching the cluster");
            let fence = Fence { lease: &name, epoch };
            let managed = format!("{}={}", labels::MANAGED_BY, labels::CUBE);
            tokio::select! {
                // The lease is lost (or changed hands): stop writing at once; the fence refuses late writes anyway.
                () = lost(&mut held, epoch) => {
                    tracing::info!(cluster = %self.cluster, "lost the cluster's lease; standing by");
                }
                error = self.watch::<Pod>(fence, ObjectKind::Pod, Some(&managed), pod_status) => self.failed(error).await,
                error = self.watch::<Deployment>(fence, ObjectKind::Deployment, Some(&managed), deployment_status) => {
                    self.failed(error).await;
                }
                error = self.watch::<Node>(fence, ObjectKind::Node, None, node_status) => self.failed(error).await,
            }
        }
    }

    async fn failed(&self, error: StoreError) {
        tracing::warn!(cluster = %self.cluster, %error, "a watch stopped; starting over");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Follows the objects of kind `K` (those carrying `labels`, when given) until a change cannot be stored.
    async fn watch<K>(
        &self,
        fence: Fence<'_>,
        kind: ObjectKind,
        labels: Option<&str>,
        status_of: fn(&str, &K) -> WorkloadStatus,
    ) -> StoreError
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let objects: Api<K> = Api::all(self.client.clone());
        let config = match labels {
            Some(labels) => watcher::Config::default().labels(labels),
            None => watcher::Config::default(),
        };
        let mut events = watcher(objects, config).default_backoff().boxed();
        let mut listed: Option<HashSet<String>> = None;
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(watcher::Event::Init) => {
                    listed = Some(HashSet::new());
                    Ok(())
                }
                Ok(watcher::Event::InitApply(object)) => {
                    if let (Some(listed), Some(uid)) = (listed.as_mut(), object.uid()) {
                        listed.insert(uid);
                    }
                    self.store(fence, kind, object.uid(), Some(status_of(&self.cluster, &object)))
                        .await
                }
                Ok(watcher::Event::InitDone) => match listed.take() {
                    Some(listed) => self.vanished(fence, kind, &listed).await,
                    None => Ok(()),
                },
                Ok(watcher::Event::Apply(object)) => {
                    self.store(fence, kind, object.uid(), Some(status_of(&self.cluster, &object)))
                        .await
                }
                Ok(watcher::Event::Delete(object)) => self.store(fence, kind, object.uid(), None).await,
                Err(error) => {
                    // The backoff paces the retries; the next (re)list reconciles what was missed.
                    tracing::warn!(cluster = %self.cluster, ?kind, %error, "watching");
                    Ok(())
                }
            };
            if let Err(error) = result {
                return error;
            }
        }
        StoreError::Database(sea_orm::DbErr::Custom("the watch ended".into()))
    }

    /// Records what object `uid` now is (`None`: gone), waking the relay when that was a transition.
    async fn store(
        &self,
        fence: Fence<'_>,
        kind: ObjectKind,
        uid: Option<String>,
        status: Option<WorkloadStatus>,
    ) -> Result<(), StoreError> {
        let Some(uid) = uid else {
            return Ok(());
        };
        if let Some(event) = store::record(&self.db, fence, kind, &uid, status.as_ref()).await? {
            tracing::debug!(event = %event.name, "transition");
            self.relay.notify_one();
            self.live.recorded();
        }
        Ok(())
    }

    /// After a list: the objects of `kind` known but not listed are gone.
    async fn vanished(&self, fence: Fence<'_>, kind: ObjectKind, listed: &HashSet<String>) -> Result<(), StoreError> {
        for uid in store::known(&self.db, &self.cluster, kind).await? {
            if !listed.contains(&uid) {
                self.store(fence, kind, Some(uid), None).await?;
            }
        }
        Ok(())
    }
}

/// Waits until the lease is held and returns the epoch; `None` when its keeper stopped.
pub(crate) async fn next_holding(held: &mut watch::Receiver<Option<Held>>) -> Option<Epoch> {
    let state = held.wait_for(Option::is_some).await.ok()?;
    state.map(|held| held.epoch)
}

/// Waits until the holding at `epoch` ends (lost, or the keeper stopped).
async fn lost(held: &mut watch::Receiver<Option<Held>>, epoch: Epoch) {
    let _ = held
        .wait_for(|state| state.map(|held| held.epoch) != Some(epoch))
        .await
        .map(drop);
}

#[cfg(test)]
mod tests {
    #[test]
    fn lease_names_name_the_cluster() {
        assert_eq!(super::lease_name("dev"), "watcher/clusters/dev");
    }
}
