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
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt as _};
use sea_orm::DatabaseConnection;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::live::Live;
use crate::status::{deployment_status, node_status};
use crate::store::{self, Change, Fence, Position, StoreError};

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

    /// Follows the objects of kind `K` (those carrying `labels`, when given) until a change cannot be stored:
    /// resumes from where the last watch got to (so that every change since is seen, one by one), and lists
    /// afresh when there is no such place or the API server no longer has it (`410 Gone`).
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
        let api: Api<K> = Api::all(self.client.clone());
        let follow = Follow {
            api: &api,
            fence,
            kind,
            labels,
            status_of,
        };
        let mut position = match store::position(&self.db, &self.cluster, kind).await {
            Ok(position) => position,
            Err(error) => return error,
        };
        loop {
            let version = match position.take() {
                Some(version) => version,
                None => match self.list(&follow).await {
                    Ok(version) => version,
                    Err(Stop::Store(error)) => return error,
                    Err(Stop::Kube(error)) => {
                        tracing::warn!(cluster = %self.cluster, ?kind, %error, "listing; trying again");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            };
            position = match self.follow(&follow, version).await {
                Ok(Followed::Until(version)) => Some(version),
                Ok(Followed::Gone) => {
                    tracing::info!(cluster = %self.cluster, ?kind, "the watch's place is gone (410); listing afresh");
                    None
                }
                Ok(Followed::Failed(version, error)) => {
                    tracing::warn!(cluster = %self.cluster, ?kind, %error, "watching; resuming");
                    tokio::time::sleep(RETRY).await;
                    Some(version)
                }
                Err(error) => return error,
            };
        }
    }

    /// Lists every object (a page at a time, from one snapshot), records each, records those known but not
    /// listed as gone, and returns the snapshot's resourceVersion, remembered as the watch's place.
    async fn list<K>(&self, follow: &Follow<'_, K>) -> Result<String, Stop>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let mut params = ListParams::default().limit(LIST_PAGE);
        if let Some(labels) = follow.labels {
            params = params.labels(labels);
        }
        let mut listed = HashSet::new();
        let mut snapshot = None;
        loop {
            let page = follow.api.list(&params).await.map_err(Stop::Kube)?;
            snapshot = snapshot.or(page.metadata.resource_version.clone());
            let changes: Vec<Change> = page
                .items
                .iter()
                .filter_map(|object| {
                    let uid = object.uid()?;
                    listed.insert(uid.clone());
                    Some(Change {
                        uid,
                        status: Some((follow.status_of)(&self.cluster, object)),
                    })
                })
                .collect();
            self.store(follow.fence, follow.kind, &changes, None)
                .await
                .map_err(Stop::Store)?;
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params.continue_token = Some(token),
                _ => break,
            }
        }
        self.vanished(follow.fence, follow.kind, &listed)
            .await
            .map_err(Stop::Store)?;
        let version = snapshot.unwrap_or_default();
        let position = Position {
            cluster: &self.cluster,
            kind: follow.kind,
            resource_version: &version,
        };
        store::save_position(&self.db, &position).await.map_err(Stop::Store)?;
        Ok(version)
    }

    /// Watches from `version` until the API server ends the watch, it fails, or `version` is gone; records each
    /// change with the place it was read at.
    async fn follow<K>(&self, follow: &Follow<'_, K>, mut version: String) -> Result<Followed, StoreError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let mut params = WatchParams::default().timeout(WATCH_SECONDS);
        if let Some(labels) = follow.labels {
            params = params.labels(labels);
        }
        let mut changes = match follow.api.watch(&params, &version).await {
            Ok(changes) => changes.boxed().fuse(),
            Err(kube::Error::Api(status)) if status.code == 410 => return Ok(Followed::Gone),
            Err(error) => return Ok(Followed::Failed(version, error.to_string())),
        };
        let mut saved = Instant::now();
        while let Some(first) = changes.next().await {
            // What else arrives within `LINGER` is recorded with it, in one transaction (a group commit): under a
            // stream of changes that is one commit, one relay pass and one wake of the streams per batch.
            let mut arrived = vec![first];
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while arrived.len() < BATCH {
                tokio::select! {
                    biased;
                    more = changes.next() => match more {
                        Some(more) => arrived.push(more),
                        None => break,
                    },
                    () = &mut linger => break,
                }
            }
            let mut batch = Vec::with_capacity(arrived.len());
            let mut ended = None;
            for change in arrived {
                let (object, gone) = match change {
                    Ok(WatchEvent::Added(object) | WatchEvent::Modified(object)) => (object, false),
                    Ok(WatchEvent::Deleted(object)) => (object, true),
                    Ok(WatchEvent::Bookmark(bookmark)) => {
                        version = bookmark.metadata.resource_version;
                        continue;
                    }
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        ended = Some(Followed::Gone);
                        break;
                    }
                    // `version` is the place after the changes read before it, which are recorded below.
                    Ok(WatchEvent::Error(status)) => {
                        ended = Some(Followed::Failed(version.clone(), status.message));
                        break;
                    }
                    Err(error) => {
                        ended = Some(Followed::Failed(version.clone(), error.to_string()));
                        break;
                    }
                };
                let (Some(read_at), Some(uid)) = (object.resource_version(), object.uid()) else {
                    continue;
                };
                let status = (!gone).then(|| (follow.status_of)(&self.cluster, &object));
                batch.push(Change { uid, status });
                version = read_at;
            }
            // The changes read before an error are recorded; the watch then resumes after them.
            let position = Position {
                cluster: &self.cluster,
                kind: follow.kind,
                resource_version: &version,
            };
            let recorded = self.store(follow.fence, follow.kind, &batch, Some(&position)).await?;
            // Changes that were no transition move the place too, remembered now and then: resuming a little
            // early only reads changes again that compare equal.
            if !recorded && saved.elapsed() >= SAVE_EVERY {
                store::save_position(&self.db, &position).await?;
                saved = Instant::now();
            }
            if let Some(ended) = ended {
                return Ok(ended);
            }
        }
        Ok(Followed::Until(version))
    }

    /// Records what objects now are, and the watch's place with them when there was a transition; wakes the
    /// relay and the streams then, and says whether there was one.
    async fn store(
        &self,
        fence: Fence<'_>,
        kind: ObjectKind,
        changes: &[Change],
        position: Option<&Position<'_>>,
    ) -> Result<bool, StoreError> {
        if changes.is_empty() {
            return Ok(false);
        }
        let events = store::record(&self.db, fence, kind, changes, position).await?;
        if events.is_empty() {
            return Ok(false);
        }
        tracing::debug!(transitions = events.len(), "recorded");
        self.relay.notify_one();
        self.live.recorded();
        Ok(true)
    }

    /// After a list: the objects of `kind` known but not listed are gone.
    async fn vanished(&self, fence: Fence<'_>, kind: ObjectKind, listed: &HashSet<String>) -> Result<(), StoreError> {
        let gone: Vec<Change> = store::known(&self.db, &self.cluster, kind)
            .await?
            .into_iter()
            .filter(|uid| !listed.contains(uid))
            .map(|uid| Change { uid, status: None })
            .collect();
        for chunk in gone.chunks(BATCH) {
            self.store(fence, kind, chunk, None).await?;
        }
        Ok(())
    }
}

/// What one kind's watch reads, and how.
struct Follow<'a, K> {
    api: &'a Api<K>,
    fence: Fence<'a>,
    kind: ObjectKind,
    labels: Option<&'a str>,
    status_of: fn(&str, &K) -> WorkloadStatus,
}

/// How a watch ended.
enum Followed {
    /// The API server closed it (its timeout); resume from this version.
    Until(String),
    /// The place it was resumed from is no longer kept: list afresh.
    Gone,
    /// It failed; resume from this version after a pause.
    Failed(String, String),
}

/// Why a list stopped.
enum Stop {
    /// A change could not be stored: the watch stops.
    Store(StoreError),
    /// The API server could not be read: try again.
    Kube(kube::Error),
}

/// The pause before a failed list or watch is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// The most changes recorded in one transaction.
const BATCH: usize = 256;

/// How long the first change of a batch waits for others to arrive.
const LINGER: Duration = Duration::from_millis(10);

/// How many objects a list reads at a time.
const LIST_PAGE: u32 = 500;
/// How long the API server keeps a watch open before the watcher opens the next one.
const WATCH_SECONDS: u32 = 290;
/// How often the place of a watch reading no transitions is remembered.
const SAVE_EVERY: Duration = Duration::from_secs(1);

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
