//! Admission across real services: auth issues the tokens, projects holds quotas and members, and the scheduler
//! admits workloads against quotas per GPU type (on SQLite, PostgreSQL and MariaDB), caches what projects
//! answered, explains admitted workloads whose pods wait on the real kube-apiserver and kube-scheduler of the
//! test environment, and releases reservations whose pods are gone.

use std::collections::HashMap;
use std::time::Duration;

use cube_integration_tests::connect;
use cube_integration_tests::platform::{
    FakeNode, Platform, TestNamespace, authed, create_project, kube_client, platform_on, platform_with, test_options,
};
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

/// The scheduler's options in these tests, with admission's set to `admission`.
fn options(admission: AdmissionOptions) -> Options {
    Options {
        admission,
        ..test_options()
    }
}

/// The platform with admissions in an SQLite file of its own.
async fn platform(kubeconfig: &str, admission: AdmissionOptions) -> Platform {
    platform_with(kubeconfig, options(admission)).await
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
async fn gpu_types_have_quotas_of_their_own(scheduler_db: &str) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform_on(
        &kubeconfig,
        scheduler_db,
        tempfile::tempdir().expect("tempdir"),
        options(AdmissionOptions::default()),
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_type_quotas_on_sqlite() {
    cube_testkit::on_fresh_database(cube_testkit::Backend::Sqlite, |url| async move {
        gpu_types_have_quotas_of_their_own(&url).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_type_quotas_on_postgres() {
    cube_testkit::on_fresh_database(cube_testkit::Backend::Postgres, |url| async move {
        gpu_types_have_quotas_of_their_own(&url).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_type_quotas_on_mariadb() {
    cube_testkit::on_fresh_database(cube_testkit::Backend::MariaDb, |url| async move {
        gpu_types_have_quotas_of_their_own(&url).await;
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_workload_whose_pod_waits_for_a_node_is_explained() {
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

    let platform = platform(&kubeconfig, AdmissionOptions::default()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_releases_a_leaked_reservation_and_keeps_one_with_a_pod() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let namespace = TestNamespace::create(&client, format!("heal-{suffix}")).await;
    let pods = namespace.pods();
    let platform = platform(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_answers_are_cached_and_membership_changes_reach_admission_at_once() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    // A cache long enough that only the membership event can explain what changes within the test.
    let platform = platform(
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

    // The answers are kept: a raised quota is not seen yet.
    assert_eq!(lena.state(run("vision", "gpu-1", "1")).await, AdmissionState::Admitted);
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
    assert_eq!(
        lena.state(run("vision", "gpu-2", "1")).await,
        AdmissionState::Queued,
        "the cached quota"
    );

    // Removing omar announces a membership change: the project's answers are forgotten at once, so omar is
    // refused and lena sees the raised quota.
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
    assert_eq!(lena.state(run("vision", "gpu-2", "1")).await, AdmissionState::Admitted);
}
