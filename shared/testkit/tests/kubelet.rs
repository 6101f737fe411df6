//! The fake kubelet against the test environment's real kube-apiserver and kube-scheduler: pods created through the
//! API are bound by the scheduler to a fake node, and the kubelet plays them as its script says.

use std::time::Duration;

use cube_testkit::eventually;
use cube_testkit::kubernetes::{FakeNode, Kubelet, Script, TestNamespace, client, unique_name};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{DeleteParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// A fake node only this test's pods select, a namespace for them, and the client.
struct Setup {
    client: Client,
    node: FakeNode,
    namespace: TestNamespace,
    run: String,
}

async fn setup() -> Setup {
    let client = client().await;
    let run = unique_name("kubelet");
    let node = FakeNode::create(&client, json!({"cube.test/run": run}), &[]).await;
    let namespace = TestNamespace::create(&client, run.clone()).await;
    Setup {
        client,
        node,
        namespace,
        run,
    }
}

impl Setup {
    /// Creates a pod with `labels` and `annotations` that only this test's node fits, and returns it as created.
    async fn pod(&self, name: &str, metadata: serde_json::Value, restart_policy: &str) -> Pod {
        let mut metadata = metadata;
        metadata["name"] = json!(name);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {
                "nodeSelector": {"cube.test/run": self.run},
                "restartPolicy": restart_policy,
                "containers": [{"name": "main", "image": "cube.test/worker:1"}],
            },
        }))
        .expect("a pod");
        self.namespace
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("creating a pod")
    }

    fn pods(&self) -> Api<Pod> {
        self.namespace.pods()
    }
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn container(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    let status = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)?;
    Some(status.status.clone())
}

/// Follows `created` from its creation until `done` says so, and returns every version of it seen on the way.
async fn follow(pods: &Api<Pod>, created: &Pod, done: impl Fn(&Pod) -> bool) -> Vec<Pod> {
    let name = created.metadata.name.as_deref().expect("pod name");
    let version = created.metadata.resource_version.as_deref().expect("resource version");
    let params = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut events = pods.watch(&params, version).await.expect("watching the pod").boxed();
    let mut seen = vec![created.clone()];
    while !seen.last().is_some_and(&done) {
        let event = tokio::time::timeout(TIMEOUT, events.try_next())
            .await
            .unwrap_or_else(|_| panic!("pod {name} got stuck; seen so far: {seen:#?}"))
            .expect("a watch event")
            .unwrap_or_else(|| panic!("the watch of pod {name} ended; seen so far: {seen:#?}"));
        match event {
            WatchEvent::Added(pod) | WatchEvent::Modified(pod) => seen.push(pod),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected watch event for pod {name}: {other:?}"),
        }
    }
    seen
}

/// Returns the phases in `seen`, each once, in order.
fn phases(seen: &[Pod]) -> Vec<&str> {
    let mut phases: Vec<&str> = seen.iter().filter_map(phase).collect();
    phases.dedup();
    phases
}

