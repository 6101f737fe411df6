//! The watcher against the test environment's real kube-apiserver and scheduler, with the fake kubelet playing the
//! node, on SQLite, PostgreSQL and MariaDB: a pod's life is published as exactly its transitions; a restarted
//! watcher publishes nothing for pods that did not change and reports a pod deleted while it was down.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cube_bus::{BusOptions, EventBus, MemoryBus, Subscription};
use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_kit::Channel;
use cube_proto::cube::scheduler::v1::Placement;
use cube_proto::cube::watcher::v1::{ObjectKind, WorkloadState, WorkloadTransition};
use cube_runtime::kubernetes::KubernetesRuntime;
use cube_runtime::transition::TOPIC;
use cube_runtime::{Container, ObjectKey, Runtime, WorkloadSpec, labels};
use cube_testkit::kubernetes::{FakeNode, Kubelet, Script, TestNamespace, client, unique_name};
use cube_watcher::{Options, Peers, Retention, Watcher};
use serde_json::json;

/// Longest wait for something that should happen soon.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The label only this test's fake node carries and its pods select.
const RUN_LABEL: &str = "cube.test/run";
/// A short lease, so that a restarted watcher takes its cluster over soon.
const LEASE: Duration = Duration::from_secs(2);

mod common;

cube_testkit::on_every_backend!(a_pods_life_is_published_once_across_a_restart_of_the_watcher);

/// Starts a watcher of the test cluster (registered as `kube`) on the database at `url`.
async fn start(url: &str, bus: &Arc<dyn EventBus>) -> Watcher {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let registry = ClusterRegistry::new(vec![ClusterConfig {
        default: true,
        ..ClusterConfig::new("kube", Some(kubeconfig.into()))
    }])
    .expect("a registry");
    let db = cube_kit::db::connect::<cube_watcher::store::Migrator>(url, true)
        .await
        .expect("the watcher's database");
    Watcher::start(registry, db, bus.clone(), no_callers(), options(), None)
        .await
        .expect("the watcher starts")
}

/// Peers for a watcher no one calls: these tests read the bus, not the event API (the integration tests call it).
fn no_callers() -> Peers {
    let nowhere = || Channel::remote("http://127.0.0.1:9").expect("a URL");
    Peers {
        auth: nowhere(),
        projects: nowhere(),
    }
}

fn options() -> Options {
    Options {
        holder: cube_watcher::holder_name().expect("a holder name"),
        lease_duration: LEASE,
        retention: Retention {
            age: Duration::from_secs(3600),
            count: 100_000,
        },
    }
}

/// A pod `name` of run `run` that only the test's node fits.
fn spec(namespace: &str, run: &str, name: &str) -> WorkloadSpec {
    let mut labels = labels::for_project("vision");
    labels.insert(labels::RUN.to_owned(), run.to_owned());
    labels.insert("script".to_owned(), name.to_owned());
    WorkloadSpec {
        key: ObjectKey::new("kube", namespace, name),
        labels,
        containers: vec![Container {
            name: "main".to_owned(),
            image: "cube.test/worker:1".to_owned(),
            command: vec!["train".to_owned()],
            ..Container::default()
        }],
        placement: Some(Placement {
            node_selector: HashMap::from([(RUN_LABEL.to_owned(), run.to_owned())]),
            ..Placement::default()
        }),
        ..WorkloadSpec::default()
    }
}

