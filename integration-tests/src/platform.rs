//! The platform as the cross-service tests and benchmarks run it: auth, projects, the scheduler and the watcher in
//! this process on loopback ports, on either shape (SQLite and the in-process bus, or a database server and Redis Streams), the
//! scheduler watching a real kube-apiserver of the test environment; and, from
//! `cube_testkit::kubernetes`, guards for the fake nodes and namespaces the tests make there.

use std::time::Duration;

use cube_auth::{Auth, AuthArgs};
use cube_clusters::{ClusterConfig, ClusterRegistry};
use cube_kit::Channel;
use cube_kit::config::DatabaseArgs;
use cube_projects::Projects;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{CreateProjectRequest, Project, ProjectType, Quota, Settings};
use cube_scheduler::balancer::BalanceSettings;
use cube_scheduler::{Options, Scheduler};
pub use cube_testkit::kubernetes::{FakeNode, TestNamespace, clean_up};
use kube::Client;

use crate::shape::{Backing, Shape};
use crate::{Running, connect, start_server};

/// The password of the platform's `admin`.
pub const ADMIN_PASSWORD: &str = "platform admin password";

/// `message` with `token` as its bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

/// A client of the API server a kubeconfig reaches.
pub async fn kube_client(path: &str) -> Client {
    ClusterConfig::new("test", Some(path.into()))
        .client()
        .await
        .expect("a client of the test cluster")
}

/// Auth, projects, the scheduler and the watcher, running, with signed-in users.
pub struct Platform {
    /// The watcher, watching the test cluster (as `kube`).
    pub watcher: Running,
    /// The bus every service publishes on.
    pub bus: std::sync::Arc<dyn cube_bus::EventBus>,
    /// Auth.
    pub auth: Running,
    /// The scheduler.
    pub scheduler: Running,
    /// The projects service.
    pub projects: Running,
    /// The access token of `admin`.
    pub admin: String,
    /// The access token of lena, a plain user.
    pub token: String,
    /// The access token of omar, another plain user.
    pub stranger: String,
    /// The scheduler's database URL.
    pub scheduler_db: String,
    _keep: (
        cube_auth::Background,
        (cube_kit::identity::RevocationFeed, Vec<cube_kit::task::Background>),
        cube_projects::Background,
        cube_watcher::Background,
    ),
    // Last: the databases and the bus outlive the services using them.
    backing: Backing,
}

impl Platform {
    /// A fresh database of the platform's backend for one more service, `service`.
    pub async fn database(&mut self, service: &str) -> String {
        self.backing.database(service).await
    }

    /// The flags that put a service process on the platform's bus (none for the in-process bus).
    pub fn bus_flags(&self) -> Vec<String> {
        self.backing.bus_flags()
    }

    /// A directory that lives as long as the platform.
    pub fn dir(&self) -> &std::path::Path {
        self.backing.dir()
    }
}

/// The platform of `shape` over the cluster `kubeconfig` reaches (registered as `kube`), with [`test_options`].
pub async fn platform(shape: Shape, kubeconfig: &str) -> Platform {
    platform_with(shape, kubeconfig, test_options()).await
}

/// The scheduler's options in these tests: no balancing rounds, which would relabel the nodes of other tests
/// sharing the cluster.
pub fn test_options() -> Options {
    Options {
        balance: BalanceSettings {
            interval_seconds: 0,
            ..BalanceSettings::default()
        },
        ..Options::default()
    }
}

/// The platform of `shape` with the scheduler started with `options`: each service on a fresh database of the
/// shape's backend, events on the shape's bus.
pub async fn platform_with(shape: Shape, kubeconfig: &str, options: Options) -> Platform {
    let registry = ClusterRegistry::new(vec![ClusterConfig::new("kube", Some(kubeconfig.into()))]).expect("registry");
    platform_of(shape, kubeconfig, options, registry).await
}

/// The platform of `shape` whose scheduler knows a second cluster, `local` (no Kubernetes API: work runs as
/// processes of the service that runs it), besides `kube`, the default.
pub async fn platform_with_local(shape: Shape, kubeconfig: &str) -> Platform {
    let registry = ClusterRegistry::new(vec![
        ClusterConfig::new("kube", Some(kubeconfig.into())),
        ClusterConfig::new("local", None),
    ])
    .expect("registry");
    platform_of(shape, kubeconfig, test_options(), registry).await
}

/// The platform of `shape`, its scheduler started with `options` on the clusters of `registry`.
async fn platform_of(shape: Shape, kubeconfig: &str, options: Options, registry: ClusterRegistry) -> Platform {
    let mut backing = Backing::new(shape);
    let bus = backing.bus();
    let scheduler_db = backing.database("scheduler").await;
    let auth = Auth::start(
        &AuthArgs::embedded(backing.database("auth").await, Some(ADMIN_PASSWORD.into())).expect("flags"),
        bus.clone(),
    )
    .await
    .expect("auth");
    let auth_background = auth.background;
    let auth = start_server(auth.server).await;
    let auth_channel = Channel::remote(&auth.url()).expect("url");
    let (projects_for_scheduler, projects_late) = Channel::late();
    let scheduler = Scheduler::start(
        registry,
        cube_scheduler::Peers {
            auth: auth_channel.clone(),
            projects: projects_for_scheduler,
        },
        &bus,
        options,
        cube_kit::db::connect::<cube_scheduler::model::Migrator>(&scheduler_db, true)
            .await
            .expect("the scheduler's database"),
    )
    .await
    .expect("scheduler");
    let scheduler_keep = (scheduler.feed, scheduler.background);
    let scheduler = start_server(scheduler.server).await;
    let projects = Projects::start(
        &DatabaseArgs {
            database_url: backing.database("projects").await,
            migrate: true,
        },
        cube_projects::Peers {
            auth: auth_channel.clone(),
            scheduler: Channel::remote(&scheduler.url()).expect("url"),
            workloads: Vec::new(),
        },
        bus.clone(),
        Duration::from_secs(2),
    )
    .await
    .expect("projects");
    let projects_background = projects.background;
    let projects = start_server(projects.server).await;
    projects_late.bind(Channel::remote(&projects.url()).expect("url"));
    let watcher = cube_watcher::Watcher::start(
        ClusterRegistry::new(vec![ClusterConfig::new("kube", Some(kubeconfig.into()))]).expect("registry"),
        cube_kit::db::connect::<cube_watcher::store::Migrator>(&backing.database("watcher").await, true)
            .await
            .expect("the watcher's database"),
        bus.clone(),
        cube_watcher::Peers {
            auth: auth_channel,
            projects: Channel::remote(&projects.url()).expect("url"),
        },
        cube_watcher::Options {
            holder: cube_watcher::holder_name().expect("a holder name"),
            lease_duration: Duration::from_secs(5),
            retention: cube_watcher::Retention {
                age: Duration::from_secs(3600),
                count: 1_000_000,
            },
        },
        None,
    )
    .await
    .expect("watcher");
    let watcher_background = watcher.background;
    let watcher = start_server(watcher.server).await;

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
        admin,
        scheduler_db,
        auth,
        watcher,
        bus,
        _keep: (auth_background, scheduler_keep, projects_background, watcher_background),
        backing,
    }
}

/// Creates a project of type ORG as `platform.token`'s user (lena), who becomes its owner.
pub async fn create_project(platform: &Platform, id: &str, settings: Settings, quota: Quota) {
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
