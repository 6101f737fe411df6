//! The watcher as its own process, killed with SIGKILL while the API server is changing a thousand times, and
//! started again: every change the test made is published exactly once (consumers drop a redelivered
//! transition by its id), none is lost, none is invented; and one resuming from a place the API server no longer
//! holds (`410 Gone`) lists afresh and publishes only what changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cube_bus::{BusOptions, EventBus, RedisBus, Subscription};
use cube_proto::cube::watcher::v1::{WorkloadState, WorkloadTransition};
use cube_runtime::labels;
use cube_runtime::transition::TOPIC;
use cube_testkit::kubernetes::{ApiServer, TestNamespace, client, unique_name};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

mod common;

cube_testkit::on_every_backend!(
    every_change_is_published_once_across_kills_of_the_watcher,
    a_place_the_api_server_no_longer_holds_publishes_only_what_changed,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_published_once_across_a_restart_of_the_api_server() {
    cube_testkit::on_fresh_database(cube_testkit::Backend::Postgres, |url| async move {
        api_server_restart(&url).await;
    })
    .await;
}

/// Pods changed by the test.
const PODS: usize = 100;
/// Changes to each pod (its containers' restart count going up one at a time).
const ROUNDS: i32 = 10;
/// Longest wait for something that should happen soon.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A watcher process of the test cluster (as `kube`) on the database at `url`, publishing on Redis under
/// `bus_namespace`.
struct WatcherProcess {
    child: Child,
    /// What it logged (at `info`).
    log: Arc<std::sync::Mutex<String>>,
}

impl WatcherProcess {
    fn start(url: &str, bus_namespace: &str, clusters: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cube-watcher"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--lease-duration",
                "2s",
            ])
            .args(["--log-filter", "cube_watcher=info,warn"])
            .env("CUBE_DATABASE_URL", url)
            .env("CUBE_REDIS_URL", cube_testkit::require("CUBE_TEST_REDIS_URL"))
            .env("CUBE_REDIS_NAMESPACE", bus_namespace)
            .env("CUBE_CLUSTERS_FILE", clusters)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting cube-watcher");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    /// What it logged so far.
    fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// SIGKILL: no chance to finish anything.
    async fn kill(mut self) {
        self.child.kill().await.expect("killing the watcher");
    }
}

/// The test's bus, the watcher's clusters file, and a consumer of transitions.
struct Setup {
    bus_namespace: String,
    clusters: tempfile::TempDir,
    subscription: Subscription,
    _bus: Arc<dyn EventBus>,
}

impl Setup {
    async fn new(kubeconfig: &str) -> Self {
        let bus_namespace = unique_name("watcher-test");
        let pool = cube_kit::redis::pool(&cube_testkit::require("CUBE_TEST_REDIS_URL")).expect("a Redis pool");
        let bus: Arc<dyn EventBus> = Arc::new(RedisBus::new(
            pool,
            BusOptions {
                namespace: bus_namespace.clone(),
                ..BusOptions::default()
            },
        ));
        let subscription = bus.subscribe(TOPIC, "test", "test").await.expect("subscribing");
        let clusters = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            clusters.path().join("clusters.json"),
            json!({"clusters": [{"name": "kube", "default": true, "kubeconfig": kubeconfig}]}).to_string(),
        )
        .expect("writing the clusters file");
        Self {
            bus_namespace,
            clusters,
            subscription,
            _bus: bus,
        }
    }

    fn start(&self, url: &str) -> WatcherProcess {
        WatcherProcess::start(url, &self.bus_namespace, &self.clusters.path().join("clusters.json"))
    }
}

/// Creates pod `name`, which no scheduler takes (the test plays its kubelet).
async fn create_pod(pods: &Api<Pod>, name: &str) {
    let mut pod_labels = labels::for_project("vision");
    pod_labels.insert("cube.test/pod".to_owned(), name.to_owned());
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": pod_labels},
        "spec": {
            "schedulerName": "cube-test-nobody",
            "containers": [{"name": "main", "image": "cube.test/worker:1"}],
        },
    }))
    .expect("a pod");
    pods.create(&PostParams::default(), &pod).await.expect("creating a pod");
}

