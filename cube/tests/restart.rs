//! Revocations survive a crash: credentials revoked before every process is killed with SIGKILL (logout, a reused
//! refresh token, a deleted API token, a deactivated user, a removed role binding) are refused by auth, projects
//! and the scheduler from the first call after the restart, while a live session keeps working. Run on both
//! shapes we ship: `cube up` (SQLite, in-process bus) and separate `cube serve` processes on PostgreSQL with
//! Redis Streams, whose Redis loses its streams in the crash.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cube_proto::cube::auth::v1::api_token_service_client::ApiTokenServiceClient;
use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::role_binding::Subject;
use cube_proto::cube::auth::v1::role_service_client::RoleServiceClient;
use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
use cube_proto::cube::auth::v1::{
    ApiToken, CreateApiTokenRequest, CreateRoleBindingRequest, CreateUserRequest, DeleteApiTokenRequest,
    DeleteRoleBindingRequest, LoginRequest, LoginResponse, LogoutRequest, RefreshTokenRequest, RoleBinding,
    UpdateUserRequest, User, WhoAmIRequest,
};
use cube_proto::cube::projects::v1::ListProjectsRequest;
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::scheduler::v1::ListClustersRequest;
use cube_proto::cube::scheduler::v1::cluster_service_client::ClusterServiceClient;
use cube_testkit::Backend;
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ADMIN_PASSWORD: &str = "restart test admin password";
const USER_PASSWORD: &str = "a user's long password";

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

/// A loopback port nothing listens on now, so that a process restarted on it is reached at the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cube"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning cube")
}

/// Waits until `address` answers health for `service` with SERVING.
async fn serving(address: &str, service: &str) -> Channel {
    let url = format!("http://{address}");
    cube_testkit::eventually(
        &format!("{service} serving at {address}"),
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
                let reply = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: service.to_owned(),
                    })
                    .await
                    .ok()?;
                (reply.into_inner().status() == ServingStatus::Serving).then_some(channel)
            }
        },
    )
    .await
}

/// Where each service is reached: all through the gateway with `cube up`, each directly when deployed.
struct Endpoints {
    auth: Channel,
    projects: Channel,
    scheduler: Channel,
}