fn terminal(pod: &Pod) -> bool {
    matches!(phase(pod), Some("Succeeded" | "Failed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pod_runs_then_succeeds_with_exit_code_0() {
    let setup = setup().await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node]).script("app=ok", Script::run_for(ms(300)).exit(0));
    let created = setup.pod("ok", json!({"labels": {"app": "ok"}}), "Never").await;

    let seen = follow(&setup.pods(), &created, terminal).await;

    assert_eq!(phases(&seen), ["Pending", "Running", "Succeeded"]);
    let running = seen
        .iter()
        .find(|p| phase(p) == Some("Running"))
        .expect("a running version");
    let status = running.status.as_ref().expect("status");
    assert!(
        status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty()),
        "podIP: {status:?}"
    );
    assert_eq!(condition(running, "Ready").as_deref(), Some("True"), "{status:?}");
    let started = container(running).and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.clone());
    assert!(started.is_some(), "the running container's start time: {status:?}");
    assert_eq!(container(running).map(|c| c.ready), Some(true));

    let done = seen.last().expect("the last version");
    assert_eq!(
        done.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(setup.node.name.as_str()),
        "bound by the scheduler to the fake node"
    );
    let ended = container(done)
        .and_then(|c| c.state.as_ref()?.terminated.clone())
        .expect("a terminated container");
    assert_eq!((ended.exit_code, ended.reason.as_deref()), (0, Some("Completed")));
    assert_eq!(condition(done, "Ready").as_deref(), Some("False"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_scripted_by_annotation_fails_with_exit_code_3() {
    let setup = setup().await;
    let _kubelet =
        Kubelet::start(&setup.client, [&setup.node]).script("cube.test/script=fail", Script::run_for(ms(200)).exit(3));
    let created = setup
        .pod("fails", json!({"annotations": {"cube.test/script": "fail"}}), "Never")
        .await;

    let seen = follow(&setup.pods(), &created, terminal).await;

    assert_eq!(phases(&seen), ["Pending", "Running", "Failed"]);
    let ended = container(seen.last().expect("the last version"))
        .and_then(|c| c.state.as_ref()?.terminated.clone())
        .expect("a terminated container");
    assert_eq!((ended.exit_code, ended.reason.as_deref()), (3, Some("Error")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_restarts_twice_then_runs() {
    let setup = setup().await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node]).script(
        "app=flaky",
        Script::run_for(ms(200)).exit(1).times(2).then(Script::run()),
    );
    let created = setup.pod("flaky", json!({"labels": {"app": "flaky"}}), "Always").await;

    let seen = follow(&setup.pods(), &created, |pod| {
        container(pod).is_some_and(|c| c.restart_count == 2 && c.ready)
    })
    .await;

    let restarts: Vec<i32> = {
        let mut all: Vec<i32> = seen.iter().filter_map(container).map(|c| c.restart_count).collect();
        all.dedup();
        all
    };
    assert_eq!(restarts, [0, 1, 2], "restart counts seen");
    let now = seen.last().expect("the last version");
    assert_eq!(phase(now), Some("Running"));
    let status = container(now).expect("a container status");
    assert!(
        status.state.as_ref().and_then(|s| s.running.as_ref()).is_some(),
        "{status:?}"
    );
    let previous = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.clone())
        .expect("the previous run in lastState");
    assert_eq!((previous.exit_code, previous.reason.as_deref()), (1, Some("Error")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_container_fails_the_pod() {
    let setup = setup().await;
    let _kubelet =
        Kubelet::start(&setup.client, [&setup.node]).script("app=hungry", Script::run_for(ms(200)).oom_killed());
    let created = setup.pod("hungry", json!({"labels": {"app": "hungry"}}), "Never").await;

    let seen = follow(&setup.pods(), &created, terminal).await;

    assert_eq!(phases(&seen), ["Pending", "Running", "Failed"]);
    let ended = container(seen.last().expect("the last version"))
        .and_then(|c| c.state.as_ref()?.terminated.clone())
        .expect("a terminated container");
    assert_eq!((ended.exit_code, ended.reason.as_deref()), (137, Some("OOMKilled")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_backs_off() {
    let setup = setup().await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node]).script("app=missing", Script::image_pull_backoff());
    let created = setup
        .pod("missing", json!({"labels": {"app": "missing"}}), "Always")
        .await;

    let waiting_reason = |pod: &Pod| container(pod).and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
    let seen = follow(&setup.pods(), &created, |pod| {
        waiting_reason(pod).as_deref() == Some("ImagePullBackOff")
    })
    .await;

    let mut reasons: Vec<String> = seen.iter().filter_map(waiting_reason).collect();
    reasons.dedup();
    assert_eq!(reasons, ["ContainerCreating", "ErrImagePull", "ImagePullBackOff"]);
    assert_eq!(phases(&seen), ["Pending"], "a pod whose image is not there never runs");
    let now = seen.last().expect("the last version");
    let message = container(now)
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("cube.test/worker:1"),
        "the message names the image: {message:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_is_removed() {
    let setup = setup().await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node]);
    let created = setup
        .pod("doomed", json!({"labels": {"app": "doomed"}}), "Always")
        .await;
    follow(&setup.pods(), &created, |pod| phase(pod) == Some("Running")).await;

    // A running pod on a node is deleted gracefully: the API server keeps it until the node's kubelet says so.
    let deleting = setup
        .pods()
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("deleting the pod");
    let kept = deleting.left().expect("a graceful delete returns the pod it keeps");
    assert!(kept.metadata.deletion_timestamp.is_some(), "{:?}", kept.metadata);

    let pods = setup.pods();
    eventually("the kubelet to remove the deleted pod", TIMEOUT, || async {
        pods.get_opt("doomed")
            .await
            .expect("reading the pod")
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_kubelet_leaves_its_node_not_ready() {
    let setup = setup().await;
    let kubelet = Kubelet::start(&setup.client, [&setup.node]);
    let created = setup
        .pod("stranded", json!({"labels": {"app": "stranded"}}), "Always")
        .await;
    follow(&setup.pods(), &created, |pod| {
        condition(pod, "Ready").as_deref() == Some("True")
    })
    .await;

    kubelet.stop().await;

    let node = setup.node.get().await;
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|all| all.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_eq!(ready.as_deref(), Some("False"), "{:?}", node.status);
    let taints: Vec<String> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|all| all.iter().map(|t| format!("{}:{}", t.key, t.effect)).collect())
        .unwrap_or_default();
    assert_eq!(taints, ["node.kubernetes.io/not-ready:NoSchedule"]);
    let pod = setup.pods().get("stranded").await.expect("the pod stays");
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"), "{:?}", pod.status);
}
