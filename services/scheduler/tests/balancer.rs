//! The balancer against the real API servers of the test environment: cluster `alpha` (with a kube-scheduler)
//! and cluster `bravo` (an API server only). Fake nodes and pods are made through the API; each test balances only its
//! own nodes (a `cube-test-run` node selector) and keeps its lease in its own namespace, so tests running at the
//! same time do not meet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_proto::cube::scheduler::v1::NodeMove;
use cube_scheduler::balancer::{BalanceSettings, Balancer, LEASE_NAME, MOVED_TOPIC, Round};
use cube_scheduler::inventory::{Fleet, InventoryOptions};
use cube_scheduler::model::{Migrator, node_move};
use cube_testkit::{eventually, require};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prost::Message as _;
use sea_orm::EntityTrait as _;
use serde_json::json;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

async fn client(path: &str) -> Client {
    cluster("any", path).client().await.expect("a client")
}

fn cluster(name: &str, kubeconfig: &str) -> ClusterConfig {
    ClusterConfig::new(name, Some(kubeconfig.into()))
}

/// One test's share of one cluster: its nodes and its namespace (pods and the lease), deleted however the test
/// ends.
struct Scenario {
    client: Client,
    run: String,
    namespace: String,
    nodes: Vec<String>,
}

impl Scenario {
    async fn new(client: Client, run: &str) -> Self {
        Self::in_namespace(client, run, &unique("balance")).await
    }

    async fn in_namespace(client: Client, run: &str, namespace: &str) -> Self {
        let namespace = namespace.to_owned();
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .expect("creating the namespace");
        Self {
            client,
            run: run.to_owned(),
            namespace,
            nodes: Vec::new(),
        }
    }

