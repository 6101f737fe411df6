//! Benchmarks the scheduler in two sections.
//!
//! - The balancer's plan: `plan` over 5,000 nodes in 100 resource groups (CPU and GPU nodes, spread loads, 200
//!   pending pods), the size issue 5 sets a 50 ms target for, with the default move limits and with up to 1,000
//!   moves per class (the duration `scheduler/tests/balance.rs` used to assert).
//! - Placement and admission decisions: one decision is `Place` then `Admit` for a new workload, from 64
//!   concurrent clients, with 5,000 fake nodes in the real kube-apiserver of the test environment (labelled with
//!   this run's label and deleted at the end), 1,000 projects with quotas created through the projects service,
//!   and the projects and the reservations stored in fresh PostgreSQL databases; auth, projects and the scheduler
//!   run in this process, as in the other benchmarks. Measured with the quota cache on (its default) and off;
//!   each row also says how busy the whole machine was, since PostgreSQL and the Kubernetes control plane share
//!   its cores. Then the batch path: `BatchAdmit` of 1,000 tasks of one project at a time (a workflow run's
//!   ready tasks), its admission decisions per second. `PlanBalance` over the live inventory is timed 50 times
//!   through gRPC, the first call right after the inventory holds every fake node.
//!
//! Run: `cargo run --release -p cube-integration-tests --bin scheduler-bench -- [--only plan|decisions]
//! [--runs 200] [--seconds 10]`. The decisions section needs `scripts/test-env.sh up` (PostgreSQL and
//! Kubernetes), or `--postgres-url` and `--kubeconfig`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_integration_tests::bench::{Caller, Measurement, measure};
use cube_integration_tests::{Running, start_server};
use cube_kit::Channel;
use cube_kit::config::DatabaseArgs;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{CreateProjectRequest, Project, ProjectType, Quota, Settings};
use cube_proto::cube::scheduler::v1::admission_service_client::AdmissionServiceClient;
use cube_proto::cube::scheduler::v1::balance_service_client::BalanceServiceClient;
use cube_proto::cube::scheduler::v1::placement_service_client::PlacementServiceClient;
use cube_proto::cube::scheduler::v1::{
    AdmissionState, AdmitRequest, BatchAdmitRequest, PlaceRequest, PlanBalanceRequest, WorkloadKind, batch_admit_result,
};
use cube_scheduler::admission::AdmissionOptions;
use cube_scheduler::balance::{BalanceNode, BalancePolicy, NodeClass, PendingPod, Resources, plan};
use cube_scheduler::balancer::BalanceSettings;
use cube_scheduler::{ClusterConfig, ClusterRegistry, Options, Scheduler};
use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sea_orm::ConnectionTrait as _;
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};

const ADMIN_PASSWORD: &str = "scheduler bench admin password";
/// The label every node of one run carries, with the run's id as its value.
const RUN_LABEL: &str = "cube.dev/scheduler-bench-run";
/// Resource groups the projects and nodes are spread over.
const GROUPS: usize = 100;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the scheduler: the balancer's plan, and placement + admission decisions")]
struct Args {
    /// Runs only one section: `plan` or `decisions`.
    #[arg(long)]
    only: Option<Section>,
    /// How many times the plan is computed.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Seconds each decisions row is measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of warm-up before each decisions row.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// `BatchAdmit` calls of `batch_size` tasks measured in the batch row.
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Tasks per `BatchAdmit` call.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Concurrent clients, each making one decision after another.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Fake nodes created in the kube-apiserver.
    #[arg(long, default_value_t = 5_000)]
    nodes: usize,
    /// Projects created through the projects service.
    #[arg(long, default_value_t = 1_000)]
    projects: usize,
    /// Kubernetes and projects calls made at once while setting up.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// The PostgreSQL server (databases of the benchmark's own are created on it and dropped).
    #[arg(long, env = "CUBE_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// The kubeconfig of the Kubernetes API server the fake nodes are created in.
    #[arg(long, env = "CUBE_TEST_KUBECONFIG")]
    kubeconfig: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// The balancer's plan.
    Plan,
    /// Placement and admission decisions.
    Decisions,
}

