//! The workflow engine across services, on both shapes, against the real kube-apiserver and scheduler with the
//! fake kubelet: DAG order, parallelism, retries with backoff, `RetryRun` (also after the pods are gone),
//! `CancelRun`, a manual run replacing the previous one, `RunTask`, `DebugTask` and `ClearTask`, the placement and
//! `KFJ_*` environment on every pod, refused input that stores nothing, and who may call what. Schedules, with a
//! controlled clock: validation and next fire time, fires under each policy (max concurrent runs counting manual
//! runs, keep newest, depends on past through a failure and its recovery), each catch-up mode after an outage,
//! start and end bounds, both daylight-saving changes of Berlin and New York, a disabled schedule and a deleted
//! project, and a week's backfill. Resource tuning from what a real Prometheus saw.

// The matrix test's one future holds every row's boxed call: deeper than the compiler's default layout limit.
#![recursion_limit = "256"]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cube_integration_tests::platform::{FakeNode, Platform, TestNamespace, authed, kube_client, platform};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::workflow::{RunningWorkflow, Setup, start_workflow_with, training_node, training_project};
use cube_integration_tests::{bad_fields, connect};
use cube_kit::time::Clock;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::common::v1::ListProjectWorkloadsRequest;
use cube_proto::cube::common::v1::project_workload_service_client::ProjectWorkloadServiceClient;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, CreateProjectRequest, DeleteProjectRequest, Member, Project, ProjectType, Quota, Role, member,
};
use cube_proto::cube::workflow::v1::job_template_service_client::JobTemplateServiceClient;
use cube_proto::cube::workflow::v1::pipeline_service_client::PipelineServiceClient;
use cube_proto::cube::workflow::v1::run_service_client::RunServiceClient;
use cube_proto::cube::workflow::v1::schedule_service_client::ScheduleServiceClient;
use cube_proto::cube::workflow::v1::{
    ArgSpec, ArgType, BackfillScheduleRequest, CancelRunRequest, CatchUp, ClearTaskRequest, CopyPipelineRequest,
    CreateJobTemplateRequest, CreatePipelineRequest, CreateRunRequest, CreateScheduleRequest, DebugTaskRequest,
    DeleteJobTemplateRequest, DeletePipelineRequest, DeleteScheduleRequest, GetJobTemplateRequest, GetPipelineRequest,
    GetRunRequest, GetScheduleRequest, GetTaskLogsRequest, GetTaskRecommendationRequest, JobTemplate,
    ListJobTemplatesRequest, ListPipelinesRequest, ListRunsRequest, ListSchedulesRequest, Pipeline, RetryPolicy,
    RetryRunRequest, Run, RunState, RunTaskRequest, Schedule, SkipRunRequest, Task, TemplateVersion, Trigger,
    UpdateJobTemplateRequest, UpdatePipelineRequest, UpdateScheduleRequest, WatchRunRequest,
};
use cube_testkit::kubernetes::{Kubelet, Script};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use tonic::Code;
use tonic::transport::Channel;

cube_integration_tests::on_every_shape!(
    a_diamond_runs_in_order_on_placed_pods_with_the_kfj_environment,
    parallelism_holds_on_a_wide_fan_out,
    failures_retry_with_backoff_and_retry_run_reruns_only_what_failed,
    cancel_and_a_new_manual_run_end_runs_at_once,
    run_task_debug_task_and_clear_task_act_on_one_task_alone,
    schedules_are_validated_whole_and_show_their_next_fire,
    updates_change_what_the_mask_names_and_keep_the_rest,
    bad_input_is_refused_field_by_field_and_nothing_is_stored,
    every_rpc_answers_each_role_as_its_rights_say,
    quotas_queue_runs_and_tasks_with_the_reason_until_they_fit,
    schedules_fire_by_the_clock_under_max_concurrent_runs_and_keep_newest,
    depends_on_past_blocks_on_a_failure_until_it_is_retried_or_skipped,
    missed_fires_are_caught_up_as_each_schedule_says_and_a_deleted_project_stops_them,
    daylight_saving_changes_fire_once_in_berlin_and_new_york,
    backfill_makes_each_fire_of_a_week_once_within_max_concurrent_runs,
    resources_are_tuned_from_the_usage_a_real_prometheus_saw,
);

/// Longest wait for a run to finish.
const TIMEOUT: Duration = Duration::from_secs(90);
/// How long a scripted container runs.
const RUNS: Duration = Duration::from_millis(300);

/// A platform with the workflow service, a project `vision` whose tasks run on the test's own fake node, and a
/// released template `worker`.
struct Flow {
    platform: Platform,
    _workflow: RunningWorkflow,
    client: kube::Client,
    namespace: TestNamespace,
    node: FakeNode,
    channel: Channel,
}

impl Flow {
    async fn start(shape: Shape) -> Self {
        Self::with_quota(shape, Quota::default()).await
    }

    async fn with_quota(shape: Shape, quota: Quota) -> Self {
        Self::with(shape, quota, Setup::default()).await
    }

    /// A flow whose schedules fire by `clock`.
    async fn at(shape: Shape, clock: Clock) -> Self {
        Self::with(
            shape,
            Quota::default(),
            Setup {
                clock,
                ..Setup::default()
            },
        )
        .await
    }

    async fn with(shape: Shape, quota: Quota, setup: Setup) -> Self {
        let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
        let client = kube_client(&kubeconfig).await;
        let group = cube_testkit::kubernetes::unique_name("wf");
        let (node, namespace, mut platform) = tokio::join!(
            training_node(&client, &group, &[]),
            TestNamespace::unique(&client, "wf"),
            platform(shape, &kubeconfig),
        );
        training_project(&platform, &group, &namespace.name, quota).await;
        let workflow = start_workflow_with(&mut platform, &kubeconfig, setup).await;
        let channel = connect(&workflow.server).await;
        let flow = Self {
            platform,
            _workflow: workflow,
            client,
            namespace,
            node,
            channel,
        };
        JobTemplateServiceClient::new(flow.channel.clone())
            .create_job_template(authed(
                CreateJobTemplateRequest {
                    job_template_id: "worker".into(),
                    job_template: Some(worker_template()),
                },
                &flow.platform.admin,
            ))
            .await
            .expect("creating the worker template");
        flow
    }

    fn kubelet(&self) -> Kubelet {
        Kubelet::start(&self.client, [&self.node])
    }

    fn pipelines(&self) -> PipelineServiceClient<Channel> {
        PipelineServiceClient::new(self.channel.clone())
    }

    fn runs(&self) -> RunServiceClient<Channel> {
        RunServiceClient::new(self.channel.clone())
    }

    /// Creates pipeline `id` of `tasks` in `vision` as lena.
    async fn pipeline(&self, id: &str, tasks: Vec<Task>, parallelism: i32) -> Pipeline {
        self.pipelines()
            .create_pipeline(authed(
                CreatePipelineRequest {
                    parent: "projects/vision".into(),
                    pipeline_id: id.into(),
                    pipeline: Some(Pipeline {
                        tasks,
                        parallelism,
                        global_env: "STAGE=test".into(),
                        ..Pipeline::default()
                    }),
                },
                &self.platform.token,
            ))
            .await
            .expect("creating a pipeline")
            .into_inner()
    }

    /// Creates schedule `id` of `pipeline` as lena.
    async fn schedule(&self, pipeline: &str, id: &str, schedule: Schedule) -> Schedule {
        ScheduleServiceClient::new(self.channel.clone())
            .create_schedule(authed(
                CreateScheduleRequest {
                    parent: pipeline.into(),
                    schedule_id: id.into(),
                    schedule: Some(schedule),
                },
                &self.platform.token,
            ))
            .await
            .expect("creating a schedule")
            .into_inner()
    }

    /// Runs `pipeline` as lena, asking again while the scheduler's inventory has not seen the node yet.
    async fn start_run(&self, pipeline: &str) -> Run {
        cube_testkit::eventually("a run placed on the test node", Duration::from_secs(20), || async {
            match self
                .runs()
                .create_run(authed(
                    CreateRunRequest {
                        parent: pipeline.into(),
                        request_id: String::new(),
                    },
                    &self.platform.token,
                ))
                .await
            {
                Ok(run) => Some(run.into_inner()),
                Err(status) if status.code() == Code::FailedPrecondition => None,
                Err(status) => panic!("creating a run: {status:?}"),
            }
        })
        .await
    }

