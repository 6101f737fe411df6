//! Checks the Kubernetes control plane of the test environment (kube-apiserver, kube-controller-manager and
//! kube-scheduler v1.20 on etcd) with the kube client Cube uses: watches, CRDs, and placement of Pods on fake Nodes
//! by the real scheduler, with the test playing the kubelet.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cube_testkit::eventually;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Returns a client for the test control plane's admin, from the kubeconfig the script wrote.
async fn client() -> Client {
    cube_testkit::kubernetes::client().await
}

/// Returns a name no other test run uses: `prefix` and a lowercase suffix, valid as a DNS label and a label value.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "{prefix}-{:x}-{:x}-{}",
        std::process::id(),
        nanos % 0xffff_ffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn from_json<T: k8s_openapi::serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("object from json")
}

/// Deletes what a test made when the test ends, passed or failed, so nothing outlives the test.
///
/// Drop runs on its own thread and runtime with its own client: the test's runtime may be gone or panicking.
#[derive(Default)]
struct Cleanup {
    namespaces: Vec<String>,
    nodes: Vec<String>,
    crds: Vec<String>,
}

impl Cleanup {
    async fn namespace(&mut self, client: &Client, prefix: &str) -> String {
        let name = unique(prefix);
        let ns: Namespace = from_json(json!({"metadata": {"name": name, "labels": {"cube-test": "true"}}}));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        self.namespaces.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (namespaces, nodes, crds) = (
            std::mem::take(&mut self.namespaces),
            std::mem::take(&mut self.nodes),
            std::mem::take(&mut self.crds),
        );
        if namespaces.is_empty() && nodes.is_empty() && crds.is_empty() {
            return;
        }
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let client = client().await;
                let now = DeleteParams::default().grace_period(0);
                for ns in &namespaces {
                    if let Err(e) = Api::<Namespace>::all(client.clone())
                        .delete(ns, &DeleteParams::default())
                        .await
                    {
                        eprintln!("cleanup: delete namespace {ns}: {e}");
                    }
                    // Pods bound to fake nodes wait for a kubelet to confirm their graceful deletion: force it.
                    let pods = Api::<Pod>::namespaced(client.clone(), ns);
                    if let Err(e) = pods.delete_collection(&now, &ListParams::default()).await {
                        eprintln!("cleanup: delete pods in {ns}: {e}");
                    }
                }
                for node in &nodes {
                    if let Err(e) = Api::<Node>::all(client.clone())
                        .delete(node, &DeleteParams::default())
                        .await
                    {
                        eprintln!("cleanup: delete node {node}: {e}");
                    }
                }
                for crd in &crds {
                    let api = Api::<CustomResourceDefinition>::all(client.clone());
                    if let Err(e) = api.delete(crd, &DeleteParams::default()).await {
                        eprintln!("cleanup: delete crd {crd}: {e}");
                    }
                }
            });
        });
        if cleaned.join().is_err() {
            eprintln!("cleanup panicked");
        }
    }
}

/// The scheduler our unscheduled pods name, so that kube-scheduler leaves them alone.
const NO_SCHEDULER: &str = "cube-test-nobody";

fn pod(name: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
    let mut spec = spec;
    if spec.get("containers").is_none() {
        spec["containers"] = json!([{"name": "main", "image": "cube.test/idle:1"}]);
    }
    from_json(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Returns the status `type` condition of a pod, if it has one.
fn pod_condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// Plays the kubelet: reports the pod's containers started and ready.
async fn kubelet_runs(pods: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.as_deref().expect("pod name");
    let now = now();
    let container = pod.spec.as_ref().expect("pod spec").containers[0].clone();
    let conditions: Vec<_> = ["Initialized", "PodScheduled", "ContainersReady", "Ready"]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now}))
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "conditions": conditions,
        "hostIP": "10.0.0.1",
        "podIP": "10.244.0.7",
        "startTime": now,
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "ready": true,
            "started": true,
            "restartCount": 0,
            "state": {"running": {"startedAt": now}},
        }],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch status of pod {name}: {e}"));
}

type PodEvents = futures::stream::BoxStream<'static, watcher::Result<watcher::Event<Pod>>>;

