//! The node inventory against the real kube-apiserver of the test environment: fake Nodes and bound Pods made
//! through the API, and the inventory following their label and pod changes within a second.

use std::time::Duration;

use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_scheduler::inventory::{Fleet, InventoryOptions, NodeView};
use cube_testkit::{eventually, require};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const FOLLOW: Duration = Duration::from_secs(1);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn client(path: &str) -> Client {
    ClusterConfig::new("any", Some(path.into()))
        .client()
        .await
        .expect("a client")
}

/// Deletes the test's nodes and namespace however the test ends.
struct Cleanup {
    client: Client,
    nodes: Vec<String>,
    namespace: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (client, nodes, namespace) = (self.client.clone(), self.nodes.clone(), self.namespace.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                for node in nodes {
                    let _ = Api::<Node>::all(client.clone())
                        .delete(&node, &DeleteParams::default())
                        .await;
                }
                if let Some(namespace) = namespace {
                    let _ = Api::<Namespace>::all(client)
                        .delete(&namespace, &DeleteParams::default())
                        .await;
                }
            });
        })
        .join();
    }
}

async fn fake_node(client: &Client, name: &str, run: &str, org: &str) {
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"cube-test-run": run, "org": org, "gpu": "true", "gpu-type": "T4"}},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("creating a node");
    let status = json!({"status": {
        "capacity": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "4", "pods": "110"},
        "allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "4", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the test",
                        "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patching the node's status");
}

fn find<'a>(nodes: &'a [NodeView], name: &str) -> Option<&'a NodeView> {
    nodes.iter().find(|node| node.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_follows_nodes_labels_and_bound_pods_within_a_second() {
    let path = require("CUBE_TEST_KUBECONFIG");
    let client = client(&path).await;
    let run = unique("run");
    let mut cleanup = Cleanup {
        client: client.clone(),
        nodes: Vec::new(),
        namespace: None,
    };
    let registry = ClusterRegistry::new(vec![ClusterConfig::new("test", Some(path.clone().into()))]).expect("registry");
    let fleet = Fleet::connect(&registry, InventoryOptions::default()).await;
    fleet
        .ready("test", Duration::from_secs(30))
        .await
        .expect("the first lists");
    let version = fleet.health("test").await.expect("the API server answers");
    assert!(version.starts_with("v1."), "{version}");

    let (first, second) = (unique("node"), unique("node"));
    for name in [&first, &second] {
        cleanup.nodes.push(name.clone());
        fake_node(&client, name, &run, "vision").await;
    }
    let ours = |fleet: &Fleet| -> Vec<NodeView> {
        fleet
            .nodes("test")
            .expect("nodes")
            .iter()
            .filter(|node| node.labels.get("cube-test-run") == Some(&run))
            .map(|node| NodeView::clone(node))
            .collect()
    };
    eventually("both nodes, ready, with their allocatable", FOLLOW, || async {
        let nodes = ours(&fleet);
        let ready = nodes.len() == 2
            && nodes
                .iter()
                .all(|node| node.ready && node.allocatable.gpus == 4 && node.allocatable.cpu_millis == 8000);
        ready.then_some(())
    })
    .await;
    let memory = find(&ours(&fleet), &first).expect("first").allocatable.memory_bytes;
    assert_eq!(memory, 32 * (1 << 30));

    // A label change.
    Api::<Node>::all(client.clone())
        .patch(
            &first,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"org": "speech"}}})),
        )
        .await
        .expect("relabelling");
    eventually("the new org label", FOLLOW, || async {
        (find(&ours(&fleet), &first)?.resource_group == "speech").then_some(())
    })
    .await;

    // A pod bound to the first node (as the scheduler would bind it) adds its requests there.
    let namespace = unique("inventory");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    cleanup.namespace = Some(namespace.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "trainer"},
        "spec": {"nodeName": first, "containers": [{"name": "main", "image": "busybox",
            "resources": {"requests": {"cpu": "1500m", "memory": "4Gi", "nvidia.com/gpu": "1"},
                          "limits": {"nvidia.com/gpu": "1"}}}],
                 "initContainers": [{"name": "init", "image": "busybox",
            "resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a bound pod");
    eventually("the pod's requests on the first node", FOLLOW, || async {
        let node = find(&ours(&fleet), &first)?.clone();
        // The init container asks more CPU than the main one: the larger wins, as in Kubernetes.
        let seen =
            node.requested.cpu_millis == 2000 && node.requested.memory_bytes == 4 << 30 && node.requested.gpus == 1;
        seen.then_some(())
    })
    .await;
    assert_eq!(find(&ours(&fleet), &second).expect("second").requested.gpus, 0);

    // Finished pods request nothing.
    pods.patch_status(
        "trainer",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("finishing the pod");
    eventually("the finished pod's requests gone", FOLLOW, || async {
        (find(&ours(&fleet), &first)?.requested.gpus == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_cluster_without_an_api_has_no_inventory_and_says_why() {
    let fleet = Fleet::connect(&ClusterRegistry::embedded(), InventoryOptions::default()).await;
    let error = fleet.nodes("local").expect_err("no inventory");
    assert!(error.to_string().contains("no Kubernetes API"), "{error}");
    let health = fleet.health("local").await.expect_err("unhealthy");
    assert!(health.contains("no Kubernetes API"), "{health}");
    assert!(fleet.nodes("elsewhere").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_cluster_file_adds_removes_and_keeps_clusters() {
    let (path_a, path_b) = (require("CUBE_TEST_KUBECONFIG"), require("CUBE_TEST_KUBECONFIG_B"));
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("clusters.json");
    let write = |clusters: serde_json::Value| {
        std::fs::write(
            &file,
            serde_json::to_vec(&json!({ "clusters": clusters })).expect("json"),
        )
        .expect("writing");
    };
    write(json!([{"name": "alpha", "kubeconfig": path_a}]));
    let registry = ClusterRegistry::load(&file).expect("the file");
    let fleet = Fleet::connect(&registry, InventoryOptions::default()).await;
    fleet
        .ready("alpha", Duration::from_secs(30))
        .await
        .expect("alpha listed");
    let alpha_generation = fleet.generation("alpha").expect("alpha watched");
    assert!(fleet.nodes("bravo").is_err(), "bravo is not registered yet");

    // Adding bravo: watched after the reload; alpha keeps its watches (its generation goes on, not from zero).
    write(json!([{"name": "alpha", "kubeconfig": path_a}, {"name": "bravo", "kubeconfig": path_b, "default": true}]));
    cube_scheduler::reload(&registry, &fleet).await.expect("a reload");
    assert_eq!(registry.names(), ["bravo", "alpha"], "the default first");
    fleet
        .ready("bravo", Duration::from_secs(30))
        .await
        .expect("bravo listed");
    assert!(fleet.generation("alpha").expect("alpha still watched") >= alpha_generation);

    // A broken file changes nothing and says what is wrong.
    write(json!([{"name": "Alpha!"}]));
    let error = cube_scheduler::reload(&registry, &fleet).await.expect_err("refused");
    assert!(error.to_string().contains("clusters[0].name"), "{error}");
    assert_eq!(registry.names(), ["bravo", "alpha"]);
    assert!(fleet.nodes("bravo").is_ok());

    // Removing alpha stops watching it.
    write(json!([{"name": "bravo", "kubeconfig": path_b}]));
    cube_scheduler::reload(&registry, &fleet).await.expect("a reload");
    assert_eq!(registry.names(), ["bravo"]);
    let error = fleet.nodes("alpha").expect_err("alpha is gone");
    assert!(error.to_string().contains("no cluster"), "{error}");
}
