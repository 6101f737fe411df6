//! Benchmarks the workflow engine (issue 15's targets):
//!
//! 1. a 1,000-task DAG on the test kube-apiserver and scheduler with the fake kubelet, in two shapes: wide (every
//!    task at once) and deep (a chain). For the wide DAG, pods created per second: the pods the API server holds
//!    over the time from `CreateRun` until it holds one per task, first with the fake kubelet idle (the engine's
//!    own rate; the run is then canceled), then with it playing every pod on the same API server and cores. For the deep chain, the engine's
//!    overhead per task: the run's wall time less the time the tasks themselves ran, per task (it includes the
//!    API server, the scheduler's binding, the fake kubelet's reports and the watcher's transitions), and that
//!    overhead taken apart from what the bench sees of each step: a pod's life beyond its run (the API server,
//!    the scheduler's binding and the fake kubelet's three status reports), the watcher (the pod seen ended →
//!    its transition on the bus) and the engine (the transition on the bus → the next task's pod seen created,
//!    which includes the pod's create in the API server);
//! 2. `ListRuns` on PostgreSQL with 1,000,000 runs of one pipeline: p50 and p99 of the first page and of a page
//!    500,000 runs deep, each call through the workflow service's gRPC API (membership check included).
//!
//! Run: `cargo run --release -p cube-integration-tests --bin workflow-bench -- [--tasks 1000] [--deep false]
//! [--runs 1000000] [--calls 200]` with the test environment up (`scripts/test-env.sh up`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cube_integration_tests::connect;
use cube_integration_tests::platform::{FakeNode, Platform, TestNamespace, authed, kube_client, platform};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::workflow::{
    RunningWorkflow, create_worker_template, start_workflow, training_node, training_project,
};
use cube_proto::cube::projects::v1::Quota;
use cube_proto::cube::watcher::v1::{WorkloadState, WorkloadTransition};
use cube_proto::cube::workflow::v1::pipeline_service_client::PipelineServiceClient;
use cube_proto::cube::workflow::v1::run_service_client::RunServiceClient;
use cube_proto::cube::workflow::v1::{
    CancelRunRequest, CreatePipelineRequest, CreateRunRequest, GetRunRequest, ListRunsRequest, Pipeline, Run, RunState,
    Task,
};
use cube_testkit::kubernetes::{Kubelet, Script};
use futures::StreamExt as _;
use prost::Message as _;
use sea_orm::ConnectionTrait as _;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Cube's workflow engine: pods per second, overhead per task, ListRuns at depth")]
struct Args {
    /// Tasks of each DAG (0 skips the DAG runs).
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Whether the deep chain runs too (it takes minutes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    deep: bool,
    /// How long each task's pod runs in the deep chain, ms.
    #[arg(long, default_value_t = 20)]
    task_ms: u64,
    /// Runs stored for the ListRuns measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    runs: usize,
    /// ListRuns calls measured per page.
    #[arg(long, default_value_t = 200)]
    calls: usize,
}

/// The platform, the workflow service and a project `vision` whose tasks run on the bench's fake node.
struct Bench {
    platform: Platform,
    workflow: RunningWorkflow,
    channel: Channel,
    client: kube::Client,
    node: FakeNode,
    namespace: TestNamespace,
}

impl Bench {
    async fn start() -> anyhow::Result<Self> {
        let kubeconfig = cube_testkit::require("CUBE_TEST_KUBECONFIG");
        let client = kube_client(&kubeconfig).await;
        let group = cube_testkit::kubernetes::unique_name("bench");
        // Room for every pod of a 1,000-task run at once.
        let node = training_node(&client, &group, &[("pods", 5000), ("cpu", 1000)]).await;
        let namespace = TestNamespace::unique(&client, "bench").await;
        let mut platform = platform(Shape::PostgresRedis, &kubeconfig).await;
        training_project(&platform, &group, &namespace.name, Quota::default()).await;
        let workflow = start_workflow(&mut platform, &kubeconfig).await;
        let channel = connect(&workflow.server).await;
        create_worker_template(channel.clone(), &platform.token, "train")
            .await
            .context("creating the template")?;
        Ok(Self {
            platform,
            workflow,
            channel,
            node,
            namespace,
            client,
        })
    }

