//! The scheduler across real services: auth issues the tokens, projects holds the project's settings and quotas
//! (read by the scheduler with the caller's token), and the scheduler places workloads against fake nodes it
//! watches on the real kube-apiserver of the test environment, and admits them against quotas stored in its own
//! database (SQLite, PostgreSQL, MariaDB).

use std::collections::BTreeMap;
use std::time::Duration;

use cube_integration_tests::connect;
use cube_integration_tests::platform::{
    FakeNode, TestNamespace, authed, create_project, kube_client, platform, platform_with, test_options,
};
use cube_integration_tests::shape::Shape;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{Quota, Settings};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{
    AdmissionState, AdmitRequest, ExplainPendingRequest, PlaceRequest, ReleaseRequest, WorkloadKind,
};
use cube_scheduler::Options;
use cube_scheduler::placement::PlacementConfig;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

fn request(gpu: &str) -> PlaceRequest {
    PlaceRequest {
        project: "projects/vision".into(),
        kind: WorkloadKind::Train as i32,
        cpu: "2~4".into(),
        memory: "8G".into(),
        gpu: gpu.into(),
        rdma: 0,
        ..PlaceRequest::default()
    }
}

async fn place_uses_the_projects_settings_and_refuses_what_no_node_could_run(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    // A resource group and a GPU model no other test uses.
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let group = format!("vision-{suffix}");
    let gpu_type = format!("G{}", suffix.to_uppercase());
    let _node = FakeNode::create(
        &client,
        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": gpu_type}),
        &[("nvidia.com/gpu", 4)],
    )
    .await;
    let platform = platform(shape, &kubeconfig).await;
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
    let mut placer = PlacementServiceClient::new(connect(&platform.scheduler).await);

    // The inventory sees the node within a few seconds of the scheduler starting.
    let wanted = format!("2({gpu_type})");
    let placement = cube_testkit::eventually("a placement on the fake node", Duration::from_secs(10), || {
        let mut placer = placer.clone();
        let request = authed(request(&wanted), &platform.token);
        async move { placer.place(request).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(placement.cluster, "clusters/kube");
    assert_eq!(placement.namespace, "pipeline");
    let selector: Vec<(String, String)> = {
        let mut pairs: Vec<_> = placement.node_selector.clone().into_iter().collect();
        pairs.sort();
        pairs
    };
    assert_eq!(
        selector,
        [
            ("gpu".to_owned(), "true".to_owned()),
            ("gpu-type".to_owned(), gpu_type.clone()),
            ("org".to_owned(), group.clone()),
            ("train".to_owned(), "true".to_owned()),
        ]
    );
    assert_eq!(placement.requests.get("nvidia.com/gpu").map(String::as_str), Some("2"));
    assert_eq!(placement.requests.get("cpu").map(String::as_str), Some("2"));
    assert_eq!(placement.limits.get("cpu").map(String::as_str), Some("4"));
    assert_eq!(placement.pod_labels.get("gpu").map(String::as_str), Some("true"));
    assert!(!placement.pod_affinity.is_empty(), "GPU pods pack together");

    // More GPUs than any such node has, and a GPU model no node has.
    let too_many = placer
        .place(authed(request(&format!("8({gpu_type})")), &platform.token))
        .await;
    let status = too_many.expect_err("8 GPUs fit on no node");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("nvidia.com/gpu"), "{status:?}");
    let status = placer
        .place(authed(request("1(NOSUCHGPU)"), &platform.token))
        .await
        .expect_err("no node has that GPU type");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("NOSUCHGPU"), "{status:?}");

    // Malformed strings name their fields.
    let mut bad = request("1.5");
    bad.cpu = "lots".into();
    let status = placer
        .place(authed(bad, &platform.token))
        .await
        .expect_err("bad strings");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .map(|request| request.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    fields.sort();
    assert_eq!(fields, ["cpu", "gpu"]);

    // Someone outside the project learns nothing about it.
    let status = placer
        .place(authed(request("1"), &platform.stranger))
        .await
        .expect_err("a non-member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

/// A pod built from a placement, as the workload services will build theirs.
fn pod_from(name: &str, placement: &cube_proto::cube::scheduler::v1::Placement) -> Pod {
    let terms = |terms: &[cube_proto::cube::scheduler::v1::AffinityTerm]| -> Vec<serde_json::Value> {
        terms
            .iter()
            .map(|term| {
                json!({"weight": term.weight, "podAffinityTerm": {
                    "labelSelector": {"matchLabels": term.match_labels},
                    "topologyKey": term.topology_key}})
            })
            .collect()
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": placement.pod_labels, "annotations": placement.pod_annotations},
        "spec": {
            "nodeSelector": placement.node_selector,
            "affinity": {
                "podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": terms(&placement.pod_affinity)},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": terms(&placement.pod_anti_affinity)},
            },
            "containers": [{"name": "main", "image": "busybox",
                "resources": {"requests": placement.requests, "limits": placement.limits}}],
        },
    }))
    .expect("pod")
}

/// A fake node's labels and extended resources.
type NodeSpec = (serde_json::Value, Vec<(&'static str, u32)>);

fn node(labels: serde_json::Value, devices: &[(&'static str, u32)]) -> NodeSpec {
    (labels, devices.to_vec())
}

const NVIDIA: &[(&str, u32)] = &[("nvidia.com/gpu", 1)];
const AMD: &[(&str, u32)] = &[("amd.com/gpu", 1)];

/// A row of the placement table as the real kube-scheduler binds it.
struct BindRow {
    name: &'static str,
    project: &'static str,
    kind: WorkloadKind,
    gpu: String,
    rdma: i32,
    /// The node the pod must be bound to: exactly the labels the placement selects and the devices it requests.
    node: NodeSpec,
    /// Nodes that differ from it in one label or lack one resource the pod requests.
    decoys: Vec<NodeSpec>,
}

/// A row of project `vision`'s, without RDMA.
fn bind_row(name: &'static str, kind: WorkloadKind, gpu: &str, node: NodeSpec, decoys: Vec<NodeSpec>) -> BindRow {
    BindRow {
        name,
        project: "vision",
        kind,
        gpu: gpu.to_owned(),
        rdma: 0,
        node,
        decoys,
    }
}

/// Project settings with a resource group (empty for none) and an extra node selector.
fn placement_settings(resource_group: &str, node_selector: &[(&str, &str)]) -> Settings {
    Settings {
        resource_group: resource_group.to_owned(),
        node_selector: node_selector
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        ..Settings::default()
    }
}

/// Places `wanted`, asking again while the scheduler's inventory has not seen the fake nodes yet.
async fn placed(
    placer: &PlacementServiceClient<tonic::transport::Channel>,
    token: &str,
    row: &str,
    wanted: &PlaceRequest,
) -> cube_proto::cube::scheduler::v1::Placement {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match placer.clone().place(authed(wanted.clone(), token)).await {
            Ok(placement) => return placement.into_inner(),
            Err(status) if status.code() == Code::FailedPrecondition && tokio::time::Instant::now() < deadline => {}
            Err(status) => panic!("{row}: placing failed: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node the kube-scheduler binds pod `name` to; if it does not within 30 s, panics with the pod's conditions.
async fn bound_node(pods: &Api<Pod>, name: &str, row: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pod = pods.get(name).await.expect("reading the pod");
        if let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) {
            return node;
        }
        if tokio::time::Instant::now() >= deadline {
            let conditions = pod.status.and_then(|status| status.conditions).unwrap_or_default();
            panic!("{row}: the pod is not bound after 30s: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates every row's node and decoys and the `projects`, then, for each row, checks that Place selects exactly
/// the node's labels and requests exactly its devices, and that the real kube-scheduler binds the pod built from
/// the placement to that node and to no decoy. The scheduler knows a second GPU vendor and an RDMA resource.
async fn bind_rows(shape: Shape, suffix: &str, projects: Vec<(&'static str, Settings)>, rows: Vec<BindRow>) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let options = Options {
        placement: PlacementConfig {
            gpu_vendors: [
                ("gpu".to_owned(), "nvidia.com/gpu".to_owned()),
                ("nvidia".to_owned(), "nvidia.com/gpu".to_owned()),
                ("amd".to_owned(), "amd.com/gpu".to_owned()),
            ]
            .into(),
            rdma_resource: Some("rdma/hca".into()),
            ..PlacementConfig::default()
        },
        ..test_options()
    };
    // Every node exists, Ready, before the first pod; the platform starts meanwhile.
    let create = |(labels, devices): &NodeSpec| {
        let (client, labels, devices) = (&client, labels.clone(), devices.clone());
        async move { FakeNode::create(client, labels, &devices).await }
    };
    let (nodes, platform) = tokio::join!(
        futures::future::join_all(rows.iter().map(|row| futures::future::join(
            create(&row.node),
            futures::future::join_all(row.decoys.iter().map(create))
        ))),
        platform_with(shape, &kubeconfig, options),
    );
    futures::future::join_all(
        projects
            .into_iter()
            .map(|(id, settings)| create_project(&platform, id, settings, Quota::default())),
    )
    .await;
    let namespace = TestNamespace::create(&client, format!("bind-{suffix}")).await;
    let placer = PlacementServiceClient::new(connect(&platform.scheduler).await);

    let (placer, pods, token) = (&placer, &namespace.pods(), platform.token.as_str());
    futures::future::join_all(rows.iter().zip(&nodes).enumerate().map(
        |(index, (row, (matching, decoys)))| async move {
            let wanted = PlaceRequest {
                project: format!("projects/{}", row.project),
                kind: row.kind as i32,
                cpu: "1".into(),
                memory: "1G".into(),
                rdma: row.rdma,
                ..request(&row.gpu)
            };
            let placement = placed(placer, token, row.name, &wanted).await;
            let (labels, devices) = &row.node;
            let selector = serde_json::to_value(&placement.node_selector).expect("selector");
            assert_eq!(&selector, labels, "{}: the node selector", row.name);
            let requested: BTreeMap<String, String> = placement
                .requests
                .clone()
                .into_iter()
                .filter(|(resource, _)| !matches!(resource.as_str(), "cpu" | "memory"))
                .collect();
            let offered: BTreeMap<String, String> = devices
                .iter()
                .map(|(resource, amount)| ((*resource).to_owned(), amount.to_string()))
                .collect();
            assert_eq!(requested, offered, "{}: the extended resources requested", row.name);

            let name = format!("pod-{index}");
            pods.create(&PostParams::default(), &pod_from(&name, &placement))
                .await
                .expect("creating the pod");
            let bound = bound_node(pods, &name, row.name).await;
            assert!(
                !decoys.iter().any(|decoy| decoy.name == bound),
                "{}: bound to a decoy, {bound}",
                row.name
            );
            assert_eq!(bound, matching.name, "{}: bound to the wrong node", row.name);
        },
    ))
    .await;
}

/// A suffix that makes resource groups, GPU types and label values no other test uses.
fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Every row of the placement table that a node can satisfy binds to the one node matching it, never to decoys
/// that differ in one label or lack one requested resource. Every row's node is a decoy for the other rows too:
/// they differ in class, kind, GPU type or resource group.
async fn the_real_scheduler_binds_placed_pods_to_matching_nodes_only(shape: Shape) {
    use WorkloadKind::{Notebook, Service, Train};
    let suffix = unique_suffix();
    let group = format!("bind-{suffix}");
    let elsewhere = format!("{group}-x");
    let ssd_group = format!("{group}-ssd");
    let gpu_type = |prefix: &str| format!("{prefix}{}", suffix.to_uppercase());
    let (typed, other_type, v100, a100) = (gpu_type("B"), gpu_type("O"), gpu_type("V"), gpu_type("A"));
    // Isolates the `public` row from other tests' public nodes.
    let run_label = "cube-test-run";
    let rows = vec![
        bind_row(
            "cpu train",
            Train,
            "",
            node(json!({"cpu": "true", "train": "true", "org": group}), &[]),
            vec![node(json!({"cpu": "true", "train": "true", "org": elsewhere}), &[])],
        ),
        bind_row(
            "cpu notebook",
            Notebook,
            "",
            node(json!({"cpu": "true", "notebook": "true", "org": group}), &[]),
            vec![node(json!({"cpu": "true", "notebook": "true", "org": elsewhere}), &[])],
        ),
        bind_row(
            "cpu service",
            Service,
            "",
            node(json!({"cpu": "true", "service": "true", "org": group}), &[]),
            vec![
                node(json!({"cpu": "true", "service": "true", "org": elsewhere}), &[]),
                node(json!({"vgpu": "true", "service": "true", "org": group}), &[]),
            ],
        ),
        bind_row(
            "typed gpu",
            Train,
            &format!("1({typed})"),
            node(
                json!({"gpu": "true", "train": "true", "org": group, "gpu-type": typed}),
                NVIDIA,
            ),
            vec![node(
                json!({"gpu": "true", "train": "true", "org": group, "gpu-type": other_type}),
                NVIDIA,
            )],
        ),
        bind_row(
            "vgpu share",
            Train,
            "0.5",
            node(json!({"vgpu": "true", "train": "true", "org": group}), &[]),
            vec![node(json!({"vgpu": "true", "train": "true", "org": elsewhere}), &[])],
        ),
        bind_row(
            "gpu vendor and type",
            Train,
            &format!("1(nvidia,{v100})"),
            node(
                json!({"gpu": "true", "train": "true", "org": group, "gpu-type": v100}),
                NVIDIA,
            ),
            vec![
                node(
                    json!({"gpu": "true", "train": "true", "org": group, "gpu-type": v100}),
                    AMD,
                ),
                node(
                    json!({"gpu": "true", "notebook": "true", "org": group, "gpu-type": v100}),
                    NVIDIA,
                ),
            ],
        ),
        BindRow {
            rdma: 1,
            ..bind_row(
                "rdma",
                Train,
                &format!("1({a100})"),
                node(
                    json!({"gpu": "true", "train": "true", "org": group, "gpu-type": a100, "rdma": "true"}),
                    &[("nvidia.com/gpu", 1), ("rdma/hca", 1)],
                ),
                vec![
                    node(
                        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": a100, "rdma": "true"}),
                        NVIDIA,
                    ),
                    node(
                        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": a100}),
                        &[("nvidia.com/gpu", 1), ("rdma/hca", 1)],
                    ),
                ],
            )
        },
        BindRow {
            project: "ssd",
            ..bind_row(
                "project node selector",
                Train,
                "",
                node(
                    json!({"cpu": "true", "train": "true", "org": ssd_group, "disk": "ssd"}),
                    &[],
                ),
                vec![
                    node(
                        json!({"cpu": "true", "train": "true", "org": ssd_group, "disk": "hdd"}),
                        &[],
                    ),
                    node(json!({"cpu": "true", "train": "true", "org": ssd_group}), &[]),
                ],
            )
        },
        BindRow {
            project: "commons",
            ..bind_row(
                "org default public",
                Train,
                "",
                node(
                    json!({"cpu": "true", "train": "true", "org": "public", run_label: suffix}),
                    &[],
                ),
                vec![
                    node(
                        json!({"cpu": "true", "train": "true", "org": elsewhere, run_label: suffix}),
                        &[],
                    ),
                    node(json!({"cpu": "true", "train": "true", run_label: suffix}), &[]),
                ],
            )
        },
    ];
    let projects = vec![
        ("vision", placement_settings(&group, &[])),
        ("ssd", placement_settings(&ssd_group, &[("disk", "ssd")])),
        ("commons", placement_settings("", &[(run_label, &suffix)])),
    ];
    bind_rows(shape, &suffix, projects, rows).await;
}

/// A GPU vendor other than the default one binds to nodes offering its resource, not the default vendor's.
async fn the_real_scheduler_binds_a_second_gpu_vendors_pods_to_its_nodes_only(shape: Shape) {
    let suffix = unique_suffix();
    let group = format!("bind-{suffix}");
    let mi250 = format!("M{}", suffix.to_uppercase());
    let row = bind_row(
        "a second gpu vendor",
        WorkloadKind::Train,
        &format!("1(amd,{mi250})"),
        node(
            json!({"gpu": "true", "train": "true", "org": group, "gpu-type": mi250}),
            AMD,
        ),
        vec![
            node(
                json!({"gpu": "true", "train": "true", "org": group, "gpu-type": mi250}),
                NVIDIA,
            ),
            node(
                json!({"gpu": "true", "train": "true", "org": format!("{group}-x"), "gpu-type": mi250}),
                AMD,
            ),
        ],
    );
    bind_rows(
        shape,
        &suffix,
        vec![("vision", placement_settings(&group, &[]))],
        vec![row],
    )
    .await;
}

fn admit(project: &str, workload: &str, cpu: &str, gpu: &str) -> AdmitRequest {
    AdmitRequest {
        workload: format!("projects/{project}/runs/{workload}"),
        project: format!("projects/{project}"),
        kind: WorkloadKind::Train as i32,
        cpu: cpu.into(),
        memory: "1M".into(),
        gpu: gpu.into(),
    }
}

/// 200 admissions race for a 50-GPU project quota, then a member's CPU quota blocks its own workloads.
async fn quotas_hold_under_200_concurrent_admissions(shape: Shape) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform(shape, &kubeconfig).await;
    create_project(
        &platform,
        "vision",
        Settings::default(),
        Quota {
            gpu: Some(50.0),
            ..Default::default()
        },
    )
    .await;
    let channel = connect(&platform.scheduler).await;
    let client = AdmissionServiceClient::new(channel);
    let mut racing = Vec::new();
    for n in 0..200 {
        let mut client = client.clone();
        let request = authed(admit("vision", &format!("r-{n}"), "0.001", "1"), &platform.token);
        racing.push(tokio::spawn(async move { client.admit(request).await }));
    }
    let mut admitted = Vec::new();
    let mut queued = Vec::new();
    for task in racing {
        let answer = task.await.expect("task").expect("an admission").into_inner();
        match answer.state() {
            AdmissionState::Admitted => admitted.push(answer.workload),
            AdmissionState::Queued => queued.push(answer.workload),
            AdmissionState::Unspecified => panic!("no state"),
        }
    }
    assert_eq!(admitted.len(), 50, "exactly the quota is admitted, never more");
    assert_eq!(queued.len(), 150);

    // A queued workload says what blocks it.
    let mut client = client.clone();
    let explanation = client
        .explain_pending(authed(
            ExplainPendingRequest {
                workload: queued[0].clone(),
            },
            &platform.token,
        ))
        .await
        .expect("explaining")
        .into_inner();
    assert_eq!(explanation.state(), AdmissionState::Queued);
    assert_eq!(explanation.blockers.len(), 1, "{explanation:?}");
    let blocker = &explanation.blockers[0];
    assert_eq!(
        (blocker.quota.as_str(), blocker.resource.as_str()),
        ("projects/vision", "gpu")
    );
    assert_eq!((blocker.requested, blocker.limit), (1.0, 50.0));
    assert!(explanation.reason.contains("gpu"), "{explanation:?}");

    // Asking again for an admitted workload changes nothing; releasing one lets a queued one in.
    let again = client
        .admit(authed(
            AdmitRequest {
                workload: admitted[0].clone(),
                ..admit("vision", "unused", "0.001", "1")
            },
            &platform.token,
        ))
        .await
        .expect("admitting again")
        .into_inner();
    assert_eq!(again.state(), AdmissionState::Admitted);
    let retrying = client.clone();
    let retry = |workload: &str| {
        let mut client = retrying.clone();
        let request = authed(
            AdmitRequest {
                workload: workload.to_owned(),
                ..admit("vision", "unused", "0.001", "1")
            },
            &platform.token,
        );
        async move { client.admit(request).await.expect("admitting").into_inner().state() }
    };
    assert_eq!(retry(&queued[1]).await, AdmissionState::Queued, "still full");
    client
        .release(authed(
            ReleaseRequest {
                workload: admitted[1].clone(),
            },
            &platform.token,
        ))
        .await
        .expect("releasing");
    assert_eq!(
        retry(&queued[1]).await,
        AdmissionState::Admitted,
        "a released GPU is free again"
    );
    assert_eq!(retry(&queued[2]).await, AdmissionState::Queued, "and only one");

    // The member's own quota: lena may hold 2 CPUs in speech, whatever the project allows.
    create_project(&platform, "speech", Settings::default(), Quota::default()).await;
    let mut projects = ProjectServiceClient::new(connect(&platform.projects).await);
    projects
        .update_member(authed(
            cube_proto::cube::projects::v1::UpdateMemberRequest {
                member: Some(cube_proto::cube::projects::v1::Member {
                    name: "projects/speech/members/u-lena".into(),
                    quota: Some(cube_proto::cube::projects::v1::Quota {
                        cpu: Some(2.0),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["quota".into()],
                }),
            },
            &platform.token,
        ))
        .await
        .expect("setting lena's quota");
    let mut states = Vec::new();
    for n in 0..3 {
        let answer = client
            .admit(authed(admit("speech", &format!("s-{n}"), "1", ""), &platform.token))
            .await
            .expect("admitting")
            .into_inner();
        states.push(answer.state());
    }
    assert_eq!(
        states,
        [
            AdmissionState::Admitted,
            AdmissionState::Admitted,
            AdmissionState::Queued
        ]
    );
    let explanation = client
        .explain_pending(authed(
            ExplainPendingRequest {
                workload: "projects/speech/runs/s-2".into(),
            },
            &platform.token,
        ))
        .await
        .expect("explaining")
        .into_inner();
    let blocker = explanation.blockers.first().expect("a blocker");
    assert_eq!(
        (blocker.quota.as_str(), blocker.resource.as_str()),
        ("projects/speech/members/u-lena", "cpu")
    );
    assert_eq!((blocker.in_use, blocker.limit), (2.0, 2.0));

    // The projects service shows what the scheduler holds for the project.
    let usage = projects
        .get_quota_usage(authed(
            cube_proto::cube::projects::v1::GetQuotaUsageRequest {
                name: "projects/vision".into(),
            },
            &platform.token,
        ))
        .await
        .expect("quota usage")
        .into_inner();
    assert_eq!(usage.limit.and_then(|limit| limit.gpu), Some(50.0));
    let used = usage.usage.expect("usage");
    assert_eq!(used.gpu, Some(50.0), "{used:?}");
    assert_eq!(used.runs, Some(50));

    // Someone outside the project cannot admit work into it.
    let status = client
        .admit(authed(admit("vision", "intruder", "1", ""), &platform.stranger))
        .await
        .expect_err("a non-member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

cube_integration_tests::on_every_shape!(
    place_uses_the_projects_settings_and_refuses_what_no_node_could_run,
    the_real_scheduler_binds_placed_pods_to_matching_nodes_only,
    the_real_scheduler_binds_a_second_gpu_vendors_pods_to_its_nodes_only,
    ;
    mariadb:
    quotas_hold_under_200_concurrent_admissions,
);
