//! Watching one cluster's pods: while this replica holds the cluster's lease, every pod Cube made
//! (`app.kubernetes.io/managed-by=cube`) is followed, each change compared with the last published state and
//! turned into a transition. A (re)list — at the start, after a restart of the watch, after `410 Gone` — publishes
//! nothing for pods that did not change, what changed meanwhile, and deletion for pods that vanished meanwhile.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cube_kit::lease::{Epoch, Held, Lease};
use cube_proto::cube::watcher::v1::ObjectKind;
use cube_runtime::kubernetes::pod_status;
use cube_runtime::labels;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, watch};

use crate::store::{self, Fence, StoreError};

/// The name of the lease that makes one replica the watcher of `cluster`'s pods.
pub fn lease_name(cluster: &str) -> String {
    format!("watcher/clusters/{cluster}/pods")
}

/// What a pod watch needs.
pub(crate) struct PodWatch {
    pub(crate) cluster: String,
    pub(crate) client: Client,
    pub(crate) db: DatabaseConnection,
    /// Wakes the outbox relay after each stored transition.
    pub(crate) relay: Arc<Notify>,
    /// This replica's name as a lease holder.
    pub(crate) holder: String,
    /// How long a holding lasts without renewal.
    pub(crate) lease_duration: Duration,
}

impl PodWatch {
    /// Runs until aborted: waits for the cluster's lease, watches while it holds it, and starts over when it loses
    /// it or the watch fails.
    pub(crate) async fn run(self) {
        let name = lease_name(&self.cluster);
        let keeper = Lease::new(name.clone(), self.holder.clone(), self.lease_duration).keep(self.db.clone());
        let mut held = keeper.watch();
        loop {
            let Some(epoch) = next_holding(&mut held).await else {
                return;
            };
            tracing::info!(cluster = %self.cluster, %epoch, "watching the cluster's pods");
            let fence = Fence { lease: &name, epoch };
            tokio::select! {
                // The lease is lost (or changed hands): stop writing at once; the fence refuses late writes anyway.
                () = lost(&mut held, epoch) => {
                    tracing::info!(cluster = %self.cluster, "lost the cluster's lease; standing by");
                }
                error = self.watch(fence) => {
                    tracing::warn!(cluster = %self.cluster, %error, "the pod watch stopped; starting over");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Follows the pods until a change cannot be stored.
    async fn watch(&self, fence: Fence<'_>) -> StoreError {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::CUBE));
        let mut events = watcher(pods, config).default_backoff().boxed();
        let mut listed: Option<HashSet<String>> = None;
        while let Some(event) = events.next().await {
            let result = match event {
                Ok(watcher::Event::Init) => {
                    listed = Some(HashSet::new());
                    Ok(())
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(listed), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                        listed.insert(uid);
                    }
                    self.apply(fence, &pod).await
                }
                Ok(watcher::Event::InitDone) => match listed.take() {
                    Some(listed) => self.vanished(fence, &listed).await,
                    None => Ok(()),
                },
                Ok(watcher::Event::Apply(pod)) => self.apply(fence, &pod).await,
                Ok(watcher::Event::Delete(pod)) => self.delete(fence, &pod).await,
                Err(error) => {
                    // The backoff paces the retries; the next (re)list reconciles what was missed.
                    tracing::warn!(cluster = %self.cluster, %error, "watching pods");
                    Ok(())
                }
            };
            if let Err(error) = result {
                return error;
            }
        }
        StoreError::Database(sea_orm::DbErr::Custom("the pod watch ended".into()))
    }

    async fn apply(&self, fence: Fence<'_>, pod: &Pod) -> Result<(), StoreError> {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return Ok(());
        };
        let status = pod_status(&self.cluster, pod);
        if let Some(event) = store::record(&self.db, fence, ObjectKind::Pod, uid, Some(&status)).await? {
            tracing::debug!(id = %event.id, "pod transition");
            self.relay.notify_one();
        }
        Ok(())
    }

    async fn delete(&self, fence: Fence<'_>, pod: &Pod) -> Result<(), StoreError> {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return Ok(());
        };
        if store::record(&self.db, fence, ObjectKind::Pod, uid, None)
            .await?
            .is_some()
        {
            self.relay.notify_one();
        }
        Ok(())
    }

    /// After a list: the pods known but not listed are gone.
    async fn vanished(&self, fence: Fence<'_>, listed: &HashSet<String>) -> Result<(), StoreError> {
        for uid in store::known(&self.db, &self.cluster, ObjectKind::Pod).await? {
            if !listed.contains(&uid)
                && store::record(&self.db, fence, ObjectKind::Pod, &uid, None)
                    .await?
                    .is_some()
            {
                self.relay.notify_one();
            }
        }
        Ok(())
    }
}

/// Waits until the lease is held and returns the epoch; `None` when its keeper stopped.
async fn next_holding(held: &mut watch::Receiver<Option<Held>>) -> Option<Epoch> {
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
        assert_eq!(super::lease_name("dev"), "watcher/clusters/dev/pods");
    }
}
