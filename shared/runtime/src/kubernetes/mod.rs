//! The Kubernetes runtime: workloads are Pods made by server-side apply (field manager `cube`) on one cluster's API
//! server, and the objects notebooks and serving need around them (Services, ConfigMaps, Secrets, Deployments,
//! HorizontalPodAutoscalers, Istio VirtualServices) are built here from typed inputs and applied the same way.
//!
//! Builders are plain functions ([`pod`], [`deployment`], [`service`], [`autoscaler`], [`virtual_service`], ...)
//! so their output can be checked without a cluster; [`KubernetesRuntime`] applies them.

pub mod autoscaling;
pub mod istio;
mod metadata;
mod objects;
mod pod;
mod status;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt as _, StreamExt as _};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tracing::{debug, info};

pub use autoscaling::{Autoscaling, api_resource as autoscaling_resource, autoscaler};
pub use istio::{Destination, VirtualService, api_resource as virtual_service_resource, virtual_service};
pub use metadata::{Metadata, owner_of};
pub use objects::{
    DOCKER_CONFIG_JSON_KEY, DOCKER_CONFIG_JSON_TYPE, config_map, deployment, image_pull_secret, secret, service,
};
pub use pod::{pod, pod_template};
pub use status::pod_status;

use crate::error::RuntimeError;
use crate::spec::{ObjectKey, WorkloadSpec};
use crate::status::WorkloadStatus;
use crate::{LogStream, Runtime};

/// The field manager of every server-side apply Cube makes.
pub const FIELD_MANAGER: &str = "cube";

/// How long [`Runtime::logs`] waits for the API server to reach the pod's node by default.
pub const DEFAULT_LOG_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes of log a stream item holds at most.
const LOG_CHUNK: usize = 8 * 1024;

/// Runs workloads as Pods on one Kubernetes cluster, and applies the objects around them.
#[derive(Clone)]
pub struct KubernetesRuntime {
    cluster: String,
    client: Client,
    log_timeout: Duration,
    autoscaling: std::sync::Arc<OnceCell<ApiResource>>,
}

impl Debug for KubernetesRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesRuntime")
            .field("cluster", &self.cluster)
            .field("log_timeout", &self.log_timeout)
            .finish_non_exhaustive()
    }
}

impl KubernetesRuntime {
    /// A runtime of the cluster the registry names `cluster`, reached with `client`.
    pub fn new(cluster: &str, client: Client) -> Self {
        Self {
            cluster: cluster.to_owned(),
            client,
            log_timeout: DEFAULT_LOG_TIMEOUT,
            autoscaling: std::sync::Arc::default(),
        }
    }