fn node(index: u64) -> BalanceNode {
    let group = format!("group-{:03}", index % 100);
    let load = (index * 7_919) % 101;
    let gpu = index.is_multiple_of(5);
    let mut labels = BTreeMap::from([
        ("org".to_owned(), group),
        ("train".to_owned(), "true".to_owned()),
        ((if gpu { "gpu" } else { "cpu" }).to_owned(), "true".to_owned()),
    ]);
    labels.insert("share".to_owned(), "true".to_owned());
    let (allocatable, requested) = if gpu {
        (
            Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 << 30,
                gpus: 8,
            },
            Resources {
                cpu_millis: 8_000,
                memory_bytes: 32 << 30,
                gpus: load % 9,
            },
        )
    } else {
        (
            Resources {
                cpu_millis: 10_000,
                memory_bytes: 64 << 30,
                gpus: 0,
            },
            Resources {
                cpu_millis: load * 100,
                memory_bytes: (load * 600) << 20,
                gpus: 0,
            },
        )
    };
    BalanceNode {
        name: format!("node-{index:05}"),
        labels,
        allocatable,
        requested,
        ready: true,
    }
}

fn plan_section(args: &Args) {
    let nodes: Vec<BalanceNode> = (0..5_000).map(node).collect();
    let pending: Vec<PendingPod> = (0..200u64)
        .map(|i| PendingPod {
            resource_group: format!("group-{:03}", i % 37),
            class: NodeClass::Cpu,
            pending_for: Duration::from_secs(200 + i * 10),
            insufficient_resources: i % 3 != 0,
        })
        .collect();
    let clusters = vec![("big".to_owned(), nodes, pending)];
    for (limits, policy) in [
        ("default move limits", BalancePolicy::default()),
        (
            "up to 1,000 moves per class",
            BalancePolicy {
                max_moves_per_class: 1_000,
                ..BalancePolicy::default()
            },
        ),
    ] {
        let mut times = Vec::with_capacity(args.runs);
        let mut moves = 0;
        for _ in 0..args.runs.max(1) {
            let started = Instant::now();
            moves = plan(&clusters, &policy).len();
            times.push(started.elapsed());
        }
        times.sort();
        let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
        println!(
            "PlanBalance plan() over 5,000 nodes, 100 groups, 200 pending pods, {limits}, {} runs: median {:.2} ms, \
             p99 {:.2} ms, max {:.2} ms ({moves} moves; target ≤ 50 ms)",
            times.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.only != Some(Section::Decisions) {
        plan_section(&args);
    }
    if args.only != Some(Section::Plan) {
        cube_kit::cli::runtime(None)?.block_on(decisions_section(&args))?;
    }
    Ok(())
}

fn bearer(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    Ok(format!("Bearer {token}").parse()?)
}

fn authed<T>(message: T, token: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", token.clone());
    request
}

/// One decision after another: `Place`, then `Admit`, for a new run of a project drawn at random, every other
/// one asking for a T4 GPU.
struct Decision {
    placer: PlacementServiceClient<tonic::transport::Channel>,
    admitter: AdmissionServiceClient<tonic::transport::Channel>,
    token: MetadataValue<Ascii>,
    /// Names this caller's workloads apart from every other's.
    prefix: String,
    made: u64,
    random: u64,
    projects: u64,
}

impl Caller for Decision {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.made += 1;
            // xorshift64: uniform enough to spread the calls over the projects.
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            let project = format!("projects/p-{:04}", self.random % self.projects);
            let gpu = if self.made.is_multiple_of(2) { "1(T4)" } else { "" };
            let workload = format!("{project}/runs/{}-{}", self.prefix, self.made);
            let place = PlaceRequest {
                project: project.clone(),
                kind: WorkloadKind::Train as i32,
                cpu: "1".into(),
                memory: "2G".into(),
                gpu: gpu.into(),
                workload: workload.clone(),
                ..PlaceRequest::default()
            };
            if self.placer.place(authed(place, &self.token)).await.is_err() {
                return false;
            }
            let admit = AdmitRequest {
                workload,
                project,
                kind: WorkloadKind::Train as i32,
                cpu: "1".into(),
                memory: "2G".into(),
                gpu: gpu.into(),
            };
            self.admitter
                .admit(authed(admit, &self.token))
                .await
                .is_ok_and(|admission| admission.into_inner().state() != AdmissionState::Unspecified)
        })
    }
}

