//! Admission across real services: auth issues the tokens, projects holds quotas and members, and the scheduler
//! admits workloads against quotas per GPU type (on SQLite, PostgreSQL and MariaDB), caches what projects
//! answered, explains admitted workloads whose pods wait on the real kube-apiserver and kube-scheduler of the
//! test environment, and releases reservations whose pods are gone.

use std::collections::HashMap;
use std::time::Duration;

use cube_integration_tests::platform::{
    FakeNode, Platform, TestNamespace, authed, create_project, kube_client, platform_with, test_options,
};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::{bad_fields, connect};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, DeleteMemberRequest, GetQuotaUsageRequest, Member, Project, Quota, Role, Settings,
    UpdateMemberRequest, UpdateProjectRequest, member,
};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{
    Admission, AdmissionState, AdmitRequest, BlockerKind, ExplainPendingRequest, Explanation, GetProjectUsageRequest,
    PlaceRequest, Placement, ProjectUsage, ReleaseRequest, WorkloadKind,
};
use cube_scheduler::Options;
use cube_scheduler::admission::AdmissionOptions;
use cube_scheduler::inventory::WORKLOAD_ANNOTATION;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

/// The scheduler's options in these tests, with admission's set to `admission`.
fn options(admission: AdmissionOptions) -> Options {
    Options {
        admission,
        ..test_options()
    }
}

/// The platform of `shape` with admission's options set to `admission`.
async fn platform(shape: Shape, kubeconfig: &str, admission: AdmissionOptions) -> Platform {
    platform_with(shape, kubeconfig, options(admission)).await
}

/// A run of `project` asking for `gpu`.
fn run(project: &str, workload: &str, gpu: &str) -> AdmitRequest {
    AdmitRequest {
        workload: format!("projects/{project}/runs/{workload}"),
        project: format!("projects/{project}"),
        kind: WorkloadKind::Train as i32,
        cpu: "1".into(),
        memory: "1G".into(),
        gpu: gpu.into(),
    }
}

/// Calls the scheduler's admission service as the holder of `token`.
#[derive(Clone)]
struct Admissions {
    client: AdmissionServiceClient<tonic::transport::Channel>,
    token: String,
}

impl Admissions {
    async fn new(platform: &Platform, token: &str) -> Self {
        Self {
            client: AdmissionServiceClient::new(connect(&platform.scheduler).await),
            token: token.to_owned(),
        }
    }

