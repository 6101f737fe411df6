//! Benchmarks the watcher (issue 14's targets):
//!
//! 1. transitions per second on one core, from synthetic pod updates (each a change of a pod's restart count,
//!    read as the watcher reads a Pod) to transitions published on the bus: compared with the stored state,
//!    recorded as an event, enqueued and relayed through the outbox, on SQLite and (when the test environment
//!    has one) PostgreSQL;
//! 2. end-to-end latency (p50, p99, max) from a change made on a kube-apiserver of the bench's own to a
//!    grpc-web `WatchEvents` client through the gateway, at a paced rate of changes per second;
//! 3. the resident memory of a `cube-watcher` process watching N pods created in an API server of the bench's
//!    own (peak and after the list).
//!
//! Run: `cargo run --release -p cube-integration-tests --bin watcher-bench -- [--transitions 20000] [--runs 5]
//! [--rate 1000] [--seconds 10] [--pods 100000]` with the test environment up (`scripts/test-env.sh up`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_gateway::Gateway;
use cube_integration_tests::grpc_web::{GrpcWebClient, GrpcWebStream, Http, frame};
use cube_integration_tests::platform::{Platform, TestNamespace, kube_client, platform};
use cube_integration_tests::shape::Shape;
use cube_integration_tests::{start_gateway_with, test_server_args};
use cube_kit::Channel;
use cube_kit::lease::Lease;
use cube_proto::cube::watcher::v1::{Event, ObjectKind, WatchEventsRequest};
use cube_runtime::kubernetes::pod_status;
use cube_runtime::labels;
use cube_runtime::transition::TOPIC;
use cube_testkit::kubernetes::ApiServer;
use cube_watcher::store::{self, Change, Fence};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use prost::Message as _;
use serde_json::json;
use tokio::sync::Notify;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Cube's watcher: transitions per second, end-to-end latency, memory per pod")]
struct Args {
    /// Synthetic pod updates recorded in the throughput run (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    transitions: usize,
    /// How many times the throughput run is made per backend (the median is the figure).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Changes per second made on the API server in the latency run (0 skips it).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds the latency run lasts.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Pods created for the memory run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One core for the throughput run: a current-thread runtime.
    let one_core = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut backends = vec![("SQLite".to_owned(), None)];
    if let Some(url) = cube_testkit::lookup("CUBE_TEST_POSTGRES_URL") {
        backends.push(("PostgreSQL".to_owned(), Some(url)));
    }
    println!(
        "watcher-bench: {} synthetic pod updates per backend, one core",
        args.transitions
    );
    for (name, url) in backends {
        if args.transitions == 0 {
            break;
        }
        let mut rates = Vec::with_capacity(args.runs);
        for _ in 0..args.runs.max(1) {
            rates.push(one_core.block_on(throughput(args.transitions, url.as_deref()))?);
        }
        rates.sort_by(f64::total_cmp);
        let each: Vec<String> = rates.iter().map(|rate| format!("{rate:.0}")).collect();
        println!(
            "  transitions published per second ({name}): median {:.0} of {} runs ({})",
            rates.get(rates.len() / 2).copied().unwrap_or_default(),
            rates.len(),
            each.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.rate > 0 {
        runtime.block_on(latency(args.rate, args.seconds))?;
    }
    if args.pods > 0 {
        runtime.block_on(memory(args.pods))?;
    }
    Ok(())
}

/// A pod `index` of the bench, its container started `restarts` times again.
fn synthetic_pod(index: usize, restarts: i32) -> anyhow::Result<Pod> {
    let mut pod_labels = labels::for_project("bench");
    pod_labels.insert("cube.bench/pod".to_owned(), index.to_string());
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("pod-{index}"), "namespace": "bench", "uid": format!("uid-{index}"),
            "resourceVersion": format!("{}", index * 1000 + usize::try_from(restarts).unwrap_or(0)),
            "labels": pod_labels,
        },
        "spec": {"containers": [{"name": "main", "image": "cube.test/worker:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "main", "image": "cube.test/worker:1", "imageID": "", "ready": true, "restartCount": restarts,
            "state": {"running": {"startedAt": "2026-12-04T00:00:00Z"}},
        }]},
    }))?)
}

