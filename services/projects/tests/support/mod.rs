//! Starts real auth, scheduler and projects servers on loopback, projects on the database under test, and
//! gives tests clients and users.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses its own part of the harness"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cube_auth::{Auth, AuthArgs};
use cube_bus::{BusOptions, EventBus, MemoryBus};
use cube_kit::Channel;
use cube_kit::config::{DatabaseArgs, ServerArgs};
use cube_kit::metrics::RpcMetrics;
use cube_projects::{Peers, Projects};
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{CreateUserRequest, LoginRequest, User};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_scheduler::{ClusterConfig, ClusterRegistry, Scheduler};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel as Connection;

/// The admin password of every harness.
pub const ADMIN_PASSWORD: &str = "projects test admin password";

/// A server running on loopback until dropped.
pub struct Running {
    pub address: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves `server` on a loopback port.
pub async fn serve(server: cube_kit::Server) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let address = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone().cancelled_owned();
    let args = ServerArgs {
        worker_threads: None,
        listen: address,
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
    };
    let metrics = RpcMetrics::register(&mut prometheus_client::registry::Registry::default());
    tokio::spawn(async move {
        if let Err(error) = server.serve(listener, &args, &metrics, signal).await {
            panic!("server failed: {error}");
        }
    });
    Running { address, shutdown }
}

/// The clusters the test scheduler knows: `dev` (the default) and `gpu`.
pub fn registry() -> ClusterRegistry {
    let cluster = |name: &str, default: bool| ClusterConfig {
        default,
        ..ClusterConfig::new(name, None)
    };
    ClusterRegistry::new(vec![cluster("dev", true), cluster("gpu", false)]).expect("registry")
}