/// Creates the databases the decisions section uses, runs it, and drops them.
async fn decisions_section(args: &Args) -> anyhow::Result<()> {
    let base = args
        .postgres_url
        .clone()
        .or_else(|| cube_testkit::lookup("CUBE_TEST_POSTGRES_URL"))
        .context("no PostgreSQL: start scripts/test-env.sh up or pass --postgres-url")?;
    let kubeconfig = args
        .kubeconfig
        .clone()
        .or_else(|| cube_testkit::lookup("CUBE_TEST_KUBECONFIG"))
        .context("no Kubernetes API server: start scripts/test-env.sh up or pass --kubeconfig")?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let run = format!("{}-{started}", std::process::id());
    let names = [
        format!("cube_bench_scheduler_{}", std::process::id()),
        format!("cube_bench_projects_{}", std::process::id()),
    ];
    let admin = sea_orm::Database::connect(&base).await?;
    for name in &names {
        admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await?;
    }
    let urls = names.clone().map(|name| cube_testkit::with_database(&base, &name));
    let result = decisions(args, &kubeconfig, &urls[0], &urls[1], &run).await;
    for name in &names {
        admin
            .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await?;
    }
    result
}

/// The cluster the fake nodes are in, as the scheduler registers it.
fn registry(kubeconfig: &str) -> anyhow::Result<ClusterRegistry> {
    ClusterRegistry::new(vec![ClusterConfig {
        default: true,
        ..ClusterConfig::new("bench", Some(kubeconfig.into()))
    }])
    .map_err(anyhow::Error::msg)
}

/// A scheduler over the bench cluster, admissions in `url`, quota answers kept for `ttl`, no balancing rounds.
async fn scheduler(
    kubeconfig: &str,
    url: &str,
    auth: &Channel,
    projects: &Running,
    bus: &Arc<dyn EventBus>,
    ttl: Duration,
) -> anyhow::Result<Scheduler> {
    let options = Options {
        admission: AdmissionOptions {
            quota_cache_ttl: ttl,
            ..AdmissionOptions::default()
        },
        balance: BalanceSettings {
            interval_seconds: 0,
            ..BalanceSettings::default()
        },
        ..Options::default()
    };
    Ok(Scheduler::start(
        registry(kubeconfig)?,
        cube_scheduler::Peers {
            auth: auth.clone(),
            projects: Channel::remote(&projects.url())?,
        },
        bus,
        options,
        cube_kit::db::connect::<cube_scheduler::model::Migrator>(url, true).await?,
    )
    .await?)
}

/// Runs [`decide`] with a directory for auth's database, removed afterwards.
async fn decisions(
    args: &Args,
    kubeconfig: &str,
    scheduler_url: &str,
    projects_url: &str,
    run: &str,
) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("cube-scheduler-bench-{run}"));
    std::fs::create_dir_all(&data)?;
    let measured = decide(args, kubeconfig, scheduler_url, projects_url, run, &data).await;
    let _ = std::fs::remove_dir_all(&data);
    measured
}

