//! Runs workloads on a cluster: one interface ([`Runtime`]) and two implementations, chosen per cluster.
//!
//! A domain service describes what to run as a [`WorkloadSpec`] (containers, volumes in cube-studio's syntax, the
//! scheduler's `Placement`, labels, restart policy, deadline, owner) and never builds Kubernetes objects itself:
//! - `kubernetes`: server-side apply with field manager `cube` on a cluster's API server (Pods, and the Services,
//!   ConfigMaps, Secrets, Deployments, HorizontalPodAutoscalers and Istio VirtualServices notebooks and serving
//!   need);
//! - `local`: each workload is a child process in its own process group under `--data-dir/workloads`, adopted
//!   again after a restart of the process that owns it, and reported `Lost` when it died meanwhile.
//!
//! Both are idempotent by name: applying a spec whose object exists changes nothing that is running (a pod's spec
//! cannot change; a local process is never started twice), so a service may record an attempt, then apply it, and
//! after a crash apply it again.

mod error;
pub mod kubernetes;
pub mod local;
mod runtimes;
mod spec;
mod status;
pub mod transition;
pub mod volumes;

pub use error::RuntimeError;
pub use local::LocalRuntime;
pub use runtimes::{ClusterRuntime, Runtimes};
pub use spec::{Container, ObjectKey, Owner, PodField, Port, RestartPolicy, WorkloadSpec, labels};
pub use status::{Phase, WorkloadStatus, reasons};

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

/// A stream of a workload's output (stdout and stderr as they were written), ending when the workload ends when
/// followed, or at the end of what was written so far otherwise.
pub type LogStream = BoxStream<'static, Result<Bytes, RuntimeError>>;

/// A stream of workload status changes, one item per change.
pub type StatusStream = BoxStream<'static, WorkloadStatus>;

/// What runs workloads on one cluster.
pub trait Runtime: Send + Sync {
    /// Creates the workload `spec` describes unless an object of its key exists (then nothing changes), and returns
    /// its status. Applying the same spec twice creates one object.
    fn apply(&self, spec: &WorkloadSpec) -> impl Future<Output = Result<WorkloadStatus, RuntimeError>> + Send;

    /// Deletes a workload, giving its processes `grace` to stop (`Duration::ZERO` kills at once and removes the
    /// object even when no node agent confirms it). Returns whether it existed.
    fn delete(&self, key: &ObjectKey, grace: Duration) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// The status of a workload, or `None` when there is none of that key.
    fn status(&self, key: &ObjectKey) -> impl Future<Output = Result<Option<WorkloadStatus>, RuntimeError>> + Send;

    /// Every workload of `namespace` (every namespace when `None`) on `cluster` that carries all of `labels`, for
    /// reconciling after a restart.
    fn list(
        &self,
        cluster: &str,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<WorkloadStatus>, RuntimeError>> + Send;

    /// A workload's output; with `follow`, the stream goes on while the workload runs.
    fn logs(&self, key: &ObjectKey, follow: bool) -> impl Future<Output = Result<LogStream, RuntimeError>> + Send;
}
