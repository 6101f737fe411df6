//! One runtime contract, run against both implementations through [`ClusterRuntime`]: `local::*` with real
//! processes (`sh -c` scripts), `kubernetes::*` on the test environment's real kube-apiserver and scheduler with the
//! fake kubelet playing the node. Apply twice makes one object; delete removes it; the status goes Pending →
//! Running → Succeeded or Failed with the exit code; a restarted runtime lists by labels what it made; logs are
//! followed to the end locally, and on Kubernetes without a kubelet are a clear `UNAVAILABLE`, not a hang.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cube_proto::cube::scheduler::v1::Placement;
use cube_runtime::kubernetes::KubernetesRuntime;
use cube_runtime::{
    ClusterRuntime, Container, LocalRuntime, ObjectKey, Phase, Runtime, RuntimeError, WorkloadSpec, WorkloadStatus,
    labels,
};
use cube_testkit::eventually;
use cube_testkit::kubernetes::{FakeNode, Kubelet, Script, TestNamespace, client, unique_name};
use futures::StreamExt as _;
use serde_json::json;

/// Longest wait for the runtime (or the fake kubelet) to do something.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The label only the Kubernetes harness's fake node carries and its pods select.
const RUN_LABEL: &str = "cube.test/run";

/// What a workload of the contract does.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Runs until it is deleted.
    Runs,
    /// Runs for a while, then exits with this code.
    Exits(i32),
}

/// A runtime under test and what it needs.
#[expect(
    clippy::large_enum_variant,
    reason = "two harnesses per test run; boxing buys nothing"
)]
enum Harness {
    Local {
        dir: tempfile::TempDir,
        runtime: ClusterRuntime,
    },
    Kubernetes {
        runtime: ClusterRuntime,
        kubelet: Option<Kubelet>,
        namespace: TestNamespace,
        _node: Box<FakeNode>,
    },
}

impl Harness {
    async fn local() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runtime, _changes) = LocalRuntime::open(dir.path()).await.expect("opening");
        Self::Local {
            dir,
            runtime: ClusterRuntime::Local(Arc::new(runtime)),
        }
    }

    async fn kubernetes() -> Self {
        let client = client().await;
        let run = unique_name("contract");
        let node = FakeNode::create(&client, json!({RUN_LABEL: run}), &[]).await;
        let namespace = TestNamespace::create(&client, run).await;
        Self::Kubernetes {
            runtime: ClusterRuntime::Kubernetes(KubernetesRuntime::new("test", client.clone())),
            kubelet: Some(Kubelet::start(&client, [&node])),
            namespace,
            _node: Box::new(node),
        }
    }

    fn runtime(&self) -> &ClusterRuntime {
        match self {
            Self::Local { runtime, .. } | Self::Kubernetes { runtime, .. } => runtime,
        }
    }

    fn cluster(&self) -> &'static str {
        match self {
            Self::Local { .. } => "local",
            Self::Kubernetes { .. } => "test",
        }
    }

    fn namespace(&self) -> String {
        match self {
            Self::Local { .. } => "vision".to_owned(),
            Self::Kubernetes { namespace, .. } => namespace.name.clone(),
        }
    }

    fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::new(self.cluster(), self.namespace(), name)
    }

    /// A workload `name` of run `run` doing `behaviour`: a script for `sh -c` locally, a kubelet script on
    /// Kubernetes.
    fn spec(&self, name: &str, run: &str, behaviour: Behaviour) -> WorkloadSpec {
        let mut labels = labels::for_project("vision");
        labels.insert(labels::RUN.to_owned(), run.to_owned());
        labels.insert("script".to_owned(), name.to_owned());
        let script = match behaviour {
            Behaviour::Runs => "echo started; sleep 600".to_owned(),
            Behaviour::Exits(code) => format!("echo started; sleep 0.8; echo ending with {code}; exit {code}"),
        };
        let placement = match self {
            Self::Local { .. } => None,
            Self::Kubernetes { kubelet, namespace, .. } => {
                let played = match behaviour {
                    Behaviour::Runs => Script::run(),
                    Behaviour::Exits(code) => Script::run_for(Duration::from_millis(800)).exit(code),
                };
                if let Some(kubelet) = kubelet {
                    kubelet.add_script(&format!("script={name}"), played);
                }
                let run_label = namespace.name.clone();
                Some(Placement {
                    node_selector: HashMap::from([(RUN_LABEL.to_owned(), run_label)]),
                    ..Placement::default()
                })
            }
        };
        WorkloadSpec {
            key: self.key(name),
            labels,
            containers: vec![Container {
                name: "main".to_owned(),
                image: "cube.test/worker:1".to_owned(),
                command: vec!["sh".to_owned(), "-c".to_owned()],
                args: vec![script],
                ..Container::default()
            }],
            placement,
            ..WorkloadSpec::default()
        }
    }

    /// The runtime as a new process would have it: the same data directory, or a new client of the cluster.
    async fn restarted(&self) -> ClusterRuntime {
        match self {
            Self::Local { dir, .. } => {
                let (runtime, _changes) = LocalRuntime::open(dir.path()).await.expect("reopening");
                ClusterRuntime::Local(Arc::new(runtime))
            }
            Self::Kubernetes { .. } => ClusterRuntime::Kubernetes(KubernetesRuntime::new("test", client().await)),
        }
    }

    /// Polls the workload until `done` says so; returns the distinct phases seen on the way and the last status.
    async fn follow(&self, name: &str, done: impl Fn(&WorkloadStatus) -> bool) -> (Vec<Phase>, WorkloadStatus) {
        let key = self.key(name);
        let phases = RefCell::new(Vec::<Phase>::new());
        let (seen, done) = (&phases, &done);
        let last = eventually(&format!("workload {name} to reach its state"), TIMEOUT, || {
            let key = key.clone();
            async move {
                let status = self.runtime().status(&key).await.expect("status")?;
                let mut seen = seen.borrow_mut();
                if seen.last() != Some(&status.phase) {
                    seen.push(status.phase);
                }
                done(&status).then_some(status)
            }
        })
        .await;
        (phases.into_inner(), last)
    }
}