/// Collects the transitions of pods named `name` in `namespace` from `subscription` until `done` holds for the
/// last one (or fails after [`TIMEOUT`]).
async fn until(
    subscription: &mut Subscription,
    seen: &mut Vec<WorkloadTransition>,
    namespace: &str,
    done: impl Fn(&[WorkloadTransition]) -> bool,
) {
    tokio::time::timeout(TIMEOUT, async {
        while !done(seen) {
            seen.push(common::next_in(subscription, namespace).await);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("transitions seen so far: {seen:#?}"));
}

/// The states a pod's transitions went to, by pod name.
fn states(seen: &[WorkloadTransition]) -> BTreeMap<String, Vec<WorkloadState>> {
    let mut states: BTreeMap<String, Vec<WorkloadState>> = BTreeMap::new();
    for event in seen {
        states.entry(event.name.clone()).or_default().push(event.to_state());
    }
    states
}

async fn a_pods_life_is_published_once_across_a_restart_of_the_watcher(url: &str) {
    let kube = client().await;
    let run = unique_name("watch");
    let node = FakeNode::create(&kube, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&kube, run.clone()).await;
    let kubelet = Kubelet::start(&kube, [&node])
        .script("script=trainer", Script::run_for(Duration::from_millis(800)).exit(3))
        .script("script=server", Script::run());
    let runtime = KubernetesRuntime::new("kube", kube.clone());
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let mut subscription = bus.subscribe(TOPIC, "test", "test").await.expect("subscribing");
    let watcher = start(url, &bus).await;

    // A server's pod first: once it is reported, the watch is live.
    runtime
        .apply(&spec(&namespace.name, &run, "server"))
        .await
        .expect("applying");
    let mut seen = Vec::new();
    until(&mut subscription, &mut seen, &namespace.name, |seen| {
        seen.iter().any(|event| event.name == "server")
    })
    .await;
    // A task's pod: created, running, failed with its exit code, each once.
    runtime
        .apply(&spec(&namespace.name, &run, "trainer"))
        .await
        .expect("applying");
    until(&mut subscription, &mut seen, &namespace.name, |seen| {
        let states = states(seen);
        states.get("trainer").and_then(|states| states.last()) == Some(&WorkloadState::Failed)
            && states
                .get("server")
                .is_some_and(|states| states.contains(&WorkloadState::Running))
    })
    .await;
    let trainer: Vec<&WorkloadTransition> = seen.iter().filter(|event| event.name == "trainer").collect();
    let phases: Vec<WorkloadState> = trainer
        .iter()
        .filter(|event| event.from_state != event.to_state)
        .map(|event| event.to_state())
        .collect();
    assert_eq!(
        phases,
        [WorkloadState::Pending, WorkloadState::Running, WorkloadState::Failed],
        "{trainer:#?}"
    );
    let failed = trainer.last().expect("the last");
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.project, "projects/vision");
    assert_eq!(failed.labels.get(labels::RUN), Some(&run));
    let mut ids: Vec<&str> = seen.iter().map(|event| event.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), seen.len(), "every transition once: {seen:#?}");

    // The watcher goes away; meanwhile the trainer's pod is deleted and nothing happens to the server's.
    drop(watcher);
    assert!(
        runtime
            .delete(&ObjectKey::new("kube", &namespace.name, "trainer"), Duration::ZERO)
            .await
            .expect("deleting")
    );
    let before_restart = seen.len();
    let _watcher = start(url, &bus).await;
    // A new pod proves the new watcher follows the cluster.
    runtime
        .apply(&spec(&namespace.name, &run, "late"))
        .await
        .expect("applying");
    until(&mut subscription, &mut seen, &namespace.name, |seen| {
        let states = states(seen);
        states.contains_key("late")
            && states.get("trainer").and_then(|states| states.last()) == Some(&WorkloadState::Deleted)
    })
    .await;
    // The outbox relays at least once: a transition the first watcher published but had not yet marked sent is
    // published again under the same id, which consumers drop. Everything new is counted by id.
    let known: std::collections::HashSet<&str> = seen[..before_restart].iter().map(|event| event.id.as_str()).collect();
    let after: Vec<&WorkloadTransition> = seen[before_restart..]
        .iter()
        .filter(|event| !known.contains(event.id.as_str()))
        .collect();
    assert!(
        after.iter().all(|event| event.name != "server"),
        "nothing for the unchanged pod: {after:#?}"
    );
    let trainer_after: Vec<_> = after.iter().filter(|event| event.name == "trainer").collect();
    assert_eq!(trainer_after.len(), 1, "deleted once: {trainer_after:#?}");
    assert_eq!(trainer_after[0].from_state(), WorkloadState::Failed);
    drop(kubelet);
}