/// Sets pod `name` running with its container started `restarts` times again: one change. While the API server
/// is down, tries again until it is back.
async fn set_restarts(pods: &Api<Pod>, name: &str, restarts: i32) {
    let status = json!({"status": {
        "phase": "Running",
        "containerStatuses": [{
            "name": "main", "image": "cube.test/worker:1", "imageID": "", "ready": true,
            "restartCount": restarts, "state": {"running": {"startedAt": "2026-12-04T00:00:00Z"}},
        }],
    }});
    tokio::time::timeout(TIMEOUT, async {
        while let Err(error) = pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            eprintln!("changing {name}: {error}; trying again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("changing {name}"));
}

/// Makes [`ROUNDS`] changes to each of `names`, round after round, in the background, counting them in `made`.
fn change_all(pods: &Api<Pod>, names: &[String], made: &Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    let (pods, names, made) = (pods.clone(), names.to_vec(), made.clone());
    tokio::spawn(async move {
        for round in 1..=ROUNDS {
            for name in &names {
                set_restarts(&pods, name, round).await;
                made.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
}

/// Waits until `made` reaches `count`.
async fn reach(made: &AtomicUsize, count: usize) {
    tokio::time::timeout(TIMEOUT, async {
        while made.load(Ordering::SeqCst) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} changes made"));
}

/// Reads until the last change to the last pod is published (everything before it is then, as the outbox
/// publishes in order), and checks that each pod's creation and each of its changes were published once.
async fn check_every_change_once(
    subscription: &mut Subscription,
    seen: &mut BTreeMap<String, WorkloadTransition>,
    namespace: &str,
    names: &[String],
) {
    let last = names.last().expect("a pod").clone();
    read(subscription, seen, namespace, |seen| {
        seen.values()
            .any(|transition| transition.name == last && transition.container_restarts == ROUNDS)
    })
    .await;
    let restarts = restarts_by_pod(seen);
    let expected: Vec<i32> = (0..=ROUNDS).collect();
    for name in names {
        assert_eq!(
            restarts.get(name),
            Some(&expected),
            "{name}: created, then each of its {ROUNDS} changes, once each"
        );
    }
}

/// Reads transitions of `namespace` (each id once) until `done` holds for them.
async fn read(
    subscription: &mut Subscription,
    seen: &mut BTreeMap<String, WorkloadTransition>,
    namespace: &str,
    done: impl Fn(&BTreeMap<String, WorkloadTransition>) -> bool,
) {
    tokio::time::timeout(TIMEOUT, async {
        while !done(seen) {
            let transition = common::next_in(subscription, namespace).await;
            seen.insert(transition.id.clone(), transition);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} transitions seen", seen.len()));
}

/// The restart counts each pod's transitions carried, in the order published, by pod name.
fn restarts_by_pod(seen: &BTreeMap<String, WorkloadTransition>) -> HashMap<String, Vec<i32>> {
    let mut ordered: Vec<&WorkloadTransition> = seen.values().collect();
    ordered.sort_by_key(|transition| transition.source_version.parse::<u64>().unwrap_or(u64::MAX));
    let mut restarts: HashMap<String, Vec<i32>> = HashMap::new();
    for transition in ordered {
        restarts
            .entry(transition.name.clone())
            .or_default()
            .push(transition.container_restarts);
    }
    restarts
}

async fn every_change_is_published_once_across_kills_of_the_watcher(url: &str) {
    let kube = client().await;
    let namespace = TestNamespace::unique(&kube, "restarts").await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &namespace.name);
    let mut setup = Setup::new(&cube_testkit::require("CUBE_TEST_KUBECONFIG")).await;
    let names: Vec<String> = (0..PODS).map(|index| format!("pod-{index}")).collect();
    for name in &names {
        create_pod(&pods, name).await;
    }
    let watcher = setup.start(url);
    // Once every pod is reported the watch is live: what changes from now on is what must be published.
    let mut seen = BTreeMap::new();
    read(&mut setup.subscription, &mut seen, &namespace.name, |seen| {
        seen.len() >= PODS
    })
    .await;

    // A thousand changes, one pod after another, round after round; the watcher is killed after a third of them
    // and started again after two thirds.
    let made = Arc::new(AtomicUsize::new(0));
    let changes = change_all(&pods, &names, &made);
    let total = PODS * usize::try_from(ROUNDS).expect("rounds");
    reach(&made, total / 3).await;
    watcher.kill().await;
    reach(&made, total * 2 / 3).await;
    let _watcher = setup.start(url);
    changes.await.expect("the changes are made");
    check_every_change_once(&mut setup.subscription, &mut seen, &namespace.name, &names).await;
}

/// A thousand changes on an API server of the test's own, restarted (SIGKILL) after a third of them: the
/// watcher resumes from its place. The server runs without its watch cache, so that it resumes from etcd, which
/// keeps the history across the restart; with the cache, a restarted server knows nothing before its start, so
/// the watcher is answered 410 and lists afresh (the other test shows that nothing false is published then).
async fn api_server_restart(url: &str) {
    let mut server = ApiServer::start(&["--watch-cache=false"]).await;
    let kubeconfig = server.kubeconfig().display().to_string();
    let kube = cube_testkit::kubernetes::client_from(&kubeconfig).await;
    let namespace = TestNamespace::unique(&kube, "apiserver").await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &namespace.name);
    let mut setup = Setup::new(&kubeconfig).await;
    let names: Vec<String> = (0..PODS).map(|index| format!("pod-{index}")).collect();
    for name in &names {
        create_pod(&pods, name).await;
    }
    let _watcher = setup.start(url);
    let mut seen = BTreeMap::new();
    read(&mut setup.subscription, &mut seen, &namespace.name, |seen| {
        seen.len() >= PODS
    })
    .await;

    let made = Arc::new(AtomicUsize::new(0));
    let changes = change_all(&pods, &names, &made);
    reach(&made, PODS * usize::try_from(ROUNDS).expect("rounds") / 3).await;
    server.restart().await;
    changes.await.expect("the changes are made");
    check_every_change_once(&mut setup.subscription, &mut seen, &namespace.name, &names).await;
}

async fn a_place_the_api_server_no_longer_holds_publishes_only_what_changed(url: &str) {
    let kube = client().await;
    let namespace = TestNamespace::unique(&kube, "gone").await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &namespace.name);
    let mut setup = Setup::new(&cube_testkit::require("CUBE_TEST_KUBECONFIG")).await;
    for name in ["same", "changed", "deleted"] {
        create_pod(&pods, name).await;
        set_restarts(&pods, name, 1).await;
    }
    let watcher = setup.start(url);
    let mut seen = BTreeMap::new();
    read(&mut setup.subscription, &mut seen, &namespace.name, |seen| {
        ["same", "changed", "deleted"].iter().all(|name| {
            seen.values()
                .any(|transition| transition.name == *name && transition.container_restarts == 1)
        })
    })
    .await;
    watcher.kill().await;

    // While it is down: one pod changes, one is deleted; and the place it would resume from is one no API server
    // holds any more (resourceVersion 1, long compacted), so it gets 410 Gone and lists afresh.
    set_restarts(&pods, "changed", 2).await;
    pods.delete("deleted", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("deleting");
    let db = cube_kit::db::connect::<cube_watcher::store::Migrator>(url, false)
        .await
        .expect("the watcher's database");
    for kind in [
        cube_proto::cube::watcher::v1::ObjectKind::Pod,
        cube_proto::cube::watcher::v1::ObjectKind::Deployment,
        cube_proto::cube::watcher::v1::ObjectKind::Node,
    ] {
        cube_watcher::store::save_position(
            &db,
            &cube_watcher::store::Position {
                cluster: "kube",
                kind,
                resource_version: "1",
            },
        )
        .await
        .expect("setting the place");
    }
    let before: HashSet<String> = seen.keys().cloned().collect();
    let watcher = setup.start(url);
    read(&mut setup.subscription, &mut seen, &namespace.name, |seen| {
        seen.values()
            .any(|transition| transition.name == "deleted" && transition.to_state() == WorkloadState::Deleted)
    })
    .await;
    // Listed afresh, it watches on.
    set_restarts(&pods, "changed", 3).await;
    read(&mut setup.subscription, &mut seen, &namespace.name, |seen| {
        seen.values()
            .any(|transition| transition.name == "changed" && transition.container_restarts == 3)
    })
    .await;
    let after: Vec<&WorkloadTransition> = seen
        .iter()
        .filter(|(id, _)| !before.contains(*id))
        .map(|(_, transition)| transition)
        .collect();
    let mut described: Vec<(String, i32, WorkloadState)> = after
        .iter()
        .map(|transition| {
            (
                transition.name.clone(),
                transition.container_restarts,
                transition.to_state(),
            )
        })
        .collect();
    described.sort();
    assert_eq!(
        described,
        [
            ("changed".to_owned(), 2, WorkloadState::Running),
            ("changed".to_owned(), 3, WorkloadState::Running),
            ("deleted".to_owned(), 1, WorkloadState::Deleted),
        ],
        "only what changed, nothing for the pod that did not: {after:#?}"
    );
    let log = watcher.log();
    assert!(log.contains("410"), "the API server answered 410 Gone: {log}");
}