/// Records `count` synthetic updates (1,000 pods, each changing in turn) and waits until all are published.
async fn throughput(count: usize, url: Option<&str>) -> anyhow::Result<f64> {
    const PODS: usize = 1000;
    let dir = tempfile::tempdir()?;
    let url = match url {
        Some(url) => fresh_postgres(url).await?,
        None => format!("sqlite://{}", dir.path().join("watcher.db").display()),
    };
    let db = cube_kit::db::connect::<store::Migrator>(&url, true).await?;
    let lease_name = cube_watcher::lease_name("bench");
    let epoch = Lease::new(lease_name.clone(), "bench", Duration::from_secs(600))
        .acquire_or_renew(&db)
        .await?
        .context("the bench's lease")?;
    let fence = Fence {
        lease: &lease_name,
        epoch,
    };
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let mut published = bus.subscribe(TOPIC, "bench", "bench").await?;
    let wake = Arc::new(Notify::new());
    let relay = tokio::spawn(cube_kit::outbox::relay(
        db.clone(),
        bus.clone(),
        wake.clone(),
        cube_kit::outbox::RelayOptions::default(),
    ));
    let pods: Vec<Pod> = (0..count)
        .map(|index| synthetic_pod(index % PODS, i32::try_from(index / PODS).unwrap_or(i32::MAX)))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let counting = async {
        let mut seen = 0;
        while seen < count {
            let delivery = published.next().await.context("the bus ended")??;
            delivery.ack().await?;
            seen += 1;
        }
        anyhow::Ok(())
    };
    // As the watcher does with what has arrived from its watch: up to 256 changes in one transaction.
    let recording = async {
        for arrived in pods.chunks(256) {
            let changes: Vec<Change> = arrived
                .iter()
                .map(|pod| Change {
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    status: Some(pod_status("bench", pod)),
                })
                .collect();
            store::record(&db, fence, ObjectKind::Pod, &changes, None).await?;
            wake.notify_one();
        }
        anyhow::Ok(())
    };
    let (recorded, counted) = tokio::join!(recording, counting);
    recorded?;
    counted?;
    let elapsed = started.elapsed();
    relay.abort();
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// A fresh database on the PostgreSQL server of `url`.
async fn fresh_postgres(url: &str) -> anyhow::Result<String> {
    use sea_orm::ConnectionTrait as _;
    let name = format!("watcher_bench_{}", std::process::id());
    let admin = sea_orm::Database::connect(url).await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
        .await?;
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await?;
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    Ok(format!("{base}/{name}"))
}

/// Changes pod statuses on the test cluster at `rate` per second for `seconds` and measures how long each
/// takes to reach a `WatchEvents` client of the platform's watcher.
async fn latency(rate: u64, seconds: u64) -> anyhow::Result<()> {
    const PODS: usize = 200;
    // An API server of the bench's own: no scheduler or controller manager also watches (and reacts to) every
    // change, so the API server's own work per change is what a cluster's would be for the watcher alone.
    let server = ApiServer::start(&[]).await;
    let kubeconfig = server.kubeconfig().display().to_string();
    let platform: Platform = platform(Shape::Embedded, &kubeconfig).await;
    let kube = kube_client(&kubeconfig).await;
    let namespace = TestNamespace::unique(&kube, "watcher-bench").await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &namespace.name);
    // The client is a web console's: grpc-web through the gateway.
    let gateway = start_gateway_with(
        Gateway::new(4 << 20).route("cube.watcher.v1", Channel::remote(&platform.watcher.url())?),
        test_server_args(),
    )
    .await;
    let mut web = GrpcWebClient::connect(gateway.address, Http::One)
        .await
        .map_err(|error| anyhow::anyhow!("connecting to the gateway: {error}"))?;
    let request = WatchEventsRequest {
        filter: format!("namespace = {}", namespace.name),
        ..WatchEventsRequest::default()
    };
    let mut stream = web
        .open(
            "/cube.watcher.v1.EventService/WatchEvents",
            frame(&request),
            &[("authorization", &format!("Bearer {}", platform.admin))],
        )
        .await
        .map_err(|error| anyhow::anyhow!("watching through the gateway: {error}"))?;
    for index in 0..PODS {
        create_pod(&pods, &format!("pod-{index}")).await?;
    }
    // Wait for the pods' creations: the watch is live.
    let mut created = 0;
    while created < PODS {
        tokio::time::timeout(Duration::from_secs(60), next_event(&mut stream))
            .await
            .context("the pods' creations were not reported")??;
        created += 1;
    }
    let total = usize::try_from(rate * seconds)?;
    let sent: Arc<std::sync::Mutex<Made>> = Arc::default();
    let made = Arc::new(AtomicUsize::new(0));
    let changing = {
        let (pods, sent, made) = (pods.clone(), sent.clone(), made.clone());
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate as f64);
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            // At most this many patches in flight, so a slow moment of the API server delays changes rather than
            // piling up connections.
            let in_flight = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            for change in 0..total {
                ticks.tick().await;
                let name = format!("pod-{}", change % PODS);
                let restarts = i32::try_from(change / PODS + 1).unwrap_or(i32::MAX);
                let (pods, sent, made) = (pods.clone(), sent.clone(), made.clone());
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                tasks.spawn(async move {
                    let _permit = permit;
                    let start = Instant::now();
                    let result = set_restarts(&pods, &name, restarts).await;
                    result.map(|()| {
                        sent.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert((name, restarts), (start, Instant::now()));
                        made.fetch_add(1, Ordering::SeqCst);
                    })
                });
            }
            let mut failures = 0;
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(error)) = done {
                    if failures == 0 {
                        eprintln!("  a change failed: {error:#}");
                    }
                    failures += 1;
                }
            }
            if failures > 0 {
                eprintln!("  {failures} changes failed");
            }
        })
    };
    let making = Instant::now();
    let mut made_in = None;
    let mut latencies = Vec::with_capacity(total);
    let mut from_answers = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    while latencies.len() < total && Instant::now() < deadline {
        let Ok(event) = tokio::time::timeout(Duration::from_secs(10), next_event(&mut stream)).await else {
            break;
        };
        let received = Instant::now();
        if made_in.is_none() && changing.is_finished() {
            made_in = Some(making.elapsed());
        }
        let transition = event?.transition.context("a transition")?;
        let key = (transition.name.clone(), transition.container_restarts);
        // The change happened (in etcd) after its patch was sent and before the API server answered: it is timed
        // from both, an upper and a lower bound.
        let times = loop {
            if let Some(start) = sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)
                .copied()
            {
                break Some(start);
            }
            if changing.is_finished() {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if let Some((sent_at, answered_at)) = times {
            latencies.push(received.duration_since(sent_at));
            from_answers.push(received.saturating_duration_since(answered_at));
        }
    }
    let made = made.load(Ordering::SeqCst);
    let achieved = made as f64 / made_in.unwrap_or_else(|| making.elapsed()).as_secs_f64().max(1.0);
    println!(
        "  end-to-end, API server change to WatchEvents client: {} of {made} changes received (asked {rate}/s, \
         made {achieved:.0}/s)",
        latencies.len()
    );
    for (from, mut latencies) in [("patch sent", latencies), ("patch answered", from_answers)] {
        latencies.sort();
        let at = |quantile: f64| {
            latencies
                .get(((latencies.len() as f64 * quantile) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0
        };
        println!(
            "    from its {from}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.50),
            at(0.99),
            at(1.0)
        );
    }
    changing.abort();
    Ok(())
}

/// The next event of a grpc-web `WatchEvents` stream.
async fn next_event(stream: &mut GrpcWebStream) -> anyhow::Result<Event> {
    let message = stream
        .message()
        .await
        .map_err(|error| anyhow::anyhow!("reading the stream: {error}"))?
        .with_context(|| format!("the stream ended: {:?}", stream.status()))?;
    Ok(Event::decode(message)?)
}

/// Each change made, by pod name and restart count: when its patch was sent and when the API server answered it.
type Made = HashMap<(String, i32), (Instant, Instant)>;

/// Creates pod `name`, which no scheduler takes.
async fn create_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels::for_project("bench")},
        "spec": {
            "schedulerName": "cube-bench-nobody",
            "containers": [{"name": "main", "image": "cube.test/worker:1"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(())
}

/// Sets pod `name` running with `restarts` restarts.
async fn set_restarts(pods: &Api<Pod>, name: &str, restarts: i32) -> anyhow::Result<()> {
    let status = json!({"status": {
        "phase": "Running",
        "containerStatuses": [{
            "name": "main", "image": "cube.test/worker:1", "imageID": "", "ready": true,
            "restartCount": restarts, "state": {"running": {"startedAt": "2026-12-04T00:00:00Z"}},
        }],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Creates `count` pods in an API server of the bench's own, starts a `cube-watcher` process on it, and reads its
/// resident memory once it has recorded them all.
async fn memory(count: usize) -> anyhow::Result<()> {
    let server = ApiServer::start(&[]).await;
    let kubeconfig = server.kubeconfig().display().to_string();
    let kube = cube_testkit::kubernetes::client_from(&kubeconfig).await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (pods, next) = (pods.clone(), next.clone());
        creators.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= count {
                    return anyhow::Ok(());
                }
                create_pod(&pods, &format!("pod-{index}")).await?;
            }
        });
    }
    while let Some(created) = creators.join_next().await {
        created??;
    }
    println!(
        "  memory: {count} pods created in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let clusters = dir.path().join("clusters.json");
    std::fs::write(
        &clusters,
        json!({"clusters": [{"name": "bench", "default": true, "kubeconfig": kubeconfig}]}).to_string(),
    )?;
    let database = format!("sqlite://{}", dir.path().join("watcher.db").display());
    let watcher_binary = std::env::current_exe()?
        .parent()
        .context("the bench's directory")?
        .join("cube-watcher");
    let mut child = tokio::process::Command::new(&watcher_binary)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-filter",
            "warn",
        ])
        .env("CUBE_DATABASE_URL", &database)
        .env("CUBE_CLUSTERS_FILE", &clusters)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (cargo build --release -p cube-watcher)",
                watcher_binary.display()
            )
        })?;
    let pid = child.id().context("the watcher's pid")?;
    let watching = Instant::now();
    let db = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(db) = cube_kit::db::connect::<store::Migrator>(&database, false).await {
            break db;
        }
    };
    loop {
        use sea_orm::{EntityTrait as _, PaginatorTrait as _};
        let recorded = store::object_state::Entity::find().count(&db).await.unwrap_or(0);
        if recorded >= count as u64 {
            break;
        }
        if watching.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("the watcher recorded only {recorded} of {count} pods in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let listed_in = watching.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    println!(
        "  memory of cube-watcher watching {count} pods: {:.0} MB resident ({:.0} MB at its peak); listed and \
         recorded in {:.0} s",
        field("VmRSS:"),
        field("VmHWM:"),
        listed_in.as_secs_f64()
    );
    child.kill().await?;
    drop(server);
    Ok(())
}
