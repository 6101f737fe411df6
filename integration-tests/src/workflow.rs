//! The workflow service as the cross-service tests and benchmarks run it: in this process beside a [`Platform`],
//! tasks running on the test cluster (registered as `kube`) or as local processes (cluster `local`).

use std::sync::Arc;
use std::time::Duration;

use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_kit::Channel;
use cube_kit::time::Clock;
use cube_runtime::{LocalRuntime, Runtimes};
use cube_workflow::{Options, Peers, Workflow};

use cube_proto::cube::projects::v1::{Quota, Settings};
use cube_testkit::kubernetes::FakeNode;

use crate::platform::{Platform, create_project};
use crate::{Running, start_server};

/// The workflow service, serving.
pub struct RunningWorkflow {
    /// Its server.
    pub server: Running,
    /// Its database's URL.
    pub database: String,
    /// Its engine and consumers.
    _background: cube_workflow::Background,
    /// The local runtime its `local` cluster runs on.
    _local: Arc<LocalRuntime>,
}

/// How often the engine reconciles in tests: often, so that a lost event costs little time.
pub const TEST_RECONCILE: Duration = Duration::from_millis(500);

/// Makes the service account `workflow` of `platform` (as its admin) and returns its token.
pub async fn service_token(platform: &Platform) -> String {
    use cube_proto::cube::auth::v1::CreateServiceAccountRequest;
    use cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient;
    ServiceAccountServiceClient::new(crate::connect(&platform.auth).await)
        .create_service_account(crate::platform::authed(
            CreateServiceAccountRequest {
                service_account_id: "workflow".into(),
                service_account: None,
            },
            &platform.admin,
        ))
        .await
        .unwrap_or_else(|status| panic!("creating the workflow service account: {status:?}"))
        .into_inner()
        .token
}

/// Creates, as `token`'s user, the release template `jobTemplates/worker` (image `cube.test/worker:1`) running
/// `entrypoint` (the image's own when empty).
///
/// # Errors
/// The workflow service's refusal.
pub async fn create_worker_template(
    channel: tonic::transport::Channel,
    token: &str,
    entrypoint: &str,
) -> Result<(), tonic::Status> {
    use cube_proto::cube::workflow::v1::job_template_service_client::JobTemplateServiceClient;
    use cube_proto::cube::workflow::v1::{CreateJobTemplateRequest, JobTemplate, TemplateVersion};
    JobTemplateServiceClient::new(channel)
        .create_job_template(crate::platform::authed(
            CreateJobTemplateRequest {
                job_template_id: "worker".into(),
                job_template: Some(JobTemplate {
                    image: "cube.test/worker:1".into(),
                    entrypoint: entrypoint.into(),
                    version: TemplateVersion::Release as i32,
                    ..JobTemplate::default()
                }),
            },
            token,
        ))
        .await
        .map(drop)
}

/// Starts the workflow service of `platform` on a fresh database of its shape, running tasks on the cluster
/// `kubeconfig` reaches (as `kube`) and locally (as `local`).
pub async fn start_workflow(platform: &mut Platform, kubeconfig: &str) -> RunningWorkflow {
    start_workflow_with(platform, kubeconfig, Setup::default()).await
}

/// What a test sets of the workflow service besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// The time schedules fire by.
    pub clock: Clock,
    /// The Prometheus server tasks' usage is read from.
    pub prometheus_url: Option<String>,
}

/// [`start_workflow`], set up as `setup` says.
pub async fn start_workflow_with(platform: &mut Platform, kubeconfig: &str, setup: Setup) -> RunningWorkflow {
    let database = platform.database("workflow").await;
    let local_dir = platform.dir().join("workloads");
    cube_kit::db::private_directory(&local_dir)
        .unwrap_or_else(|error| panic!("the local runtime's directory: {error}"));
    let (local, _statuses) = LocalRuntime::open(&local_dir)
        .await
        .unwrap_or_else(|error| panic!("the local runtime: {error}"));
    let local = Arc::new(local);
    let registry = ClusterRegistry::new(vec![
        ClusterConfig::new("kube", Some(kubeconfig.into())),
        ClusterConfig::new("local", None),
    ])
    .unwrap_or_else(|error| panic!("registry: {error}"));
    let db = cube_kit::db::connect::<cube_workflow::model::Migrator>(&database, true)
        .await
        .unwrap_or_else(|error| panic!("the workflow database: {error}"));
    let remote = |running: &Running| Channel::remote(&running.url()).unwrap_or_else(|error| panic!("url: {error}"));
    let workflow = Workflow::start(
        Runtimes::new(registry, local.clone()),
        db,
        platform.bus.clone(),
        Peers {
            auth: remote(&platform.auth),
            projects: remote(&platform.projects),
            scheduler: remote(&platform.scheduler),
        },
        Options {
            reconcile_interval: TEST_RECONCILE,
            lease_duration: Duration::from_secs(5),
            clock: setup.clock,
            prometheus_url: setup.prometheus_url,
            ..Options::new(
                format!("workflow-test-{}", uuid::Uuid::new_v4().simple()),
                service_token(platform).await,
            )
        },
    )
    .await
    .unwrap_or_else(|error| panic!("workflow: {error}"));
    RunningWorkflow {
        server: start_server(workflow.server).await,
        database,
        _background: workflow.background,
        _local: local,
    }
}

/// A fake node only the training tasks of resource group `group` fit (`cpu`, `train`, `org=<group>`), with
/// `extra` allocatable besides the defaults (`("pods", 5000)`).
pub async fn training_node(client: &kube::Client, group: &str, extra: &[(&str, u32)]) -> FakeNode {
    FakeNode::create(
        client,
        serde_json::json!({"cpu": "true", "train": "true", "org": group}),
        extra,
    )
    .await
}

/// Creates project `vision` (its owner `platform.token`'s user) whose tasks run on the nodes of `group`, in
/// `namespace`, under `quota`.
pub async fn training_project(platform: &Platform, group: &str, namespace: &str, quota: Quota) {
    create_project(
        platform,
        "vision",
        Settings {
            resource_group: group.to_owned(),
            pipeline_namespace: namespace.to_owned(),
            ..Settings::default()
        },
        quota,
    )
    .await;
}
