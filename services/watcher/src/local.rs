//! The local runtime's processes (`cube up`) as transitions: each status it reports is compared with the last
//! one recorded, exactly like a Pod's, so the same events are stored, streamed and published on a laptop. The
//! runtime reports again what it adopts after a restart; unchanged processes publish nothing.

use std::time::Duration;

use cube_kit::lease::Lease;
use cube_proto::cube::watcher::v1::ObjectKind;
use cube_runtime::{StatusStream, WorkloadStatus, reasons};
use futures::StreamExt as _;

use crate::cluster::{lease_name, next_holding};
use crate::fleet::Shared;
use crate::store::{self, Change, Fence};

/// The uid a local process's workload is recorded under: its key, which names one workload at a time.
pub(crate) fn uid(status: &WorkloadStatus) -> String {
    let key = &status.key;
    format!("{}/{}/{}", key.cluster, key.namespace, key.name)
}

/// Runs until the runtime's statuses end: records each, holding the lease of the local runtime's cluster.
pub(crate) async fn follow(cluster: String, mut statuses: StatusStream, shared: Shared) {
    let name = lease_name(&cluster);
    let keeper = Lease::new(name.clone(), shared.holder.clone(), shared.lease_duration).keep(shared.db.clone());
    let mut held = keeper.watch();
    while let Some(status) = statuses.next().await {
        let uid = uid(&status);
        // A deleted workload's last status says so; it is recorded as gone.
        let deleted = status.reason.as_deref() == Some(reasons::DELETED);
        let change = [Change {
            uid: uid.clone(),
            status: (!deleted).then_some(status),
        }];
        loop {
            let Some(epoch) = next_holding(&mut held).await else {
                return;
            };
            match store::record(
                &shared.db,
                Fence { lease: &name, epoch },
                ObjectKind::LocalProcess,
                &change,
                None,
            )
            .await
            {
                Ok(recorded) => {
                    if !recorded.is_empty() {
                        shared.relay.notify_one();
                        shared.live.recorded();
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(%uid, %error, "recording a local process's status; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
