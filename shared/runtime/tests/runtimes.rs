//! The runtime of each registered cluster: local clusters run processes, clusters with a kubeconfig run pods on
//! that cluster's API server, an unknown cluster is the caller's mistake naming `cluster`, and one made per cluster
//! is kept until a reload changes how that cluster is reached.

use std::collections::BTreeMap;

use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_runtime::{ClusterRuntime, LocalRuntime, Runtime, RuntimeError, Runtimes};
use cube_testkit::kubernetes::TestNamespace;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cluster_gets_the_runtime_of_its_kind() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = ClusterRegistry::new(vec![
        ClusterConfig {
            default: true,
            ..ClusterConfig::new("local", None)
        },
        ClusterConfig::new("kube", Some(kubeconfig.into())),
    ])
    .expect("a registry");
    let (local, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
    let runtimes = Runtimes::new(registry.clone(), Arc::new(local));

    assert!(matches!(runtimes.cluster("local").await, Ok(ClusterRuntime::Local(_))));
    let Ok(ClusterRuntime::Kubernetes(kube)) = runtimes.cluster("kube").await else {
        panic!("a Kubernetes runtime for a cluster with a kubeconfig");
    };
    assert_eq!(kube.cluster(), "kube");
    match runtimes.cluster("nowhere").await {
        Err(RuntimeError::Invalid { field, message }) => {
            assert_eq!(field, "cluster");
            assert!(
                message.contains("local") && message.contains("kube"),
                "names the registered: {message}"
            );
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("an unknown cluster has no runtime"),
    }
    // The cluster's client is built once, however often its runtime is asked for.
    for _ in 0..3 {
        runtimes.cluster("kube").await.expect("the runtime");
    }
    assert_eq!(registry.clients_built(), 1);

    // Listing through the registry reaches the cluster's API server.
    let namespace = TestNamespace::unique(kube.client(), "runtimes").await;
    let listed = runtimes
        .list("kube", Some(&namespace.name), &BTreeMap::new())
        .await
        .expect("listing the cluster");
    assert!(listed.is_empty());
    assert!(
        runtimes
            .list("local", None, &BTreeMap::new())
            .await
            .expect("listing")
            .is_empty()
    );
}