    async fn get(&self, name: &str) -> anyhow::Result<Run> {
        Ok(RunServiceClient::new(self.channel.clone())
            .get_run(authed(GetRunRequest { name: name.into() }, &self.platform.token))
            .await?
            .into_inner())
    }

    /// Creates pipeline `id` of `tasks` and runs it; the run's name and when it was created.
    async fn run(&self, id: &str, tasks: Vec<Task>) -> anyhow::Result<(String, Instant)> {
        let pipeline = PipelineServiceClient::new(self.channel.clone())
            .create_pipeline(authed(
                CreatePipelineRequest {
                    parent: "projects/vision".into(),
                    pipeline_id: id.into(),
                    pipeline: Some(Pipeline {
                        tasks,
                        ..Pipeline::default()
                    }),
                },
                &self.platform.token,
            ))
            .await
            .context("creating the pipeline")?
            .into_inner();
        let mut runs = RunServiceClient::new(self.channel.clone());
        // The scheduler's inventory sees the node within seconds of starting.
        for _ in 0..100 {
            let started = Instant::now();
            match runs
                .create_run(authed(
                    CreateRunRequest {
                        parent: pipeline.name.clone(),
                        request_id: String::new(),
                    },
                    &self.platform.token,
                ))
                .await
            {
                Ok(run) => return Ok((run.into_inner().name, started)),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => anyhow::bail!("creating a run: {status:?}"),
            }
        }
        anyhow::bail!("the node never became placeable")
    }

