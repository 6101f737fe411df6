//! A run survives its workflow process being killed: `cube serve workflow` is killed with SIGKILL three times
//! during a 20-task run and started again each time; the run completes and every attempt of every task made
//! exactly one workload. On the real kube-apiserver and scheduler with the fake kubelet (PostgreSQL, Redis
//! Streams), where the check is the API server's own pod list; and on the local runtime (SQLite), where each
//! task appends a line to a file when it starts, so a process started twice would show.
//!
//! Two replicas of `cube serve workflow` on one PostgreSQL fire a `* * * * *` schedule for ten minutes: exactly one
//! run per minute, and when the holder of the schedules lease is killed, the other replica makes the next fire.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cube_integration_tests::platform::{
    Platform, TestNamespace, authed, create_project, kube_client, platform, platform_with_local,
};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::workflow::{create_worker_template, training_node, training_project};
use cube_proto::cube::projects::v1::{Quota, Settings};
use cube_proto::cube::workflow::v1::pipeline_service_client::PipelineServiceClient;
use cube_proto::cube::workflow::v1::run_service_client::RunServiceClient;
use cube_proto::cube::workflow::v1::{
    CreatePipelineRequest, CreateRunRequest, GetRunRequest, Pipeline, Run, RunState, Task,
};
use cube_testkit::kubernetes::{FakeNode, Kubelet, Script};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use serde_json::json;
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How many times the workflow process is killed during the run.
const KILLS: usize = 3;
/// The longest a run may take, kills included.
const TIMEOUT: Duration = Duration::from_secs(180);

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `cube serve workflow` beside `platform`, started again with the same flags after each kill.
struct WorkflowProcess {
    args: Vec<String>,
    address: String,
    child: Option<Child>,
}

impl WorkflowProcess {
    async fn start(platform: &mut Platform, clusters: &str, dir: &Path) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let clusters_file = dir.join("clusters.json");
        std::fs::write(&clusters_file, clusters).expect("the clusters file");
        let mut args: Vec<String> = [
            "serve",
            "workflow",
            "--listen",
            &address,
            "--admin-listen",
            "127.0.0.1:0",
            "--reconcile-interval",
            "300ms",
            "--lease-duration",
            "2s",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        args.extend([
            "--database-url".to_owned(),
            platform.database("workflow").await,
            "--auth-url".to_owned(),
            platform.auth.url(),
            "--projects-url".to_owned(),
            platform.projects.url(),
            "--scheduler-url".to_owned(),
            platform.scheduler.url(),
            "--clusters-file".to_owned(),
            clusters_file.display().to_string(),
            "--local-workloads-dir".to_owned(),
            dir.join("workloads").display().to_string(),
        ]);
        let token_file = dir.join("workflow.token");
        std::fs::write(
            &token_file,
            cube_integration_tests::workflow::service_token(platform).await,
        )
        .expect("the token file");
        args.extend(["--service-token-file".to_owned(), token_file.display().to_string()]);
        args.extend(platform.bus_flags());
        let mut process = Self {
            args,
            address,
            child: None,
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cube"))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning cube serve workflow");
        self.child = Some(child);
        self.channel().await;
    }

    /// A channel to the process once it serves.
    async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.address);
        cube_testkit::eventually("the workflow service serving", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
                let reply = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: "cube.workflow.v1".to_owned(),
                    })
                    .await
                    .ok()?;
                (reply.into_inner().status() == ServingStatus::Serving).then_some(channel)
            }
        })
        .await
    }

    /// Another replica: the same flags (database, bus, peers), its own address.
    async fn replica(&self) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = self.args.clone();
        if let Some(listen) = args.iter().position(|arg| arg == "--listen") {
            args[listen + 1].clone_from(&address);
        }
        let mut process = Self {
            args,
            address,
            child: None,
        };
        process.spawn().await;
        process
    }

    /// The database URL it was started with.
    fn database_url(&self) -> &str {
        self.args
            .iter()
            .position(|arg| arg == "--database-url")
            .and_then(|index| self.args.get(index + 1))
            .map_or("", String::as_str)
    }

    /// Its process id while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Kills the process with SIGKILL and waits for it to die.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            let status = child.wait().await.expect("waiting for the killed process");
            assert!(!status.success(), "killed, not stopped: {status:?}");
        }
    }

    /// Kills the process with SIGKILL, waits for it to die, and starts it again.
    async fn crash_and_restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// 20 tasks in four layers of five, each layer after the whole layer before it.