    /// The same runtime waiting at most `timeout` for a pod's node to answer for its logs.
    #[must_use]
    pub fn with_log_timeout(mut self, timeout: Duration) -> Self {
        self.log_timeout = timeout;
        self
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The client of the cluster's API server.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Applies `object` (built by this module's builders) with server-side apply, taking over the fields it sets,
    /// and returns it as the API server stored it.
    pub async fn apply_object<K>(&self, object: &K) -> Result<K, RuntimeError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        let key = self.key_of(object.meta())?;
        let api = Api::<K>::namespaced(self.client.clone(), &key.namespace);
        let applied = api
            .patch(&key.name, &apply_params(), &Patch::Apply(object))
            .await
            .map_err(|error| api_error(error, &key))?;
        info!(%key, kind = %K::kind(&()), "applied");
        Ok(applied)
    }

    /// Deletes the object of kind `K` at `key`; the objects it owns are collected after it in the background.
    /// Returns whether it existed.
    pub async fn delete_object<K>(&self, key: &ObjectKey) -> Result<bool, RuntimeError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        self.check_cluster(&key.cluster)?;
        let api = Api::<K>::namespaced(self.client.clone(), &key.namespace);
        match api.delete(&key.name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(%key, kind = %K::kind(&()), "deleted");
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
            Err(error) => Err(api_error(error, key)),
        }
    }

    /// Applies `object`, of `resource`, with server-side apply, and returns it as the API server stored it.
    pub async fn apply_dynamic(
        &self,
        object: &DynamicObject,
        resource: &ApiResource,
    ) -> Result<DynamicObject, RuntimeError> {
        let key = self.key_of(&object.metadata)?;
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.namespace, resource);
        let applied = api
            .patch(&key.name, &apply_params(), &Patch::Apply(object))
            .await
            .map_err(|error| api_error(error, &key))?;
        info!(%key, kind = %resource.kind, version = %resource.version, "applied");
        Ok(applied)
    }

    /// The HorizontalPodAutoscaler resource the API server serves, `autoscaling/v2` or else `autoscaling/v2beta2`,
    /// found by discovery once and remembered.
    ///
    /// Fails with [`RuntimeError::Refused`] when it serves neither.
    pub async fn autoscaling_resource(&self) -> Result<ApiResource, RuntimeError> {
        let resource = self
            .autoscaling
            .get_or_try_init(|| async {
                let groups = self
                    .client
                    .list_api_groups()
                    .await
                    .map_err(|error| api_error(error, &self.key("", "autoscaling")))?;
                let served: Vec<String> = groups
                    .groups
                    .iter()
                    .filter(|group| group.name == autoscaling::GROUP)
                    .flat_map(|group| group.versions.iter().map(|v| v.version.clone()))
                    .collect();
                let version = autoscaling_version(&served).ok_or_else(|| {
                    RuntimeError::Refused(format!(
                        "cluster {} serves autoscaling {served:?}, none of {:?}",
                        self.cluster,
                        autoscaling::VERSIONS
                    ))
                })?;
                debug!(cluster = %self.cluster, version, "horizontal pod autoscalers");
                Ok::<_, RuntimeError>(autoscaling_resource(version))
            })
            .await?;
        Ok(resource.clone())
    }

    /// Applies a HorizontalPodAutoscaler named as `meta` says for the Deployment `deployment`, in the version the
    /// API server serves (see [`KubernetesRuntime::autoscaling_resource`]).
    pub async fn apply_autoscaler(
        &self,
        meta: &Metadata,
        deployment: &str,
        scaling: Autoscaling,
    ) -> Result<DynamicObject, RuntimeError> {
        let resource = self.autoscaling_resource().await?;
        let object = autoscaler(&resource, meta, deployment, scaling)?;
        self.apply_dynamic(&object, &resource).await
    }

    /// Applies an Istio VirtualService named as `meta` says (its CRD from `k8s/crds/` must be installed).
    pub async fn apply_virtual_service(
        &self,
        meta: &Metadata,
        routes: &VirtualService,
    ) -> Result<DynamicObject, RuntimeError> {
        let object = virtual_service(meta, routes)?;
        self.apply_dynamic(&object, &virtual_service_resource()).await
    }

    /// The key of `name` in `namespace` of this cluster.
    fn key(&self, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey::new(&self.cluster, namespace, name)
    }

    /// The key of an object to apply, which must have a name and namespace.
    fn key_of(
        &self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Result<ObjectKey, RuntimeError> {
        match (&meta.namespace, &meta.name) {
            (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => Ok(self.key(namespace, name)),
            _ => Err(RuntimeError::Invalid {
                field: "metadata".to_owned(),
                message: "has no name or namespace; build objects with this module's builders".to_owned(),
            }),
        }
    }

    /// Fails unless `cluster` is this runtime's.
    fn check_cluster(&self, cluster: &str) -> Result<(), RuntimeError> {
        if cluster == self.cluster {
            return Ok(());
        }
        Err(RuntimeError::Invalid {
            field: "cluster".to_owned(),
            message: format!(
                "is {cluster:?}; this runtime runs workloads on cluster {:?}",
                self.cluster
            ),
        })
    }

    /// The pods of the namespace of `key`.
    fn pods(&self, key: &ObjectKey) -> Result<Api<Pod>, RuntimeError> {
        self.check_cluster(&key.cluster)?;
        Ok(Api::namespaced(self.client.clone(), &key.namespace))
    }
}

impl Runtime for KubernetesRuntime {
    /// Reads the pod first and returns its status when it exists (a pod's spec cannot change); otherwise creates it
    /// by server-side apply, which is idempotent when two callers race with the same spec.
    async fn apply(&self, spec: &WorkloadSpec) -> Result<WorkloadStatus, RuntimeError> {
        let pods = self.pods(&spec.key)?;
        let pod = pod(spec)?;
        let key = &spec.key;
        // A pod is never changed once made: one create (far cheaper for the API server than a server-side
        // apply), and the pod already there when its name is taken.
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match pods.create(&params, &pod).await {
            Ok(created) => {
                info!(%key, "pod created");
                Ok(pod_status(&self.cluster, &created))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = pods.get(&key.name).await.map_err(|error| api_error(error, key))?;
                debug!(%key, "pod exists");
                Ok(pod_status(&self.cluster, &existing))
            }
            Err(error) => Err(api_error(error, key)),
        }
    }

    async fn delete(&self, key: &ObjectKey, grace: Duration) -> Result<bool, RuntimeError> {
        let pods = self.pods(key)?;
        // Kubernetes counts whole seconds: a grace period is never shortened, and only zero removes at once.
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let params = DeleteParams::default().grace_period(u32::try_from(seconds).unwrap_or(u32::MAX));
        match pods.delete(&key.name, &params).await {
            Ok(_) => {
                info!(%key, grace_seconds = seconds, "pod deleted");
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
            Err(error) => Err(api_error(error, key)),
        }
    }

    async fn status(&self, key: &ObjectKey) -> Result<Option<WorkloadStatus>, RuntimeError> {
        let pods = self.pods(key)?;
        let pod = pods.get_opt(&key.name).await.map_err(|error| api_error(error, key))?;
        Ok(pod.map(|pod| pod_status(&self.cluster, &pod)))
    }

    async fn list(
        &self,
        cluster: &str,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        self.check_cluster(cluster)?;
        let pods: Api<Pod> = match namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        };
        let selector = label_selector(labels)?;
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|error| api_error(error, &self.key(namespace.unwrap_or_default(), "")))?;
        Ok(listed.items.iter().map(|pod| pod_status(&self.cluster, pod)).collect())
    }

    /// Streams the main container's log through the API server, which reads it from the pod's kubelet. When the
    /// kubelet cannot be reached (a node without one, a pod not started yet), fails with
    /// [`RuntimeError::Unavailable`] after at most the log timeout (see [`KubernetesRuntime::with_log_timeout`]).
    async fn logs(&self, key: &ObjectKey, follow: bool) -> Result<LogStream, RuntimeError> {
        let pods = self.pods(key)?;
        let pod = pods
            .get_opt(&key.name)
            .await
            .map_err(|error| api_error(error, key))?
            .ok_or_else(|| RuntimeError::NotFound(key.clone()))?;
        let spec = pod.spec.as_ref();
        let params = LogParams {
            follow,
            container: spec.and_then(|s| s.containers.first()).map(|c| c.name.clone()),
            ..LogParams::default()
        };
        // The API server answers an empty log, not an error, for a pod on no node.
        let Some(node) = spec.and_then(|s| s.node_name.clone()).filter(|node| !node.is_empty()) else {
            return Err(RuntimeError::Unavailable(format!(
                "the logs of {key}: it is not on a node yet, so it has no output"
            )));
        };
        let reader = match tokio::time::timeout(self.log_timeout, pods.log_stream(&key.name, &params)).await {
            Err(_) => {
                return Err(RuntimeError::Unavailable(format!(
                    "the logs of {key}: node {node:?} did not answer within {:?}; is its kubelet running?",
                    self.log_timeout
                )));
            }
            Ok(Err(kube::Error::Api(status))) if status.is_not_found() => {
                return Err(RuntimeError::NotFound(key.clone()));
            }
            Ok(Err(error)) => {
                return Err(RuntimeError::Unavailable(format!(
                    "the logs of {key} cannot be read from node {node:?}: {}",
                    api_message(&error)
                )));
            }
            Ok(Ok(reader)) => reader,
        };
        let key = key.clone();
        let stream = futures::stream::try_unfold(Box::pin(reader), move |mut reader| {
            let key = key.clone();
            async move {
                let mut buffer = vec![0; LOG_CHUNK];
                let read = reader
                    .read(&mut buffer)
                    .await
                    .map_err(|error| RuntimeError::Unavailable(format!("reading the logs of {key}: {error}")))?;
                if read == 0 {
                    return Ok(None);
                }
                buffer.truncate(read);
                Ok(Some((Bytes::from(buffer), reader)))
            }
        });
        Ok(stream.boxed())
    }
}

