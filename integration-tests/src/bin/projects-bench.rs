//! Benchmarks the projects service on PostgreSQL: `GetMembership` as another service calls it (concurrency 64,
//! with the membership cache and without it), and `ListProjects` for a user who belongs to 1,000 of 100,000
//! projects (the first page, and walking all 1,000).
//!
//! Run: `cargo run --release -p cube-integration-tests --bin projects-bench -- [--seconds 10]`; it needs the
//! PostgreSQL of `scripts/test-env.sh up` (or `--postgres-url`), creates a database of its own and drops it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_integration_tests::bench::{Caller, Measurement, measure};
use cube_integration_tests::start_server;
use cube_kit::Channel;
use cube_kit::config::DatabaseArgs;
use cube_projects::model::{member, project};
use cube_projects::{Peers, Projects};
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{GetMembershipRequest, ListProjectsRequest, Role};
use cube_scheduler::{ClusterRegistry, Scheduler};
use futures::future::BoxFuture;
use sea_orm::{ConnectionTrait as _, EntityTrait as _, IntoActiveModel as _};

const ADMIN_PASSWORD: &str = "projects bench admin password";
const PROJECTS: usize = 100_000;
const MINE: usize = 1_000;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Cube's projects service on PostgreSQL")]
struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of warm-up before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// The PostgreSQL server (a database of the benchmark's own is created on it).
    #[arg(long, env = "CUBE_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cube_kit::cli::runtime(None)?.block_on(benchmark(args))
}

fn bearer(token: &str) -> anyhow::Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    Ok(format!("Bearer {token}").parse()?)
}

/// Calls GetMembership for the caller in one of their projects.
struct Membership(
    ProjectServiceClient<tonic::transport::Channel>,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
);

impl Caller for Membership {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut request = tonic::Request::new(GetMembershipRequest {
                project: "projects/p-000500".into(),
                user: String::new(),
            });
            request.metadata_mut().insert("authorization", self.1.clone());
            self.0
                .get_membership(request)
                .await
                .is_ok_and(|reply| reply.into_inner().role() == Role::Developer)
        })
    }
}

