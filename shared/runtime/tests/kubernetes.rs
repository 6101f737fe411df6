//! The Kubernetes runtime against the test environment's real kube-apiserver, controller manager and scheduler, with
//! the fake kubelet playing the nodes.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use cube_proto::cube::scheduler::v1::{AffinityTerm, Placement};
use cube_runtime::kubernetes::{
    Autoscaling, Destination, KubernetesRuntime, Metadata, VirtualService, autoscaling_version, config_map, deployment,
    image_pull_secret, owner_of, pod_status, secret, service,
};
use cube_runtime::{
    Container, ObjectKey, Phase, PodField, Port, RestartPolicy, Runtime, RuntimeError, WorkloadSpec, labels,
};
use cube_testkit::eventually;
use cube_testkit::kubernetes::{FakeNode, Kubelet, Script, TestNamespace, client, unique_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

/// How long a test waits for the cluster (or the fake kubelet) to do something.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster name the runtimes of these tests answer for.
const CLUSTER: &str = "test";

/// A label only this test's fake nodes carry and its pods select.
const RUN_LABEL: &str = "cube.test/run";

/// A fake node only this test's pods select, a namespace for them, a runtime, and the client.
struct Setup {
    client: Client,
    node: FakeNode,
    namespace: TestNamespace,
    run: String,
    runtime: KubernetesRuntime,
}

async fn setup(prefix: &str) -> Setup {
    let client = client().await;
    let run = unique_name(prefix);
    let node = FakeNode::create(&client, json!({RUN_LABEL: run}), &[]).await;
    let namespace = TestNamespace::create(&client, run.clone()).await;
    Setup {
        runtime: KubernetesRuntime::new(CLUSTER, client.clone()),
        client,
        node,
        namespace,
        run,
    }
}

impl Setup {
    fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::new(CLUSTER, &self.namespace.name, name)
    }

    /// A task-like workload `name` that only this test's nodes fit, labelled `script=<name>` for the kubelet.
    fn spec(&self, name: &str) -> WorkloadSpec {
        let mut labels = labels::for_project("vision");
        labels.insert(labels::RUN.to_owned(), self.run.clone());
        labels.insert("script".to_owned(), name.to_owned());
        WorkloadSpec {
            key: self.key(name),
            labels,
            containers: vec![Container {
                name: "main".to_owned(),
                image: "cube.test/worker:1".to_owned(),
                command: vec!["python".to_owned()],
                args: vec!["train.py".to_owned()],
                env: vec![("EPOCHS".to_owned(), "3".to_owned())],
                env_from_pod: vec![("NODE".to_owned(), PodField::NodeName)],
                working_dir: Some("/work".to_owned()),
                ports: vec![Port {
                    name: "http".to_owned(),
                    container_port: 8080,
                }],
                requests: BTreeMap::from([("cpu".to_owned(), "100m".to_owned())]),
                limits: BTreeMap::from([("memory".to_owned(), "1Gi".to_owned())]),
            }],
            // No claims: the scheduler does not bind a pod whose claim does not exist.
            volumes: cube_volumes::parse("4G(memory):/dev/shm,settings(configmap):/etc/app").expect("volumes"),
            user: "alice".to_owned(),
            placement: Some(Placement {
                node_selector: HashMap::from([(RUN_LABEL.to_owned(), self.run.clone())]),
                ..Placement::default()
            }),
            restart_policy: RestartPolicy::Never,
            deadline: Some(Duration::from_secs(3600)),
            ..WorkloadSpec::default()
        }
    }

    /// Polls the workload until `done` says so, and returns every distinct phase seen on the way and the last status.
    async fn follow(
        &self,
        name: &str,
        done: impl Fn(&cube_runtime::WorkloadStatus) -> bool,
    ) -> (Vec<Phase>, cube_runtime::WorkloadStatus) {
        let key = self.key(name);
        let phases = RefCell::new(Vec::<Phase>::new());
        let (phases_seen, done) = (&phases, &done);
        let last = eventually(&format!("workload {name} to reach its state"), TIMEOUT, || {
            let key = key.clone();
            let runtime = self.runtime.clone();
            async move {
                let status = runtime.status(&key).await.expect("reading the status")?;
                let mut phases = phases_seen.borrow_mut();
                if phases.last() != Some(&status.phase) {
                    phases.push(status.phase);
                }
                done(&status).then_some(status)
            }
        })
        .await;
        (phases.into_inner(), last)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_twice_makes_one_pod() {
    let setup = setup("twice").await;
    let mut spec = setup.spec("twice");
    spec.volumes = cube_volumes::parse("work(pvc):/mnt,4G(memory):/dev/shm").expect("volumes");

    let first = setup.runtime.apply(&spec).await.expect("the first apply");
    let second = setup.runtime.apply(&spec).await.expect("the second apply");

    assert_eq!(first.key, spec.key);
    assert_eq!(second.key, spec.key);
    let pods = setup
        .namespace
        .pods()
        .list(&Default::default())
        .await
        .expect("listing pods");
    assert_eq!(pods.items.len(), 1, "one pod: {:?}", pods.items);
    let pod = &pods.items[0];
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get(labels::MANAGED_BY).map(String::as_str), Some(labels::CUBE));
    let managers: Vec<_> = pod
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.manager.as_deref())
        .collect();
    assert!(
        managers.contains(&"cube"),
        "applied by field manager cube: {managers:?}"
    );
    let pod_spec = pod.spec.as_ref().expect("a pod spec");
    assert_eq!(pod_spec.active_deadline_seconds, Some(3600));
    let container = &pod_spec.containers[0];
    let mounts: Vec<_> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.sub_path.as_deref()))
        .collect();
    assert_eq!(mounts, [("/mnt/alice", Some("alice")), ("/dev/shm", None)]);
    let env: Vec<(String, Option<String>, Option<String>)> = container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let path = var
                .value_from
                .as_ref()
                .and_then(|from| from.field_ref.as_ref())
                .map(|field| field.field_path.clone());
            (var.name.clone(), var.value.clone(), path)
        })
        .collect();
    assert_eq!(
        env,
        [
            ("EPOCHS".to_owned(), Some("3".to_owned()), None),
            ("NODE".to_owned(), None, Some("spec.nodeName".to_owned())),
        ],
        "literal values, then the downward API's"
    );

    // A changed spec of the same key changes nothing and does not fail, though a pod's spec is immutable.
    let mut changed = spec.clone();
    changed.containers[0].image = "cube.test/worker:2".to_owned();
    setup.runtime.apply(&changed).await.expect("applying a changed spec");
    let pod = setup.namespace.pods().get("twice").await.expect("the pod");
    assert_eq!(
        pod.spec.and_then(|s| s.containers[0].image.clone()).as_deref(),
        Some("cube.test/worker:1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_goes_pending_running_succeeded_with_exit_code_0() {
    let setup = setup("succeeds").await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node])
        .script("script=ok", Script::run_for(Duration::from_millis(800)).exit(0));

    let applied = setup.runtime.apply(&setup.spec("ok")).await.expect("applying");
    assert_eq!(applied.phase, Phase::Pending);
    let (phases, done) = setup.follow("ok", |s| s.phase.is_final()).await;

    assert_eq!(phases.last(), Some(&Phase::Succeeded), "{phases:?}");
    assert!(phases.contains(&Phase::Running), "{phases:?}");
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.node.as_deref(), Some(setup.node.name.as_str()));
    assert!(done.address.is_some(), "{done:?}");
    assert_eq!(done.ports.get("http"), Some(&8080));
    assert!(done.finished_at.is_some() && done.started_at.is_some(), "{done:?}");
    assert!(!done.version.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_fails_with_its_exit_code() {
    let setup = setup("fails").await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node])
        .script("script=bad", Script::run_for(Duration::from_millis(800)).exit(3));

    setup.runtime.apply(&setup.spec("bad")).await.expect("applying");
    let (phases, done) = setup.follow("bad", |s| s.phase.is_final()).await;

    assert_eq!(phases.last(), Some(&Phase::Failed), "{phases:?}");
    assert!(phases.contains(&Phase::Running), "{phases:?}");
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.reason.as_deref(), Some("Error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_come_from_the_containers() {
    let setup = setup("reasons").await;
    let _kubelet = Kubelet::start(&setup.client, [&setup.node])
        .script("script=oom", Script::run_for(Duration::from_millis(300)).oom_killed())
        .script("script=pull", Script::image_pull_backoff());

    setup.runtime.apply(&setup.spec("oom")).await.expect("applying");
    setup.runtime.apply(&setup.spec("pull")).await.expect("applying");

    let (_, oom) = setup.follow("oom", |s| s.phase.is_final()).await;
    assert_eq!(
        (oom.phase, oom.reason.as_deref(), oom.exit_code),
        (Phase::Failed, Some("OOMKilled"), Some(137))
    );
    let (_, pull) = setup
        .follow("pull", |s| s.reason.as_deref() == Some("ImagePullBackOff"))
        .await;
    assert_eq!(pull.phase, Phase::Pending);
    assert!(pull.message.is_some(), "{pull:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_with_grace_0_removes_a_bound_pod_no_kubelet_confirms() {
    let setup = setup("delete").await;
    let key = setup.key("gone");
    setup.runtime.apply(&setup.spec("gone")).await.expect("applying");
    let runtime = setup.runtime.clone();
    eventually("the pod to be bound to the fake node", TIMEOUT, || {
        let (runtime, key) = (runtime.clone(), key.clone());
        async move { runtime.status(&key).await.expect("status")?.node }
    })
    .await;

    assert!(setup.runtime.delete(&key, Duration::ZERO).await.expect("deleting"));

    assert_eq!(
        setup.runtime.status(&key).await.expect("status"),
        None,
        "removed at once"
    );
    assert!(
        !setup
            .runtime
            .delete(&key, Duration::ZERO)
            .await
            .expect("deleting again"),
        "nothing to delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_runtime_lists_what_was_made_by_labels() {
    let setup = setup("list").await;
    for name in ["one", "two"] {
        setup.runtime.apply(&setup.spec(name)).await.expect("applying");
    }
    let mut other = setup.spec("other");
    other.labels.insert(labels::RUN.to_owned(), "another-run".to_owned());
    setup.runtime.apply(&other).await.expect("applying");

    let restarted = KubernetesRuntime::new(CLUSTER, client().await);
    let selector = BTreeMap::from([(labels::RUN.to_owned(), setup.run.clone())]);
    for namespace in [Some(setup.namespace.name.as_str()), None] {
        let listed = restarted.list(CLUSTER, namespace, &selector).await.expect("listing");
        let mut names: Vec<_> = listed.iter().map(|s| s.key.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["one", "two"], "namespace {namespace:?}");
        assert!(listed.iter().all(|s| s.key.namespace == setup.namespace.name));
    }
    let wrong = restarted.list("elsewhere", None, &selector).await;
    assert!(matches!(wrong, Err(RuntimeError::Invalid { field, .. }) if field == "cluster"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_without_a_kubelet_are_unavailable_not_a_hang() {
    let setup = setup("logs").await;
    let kubelet = Kubelet::start(&setup.client, [&setup.node]);
    setup.runtime.apply(&setup.spec("talk")).await.expect("applying");
    setup.follow("talk", |s| s.phase == Phase::Running).await;
    drop(kubelet);

    for follow in [false, true] {
        let got = tokio::time::timeout(TIMEOUT, setup.runtime.logs(&setup.key("talk"), follow))
            .await
            .expect("logs answered rather than hung");
        match got {
            Err(error @ RuntimeError::Unavailable(_)) => {
                assert_eq!(error.code(), cube_proto::tonic::Code::Unavailable);
                assert!(error.to_string().contains(&setup.node.name), "names the node: {error}");
            }
            Err(other) => panic!("expected unavailable, got {other:?}"),
            Ok(_) => panic!("expected unavailable, got a log stream"),
        }
    }
    // A pod no node fits has no node to read from either.
    let mut nowhere = setup.spec("nowhere");
    if let Some(placement) = nowhere.placement.as_mut() {
        placement
            .node_selector
            .insert("cube.test/none".to_owned(), "true".to_owned());
    }
    setup.runtime.apply(&nowhere).await.expect("applying");
    let unbound = setup.runtime.logs(&setup.key("nowhere"), true).await;
    assert!(
        matches!(unbound, Err(RuntimeError::Unavailable(_))),
        "{:?}",
        unbound.err()
    );
    let missing = setup.runtime.logs(&setup.key("nobody"), false).await;
    assert!(matches!(missing, Err(RuntimeError::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_placement_is_bound_to_the_node_with_gpus() {
    let client = client().await;
    let run = unique_name("gpu");
    let gpu = FakeNode::create(
        &client,
        json!({RUN_LABEL: run, "gpu": "true"}),
        &[("nvidia.com/gpu", 4)],
    )
    .await;
    let _cpu = FakeNode::create(&client, json!({RUN_LABEL: run, "cpu": "true"}), &[]).await;
    let _no_gpus = FakeNode::create(&client, json!({RUN_LABEL: run, "gpu": "true"}), &[]).await;
    let namespace = TestNamespace::create(&client, run.clone()).await;
    let runtime = KubernetesRuntime::new(CLUSTER, client.clone());
    let gpus = HashMap::from([("nvidia.com/gpu".to_owned(), "1".to_owned())]);
    let placement = Placement {
        node_selector: HashMap::from([
            (RUN_LABEL.to_owned(), run.clone()),
            ("gpu".to_owned(), "true".to_owned()),
        ]),
        requests: gpus.clone(),
        limits: gpus,
        pod_labels: HashMap::from([("gpu".to_owned(), "true".to_owned())]),
        pod_affinity: vec![AffinityTerm {
            weight: 10,
            match_labels: HashMap::from([("gpu".to_owned(), "true".to_owned())]),
            topology_key: String::new(),
        }],
        pod_annotations: HashMap::from([("scheduler.cube.dev/workload".to_owned(), "projects/vision/x".to_owned())]),
        ..Placement::default()
    };
    let spec = WorkloadSpec {
        key: ObjectKey::new(CLUSTER, &namespace.name, "trainer"),
        labels: labels::for_project("vision"),
        containers: vec![Container {
            name: "main".to_owned(),
            image: "cube.test/worker:1".to_owned(),
            ..Container::default()
        }],
        placement: Some(placement),
        ..WorkloadSpec::default()
    };

    runtime.apply(&spec).await.expect("applying");
    let node = eventually("the GPU pod to be bound", TIMEOUT, || {
        let (runtime, key) = (runtime.clone(), spec.key.clone());
        async move { runtime.status(&key).await.expect("status")?.node }
    })
    .await;

    assert_eq!(node, gpu.name, "bound to the node with GPUs");
    let pod = namespace.pods().get("trainer").await.expect("the pod");
    let labels = pod.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("gpu").map(String::as_str),
        Some("true"),
        "the placement's pod labels"
    );
    let annotations = pod.metadata.annotations.unwrap_or_default();
    assert!(
        annotations.contains_key("scheduler.cube.dev/workload"),
        "{annotations:?}"
    );
}

/// The manifests of `k8s/crds/`, applied through the API, and established.
async fn apply_crds(client: &Client) {
    let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../k8s/crds");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let entries = std::fs::read_dir(&directory).unwrap_or_else(|error| panic!("{}: {error}", directory.display()));
    let mut names = Vec::new();
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let name = crd.metadata.name.clone().expect("a CRD name");
        crds.patch(&name, &PatchParams::apply("cube-test").force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|error| panic!("applying {}: {error}", path.display()));
        names.push(name);
    }
    assert!(!names.is_empty(), "no CRDs in {}", directory.display());
    for name in names {
        eventually(&format!("CRD {name} to be established"), TIMEOUT, || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                let conditions = crd.status?.conditions?;
                conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_kind_built_from_a_spec_is_accepted() {
    let setup = setup("objects").await;
    let runtime = &setup.runtime;
    let mut spec = setup.spec("model");
    spec.restart_policy = RestartPolicy::Always;
    spec.image_pull_secrets = vec!["model-pull".to_owned()];

    let applied = runtime
        .apply_object(&deployment(&spec, 2).expect("a deployment"))
        .await
        .expect("deployment");
    let owner = owner_of(&applied).expect("the deployment's owner reference");
    let mut child = spec.clone();
    child.owner = Some(owner.clone());
    let child_meta = |name: &str| {
        let mut meta = Metadata::of(&child).expect("metadata");
        meta.key.name = name.to_owned();
        meta
    };

    let svc = runtime
        .apply_object(&service(&child).expect("a service"))
        .await
        .expect("service");
    let ports = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    assert_eq!(ports.first().map(|p| p.port), Some(8080));
    runtime
        .apply_object(&config_map(
            &child_meta("model-config"),
            BTreeMap::from([("a".into(), "1".into())]),
        ))
        .await
        .expect("config map");
    runtime
        .apply_object(&secret(
            &child_meta("model-secret"),
            BTreeMap::from([("token".into(), b"s3cr3t".to_vec())]),
        ))
        .await
        .expect("secret");
    let pull = image_pull_secret(&child_meta("model-pull"), "harbor.example.com", "robot", "pa55")
        .expect("an image pull secret");
    let pull = runtime.apply_object(&pull).await.expect("image pull secret");
    assert_eq!(pull.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));

    let resource = runtime.autoscaling_resource().await.expect("discovery");
    let served: Vec<String> = setup
        .client
        .list_api_groups()
        .await
        .expect("api groups")
        .groups
        .into_iter()
        .filter(|g| g.name == "autoscaling")
        .flat_map(|g| g.versions.into_iter().map(|v| v.version))
        .collect();
    assert_eq!(
        Some(resource.version.as_str()),
        autoscaling_version(&served),
        "served: {served:?}"
    );
    let scaling = Autoscaling {
        min_replicas: 1,
        max_replicas: 4,
        cpu_utilization: Some(80),
        memory_utilization: Some(90),
    };
    let hpa = runtime
        .apply_autoscaler(&child_meta("model"), "model", scaling)
        .await
        .expect("horizontal pod autoscaler");
    assert_eq!(
        hpa.types.as_ref().map(|t| t.api_version.as_str()),
        Some(format!("autoscaling/{}", resource.version).as_str())
    );

    apply_crds(&setup.client).await;
    let routes = VirtualService {
        hosts: vec!["model.example.com".to_owned()],
        gateways: vec!["istio-system/cube".to_owned()],
        destinations: vec![
            Destination {
                host: "model".to_owned(),
                port: 8080,
                weight: 90,
            },
            Destination {
                host: "model-canary".to_owned(),
                port: 8080,
                weight: 10,
            },
        ],
    };
    let meta = child_meta("model");
    // Right after a CRD is established, the API server may take a moment to serve it.
    let vs = eventually("the VirtualService to be accepted", TIMEOUT, || {
        let (runtime, meta, routes) = (runtime.clone(), meta.clone(), routes.clone());
        async move { runtime.apply_virtual_service(&meta, &routes).await.ok() }
    })
    .await;
    assert_eq!(vs.data["spec"]["http"][0]["route"][1]["weight"], json!(10));

    // The controller manager makes the Deployment's pods, with the workload's labels.
    let pods = setup.namespace.pods();
    eventually("the deployment's pods", TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let listed = pods.list(&Default::default()).await.ok()?;
            (listed.items.len() == 2).then_some(())
        }
    })
    .await;

    // Deleting the parent deletes its children.
    let deleted = runtime.delete_object::<Deployment>(&setup.key("model")).await;
    assert!(deleted.expect("deleting the deployment"));
    assert!(
        !runtime
            .delete_object::<Deployment>(&setup.key("model"))
            .await
            .expect("deleting again")
    );
    let namespace = setup.namespace.name.clone();
    let client = setup.client.clone();
    eventually("the children to be collected", TIMEOUT, || {
        let (client, namespace) = (client.clone(), namespace.clone());
        async move {
            let gone_service = Api::<Service>::namespaced(client.clone(), &namespace)
                .get_opt("model")
                .await
                .ok()?;
            let gone_map = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .get_opt("model-config")
                .await
                .ok()?;
            let gone_secret = Api::<Secret>::namespaced(client, &namespace)
                .get_opt("model-pull")
                .await
                .ok()?;
            (gone_service.is_none() && gone_map.is_none() && gone_secret.is_none()).then_some(())
        }
    })
    .await;
}

#[test]
fn builders_refuse_what_the_api_server_would() {
    let mut spec = WorkloadSpec {
        key: ObjectKey::new(CLUSTER, "ns", "x"),
        ..WorkloadSpec::default()
    };
    let field = |result: Result<Pod, RuntimeError>| match result {
        Err(RuntimeError::Invalid { field, .. }) => field,
        other => panic!("expected invalid, got {other:?}"),
    };
    assert_eq!(field(cube_runtime::kubernetes::pod(&spec)), "containers");
    spec.containers.push(Container {
        name: "main".to_owned(),
        ..Container::default()
    });
    assert_eq!(field(cube_runtime::kubernetes::pod(&spec)), "containers[0].image");
    spec.containers[0].image = "x:1".to_owned();
    spec.deadline = Some(Duration::ZERO);
    assert_eq!(field(cube_runtime::kubernetes::pod(&spec)), "deadline");
    spec.deadline = Some(Duration::from_millis(1500));
    let pod = cube_runtime::kubernetes::pod(&spec).expect("a pod");
    assert_eq!(
        pod.spec.and_then(|s| s.active_deadline_seconds),
        Some(2),
        "never shortened"
    );
    spec.labels.insert(labels::MANAGED_BY.to_owned(), "helm".to_owned());
    assert_eq!(field(cube_runtime::kubernetes::pod(&spec)), "labels");
    assert!(matches!(
        service(&WorkloadSpec {
            labels: BTreeMap::new(),
            ..spec.clone()
        }),
        Err(RuntimeError::Invalid { .. })
    ));
}

#[test]
fn the_autoscaling_version_prefers_v2() {
    let served = |versions: &[&str]| versions.iter().map(|v| (*v).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        autoscaling_version(&served(&["v1", "v2beta1", "v2beta2"])),
        Some("v2beta2")
    );
    assert_eq!(autoscaling_version(&served(&["v1", "v2", "v2beta2"])), Some("v2"));
    assert_eq!(autoscaling_version(&served(&["v1", "v2beta1"])), None);
}

#[test]
fn image_pull_secrets_carry_docker_credentials() {
    let meta = Metadata::new(ObjectKey::new(CLUSTER, "ns", "pull"), BTreeMap::new()).expect("metadata");
    let secret = image_pull_secret(&meta, "harbor.example.com", "robot", "pa55").expect("a secret");
    let data = secret.data.expect("data");
    let config: serde_json::Value = serde_json::from_slice(&data[".dockerconfigjson"].0).expect("docker config JSON");
    assert_eq!(
        config,
        json!({"auths": {"harbor.example.com": {"username": "robot", "password": "pa55", "auth": "cm9ib3Q6cGE1NQ=="}}})
    );
    assert_eq!(
        secret
            .metadata
            .labels
            .unwrap_or_default()
            .get(labels::MANAGED_BY)
            .map(String::as_str),
        Some("cube")
    );
    assert!(
        matches!(image_pull_secret(&meta, "", "u", "p"), Err(RuntimeError::Invalid { field, .. }) if field == "registry")
    );
}

#[test]
fn pod_statuses_tell_why() {
    let pod = |status: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "42", "labels": {"a": "b"}},
            "spec": {"nodeName": "n1", "containers": [
                {"name": "side", "image": "x"}, {"name": "main", "image": "x"}]},
            "status": status,
        }))
        .expect("a pod")
    };
    let terminated = |name: &str, code: i32, reason: &str| {
        json!({"name": name, "ready": false, "restartCount": 2, "image": "x", "imageID": "",
               "state": {"terminated": {"exitCode": code, "reason": reason}}})
    };
    let evicted = pod_status(
        CLUSTER,
        &pod(json!({"phase": "Failed", "reason": "Evicted", "message": "the node was low on memory"})),
    );
    assert_eq!(
        (evicted.phase, evicted.reason.as_deref()),
        (Phase::Failed, Some("Evicted"))
    );
    assert_eq!(evicted.message.as_deref(), Some("the node was low on memory"));
    assert_eq!((evicted.version.as_str(), evicted.node.as_deref()), ("42", Some("n1")));

    // The first container of the spec is the main one, wherever its status is listed.
    let failed = pod_status(
        CLUSTER,
        &pod(json!({"phase": "Failed", "containerStatuses": [
            terminated("main", 3, "Error"), terminated("side", 0, "Completed")]})),
    );
    assert_eq!(
        (failed.exit_code, failed.reason.as_deref(), failed.restarts),
        (Some(0), Some("Completed"), 4)
    );

    let pulling = pod_status(
        CLUSTER,
        &pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "side", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
             "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "main", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
             "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]})),
    );
    assert_eq!(
        (pulling.reason.as_deref(), pulling.message.as_deref()),
        (Some("ErrImagePull"), Some("not found"))
    );
    let empty = pod_status(CLUSTER, &pod(json!({})));
    assert_eq!((empty.phase, empty.reason, empty.ready), (Phase::Pending, None, false));
}

#[test]
fn a_deployment_runs_the_pod_of_its_spec() {
    let spec = WorkloadSpec {
        key: ObjectKey::new(CLUSTER, "ns", "model"),
        labels: labels::for_project("vision"),
        containers: vec![Container {
            name: "main".to_owned(),
            image: "x:1".to_owned(),
            ..Container::default()
        }],
        restart_policy: RestartPolicy::Never,
        deadline: Some(Duration::from_secs(60)),
        privileged: true,
        ..WorkloadSpec::default()
    };
    let pod = cube_runtime::kubernetes::pod(&spec).expect("a pod");
    let deployment = deployment(&spec, 3).expect("a deployment");
    let deployment_spec = deployment.spec.expect("a deployment spec");
    let template = deployment_spec.template.spec.expect("a template");
    let pod_spec = pod.spec.expect("a pod spec");
    assert_eq!(template.containers, pod_spec.containers);
    assert_eq!(template.volumes, pod_spec.volumes);
    assert_eq!(template.restart_policy.as_deref(), Some("Always"));
    assert_eq!(template.active_deadline_seconds, None);
    assert_eq!(pod_spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        pod_spec.containers[0]
            .security_context
            .as_ref()
            .and_then(|c| c.privileged),
        Some(true)
    );
    assert_eq!(
        deployment_spec.selector.match_labels,
        Some(
            spec.labels
                .clone()
                .into_iter()
                .chain([(labels::MANAGED_BY.to_owned(), labels::CUBE.to_owned())])
                .collect()
        )
    );
}

/// Serves one pod bound to node `silent` and never answers for its logs, as an API server whose node does not
/// answer: the runtime gives up after its log timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_give_up_when_the_node_never_answers() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
    let address = listener.local_addr().expect("its address");
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = vec![0; 8192];
            let read = stream.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..read]).into_owned();
            if head.contains("/log") {
                held.push(stream);
                continue;
            }
            let body = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "quiet", "namespace": "ns", "resourceVersion": "1"},
                "spec": {"nodeName": "silent", "containers": [{"name": "main", "image": "x"}]}})
            .to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            held.push(stream);
        }
    });
    let url = format!("http://{address}").parse().expect("a URL");
    let client = Client::try_from(kube::Config::new(url)).expect("a client");
    let runtime = KubernetesRuntime::new(CLUSTER, client).with_log_timeout(Duration::from_millis(300));

    let got = tokio::time::timeout(TIMEOUT, runtime.logs(&ObjectKey::new(CLUSTER, "ns", "quiet"), true))
        .await
        .expect("logs answered rather than hung");

    match got {
        Err(RuntimeError::Unavailable(message)) => {
            assert!(
                message.contains("did not answer") && message.contains("silent"),
                "{message}"
            );
        }
        Err(other) => panic!("expected unavailable, got {other:?}"),
        Ok(_) => panic!("expected unavailable, got a log stream"),
    }
    server.abort();
}