/// Returns the next pod the watcher reports added or modified, and fails on any other event.
async fn next_apply(events: &mut PodEvents) -> Pod {
    let event = tokio::time::timeout(TIMEOUT, events.try_next())
        .await
        .expect("watch event in time");
    match event.expect("watcher event").expect("watcher stream open") {
        watcher::Event::Apply(pod) => pod,
        other => panic!("expected an added or modified pod, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_sees_a_pod_added_then_its_status_change() {
    let client = client().await;
    let mut cleanup = Cleanup::default();
    let ns = cleanup.namespace(&client, "cube-watch").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

    let app = unique("app");
    let mut events: PodEvents = watcher(pods.clone(), watcher::Config::default().labels(&format!("app={app}"))).boxed();
    // The initial list is empty; the pod is created after it, so it must arrive as a watch event.
    loop {
        let event = tokio::time::timeout(TIMEOUT, events.try_next())
            .await
            .expect("watcher init in time");
        match event.expect("watcher event").expect("watcher stream open") {
            watcher::Event::Init => {}
            watcher::Event::InitDone => break,
            other => {
                panic!("unexpected event in the initial list of an empty namespace: {other:?}")
            }
        }
    }

    let created = pods
        .create(
            &PostParams::default(),
            &pod(
                "worker",
                json!({"app": app, "role": "worker"}),
                json!({"schedulerName": NO_SCHEDULER}),
            ),
        )
        .await
        .expect("create pod");
    // A decoy with another label, which neither the list nor the watcher may return.
    pods.create(
        &PostParams::default(),
        &pod("decoy", json!({"app": "other"}), json!({"schedulerName": NO_SCHEDULER})),
    )
    .await
    .expect("create decoy pod");

    let listed = pods
        .list(&ListParams::default().labels(&format!("app={app},role=worker")))
        .await
        .expect("list");
    let names: Vec<_> = listed.items.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    assert_eq!(names, ["worker"], "pods listed by label selector");
    let listed = pods
        .list(&ListParams::default().labels(&format!("app={app},role=ps")))
        .await
        .expect("list");
    assert!(
        listed.items.is_empty(),
        "pods listed by a selector nothing matches: {:?}",
        listed.items
    );

    let added = next_apply(&mut events).await;
    assert_eq!(added.metadata.name.as_deref(), Some("worker"));
    assert_eq!(added.metadata.uid, created.metadata.uid);
    assert_eq!(phase(&added), Some("Pending"), "a new pod is pending");

    kubelet_runs(&pods, &created).await;
    let modified = next_apply(&mut events).await;
    assert_eq!(modified.metadata.uid, created.metadata.uid);
    assert_eq!(
        phase(&modified),
        Some("Running"),
        "the watcher sees the status the kubelet reported"
    );
    assert_eq!(
        pod_condition(&modified, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );

    // Unbound pods go at once: the watcher sees the deletion.
    pods.delete("worker", &DeleteParams::default())
        .await
        .expect("delete pod");
    let deleted = loop {
        let event = tokio::time::timeout(TIMEOUT, events.try_next())
            .await
            .expect("delete event in time");
        match event.expect("watcher event").expect("watcher stream open") {
            watcher::Event::Delete(pod) => break pod,
            watcher::Event::Apply(pod) if pod.metadata.deletion_timestamp.is_some() => {}
            other => panic!("expected the pod's deletion, got {other:?}"),
        }
    };
    assert_eq!(deleted.metadata.uid, created.metadata.uid);
}

#[tokio::test]
async fn a_crd_becomes_established_and_serves_custom_objects() {
    let client = client().await;
    let mut cleanup = Cleanup::default();
    let ns = cleanup.namespace(&client, "cube-crd").await;

    let group = format!("{}.cube.test", unique("g"));
    let crd_name = format!("widgets.{group}");
    let crd: CustomResourceDefinition = from_json(json!({
        "metadata": {"name": crd_name},
        "spec": {
            "group": group,
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1},
                                "color": {"type": "string"},
                            },
                        },
                        "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                    },
                }},
            }],
        },
    }));
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.expect("create crd");
    cleanup.crds.push(crd_name.clone());

    eventually("the crd to be established", TIMEOUT, || async {
        let crd = crds.get(&crd_name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;

    let gvk = GroupVersionKind::gvk(&group, "v1alpha1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource);
    let widget = DynamicObject::new("blue-widget", &resource).data(json!({"spec": {"size": 3, "color": "blue"}}));
    // Discovery of a new CRD can lag its Established condition by a moment.
    eventually("the first widget to be created", TIMEOUT, || async {
        widgets.create(&PostParams::default(), &widget).await.ok()
    })
    .await;

    let got = widgets.get("blue-widget").await.expect("get widget");
    assert_eq!(got.data["spec"]["size"], json!(3));
    assert_eq!(got.data["spec"]["color"], json!("blue"));
    assert_eq!(got.types.as_ref().map(|t| t.kind.as_str()), Some("Widget"));

    let status = json!({"status": {"ready": true}});
    widgets
        .patch_status("blue-widget", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch widget status");
    let got = widgets.get("blue-widget").await.expect("get widget");
    assert_eq!(got.data["status"]["ready"], json!(true));

    // The API server validates custom objects against the CRD's schema.
    let invalid = DynamicObject::new("bad-widget", &resource).data(json!({"spec": {"size": "three"}}));
    match widgets.create(&PostParams::default(), &invalid).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "invalid widget: {status:?}"),
        other => panic!("creating a widget with a string size must fail with 422, got {other:?}"),
    }
    let listed = widgets.list(&ListParams::default()).await.expect("list widgets");
    let names: Vec<_> = listed.items.iter().filter_map(|w| w.metadata.name.as_deref()).collect();
    assert_eq!(names, ["blue-widget"]);
}

/// Makes a fake node: labels, capacity, a Ready condition, and none of the taints a new node starts with.
async fn fake_node(nodes: &Api<Node>, name: &str, labels: BTreeMap<&str, &str>, capacity: serde_json::Value) {
    let node: Node = from_json(json!({"metadata": {"name": name, "labels": labels}}));
    nodes
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("create node {name}: {e}"));
    // The API server taints new nodes node.kubernetes.io/not-ready:NoSchedule until a kubelet reports Ready.
    let untaint = json!({"spec": {"taints": null}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&untaint))
        .await
        .expect("untaint node");
    let now = now();
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the test",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
        "nodeInfo": {
            "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "fake://1", "kernelVersion": "",
            "kubeProxyVersion": "v1.20.2", "kubeletVersion": "v1.20.2", "machineID": "", "operatingSystem": "linux",
            "osImage": "fake", "systemUUID": "",
        },
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch node status");
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

#[tokio::test]
async fn the_scheduler_places_gpu_pods_on_the_gpu_node() {
    let client = client().await;
    let mut cleanup = Cleanup::default();
    let ns = cleanup.namespace(&client, "cube-place").await;
    let nodes = Api::<Node>::all(client.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);

    // Every selector below names this run, so that nodes of other tests or runs never take our pods.
    let run = unique("run");
    let gpu_node = format!("cube-gpu-{run}");
    let cpu_node = format!("cube-cpu-{run}");
    cleanup.nodes.extend([gpu_node.clone(), cpu_node.clone()]);
    fake_node(
        &nodes,
        &gpu_node,
        BTreeMap::from([
            ("cube.test/run", run.as_str()),
            ("gpu", "true"),
            ("gpu-type", "T4"),
            ("train", "true"),
        ]),
        json!({"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "2"}),
    )
    .await;
    fake_node(
        &nodes,
        &cpu_node,
        BTreeMap::from([("cube.test/run", run.as_str()), ("cpu", "true")]),
        json!({"cpu": "16", "memory": "64Gi", "pods": "110"}),
    )
    .await;
    for name in [&gpu_node, &cpu_node] {
        let node = nodes.get(name).await.expect("get node");
        let spec = node.spec.expect("node spec");
        assert!(
            spec.taints.unwrap_or_default().is_empty(),
            "node {name} must have no taints"
        );
        let ready = node.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            ready.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
            "node {name} must be Ready"
        );
    }

    // A Deployment of GPU pods: the controller manager makes the pods, the scheduler binds them.
    let deployment: Deployment = from_json(json!({
        "metadata": {"name": "trainer"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "trainer"}},
            "template": {
                "metadata": {"labels": {"app": "trainer"}},
                "spec": {
                    "nodeSelector": {"cube.test/run": run, "gpu": "true"},
                    "containers": [{
                        "name": "train",
                        "image": "cube.test/trainer:1",
                        "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "1", "memory": "1Gi"}},
                    }],
                },
            },
        },
    }));
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    // A CPU-only pod, to show the cpu node takes pods at all, so that the GPU pods avoiding it means something.
    pods.create(
        &PostParams::default(),
        &pod(
            "cpu-job",
            json!({"app": "cpu-job"}),
            json!({"nodeSelector": {"cube.test/run": run, "cpu": "true"}}),
        ),
    )
    .await
    .expect("create cpu pod");

    let trainers = ListParams::default().labels("app=trainer");
    let bound = eventually("the scheduler to bind both trainer pods", TIMEOUT, || async {
        let pods = pods.list(&trainers).await.ok()?.items;
        (pods.len() == 2 && pods.iter().all(|p| node_name(p).is_some())).then_some(pods)
    })
    .await;
    for p in &bound {
        assert_eq!(
            node_name(p),
            Some(gpu_node.as_str()),
            "trainer pod {:?}",
            p.metadata.name
        );
        let owner = p
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
            .expect("owner reference");
        assert_eq!(
            owner.kind, "ReplicaSet",
            "trainer pods come from the deployment's replica set"
        );
    }
    let cpu_job = eventually("the scheduler to bind the cpu pod", TIMEOUT, || async {
        let pod = pods.get("cpu-job").await.ok()?;
        node_name(&pod).is_some().then_some(pod)
    })
    .await;
    assert_eq!(node_name(&cpu_job), Some(cpu_node.as_str()), "cpu pod");

    // With both GPUs taken, a GPU pod that either node's labels allow fits nowhere; nor does a pod asking for an
    // A100 nobody has. Both stay pending, unschedulable.
    pods.create(
        &PostParams::default(),
        &pod(
            "one-gpu-too-many",
            json!({"app": "overflow"}),
            json!({
                "nodeSelector": {"cube.test/run": run},
                "containers": [{
                    "name": "train", "image": "cube.test/trainer:1",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }],
            }),
        ),
    )
    .await
    .expect("create overflow pod");
    pods.create(
        &PostParams::default(),
        &pod(
            "wants-a100",
            json!({"app": "a100"}),
            json!({"nodeSelector": {"cube.test/run": run, "gpu-type": "A100"}}),
        ),
    )
    .await
    .expect("create a100 pod");
    for (name, why) in [
        ("one-gpu-too-many", "Insufficient nvidia.com/gpu"),
        ("wants-a100", "didn't match Pod's node affinity"),
    ] {
        let pod = eventually(&format!("the scheduler to give up on {name}"), TIMEOUT, || async {
            let pod = pods.get(name).await.ok()?;
            pod_condition(&pod, "PodScheduled").is_some().then_some(pod)
        })
        .await;
        let scheduled = pod_condition(&pod, "PodScheduled").expect("PodScheduled condition");
        assert_eq!(scheduled.status, "False", "{name}: {scheduled:?}");
        assert_eq!(
            scheduled.reason.as_deref(),
            Some("Unschedulable"),
            "{name}: {scheduled:?}"
        );
        let message = scheduled.message.as_deref().unwrap_or_default();
        assert!(
            message.contains(why),
            "{name}: the scheduler's message {message:?} must say {why:?}"
        );
        assert_eq!(node_name(&pod), None, "{name} must not be bound");
        assert_eq!(phase(&pod), Some("Pending"), "{name}");
    }

    // The test plays the kubelet of the GPU node: the trainers run and are ready, so the deployment is.
    for p in &bound {
        kubelet_runs(&pods, p).await;
    }
    let status = eventually("the deployment to count 2 ready replicas", TIMEOUT, || async {
        let status = deployments.get("trainer").await.ok()?.status?;
        (status.ready_replicas == Some(2)).then_some(status)
    })
    .await;
    assert_eq!(status.available_replicas, Some(2), "{status:?}");
    assert_eq!(status.updated_replicas, Some(2), "{status:?}");

    // Nothing moved: the trainers are still the same two pods on the GPU node, and nothing is on the cpu node
    // but the cpu job.
    let on_cpu_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={cpu_node}")))
        .await;
    let on_cpu_node: Vec<_> = on_cpu_node
        .expect("list")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(on_cpu_node, ["cpu-job"], "pods on the cpu node");
    let now_bound = pods.list(&trainers).await.expect("list trainers").items;
    let mut uids: Vec<_> = now_bound.iter().map(|p| p.metadata.uid.clone()).collect();
    let mut bound_uids: Vec<_> = bound.iter().map(|p| p.metadata.uid.clone()).collect();
    uids.sort();
    bound_uids.sort();
    assert_eq!(uids, bound_uids, "the trainer pods");
}