async fn benchmark(args: Args) -> anyhow::Result<()> {
    let base = match args
        .postgres_url
        .clone()
        .or_else(|| cube_testkit::lookup("CUBE_TEST_POSTGRES_URL"))
    {
        Some(url) => url,
        None => anyhow::bail!("no PostgreSQL: start scripts/test-env.sh up or pass --postgres-url"),
    };
    let name = format!("cube_bench_{}", std::process::id());
    let admin_db = sea_orm::Database::connect(&base).await?;
    admin_db.execute_unprepared(&format!("CREATE DATABASE {name}")).await?;
    let result = run(&args, &cube_testkit::with_database(&base, &name)).await;
    admin_db
        .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let warmup = Duration::from_secs(args.warmup);
    println!(
        "projects benchmark on PostgreSQL: {}s per row after {}s warm-up, {} cores",
        args.seconds,
        args.warmup,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new(BusOptions::default()));
    let data = std::env::temp_dir().join(format!("cube-projects-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
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
    let (projects_for_scheduler, _unbound) = Channel::late();
    let scheduler = Scheduler::start(
        ClusterRegistry::embedded(),
        cube_scheduler::Peers {
            auth: auth_channel.clone(),
            projects: projects_for_scheduler,
        },
        &bus,
        cube_scheduler::Options::default(),
        cube_kit::db::connect::<cube_scheduler::model::Migrator>("sqlite::memory:", true).await?,
    )
    .await?;
    let _scheduler_feed = scheduler.feed;
    let scheduler = start_server(scheduler.server).await;

    // One user, `bench`, developer of 1,000 of 100,000 projects (every tenth of the first 10,000).
    let connection = tonic::transport::Endpoint::from_shared(auth.url())?.connect().await?;
    let admin = AuthServiceClient::new(connection.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await?
        .into_inner()
        .access_token;
    let mut create = tonic::Request::new(CreateUserRequest {
        user: Some(User {
            email: "bench@example.com".into(),
            ..User::default()
        }),
        user_id: "bench".into(),
        password: "bench long password".into(),
    });
    create.metadata_mut().insert("authorization", bearer(&admin)?);
    UserServiceClient::new(connection.clone()).create_user(create).await?;
    let token = AuthServiceClient::new(connection)
        .login(LoginRequest {
            username: "bench".into(),
            password: "bench long password".into(),
        })
        .await?
        .into_inner()
        .access_token;

    let seeding = Instant::now();
    let database = DatabaseArgs {
        database_url: url.to_owned(),
        migrate: true,
    };
    let db = cube_kit::db::connect::<cube_projects::model::Migrator>(url, true).await?;
    for chunk in (0..PROJECTS).collect::<Vec<_>>().chunks(2_000) {
        let rows = chunk.iter().map(|n| {
            project::Model {
                id: format!("p-{n:06}"),
                display_name: format!("Project {n}"),
                description: String::new(),
                kind: "org".into(),
                settings: "{}".into(),
                quota: "{}".into(),
                version: 1,
                created_ms: 0,
                updated_ms: 0,
                deleted_ms: None,
            }
            .into_active_model()
        });
        project::Entity::insert_many(rows).exec(&db).await?;
        // Every project has an owner of its own, so the members table holds 101,000 rows.
        let owners = chunk.iter().map(|n| {
            member::Model {
                project: format!("p-{n:06}"),
                member_id: format!("u-owner-{n}"),
                kind: "user".into(),
                subject: format!("owner-{n}"),
                role: "owner".into(),
                quota: "{}".into(),
                created_ms: 0,
            }
            .into_active_model()
        });
        member::Entity::insert_many(owners).exec(&db).await?;
    }
    let mine = (0..MINE).map(|n| {
        member::Model {
            project: format!("p-{:06}", n * 10),
            member_id: "u-bench".into(),
            kind: "user".into(),
            subject: "bench".into(),
            role: "developer".into(),
            quota: "{}".into(),
            created_ms: 0,
        }
        .into_active_model()
    });
    member::Entity::insert_many(mine).exec(&db).await?;
    db.execute_unprepared("ANALYZE").await?;
    println!(
        "seeded {PROJECTS} projects, {} members ({MINE} of them the benchmark user's) in {:.1} s",
        PROJECTS + MINE,
        seeding.elapsed().as_secs_f64()
    );

    for (label, ttl) in [
        ("cached (2 s membership cache)", Duration::from_secs(2)),
        ("uncached (cache off)", Duration::ZERO),
    ] {
        let projects = Projects::start(
            &database,
            Peers {
                auth: auth_channel.clone(),
                scheduler: Channel::remote(&scheduler.url())?,
                workloads: Vec::new(),
            },
            bus.clone(),
            ttl,
        )
        .await?;
        let _background = projects.background;
        let running = start_server(projects.server).await;
        let channel = tonic::transport::Endpoint::from_shared(running.url())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let value = bearer(&token)?;
        let callers: Vec<Box<dyn Caller>> = (0..64)
            .map(|_| -> Box<dyn Caller> {
                Box::new(Membership(ProjectServiceClient::new(channel.clone()), value.clone()))
            })
            .collect();
        let pid = std::process::id();
        let m: Measurement = measure(callers, warmup, duration, pid).await?;
        println!(
            "GetMembership, concurrency 64, {label}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            m.rps(),
            m.p50_us / 1000.0,
            m.p99_us / 1000.0,
            m.errors
        );

        if ttl.is_zero() {
            list_projects(&channel, &token, duration).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// ListProjects for the benchmark user, one call at a time: the first page (50), and all 1,000 in pages.
async fn list_projects(channel: &tonic::transport::Channel, token: &str, duration: Duration) -> anyhow::Result<()> {
    let mut client = ProjectServiceClient::new(channel.clone());
    let mut first_page = Vec::new();
    let mut walks = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let mut page_token = String::new();
        let walk = Instant::now();
        let mut seen = 0;
        loop {
            let mut request = tonic::Request::new(ListProjectsRequest {
                page_size: 50,
                page_token,
                filter: String::new(),
            });
            request.metadata_mut().insert("authorization", bearer(token)?);
            let call = Instant::now();
            let page = client.list_projects(request).await?.into_inner();
            if seen == 0 {
                first_page.push(call.elapsed());
            }
            seen += page.projects.len();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        anyhow::ensure!(seen == MINE, "the user sees {seen} projects, not {MINE}");
        walks.push(walk.elapsed());
    }
    let percentile = |values: &mut Vec<Duration>, p: f64| {
        values.sort();
        let index = ((values.len() as f64 - 1.0) * p).round() as usize;
        values.get(index).copied().unwrap_or_default().as_secs_f64() * 1000.0
    };
    println!(
        "ListProjects for a user in {MINE} of {PROJECTS} projects (cache off): first page of 50: p50 {:.2} ms, p99 {:.2} ms \
         ({} calls; target p99 ≤ 10 ms); all {MINE} in 20 pages: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut first_page.clone(), 0.5),
        percentile(&mut first_page, 0.99),
        walks.len() * 20,
        percentile(&mut walks.clone(), 0.5),
        percentile(&mut walks, 0.99),
    );
    Ok(())
}