/// The processes of one shape, started again with the same arguments after a kill.
struct Platform {
    /// The arguments of each process, with the address its health is asked at and the service asked.
    processes: Vec<(Vec<String>, String, &'static str)>,
    children: Vec<Child>,
    /// The Redis database of the deployed shape, emptied in a crash as a restarted Redis that kept nothing is.
    redis: Option<String>,
}

/// Empties the Redis database at `url`.
async fn flush(url: &str) {
    let pool = cube_kit::redis::pool(url).expect("a Redis pool");
    let mut connection = pool.get().await.expect("a Redis connection");
    deadpool_redis::redis::cmd("FLUSHDB")
        .query_async::<()>(&mut connection)
        .await
        .expect("FLUSHDB");
}

impl Platform {
    async fn start(processes: Vec<(Vec<String>, String, &'static str)>, redis: Option<String>) -> (Self, Endpoints) {
        if let Some(url) = &redis {
            flush(url).await;
        }
        let mut platform = Self {
            processes,
            children: Vec::new(),
            redis,
        };
        let endpoints = platform.spawn_all().await;
        (platform, endpoints)
    }

    async fn spawn_all(&mut self) -> Endpoints {
        let mut channels = Vec::new();
        for (args, address, service) in &self.processes {
            self.children.push(spawn(args));
            channels.push(serving(address, service).await);
        }
        match channels.as_slice() {
            [gateway] => Endpoints {
                auth: gateway.clone(),
                projects: gateway.clone(),
                scheduler: gateway.clone(),
            },
            [auth, projects, scheduler] => Endpoints {
                auth: auth.clone(),
                projects: projects.clone(),
                scheduler: scheduler.clone(),
            },
            _ => panic!("one gateway or three services"),
        }
    }

    /// Kills every process with SIGKILL, waits for them to die, and starts them again.
    async fn crash_and_restart(&mut self) -> Endpoints {
        for mut child in self.children.drain(..) {
            child.start_kill().expect("SIGKILL");
            let status = child.wait().await.expect("waiting for the killed process");
            assert!(!status.success(), "killed, not stopped: {status:?}");
        }
        // Redis here keeps nothing on disk: the revocation events are gone with it, only auth's database is left.
        if let Some(url) = &self.redis {
            flush(url).await;
        }
        self.spawn_all().await
    }
}

/// `cube up` on a data directory, with its gateway on a fixed port.
async fn embedded(data_dir: &Path) -> (Platform, Endpoints) {
    let gateway = format!("127.0.0.1:{}", free_port());
    let args = [
        "up",
        "--listen",
        &gateway,
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-password",
        ADMIN_PASSWORD,
        "--data-dir",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .chain([data_dir.display().to_string()])
    .collect();
    Platform::start(vec![(args, gateway, "cube.scheduler.v1")], None).await
}

/// Auth, projects and the scheduler as separate processes on their own databases, over Redis Streams.
async fn deployed(databases: [&str; 3], redis: &str, clusters_file: &Path) -> (Platform, Endpoints) {
    let [auth, projects, scheduler] = [free_port(), free_port(), free_port()].map(|port| format!("127.0.0.1:{port}"));
    let common = |service: &str, listen: &str, database: &str| -> Vec<String> {
        [
            "serve",
            service,
            "--listen",
            listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--database-url",
            database,
            "--redis-url",
            redis,
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect()
    };
    let mut auth_args = common("auth", &auth, databases[0]);
    auth_args.extend(["--admin-password".to_owned(), ADMIN_PASSWORD.to_owned()]);
    let mut projects_args = common("projects", &projects, databases[1]);
    projects_args.extend([
        "--auth-url".to_owned(),
        format!("http://{auth}"),
        "--scheduler-url".to_owned(),
        format!("http://{scheduler}"),
    ]);
    let mut scheduler_args = common("scheduler", &scheduler, databases[2]);
    scheduler_args.extend([
        "--auth-url".to_owned(),
        format!("http://{auth}"),
        "--projects-url".to_owned(),
        format!("http://{projects}"),
        "--clusters-file".to_owned(),
        clusters_file.display().to_string(),
    ]);
    Platform::start(
        vec![
            (auth_args, auth, "cube.auth.v1"),
            (projects_args, projects, "cube.projects.v1"),
            (scheduler_args, scheduler, "cube.scheduler.v1"),
        ],
        Some(redis.to_owned()),
    )
    .await
}

async fn login(endpoints: &Endpoints, username: &str, password: &str) -> LoginResponse {
    AuthServiceClient::new(endpoints.auth.clone())
        .login(LoginRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .unwrap_or_else(|status| panic!("{username} logs in: {status:?}"))
        .into_inner()
}

async fn create_user(endpoints: &Endpoints, admin: &str, username: &str) {
    UserServiceClient::new(endpoints.auth.clone())
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: format!("{username}@example.com"),
                    ..User::default()
                }),
                user_id: username.into(),
                password: USER_PASSWORD.into(),
            },
            admin,
        ))
        .await
        .unwrap_or_else(|status| panic!("creating {username}: {status:?}"));
}

/// Revokes credentials in each of the five ways and returns them, each with the way it was revoked.
async fn revoke_in_every_way(endpoints: &Endpoints, admin: &str) -> Vec<(&'static str, String)> {
    let mut auth = AuthServiceClient::new(endpoints.auth.clone());
    let mut revoked = Vec::new();

    let logged_out = login(endpoints, "admin", ADMIN_PASSWORD).await.access_token;
    auth.logout(authed(LogoutRequest {}, &logged_out))
        .await
        .expect("logout");
    revoked.push(("logout", logged_out));

    let first = login(endpoints, "admin", ADMIN_PASSWORD).await;
    let refresh = |token: String| RefreshTokenRequest { refresh_token: token };
    let second = auth
        .refresh_token(refresh(first.refresh_token.clone()))
        .await
        .expect("refreshing")
        .into_inner();
    let reuse = auth
        .refresh_token(refresh(first.refresh_token))
        .await
        .expect_err("a reused refresh token is refused");
    assert_eq!(reuse.code(), Code::Unauthenticated);
    revoked.push(("refresh reuse (first access token)", first.access_token));
    revoked.push(("refresh reuse (refreshed access token)", second.access_token));

    let mut api_tokens = ApiTokenServiceClient::new(endpoints.auth.clone());
    let created = api_tokens
        .create_api_token(authed(
            CreateApiTokenRequest {
                parent: "users/me".into(),
                api_token: Some(ApiToken {
                    display_name: "ci".into(),
                    ..ApiToken::default()
                }),
            },
            admin,
        ))
        .await
        .expect("creating an API token")
        .into_inner();
    let name = created.api_token.expect("the token").name;
    api_tokens
        .delete_api_token(authed(DeleteApiTokenRequest { name }, admin))
        .await
        .expect("deleting the API token");
    revoked.push(("API token deleted", created.secret));

    create_user(endpoints, admin, "dave").await;
    let dave = login(endpoints, "dave", USER_PASSWORD).await.access_token;
    UserServiceClient::new(endpoints.auth.clone())
        .update_user(authed(
            UpdateUserRequest {
                user: Some(User {
                    name: "users/dave".into(),
                    active: false,
                    ..User::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["active".into()],
                }),
            },
            admin,
        ))
        .await
        .expect("deactivating dave");
    revoked.push(("user deactivated", dave));

    create_user(endpoints, admin, "erin").await;
    let mut roles = RoleServiceClient::new(endpoints.auth.clone());
    let binding = roles
        .create_role_binding(authed(
            CreateRoleBindingRequest {
                role_binding: Some(RoleBinding {
                    role: "roles/admin".into(),
                    subject: Some(Subject::User("users/erin".into())),
                    ..RoleBinding::default()
                }),
            },
            admin,
        ))
        .await
        .expect("making erin an admin")
        .into_inner();
    let erin = login(endpoints, "erin", USER_PASSWORD).await.access_token;
    let who = auth
        .who_am_i(authed(WhoAmIRequest {}, &erin))
        .await
        .expect("erin's token works")
        .into_inner();
    assert!(who.roles.contains(&"roles/admin".to_owned()), "{who:?}");
    roles
        .delete_role_binding(authed(DeleteRoleBindingRequest { name: binding.name }, admin))
        .await
        .expect("removing erin's binding");
    revoked.push(("role binding removed", erin));
    revoked
}