fn layered(command: &str) -> Vec<Task> {
    (0..4)
        .flat_map(|layer| {
            (0..5).map(move |index| Task {
                name: format!("t{layer}-{index}"),
                template: "jobTemplates/worker".into(),
                command: command.to_owned(),
                cpu: "0.1".into(),
                memory: "64M".into(),
                upstream: if layer == 0 {
                    Vec::new()
                } else {
                    (0..5).map(|before| format!("t{}-{before}", layer - 1)).collect()
                },
                ..Task::default()
            })
        })
        .collect()
}

/// Creates the template and pipeline `id` of `tasks` in `vision`, and its first run, tried until the scheduler's
/// inventory has the node to place it on.
async fn first_run(channel: &Channel, platform: &Platform, id: &str, tasks: Vec<Task>) -> (Pipeline, Run) {
    create_worker_template(channel.clone(), &platform.token, "")
        .await
        .expect("creating the template");
    let pipeline = PipelineServiceClient::new(channel.clone())
        .create_pipeline(authed(
            CreatePipelineRequest {
                parent: "projects/vision".into(),
                pipeline_id: id.into(),
                pipeline: Some(Pipeline {
                    tasks,
                    ..Pipeline::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("creating the pipeline")
        .into_inner();
    let run = cube_testkit::eventually("a run placed", Duration::from_secs(30), || {
        let mut runs = RunServiceClient::new(channel.clone());
        let request = authed(
            CreateRunRequest {
                parent: pipeline.name.clone(),
                request_id: "first".into(),
            },
            &platform.token,
        );
        async move { runs.create_run(request).await.ok().map(tonic::Response::into_inner) }
    })
    .await;
    (pipeline, run)
}

/// Creates the template and a pipeline of `tasks` in `vision`, runs it, kills the workflow process
/// [`KILLS`] times while it runs, and returns the run once it has finished.
async fn run_through_kills(platform: &Platform, process: &mut WorkflowProcess, tasks: Vec<Task>) -> Run {
    let channel = process.channel().await;
    let (_, run) = first_run(&channel, platform, "layers", tasks).await;
    let get = |channel: Channel| {
        let request = authed(GetRunRequest { name: run.name.clone() }, &platform.token);
        async move {
            RunServiceClient::new(channel)
                .get_run(request)
                .await
                .expect("reading the run")
                .into_inner()
        }
    };
    for kill in 0..KILLS {
        // Kill while tasks are between their start and their end.
        cube_testkit::eventually("a task running", TIMEOUT, || {
            let channel = channel.clone();
            let get = &get;
            async move {
                let run = get(channel).await;
                run.tasks
                    .iter()
                    .any(|task| task.state() == RunState::Running)
                    .then_some(())
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200 * (kill as u64 + 1))).await;
        process.crash_and_restart().await;
    }
    let channel = process.channel().await;
    cube_testkit::eventually("the run finished", TIMEOUT, || {
        let channel = channel.clone();
        let get = &get;
        async move {
            let run = get(channel).await;
            matches!(run.state(), RunState::Succeeded | RunState::Failed | RunState::Canceled).then_some(run)
        }
    })
    .await
}

/// The platform (PostgreSQL, Redis Streams) with project `vision` training on a node of the test cluster, whose
/// fake kubelet runs each of Cube's pods for a while and ends it successfully.
struct OnKubernetes {
    kubeconfig: String,
    platform: Platform,
    namespace: TestNamespace,
    _node: FakeNode,
    _kubelet: Kubelet,
}

impl OnKubernetes {
    /// Starts it, naming the node group and namespace after `prefix`; each pod runs for `run_for`.
    async fn start(prefix: &str, run_for: Duration) -> Self {
        let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
        let client = kube_client(&kubeconfig).await;
        let group = cube_testkit::kubernetes::unique_name(prefix);
        let (node, namespace, platform) = tokio::join!(
            training_node(&client, &group, &[]),
            TestNamespace::unique(&client, prefix),
            platform(Shape::PostgresRedis, &kubeconfig),
        );
        let kubelet = Kubelet::start(&client, [&node])
            .script("app.kubernetes.io/managed-by=cube", Script::run_for(run_for).exit(0));
        training_project(&platform, &group, &namespace.name, Quota::default()).await;
        Self {
            kubeconfig,
            platform,
            namespace,
            _node: node,
            _kubelet: kubelet,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_kubernetes_survives_three_kills_of_the_workflow_process() {
    let OnKubernetes {
        kubeconfig,
        mut platform,
        namespace,
        _node,
        _kubelet,
    } = OnKubernetes::start("crash", Duration::from_millis(700)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let clusters = json!({"clusters": [
        {"name": "kube", "default": true, "kubeconfig": kubeconfig},
        {"name": "local"},
    ]})
    .to_string();
    let mut process = WorkflowProcess::start(&mut platform, &clusters, dir.path()).await;
    let run = run_through_kills(&platform, &mut process, layered("")).await;
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    let id = run.name.rsplit('/').next().expect("an id");
    let pods: Vec<Pod> = namespace
        .pods()
        .list(&ListParams::default().labels(&format!("cube.io/run={id}")))
        .await
        .expect("listing pods")
        .items;
    let mut made: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &pods {
        *made.entry(pod.metadata.name.clone().unwrap_or_default()).or_default() += 1;
    }
    let attempts: Vec<String> = run
        .tasks
        .iter()
        .flat_map(|task| task.attempts.iter().map(|attempt| attempt.pod.clone()))
        .collect();
    assert_eq!(run.tasks.len(), 20);
    assert_eq!(attempts.len(), 20, "one attempt per task: {attempts:?}");
    assert_eq!(
        made.keys().cloned().collect::<Vec<_>>(),
        {
            let mut sorted = attempts.clone();
            sorted.sort();
            sorted
        },
        "the API server holds exactly one pod per attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_local_processes_survives_three_kills_of_the_workflow_process() {
    let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
    let mut platform = platform_with_local(Shape::Embedded, &kubeconfig).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("started");
    std::fs::create_dir(&out).expect("the output directory");
    create_project(
        &platform,
        "vision",
        Settings {
            cluster: "local".into(),
            pipeline_namespace: "pipeline".into(),
            ..Settings::default()
        },
        Quota::default(),
    )
    .await;
    let clusters = json!({"clusters": [{"name": "local", "default": true}]}).to_string();
    let mut process = WorkflowProcess::start(&mut platform, &clusters, dir.path()).await;
    // Each start of a task's process appends a line to its file.
    let command = format!(
        "echo \"$KFJ_TASK_NAME\" >> {}/\"$KFJ_TASK_NAME\"\nsleep 0.7",
        out.display()
    );
    let run = run_through_kills(&platform, &mut process, layered(&command)).await;
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    for task in &run.tasks {
        let started = std::fs::read_to_string(out.join(&task.name))
            .unwrap_or_default()
            .lines()
            .count();
        // A process that died with the workflow process is Lost and tried again: each attempt ran once.
        assert_eq!(
            started,
            task.attempts.len(),
            "task {} started {started} times for {} attempts: {:#?}",
            task.name,
            task.attempts.len(),
            task.attempts
        );
        let (last, earlier) = task.attempts.split_last().expect("an attempt");
        assert_eq!(last.state(), RunState::Succeeded);
        assert!(
            earlier.iter().all(|attempt| attempt.infrastructure),
            "{:#?}",
            task.attempts
        );
    }
}

/// How long the two replicas fire the schedule.
const MINUTES: i64 = 10;

/// The process id in the holder of the workflow's schedules lease (`workflow-{pid}-{random}`), if one holds it.
async fn schedules_holder(database_url: &str) -> Option<u32> {
    use sea_orm::{ConnectionTrait as _, Statement};
    let db = sea_orm::Database::connect(database_url)
        .await
        .expect("the workflow database");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT holder FROM leases WHERE name = 'workflow-schedules'",
        ))
        .await
        .expect("reading the lease")?;
    let holder: String = row.try_get_by_index(0).ok()?;
    holder.split('-').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_fire_a_minutely_schedule_once_a_minute_through_the_holders_kill() {
    use cube_proto::cube::workflow::v1::schedule_service_client::ScheduleServiceClient;
    use cube_proto::cube::workflow::v1::{CatchUp, CreateScheduleRequest, ListRunsRequest, Schedule};

    let OnKubernetes {
        kubeconfig,
        mut platform,
        _node,
        _kubelet,
        ..
    } = OnKubernetes::start("fire", Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let clusters = json!({"clusters": [{"name": "kube", "default": true, "kubeconfig": kubeconfig}]}).to_string();
    let mut first = WorkflowProcess::start(&mut platform, &clusters, dir.path()).await;
    let mut second = first.replica().await;
    let channel = first.channel().await;
    // A first run, so that the scheduler's inventory has the node before the first fire.
    let task = Task {
        name: "a".into(),
        template: "jobTemplates/worker".into(),
        cpu: "0.1".into(),
        memory: "64M".into(),
        ..Task::default()
    };
    let (pipeline, _) = first_run(&channel, &platform, "minutely", vec![task]).await;
    // Missed fires would not be made late: a fire missing from the runs was missed.
    ScheduleServiceClient::new(channel.clone())
        .create_schedule(authed(
            CreateScheduleRequest {
                parent: pipeline.name.clone(),
                schedule_id: "minutely".into(),
                schedule: Some(Schedule {
                    cron: "* * * * *".into(),
                    enabled: true,
                    catch_up: CatchUp::Skip as i32,
                    ..Schedule::default()
                }),
            },
            &platform.token,
        ))
        .await
        .expect("creating the schedule");
    let fires = |channel: Channel| {
        let request = authed(
            ListRunsRequest {
                parent: pipeline.name.clone(),
                page_size: 1000,
                filter: "trigger = SCHEDULED".into(),
                ..ListRunsRequest::default()
            },
            &platform.token,
        );
        async move {
            let mut fires: Vec<i64> = RunServiceClient::new(channel)
                .list_runs(request)
                .await
                .expect("listing the scheduled runs")
                .into_inner()
                .runs
                .iter()
                .filter_map(|run| run.fire_time.map(|time| time.seconds))
                .collect();
            fires.sort_unstable();
            fires
        }
    };
    let second_channel = second.channel().await;
    let minute = Duration::from_secs(70);
    let first_fire = cube_testkit::eventually("the first fire", minute, || {
        let fires = &fires;
        let channel = second_channel.clone();
        async move { fires(channel).await.first().copied() }
    })
    .await;
    let mut killed = None;
    for count in 2..=MINUTES {
        let fire = first_fire + (count - 1) * 60;
        if count == 4 {
            // Near the end of a minute, the holder of the schedules lease dies; the other replica makes the
            // next fire.
            let seconds_into_minute = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("the clock")
                .as_secs()
                % 60;
            tokio::time::sleep(Duration::from_secs(50_u64.saturating_sub(seconds_into_minute))).await;
            let holder = schedules_holder(first.database_url()).await.expect("a holder");
            let victim = if first.pid() == Some(holder) {
                &mut first
            } else {
                assert_eq!(second.pid(), Some(holder), "the holder is one of the replicas");
                &mut second
            };
            victim.kill().await;
            killed = Some(fire);
        }
        let alive = if first.pid().is_some() { &first } else { &second };
        let channel = alive.channel().await;
        cube_testkit::eventually("the next fire", minute, || {
            let fires = &fires;
            let channel = channel.clone();
            async move { fires(channel).await.contains(&fire).then_some(()) }
        })
        .await;
        if killed == Some(fire) {
            let holder = schedules_holder(first.database_url()).await;
            assert_eq!(holder, alive.pid(), "the surviving replica holds the lease");
        }
    }
    let alive = if first.pid().is_some() { &first } else { &second };
    let made = fires(alive.channel().await).await;
    let expected: Vec<i64> = (0..MINUTES).map(|index| first_fire + index * 60).collect();
    assert_eq!(made, expected, "exactly one run per minute, none missed or doubled");
    assert!(killed.is_some());
}