/// Auth (its database in `data`) and projects with the benchmark user and its projects; the fake nodes; then one
/// measured row per quota cache setting, each with a scheduler of its own. The nodes are deleted whatever happens
/// once they are being made.
async fn decide(
    args: &Args,
    kubeconfig: &str,
    scheduler_url: &str,
    projects_url: &str,
    run: &str,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let auth = Auth::start(
        &AuthArgs::embedded(
            format!("sqlite://{}", data.join("auth.db").display()),
            Some(ADMIN_PASSWORD.into()),
        )?,
        bus.clone(),
    )
    .await?;
    let _auth_background = auth.background;
    let auth = start_server(auth.server).await;
    let auth_channel = Channel::remote(&auth.url())?;
    // Projects asks the scheduler only for quota usage, which the benchmark does not call.
    let (scheduler_for_projects, _unbound) = Channel::late();
    let projects = cube_projects::Projects::start(
        &DatabaseArgs {
            database_url: projects_url.to_owned(),
            migrate: true,
        },
        cube_projects::Peers {
            auth: auth_channel.clone(),
            scheduler: scheduler_for_projects,
            workloads: Vec::new(),
        },
        bus.clone(),
        Duration::from_secs(2),
    )
    .await?;
    let _projects_background = projects.background;
    let projects = start_server(projects.server).await;

    let connection = tonic::transport::Endpoint::from_shared(auth.url())?.connect().await?;
    let admin = AuthServiceClient::new(connection.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await?
        .into_inner()
        .access_token;
    UserServiceClient::new(connection.clone())
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: "bench@example.com".into(),
                    ..User::default()
                }),
                user_id: "bench".into(),
                password: "bench long password".into(),
            },
            &bearer(&admin)?,
        ))
        .await?;
    let token = bearer(
        &AuthServiceClient::new(connection)
            .login(LoginRequest {
                username: "bench".into(),
                password: "bench long password".into(),
            })
            .await?
            .into_inner()
            .access_token,
    )?;

    let started = Instant::now();
    let channel = tonic::transport::Endpoint::from_shared(projects.url())?
        .connect()
        .await?;
    futures::stream::iter(0..args.projects)
        .map(|n| {
            let mut client = ProjectServiceClient::new(channel.clone());
            let request = authed(
                CreateProjectRequest {
                    project: Some(Project {
                        r#type: ProjectType::Org as i32,
                        settings: Some(Settings {
                            resource_group: format!("group-{:03}", n % GROUPS),
                            ..Settings::default()
                        }),
                        quota: Some(Quota {
                            cpu: Some(1e6),
                            memory_bytes: Some(1 << 50),
                            gpu: Some(1e5),
                            gpu_by_type: HashMap::from([("T4".to_owned(), 1e5)]),
                            runs: Some(10_000_000),
                            ..Quota::default()
                        }),
                        ..Project::default()
                    }),
                    project_id: format!("p-{n:04}"),
                },
                &token,
            );
            async move { client.create_project(request).await }
        })
        .buffer_unordered(args.setup_concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let projects_took = started.elapsed();

    // The first scheduler's Kubernetes client makes and deletes the nodes.
    let first = scheduler(
        kubeconfig,
        scheduler_url,
        &auth_channel,
        &projects,
        &bus,
        AdmissionOptions::default().quota_cache_ttl,
    )
    .await?;
    let nodes = Api::<Node>::all(first.fleet.client("bench")?);
    let started = Instant::now();
    let made = futures::stream::iter(0..args.nodes)
        .map(|n| {
            let nodes = nodes.clone();
            async move {
                let name = format!("bench-{run}-{n:05}");
                let mut labels = json!({RUN_LABEL: run, "org": format!("group-{:03}", n % GROUPS), "train": "true"});
                let mut allocatable = json!({"cpu": "64", "memory": "256Gi", "pods": "110"});
                // Every group has CPU and GPU nodes: alternate runs of GROUPS nodes.
                if (n / GROUPS).is_multiple_of(2) {
                    labels["gpu"] = json!("true");
                    labels["gpu-type"] = json!("T4");
                    allocatable["nvidia.com/gpu"] = json!("8");
                } else {
                    labels["cpu"] = json!("true");
                }
                let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
                nodes.create(&PostParams::default(), &node).await?;
                let status = json!({"status": {"allocatable": allocatable, "capacity": allocatable}});
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.setup_concurrency)
        .try_collect::<Vec<()>>()
        .await;
    let nodes_took = started.elapsed();
    let measured = match made {
        Ok(_) => {
            println!(
                "set up {} projects with quotas through the projects service in {:.1} s, {} fake nodes in the \
                 kube-apiserver in {:.1} s",
                args.projects,
                projects_took.as_secs_f64(),
                args.nodes,
                nodes_took.as_secs_f64()
            );
            rows(
                args,
                kubeconfig,
                scheduler_url,
                &auth_channel,
                &projects,
                &bus,
                &token,
                run,
                first,
            )
            .await
        }
        Err(error) => Err(error),
    };
    let deleted = nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{RUN_LABEL}={run}")),
        )
        .await;
    if let Err(error) = deleted {
        eprintln!("deleting the fake nodes labelled {RUN_LABEL}={run}: {error}");
    }
    measured
}

/// Waits until the scheduler's inventory holds every fake node of the run.
async fn inventory_ready(scheduler: &Scheduler, run: &str, nodes: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let seen = scheduler
            .fleet
            .nodes("bench")?
            .iter()
            .filter(|node| node.labels.get(RUN_LABEL).is_some_and(|value| value == run))
            .count();
        if seen == nodes {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the inventory holds {seen} of {nodes} nodes after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Measures decisions with the quota cache at its default and turned off, each on a scheduler of its own.
#[expect(clippy::too_many_arguments, reason = "the pieces the section set up, passed on once")]
async fn rows(
    args: &Args,
    kubeconfig: &str,
    scheduler_url: &str,
    auth: &Channel,
    projects: &Running,
    bus: &Arc<dyn EventBus>,
    token: &MetadataValue<Ascii>,
    run: &str,
    first: Scheduler,
) -> anyhow::Result<()> {
    let mut next = Some(first);
    let default_ttl = AdmissionOptions::default().quota_cache_ttl;
    for (row, ttl) in [("cached", default_ttl), ("uncached", Duration::ZERO)] {
        let scheduler = match next.take() {
            Some(scheduler) => scheduler,
            None => scheduler(kubeconfig, scheduler_url, auth, projects, bus, ttl).await?,
        };
        inventory_ready(&scheduler, run, args.nodes).await?;
        let fleet = scheduler.fleet.clone();
        let _feed = scheduler.feed;
        let _background = scheduler.background;
        let server = start_server(scheduler.server).await;
        let mut channels = Vec::new();
        for _ in 0..8 {
            channels.push(
                tonic::transport::Endpoint::from_shared(server.url())?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        if row == "cached" {
            plan_balance_rpc(&channels[0], token, args.nodes).await?;
            batch_row(args, &channels[0], token).await?;
        }
        let callers: Vec<Box<dyn Caller>> = (0..args.clients)
            .map(|client| -> Box<dyn Caller> {
                let channel = channels[client % channels.len()].clone();
                Box::new(Decision {
                    placer: PlacementServiceClient::new(channel.clone()),
                    admitter: AdmissionServiceClient::new(channel),
                    token: token.clone(),
                    prefix: format!("{row}-{client}"),
                    made: 0,
                    random: 0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
                    projects: args.projects as u64,
                })
            })
            .collect();
        let changes_before = fleet.generation("bench")?;
        let (warmup, duration) = (Duration::from_secs(args.warmup), Duration::from_secs(args.seconds));
        let machine = tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let before = machine_cpu()?;
            tokio::time::sleep(duration).await;
            let after = machine_cpu()?;
            let total = (after.0 - before.0).max(1.0);
            anyhow::Ok((after.1 - before.1) / total)
        });
        let m: Measurement = measure(callers, warmup, duration, std::process::id()).await?;
        let busy = machine.await??;
        let changes = fleet.generation("bench")? - changes_before;
        println!(
            "Place + Admit decisions, {} clients, {} nodes in {GROUPS} groups, {} projects, reservations on \
             PostgreSQL, quota cache {}: {:.0} decisions/s, p50 {:.2} ms, p99 {:.2} ms, {} errors, {:.2} CPU s per \
             1,000 decisions in this process (auth, projects, scheduler; not PostgreSQL or the kube-apiserver), \
             the machine's {} cores {:.0}% busy; {changes} inventory changes meanwhile (target ≥ 2,000 \
             decisions/s)",
            args.clients,
            args.nodes,
            args.projects,
            if ttl.is_zero() {
                "off".to_owned()
            } else {
                format!("{ttl:?}")
            },
            m.rps(),
            m.p50_us / 1000.0,
            m.p99_us / 1000.0,
            m.errors,
            m.cpu_per_1000(),
            std::thread::available_parallelism().map_or(0, usize::from),
            busy * 100.0
        );
        server.stop().await;
    }
    Ok(())
}

/// Admits `args.batches` batches of `args.batch_size` new tasks, each batch in one project (as the workflow engine
/// admits a run's ready tasks), one call after another, and prints the admission decisions per second.
async fn batch_row(
    args: &Args,
    channel: &tonic::transport::Channel,
    token: &MetadataValue<Ascii>,
) -> anyhow::Result<()> {
    let mut client = AdmissionServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut took = Vec::new();
    let (mut admitted, mut queued) = (0, 0);
    for batch in 0..args.batches.max(1) {
        let project = format!("projects/p-{:04}", (batch * 7_919) % args.projects);
        let requests = (0..args.batch_size)
            .map(|task| AdmitRequest {
                workload: format!("{project}/pipelines/bench/runs/batch-{batch}/tasks/t-{task}"),
                project: String::new(),
                kind: WorkloadKind::Train as i32,
                cpu: "1".into(),
                memory: "2G".into(),
                gpu: if task.is_multiple_of(2) {
                    "1(T4)".into()
                } else {
                    String::new()
                },
            })
            .collect();
        let started = Instant::now();
        let results = client
            .batch_admit(authed(BatchAdmitRequest { project, requests }, token))
            .await?
            .into_inner()
            .results;
        took.push(started.elapsed());
        for result in results {
            match result.result {
                Some(batch_admit_result::Result::Admission(admission))
                    if admission.state() == AdmissionState::Admitted =>
                {
                    admitted += 1;
                }
                Some(batch_admit_result::Result::Admission(_)) => queued += 1,
                other => anyhow::bail!("a task of the batch was not admitted: {other:?}"),
            }
        }
    }
    let total: Duration = took.iter().sum();
    took.sort();
    println!(
        "BatchAdmit of {} tasks of one project, {} calls one after another, reservations on PostgreSQL: {:.0} \
         decisions/s, median call {:.1} ms, max {:.1} ms ({admitted} admitted, {queued} queued)",
        args.batch_size,
        took.len(),
        (args.batch_size * took.len()) as f64 / total.as_secs_f64().max(1e-9),
        took[took.len() / 2].as_secs_f64() * 1000.0,
        took[took.len() - 1].as_secs_f64() * 1000.0,
    );
    Ok(())
}

/// Times `PlanBalance` over the live inventory of the fake nodes (through gRPC, one call at a time, the first
/// right after the inventory holds every node): the inventory's nodes turned into the planner's, the plan, and the
/// answer.
async fn plan_balance_rpc(
    channel: &tonic::transport::Channel,
    token: &MetadataValue<Ascii>,
    nodes: usize,
) -> anyhow::Result<()> {
    let mut client = BalanceServiceClient::new(channel.clone());
    let mut took = Vec::new();
    let mut moves = 0;
    for _ in 0..50 {
        let started = Instant::now();
        let plan = client
            .plan_balance(authed(PlanBalanceRequest::default(), token))
            .await?
            .into_inner();
        took.push(started.elapsed());
        moves = plan.moves.len();
    }
    let first = took[0];
    took.sort();
    println!(
        "PlanBalance over the live inventory ({nodes} nodes in {GROUPS} groups), 50 calls, the first right after \
         the nodes arrived: first {:.2} ms, median {:.2} ms, p99 {:.2} ms, max {:.2} ms; {moves} moves planned \
         (target: max ≤ 50 ms)",
        first.as_secs_f64() * 1000.0,
        took[took.len() / 2].as_secs_f64() * 1000.0,
        took[took.len() * 99 / 100].as_secs_f64() * 1000.0,
        took[took.len() - 1].as_secs_f64() * 1000.0,
    );
    Ok(())
}

/// The machine's CPU time so far from /proc/stat: all of it, and the busy part (not idle or waiting for I/O).
fn machine_cpu() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("an empty /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let total: f64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    Ok((total, total - idle))
}