/// Calls auth, projects and the scheduler with `token`: their answers, named by service.
async fn call_every_service(endpoints: &Endpoints, token: &str) -> [(&'static str, Result<(), tonic::Status>); 3] {
    let auth = AuthServiceClient::new(endpoints.auth.clone())
        .who_am_i(authed(WhoAmIRequest {}, token))
        .await
        .map(|_| ());
    let projects = ProjectServiceClient::new(endpoints.projects.clone())
        .list_projects(authed(ListProjectsRequest::default(), token))
        .await
        .map(|_| ());
    let scheduler = ClusterServiceClient::new(endpoints.scheduler.clone())
        .list_clusters(authed(ListClustersRequest {}, token))
        .await
        .map(|_| ());
    [("auth", auth), ("projects", projects), ("scheduler", scheduler)]
}

/// The whole story on one shape: revoke, crash, restart, and check every service's first answers.
async fn revocations_survive_a_crash(platform: &mut Platform, endpoints: Endpoints) {
    let admin = login(&endpoints, "admin", ADMIN_PASSWORD).await.access_token;
    let revoked = revoke_in_every_way(&endpoints, &admin).await;
    for (way, token) in &revoked {
        let answer = AuthServiceClient::new(endpoints.auth.clone())
            .who_am_i(authed(WhoAmIRequest {}, token))
            .await;
        assert_eq!(
            answer.map(|_| ()).expect_err(way).code(),
            Code::Unauthenticated,
            "{way}: refused before the crash"
        );
    }

    let endpoints = platform.crash_and_restart().await;
    // The revoked credentials are the first calls every service answers after the restart.
    for (way, token) in &revoked {
        for (service, answer) in call_every_service(&endpoints, token).await {
            match answer {
                Err(status) if status.code() == Code::Unauthenticated => {}
                other => panic!("{way}: {service} answered {other:?} after the restart, not UNAUTHENTICATED"),
            }
        }
    }
    // The session that was never revoked still works everywhere: the refusals above were revocations.
    for (service, answer) in call_every_service(&endpoints, &admin).await {
        answer.unwrap_or_else(|status| panic!("{service} refuses a live session after the restart: {status:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cube_up_refuses_credentials_revoked_before_a_crash() {
    let data = tempfile::tempdir().expect("tempdir");
    let (mut platform, endpoints) = embedded(&data.path().join("state")).await;
    revocations_survive_a_crash(&mut platform, endpoints).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_services_over_redis_refuse_credentials_revoked_before_a_crash() {
    // A Redis database of this test's own, which it empties when it crashes the platform.
    let redis = cube_testkit::with_database(&cube_testkit::require("CUBE_TEST_REDIS_URL"), "11");
    let files = tempfile::tempdir().expect("tempdir");
    let clusters_file = files.path().join("clusters.json");
    std::fs::write(&clusters_file, r#"{"clusters": [{"name": "local", "default": true}]}"#).expect("clusters file");
    cube_testkit::on_fresh_database(Backend::Postgres, |auth_db| async move {
        cube_testkit::on_fresh_database(Backend::Postgres, |projects_db| async move {
            cube_testkit::on_fresh_database(Backend::Postgres, |scheduler_db| async move {
                let (mut platform, endpoints) =
                    deployed([&auth_db, &projects_db, &scheduler_db], &redis, &clusters_file).await;
                revocations_survive_a_crash(&mut platform, endpoints).await;
            })
            .await;
        })
        .await;
    })
    .await;
}