    /// Every state of run `name` a watcher sees, until it finishes.
    async fn watch_to_end(&self, name: &str) -> Vec<Run> {
        let mut stream = self
            .runs()
            .watch_run(authed(WatchRunRequest { name: name.into() }, &self.platform.token))
            .await
            .expect("watching the run")
            .into_inner();
        let mut seen = Vec::new();
        tokio::time::timeout(TIMEOUT, async {
            while let Some(run) = stream.message().await.expect("the watch") {
                seen.push(run);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the run did not finish; last seen: {:#?}", seen.last()));
        seen
    }

    async fn get_run(&self, name: &str) -> Run {
        self.runs()
            .get_run(authed(GetRunRequest { name: name.into() }, &self.platform.token))
            .await
            .expect("getting the run")
            .into_inner()
    }

    /// The pods of run `id` in the test namespace.
    async fn pods(&self, id: &str) -> Vec<Pod> {
        self.namespace
            .pods()
            .list(&ListParams::default().labels(&format!("cube.io/run={id}")))
            .await
            .expect("listing pods")
            .items
    }
}

fn worker_template() -> JobTemplate {
    JobTemplate {
        image: "cube.test/worker:1".into(),
        entrypoint: "train --verbose".into(),
        version: TemplateVersion::Release as i32,
        env: HashMap::from([("TEMPLATE_ENV".to_owned(), "from-template".to_owned())]),
        args: vec![
            ArgSpec {
                name: "--epochs".into(),
                r#type: ArgType::Int as i32,
                default_json: "1".into(),
                minimum: Some(1.0),
                editable: true,
                ..ArgSpec::default()
            },
            ArgSpec {
                name: "--fast".into(),
                r#type: ArgType::Bool as i32,
                editable: true,
                ..ArgSpec::default()
            },
        ],
        ..JobTemplate::default()
    }
}

/// An enabled schedule at 02:30 every night in Berlin.
fn nightly() -> Schedule {
    Schedule {
        cron: "30 2 * * *".into(),
        time_zone: "Europe/Berlin".into(),
        enabled: true,
        ..Schedule::default()
    }
}

/// A task `name` of the worker template after `upstream`.
fn task(name: &str, upstream: &[&str]) -> Task {
    Task {
        name: name.into(),
        template: "jobTemplates/worker".into(),
        cpu: "0.1".into(),
        memory: "64M".into(),
        upstream: upstream.iter().map(|name| (*name).to_owned()).collect(),
        ..Task::default()
    }
}

/// The id of run `name` (its last part).
fn id_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The state of each task of `run`, by name.
fn states(run: &Run) -> BTreeMap<String, RunState> {
    run.tasks.iter().map(|task| (task.name.clone(), task.state())).collect()
}

/// The run as a watcher last saw it.
fn last(seen: &[Run]) -> &Run {
    seen.last().expect("the watch saw the run")
}

async fn a_diamond_runs_in_order_on_placed_pods_with_the_kfj_environment(shape: Shape) {
    let flow = Flow::start(shape).await;
    let _kubelet = flow
        .kubelet()
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let mut first = task("a", &[]);
    first.args = Some(prost_types::Struct {
        fields: BTreeMap::from([
            ("--epochs".to_owned(), prost_types::Value::from(3.0)),
            ("--fast".to_owned(), prost_types::Value::from(true)),
        ]),
    });
    let pipeline = flow
        .pipeline(
            "diamond",
            vec![first, task("b", &["a"]), task("c", &["a"]), task("d", &["b", "c"])],
            0,
        )
        .await;
    let run = flow.start_run(&pipeline.name).await;
    let seen = flow.watch_to_end(&run.name).await;
    assert_eq!(last(&seen).state(), RunState::Succeeded, "{:#?}", last(&seen));
    // No watcher ever saw a task start before what it comes after had succeeded.
    for view in &seen {
        let state = states(view);
        let started = |name: &str| !matches!(state[name], RunState::Pending);
        let done = |name: &str| state[name] == RunState::Succeeded;
        assert!(!started("b") || done("a"), "b started before a ended: {state:?}");
        assert!(!started("c") || done("a"), "c started before a ended: {state:?}");
        assert!(
            !started("d") || (done("b") && done("c")),
            "d started too early: {state:?}"
        );
    }
    let id = id_of(&run.name);
    let pods = flow.pods(id).await;
    assert_eq!(pods.len(), 4, "one pod per task");
    for pod in &pods {
        let spec = pod.spec.clone().expect("a spec");
        assert_eq!(
            spec.node_name.as_deref(),
            Some(flow.node.name.as_str()),
            "bound by the scheduler to the node"
        );
        let selector = spec.node_selector.clone().unwrap_or_default();
        assert_eq!(selector.get("train").map(String::as_str), Some("true"), "{selector:?}");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels["run-id"], id);
        assert_eq!(labels["pipeline-id"], "diamond");
        let task = labels["cube.io/task"].clone();
        let main = &spec.containers[0];
        let env: BTreeMap<String, String> = main
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|var| (var.name, var.value.unwrap_or_default()))
            .collect();
        assert_eq!(env["KFJ_RUN_ID"], id);
        assert_eq!(env["KFJ_PIPELINE_NAME"], "diamond");
        assert_eq!(env["KFJ_TASK_NAME"], task);
        assert_eq!(env["KFJ_RUNNER"], "lena");
        assert_eq!(env["KFJ_NAMESPACE"], flow.namespace.name);
        assert_eq!(env["KFJ_TASK_RESOURCE_CPU"], "0.1");
        assert!(env["KFJ_TASK_NODE_SELECTOR"].contains("train=true"), "{env:?}");
        assert_eq!(env["TEMPLATE_ENV"], "from-template");
        assert_eq!(env["STAGE"], "test");
        let from_pod: BTreeMap<String, String> = main
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|var| Some((var.name, var.value_from?.field_ref?.field_path)))
            .collect();
        assert_eq!(from_pod["K8S_NODE_NAME"], "spec.nodeName");
        assert_eq!(from_pod["K8S_POD_NAME"], "metadata.name");
        assert_eq!(
            main.command.as_deref(),
            Some(&["train".to_owned(), "--verbose".to_owned()][..])
        );
        let expected: &[&str] = if task == "a" {
            &["--epochs", "3", "--fast"]
        } else {
            &["--epochs", "1"]
        };
        assert_eq!(
            main.args.clone().unwrap_or_default(),
            expected,
            "task {task}'s arguments"
        );
    }
    let done = flow.get_run(&run.name).await;
    for task in &done.tasks {
        assert_eq!(task.attempts.len(), 1, "task {} ran once", task.name);
        let attempt = &task.attempts[0];
        assert_eq!(attempt.exit_code, Some(0));
        assert_eq!(attempt.node, flow.node.name);
        assert_eq!(attempt.status.as_ref().map(|status| status.code), Some(0));
    }
}

async fn parallelism_holds_on_a_wide_fan_out(shape: Shape) {
    let flow = Flow::start(shape).await;
    let _kubelet = flow
        .kubelet()
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let mut tasks = vec![task("root", &[])];
    tasks.extend((0..10).map(|i| task(&format!("wide-{i}"), &["root"])));
    let pipeline = flow.pipeline("fan", tasks, 2).await;
    let run = flow.start_run(&pipeline.name).await;
    let seen = flow.watch_to_end(&run.name).await;
    assert_eq!(last(&seen).state(), RunState::Succeeded);
    let most = seen
        .iter()
        .map(|view| {
            view.tasks
                .iter()
                .filter(|task| task.state() == RunState::Running)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert_eq!(most, 2, "at most two tasks run at once, and two did");
    assert_eq!(flow.pods(id_of(&run.name)).await.len(), 11);
}

async fn failures_retry_with_backoff_and_retry_run_reruns_only_what_failed(shape: Shape) {
    let flow = Flow::start(shape).await;
    let failing = flow
        .kubelet()
        .script("cube.io/task=b", Script::run_for(Duration::from_millis(100)).exit(3))
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let mut flaky = task("b", &["a"]);
    flaky.retry = Some(RetryPolicy {
        limit: 2,
        backoff: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        ..RetryPolicy::default()
    });
    let pipeline = flow
        .pipeline("flaky", vec![task("a", &[]), flaky, task("c", &["b"])], 0)
        .await;
    let run = flow.start_run(&pipeline.name).await;
    let seen = flow.watch_to_end(&run.name).await;
    let failed = flow.get_run(&run.name).await;
    assert_eq!(failed.state(), RunState::Failed, "{:#?}", last(&seen));
    let state = states(&failed);
    assert_eq!(
        (state["a"], state["b"], state["c"]),
        (RunState::Succeeded, RunState::Failed, RunState::Pending)
    );
    let b = &failed.tasks[1];
    assert_eq!(b.attempts.len(), 3, "one attempt and two retries");
    assert!(b.attempts.iter().all(|attempt| attempt.exit_code == Some(3)));
    assert_eq!(b.reason, "attempt 3 failed: Error (exit code 3)");
    // Each retry waited its backoff: 1 s, then 2 s (the times are the engine's, in milliseconds).
    let ends = |n: usize| cube_kit::time::timestamp_ms(b.attempts[n].end_time.as_ref().expect("ended"));
    let starts = |n: usize| cube_kit::time::timestamp_ms(b.attempts[n].start_time.as_ref().expect("started"));
    assert!(
        starts(1) - ends(0) >= 1000,
        "the first retry came {} ms after",
        starts(1) - ends(0)
    );
    assert!(
        starts(2) - ends(1) >= 2000,
        "the second retry came {} ms after",
        starts(2) - ends(1)
    );

    // The pods are long gone and the kubelet now lets b succeed: a retry reruns b and c only.
    drop(failing);
    flow.namespace
        .pods()
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &ListParams::default().labels(&format!("cube.io/run={}", id_of(&run.name))),
        )
        .await
        .expect("deleting the run's pods");
    let _kubelet = flow
        .kubelet()
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let retried = flow
        .runs()
        .retry_run(authed(
            RetryRunRequest {
                name: run.name.clone(),
                from_task: String::new(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("retrying")
        .into_inner();
    assert!(
        matches!(retried.state(), RunState::Pending | RunState::Running),
        "{retried:?}"
    );
    let seen = flow.watch_to_end(&run.name).await;
    assert_eq!(last(&seen).state(), RunState::Succeeded, "{:#?}", last(&seen));
    let attempts = |run: &Run| -> Vec<usize> { run.tasks.iter().map(|task| task.attempts.len()).collect() };
    assert_eq!(
        attempts(last(&seen)),
        [1, 4, 1],
        "a kept its one attempt, b and c ran again"
    );

    // From a named task: it and what follows it run again, with every earlier attempt kept.
    flow.runs()
        .retry_run(authed(
            RetryRunRequest {
                name: run.name.clone(),
                from_task: "b".into(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("retrying from b");
    let seen = flow.watch_to_end(&run.name).await;
    assert_eq!(last(&seen).state(), RunState::Succeeded);
    assert_eq!(attempts(last(&seen)), [1, 5, 2]);
}

async fn cancel_and_a_new_manual_run_end_runs_at_once(shape: Shape) {
    let flow = Flow::start(shape).await;
    // Pods that never end: only a cancel ends them.
    let _kubelet = flow
        .kubelet()
        .script("app.kubernetes.io/managed-by=cube", Script::run());
    let pipeline = flow.pipeline("endless", vec![task("forever", &[])], 0).await;
    let running = |name: String| {
        let flow = &flow;
        async move {
            cube_testkit::eventually("the task running", TIMEOUT, || async {
                let run = flow.get_run(&name).await;
                (run.tasks[0].attempts.first().map(|attempt| attempt.state()) == Some(RunState::Running)).then_some(())
            })
            .await;
        }
    };
    let first = flow.start_run(&pipeline.name).await;
    running(first.name.clone()).await;
    let canceled = flow
        .runs()
        .cancel_run(authed(
            CancelRunRequest {
                name: first.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("canceling")
        .into_inner();
    assert_eq!(canceled.state(), RunState::Canceled, "{canceled:#?}");
    assert_eq!(canceled.tasks[0].state(), RunState::Canceled);
    assert!(
        flow.pods(id_of(&first.name)).await.is_empty(),
        "the pod is deleted at once"
    );

    // A second manual run replaces a first that is still going.
    let second = flow.start_run(&pipeline.name).await;
    running(second.name.clone()).await;
    let third = flow.start_run(&pipeline.name).await;
    let replaced = cube_testkit::eventually("the earlier run canceled", TIMEOUT, || async {
        let run = flow.get_run(&second.name).await;
        (run.state() == RunState::Canceled).then_some(run)
    })
    .await;
    assert_eq!(
        replaced.reason,
        format!("replaced by the manual run {}", id_of(&third.name))
    );
    cube_testkit::eventually("its pod deleted", TIMEOUT, || async {
        flow.pods(id_of(&second.name)).await.is_empty().then_some(())
    })
    .await;
    running(third.name.clone()).await;
    let listed = flow
        .runs()
        .list_runs(authed(
            ListRunsRequest {
                parent: pipeline.name.clone(),
                filter: "state = CANCELED".into(),
                ..ListRunsRequest::default()
            },
            &flow.platform.token,
        ))
        .await
        .expect("listing runs")
        .into_inner();
    let names: Vec<&str> = listed.runs.iter().map(|run| run.name.as_str()).collect();
    assert_eq!(names, [second.name.as_str(), first.name.as_str()], "newest first");
}

async fn run_task_debug_task_and_clear_task_act_on_one_task_alone(shape: Shape) {
    let flow = Flow::start(shape).await;
    // `train` never ends by itself; `prepare` does.
    let _kubelet = flow
        .kubelet()
        .script("cube.io/task=train", Script::run())
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let pipeline = flow
        .pipeline("solo", vec![task("prepare", &[]), task("train", &["prepare"])], 0)
        .await;
    let running = |name: String, task: &'static str| {
        let flow = &flow;
        async move {
            cube_testkit::eventually("the task running", TIMEOUT, || async {
                let run = flow.get_run(&name).await;
                let attempt = run.tasks.iter().find(|one| one.name == task)?.attempts.first()?;
                (attempt.state() == RunState::Running).then_some(run)
            })
            .await
        }
    };
    let manual = flow.start_run(&pipeline.name).await;
    running(manual.name.clone(), "train").await;

    let run_task = |request_id: &str| {
        let mut runs = flow.runs();
        let request = authed(
            RunTaskRequest {
                pipeline: pipeline.name.clone(),
                task: "train".into(),
                request_id: request_id.into(),
            },
            &flow.platform.token,
        );
        async move { runs.run_task(request).await }
    };
    let first = run_task("first").await.expect("RunTask").into_inner();
    assert_eq!(first.trigger(), Trigger::Task);
    assert_eq!(
        states(&first).into_keys().collect::<Vec<_>>(),
        ["train"],
        "only the task"
    );
    let snapshot = first.pipeline.clone().expect("the run's pipeline");
    assert!(snapshot.tasks[0].upstream.is_empty(), "it runs alone: {snapshot:?}");
    assert_eq!(
        run_task("first").await.expect("RunTask again").into_inner().name,
        first.name,
        "idempotent by request id"
    );
    running(first.name.clone(), "train").await;
    assert_eq!(
        flow.get_run(&manual.name).await.state(),
        RunState::Running,
        "a task's run leaves the pipeline's runs alone"
    );

    // A second RunTask of the task replaces the first.
    let second = run_task("second").await.expect("RunTask").into_inner();
    let replaced = cube_testkit::eventually("the first task run canceled", TIMEOUT, || async {
        let run = flow.get_run(&first.name).await;
        (run.state() == RunState::Canceled).then_some(run)
    })
    .await;
    assert_eq!(
        replaced.reason,
        format!("replaced by the task run {}", id_of(&second.name))
    );
    running(second.name.clone(), "train").await;

    // A debug pod: the task's image, environment and placement, sleeping.
    let debug = flow
        .runs()
        .debug_task(authed(
            DebugTaskRequest {
                pipeline: pipeline.name.clone(),
                task: "train".into(),
                duration: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
                request_id: String::new(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("DebugTask")
        .into_inner();
    assert_eq!(debug.trigger(), Trigger::Debug);
    let debugging = running(debug.name.clone(), "train").await;
    let attempt = &debugging.tasks[0].attempts[0];
    assert_eq!(attempt.namespace, flow.namespace.name);
    let pods = flow.pods(id_of(&debug.name)).await;
    assert_eq!(pods.len(), 1, "one debug pod");
    assert_eq!(pods[0].metadata.name.as_deref(), Some(attempt.pod.as_str()));
    let spec = pods[0].spec.clone().expect("a spec");
    assert_eq!(spec.node_name.as_deref(), Some(flow.node.name.as_str()));
    let main = &spec.containers[0];
    assert_eq!(main.image.as_deref(), Some("cube.test/worker:1"));
    assert_eq!(
        main.command.as_deref(),
        Some(&["sh".to_owned(), "-c".to_owned(), "sleep 600".to_owned()][..])
    );
    let env: BTreeMap<String, String> = main
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|var| (var.name, var.value.unwrap_or_default()))
        .collect();
    assert_eq!(env["TEMPLATE_ENV"], "from-template");
    assert_eq!(env["KFJ_TASK_NAME"], "train");
    let debug_runs = flow
        .runs()
        .list_runs(authed(
            ListRunsRequest {
                parent: pipeline.name.clone(),
                filter: "trigger = DEBUG".into(),
                ..ListRunsRequest::default()
            },
            &flow.platform.token,
        ))
        .await
        .expect("listing debug runs")
        .into_inner();
    assert_eq!(
        debug_runs.runs.iter().map(|run| run.name.as_str()).collect::<Vec<_>>(),
        [debug.name.as_str()]
    );

    // ClearTask ends the task's own runs and their pods, not the pipeline's run.
    let cleared = flow
        .runs()
        .clear_task(authed(
            ClearTaskRequest {
                pipeline: pipeline.name.clone(),
                task: "train".into(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("ClearTask")
        .into_inner();
    let mut names: Vec<&str> = cleared.runs.iter().map(|run| run.name.as_str()).collect();
    names.sort_unstable();
    let mut expected = [second.name.as_str(), debug.name.as_str()];
    expected.sort_unstable();
    assert_eq!(names, expected);
    for run in &cleared.runs {
        assert_eq!(run.state(), RunState::Canceled, "{run:#?}");
        assert!(
            flow.pods(id_of(&run.name)).await.is_empty(),
            "{}'s pod deleted",
            run.name
        );
    }
    assert_eq!(flow.get_run(&manual.name).await.state(), RunState::Running);
    assert!(!flow.pods(id_of(&manual.name)).await.is_empty());

    // Bad input names its field and starts nothing.
    let status = flow
        .runs()
        .run_task(authed(
            RunTaskRequest {
                pipeline: pipeline.name.clone(),
                task: "nope".into(),
                request_id: String::new(),
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("an unknown task");
    assert_eq!(bad_fields(&status), ["task"], "{status:?}");
    let status = flow
        .runs()
        .debug_task(authed(
            DebugTaskRequest {
                pipeline: pipeline.name.clone(),
                task: "train".into(),
                duration: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
                request_id: String::new(),
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("too short a debug pod");
    assert_eq!(bad_fields(&status), ["duration"], "{status:?}");
}

async fn schedules_are_validated_whole_and_show_their_next_fire(shape: Shape) {
    let flow = Flow::start(shape).await;
    let pipeline = flow.pipeline("nightly", vec![task("a", &[])], 0).await;
    let mut schedules = ScheduleServiceClient::new(flow.channel.clone());
    let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let refused = |schedule: Schedule| {
        let mut schedules = schedules.clone();
        let request = authed(
            CreateScheduleRequest {
                parent: pipeline.name.clone(),
                schedule_id: "bad".into(),
                schedule: Some(schedule),
            },
            &flow.platform.token,
        );
        async move { schedules.create_schedule(request).await.expect_err("refused") }
    };
    for (schedule, field) in [
        (
            Schedule {
                cron: "61 * * * *".into(),
                ..nightly()
            },
            "schedule.cron",
        ),
        (
            Schedule {
                cron: "0 0 * * * *".into(),
                ..nightly()
            },
            "schedule.cron",
        ),
        (
            Schedule {
                time_zone: "Mars/Olympus".into(),
                ..nightly()
            },
            "schedule.time_zone",
        ),
        (
            Schedule {
                start_time: at(1_900_000_000),
                end_time: at(1_800_000_000),
                ..nightly()
            },
            "schedule.end_time",
        ),
    ] {
        let status = refused(schedule).await;
        assert_eq!(bad_fields(&status), [field], "{status:?}");
    }
    let listed = schedules
        .list_schedules(authed(
            ListSchedulesRequest {
                parent: pipeline.name.clone(),
                ..ListSchedulesRequest::default()
            },
            &flow.platform.token,
        ))
        .await
        .expect("listing schedules")
        .into_inner();
    assert!(listed.schedules.is_empty(), "nothing was stored: {listed:?}");

    // 2027-03-28 in Berlin: 02:00 becomes 03:00, so 02:30 fires once, at the shifted instant 03:30 (01:30Z).
    let created = flow
        .schedule(
            &pipeline.name,
            "spring",
            Schedule {
                start_time: at(1_806_192_000), // 2027-03-28T00:00:00Z
                ..nightly()
            },
        )
        .await;
    assert_eq!(created.name, format!("{}/schedules/spring", pipeline.name));
    assert_eq!(created.creator, "users/lena");
    assert_eq!(created.next_fire_time, at(1_806_197_400), "2027-03-28T01:30:00Z");
    let got = schedules
        .get_schedule(authed(
            GetScheduleRequest {
                name: created.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("getting the schedule")
        .into_inner();
    assert_eq!(got, created);

    let update = |etag: String, enabled: bool| {
        let mut schedules = schedules.clone();
        let request = authed(
            UpdateScheduleRequest {
                schedule: Some(Schedule {
                    name: created.name.clone(),
                    etag,
                    enabled,
                    ..Schedule::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["enabled".into()],
                }),
            },
            &flow.platform.token,
        );
        async move { schedules.update_schedule(request).await }
    };
    let disabled = update(created.etag.clone(), false)
        .await
        .expect("disabling")
        .into_inner();
    assert!(!disabled.enabled);
    assert_eq!(disabled.next_fire_time, None, "a disabled schedule does not fire");
    assert_eq!(disabled.cron, "30 2 * * *", "the fields outside the mask are kept");
    let stale = update(created.etag.clone(), true).await.expect_err("a stale etag");
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    for paths in [vec![], vec!["enabled".to_owned(), "creator".to_owned()]] {
        let refused = schedules
            .clone()
            .update_schedule(authed(
                UpdateScheduleRequest {
                    schedule: Some(Schedule {
                        name: created.name.clone(),
                        enabled: true,
                        ..Schedule::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths: paths.clone() }),
                },
                &flow.platform.token,
            ))
            .await
            .expect_err("a mask naming nothing or a field that cannot change");
        assert_eq!(bad_fields(&refused), ["update_mask"], "{paths:?}: {refused:?}");
    }

    schedules
        .delete_schedule(authed(
            DeleteScheduleRequest {
                name: created.name.clone(),
                etag: disabled.etag.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("deleting");
    let gone = schedules
        .get_schedule(authed(
            GetScheduleRequest {
                name: created.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
}

async fn updates_change_what_the_mask_names_and_keep_the_rest(shape: Shape) {
    let flow = Flow::start(shape).await;
    let mut templates = JobTemplateServiceClient::new(flow.channel.clone());
    let template = templates
        .get_job_template(authed(
            GetJobTemplateRequest {
                name: "jobTemplates/worker".into(),
            },
            &flow.platform.admin,
        ))
        .await
        .expect("getting the template")
        .into_inner();
    let updated = templates
        .update_job_template(authed(
            UpdateJobTemplateRequest {
                job_template: Some(JobTemplate {
                    name: template.name.clone(),
                    etag: template.etag.clone(),
                    entrypoint: "train --quiet".into(),
                    image: "ignored:1".into(),
                    ..JobTemplate::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["entrypoint".into()],
                }),
            },
            &flow.platform.admin,
        ))
        .await
        .expect("updating the template")
        .into_inner();
    assert_eq!(updated.entrypoint, "train --quiet");
    assert_eq!(updated.image, template.image, "outside the mask");
    assert_ne!(updated.etag, template.etag);
    let refused = templates
        .update_job_template(authed(
            UpdateJobTemplateRequest {
                job_template: Some(JobTemplate {
                    name: template.name.clone(),
                    image: "ignored:1".into(),
                    ..JobTemplate::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["image".into(), "creator".into(), "name".into()],
                }),
            },
            &flow.platform.admin,
        ))
        .await
        .expect_err("creator and name cannot change");
    assert_eq!(bad_fields(&refused), ["update_mask", "update_mask"], "{refused:?}");

    let pipeline = flow.pipeline("edited", vec![task("a", &[])], 0).await;
    let mut pipelines = flow.pipelines();
    let update = |etag: String| {
        let mut pipelines = pipelines.clone();
        let request = authed(
            UpdatePipelineRequest {
                pipeline: Some(Pipeline {
                    name: pipeline.name.clone(),
                    etag,
                    description: "nightly training".into(),
                    ..Pipeline::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["description".into()],
                }),
            },
            &flow.platform.token,
        );
        async move { pipelines.update_pipeline(request).await }
    };
    let changed = update(pipeline.etag.clone())
        .await
        .expect("updating the pipeline")
        .into_inner();
    assert_eq!(changed.description, "nightly training");
    assert_eq!(changed.tasks.len(), 1, "outside the mask");
    let stale = update(pipeline.etag.clone()).await.expect_err("a stale etag");
    assert_eq!(stale.code(), Code::Aborted);
    let refused = pipelines
        .update_pipeline(authed(
            UpdatePipelineRequest {
                pipeline: Some(Pipeline {
                    name: pipeline.name.clone(),
                    ..Pipeline::default()
                }),
                update_mask: None,
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("no mask");
    assert_eq!(bad_fields(&refused), ["update_mask"], "{refused:?}");
    let read = pipelines
        .get_pipeline(authed(
            GetPipelineRequest {
                name: pipeline.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("reading it back")
        .into_inner();
    assert_eq!(read, changed);
}

async fn bad_input_is_refused_field_by_field_and_nothing_is_stored(shape: Shape) {
    let flow = Flow::start(shape).await;
    let create = |id: &str, tasks: Vec<Task>| {
        let mut pipelines = flow.pipelines();
        let request = authed(
            CreatePipelineRequest {
                parent: "projects/vision".into(),
                pipeline_id: id.into(),
                pipeline: Some(Pipeline {
                    tasks,
                    ..Pipeline::default()
                }),
            },
            &flow.platform.token,
        );
        async move { pipelines.create_pipeline(request).await.expect_err("refused") }
    };
    let cyclic = create("cyclic", vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"])]).await;
    assert_eq!(bad_fields(&cyclic), ["pipeline.tasks"]);
    assert!(cyclic.message().contains("a -> b -> c -> a"), "{}", cyclic.message());

    let mut bad_args = task("a", &[]);
    bad_args.args = Some(prost_types::Struct {
        fields: BTreeMap::from([
            ("--epochs".to_owned(), prost_types::Value::from(0.0)),
            ("--fast".to_owned(), prost_types::Value::from("yes".to_owned())),
            ("--nope".to_owned(), prost_types::Value::from(1.0)),
        ]),
    });
    let mut unknown = task("b", &[]);
    unknown.template = "jobTemplates/missing".into();
    let mut resources = task("c", &[]);
    resources.cpu = "500m".into();
    resources.memory = "1.5G".into();
    resources.gpu = "0(T4)".into();
    let mut named = task("Bad_Name", &[]);
    named.upstream = vec!["ghost".into()];
    let refused = create("mixed", vec![bad_args, unknown, resources, named]).await;
    let mut fields = bad_fields(&refused);
    fields.sort();
    assert_eq!(
        fields,
        [
            "pipeline.tasks[0].args.--epochs",
            "pipeline.tasks[0].args.--fast",
            "pipeline.tasks[0].args.--nope",
            "pipeline.tasks[1].template",
            "pipeline.tasks[2].cpu",
            "pipeline.tasks[2].gpu",
            "pipeline.tasks[2].memory",
            "pipeline.tasks[3].name",
            "pipeline.tasks[3].upstream[0]",
        ]
    );
    let badly_named = create("Not-A-Name", vec![task("a", &[])]).await;
    assert_eq!(bad_fields(&badly_named), ["pipeline_id"]);
    let listed = flow
        .pipelines()
        .list_pipelines(authed(
            ListPipelinesRequest {
                parent: "projects/vision".into(),
                ..ListPipelinesRequest::default()
            },
            &flow.platform.token,
        ))
        .await
        .expect("listing")
        .into_inner();
    assert!(
        listed.pipelines.is_empty(),
        "nothing was stored: {:?}",
        listed.pipelines
    );

    let schema = JobTemplateServiceClient::new(flow.channel.clone())
        .create_job_template(authed(
            CreateJobTemplateRequest {
                job_template_id: "broken".into(),
                job_template: Some(JobTemplate {
                    image: String::new(),
                    args: vec![ArgSpec {
                        name: "--mode".into(),
                        r#type: ArgType::Enum as i32,
                        ..ArgSpec::default()
                    }],
                    ..JobTemplate::default()
                }),
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("refused");
    assert_eq!(
        bad_fields(&schema),
        ["job_template.image", "job_template.args[0].choices"]
    );

    // A category is a template-category project the caller can see.
    ProjectServiceClient::new(connect(&flow.platform.projects).await)
        .create_project(authed(
            CreateProjectRequest {
                project: Some(Project {
                    r#type: ProjectType::TemplateCategory as i32,
                    ..Project::default()
                }),
                project_id: "tools".into(),
            },
            &flow.platform.admin,
        ))
        .await
        .expect("creating a template category");
    let categorized = |category: &str, token: &str| {
        let mut templates = JobTemplateServiceClient::new(flow.channel.clone());
        let request = authed(
            CreateJobTemplateRequest {
                job_template_id: "categorized".into(),
                job_template: Some(JobTemplate {
                    category: category.into(),
                    ..worker_template()
                }),
            },
            token,
        );
        async move { templates.create_job_template(request).await }
    };
    let org = categorized("projects/vision", &flow.platform.token)
        .await
        .expect_err("an ORG project is no category");
    assert_eq!(bad_fields(&org), ["job_template.category"]);
    assert!(org.message().contains("ORG"), "{}", org.message());
    let unseen = categorized("projects/tools", &flow.platform.token)
        .await
        .expect_err("lena is no member of tools");
    assert_eq!(bad_fields(&unseen), ["job_template.category"]);
    let made = categorized("projects/tools", &flow.platform.admin)
        .await
        .expect("an admin sees every category")
        .into_inner();
    assert_eq!(made.category, "projects/tools");
    // A one-letter project id is no project id in any service: refused here, not passed on for projects to refuse.
    for token in [&flow.platform.admin, &flow.platform.token] {
        let short = categorized("projects/p", token)
            .await
            .expect_err("projects/p is no project name");
        assert_eq!(bad_fields(&short), ["job_template.category"], "{short:?}");
    }
    let short_parent = flow
        .pipelines()
        .list_pipelines(authed(
            ListPipelinesRequest {
                parent: "projects/p".into(),
                ..ListPipelinesRequest::default()
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("projects/p is no project name");
    assert_eq!(bad_fields(&short_parent), ["parent"], "{short_parent:?}");
}

/// What a call's answer says of the caller's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not signed in.
    Unauthenticated,
    /// Told the resource does not exist.
    Hidden,
    /// Signed in, seen, refused.
    Forbidden,
    /// Reached what the call does (whatever it answered then).
    Allowed,
}

fn outcome<T>(result: Result<T, tonic::Status>) -> Outcome {
    match result {
        Ok(_) => Outcome::Allowed,
        Err(status) => match status.code() {
            Code::Unauthenticated => Outcome::Unauthenticated,
            Code::NotFound => Outcome::Hidden,
            Code::PermissionDenied => Outcome::Forbidden,
            _ => Outcome::Allowed,
        },
    }
}

/// Signs `username` up with `admin` and in, and adds them to `vision` as `role` (by lena, its owner).
async fn member(platform: &Platform, username: &str, role: Role) -> String {
    let auth = connect(&platform.auth).await;
    let password = format!("{username} long password");
    UserServiceClient::new(auth.clone())
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: format!("{username}@example.com"),
                    ..User::default()
                }),
                user_id: username.into(),
                password: password.clone(),
            },
            &platform.admin,
        ))
        .await
        .expect("creating a user");
    ProjectServiceClient::new(connect(&platform.projects).await)
        .create_member(authed(
            CreateMemberRequest {
                parent: "projects/vision".into(),
                member: Some(Member {
                    role: role as i32,
                    subject: Some(member::Subject::User(format!("users/{username}"))),
                    ..Member::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("adding a member");
    AuthServiceClient::new(auth)
        .login(LoginRequest {
            username: username.into(),
            password,
        })
        .await
        .expect("login")
        .into_inner()
        .access_token
}

/// `message` with `token` as its bearer, or without credentials when `token` is empty.
fn as_caller<T>(message: T, token: &str) -> tonic::Request<T> {
    if token.is_empty() {
        tonic::Request::new(message)
    } else {
        authed(message, token)
    }
}

async fn every_rpc_answers_each_role_as_its_rights_say(shape: Shape) {
    use Outcome::{Allowed as A, Forbidden as F, Hidden as H, Unauthenticated as U};
    let flow = Flow::start(shape).await;
    let _kubelet = flow
        .kubelet()
        .script("app.kubernetes.io/managed-by=cube", Script::run_for(RUNS).exit(0));
    let viewer = member(&flow.platform, "vera", Role::Viewer).await;
    let developer = member(&flow.platform, "devi", Role::Developer).await;
    let pipeline = flow.pipeline("matrix", vec![task("a", &[])], 0).await;
    let run = flow.start_run(&pipeline.name).await;
    flow.watch_to_end(&run.name).await;
    let platform = &flow.platform;
    let callers = [
        ("anonymous", String::new()),
        ("non-member", platform.stranger.clone()),
        ("viewer", viewer),
        ("developer", developer),
        ("owner", platform.token.clone()),
        ("admin", platform.admin.clone()),
    ];
    let stale = "\"v0\"".to_owned();
    let run_name = run.name.clone();
    let pipeline_name = pipeline.name.clone();
    let schedule_name = flow.schedule(&pipeline_name, "nightly", nightly()).await.name;
    // Each RPC, and what each caller above gets; calls that are allowed fail after the check (a stale etag, an
    // invalid id) or change nothing, so that every row sees the same state.
    type Call<'a> = Box<dyn Fn(String) -> futures::future::BoxFuture<'a, Outcome> + 'a>;
    let templates = JobTemplateServiceClient::new(flow.channel.clone());
    let pipelines = flow.pipelines();
    let runs = flow.runs();
    let workloads = ProjectWorkloadServiceClient::new(flow.channel.clone());
    let schedules = ScheduleServiceClient::new(flow.channel.clone());
    macro_rules! call {
        ($client:ident, $method:ident, $message:expr) => {{
            let client = $client.clone();
            let message = $message;
            Box::new(move |token: String| {
                let mut client = client.clone();
                let message = message.clone();
                Box::pin(async move { outcome(client.$method(as_caller(message, &token)).await) })
                    as futures::future::BoxFuture<'_, Outcome>
            }) as Call<'_>
        }};
    }
    let rows: Vec<(&str, Call<'_>, [Outcome; 6])> = vec![
        (
            "CreateJobTemplate",
            call!(
                templates,
                create_job_template,
                CreateJobTemplateRequest {
                    job_template_id: "Invalid Id".into(),
                    job_template: Some(worker_template()),
                }
            ),
            [U, A, A, A, A, A],
        ),
        (
            "GetJobTemplate",
            call!(
                templates,
                get_job_template,
                GetJobTemplateRequest {
                    name: "jobTemplates/worker".into()
                }
            ),
            [U, A, A, A, A, A],
        ),
        (
            "ListJobTemplates",
            call!(templates, list_job_templates, ListJobTemplatesRequest::default()),
            [U, A, A, A, A, A],
        ),
        (
            "UpdateJobTemplate",
            call!(
                templates,
                update_job_template,
                UpdateJobTemplateRequest {
                    job_template: Some(JobTemplate {
                        name: "jobTemplates/worker".into(),
                        etag: stale.clone(),
                        ..worker_template()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["image".into()]
                    }),
                }
            ),
            [U, F, F, F, F, A],
        ),
        (
            "DeleteJobTemplate",
            call!(
                templates,
                delete_job_template,
                DeleteJobTemplateRequest {
                    name: "jobTemplates/worker".into(),
                    etag: stale.clone(),
                }
            ),
            [U, F, F, F, F, A],
        ),
        (
            "CreatePipeline",
            call!(
                pipelines,
                create_pipeline,
                CreatePipelineRequest {
                    parent: "projects/vision".into(),
                    pipeline_id: "Invalid Id".into(),
                    pipeline: None,
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "GetPipeline",
            call!(
                pipelines,
                get_pipeline,
                GetPipelineRequest {
                    name: pipeline_name.clone()
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "ListPipelines",
            call!(
                pipelines,
                list_pipelines,
                ListPipelinesRequest {
                    parent: "projects/vision".into(),
                    ..ListPipelinesRequest::default()
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "UpdatePipeline",
            call!(
                pipelines,
                update_pipeline,
                UpdatePipelineRequest {
                    pipeline: Some(Pipeline {
                        name: pipeline_name.clone(),
                        etag: stale.clone(),
                        ..Pipeline::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["description".into()]
                    }),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "DeletePipeline",
            call!(
                pipelines,
                delete_pipeline,
                DeletePipelineRequest {
                    name: pipeline_name.clone(),
                    etag: stale.clone(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "CopyPipeline",
            call!(
                pipelines,
                copy_pipeline,
                CopyPipelineRequest {
                    name: pipeline_name.clone(),
                    pipeline_id: "Invalid Id".into(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "CreateRun",
            call!(
                runs,
                create_run,
                CreateRunRequest {
                    parent: pipeline_name.clone(),
                    request_id: String::new(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "GetRun",
            call!(runs, get_run, GetRunRequest { name: run_name.clone() }),
            [U, H, A, A, A, A],
        ),
        (
            "ListRuns",
            call!(
                runs,
                list_runs,
                ListRunsRequest {
                    parent: "projects/vision/pipelines/-".into(),
                    ..ListRunsRequest::default()
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "CancelRun",
            call!(runs, cancel_run, CancelRunRequest { name: run_name.clone() }),
            [U, H, F, A, A, A],
        ),
        (
            "RetryRun",
            call!(
                runs,
                retry_run,
                RetryRunRequest {
                    name: run_name.clone(),
                    from_task: String::new(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "SkipRun",
            call!(runs, skip_run, SkipRunRequest { name: run_name.clone() }),
            [U, H, F, A, A, A],
        ),
        (
            "WatchRun",
            call!(runs, watch_run, WatchRunRequest { name: run_name.clone() }),
            [U, H, A, A, A, A],
        ),
        (
            "GetTaskLogs",
            call!(
                runs,
                get_task_logs,
                GetTaskLogsRequest {
                    run: run_name.clone(),
                    task: "no-such-task".into(),
                    attempt: 0,
                    follow: false,
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "RunTask",
            call!(
                runs,
                run_task,
                RunTaskRequest {
                    pipeline: pipeline_name.clone(),
                    task: "no-such-task".into(),
                    request_id: String::new(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "DebugTask",
            call!(
                runs,
                debug_task,
                DebugTaskRequest {
                    pipeline: pipeline_name.clone(),
                    task: "no-such-task".into(),
                    duration: None,
                    request_id: String::new(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "ClearTask",
            call!(
                runs,
                clear_task,
                ClearTaskRequest {
                    pipeline: pipeline_name.clone(),
                    task: "no-such-task".into(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "CreateSchedule",
            call!(
                schedules,
                create_schedule,
                CreateScheduleRequest {
                    parent: pipeline_name.clone(),
                    schedule_id: "Invalid Id".into(),
                    schedule: Some(nightly()),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "GetSchedule",
            call!(
                schedules,
                get_schedule,
                GetScheduleRequest {
                    name: schedule_name.clone()
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "ListSchedules",
            call!(
                schedules,
                list_schedules,
                ListSchedulesRequest {
                    parent: "projects/vision/pipelines/-".into(),
                    ..ListSchedulesRequest::default()
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "UpdateSchedule",
            call!(
                schedules,
                update_schedule,
                UpdateScheduleRequest {
                    schedule: Some(Schedule {
                        name: schedule_name.clone(),
                        etag: stale.clone(),
                        ..nightly()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["cron".into()]
                    }),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "DeleteSchedule",
            call!(
                schedules,
                delete_schedule,
                DeleteScheduleRequest {
                    name: schedule_name.clone(),
                    etag: stale.clone(),
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "BackfillSchedule",
            call!(
                schedules,
                backfill_schedule,
                BackfillScheduleRequest {
                    name: schedule_name.clone(),
                    start_time: None,
                    end_time: None,
                }
            ),
            [U, H, F, A, A, A],
        ),
        (
            "GetTaskRecommendation",
            call!(
                pipelines,
                get_task_recommendation,
                GetTaskRecommendationRequest {
                    pipeline: pipeline_name.clone(),
                    task: "a".into(),
                }
            ),
            [U, H, A, A, A, A],
        ),
        (
            "ListProjectWorkloads",
            call!(
                workloads,
                list_project_workloads,
                ListProjectWorkloadsRequest {
                    project: "projects/vision".into(),
                }
            ),
            [U, H, A, A, A, A],
        ),
    ];
    let mut wrong = Vec::new();
    for (rpc, call, expected) in &rows {
        for ((caller, token), want) in callers.iter().zip(expected) {
            // CreateRun by the allowed really runs: the runs it makes replace each other, which changes nothing
            // the other rows read.
            let got = call(token.clone()).await;
            if got != *want {
                wrong.push(format!("{rpc} as {caller}: {got:?}, expected {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(rows.len(), 30, "every workflow RPC has a row");
}

async fn quotas_queue_runs_and_tasks_with_the_reason_until_they_fit(shape: Shape) {
    let flow = Flow::with_quota(
        shape,
        Quota {
            runs: Some(1),
            cpu: Some(1.0),
            ..Quota::default()
        },
    )
    .await;
    let _kubelet = flow.kubelet().script("cube.io/task=forever", Script::run()).script(
        "app.kubernetes.io/managed-by=cube",
        Script::run_for(Duration::from_millis(1500)).exit(0),
    );
    let endless = flow.pipeline("endless", vec![task("forever", &[])], 0).await;
    let big = |name: &str| {
        let mut big = task(name, &[]);
        big.cpu = "0.8".into();
        big
    };
    let wide = flow.pipeline("wide", vec![big("left"), big("right")], 0).await;

    // The project runs one run at a time: a second waits, saying why, until the first ends.
    let first = flow.start_run(&endless.name).await;
    cube_testkit::eventually("the first run running", TIMEOUT, || async {
        (flow.get_run(&first.name).await.tasks[0].state() == RunState::Running).then_some(())
    })
    .await;
    let second = flow.start_run(&wide.name).await;
    let queued = cube_testkit::eventually("the second run queued", TIMEOUT, || async {
        let run = flow.get_run(&second.name).await;
        (run.state() == RunState::Queued).then_some(run)
    })
    .await;
    assert!(queued.reason.contains("runs"), "{}", queued.reason);
    assert!(
        flow.pods(id_of(&second.name)).await.is_empty(),
        "a queued run starts nothing"
    );
    flow.runs()
        .cancel_run(authed(
            CancelRunRequest {
                name: first.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("canceling the first run");

    // Then its two tasks ask 0.8 CPU each of a 1-CPU quota: one waits for the other, explained.
    let seen = flow.watch_to_end(&second.name).await;
    assert_eq!(last(&seen).state(), RunState::Succeeded, "{:#?}", last(&seen));
    let both = seen
        .iter()
        .any(|run| run.tasks.iter().all(|task| task.state() == RunState::Running));
    assert!(!both, "both tasks ran at once beyond the CPU quota");
    let waited = seen
        .iter()
        .flat_map(|run| &run.tasks)
        .find(|task| task.state() == RunState::Queued)
        .expect("a task waited for quota");
    assert!(
        waited.reason.starts_with("waiting for quota") && waited.reason.contains("cpu"),
        "{}",
        waited.reason
    );
}

/// Unix milliseconds of an RFC 3339 time.
fn ms(text: &str) -> i64 {
    let time: prost_types::Timestamp = text.parse().unwrap_or_else(|error| panic!("{text}: {error}"));
    time.seconds * 1000 + i64::from(time.nanos / 1_000_000)
}

/// A timestamp of an RFC 3339 time.
fn ts(text: &str) -> Option<prost_types::Timestamp> {
    Some(text.parse().unwrap_or_else(|error| panic!("{text}: {error}")))
}

/// The fire times of `runs` as `HH:MM` (UTC).
fn fires(runs: &[&Run]) -> Vec<String> {
    runs.iter()
        .map(|run| {
            let seconds = run.fire_time.map_or(0, |time| time.seconds).rem_euclid(86_400);
            format!("{:02}:{:02}", seconds / 3600, seconds % 3600 / 60)
        })
        .collect()
}

/// The runs of schedule `schedule` (its last part) among `runs`.
fn of<'a>(runs: &'a [Run], schedule: &str) -> Vec<&'a Run> {
    runs.iter()
        .filter(|run| run.schedule.ends_with(&format!("/schedules/{schedule}")))
        .collect()
}

/// Every pod the kubelet plays: ends well soon.
const MANAGED: &str = "app.kubernetes.io/managed-by=cube";

impl Flow {
    /// The scheduled runs of `pipeline`, oldest fire first, as `token`'s user sees them.
    async fn scheduled_as(&self, pipeline: &str, token: &str) -> Vec<Run> {
        let mut runs = self
            .runs()
            .list_runs(authed(
                ListRunsRequest {
                    parent: pipeline.into(),
                    page_size: 1000,
                    filter: "trigger = SCHEDULED".into(),
                    ..ListRunsRequest::default()
                },
                token,
            ))
            .await
            .expect("listing scheduled runs")
            .into_inner()
            .runs;
        runs.sort_by_key(|run| run.fire_time.map(|time| time.seconds));
        runs
    }

    /// Waits until the scheduled runs of `pipeline` are as `check` wants, and returns them.
    async fn scheduled_until(&self, pipeline: &str, what: &str, check: impl Fn(&[Run]) -> bool) -> Vec<Run> {
        let mut last = Vec::new();
        let found = tokio::time::timeout(TIMEOUT, async {
            loop {
                last = self.scheduled_as(pipeline, &self.platform.token).await;
                if check(&last) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if found.is_err() {
            let seen: Vec<_> = last
                .iter()
                .map(|run| (fires(&[run]), run.state(), run.reason.clone()))
                .collect();
            panic!("{what}: not seen; the scheduled runs: {seen:#?}");
        }
        last
    }

    /// Waits until run `name` is as `check` wants, and returns it.
    async fn run_until(&self, name: &str, what: &str, check: impl Fn(&Run) -> bool) -> Run {
        cube_testkit::eventually(what, TIMEOUT, || async {
            let run = self.get_run(name).await;
            check(&run).then_some(run)
        })
        .await
    }

    /// Schedule `name` as `token`'s user sees it.
    async fn get_schedule_as(&self, name: &str, token: &str) -> Schedule {
        ScheduleServiceClient::new(self.channel.clone())
            .get_schedule(authed(GetScheduleRequest { name: name.into() }, token))
            .await
            .expect("getting the schedule")
            .into_inner()
    }

    /// Changes the fields of `paths` of schedule `given.name` as lena.
    async fn update_schedule(&self, given: Schedule, paths: &[&str]) -> Schedule {
        ScheduleServiceClient::new(self.channel.clone())
            .update_schedule(authed(
                UpdateScheduleRequest {
                    schedule: Some(given),
                    update_mask: Some(prost_types::FieldMask {
                        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
                    }),
                },
                &self.platform.token,
            ))
            .await
            .expect("updating the schedule")
            .into_inner()
    }

    /// Runs `pipeline` once to its end: the scheduler's inventory then has the test's node, so fires can be placed.
    async fn warm_up(&self, pipeline: &str) {
        let run = self.start_run(pipeline).await;
        self.watch_to_end(&run.name).await;
    }
}

/// Every ten minutes, UTC, enabled.
fn every_ten_minutes() -> Schedule {
    Schedule {
        cron: "*/10 * * * *".into(),
        time_zone: "UTC".into(),
        enabled: true,
        ..Schedule::default()
    }
}

async fn schedules_fire_by_the_clock_under_max_concurrent_runs_and_keep_newest(shape: Shape) {
    let clock = Clock::manual(ms("2027-01-04T10:00:30Z"));
    let flow = Flow::at(shape, clock.clone()).await;
    // Every pod runs until deleted.
    let _kubelet = flow.kubelet();
    let pipeline = flow.pipeline("tens", vec![task("a", &[])], 0).await;
    let first = flow.start_run(&pipeline.name).await;
    flow.run_until(&first.name, "the manual run running", |run| {
        run.state() == RunState::Running
    })
    .await;
    let schedule = flow
        .schedule(
            &pipeline.name,
            "tens",
            Schedule {
                max_concurrent_runs: 2,
                ..every_ten_minutes()
            },
        )
        .await;
    assert_eq!(schedule.next_fire_time, ts("2027-01-04T10:10:00Z"));

    clock.set_ms(ms("2027-01-04T10:10:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:10 fire running", |runs| {
            runs.len() == 1 && runs[0].state() == RunState::Running
        })
        .await;
    let ten = runs[0].clone();
    assert_eq!(ten.schedule, schedule.name);
    assert_eq!(ten.fire_time, ts("2027-01-04T10:10:00Z"));
    assert_eq!(
        (ten.creator.as_str(), ten.trigger()),
        ("users/lena", Trigger::Scheduled)
    );

    // The manual run and the 10:10 fire fill the two slots: the 10:20 fire waits, saying why.
    clock.set_ms(ms("2027-01-04T10:20:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:20 fire waiting", |runs| {
            runs.len() == 2 && runs[1].state() == RunState::Queued && !runs[1].reason.is_empty()
        })
        .await;
    let twenty = runs[1].clone();
    assert!(
        twenty.reason.contains("waiting for a slot") && twenty.reason.contains("2 runs"),
        "{}",
        twenty.reason
    );
    let shown = flow.get_schedule_as(&schedule.name, &flow.platform.token).await;
    assert_eq!(shown.blocked_reason, twenty.reason);
    assert_eq!(shown.last_fire_time, ts("2027-01-04T10:20:00Z"));
    assert_eq!(shown.next_fire_time, ts("2027-01-04T10:30:00Z"));

    // A new manual run replaces the earlier manual run, never a scheduled one.
    let second = flow.start_run(&pipeline.name).await;
    flow.run_until(&first.name, "the first manual run canceled", |run| {
        run.state() == RunState::Canceled
    })
    .await;
    assert_eq!(flow.get_run(&ten.name).await.state(), RunState::Running);
    assert_eq!(
        flow.get_run(&twenty.name).await.state(),
        RunState::Queued,
        "the new manual run and the 10:10 fire hold the two slots"
    );
    // A slot frees: the waiting fire starts, its pod carrying its fire time.
    flow.runs()
        .cancel_run(authed(
            CancelRunRequest {
                name: second.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("canceling the manual run");
    flow.run_until(&twenty.name, "the 10:20 fire running", |run| {
        run.state() == RunState::Running
    })
    .await;
    let pods = flow.pods(id_of(&twenty.name)).await;
    let pod = pods.first().expect("the 10:20 fire's pod");
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations["cube.dev/execution-date"], "2027-01-04 10:20:00");
    let env: HashMap<String, String> = pod.spec.as_ref().expect("a spec").containers[0]
        .env
        .iter()
        .flatten()
        .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["execution_date"], "2027-01-04 10:20:00");
    assert_eq!(env["STAGE"], "test", "the pipeline's own environment stays");

    // Keeping the newest one, the next fire cancels the older scheduled runs still going.
    flow.update_schedule(
        Schedule {
            name: schedule.name.clone(),
            keep_newest: 1,
            ..Schedule::default()
        },
        &["keep_newest"],
    )
    .await;
    clock.set_ms(ms("2027-01-04T10:30:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:30 fire, the older ones canceled", |runs| {
            runs.len() == 3 && runs[..2].iter().all(|run| run.state() == RunState::Canceled)
        })
        .await;
    for old in &runs[..2] {
        assert!(old.reason.contains("keeps its newest 1"), "{}", old.reason);
    }
    let all: Vec<&Run> = runs.iter().collect();
    assert_eq!(fires(&all), ["10:10", "10:20", "10:30"], "one run per fire");
}

async fn depends_on_past_blocks_on_a_failure_until_it_is_retried_or_skipped(shape: Shape) {
    let clock = Clock::manual(ms("2027-01-04T10:00:30Z"));
    let flow = Flow::at(shape, clock.clone()).await;
    let failing = |time: &str| format!("cube.dev/execution-date=2027-01-04 {time}:00");
    let done = || Script::run_for(RUNS).exit(0);
    let kubelet = flow
        .kubelet()
        .script(&failing("10:20"), Script::run_for(RUNS).exit(1))
        .script(MANAGED, done());
    let pipeline = flow.pipeline("chain", vec![task("a", &[])], 0).await;
    flow.warm_up(&pipeline.name).await;
    let chain = || Schedule {
        depends_on_past: true,
        ..every_ten_minutes()
    };
    let schedule = flow.schedule(&pipeline.name, "chain", chain()).await;
    let state_of = |runs: &[Run], index: usize, state: RunState| runs.len() > index && runs[index].state() == state;
    clock.set_ms(ms("2027-01-04T10:10:05Z"));
    flow.scheduled_until(&pipeline.name, "the 10:10 fire succeeded", |runs| {
        state_of(runs, 0, RunState::Succeeded)
    })
    .await;
    clock.set_ms(ms("2027-01-04T10:20:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:20 fire failed", |runs| {
            state_of(runs, 1, RunState::Failed)
        })
        .await;
    let failed = runs[1].clone();
    // The failure blocks the next fire, visibly, and the one after waits for it.
    clock.set_ms(ms("2027-01-04T10:30:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:30 fire blocked", |runs| {
            state_of(runs, 2, RunState::Queued) && runs[2].reason.starts_with("blocked")
        })
        .await;
    let blocked = runs[2].clone();
    assert!(
        blocked.reason.contains(&failed.name) && blocked.reason.contains("FAILED"),
        "{}",
        blocked.reason
    );
    assert_eq!(
        flow.get_schedule_as(&schedule.name, &flow.platform.token)
            .await
            .blocked_reason,
        blocked.reason
    );
    clock.set_ms(ms("2027-01-04T10:40:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:40 fire waiting", |runs| {
            state_of(runs, 3, RunState::Queued) && runs[3].reason.contains("waiting for the previous run")
        })
        .await;
    assert!(runs[3].reason.contains(&blocked.name), "{}", runs[3].reason);

    // Retried to success, the failed run lets the chain go on, in fire order.
    drop(kubelet);
    let kubelet = flow
        .kubelet()
        .script(&failing("10:50"), Script::run_for(RUNS).exit(1))
        .script(&failing("11:10"), Script::run_for(RUNS).exit(1))
        .script(MANAGED, done());
    flow.runs()
        .retry_run(authed(
            RetryRunRequest {
                name: failed.name.clone(),
                from_task: String::new(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("retrying the failed run");
    let runs = flow
        .scheduled_until(&pipeline.name, "the chain run through", |runs| {
            runs.len() == 4 && runs.iter().all(|run| run.state() == RunState::Succeeded)
        })
        .await;
    for pair in runs[1..].windows(2) {
        let (earlier, later) = (&pair[0], &pair[1]);
        assert!(
            later
                .start_time
                .map(|time| time.seconds * 1000 + i64::from(time.nanos / 1_000_000))
                >= earlier
                    .end_time
                    .map(|time| time.seconds * 1000 + i64::from(time.nanos / 1_000_000)),
            "{} started before {} ended",
            later.name,
            earlier.name
        );
    }

    // Skipped, a failed run lets the chain go on too.
    clock.set_ms(ms("2027-01-04T10:50:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 10:50 fire failed", |runs| {
            state_of(runs, 4, RunState::Failed)
        })
        .await;
    let failed = runs[4].clone();
    clock.set_ms(ms("2027-01-04T11:00:05Z"));
    flow.scheduled_until(&pipeline.name, "the 11:00 fire blocked", |runs| {
        state_of(runs, 5, RunState::Queued) && runs[5].reason.starts_with("blocked")
    })
    .await;
    let skipped = flow
        .runs()
        .skip_run(authed(
            SkipRunRequest {
                name: failed.name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect("skipping the failed run")
        .into_inner();
    assert_eq!(skipped.state(), RunState::Skipped);
    assert!(
        skipped.reason.starts_with("skipped by users/lena"),
        "{}",
        skipped.reason
    );
    flow.scheduled_until(&pipeline.name, "the 11:00 fire succeeded", |runs| {
        state_of(runs, 5, RunState::Succeeded)
    })
    .await;
    assert_eq!(
        flow.get_schedule_as(&schedule.name, &flow.platform.token)
            .await
            .blocked_reason,
        ""
    );
    // Only a run that failed or was canceled can be skipped.
    let refused = flow
        .runs()
        .skip_run(authed(
            SkipRunRequest {
                name: runs[0].name.clone(),
            },
            &flow.platform.token,
        ))
        .await
        .expect_err("a succeeded run is not skipped");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // A schedule made again under a deleted one's id starts its own chain: the old schedule's failed run does not
    // block it.
    clock.set_ms(ms("2027-01-04T11:10:05Z"));
    flow.scheduled_until(&pipeline.name, "the 11:10 fire failed", |runs| {
        state_of(runs, 6, RunState::Failed)
    })
    .await;
    let etag = flow.get_schedule_as(&schedule.name, &flow.platform.token).await.etag;
    ScheduleServiceClient::new(flow.channel.clone())
        .delete_schedule(authed(
            DeleteScheduleRequest {
                name: schedule.name.clone(),
                etag,
            },
            &flow.platform.token,
        ))
        .await
        .expect("deleting the schedule");
    flow.schedule(&pipeline.name, "chain", chain()).await;
    clock.set_ms(ms("2027-01-04T11:20:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the new schedule's 11:20 fire succeeded", |runs| {
            state_of(runs, 7, RunState::Succeeded)
        })
        .await;
    assert_eq!(
        runs[6].state(),
        RunState::Failed,
        "the old schedule's run keeps its end"
    );
    drop(kubelet);
}

async fn missed_fires_are_caught_up_as_each_schedule_says_and_a_deleted_project_stops_them(shape: Shape) {
    let clock = Clock::manual(ms("2027-01-04T10:30:00Z"));
    let flow = Flow::at(shape, clock.clone()).await;
    let _kubelet = flow.kubelet().script(MANAGED, Script::run_for(RUNS).exit(0));
    let pipeline = flow.pipeline("hourly", vec![task("a", &[])], 0).await;
    flow.warm_up(&pipeline.name).await;
    let hourly = |catch_up: CatchUp, max_catch_up: i32, enabled: bool| Schedule {
        cron: "0 * * * *".into(),
        enabled,
        catch_up: catch_up as i32,
        max_catch_up,
        ..Schedule::default()
    };
    for (id, schedule) in [
        ("all", hourly(CatchUp::All, 0, true)),
        ("all2", hourly(CatchUp::All, 2, true)),
        ("latest", hourly(CatchUp::Latest, 0, true)),
        (
            "bounded",
            Schedule {
                start_time: ts("2027-01-04T11:30:00Z"),
                end_time: ts("2027-01-04T13:00:00Z"),
                ..hourly(CatchUp::All, 0, true)
            },
        ),
        ("off", hourly(CatchUp::All, 0, false)),
        ("skip", hourly(CatchUp::Skip, 0, true)),
    ] {
        flow.schedule(&pipeline.name, id, schedule).await;
    }
    let skip = format!("{}/schedules/skip", pipeline.name);
    assert_eq!(
        flow.get_schedule_as(&skip, &flow.platform.token).await.next_fire_time,
        ts("2027-01-04T11:00:00Z")
    );
    // Three hours pass with no firer looking: 11:00, 12:00 and 13:00 are missed.
    clock.set_ms(ms("2027-01-04T13:30:00Z"));
    flow.scheduled_until(&pipeline.name, "the catch-up of every schedule", |runs| {
        of(runs, "all").len() == 3 && of(runs, "all2").len() == 2 && of(runs, "latest").len() == 1
    })
    .await;
    cube_testkit::eventually("the skipping schedule passed over", TIMEOUT, || async {
        let shown = flow.get_schedule_as(&skip, &flow.platform.token).await;
        (shown.next_fire_time == ts("2027-01-04T14:00:00Z")).then_some(())
    })
    .await;
    let runs = flow.scheduled_as(&pipeline.name, &flow.platform.token).await;
    assert_eq!(fires(&of(&runs, "all")), ["11:00", "12:00", "13:00"]);
    assert_eq!(fires(&of(&runs, "all2")), ["12:00", "13:00"]);
    assert_eq!(fires(&of(&runs, "latest")), ["13:00"]);
    assert_eq!(fires(&of(&runs, "skip")), Vec::<String>::new());
    assert_eq!(fires(&of(&runs, "off")), Vec::<String>::new());
    assert_eq!(
        fires(&of(&runs, "bounded")),
        ["12:00", "13:00"],
        "within its start and end only"
    );
    assert_eq!(runs.len(), 8);

    // Enabled again, a disabled schedule catches nothing up: its first fire is the next one.
    let enabled = flow
        .update_schedule(
            Schedule {
                name: format!("{}/schedules/off", pipeline.name),
                enabled: true,
                ..Schedule::default()
            },
            &["enabled"],
        )
        .await;
    assert_eq!(enabled.next_fire_time, ts("2027-01-04T14:00:00Z"));
    clock.set_ms(ms("2027-01-04T14:00:05Z"));
    let runs = flow
        .scheduled_until(&pipeline.name, "the 14:00 fires, ended", |runs| {
            runs.len() == 13 && runs.iter().all(|run| run.end_time.is_some())
        })
        .await;
    assert_eq!(fires(&of(&runs, "off")), ["14:00"]);
    assert_eq!(fires(&of(&runs, "skip")), ["14:00"]);
    assert_eq!(
        fires(&of(&runs, "bounded")),
        ["12:00", "13:00"],
        "nothing after its end"
    );

    // A deleted project stops its schedules: no fire is made, and each schedule says why.
    ProjectServiceClient::new(connect(&flow.platform.projects).await)
        .delete_project(authed(
            DeleteProjectRequest {
                name: "projects/vision".into(),
                etag: String::new(),
            },
            &flow.platform.admin,
        ))
        .await
        .expect("deleting the project");
    clock.set_ms(ms("2027-01-04T15:00:05Z"));
    let stopped = cube_testkit::eventually("the schedules stopped", TIMEOUT, || async {
        let shown = flow.get_schedule_as(&skip, &flow.platform.admin).await;
        (!shown.blocked_reason.is_empty()).then_some(shown)
    })
    .await;
    assert!(
        stopped.blocked_reason.contains("2027-01-04T15:00:00") && stopped.blocked_reason.contains("not made"),
        "{}",
        stopped.blocked_reason
    );
    let runs = flow.scheduled_as(&pipeline.name, &flow.platform.admin).await;
    assert_eq!(
        runs.len(),
        13,
        "no fire after the deletion: {:?}",
        fires(&runs.iter().collect::<Vec<_>>())
    );
}

async fn backfill_makes_each_fire_of_a_week_once_within_max_concurrent_runs(shape: Shape) {
    let clock = Clock::manual(ms("2027-01-12T00:00:30Z"));
    let flow = Flow::at(shape, clock.clone()).await;
    let _kubelet = flow
        .kubelet()
        .script(MANAGED, Script::run_for(Duration::from_millis(50)).exit(0));
    let pipeline = flow.pipeline("week", vec![task("a", &[])], 0).await;
    flow.warm_up(&pipeline.name).await;
    // Disabled: only the backfill makes fires.
    let schedule = flow
        .schedule(
            &pipeline.name,
            "hours",
            Schedule {
                cron: "0 * * * *".into(),
                max_concurrent_runs: 3,
                ..Schedule::default()
            },
        )
        .await;
    let mut schedules = ScheduleServiceClient::new(flow.channel.clone());
    let backfill = |start: Option<&str>, end: Option<&str>| {
        authed(
            BackfillScheduleRequest {
                name: schedule.name.clone(),
                start_time: start.and_then(ts),
                end_time: end.and_then(ts),
            },
            &flow.platform.token,
        )
    };
    for (start, end, field) in [
        (Some("2027-01-04T00:00:00Z"), None, "end_time"),
        (None, Some("2027-01-10T23:00:00Z"), "start_time"),
        (Some("2027-01-04T00:00:00Z"), Some("2027-01-13T00:00:00Z"), "end_time"),
        (Some("2027-01-10T00:00:00Z"), Some("2027-01-04T00:00:00Z"), "end_time"),
        (Some("2025-01-01T00:00:00Z"), Some("2027-01-10T00:00:00Z"), "start_time"),
    ] {
        let status = schedules
            .backfill_schedule(backfill(start, end))
            .await
            .expect_err("refused");
        assert_eq!(bad_fields(&status), [field], "{start:?}..{end:?}: {status:?}");
    }
    let shown = flow.get_schedule_as(&schedule.name, &flow.platform.token).await;
    assert_eq!(shown.backfill, None, "nothing was stored");

    let started = schedules
        .backfill_schedule(backfill(Some("2027-01-04T00:00:00Z"), Some("2027-01-10T23:00:00Z")))
        .await
        .expect("backfilling a week")
        .into_inner();
    assert_eq!(started.backfill.as_ref().map(|backfill| backfill.fires), Some(168));
    let done = cube_testkit::eventually("the week's runs ended", Duration::from_secs(400), || async {
        let shown = flow.get_schedule_as(&schedule.name, &flow.platform.token).await;
        shown
            .backfill
            .filter(|backfill| backfill.runs == 168 && backfill.ended == 168)
    })
    .await;
    assert_eq!(done.failed, 0);
    let runs = flow.scheduled_as(&pipeline.name, &flow.platform.token).await;
    assert_eq!(runs.len(), 168, "one run per fire");
    assert!(runs.iter().all(|run| run.state() == RunState::Succeeded));
    let hours: Vec<i64> = runs
        .iter()
        .filter_map(|run| run.fire_time.map(|time| time.seconds))
        .collect();
    let expected: Vec<i64> = (0..168)
        .map(|hour| ms("2027-01-04T00:00:00Z") / 1000 + hour * 3600)
        .collect();
    assert_eq!(hours, expected);
    // At no time were more than three runs going.
    let millis = |time: Option<prost_types::Timestamp>| {
        time.map_or(0, |time| time.seconds * 1000 + i64::from(time.nanos / 1_000_000))
    };
    let mut edges: Vec<(i64, i32)> = runs
        .iter()
        .flat_map(|run| [(millis(run.start_time), 1), (millis(run.end_time), -1)])
        .collect();
    // An end and a start at the same millisecond: the end first.
    edges.sort_unstable();
    let (mut going, mut most) = (0, 0);
    for (_, change) in edges {
        going += change;
        most = most.max(going);
    }
    assert!(
        (2..=3).contains(&most),
        "at most 3 runs at once, and more than one: {most}"
    );

    // Again, and over a window one hour wider: only the missing fire is made.
    schedules
        .backfill_schedule(backfill(Some("2027-01-04T00:00:00Z"), Some("2027-01-10T23:00:00Z")))
        .await
        .expect("backfilling the week again");
    schedules
        .backfill_schedule(backfill(Some("2027-01-03T23:00:00Z"), Some("2027-01-10T23:00:00Z")))
        .await
        .expect("backfilling a wider window");
    let runs = flow
        .scheduled_until(&pipeline.name, "the one missing fire", |runs| runs.len() >= 169)
        .await;
    assert_eq!(runs.len(), 169);
    assert_eq!(runs[0].fire_time, ts("2027-01-03T23:00:00Z"));
}

/// How long each run's pod of the tuning test runs: long enough for Prometheus to see its usage rise for several
/// scrapes (a short series makes `rate()` extrapolate).
const TUNED_RUN: Duration = Duration::from_secs(5);

/// What the exporter says pod `pod` of run number `index` uses: CPU cores and memory bytes.
fn planned_usage(index: usize) -> (f64, f64) {
    let cpu = if index == 9 { 1.5 } else { 1.0 };
    (cpu, f64::from(1_u32 << 30) + index as f64 * f64::from(100_u32 << 20))
}

async fn resources_are_tuned_from_the_usage_a_real_prometheus_saw(shape: Shape) {
    use cube_proto::cube::workflow::v1::TaskResourcesRecommended;
    use cube_testkit::prometheus::{Exporter, Prometheus};
    use futures::StreamExt as _;
    use prost::Message as _;
    use std::sync::{Arc, Mutex};

    let exporter = Arc::new(Exporter::start().await);
    let prometheus = Prometheus::start(&[exporter.address()], Duration::from_millis(500)).await;
    // Prometheus finds its targets some seconds after it starts: no run may end before its first scrape.
    prometheus.wait_for_sample("up{job=\"exporter\"} == 1", TIMEOUT).await;
    let flow = Flow::with(
        shape,
        Quota::default(),
        Setup {
            prometheus_url: Some(prometheus.url()),
            ..Setup::default()
        },
    )
    .await;
    let _kubelet = flow.kubelet().script(MANAGED, Script::run_for(TUNED_RUN).exit(0));
    let mut events = flow
        .platform
        .bus
        .subscribe("workflow.task.resources", "tuning-test", "tuning-test")
        .await
        .expect("subscribing to recommendations");
    JobTemplateServiceClient::new(flow.channel.clone())
        .create_job_template(authed(
            CreateJobTemplateRequest {
                job_template_id: "untuned".into(),
                job_template: Some(JobTemplate {
                    env: HashMap::from([("NO_RESOURCE_CHECK".to_owned(), "1".to_owned())]),
                    ..worker_template()
                }),
            },
            &flow.platform.admin,
        ))
        .await
        .expect("creating the untuned template");
    let mut ranged = task("b", &[]);
    ranged.cpu = "1~4".into();
    let mut untuned = task("c", &[]);
    untuned.template = "jobTemplates/untuned".into();
    let created = flow
        .pipelines()
        .create_pipeline(authed(
            CreatePipelineRequest {
                parent: "projects/vision".into(),
                pipeline_id: "tuned".into(),
                pipeline: Some(Pipeline {
                    tasks: vec![task("a", &[]), ranged, untuned],
                    auto_tune: true,
                    ..Pipeline::default()
                }),
            },
            &flow.platform.token,
        ))
        .await
        .expect("creating the pipeline")
        .into_inner();
    // The exporter plays cAdvisor for the pods of each run: CPU seconds rising at the run's planned rate, and its
    // planned working set.
    let planned: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let feeder = {
        let (pods, planned, exporter) = (flow.namespace.pods(), planned.clone(), exporter.clone());
        tokio::spawn(async move {
            let mut used: HashMap<String, f64> = HashMap::new();
            let tick = Duration::from_millis(50);
            let mut before = tokio::time::Instant::now();
            loop {
                // CPU seconds grow by the time that really passed (listing the pods takes some).
                let now = tokio::time::Instant::now();
                let passed = (now - before).as_secs_f64();
                before = now;
                let listed = pods
                    .list(&ListParams::default().labels("cube.io/pipeline=tuned"))
                    .await
                    .map(|list| list.items)
                    .unwrap_or_default();
                for pod in listed {
                    let running = pod.status.as_ref().and_then(|status| status.phase.as_deref()) == Some("Running");
                    let (Some(name), Some(run)) = (
                        pod.metadata.name.clone(),
                        pod.metadata
                            .labels
                            .as_ref()
                            .and_then(|labels| labels.get("cube.io/run").cloned()),
                    ) else {
                        continue;
                    };
                    let Some(index) = planned.lock().expect("the plan").get(&run).copied() else {
                        continue;
                    };
                    if !running {
                        continue;
                    }
                    let (cpu, memory) = planned_usage(index);
                    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
                    let labels = [
                        ("namespace", namespace.as_str()),
                        ("pod", name.as_str()),
                        ("container", "main"),
                    ];
                    let total = used.entry(name.clone()).or_default();
                    *total += cpu * passed;
                    exporter.set("container_cpu_usage_seconds_total", &labels, *total);
                    exporter.set("container_memory_working_set_bytes", &labels, memory);
                }
                tokio::time::sleep(tick).await;
            }
        })
    };
    let recommendation = |task: &str| {
        let mut pipelines = flow.pipelines();
        let request = authed(
            GetTaskRecommendationRequest {
                pipeline: created.name.clone(),
                task: task.into(),
            },
            &flow.platform.token,
        );
        async move {
            pipelines
                .get_task_recommendation(request)
                .await
                .expect("a recommendation")
                .into_inner()
        }
    };
    let run_number = |index: usize| {
        let planned = planned.clone();
        let flow = &flow;
        let pipeline = created.name.clone();
        async move {
            let run = flow.start_run(&pipeline).await;
            planned
                .lock()
                .expect("the plan")
                .insert(id_of(&run.name).to_owned(), index);
            let end = last(&flow.watch_to_end(&run.name).await).clone();
            assert_eq!(end.state(), RunState::Succeeded, "{end:#?}");
        }
    };
    for index in 0..9 {
        run_number(index).await;
    }
    let nine = cube_testkit::eventually("nine runs sampled", TIMEOUT, || async {
        let got = recommendation("a").await;
        (got.samples == 9).then_some(got)
    })
    .await;
    assert_eq!((nine.cpu.as_str(), nine.memory.as_str()), ("", ""), "{nine:?}");
    assert!(nine.reason.starts_with("9 of the 10"), "{}", nine.reason);

    run_number(9).await;
    // The tenth sample: ceil(1.5 cores × 1.4) + 2 = 5 cores, ceil(1.88 GiB × 1.4) + 2 = 5 GiB, applied.
    let tuned = cube_testkit::eventually("the pipeline tuned", TIMEOUT, || async {
        let pipeline = flow
            .pipelines()
            .get_pipeline(authed(
                GetPipelineRequest {
                    name: created.name.clone(),
                },
                &flow.platform.token,
            ))
            .await
            .expect("reading the pipeline")
            .into_inner();
        (pipeline.tasks[0].cpu != "0.1" && pipeline.tasks[1].memory != "64M").then_some(pipeline)
    })
    .await;
    feeder.abort();
    let resources: Vec<(&str, &str)> = tuned
        .tasks
        .iter()
        .map(|task| (task.cpu.as_str(), task.memory.as_str()))
        .collect();
    assert_eq!(resources, [("5", "5G"), ("1~5", "5G"), ("0.1", "64M")]);
    let a = recommendation("a").await;
    assert_eq!((a.cpu.as_str(), a.memory.as_str(), a.samples), ("5", "5G", 10), "{a:?}");
    assert!((1.5..1.75).contains(&a.max_cpu_used), "{a:?}");
    assert_eq!(a.max_memory_used_bytes, (1 << 30) + 9 * (100 << 20));
    let b = recommendation("b").await;
    assert_eq!(b.cpu, "1~5", "a range stays a range: {b:?}");
    let c = recommendation("c").await;
    assert_eq!(c.cpu, "", "{c:?}");
    assert!(c.reason.contains("NO_RESOURCE_CHECK"), "{}", c.reason);
    // Each change is announced for the pipeline's creator.
    let mut announced = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while announced.len() < 2 {
            let delivery = events.next().await.expect("the bus").expect("a delivery");
            let event = TaskResourcesRecommended::decode(delivery.payload.clone()).expect("an event");
            let _ = delivery.ack().await;
            announced.push(event);
        }
    })
    .await
    .expect("two announcements");
    let mut told: Vec<(String, bool, String)> = announced
        .iter()
        .map(|event| {
            let task = event
                .recommendation
                .as_ref()
                .map(|rec| rec.task.clone())
                .unwrap_or_default();
            (task, event.applied, event.owner.clone())
        })
        .collect();
    told.sort();
    assert_eq!(
        told,
        [
            ("a".to_owned(), true, "users/lena".to_owned()),
            ("b".to_owned(), true, "users/lena".to_owned())
        ]
    );
}

async fn daylight_saving_changes_fire_once_in_berlin_and_new_york(shape: Shape) {
    let clock = Clock::manual(ms("2027-03-13T12:00:00Z"));
    let flow = Flow::at(shape, clock.clone()).await;
    let _kubelet = flow.kubelet().script(MANAGED, Script::run_for(RUNS).exit(0));
    let pipeline = flow.pipeline("nights", vec![task("a", &[])], 0).await;
    flow.warm_up(&pipeline.name).await;
    // Each schedule lives around one change; catching up everything, a missed or doubled fire would show.
    for (id, zone, cron, from, to) in [
        (
            "berlin-fall",
            "Europe/Berlin",
            "30 2 * * *",
            "2027-10-30T12:00:00Z",
            "2027-10-31T12:00:00Z",
        ),
        (
            "berlin-spring",
            "Europe/Berlin",
            "30 2 * * *",
            "2027-03-27T12:00:00Z",
            "2027-03-28T12:00:00Z",
        ),
        (
            "ny-fall",
            "America/New_York",
            "30 1 * * *",
            "2027-11-06T12:00:00Z",
            "2027-11-07T12:00:00Z",
        ),
        (
            "ny-spring",
            "America/New_York",
            "30 2 * * *",
            "2027-03-13T12:00:00Z",
            "2027-03-14T12:00:00Z",
        ),
        (
            "sentinel",
            "UTC",
            "0 0 * * *",
            "2027-11-07T12:00:00Z",
            "2027-11-08T12:00:00Z",
        ),
    ] {
        flow.schedule(
            &pipeline.name,
            id,
            Schedule {
                cron: cron.into(),
                time_zone: zone.into(),
                enabled: true,
                start_time: ts(from),
                end_time: ts(to),
                catch_up: CatchUp::All as i32,
                ..Schedule::default()
            },
        )
        .await;
    }
    let fired = |runs: &[Run], schedule: &str| -> Vec<Option<prost_types::Timestamp>> {
        of(runs, schedule).iter().map(|run| run.fire_time).collect()
    };
    for (now, schedule, fire) in [
        // New York springs forward at 02:00 EST on 2027-03-14: 02:30 is skipped and fires at 03:30 EDT (07:30Z).
        ("2027-03-14T07:30:10Z", "ny-spring", "2027-03-14T07:30:00Z"),
        // Berlin springs forward at 02:00 CET on 2027-03-28: 02:30 fires at 03:30 CEST (01:30Z).
        ("2027-03-28T01:30:10Z", "berlin-spring", "2027-03-28T01:30:00Z"),
        // Berlin falls back at 03:00 CEST on 2027-10-31: 02:30 happens at 00:30Z and again at 01:30Z.
        ("2027-10-31T00:30:10Z", "berlin-fall", "2027-10-31T00:30:00Z"),
        ("2027-10-31T01:30:10Z", "berlin-fall", "2027-10-31T00:30:00Z"),
        // New York falls back at 02:00 EDT on 2027-11-07: 01:30 happens at 05:30Z and again at 06:30Z.
        ("2027-11-07T05:30:10Z", "ny-fall", "2027-11-07T05:30:00Z"),
        ("2027-11-07T06:30:10Z", "ny-fall", "2027-11-07T05:30:00Z"),
        // Looked at after every schedule above (the firer takes them in name order, each tick).
        ("2027-11-08T00:00:10Z", "sentinel", "2027-11-08T00:00:00Z"),
    ] {
        clock.set_ms(ms(now));
        flow.scheduled_until(&pipeline.name, &format!("{schedule} fired at {fire}"), |runs| {
            fired(runs, schedule).contains(&ts(fire))
        })
        .await;
    }
    let runs = flow.scheduled_as(&pipeline.name, &flow.platform.token).await;
    for (schedule, fire) in [
        ("ny-spring", "2027-03-14T07:30:00Z"),
        ("berlin-spring", "2027-03-28T01:30:00Z"),
        ("berlin-fall", "2027-10-31T00:30:00Z"),
        ("ny-fall", "2027-11-07T05:30:00Z"),
    ] {
        assert_eq!(fired(&runs, schedule), [ts(fire)], "{schedule} fired once");
    }
    assert_eq!(runs.len(), 5);
}