/// Local workloads outlive their runtime (a restart adopts them): the test's own are killed when it ends.
impl Drop for Harness {
    fn drop(&mut self) {
        let Self::Local { dir, .. } = self else {
            return;
        };
        kill_groups(&dir.path().join("workloads"));
    }
}

/// Kills the process group of every workload recorded under `dir` (its record names the process once `apply`
/// returned).
fn kill_groups(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            kill_groups(&path);
        } else if path.file_name().is_some_and(|name| name == "record.json")
            && let Some(pid) = std::fs::read(&path)
                .ok()
                .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
                .and_then(|record| record["pid"].as_i64())
                .and_then(|pid| i32::try_from(pid).ok())
        {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs each named `async fn name(harness: Harness)` as `local::name` and `kubernetes::name`.
macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Harness::local().await).await;
            })*
        }
        mod kubernetes {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Harness::kubernetes().await).await;
            })*
        }
    };
}

contract!(
    applying_twice_makes_one_object,
    delete_removes_the_workload,
    the_status_goes_running_then_succeeded_with_exit_code_0,
    the_status_goes_running_then_failed_with_the_exit_code,
    a_restarted_runtime_lists_by_labels_what_it_made,
    logs_are_followed_to_the_end_or_unavailable_without_a_kubelet,
);

async fn applying_twice_makes_one_object(harness: Harness) {
    let run = unique_name("twice");
    let spec = harness.spec("twice", &run, Behaviour::Runs);
    let first = harness.runtime().apply(&spec).await.expect("the first apply");
    let second = harness.runtime().apply(&spec).await.expect("the second apply");
    assert_eq!((&first.key, &second.key), (&spec.key, &spec.key));
    let selector = BTreeMap::from([(labels::RUN.to_owned(), run)]);
    let listed = harness
        .runtime()
        .list(harness.cluster(), Some(&harness.namespace()), &selector)
        .await
        .expect("listing");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].labels.get("script").map(String::as_str), Some("twice"));
}

async fn delete_removes_the_workload(harness: Harness) {
    let spec = harness.spec("doomed", &unique_name("delete"), Behaviour::Runs);
    harness.runtime().apply(&spec).await.expect("applying");
    harness.follow("doomed", |status| status.phase == Phase::Running).await;
    assert!(
        harness
            .runtime()
            .delete(&spec.key, Duration::ZERO)
            .await
            .expect("deleting")
    );
    assert_eq!(harness.runtime().status(&spec.key).await.expect("status"), None);
    assert!(
        !harness
            .runtime()
            .delete(&spec.key, Duration::ZERO)
            .await
            .expect("deleting again"),
        "nothing left to delete"
    );
}