    async fn admit(&self, request: AdmitRequest) -> Result<Admission, tonic::Status> {
        self.client
            .clone()
            .admit(authed(request, &self.token))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn state(&self, request: AdmitRequest) -> AdmissionState {
        self.admit(request).await.expect("admitting").state()
    }

    async fn release(&self, workload: &str) {
        self.client
            .clone()
            .release(authed(
                ReleaseRequest {
                    workload: workload.into(),
                },
                &self.token,
            ))
            .await
            .expect("releasing");
    }

    async fn explain(&self, workload: &str) -> Result<Explanation, tonic::Status> {
        self.client
            .clone()
            .explain_pending(authed(
                ExplainPendingRequest {
                    workload: workload.into(),
                },
                &self.token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn usage(&self, project: &str) -> ProjectUsage {
        self.client
            .clone()
            .get_project_usage(authed(
                GetProjectUsageRequest {
                    project: format!("projects/{project}"),
                },
                &self.token,
            ))
            .await
            .expect("project usage")
            .into_inner()
    }
}

fn by_type(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
    pairs.iter().map(|(name, gpus)| ((*name).to_owned(), *gpus)).collect()
}

/// A project allows 2 T4 GPUs of 10: two `1(T4)` runs are admitted, the third is queued on `gpu(T4)`, a `1(V100)`
/// run still fits, and a release gives a T4 back; a member's own per-type limit holds the same way.
async fn gpu_types_have_quotas_of_their_own(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig, AdmissionOptions::default()).await;
    create_project(
        &platform,
        "vision",
        Settings::default(),
        Quota {
            gpu: Some(10.0),
            gpu_by_type: by_type(&[("T4", 2.0)]),
            ..Quota::default()
        },
    )
    .await;
    let lena = Admissions::new(&platform, &platform.token).await;
    assert_eq!(
        lena.state(run("vision", "t4-a", "1(T4)")).await,
        AdmissionState::Admitted
    );
    assert_eq!(
        lena.state(run("vision", "t4-b", "1(nvidia,t4)")).await,
        AdmissionState::Admitted
    );
    let third = lena.admit(run("vision", "t4-c", "1(T4)")).await.expect("admitting");
    assert_eq!(third.state(), AdmissionState::Queued, "{third:?}");
    assert!(third.reason.contains("gpu(T4)"), "{third:?}");
    let explanation = lena.explain("projects/vision/runs/t4-c").await.expect("explaining");
    let [blocker] = explanation.blockers.as_slice() else {
        panic!("one blocker: {explanation:?}");
    };
    assert_eq!(
        (blocker.quota.as_str(), blocker.resource.as_str(), blocker.kind()),
        ("projects/vision", "gpu(T4)", BlockerKind::Quota)
    );
    assert_eq!((blocker.requested, blocker.in_use, blocker.limit), (1.0, 2.0, 2.0));
    // Another type, and GPUs of no type, only count against the project's 10.
    assert_eq!(
        lena.state(run("vision", "v100", "1(V100)")).await,
        AdmissionState::Admitted
    );
    assert_eq!(lena.state(run("vision", "plain", "2")).await, AdmissionState::Admitted);

    let usage = lena.usage("vision").await;
    assert_eq!(usage.gpu, 5.0, "{usage:?}");
    assert_eq!(usage.gpu_by_type, by_type(&[("T4", 2.0), ("V100", 1.0)]));
    // Projects shows the same, next to the limits.
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);
    let shown = projects
        .get_quota_usage(authed(
            GetQuotaUsageRequest {
                name: "projects/vision".into(),
            },
            &platform.token,
        ))
        .await
        .expect("quota usage")
        .into_inner();
    assert_eq!(
        shown.usage.map(|usage| usage.gpu_by_type),
        Some(usage.gpu_by_type.clone())
    );
    assert_eq!(
        shown.limit.map(|limit| limit.gpu_by_type),
        Some(by_type(&[("T4", 2.0)]))
    );

    // A release gives the T4 back, and only one.
    lena.release("projects/vision/runs/t4-a").await;
    assert_eq!(
        lena.usage("vision").await.gpu_by_type,
        by_type(&[("T4", 1.0), ("V100", 1.0)])
    );
    assert_eq!(
        lena.state(run("vision", "t4-c", "1(T4)")).await,
        AdmissionState::Admitted
    );
    assert_eq!(lena.state(run("vision", "t4-d", "1(T4)")).await, AdmissionState::Queued);
    lena.release("projects/vision/runs/v100").await;
    let usage = lena.usage("vision").await;
    assert_eq!((usage.gpu, usage.gpu_by_type), (4.0, by_type(&[("T4", 2.0)])));

    // lena's own quota in speech allows one A100, whatever the project allows.
    create_project(&platform, "speech", Settings::default(), Quota::default()).await;
    projects
        .update_member(authed(
            UpdateMemberRequest {
                member: Some(Member {
                    name: "projects/speech/members/u-lena".into(),
                    quota: Some(Quota {
                        gpu_by_type: by_type(&[("A100", 1.0)]),
                        ..Quota::default()
                    }),
                    ..Member::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.token,
        ))
        .await
        .expect("setting lena's quota");
    assert_eq!(
        lena.state(run("speech", "a", "1(A100)")).await,
        AdmissionState::Admitted
    );
    assert_eq!(lena.state(run("speech", "b", "1(A100)")).await, AdmissionState::Queued);
    let explanation = lena.explain("projects/speech/runs/b").await.expect("explaining");
    let blocker = explanation.blockers.first().expect("a blocker");
    assert_eq!(
        (blocker.quota.as_str(), blocker.resource.as_str()),
        ("projects/speech/members/u-lena", "gpu(A100)")
    );
    assert_eq!(lena.state(run("speech", "c", "4(T4)")).await, AdmissionState::Admitted);
}

/// A pod built from a placement, as the workload services build theirs: selector, resources, labels and the
/// placement's annotations.
fn pod_from(name: &str, placement: &Placement) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": placement.pod_labels, "annotations": placement.pod_annotations},
        "spec": {
            "nodeSelector": placement.node_selector,
            "containers": [{"name": "main", "image": "busybox",
                "resources": {"requests": placement.requests, "limits": placement.limits}}],
        },
    }))
    .expect("pod")
}

/// Places a run of `project` asking for `gpu` as `workload`.
async fn place(platform: &Platform, project: &str, workload: &str, gpu: &str) -> Placement {
    let placer = PlacementServiceClient::new(connect(&platform.scheduler).await);
    let request = PlaceRequest {
        project: format!("projects/{project}"),
        kind: WorkloadKind::Train as i32,
        cpu: "1".into(),
        memory: "1G".into(),
        gpu: gpu.into(),
        workload: workload.into(),
        ..PlaceRequest::default()
    };
    // The inventory sees a new node within moments of the scheduler starting.
    cube_testkit::eventually("a placement", Duration::from_secs(10), || {
        let mut placer = placer.clone();
        let request = authed(request.clone(), &platform.token);
        async move { placer.place(request).await.ok() }
    })
    .await
    .into_inner()
}

/// Waits until the real kube-scheduler has found no node for the pod, and returns what it said.
async fn unschedulable(pods: &Api<Pod>, name: &str) -> String {
    cube_testkit::eventually(
        &format!("the kube-scheduler to mark {name} unschedulable"),
        Duration::from_secs(30),
        || async move {
            let pod = pods.get(name).await.ok()?;
            let condition = pod
                .status?
                .conditions?
                .into_iter()
                .find(|condition| condition.type_ == "PodScheduled")?;
            (condition.status == "False" && condition.reason.as_deref() == Some("Unschedulable"))
                .then(|| condition.message.unwrap_or_default())
        },
    )
    .await
}

async fn an_admitted_workload_whose_pod_waits_for_a_node_is_explained(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    // A resource group and a GPU type no other test uses: one node of 2 GPUs, one of them taken.
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let group = format!("explain-{suffix}");
    let gpu_type = format!("E{}", suffix.to_uppercase());
    let node = FakeNode::create(
        &client,
        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": gpu_type}),
        &[("nvidia.com/gpu", 2)],
    )
    .await;
    let namespace = TestNamespace::create(&client, format!("explain-{suffix}")).await;
    let pods = namespace.pods();
    let hog: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hog"},
        "spec": {"nodeName": node.name, "containers": [{"name": "main", "image": "busybox",
            "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &hog)
        .await
        .expect("the pod holding a GPU");

    let platform = platform(shape, &kubeconfig, AdmissionOptions::default()).await;
    create_project(
        &platform,
        "vision",
        Settings {
            resource_group: group.clone(),
            ..Settings::default()
        },
        Quota::default(),
    )
    .await;
    let lena = Admissions::new(&platform, &platform.token).await;

    // Admitted by quota, placed with the annotation, and its pod waits: 2 GPUs, and the node has 1 free.
    let workload = "projects/vision/runs/big";
    let placement = place(&platform, "vision", workload, &format!("2({gpu_type})")).await;
    assert_eq!(
        placement.pod_annotations.get(WORKLOAD_ANNOTATION).map(String::as_str),
        Some(workload)
    );
    let admitted = lena
        .admit(AdmitRequest {
            workload: workload.into(),
            ..run("vision", "big", &format!("2({gpu_type})"))
        })
        .await
        .expect("admitting");
    assert_eq!(admitted.state(), AdmissionState::Admitted);
    assert_eq!(
        lena.explain(workload).await.expect("explaining").reason,
        "admitted: nothing blocks it",
        "no pod yet"
    );
    pods.create(&PostParams::default(), &pod_from("big-0", &placement))
        .await
        .expect("creating the pod");
    let said = unschedulable(&pods, "big-0").await;
    assert!(said.contains("Insufficient nvidia.com/gpu"), "{said}");
    let labels = format!("gpu=true,gpu-type={gpu_type},org={group},train=true");
    let explanation = cube_testkit::eventually("the waiting pod in the explanation", Duration::from_secs(10), || {
        let lena = lena.clone();
        async move { Some(lena.explain(workload).await.ok()?).filter(|found| !found.blockers.is_empty()) }
    })
    .await;
    assert_eq!(
        explanation.state(),
        AdmissionState::Admitted,
        "the state stays admitted"
    );
    let pod = format!("{}/big-0", namespace.name);
    assert!(
        explanation
            .reason
            .starts_with(&format!("admitted; pod {pod} has waited ")),
        "{explanation:?}"
    );
    assert!(
        explanation.reason.ends_with(&format!(
            "no node with labels {labels} has 2 GPUs free (most free on one node: 1, on {}; 1 node matches)",
            node.name
        )),
        "{explanation:?}"
    );
    let [blocker] = explanation.blockers.as_slice() else {
        panic!("one blocker: {explanation:?}");
    };
    assert_eq!(blocker.kind(), BlockerKind::Nodes);
    assert_eq!(
        (blocker.quota.as_str(), blocker.resource.as_str(), blocker.node.as_str()),
        ("clusters/kube", "gpu", node.name.as_str())
    );
    assert_eq!((blocker.requested, blocker.in_use, blocker.limit), (2.0, 1.0, 2.0));
    assert_eq!((blocker.pod.as_str(), blocker.matching_nodes), (pod.as_str(), 1));
    assert_eq!(
        blocker.node_selector.get("gpu-type").map(String::as_str),
        Some(gpu_type.as_str())
    );

    // A second workload placed while the node had its labels, whose pod arrives once the node has lost them.
    let small = "projects/vision/runs/small";
    let placement = place(&platform, "vision", small, &format!("1({gpu_type})")).await;
    assert_eq!(
        lena.state(AdmitRequest {
            workload: small.into(),
            ..run("vision", "small", &format!("1({gpu_type})"))
        })
        .await,
        AdmissionState::Admitted
    );
    Api::<Node>::all(client.clone())
        .patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"gpu-type": "RELABELLED"}}})),
        )
        .await
        .expect("relabelling the node");
    pods.create(&PostParams::default(), &pod_from("small-0", &placement))
        .await
        .expect("creating the pod");
    let said = unschedulable(&pods, "small-0").await;
    assert!(said.contains("node selector") || said.contains("affinity"), "{said}");
    let explanation = cube_testkit::eventually("no node with the labels", Duration::from_secs(10), || {
        let lena = lena.clone();
        async move { Some(lena.explain(small).await.ok()?).filter(|found| found.reason.contains("no node has labels")) }
    })
    .await;
    assert_eq!(explanation.state(), AdmissionState::Admitted);
    assert!(
        explanation
            .reason
            .contains(&format!(": no node has labels {labels} (none of the cluster's ")),
        "{explanation:?}"
    );
    assert!(
        explanation.reason.ends_with(&format!("nodes has gpu-type={gpu_type})")),
        "{explanation:?}"
    );
    let [blocker] = explanation.blockers.as_slice() else {
        panic!("one blocker: {explanation:?}");
    };
    assert_eq!(
        (blocker.resource.as_str(), blocker.matching_nodes, blocker.kind()),
        ("labels", 0, BlockerKind::Nodes)
    );
}