    /// Waits until `done` holds for run `name`, polling every 50 ms; the run as it was then.
    async fn wait(&self, name: &str, done: impl Fn(&Run) -> bool) -> anyhow::Result<Run> {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let run = self.get(name).await?;
            if done(&run) {
                return Ok(run);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "run {name} did not get there: {:?}",
                run.state()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn task(name: String, upstream: Vec<String>) -> Task {
    Task {
        name,
        template: "jobTemplates/worker".into(),
        cpu: "0.01".into(),
        memory: "16M".into(),
        upstream,
        ..Task::default()
    }
}

/// The p50 and p99 of `samples`, ms.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

/// Runs a wide DAG of `tasks` as pipeline `id`: when CreateRun answered and when the API server held a pod for
/// every task, both from the CreateRun call; and the run.
async fn wide_run(bench: &Bench, id: &str, tasks: usize) -> anyhow::Result<(String, Instant, Duration, Duration)> {
    let wide: Vec<Task> = (0..tasks).map(|i| task(format!("w{i}"), Vec::new())).collect();
    let (name, created) = bench.run(id, wide).await?;
    // CreateRun places every task before it answers.
    let answered = created.elapsed();
    // Every attempt is recorded before its pod is applied: count the pods the API server holds.
    let run = name.rsplit('/').next().unwrap_or_default().to_owned();
    let selector = kube::api::ListParams::default().labels(&format!("cube.io/run={run}"));
    loop {
        let pods = bench.namespace.pods().list_metadata(&selector).await?.items.len();
        if pods >= tasks {
            break;
        }
        anyhow::ensure!(
            created.elapsed() < Duration::from_secs(900),
            "only {pods} pods after 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((name, created, answered, created.elapsed()))
}

async fn dags(bench: &Bench, tasks: usize, task_ms: u64, deep: bool) -> anyhow::Result<()> {
    // Wide, with no kubelet playing the pods: what the engine makes when the API server does nothing else than
    // take them (and the scheduler bind them). The run is then canceled.
    let (name, _, answered, applied) = wide_run(bench, "idle", tasks).await?;
    println!(
        "  wide DAG of {tasks} tasks, the fake kubelet idle: CreateRun (placing every task) answered in {:.2} s; every \
         pod in the API server {:.2} s after CreateRun: {:.0} pods/s",
        answered.as_secs_f64(),
        applied.as_secs_f64(),
        tasks as f64 / applied.as_secs_f64(),
    );
    RunServiceClient::new(bench.channel.clone())
        .cancel_run(authed(CancelRunRequest { name: name.clone() }, &bench.platform.token))
        .await?;
    bench.wait(&name, |run| run.state() == RunState::Canceled).await?;

    let _kubelet = Kubelet::start(&bench.client, [&bench.node]).script(
        "app.kubernetes.io/managed-by=cube",
        Script::run_for(Duration::from_millis(task_ms)).exit(0),
    );
    // Wide, the fake kubelet reporting each pod's start and end to the same API server on the same cores.
    let (name, created, _, applied) = wide_run(bench, "wide", tasks).await?;
    let done = bench
        .wait(&name, |run| {
            run.state() != RunState::Running && run.state() != RunState::Pending
        })
        .await?;
    anyhow::ensure!(
        done.state() == RunState::Succeeded,
        "the wide run ended {:?}: {}",
        done.state(),
        done.reason
    );
    println!(
        "  wide DAG of {tasks} tasks, the fake kubelet playing them: every pod in the API server {:.2} s after \
         CreateRun: {:.0} pods/s; run done in {:.2} s",
        applied.as_secs_f64(),
        tasks as f64 / applied.as_secs_f64(),
        created.elapsed().as_secs_f64()
    );
    if !deep {
        return Ok(());
    }
    // Deep: a chain, one task at a time; what is not the tasks' own running time is overhead.
    let deep: Vec<Task> = (0..tasks)
        .map(|i| {
            task(
                format!("d{i}"),
                if i == 0 {
                    Vec::new()
                } else {
                    vec![format!("d{}", i - 1)]
                },
            )
        })
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let _following = follow(bench, seen.clone()).await?;
    let (name, created) = bench.run("deep", deep).await?;
    let done = bench
        .wait(&name, |run| {
            run.state() != RunState::Running && run.state() != RunState::Pending
        })
        .await?;
    let wall = created.elapsed();
    anyhow::ensure!(
        done.state() == RunState::Succeeded,
        "the deep run ended {:?}: {}",
        done.state(),
        done.reason
    );
    let running = Duration::from_millis(task_ms) * u32::try_from(tasks)?;
    let overhead = wall.saturating_sub(running);
    println!(
        "  deep chain of {tasks} tasks ({task_ms} ms each): {:.2} s in all; overhead {:.1} ms per task (API \
         server, scheduler binding, fake kubelet, watcher and engine)",
        wall.as_secs_f64(),
        overhead.as_secs_f64() * 1000.0 / tasks as f64
    );
    let id = name.rsplit('/').next().unwrap_or_default();
    let pod = |index: usize| format!("d{index}-{id}-1");
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("the timeline's lock"))?;
    let (mut life, mut watcher, mut engine) = (Vec::new(), Vec::new(), Vec::new());
    for index in 0..tasks.saturating_sub(1) {
        let (this, next) = (pod(index), pod(index + 1));
        let (Some(made), Some(ended), Some(published), Some(next_made)) = (
            seen.created.get(&this),
            seen.ended.get(&this),
            seen.published.get(&this),
            seen.created.get(&next),
        ) else {
            continue;
        };
        life.push(
            ended
                .saturating_duration_since(*made)
                .saturating_sub(Duration::from_millis(task_ms)),
        );
        watcher.push(published.saturating_duration_since(*ended));
        engine.push(next_made.saturating_duration_since(*published));
    }
    anyhow::ensure!(!engine.is_empty(), "the bench saw none of the chain's steps");
    let steps = engine.len();
    let mean = |samples: &[Duration]| samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / samples.len() as f64;
    let (life_mean, watcher_mean, engine_mean) = (mean(&life), mean(&watcher), mean(&engine));
    let ((life_p50, _), (watcher_p50, _), (engine_p50, engine_p99)) =
        (percentiles(life), percentiles(watcher), percentiles(engine));
    println!(
        "    per step, over {steps} steps (mean / p50 ms): pod beyond its run (API server, binding, fake kubelet) \
         {life_mean:.1} / {life_p50:.1}; watcher (pod ended → transition) {watcher_mean:.1} / {watcher_p50:.1}; \
         engine (transition → next pod created) {engine_mean:.1} / {engine_p50:.1} (p99 {engine_p99:.1})"
    );
    Ok(())
}

/// When the bench saw what happen to each pod, by name.
#[derive(Debug, Default)]
struct Seen {
    /// The pod first seen.
    created: HashMap<String, Instant>,
    /// The pod first seen `Succeeded`.
    ended: HashMap<String, Instant>,
    /// Its transition to `SUCCEEDED` first seen on the bus.
    published: HashMap<String, Instant>,
}

/// Follows the bench namespace's pods and the bus's workload transitions into `seen`, until dropped.
async fn follow(bench: &Bench, seen: Arc<Mutex<Seen>>) -> anyhow::Result<(AbortOnDrop, AbortOnDrop)> {
    let pods = bench.namespace.pods();
    let pod_seen = seen.clone();
    let watching = tokio::spawn(async move {
        let config = kube::runtime::watcher::Config::default().labels("app.kubernetes.io/managed-by=cube");
        let mut events = kube::runtime::watcher(pods, config).boxed();
        while let Some(event) = events.next().await {
            let Ok(kube::runtime::watcher::Event::Apply(pod)) = event else {
                continue;
            };
            let now = Instant::now();
            let (Some(name), Ok(mut seen)) = (pod.metadata.name.clone(), pod_seen.lock()) else {
                continue;
            };
            seen.created.entry(name.clone()).or_insert(now);
            if pod.status.and_then(|status| status.phase).as_deref() == Some("Succeeded") {
                seen.ended.entry(name).or_insert(now);
            }
        }
    });
    let mut deliveries = bench
        .platform
        .bus
        .subscribe(cube_runtime::transition::TOPIC, "workflow-bench", "bench")
        .await?;
    let reading = tokio::spawn(async move {
        while let Some(delivery) = deliveries.next().await {
            let Ok(delivery) = delivery else { continue };
            if let Ok(event) = WorkloadTransition::decode(delivery.payload.clone())
                && event.to_state() == WorkloadState::Succeeded
                && let Ok(mut seen) = seen.lock()
            {
                seen.published.entry(event.name).or_insert_with(Instant::now);
            }
            let _ = delivery.ack().await;
        }
    });
    Ok((AbortOnDrop(watching), AbortOnDrop(reading)))
}

/// A spawned task, aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn list_runs(bench: &Bench, runs: usize, calls: usize) -> anyhow::Result<()> {
    let db = cube_kit::db::connect::<cube_workflow::model::Migrator>(&bench.workflow.database, false).await?;
    let started = Instant::now();
    // One pipeline's runs, one a millisecond apart, written by the database itself.
    db.execute_unprepared(&format!(
        "INSERT INTO runs (id, project, pipeline, state, reason, trigger, creator, request_id, snapshot, admitted, \
         revision, created_ms, started_ms, ended_ms) \
         SELECT 'r' || lpad(g::text, 9, '0'), 'vision', 'history', 'SUCCEEDED', '', 'MANUAL', 'lena', NULL, '', \
         false, 1, 1700000000000 + g, 1700000000000 + g, 1700000000000 + g FROM generate_series(1, {runs}) g"
    ))
    .await?;
    db.execute_unprepared("ANALYZE runs").await?;
    println!("  {runs} runs stored in {:.1} s", started.elapsed().as_secs_f64());
    let mut client = RunServiceClient::new(bench.channel.clone());
    let parent = "projects/vision/pipelines/history".to_owned();
    // The page after the run 500,000 deep from the newest, as a client that paged there holds it.
    let depth = runs / 2;
    let position = (
        1_700_000_000_000_i64 + i64::try_from(runs - depth)?,
        format!("r{:09}", runs - depth),
    );
    let deep_token = cube_kit::page::encode_token(&position);
    for (what, token) in [
        ("first page", String::new()),
        (&*format!("page {depth} deep"), deep_token),
    ] {
        let mut samples = Vec::with_capacity(calls);
        let mut first = String::new();
        for _ in 0..calls {
            let started = Instant::now();
            let page = client
                .list_runs(authed(
                    ListRunsRequest {
                        parent: parent.clone(),
                        page_size: 50,
                        page_token: token.clone(),
                        filter: String::new(),
                    },
                    &bench.platform.token,
                ))
                .await?
                .into_inner();
            samples.push(started.elapsed());
            anyhow::ensure!(page.runs.len() == 50, "a full page");
            first.clone_from(&page.runs[0].name);
        }
        let (p50, p99) = percentiles(samples);
        println!("  ListRuns {what} (50 runs, from {first}): p50 {p50:.2} ms, p99 {p99:.2} ms over {calls} calls");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bench = Bench::start().await?;
    println!(
        "workflow-bench: the workflow service on PostgreSQL and Redis, the test kube-apiserver with the fake kubelet"
    );
    if args.tasks > 0 {
        dags(&bench, args.tasks, args.task_ms, args.deep).await?;
    }
    if args.runs > 0 {
        list_runs(&bench, args.runs, args.calls).await?;
    }
    Ok(())
}
