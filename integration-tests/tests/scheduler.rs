//! The scheduler across real services: auth issues the tokens, projects holds the project's settings and quotas
//! (read by the scheduler with the caller's token), and the scheduler places workloads against fake nodes it
//! watches on the real kube-apiserver of the test environment, and admits them against quotas stored in its own
//! database (SQLite, PostgreSQL, MariaDB).

use std::sync::Arc;
use std::time::Duration;

use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_integration_tests::{Running, connect, start_server};
use cube_kit::Channel;
use cube_kit::config::DatabaseArgs;
use cube_projects::Projects;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{CreateProjectRequest, Project, ProjectType, Quota, Settings};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{
    AdmissionState, AdmitRequest, ExplainPendingRequest, PlaceRequest, ReleaseRequest, WorkloadKind,
};
use cube_scheduler::{ClusterConfig, ClusterRegistry, Scheduler};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

const ADMIN_PASSWORD: &str = "placement admin password";

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

async fn kube_client(path: &str) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

/// A fake GPU node with `labels`, `gpus` allocatable, Ready; deleted with the guard.
struct FakeNode {
    client: Client,
    name: String,
}

impl FakeNode {
    async fn create(client: &Client, labels: serde_json::Value, gpus: u32) -> Self {
        let name = format!("place-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let nodes = Api::<Node>::all(client.clone());
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("creating a node");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "allocatable": {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": gpus.to_string(), "pods": "110"},
            "capacity": {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": gpus.to_string(), "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }});
        nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("node status");
        // New nodes are tainted not-ready until a kubelet reports; the test plays the kubelet.
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"taints": null}})),
            )
            .await
            .expect("untainting the node");
        Self {
            client: client.clone(),
            name,
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let _ = Api::<Node>::all(client).delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}

struct Platform {
    scheduler: Running,
    projects: Running,
    token: String,
    stranger: String,
    _keep: (
        Running,
        cube_auth::Background,
        cube_kit::identity::RevocationFeed,
        cube_projects::Background,
    ),
    _data: tempfile::TempDir,
}

async fn platform(kubeconfig: &str) -> Platform {
    let data = tempfile::tempdir().expect("tempdir");
    let scheduler_db = format!("sqlite://{}", data.path().join("scheduler.db").display());
    platform_on(kubeconfig, &scheduler_db, data).await
}

/// The platform with the scheduler's admissions stored at `scheduler_db`.
async fn platform_on(kubeconfig: &str, scheduler_db: &str, data: tempfile::TempDir) -> Platform {
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let auth = Auth::start(
        &AuthArgs::embedded(
            format!("sqlite://{}", data.path().join("auth.db").display()),
            Some(ADMIN_PASSWORD.into()),
        )
        .expect("flags"),
        bus.clone(),
    )
    .await
    .expect("auth");
    let auth_background = auth.background;
    let auth = start_server(auth.server).await;
    let auth_channel = Channel::remote(&auth.url()).expect("url");
    let registry = ClusterRegistry::new(vec![ClusterConfig {
        name: "kube".into(),
        default: true,
        kubeconfig: Some(kubeconfig.into()),
        in_cluster: false,
        pipeline_namespace: "pipeline".into(),
        notebook_namespace: "jupyter".into(),
        service_namespace: "service".into(),
        service_domain: "cluster.local".into(),
        external_host: String::new(),
    }])
    .expect("registry");
    let (projects_for_scheduler, projects_late) = Channel::late();
    let scheduler = Scheduler::start(
        registry,
        cube_scheduler::Peers {
            auth: auth_channel.clone(),
            projects: projects_for_scheduler,
        },
        &bus,
        cube_scheduler::Options::default(),
        cube_kit::db::connect::<cube_scheduler::model::Migrator>(scheduler_db, true)
            .await
            .expect("the scheduler's database"),
    )
    .await
    .expect("scheduler");
    let scheduler_feed = scheduler.feed;
    let scheduler = start_server(scheduler.server).await;
    let projects = Projects::start(
        &DatabaseArgs {
            database_url: format!("sqlite://{}", data.path().join("projects.db").display()),
            migrate: true,
        },
        cube_projects::Peers {
            auth: auth_channel,
            scheduler: Channel::remote(&scheduler.url()).expect("url"),
            workloads: Vec::new(),
        },
        bus,
        Duration::from_secs(2),
    )
    .await
    .expect("projects");
    let projects_background = projects.background;
    let projects = start_server(projects.server).await;
    projects_late.bind(Channel::remote(&projects.url()).expect("url"));

    let connection = connect(&auth).await;
    let login = |username: &'static str, password: &'static str| {
        let connection = connection.clone();
        async move {
            AuthServiceClient::new(connection)
                .login(LoginRequest {
                    username: username.into(),
                    password: password.into(),
                })
                .await
                .expect("login")
                .into_inner()
                .access_token
        }
    };
    let admin = login("admin", ADMIN_PASSWORD).await;
    for user in ["lena", "omar"] {
        UserServiceClient::new(connection.clone())
            .create_user(authed(
                CreateUserRequest {
                    user: Some(User {
                        email: format!("{user}@example.com"),
                        ..User::default()
                    }),
                    user_id: user.into(),
                    password: format!("{user} long password"),
                },
                &admin,
            ))
            .await
            .expect("creating a user");
    }
    Platform {
        scheduler,
        projects,
        token: login("lena", "lena long password").await,
        stranger: login("omar", "omar long password").await,
        _keep: (auth, auth_background, scheduler_feed, projects_background),
        _data: data,
    }
}

