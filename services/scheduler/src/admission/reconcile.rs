//! The background loop that reconciles admitted reservations with the pods of every cluster: an admitted
//! workload that has had no unfinished pod (bound or waiting) carrying its annotation for longer than the grace
//! period, at two passes in a row, is released, so a workload deleted without `Release` does not hold its quota
//! forever. It is the only writer of the suspects it keeps between passes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use cube_clusters::ClusterRegistry;
use cube_kit::ApiError;
use cube_kit::task::Background;
use cube_kit::time::unix_ms;

use super::store::{Store, retrying};
use crate::inventory::Fleet;
use crate::model::reservation;

/// How long a reconciliation waits for a cluster's first lists of nodes and pods.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconciles reservations with pods.
pub(super) struct Reconciler {
    pub(super) store: Arc<Store>,
    pub(super) registry: ClusterRegistry,
    pub(super) fleet: Arc<Fleet>,
    /// How long an admitted workload may have no pod before its reservation is released.
    pub(super) grace: Duration,
    /// Admitted workloads the last pass found without pods, with their admission times.
    pub(super) suspects: Mutex<HashMap<String, i64>>,
}

impl Reconciler {
    /// Reconciles every `interval` until the returned task is dropped.
    pub(super) fn every(self: Arc<Self>, interval: Duration) -> Background {
        Background::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = self.once(SystemTime::now()).await {
                    tracing::warn!(%error, "reconciling reservations with pods");
                }
            }
        })
    }

    /// One reconciliation: releases the admitted reservations older than the grace period whose workload has
    /// had no unfinished pod (bound or waiting) in any cluster at this pass and the one before, and returns
    /// their workloads. Does nothing unless every registered cluster is watched and listed: a partial view of
    /// the pods would release reservations whose pods merely were not seen.
    ///
    /// # Errors
    /// Returns an error when the database fails.
    pub(super) async fn once(&self, now: SystemTime) -> Result<Vec<String>, ApiError> {
        let mut live = BTreeSet::new();
        for cluster in self.registry.names() {
            let seen = match self.fleet.ready(&cluster, READY_TIMEOUT).await {
                Ok(()) => self.fleet.workloads(&cluster),
                Err(error) => Err(error),
            };
            match seen {
                Ok(workloads) => live.extend(workloads),
                Err(error) => {
                    tracing::debug!(%cluster, %error, "reservations not reconciled: a cluster's pods are not watched");
                    self.suspects.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    return Ok(Vec::new());
                }
            }
        }
        let grace = i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX);
        let cutoff = unix_ms(now).saturating_sub(grace);
        let old = self.store.admitted_before(cutoff).await?;
        // A run's own admission has no pods (its tasks have them): it is released by the run's end only.
        let missing: Vec<reservation::Model> = old
            .into_iter()
            .filter(|row| row.kind != "run" && !live.contains(&row.workload))
            .collect();
        let confirmed: Vec<&reservation::Model> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(PoisonError::into_inner);
            let confirmed = missing
                .iter()
                .filter(|row| suspects.get(&row.workload) == Some(&row.created_ms))
                .collect();
            *suspects = missing
                .iter()
                .map(|row| (row.workload.clone(), row.created_ms))
                .collect();
            confirmed
        };
        let mut released = Vec::new();
        for row in confirmed {
            if retrying(|| self.store.release_row(row)).await? {
                tracing::info!(
                    workload = %row.workload,
                    project = %row.project,
                    user = %row.username,
                    "released a reservation whose workload has no pod left"
                );
                released.push(row.workload.clone());
            }
        }
        Ok(released)
    }
}
