//! The Kubernetes side of the test environment: clients of its kube-apiserver, fake nodes and namespaces that
//! clean up after themselves, and a fake kubelet ([`Kubelet`]) that plays the node agent the environment lacks.
//!
//! The environment runs a real kube-apiserver, controller manager and scheduler, but no kubelet: Nodes are objects
//! the test makes ([`FakeNode`]), the real scheduler binds Pods to them, and the test reports what the containers
//! do by patching pod statuses, which [`Kubelet`] does from a [`Script`].

mod apiserver;
mod kubelet;
mod status;

use std::future::Future;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

pub use apiserver::ApiServer;
pub use kubelet::{Kubelet, Script};

use crate::require;

/// Returns a client of the test environment's first cluster (`CUBE_TEST_KUBECONFIG`), as its admin.
pub async fn client() -> Client {
    client_from(&require("CUBE_TEST_KUBECONFIG")).await
}

/// Returns a client of the API server the kubeconfig at `path` reaches, and panics saying why when it cannot.
pub async fn client_from(path: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|error| panic!("reading kubeconfig {path}: {error}"));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|error| panic!("loading kubeconfig {path}: {error}"));
    Client::try_from(config).unwrap_or_else(|error| panic!("a client for kubeconfig {path}: {error}"))
}

/// Returns a name no other test (or test run) uses: `prefix`, a dash and 12 hex digits, valid as a DNS label.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Runs `cleanup` to completion on a runtime of its own: `Drop` cannot await, and it also runs while a panic unwinds.
pub fn clean_up(cleanup: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(
        move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(cleanup),
            Err(error) => eprintln!("clean-up: no runtime: {error}"),
        },
    )
    .join();
}

/// A fake node with labels and, besides CPU, memory and pods, extended resources (GPUs) allocatable, Ready and
/// untainted so the real scheduler binds pods to it; deleted with the guard, also when making it fails halfway.
pub struct FakeNode {
    client: Client,
    /// The node's name.
    pub name: String,
}

impl FakeNode {
    /// Creates a node labelled `labels` (a JSON object) with the extended resources `devices` allocatable
    /// (`("nvidia.com/gpu", 4)`), and panics when the API server refuses it.
    pub async fn create(client: &Client, labels: serde_json::Value, devices: &[(&str, u32)]) -> Self {
        let guard = Self {
            client: client.clone(),
            name: unique_name("place"),
        };
        let name = &guard.name;
        let nodes = Api::<Node>::all(client.clone());
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap_or_else(|error| panic!("node labels must be a JSON object of strings: {error}"));
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|error| panic!("creating node {name}: {error}"));
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut allocatable = json!({"cpu": "32", "memory": "128Gi", "pods": "110"});
        for (resource, amount) in devices {
            allocatable[*resource] = json!(amount.to_string());
        }
        let status = json!({"status": {
            "allocatable": allocatable,
            "capacity": allocatable,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|error| panic!("reporting node {name} ready: {error}"));
        // New nodes are tainted not-ready until a kubelet reports; the test plays the kubelet.
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"taints": null}})),
            )
            .await
            .unwrap_or_else(|error| panic!("untainting node {name}: {error}"));
        guard
    }

    /// Returns the node as the API server has it now.
    pub async fn get(&self) -> Node {
        Api::<Node>::all(self.client.clone())
            .get(&self.name)
            .await
            .unwrap_or_else(|error| panic!("reading node {}: {error}", self.name))
    }
}

impl AsRef<str> for FakeNode {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        let nodes = Api::<Node>::all(self.client.clone());
        let name = self.name.clone();
        clean_up(async move {
            if let Err(error) = nodes.delete(&name, &DeleteParams::default()).await {
                eprintln!("clean-up: deleting node {name}: {error}");
            }
        });
    }
}

/// A namespace for a test's pods; deleted with the guard, its pods first and at once (no kubelet of a fake node
/// would ever confirm that they stopped).
pub struct TestNamespace {
    client: Client,
    /// The namespace's name.
    pub name: String,
}

impl TestNamespace {
    /// Creates the namespace `name`, and panics when the API server refuses it.
    pub async fn create(client: &Client, name: String) -> Self {
        let guard = Self {
            client: client.clone(),
            name,
        };
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": guard.name}}))
            .unwrap_or_else(|error| panic!("namespace {}: {error}", guard.name));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|error| panic!("creating namespace {}: {error}", guard.name));
        guard
    }

    /// Creates a namespace named `prefix` and a suffix no other test uses.
    pub async fn unique(client: &Client, prefix: &str) -> Self {
        Self::create(client, unique_name(prefix)).await
    }

    /// Returns the namespace's pods.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (pods, namespaces) = (self.pods(), Api::<Namespace>::all(self.client.clone()));
        let name = self.name.clone();
        clean_up(async move {
            let now = DeleteParams::default().grace_period(0);
            if let Err(error) = pods.delete_collection(&now, &ListParams::default()).await {
                eprintln!("clean-up: deleting the pods of namespace {name}: {error}");
            }
            if let Err(error) = namespaces.delete(&name, &DeleteParams::default()).await {
                eprintln!("clean-up: deleting namespace {name}: {error}");
            }
        });
    }
}