/// The phases of a workload that ran to `last`: Pending (when seen), Running, then `last`, in that order.
fn assert_life(phases: &[Phase], last: Phase) {
    let order = [Phase::Pending, Phase::Running, last];
    let positions: Vec<usize> = phases
        .iter()
        .map(|phase| order.iter().position(|wanted| wanted == phase).expect("no other phase"))
        .collect();
    assert!(positions.is_sorted(), "in order: {phases:?}");
    assert!(phases.contains(&Phase::Running), "seen running: {phases:?}");
    assert_eq!(phases.last(), Some(&last), "{phases:?}");
}

async fn the_status_goes_running_then_succeeded_with_exit_code_0(harness: Harness) {
    let spec = harness.spec("fine", &unique_name("ok"), Behaviour::Exits(0));
    let applied = harness.runtime().apply(&spec).await.expect("applying");
    assert!(matches!(applied.phase, Phase::Pending | Phase::Running), "{applied:?}");
    let (phases, done) = harness.follow("fine", |status| status.phase.is_final()).await;
    assert_life(&phases, Phase::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.started_at.is_some() && done.finished_at.is_some(), "{done:?}");
}

async fn the_status_goes_running_then_failed_with_the_exit_code(harness: Harness) {
    let spec = harness.spec("broken", &unique_name("bad"), Behaviour::Exits(3));
    harness.runtime().apply(&spec).await.expect("applying");
    let (phases, done) = harness.follow("broken", |status| status.phase.is_final()).await;
    assert_life(&phases, Phase::Failed);
    assert_eq!((done.exit_code, done.reason.as_deref()), (Some(3), Some("Error")));
}

async fn a_restarted_runtime_lists_by_labels_what_it_made(harness: Harness) {
    let run = unique_name("list");
    for name in ["one", "two"] {
        harness
            .runtime()
            .apply(&harness.spec(name, &run, Behaviour::Runs))
            .await
            .expect("applying");
    }
    harness
        .runtime()
        .apply(&harness.spec("other", &unique_name("other"), Behaviour::Runs))
        .await
        .expect("applying");
    let restarted = harness.restarted().await;
    let selector = BTreeMap::from([(labels::RUN.to_owned(), run)]);
    for namespace in [Some(harness.namespace()), None] {
        let listed = restarted
            .list(harness.cluster(), namespace.as_deref(), &selector)
            .await
            .expect("listing");
        let mut names: Vec<_> = listed.iter().map(|status| status.key.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["one", "two"], "namespace {namespace:?}");
    }
}

async fn logs_are_followed_to_the_end_or_unavailable_without_a_kubelet(mut harness: Harness) {
    let spec = harness.spec("talker", &unique_name("logs"), Behaviour::Exits(0));
    harness.runtime().apply(&spec).await.expect("applying");
    harness.follow("talker", |status| status.phase == Phase::Running).await;
    if let Harness::Kubernetes { kubelet, .. } = &mut harness {
        // The API server asks the node's kubelet for logs: this node has none that serves them.
        drop(kubelet.take());
    }
    let logs = tokio::time::timeout(TIMEOUT, harness.runtime().logs(&spec.key, true))
        .await
        .expect("logs answered rather than hung");
    match (&harness, logs) {
        (Harness::Local { .. }, Ok(stream)) => {
            let chunks: Vec<_> = tokio::time::timeout(TIMEOUT, stream.collect::<Vec<_>>())
                .await
                .expect("the followed log ends with the workload");
            let text: Vec<u8> = chunks
                .into_iter()
                .flat_map(|chunk| chunk.expect("a chunk").to_vec())
                .collect();
            assert_eq!(String::from_utf8_lossy(&text), "started\nending with 0\n");
        }
        (Harness::Kubernetes { .. }, Err(error @ RuntimeError::Unavailable(_))) => {
            assert_eq!(error.code(), cube_proto::tonic::Code::Unavailable, "{error}");
        }
        (_, other) => panic!("unexpected logs answer: {:?}", other.map(|_| "a stream")),
    }
}