fn request(gpu: &str) -> PlaceRequest {
    PlaceRequest {
        project: "projects/vision".into(),
        kind: WorkloadKind::Train as i32,
        cpu: "2~4".into(),
        memory: "8G".into(),
        gpu: gpu.into(),
        rdma: 0,
        replica_label: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn place_uses_the_projects_settings_and_refuses_what_no_node_could_run() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    // A resource group and a GPU model no other test uses.
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let group = format!("vision-{suffix}");
    let gpu_type = format!("G{}", suffix.to_uppercase());
    let _node = FakeNode::create(
        &client,
        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": gpu_type}),
        4,
    )
    .await;
    let platform = platform(&kubeconfig).await;
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
        "metadata": {"name": name, "labels": placement.pod_labels},
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_scheduler_binds_placed_pods_to_matching_nodes_only() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let client = kube_client(&kubeconfig).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let group = format!("bind-{suffix}");
    let gpu_type = format!("B{}", suffix.to_uppercase());
    let other_type = format!("O{}", suffix.to_uppercase());
    // One node per class and kind in our resource group, plus decoys that differ in one label each.
    let cpu_train = FakeNode::create(&client, json!({"cpu": "true", "train": "true", "org": group}), 0).await;
    let cpu_notebook = FakeNode::create(&client, json!({"cpu": "true", "notebook": "true", "org": group}), 0).await;
    let gpu_typed = FakeNode::create(
        &client,
        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": gpu_type}),
        2,
    )
    .await;
    let _gpu_other = FakeNode::create(
        &client,
        json!({"gpu": "true", "train": "true", "org": group, "gpu-type": other_type}),
        2,
    )
    .await;
    let vgpu = FakeNode::create(&client, json!({"vgpu": "true", "train": "true", "org": group}), 0).await;
    let _other_group = FakeNode::create(
        &client,
        json!({"cpu": "true", "train": "true", "notebook": "true", "org": format!("{group}-x")}),
        0,
    )
    .await;

    let platform = platform(&kubeconfig).await;
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
    let placer = PlacementServiceClient::new(connect(&platform.scheduler).await);
    let namespace = format!("bind-{suffix}");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);

    // (row, kind, gpu string, the node it must land on)
    let rows = [
        ("cpu train", WorkloadKind::Train, String::new(), &cpu_train.name),
        (
            "cpu notebook",
            WorkloadKind::Notebook,
            String::new(),
            &cpu_notebook.name,
        ),
        (
            "typed gpu",
            WorkloadKind::Train,
            format!("1({gpu_type})"),
            &gpu_typed.name,
        ),
        ("vgpu share", WorkloadKind::Train, "0.5".to_owned(), &vgpu.name),
    ];
    for (index, (row, kind, gpu, expected)) in rows.iter().enumerate() {
        let mut wanted = request(gpu);
        wanted.kind = *kind as i32;
        wanted.cpu = "1".into();
        wanted.memory = "1G".into();
        let placement = cube_testkit::eventually(&format!("a placement for {row}"), Duration::from_secs(10), || {
            let mut placer = placer.clone();
            let request = authed(wanted.clone(), &platform.token);
            async move { placer.place(request).await.ok() }
        })
        .await
        .into_inner();
        let name = format!("pod-{index}");
        pods.create(&PostParams::default(), &pod_from(&name, &placement))
            .await
            .expect("creating the pod");
        let bound = cube_testkit::eventually(&format!("the {row} pod bound"), Duration::from_secs(30), || {
            let pods = pods.clone();
            let name = name.clone();
            async move { pods.get(&name).await.ok()?.spec?.node_name }
        })
        .await;
        assert_eq!(&bound, *expected, "{row}: bound to the wrong node");
    }
    let _ = Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await;
}

async fn create_project(platform: &Platform, id: &str, settings: Settings, quota: Quota) {
    ProjectServiceClient::new(connect(&platform.projects).await)
        .create_project(authed(
            CreateProjectRequest {
                project: Some(Project {
                    r#type: ProjectType::Org as i32,
                    settings: Some(settings),
                    quota: Some(quota),
                    ..Project::default()
                }),
                project_id: id.into(),
            },
            &platform.token,
        ))
        .await
        .expect("creating a project");
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
async fn quotas_hold_under_200_concurrent_admissions(scheduler_db: String) {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let platform = platform_on(&kubeconfig, &scheduler_db, tempfile::tempdir().expect("tempdir")).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_on_sqlite() {
    cube_testkit::on_fresh_database(
        cube_testkit::Backend::Sqlite,
        quotas_hold_under_200_concurrent_admissions,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_on_postgres() {
    cube_testkit::on_fresh_database(
        cube_testkit::Backend::Postgres,
        quotas_hold_under_200_concurrent_admissions,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_on_mariadb() {
    cube_testkit::on_fresh_database(
        cube_testkit::Backend::MariaDb,
        quotas_hold_under_200_concurrent_admissions,
    )
    .await;
}