/// The parameters of every server-side apply: field manager `cube`, taking over fields another manager set.
fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// The version of `autoscaling` to write, of those the API server serves: the first of
/// [`autoscaling::VERSIONS`] it serves.
pub fn autoscaling_version(served: &[String]) -> Option<&'static str> {
    autoscaling::VERSIONS
        .into_iter()
        .find(|version| served.iter().any(|served| served == version))
}

/// The label selector `k=v,...` of `labels`.
///
/// Fails with [`RuntimeError::Invalid`] naming `labels` when a key or value holds a character a selector cannot.
fn label_selector(labels: &BTreeMap<String, String>) -> Result<String, RuntimeError> {
    let mut pairs = Vec::with_capacity(labels.len());
    for (key, value) in labels {
        let bad = |text: &str| text.contains([',', '=', '!', ' ', '(', ')']);
        if key.is_empty() || bad(key) || bad(value) {
            return Err(RuntimeError::Invalid {
                field: "labels".to_owned(),
                message: format!(
                    "{key:?}={value:?} is not a label; keys and values are letters, digits, '-', '_', '.' \
                     (and '/' in keys)"
                ),
            });
        }
        pairs.push(format!("{key}={value}"));
    }
    Ok(pairs.join(","))
}

/// The API server's message of `error`, or the error itself when it is not the API server's.
fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

/// What an error of the API server (or of reaching it) about `key` means to a caller.
fn api_error(error: kube::Error, key: &ObjectKey) -> RuntimeError {
    match &error {
        kube::Error::Api(status) if status.is_not_found() => RuntimeError::NotFound(key.clone()),
        kube::Error::Api(status) if status.is_invalid() || status.code == 400 => RuntimeError::Invalid {
            field: "spec".to_owned(),
            message: format!("{key}: {}", status.message),
        },
        kube::Error::Api(status) if matches!(status.code, 429 | 500 | 502 | 503 | 504) => {
            RuntimeError::Unavailable(format!("{key}: {}", api_message(&error)))
        }
        kube::Error::Api(_) => RuntimeError::Refused(format!("{key}: {}", api_message(&error))),
        _ => RuntimeError::Unavailable(format!("{key}: {error}")),
    }
}