/// A cluster added to the clusters file is watched once the registry is reloaded; one removed stops being watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_added_and_removed_by_a_reload_are_followed() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let kube = client().await;
    let run = unique_name("reload");
    let node = FakeNode::create(&kube, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&kube, run.clone()).await;
    let _kubelet = Kubelet::start(&kube, [&node]);
    let runtime = KubernetesRuntime::new("kube", kube.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("clusters.json");
    let write = |clusters: serde_json::Value| {
        std::fs::write(&file, json!({ "clusters": clusters }).to_string()).expect("writing the clusters file")
    };
    write(json!([{"name": "local", "default": true}]));
    let registry = ClusterRegistry::load(&file).expect("the clusters file");
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let mut subscription = bus.subscribe(TOPIC, "test", "test").await.expect("subscribing");
    let db_url = format!("sqlite://{}", dir.path().join("watcher.db").display());
    let db = cube_kit::db::connect::<cube_watcher::store::Migrator>(&db_url, true)
        .await
        .expect("the watcher's database");
    let _watcher = Watcher::start(registry.clone(), db, bus.clone(), no_callers(), options(), None)
        .await
        .expect("the watcher starts");

    write(json!([{"name": "local", "default": true}, {"name": "kube", "kubeconfig": kubeconfig}]));
    registry.reload().expect("reloading");
    runtime
        .apply(&spec(&namespace.name, &run, "first"))
        .await
        .expect("applying");
    let mut seen = Vec::new();
    until(&mut subscription, &mut seen, &namespace.name, |seen| {
        seen.iter().any(|event| event.name == "first")
    })
    .await;

    write(json!([{"name": "local", "default": true}]));
    registry.reload().expect("reloading");
    // Within a second the watch stops: a pod made after that is not reported.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = seen.len();
    runtime
        .apply(&spec(&namespace.name, &run, "unwatched"))
        .await
        .expect("applying");
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        until(&mut subscription, &mut seen, &namespace.name, |seen| {
            seen.iter().any(|event| event.name == "unwatched")
        })
        .await;
    })
    .await;
    assert!(
        quiet.is_err(),
        "a removed cluster is not watched: {:#?}",
        &seen[before..]
    );
}

/// A Deployment's ready replicas and a Node's readiness and labels are transitions too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_report_ready_replicas_and_nodes_readiness_and_labels() {
    let kube = client().await;
    let run = unique_name("kinds");
    let node = FakeNode::create(&kube, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&kube, run.clone()).await;
    let kubelet = Kubelet::start(&kube, [&node]).script("script=web", Script::run());
    let runtime = KubernetesRuntime::new("kube", kube.clone());
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let mut subscription = bus.subscribe(TOPIC, "test", "test").await.expect("subscribing");
    let dir = tempfile::tempdir().expect("tempdir");
    let _watcher = start(&format!("sqlite://{}", dir.path().join("watcher.db").display()), &bus).await;

    let web = spec(&namespace.name, &run, "web");
    runtime
        .apply_object(&cube_runtime::kubernetes::deployment(&web, 2).expect("a deployment"))
        .await
        .expect("applying the deployment");
    // Deployment transitions carry the namespace; node ones do not, so they are followed by name.
    let mut seen = Vec::new();
    until(&mut subscription, &mut seen, &namespace.name, |seen| {
        seen.iter()
            .any(|event| event.kind() == ObjectKind::Deployment && event.ready_replicas == 2 && event.ready)
    })
    .await;
    let replicas: Vec<i32> = seen
        .iter()
        .filter(|event| event.kind() == ObjectKind::Deployment)
        .map(|event| event.ready_replicas)
        .collect();
    // Each count once, growing (the first one seen depends on how soon the watch started).
    assert!(
        replicas.is_sorted() && replicas.windows(2).all(|pair| pair[0] != pair[1]),
        "{replicas:?}"
    );
    let running = seen
        .iter()
        .find(|event| event.kind() == ObjectKind::Deployment && event.to_state() == WorkloadState::Running)
        .expect("running once a replica is ready");
    assert!(running.ready_replicas >= 1);

    // The node: a label change, then the kubelet stops and the node goes NotReady.
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(kube.clone());
    nodes
        .patch(
            &node.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"org": "moved"}}})),
        )
        .await
        .expect("relabelling the node");
    let mut node_events = Vec::new();
    until(&mut subscription, &mut node_events, "", |seen| {
        seen.iter()
            .any(|event| event.name == node.name && event.labels.get("org").map(String::as_str) == Some("moved"))
    })
    .await;
    kubelet.stop().await;
    until(&mut subscription, &mut node_events, "", |seen| {
        seen.iter()
            .any(|event| event.name == node.name && event.to_state() == WorkloadState::Failed)
    })
    .await;
    let down = node_events
        .iter()
        .find(|event| event.name == node.name && event.to_state() == WorkloadState::Failed)
        .expect("not ready");
    assert_eq!(
        (down.kind(), down.from_state(), down.ready),
        (ObjectKind::Node, WorkloadState::Running, false)
    );
}