    /// A ready, shared training GPU node of `org` with 4 GPUs, loaded with a bound pod asking `used` of them.
    async fn gpu_node(&mut self, org: &str, used: u32) -> String {
        let name = unique(&format!("{org}-node"));
        self.nodes.push(name.clone());
        let nodes = Api::<Node>::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": {
            "cube-test-run": self.run, "org": org, "gpu": "true", "train": "true", "gpu-type": "T4"}}}))
        .expect("node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("creating a node");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "capacity": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4", "pods": "110"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the test",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }});
        nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("the node's status");
        if used > 0 {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": unique("load"), "namespace": self.namespace},
                "spec": {"nodeName": name, "containers": [{"name": "work", "image": "busybox",
                    "resources": {"requests": {"nvidia.com/gpu": used.to_string()},
                                  "limits": {"nvidia.com/gpu": used.to_string()}}}]},
            }))
            .expect("pod");
            Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
                .create(&PostParams::default(), &pod)
                .await
                .expect("creating a bound pod");
        }
        name
    }

    async fn org_of(&self, node: &str) -> String {
        let node = Api::<Node>::all(self.client.clone()).get(node).await.expect("node");
        node.metadata
            .labels
            .unwrap_or_default()
            .get("org")
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Scenario {
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
                // Cluster b runs no namespace controller, so the pods go first, by hand.
                let _ = Api::<Pod>::namespaced(client.clone(), &namespace)
                    .delete_collection(&DeleteParams::default(), &kube::api::ListParams::default())
                    .await;
                let _ = Api::<Namespace>::all(client)
                    .delete(&namespace, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

struct Setup {
    registry: ClusterRegistry,
    fleet: Arc<Fleet>,
    db: sea_orm::DatabaseConnection,
    bus: Arc<dyn EventBus>,
}

async fn setup(clusters: Vec<ClusterConfig>) -> Setup {
    let registry = ClusterRegistry::new(clusters).expect("registry");
    let fleet = Arc::new(Fleet::connect(&registry, InventoryOptions::default()).await);
    let db = cube_kit::db::connect::<Migrator>("sqlite::memory:", true)
        .await
        .expect("database");
    Setup {
        registry,
        fleet,
        db,
        bus: Arc::new(MemoryBus::new(BusOptions::default())),
    }
}

fn settings(run: &str, lease_namespace: &str) -> BalanceSettings {
    BalanceSettings {
        interval_seconds: 0,
        node_selector: format!("cube-test-run={run}"),
        lease_namespace: lease_namespace.to_owned(),
        ..BalanceSettings::default()
    }
}

fn balancer(setup: &Setup, settings: BalanceSettings, replica: &str) -> Balancer {
    Balancer::new(
        setup.registry.clone(),
        setup.fleet.clone(),
        setup.db.clone(),
        setup.bus.clone(),
        settings,
        replica.into(),
    )
}

/// Waits until the inventory sees `count` of the run's nodes with their pods' requests in place.
async fn seen(fleet: &Fleet, cluster: &str, run: &str, count: usize, gpus_requested: i64) {
    eventually("the scenario in the inventory", Duration::from_secs(10), || async {
        let nodes = fleet.nodes(cluster).ok()?;
        let ours: Vec<_> = nodes
            .iter()
            .filter(|node| node.labels.get("cube-test-run").map(String::as_str) == Some(run))
            .collect();
        let requested: i64 = ours.iter().map(|node| node.requested.gpus).sum();
        (ours.len() == count && requested == gpus_requested).then_some(())
    })
    .await;
}

fn moved(round: &Round) -> Vec<(String, String, String)> {
    round
        .moves
        .iter()
        .map(|(movement, _)| {
            (
                movement.node.clone(),
                movement.from_group.clone(),
                movement.to_group.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_node_of_the_least_loaded_group_moves_and_minimums_hold() {
    let kubeconfig = require("CUBE_TEST_KUBECONFIG_B");
    let run = unique("run");
    let mut scenario = Scenario::new(client(&kubeconfig).await, &run).await;
    // hot: 15 of 16 GPUs in use; warm: 8 of 16; cold: 5 of 16, its emptiest node idle.
    for used in [4, 4, 4, 3] {
        scenario.gpu_node("hot", used).await;
    }
    for used in [2, 2, 2, 2] {
        scenario.gpu_node("warm", used).await;
    }
    let idle = scenario.gpu_node("cold", 0).await;
    for used in [1, 2, 2] {
        scenario.gpu_node("cold", used).await;
    }
    let setup = setup(vec![cluster("bravo", &kubeconfig)]).await;
    seen(&setup.fleet, "bravo", &run, 12, 28).await;
    let mut events = setup
        .bus
        .subscribe(MOVED_TOPIC, "test", "test")
        .await
        .expect("subscribing");
    let balancer = balancer(&setup, settings(&run, &scenario.namespace), "replica-1");

    let plan = balancer.plan(&[]).await.expect("a plan");
    assert_eq!(
        moved(&plan),
        vec![(idle.clone(), "cold".into(), "hot".into())],
        "{plan:?}"
    );
    assert_eq!(scenario.org_of(&idle).await, "cold", "planning moves nothing");

    let round = balancer.run(&[]).await.expect("a round");
    assert!(round.skipped.is_empty(), "{:?}", round.skipped);
    assert_eq!(moved(&round), vec![(idle.clone(), "cold".into(), "hot".into())]);
    assert_eq!(scenario.org_of(&idle).await, "hot", "the node carries its new group");
    let records = node_move::Entity::find().all(&setup.db).await.expect("records");
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].node.as_str(),
            records[0].from_group.as_str(),
            records[0].to_group.as_str()
        ),
        (idle.as_str(), "cold", "hot")
    );
    assert_eq!(records[0].replica, "replica-1");
    assert!(
        records[0].reason.contains("more than 20 points"),
        "{}",
        records[0].reason
    );
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event")
        .expect("the stream")
        .expect("a delivery");
    let event = NodeMove::decode(event.payload).expect("a NodeMove");
    assert_eq!(event.node, format!("clusters/bravo/nodes/{idle}"));
    assert_eq!((event.from_group.as_str(), event.to_group.as_str()), ("cold", "hot"));

    // hot now 15/20 = 75%, cold 5/12 (3 nodes, its minimum), warm 8/16: cold is least loaded but may not give.
    seen(&setup.fleet, "bravo", &run, 12, 28).await;
    eventually("the move in the inventory", Duration::from_secs(5), || async {
        let nodes = setup.fleet.nodes("bravo").ok()?;
        nodes
            .iter()
            .any(|node| node.name == idle && node.resource_group == "hot")
            .then_some(())
    })
    .await;
    let round = balancer.run(&[]).await.expect("a second round");
    let second = moved(&round);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(
        (second[0].1.as_str(), second[0].2.as_str()),
        ("warm", "hot"),
        "{second:?}"
    );

    // hot 17/24, warm 6/12, cold 5/12: with a minimum of 4 nodes neither warm nor cold (3 each) may give.
    let strict = BalanceSettings {
        default_minimum: 4,
        ..settings(&run, &scenario.namespace)
    };
    let strict = Balancer::new(
        setup.registry.clone(),
        setup.fleet.clone(),
        setup.db.clone(),
        setup.bus.clone(),
        strict,
        "replica-1".into(),
    );
    eventually("the second move in the inventory", Duration::from_secs(5), || async {
        let nodes = setup.fleet.nodes("bravo").ok()?;
        let hot = nodes
            .iter()
            .filter(|node| node.labels.get("cube-test-run") == Some(&run) && node.resource_group == "hot")
            .count();
        (hot == 6).then_some(())
    })
    .await;
    let plan = strict.plan(&[]).await.expect("a plan");
    assert!(
        plan.moves.is_empty(),
        "no group above a minimum of 4 can give: {plan:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_balances_two_clusters() {
    let (path_a, path_b) = (require("CUBE_TEST_KUBECONFIG"), require("CUBE_TEST_KUBECONFIG_B"));
    let run = unique("run");
    // One namespace name in both clusters, where each keeps its lease.
    let namespace = unique("balance");
    let mut a = Scenario::in_namespace(client(&path_a).await, &run, &namespace).await;
    let mut b = Scenario::in_namespace(client(&path_b).await, &run, &namespace).await;
    let mut idle = BTreeMap::new();
    for (name, scenario) in [("alpha", &mut a), ("bravo", &mut b)] {
        for _ in 0..4 {
            scenario.gpu_node("busy", 4).await;
        }
        idle.insert(name, scenario.gpu_node("spare", 0).await);
        for _ in 0..3 {
            scenario.gpu_node("spare", 1).await;
        }
    }
    let setup = setup(vec![cluster("alpha", &path_a), cluster("bravo", &path_b)]).await;
    seen(&setup.fleet, "alpha", &run, 8, 19).await;
    seen(&setup.fleet, "bravo", &run, 8, 19).await;
    let balancer = balancer(&setup, settings(&run, &namespace), "replica-1");
    let round = balancer.run(&[]).await.expect("a round");
    assert!(round.skipped.is_empty(), "{:?}", round.skipped);
    let clusters: Vec<&str> = round
        .moves
        .iter()
        .map(|(movement, _)| movement.cluster.as_str())
        .collect();
    assert_eq!(
        clusters,
        ["alpha", "bravo"],
        "one move in each cluster, in one round: {round:?}"
    );
    assert_eq!(a.org_of(&idle["alpha"]).await, "busy");
    assert_eq!(b.org_of(&idle["bravo"]).await, "busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_move_nodes() {
    let kubeconfig = require("CUBE_TEST_KUBECONFIG_B");
    let run = unique("run");
    let mut scenario = Scenario::new(client(&kubeconfig).await, &run).await;
    for _ in 0..4 {
        scenario.gpu_node("hot", 4).await;
    }
    for _ in 0..8 {
        scenario.gpu_node("cold", 0).await;
    }
    let setup = setup(vec![cluster("bravo", &kubeconfig)]).await;
    seen(&setup.fleet, "bravo", &run, 12, 16).await;
    // The lease outlasts the waits between rounds, so only a replica that stops renewing loses it.
    let settings = BalanceSettings {
        lease_seconds: 60,
        ..settings(&run, &scenario.namespace)
    };
    let first = Arc::new(balancer(&setup, settings.clone(), "replica-1"));
    let second = Arc::new(balancer(&setup, settings, "replica-2"));
    // Both replicas run rounds at the same moments, each round waiting for the previous moves to be seen.
    let mut skipped_by = BTreeMap::<String, usize>::new();
    for _ in 0..4 {
        let (one, two) = tokio::join!(first.run(&[]), second.run(&[]));
        for (replica, round) in [("replica-1", one.expect("round")), ("replica-2", two.expect("round"))] {
            if !round.skipped.is_empty() {
                assert!(
                    round.skipped.iter().all(|skip| skip.reason.contains("lease")),
                    "{:?}",
                    round.skipped
                );
                *skipped_by.entry(replica.into()).or_default() += 1;
            }
        }
        let moves = node_move::Entity::find().all(&setup.db).await.expect("records").len();
        eventually("the moves in the inventory", Duration::from_secs(5), || async {
            let nodes = setup.fleet.nodes("bravo").ok()?;
            let hot = nodes
                .iter()
                .filter(|node| node.labels.get("cube-test-run") == Some(&run) && node.resource_group == "hot")
                .count();
            (hot == 4 + moves).then_some(())
        })
        .await;
    }
    let records = node_move::Entity::find().all(&setup.db).await.expect("records");
    assert!(records.len() >= 3, "the hot group received nodes: {records:?}");
    let movers: std::collections::BTreeSet<&str> = records.iter().map(|record| record.replica.as_str()).collect();
    assert_eq!(movers.len(), 1, "one replica made every move: {records:?}");
    let holder = *movers.iter().next().expect("a mover");
    let other = if holder == "replica-1" {
        "replica-2"
    } else {
        "replica-1"
    };
    assert_eq!(
        skipped_by.get(other),
        Some(&4),
        "the other replica was kept out of every round"
    );

    // The holder stops; once its lease has expired (its last renewal is made older than the lease), the other
    // replica takes over.
    let standby = if holder == "replica-1" { second } else { first };
    let leases = Api::<Lease>::namespaced(client(&kubeconfig).await, &scenario.namespace);
    let stale = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(120),
    );
    leases
        .patch(
            LEASE_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"renewTime": stale}})),
        )
        .await
        .expect("aging the holder's lease");
    let round = standby.run(&[]).await.expect("a round");
    assert!(
        round.skipped.is_empty(),
        "the expired lease is taken: {:?}",
        round.skipped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_pods_wait_too_long_receives_a_node() {
    let kubeconfig = require("CUBE_TEST_KUBECONFIG_B");
    let run = unique("run");
    let mut scenario = Scenario::new(client(&kubeconfig).await, &run).await;
    let needy = unique("needy");
    for _ in 0..3 {
        scenario.gpu_node(&needy, 4).await;
    }
    let idle = scenario.gpu_node("idle", 0).await;
    for _ in 0..3 {
        scenario.gpu_node("idle", 3).await;
    }
    // 100% against 56%: no imbalance move under a threshold of 50 points.
    let settings = BalanceSettings {
        threshold_points: 50,
        ..settings(&run, &scenario.namespace)
    };
    let setup = setup(vec![cluster("bravo", &kubeconfig)]).await;
    seen(&setup.fleet, "bravo", &run, 7, 21).await;
    let balancer = balancer(&setup, settings, "replica-1");
    assert!(balancer.plan(&[]).await.expect("plan").moves.is_empty());

    // A pod of the needy group, unschedulable for lack of GPUs, first for a minute, then for ten.
    let pods = Api::<Pod>::namespaced(scenario.client.clone(), &scenario.namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "waiting", "namespace": scenario.namespace},
        "spec": {"nodeSelector": {"train": "true", "gpu": "true", "org": needy},
                 "containers": [{"name": "work", "image": "busybox",
                    "resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating the pod");
    let unschedulable = |ago: i64| {
        let since = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(ago);
        json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "lastTransitionTime": since.to_string(),
            "message": "0/7 nodes are available: 7 Insufficient nvidia.com/gpu."}]}})
    };
    pods.patch_status("waiting", &PatchParams::default(), &Patch::Merge(&unschedulable(60)))
        .await
        .expect("the pod's status");
    eventually("the waiting pod in the inventory", Duration::from_secs(5), || async {
        let waiting = setup.fleet.waiting("bravo").ok()?;
        waiting
            .iter()
            .any(|pod| pod.namespace == scenario.namespace && pod.lacks_resources())
            .then_some(())
    })
    .await;
    assert!(
        balancer.plan(&[]).await.expect("plan").moves.is_empty(),
        "a minute is not five"
    );

    pods.patch_status("waiting", &PatchParams::default(), &Patch::Merge(&unschedulable(600)))
        .await
        .expect("the pod's status");
    eventually("the long wait in the inventory", Duration::from_secs(5), || async {
        let waiting = setup.fleet.waiting("bravo").ok()?;
        waiting
            .iter()
            .any(|pod| {
                pod.namespace == scenario.namespace
                    && pod.waited(std::time::SystemTime::now()) > Duration::from_secs(500)
            })
            .then_some(())
    })
    .await;
    let round = balancer.run(&[]).await.expect("a round");
    assert_eq!(
        moved(&round),
        vec![(idle.clone(), "idle".into(), needy.clone())],
        "{round:?}"
    );
    assert_eq!(scenario.org_of(&idle).await, needy);
    let records = node_move::Entity::find().all(&setup.db).await.expect("records");
    assert!(records[0].reason.contains("waited"), "{}", records[0].reason);
}