async fn reconciliation_releases_a_leaked_reservation_and_keeps_one_with_a_pod(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let namespace = TestNamespace::create(&client, format!("heal-{suffix}")).await;
    let pods = namespace.pods();
    let platform = platform(
        shape,
        &kubeconfig,
        AdmissionOptions {
            reconcile_interval: Duration::from_millis(200),
            reservation_grace: Duration::ZERO,
            ..AdmissionOptions::default()
        },
    )
    .await;
    create_project(&platform, "vision", Settings::default(), Quota::default()).await;
    let lena = Admissions::new(&platform, &platform.token).await;

    // The live workload's pod waits for a node no cluster has; the leaked one never had a pod.
    let live = "projects/vision/runs/live";
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "live-0", "annotations": {WORKLOAD_ANNOTATION: live}},
        "spec": {"nodeSelector": {"no-such-label": namespace.name},
                 "containers": [{"name": "main", "image": "busybox"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating the pod");
    for workload in ["live", "leaked"] {
        assert_eq!(lena.state(run("vision", workload, "1")).await, AdmissionState::Admitted);
    }
    assert_eq!(lena.usage("vision").await.runs, 2);

    let usage = cube_testkit::eventually("the leaked reservation released", Duration::from_secs(10), || {
        let lena = lena.clone();
        async move { Some(lena.usage("vision").await).filter(|usage| usage.runs == 1) }
    })
    .await;
    assert_eq!(usage.gpu, 1.0, "the live workload keeps its GPU");
    let status = lena.explain("projects/vision/runs/leaked").await.expect_err("released");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // Several more rounds keep the workload whose pod is there.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let explanation = lena.explain(live).await.expect("the live workload");
    assert_eq!(explanation.state(), AdmissionState::Admitted);
    assert!(explanation.reason.contains("live-0"), "{explanation:?}");

    // Once its pod is gone, it heals too.
    pods.delete("live-0", &DeleteParams::default().grace_period(0))
        .await
        .expect("deleting the pod");
    cube_testkit::eventually(
        "the live reservation released with its pod",
        Duration::from_secs(10),
        || {
            let lena = lena.clone();
            async move { Some(lena.usage("vision").await).filter(|usage| usage.runs == 0 && usage.gpu == 0.0) }
        },
    )
    .await;
}

async fn membership_and_quota_changes_reach_cached_answers_at_once(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    // A cache long enough that only the `project.members.changed` events can explain what changes within the test.
    let platform = platform(
        shape,
        &kubeconfig,
        AdmissionOptions {
            quota_cache_ttl: Duration::from_secs(600),
            ..AdmissionOptions::default()
        },
    )
    .await;
    create_project(
        &platform,
        "vision",
        Settings::default(),
        Quota {
            gpu: Some(1.0),
            ..Quota::default()
        },
    )
    .await;
    let lena = Admissions::new(&platform, &platform.token).await;
    let omar = Admissions::new(&platform, &platform.stranger).await;
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);

    // A refusal is not kept: omar, not a member, is refused, and admitted as soon as he is one.
    let status = omar.admit(run("vision", "omar-1", "")).await.expect_err("a non-member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    projects
        .create_member(authed(
            CreateMemberRequest {
                parent: "projects/vision".into(),
                member: Some(Member {
                    subject: Some(member::Subject::User("users/omar".into())),
                    role: Role::Developer as i32,
                    ..Member::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("adding omar");
    assert_eq!(omar.state(run("vision", "omar-1", "")).await, AdmissionState::Admitted);

    // A raised quota is announced too (`project.members.changed`): it is seen within a second although the
    // answers are kept for ten minutes.
    assert_eq!(lena.state(run("vision", "gpu-1", "1")).await, AdmissionState::Admitted);
    assert_eq!(
        lena.state(run("vision", "gpu-2", "1")).await,
        AdmissionState::Queued,
        "the quota is full"
    );
    projects
        .update_project(authed(
            UpdateProjectRequest {
                project: Some(Project {
                    name: "projects/vision".into(),
                    quota: Some(Quota {
                        gpu: Some(2.0),
                        ..Quota::default()
                    }),
                    ..Project::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.token,
        ))
        .await
        .expect("raising the quota");
    cube_testkit::eventually("the raised quota seen", Duration::from_secs(1), || {
        let lena = lena.clone();
        async move { (lena.state(run("vision", "gpu-2", "1")).await == AdmissionState::Admitted).then_some(()) }
    })
    .await;

    // Removing omar announces a membership change: the project's answers are forgotten at once, so omar is
    // refused.
    projects
        .delete_member(authed(
            DeleteMemberRequest {
                name: "projects/vision/members/u-omar".into(),
            },
            &platform.token,
        ))
        .await
        .expect("removing omar");
    let status = cube_testkit::eventually("omar refused", Duration::from_secs(5), || {
        let omar = omar.clone();
        async move { omar.admit(run("vision", "omar-2", "")).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

// Admissions bound to their project (issue 11, item 2): lena owns `speech`, omar owns `omar-lab`, and each abuse
// of the free-form workload names is tried by omar against lena's workloads, on every database backend.

/// Creates the project `id` as the holder of `token`, who becomes its owner.
async fn create_project_as(platform: &Platform, token: &str, id: &str, quota: Quota) {
    ProjectServiceClient::new(connect(&platform.projects).await)
        .create_project(authed(
            cube_proto::cube::projects::v1::CreateProjectRequest {
                project: Some(Project {
                    r#type: cube_proto::cube::projects::v1::ProjectType::Org as i32,
                    settings: Some(Settings::default()),
                    quota: Some(quota),
                    ..Project::default()
                }),
                project_id: id.into(),
            },
            token,
        ))
        .await
        .expect("creating a project");
}

/// The platform of `shape` with lena's `speech` (quota `speech`) and omar's `omar-lab` (quota `lab`), and
/// an admission client for each of them.
async fn two_projects(shape: Shape, speech: Quota, lab: Quota) -> (Platform, Admissions, Admissions) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig, AdmissionOptions::default()).await;
    create_project(&platform, "speech", Settings::default(), speech).await;
    create_project_as(&platform, &platform.stranger, "omar-lab", lab).await;
    let lena = Admissions::new(&platform, &platform.token).await;
    let omar = Admissions::new(&platform, &platform.stranger).await;
    (platform, lena, omar)
}

/// A notebook of `project` named `name`, asking for one CPU.
fn notebook(project: &str, name: &str) -> AdmitRequest {
    AdmitRequest {
        workload: format!("projects/{project}/notebooks/{name}"),
        project: format!("projects/{project}"),
        kind: WorkloadKind::Notebook as i32,
        cpu: "1".into(),
        memory: "1G".into(),
        gpu: String::new(),
    }
}

impl Admissions {
    async fn try_release(&self, workload: &str) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .release(authed(
                ReleaseRequest {
                    workload: workload.into(),
                },
                &self.token,
            ))
            .await
            .map(|_| ())
    }

    async fn try_usage(&self, project: &str) -> Result<ProjectUsage, tonic::Status> {
        self.client
            .clone()
            .get_project_usage(authed(
                GetProjectUsageRequest {
                    project: project.into(),
                },
                &self.token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Asserts that `status` is exactly the answer about a workload without an admission: NOT_FOUND, the message
/// naming only the workload, and an `ErrorInfo` with nothing but its kind and name.
fn assert_no_admission(status: &tonic::Status, workload: &str) {
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.message(),
        format!("admission {workload:?} not found"),
        "{status:?}"
    );
    let details = status.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("NOT_FOUND", "scheduler.cube.dev")
    );
    let metadata: std::collections::BTreeMap<&str, &str> = info
        .metadata
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    assert_eq!(
        metadata,
        [("kind", "admission"), ("name", workload)].into_iter().collect()
    );
    assert!(
        details.bad_request().is_none() && details.quota_failure().is_none(),
        "{details:?}"
    );
}

/// An `ErrorInfo` as a client reads it: reason, domain and metadata.
type Info = (String, String, HashMap<String, String>);

/// What a client can read of an error answer: code, message and `ErrorInfo`.
fn answer(status: &tonic::Status) -> (Code, String, Option<Info>) {
    let info = status
        .get_error_details()
        .error_info()
        .map(|info| (info.reason.clone(), info.domain.clone(), info.metadata.clone()));
    (status.code(), status.message().to_owned(), info)
}

/// The leak: omar, not a member of speech, calls Admit with the name of lena's workload there. He gets the
/// NOT_FOUND of a project he cannot see, the same as for a name nobody admitted, and never her admission (its
/// quota and usage); naming it under his own project is refused as malformed.
async fn a_non_member_admitting_another_projects_workload_learns_nothing(shape: Shape) {
    let (_platform, lena, omar) = two_projects(
        shape,
        Quota {
            gpu: Some(4.0),
            ..Quota::default()
        },
        Quota::default(),
    )
    .await;
    let secret = run("speech", "secret", "2");
    assert_eq!(lena.state(secret.clone()).await, AdmissionState::Admitted);

    let taken = omar.admit(secret.clone()).await.expect_err("not a member of speech");
    let free = omar
        .admit(run("speech", "never-admitted", "2"))
        .await
        .expect_err("not a member of speech");
    assert_eq!(taken.code(), Code::NotFound, "{taken:?}");
    assert_eq!(
        answer(&taken),
        answer(&free),
        "an admitted name and a free one get the same answer"
    );
    assert!(!taken.message().contains("secret"), "{taken:?}");
    let under_his = omar
        .admit(AdmitRequest {
            project: "projects/omar-lab".into(),
            ..secret.clone()
        })
        .await
        .expect_err("a name outside the project");
    assert_eq!(bad_fields(&under_his), ["workload"], "{under_his:?}");
    for hidden in [secret.workload.as_str(), "projects/speech/runs/never-admitted"] {
        assert_no_admission(&omar.explain(hidden).await.expect_err("hidden"), hidden);
    }
    let status = omar.try_usage("projects/speech").await.expect_err("a hidden project");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let usage = lena.usage("speech").await;
    assert_eq!((usage.gpu, usage.runs), (2.0, 1), "{usage:?}");
    assert_eq!(omar.usage("omar-lab").await.runs, 0);
}

/// The hijack: omar admits lena's notebook name under a project he belongs to. Refused, it cannot be answered
/// from later: lena's own Admit is charged to speech, and her ExplainPending and Release find it. An admission a
/// scheduler stored before this rule under another project gives way to hers, and a fellow member cannot take
/// over her name.
async fn a_workload_cannot_be_admitted_under_another_project(shape: Shape) {
    let (platform, lena, omar) = two_projects(shape, Quota::default(), Quota::default()).await;
    let name = "projects/speech/notebooks/x";
    for project in ["projects/public", "projects/omar-lab"] {
        let status = omar
            .admit(AdmitRequest {
                project: project.into(),
                ..notebook("speech", "x")
            })
            .await
            .expect_err("a name outside the project");
        assert_eq!(bad_fields(&status), ["workload"], "{project}: {status:?}");
        assert!(status.message().contains(&format!("{project}/")), "{status:?}");
    }
    let status = omar.admit(notebook("speech", "x")).await.expect_err("not a member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let admitted = lena.admit(notebook("speech", "x")).await.expect("admitting");
    assert_eq!(
        (admitted.workload.as_str(), admitted.state()),
        (name, AdmissionState::Admitted)
    );
    let usage = lena.usage("speech").await;
    assert_eq!((usage.notebooks, usage.cpu), (1, 1.0), "charged to speech: {usage:?}");
    assert_eq!(
        lena.explain(name).await.expect("her explanation").state(),
        AdmissionState::Admitted
    );

    // omar joins speech: a member may admit there, but not take over lena's name, nor see or release it.
    ProjectServiceClient::new(connect(&platform.projects).await)
        .create_member(authed(
            CreateMemberRequest {
                parent: "projects/speech".into(),
                member: Some(Member {
                    subject: Some(member::Subject::User("users/omar".into())),
                    role: Role::Developer as i32,
                    ..Member::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("adding omar");
    let status = cube_testkit::eventually("omar's membership seen", Duration::from_secs(5), || {
        let omar = omar.clone();
        async move {
            omar.admit(notebook("speech", "x"))
                .await
                .err()
                .filter(|status| status.code() != Code::NotFound)
        }
    })
    .await;
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_no_admission(&omar.explain(name).await.expect_err("hers"), name);
    assert_no_admission(&omar.try_release(name).await.expect_err("hers"), name);
    assert_eq!(
        omar.state(notebook("speech", "omar-x")).await,
        AdmissionState::Admitted,
        "a member admits names of his own"
    );

    // An admission stored before names were bound to projects: omar's, of lena's name, under public.
    let legacy = "projects/speech/notebooks/legacy";
    insert_reservation(&platform.scheduler_db, legacy, "public", "omar", "admitted").await;
    assert_no_admission(&lena.explain(legacy).await.expect_err("not hers"), legacy);
    let admitted = lena.admit(notebook("speech", "legacy")).await.expect("admitting");
    assert_eq!(
        admitted.state(),
        AdmissionState::Admitted,
        "answered from her own admission"
    );
    assert_eq!(lena.usage("speech").await.notebooks, 3, "charged");
    lena.release(legacy).await;
    lena.release(name).await;
    assert_eq!(lena.usage("speech").await.notebooks, 1, "omar's own remains");
}

/// Stores a reservation as a scheduler did before admissions were bound to their project.
async fn insert_reservation(scheduler_db: &str, workload: &str, project: &str, username: &str, state: &str) {
    use sea_orm::{EntityTrait as _, IntoActiveModel as _};
    let db = cube_kit::db::connect::<cube_scheduler::model::Migrator>(scheduler_db, false)
        .await
        .expect("the scheduler's database");
    cube_scheduler::model::reservation::Entity::insert(
        cube_scheduler::model::reservation::Model {
            workload: workload.into(),
            project: project.into(),
            username: username.into(),
            kind: "notebook".into(),
            cpu_millis: 1000,
            memory_bytes: 0,
            gpu_millis: 0,
            gpu_type: String::new(),
            state: state.into(),
            reason: if state == "queued" {
                "the notebooks quota of projects/public is 0".into()
            } else {
                String::new()
            },
            blockers: "[]".into(),
            created_ms: 0,
            scopes: "[]".into(),
        }
        .into_active_model(),
    )
    .exec_without_returning(&db)
    .await
    .expect("a legacy reservation");
    db.close().await.expect("closing");
}

/// The queued block: omar can no longer queue a workload of lena's name (his project has no room, so his own
/// would wait there forever); lena's is admitted. One queued that way before the rule does not block hers.
async fn a_queued_workload_of_another_project_blocks_nothing(shape: Shape) {
    let (platform, lena, omar) = two_projects(
        shape,
        Quota::default(),
        Quota {
            gpu: Some(0.0),
            ..Quota::default()
        },
    )
    .await;
    let blocked = omar
        .admit(AdmitRequest {
            project: "projects/omar-lab".into(),
            ..run("speech", "big", "1")
        })
        .await
        .expect_err("a name outside the project");
    assert_eq!(bad_fields(&blocked), ["workload"]);
    // omar's own run of the same id waits in his project, and blocks nothing of lena's.
    assert_eq!(omar.state(run("omar-lab", "big", "1")).await, AdmissionState::Queued);
    assert_eq!(lena.state(run("speech", "big", "1")).await, AdmissionState::Admitted);
    assert_eq!(
        omar.explain("projects/omar-lab/runs/big").await.expect("his").state(),
        AdmissionState::Queued
    );

    let legacy = "projects/speech/notebooks/queued";
    insert_reservation(&platform.scheduler_db, legacy, "public", "omar", "queued").await;
    let admitted = lena.admit(notebook("speech", "queued")).await.expect("admitting");
    assert_eq!(admitted.state(), AdmissionState::Admitted, "{admitted:?}");
    assert_eq!(
        lena.explain(legacy).await.expect("hers now").state(),
        AdmissionState::Admitted
    );
    assert_no_admission(&omar.try_release(legacy).await.expect_err("not his"), legacy);
    assert_eq!(lena.usage("speech").await.notebooks, 1);
}

/// The release oracle: Release of a missing workload and of someone else's give the same NOT_FOUND, in the
/// caller's own project or another; releasing twice is NOT_FOUND the second time (AIP-135).
async fn release_answers_the_same_for_missing_and_hidden_workloads(shape: Shape) {
    let (platform, lena, omar) = two_projects(shape, Quota::default(), Quota::default()).await;
    let hers = "projects/speech/runs/hers";
    assert_eq!(lena.state(run("speech", "hers", "")).await, AdmissionState::Admitted);
    for workload in [
        hers,
        "projects/speech/runs/missing",
        "projects/omar-lab/runs/missing",
        "projects/nosuch/runs/missing",
    ] {
        let status = omar.try_release(workload).await.expect_err(workload);
        assert_no_admission(&status, workload);
    }
    assert_eq!(lena.usage("speech").await.runs, 1, "omar released nothing");
    lena.try_release(hers).await.expect("her release");
    assert_eq!(lena.usage("speech").await.runs, 0);
    assert_no_admission(&lena.try_release(hers).await.expect_err("released already"), hers);
    assert_no_admission(&lena.explain(hers).await.expect_err("released already"), hers);
    // An admin may release anyone's, and sees a missing one as NOT_FOUND too.
    assert_eq!(lena.state(run("speech", "again", "")).await, AdmissionState::Admitted);
    let admin = Admissions::new(&platform, &platform.admin).await;
    admin
        .try_release("projects/speech/runs/again")
        .await
        .expect("an admin releases");
    assert_no_admission(
        &admin.try_release("projects/speech/runs/again").await.expect_err("gone"),
        "projects/speech/runs/again",
    );
}

cube_integration_tests::on_every_shape!(
    an_admitted_workload_whose_pod_waits_for_a_node_is_explained,
    reconciliation_releases_a_leaked_reservation_and_keeps_one_with_a_pod,
    membership_and_quota_changes_reach_cached_answers_at_once,
    malformed_requests_are_the_callers_mistake_and_name_the_field,
    ;
    mariadb:
    gpu_types_have_quotas_of_their_own,
    a_non_member_admitting_another_projects_workload_learns_nothing,
    a_workload_cannot_be_admitted_under_another_project,
    a_queued_workload_of_another_project_blocks_nothing,
    release_answers_the_same_for_missing_and_hidden_workloads,
);

/// Malformed names are the caller's mistake, named by field, and never an outage of projects (item 6): a project
/// such as `projects/a b` is refused before projects is asked, an empty Release or ExplainPending names
/// `workload`, and an unknown cluster is named apart from the registered ones (item 11). Placement's requests and
/// admission's charges differ for notebooks that are not exclusive, as the protos say: the pod requests no CPU
/// from its node, and the quota counts the CPU the notebook asked for.
async fn malformed_requests_are_the_callers_mistake_and_name_the_field(shape: Shape) {
    use cube_proto::cube::scheduler::v1::cluster_service_client::ClusterServiceClient;
    use cube_proto::cube::scheduler::v1::node_service_client::NodeServiceClient;
    use cube_proto::cube::scheduler::v1::{GetClusterRequest, ListNodesRequest};

    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let group = format!("errors-{suffix}");
    let _node = FakeNode::create(&client, json!({"cpu": "true", "notebook": "true", "org": group}), &[]).await;
    let platform = platform(shape, &kubeconfig, AdmissionOptions::default()).await;
    create_project(
        &platform,
        "vision",
        Settings {
            resource_group: group.clone(),
            ..Settings::default()
        },
        Quota::default(),
    )
    .await;
    let lena = Admissions::new(&platform, &platform.token).await;
    let mut placer = PlacementServiceClient::new(connect(&platform.scheduler).await);
    let channel = connect(&platform.scheduler).await;

    let place_request = |project: &str, workload: &str| PlaceRequest {
        project: project.into(),
        kind: WorkloadKind::Notebook as i32,
        cpu: "1".into(),
        memory: "1G".into(),
        workload: workload.into(),
        ..PlaceRequest::default()
    };
    let status = placer
        .place(authed(place_request("projects/a b", ""), &platform.token))
        .await
        .expect_err("a malformed project");
    assert_eq!(bad_fields(&status), ["project"], "{status:?}");
    let status = lena
        .admit(AdmitRequest {
            project: "projects/a b".into(),
            workload: "projects/a b/runs/x".into(),
            ..run("vision", "x", "")
        })
        .await
        .expect_err("a malformed project");
    assert_eq!(bad_fields(&status), ["workload", "project"], "{status:?}");
    let status = lena.try_usage("projects/a b").await.expect_err("a malformed project");
    assert_eq!(bad_fields(&status), ["project"], "{status:?}");
    assert!(status.message().contains("projects/a b"), "{status:?}");
    let status = placer
        .place(authed(
            place_request("projects/vision", "projects/speech/notebooks/x"),
            &platform.token,
        ))
        .await
        .expect_err("a workload of another project");
    assert_eq!(bad_fields(&status), ["workload"], "{status:?}");

    let status = lena.try_release("").await.expect_err("an empty Release");
    assert_eq!(bad_fields(&status), ["workload"], "{status:?}");
    let status = lena.explain("").await.expect_err("an empty ExplainPending");
    assert_eq!(bad_fields(&status), ["workload"], "{status:?}");
    let status = lena
        .try_release("vision/runs/x")
        .await
        .expect_err("not a resource name");
    assert_eq!(bad_fields(&status), ["workload"], "{status:?}");

    let mut clusters = ClusterServiceClient::new(channel.clone());
    let status = clusters
        .get_cluster(authed(
            GetClusterRequest {
                name: "clusters/nope".into(),
            },
            &platform.token,
        ))
        .await
        .expect_err("an unknown cluster");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.message(),
        "cluster \"clusters/nope\" not found (registered: kube)"
    );
    let status = NodeServiceClient::new(channel)
        .list_nodes(authed(
            ListNodesRequest {
                parent: "clusters/a b".into(),
                ..ListNodesRequest::default()
            },
            &platform.token,
        ))
        .await
        .expect_err("a malformed cluster");
    assert_eq!(bad_fields(&status), ["parent"], "{status:?}");

    // A notebook asking for one CPU: its pods request none of their node (notebooks are not exclusive), up to a
    // limit of one, and admission charges the one CPU it asked for.
    let workload = "projects/vision/notebooks/lab";
    let placement = cube_testkit::eventually("a placement on the fake node", Duration::from_secs(10), || {
        let mut placer = placer.clone();
        let request = authed(place_request("projects/vision", workload), &platform.token);
        async move { placer.place(request).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(
        placement.requests.get("cpu").map(String::as_str),
        Some("0"),
        "{placement:?}"
    );
    assert_eq!(
        placement.limits.get("cpu").map(String::as_str),
        Some("1"),
        "{placement:?}"
    );
    assert_eq!(
        lena.state(AdmitRequest {
            workload: workload.into(),
            ..notebook("vision", "lab")
        })
        .await,
        AdmissionState::Admitted
    );
    let usage = lena.usage("vision").await;
    assert_eq!((usage.cpu, usage.notebooks), (1.0, 1), "{usage:?}");
}