/// Auth, the scheduler and projects, running.
pub struct Platform {
    pub auth: Running,
    pub scheduler: Running,
    pub projects: Running,
    pub bus: Arc<dyn EventBus>,
    pub connection: Connection,
    pub auth_connection: Connection,
    _auth_background: Option<cube_auth::Background>,
    _scheduler_feed: Option<cube_kit::identity::RevocationFeed>,
    _projects_background: cube_projects::Background,
    _auth_data: Option<tempfile_dir::Dir>,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Starts the platform with projects on the database at `url`, on an in-process bus.
pub async fn start(url: &str) -> Platform {
    start_with(
        url,
        Arc::new(MemoryBus::new(BusOptions::default())),
        Vec::new(),
        Duration::from_secs(2),
    )
    .await
}

/// Starts the platform with projects on `url`, events on `bus`, the given workload services, and the given
/// membership cache lifetime.
pub async fn start_with(
    url: &str,
    bus: Arc<dyn EventBus>,
    workloads: Vec<(String, Channel)>,
    membership_ttl: Duration,
) -> Platform {
    start_full(url, bus, workloads, membership_ttl, &[]).await
}

#[derive(clap::Parser)]
struct LdapFlags {
    #[command(flatten)]
    ldap: cube_auth::ldap::LdapArgs,
}

/// Like [`start_with`], with auth logging users in through LDAP configured by `ldap_flags` (none: no LDAP).
pub async fn start_full(
    url: &str,
    bus: Arc<dyn EventBus>,
    workloads: Vec<(String, Channel)>,
    membership_ttl: Duration,
    ldap_flags: &[String],
) -> Platform {
    let dir = std::env::temp_dir().join(format!("cube-projects-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut auth_args = AuthArgs::embedded(
        format!("sqlite://{}", dir.join("auth.db").display()),
        Some(ADMIN_PASSWORD.into()),
    )
    .expect("auth flags");
    let flags = std::iter::once("auth".to_owned()).chain(ldap_flags.iter().cloned());
    auth_args.ldap = <LdapFlags as clap::Parser>::try_parse_from(flags)
        .expect("LDAP flags")
        .ldap;
    let auth = Auth::start(&auth_args, bus.clone()).await.expect("starting auth");
    let auth_background = auth.background;
    let auth_running = serve(auth.server).await;
    let auth_channel = Channel::remote(&format!("http://{}", auth_running.address)).expect("auth url");
    // The scheduler reads projects (settings, quotas, memberships) from the projects server started below.
    let (projects_for_scheduler, projects_late) = Channel::late();
    let scheduler = Scheduler::start(
        registry(),
        cube_scheduler::Peers {
            auth: auth_channel.clone(),
            projects: projects_for_scheduler,
        },
        &bus,
        cube_scheduler::Options::default(),
        cube_kit::db::connect::<cube_scheduler::model::Migrator>("sqlite::memory:", true)
            .await
            .expect("the scheduler's database"),
    )
    .await
    .expect("scheduler");
    let scheduler_feed = scheduler.feed;
    let scheduler_running = serve(scheduler.server).await;
    let projects = Projects::start(
        &DatabaseArgs {
            database_url: url.to_owned(),
            migrate: true,
        },
        Peers {
            auth: auth_channel,
            scheduler: Channel::remote(&format!("http://{}", scheduler_running.address)).expect("url"),
            workloads,
        },
        bus.clone(),
        membership_ttl,
    )
    .await
    .expect("starting projects");
    let projects_background = projects.background;
    let projects_running = serve(projects.server).await;
    projects_late.bind(Channel::remote(&format!("http://{}", projects_running.address)).expect("url"));
    let connect = |address: SocketAddr| async move {
        Connection::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .expect("connecting")
    };
    Platform {
        connection: connect(projects_running.address).await,
        auth_connection: connect(auth_running.address).await,
        auth: auth_running,
        scheduler: scheduler_running,
        projects: projects_running,
        bus,
        _auth_background: Some(auth_background),
        _scheduler_feed: Some(scheduler_feed),
        _projects_background: projects_background,
        _auth_data: Some(tempfile_dir::Dir(dir)),
    }
}

/// Wraps `message` with `token` as its bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

impl Platform {
    /// A projects client.
    pub fn projects(&self) -> ProjectServiceClient<Connection> {
        ProjectServiceClient::new(self.connection.clone())
    }

    /// Logs in and returns the access token.
    pub async fn login(&self, username: &str, password: &str) -> String {
        AuthServiceClient::new(self.auth_connection.clone())
            .login(LoginRequest {
                username: username.into(),
                password: password.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("logging in as {username}: {status:?}"))
            .into_inner()
            .access_token
    }

    /// The admin's access token.
    pub async fn admin(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    /// Creates a user (as admin) and returns their access token.
    pub async fn user(&self, admin: &str, username: &str) -> String {
        let password = format!("{username} long password");
        UserServiceClient::new(self.auth_connection.clone())
            .create_user(authed(
                CreateUserRequest {
                    user: Some(User {
                        email: format!("{username}@example.com"),
                        ..User::default()
                    }),
                    user_id: username.into(),
                    password: password.clone(),
                },
                admin,
            ))
            .await
            .unwrap_or_else(|status| panic!("creating {username}: {status:?}"));
        self.login(username, &password).await
    }
}

/// Asserts that `result` failed with `code`, and returns the status.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> tonic::Status {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status
        }
    }
}

/// A second projects replica on the same database, bus, auth and scheduler as `platform`.
pub async fn replica(platform: &Platform, url: &str, membership_ttl: Duration) -> Platform {
    let auth = Channel::remote(&format!("http://{}", platform.auth.address)).expect("url");
    let projects = Projects::start(
        &DatabaseArgs {
            database_url: url.to_owned(),
            migrate: true,
        },
        Peers {
            auth,
            scheduler: Channel::remote(&format!("http://{}", platform.scheduler.address)).expect("url"),
            workloads: Vec::new(),
        },
        platform.bus.clone(),
        membership_ttl,
    )
    .await
    .expect("starting a replica");
    let running = serve(projects.server).await;
    let connection = Connection::from_shared(format!("http://{}", running.address))
        .expect("uri")
        .connect()
        .await
        .expect("connecting");
    Platform {
        connection,
        auth_connection: platform.auth_connection.clone(),
        auth: Running {
            address: platform.auth.address,
            shutdown: CancellationToken::new(),
        },
        scheduler: Running {
            address: platform.scheduler.address,
            shutdown: CancellationToken::new(),
        },
        projects: running,
        bus: platform.bus.clone(),
        _auth_background: None,
        _scheduler_feed: None,
        _projects_background: projects.background,
        _auth_data: None,
    }
}
