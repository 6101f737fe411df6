//! What a workload is doing: [`WorkloadStatus`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::spec::ObjectKey;

/// Where a workload is in its life, as a pod's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Accepted, not running yet (not bound, pulling, waiting for a free slot).
    Pending,
    /// At least one container runs.
    Running,
    /// Every container exited 0 and none is started again.
    Succeeded,
    /// A container exited non-zero (or was killed, or lost) and is not started again.
    Failed,
    /// The state cannot be told (a node stopped reporting).
    Unknown,
}

impl Phase {
    /// Whether nothing more will happen to the workload.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The reasons a status names, besides the cluster's own.
pub mod reasons {
    /// A local process that was running when the process owning it stopped, and had died when it came back: its
    /// exit code is unknown.
    pub const LOST: &str = "Lost";
    /// Killed for using more memory than its limit.
    pub const OOM_KILLED: &str = "OOMKilled";
    /// Stopped at its deadline.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// Deleted.
    pub const DELETED: &str = "Deleted";
}

/// A workload's status at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// Which workload.
    pub key: ObjectKey,
    /// Its labels, as applied.
    pub labels: BTreeMap<String, String>,
    /// Its phase.
    pub phase: Phase,
    /// Whether it is ready to serve (all containers ready).
    pub ready: bool,
    /// Why it is in this phase, when something tells: `OOMKilled`, `ImagePullBackOff`, `Evicted`, `Lost`,
    /// `DeadlineExceeded`, `Error`, `Completed`.
    pub reason: Option<String>,
    /// A human-readable message with the reason.
    pub message: Option<String>,
    /// The main container's exit code, once it exited.
    pub exit_code: Option<i32>,
    /// How many times the containers were started again, summed.
    pub restarts: u32,
    /// The node it runs on (the machine's host name for local workloads).
    pub node: Option<String>,
    /// The address it is reached at: the pod IP, or `127.0.0.1` for local workloads.
    pub address: Option<String>,
    /// Its ports by name: the container port on Kubernetes, the port the local runtime chose locally.
    pub ports: BTreeMap<String, u16>,
    /// When its main container started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its final phase.
    pub finished_at: Option<DateTime<Utc>>,
    /// The version of the source this status was read from: the object's `resourceVersion`, or the local runtime's
    /// sequence number (increasing with every change it reports).
    pub version: String,
    /// For objects with replicas (Deployments): how many are ready.
    #[serde(default)]
    pub ready_replicas: Option<u32>,
}

impl WorkloadStatus {
    /// A status of `key` in `phase` with nothing else known.
    pub fn new(key: ObjectKey, phase: Phase) -> Self {
        Self {
            key,
            labels: BTreeMap::new(),
            phase,
            ready: false,
            reason: None,
            message: None,
            exit_code: None,
            restarts: 0,
            node: None,
            address: None,
            ports: BTreeMap::new(),
            started_at: None,
            finished_at: None,
            version: String::new(),
            ready_replicas: None,
        }
    }
}
