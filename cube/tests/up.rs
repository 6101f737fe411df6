//! `cube up` as a user runs it: a process that becomes ready, answers health for every service through the
//! gateway, exposes metrics, and exits cleanly on SIGTERM.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::{LoginRequest, WhoAmIRequest};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICES: [&str; 7] = [
    "auth",
    "projects",
    "scheduler",
    "workflow",
    "notebook",
    "serving",
    "watcher",
];

async fn http_get(address: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect admin");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn cube_up_serves_every_service_and_stops_cleanly_on_sigterm() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cube"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir.path().join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cube up");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("cube up prints its address")
        .expect("read stdout")
        .expect("a line");
    let ready_after = started.elapsed();
    eprintln!("cube up was ready after {ready_after:?}: {line}");
    let gateway = line
        .split("gateway listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the gateway address")
        .to_owned();
    let admin = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the admin address")
        .to_owned();
    assert!(data_dir.path().join("state").is_dir(), "the data directory is created");

    let mut health = HealthClient::new(connect(&gateway).await);
    let own = health
        .check(HealthCheckRequest::default())
        .await
        .expect("gateway health");
    assert_eq!(own.into_inner().status(), ServingStatus::Serving);
    for service in SERVICES {
        let name = format!("cube.{service}.v1");
        let reply = health
            .check(HealthCheckRequest { service: name.clone() })
            .await
            .unwrap_or_else(|status| panic!("health of {name}: {status:?}"));
        assert_eq!(reply.into_inner().status(), ServingStatus::Serving, "{name}");
    }

    let metrics = http_get(&admin, "/metrics").await;
    assert!(
        metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cube_grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"} 8"#),
        "{metrics}"
    );
    // It printed how to log in; doing so through the gateway works, and WhoAmI names the admin.
    let mut password = None;
    for _ in 0..3 {
        let line = lines.next_line().await.expect("read stdout").expect("a line");
        if let Some(rest) = line.strip_prefix("created the admin account: username admin, password ") {
            password = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.starts_with("log in: grpcurl") {
            assert!(line.contains("cube.auth.v1.AuthService/Login"), "{line}");
        }
    }
    let password = password.expect("the generated admin password is printed on first start");
    let mut auth = AuthServiceClient::new(connect(&gateway).await);
    let login = auth
        .login(LoginRequest {
            username: "admin".into(),
            password,
        })
        .await
        .expect("logging in through the gateway")
        .into_inner();
    let mut who = tonic::Request::new(WhoAmIRequest {});
    who.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", login.access_token).parse().expect("metadata"),
    );
    let me = auth
        .who_am_i(who)
        .await
        .expect("WhoAmI through the gateway")
        .into_inner();
    assert_eq!(me.user.expect("user").name, "users/admin");
    assert!(me.roles.contains(&"roles/admin".to_owned()), "{:?}", me.roles);
    let anonymous = auth
        .who_am_i(WhoAmIRequest {})
        .await
        .expect_err("WhoAmI without a token");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    describes_auth_by_reflection(&gateway).await;

    let healthz = http_get(&admin, "/healthz").await;
    assert!(healthz.contains("200 OK") && healthz.contains("serving"), "{healthz}");

    terminate(child).await;
}

#[tokio::test]
async fn cube_up_refuses_a_bad_flag_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_cube"))
        .args(["up", "--request-timeout", "soon"])
        .output()
        .await
        .expect("run cube");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected a whole number followed by ms, s, m, h or d"),
        "{stderr}"
    );
}

/// Starts `cube` with `args` and returns it with the gRPC address it logs once listening.
async fn spawn_logged(args: &[&str], message: &str) -> (tokio::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cube"))
        .args(args)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cube");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let address = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            if line.contains(message) {
                let address = line
                    .split(r#""address":""#)
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or_else(|| panic!("no address in {line}"));
                return address.to_owned();
            }
        }
        panic!("cube {args:?} exited before logging {message:?}");
    })
    .await
    .expect("the server logs its address");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, address)
}

/// What grpcurl does before it calls anything: asks the gateway's reflection for the auth API, without a token.
async fn describes_auth_by_reflection(gateway: &str) {
    use futures::StreamExt as _;
    use prost::Message as _;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(connect(gateway).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("cube.auth.v1.AuthService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut responses = client
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .expect("reflection through the gateway")
        .into_inner();
    let listed = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("unexpected reflection response {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for service in [
        "AuthService",
        "UserService",
        "ApiTokenService",
        "RoleService",
        "AuditService",
    ] {
        let name = format!("cube.auth.v1.{service}");
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let file = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::FileDescriptorResponse(files)) = file.message_response else {
        panic!("unexpected reflection response {file:?}");
    };
    let methods: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor"))
        .flat_map(|file| file.service)
        .filter(|service| service.name() == "AuthService")
        .flat_map(|service| service.method)
        .map(|method| method.name().to_owned())
        .collect();
    for method in ["Login", "WhoAmI", "RefreshToken", "Logout", "GetJwks"] {
        assert!(
            methods.iter().any(|name| name == method),
            "{method} missing from {methods:?}"
        );
    }
}

async fn connect(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect to the gateway")
}

/// Sends SIGTERM and expects a clean exit within 5 seconds.
async fn terminate(mut child: tokio::process::Child) {
    let pid = child.id().expect("pid").to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill")
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits within 5 seconds of SIGTERM")
        .expect("wait");
    assert!(status.success(), "exited with {status:?}");
}

#[tokio::test]
async fn cube_serve_runs_services_apart_behind_a_gateway_over_the_network() {
    // The gateway runs single-threaded here, as it would in a one-CPU pod.
    let data_dir = tempfile::tempdir().expect("tempdir");
    let database = format!("sqlite://{}", data_dir.path().join("auth.db").display());
    let (auth, auth_address) = spawn_logged(
        &[
            "serve",
            "auth",
            "--database-url",
            &database,
            "--admin-password",
            "a long enough password",
        ],
        "serving grpc",
    )
    .await;
    let route = format!("cube.auth.v1=http://{auth_address}");
    let (gateway, gateway_address) = spawn_logged(
        &["serve", "gateway", "--worker-threads", "1", "--route", &route],
        "gateway serving grpc and grpc-web",
    )
    .await;

    let mut health = HealthClient::new(connect(&format!("http://{gateway_address}")).await);
    let reply = health
        .check(HealthCheckRequest {
            service: "cube.auth.v1".into(),
        })
        .await
        .expect("auth's health through the gateway");
    assert_eq!(reply.into_inner().status(), ServingStatus::Serving);

    // With auth gone, the gateway answers for it with UNAVAILABLE rather than hanging or failing itself.
    terminate(auth).await;
    let status = health
        .check(HealthCheckRequest {
            service: "cube.auth.v1".into(),
        })
        .await
        .expect_err("auth is stopped");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let own = health
        .check(HealthCheckRequest::default())
        .await
        .expect("gateway health");
    assert_eq!(own.into_inner().status(), ServingStatus::Serving);
    terminate(gateway).await;
}

/// The permission bits of `path`.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A `cube up` process: its gateway address, the stdout lines after "cube is up", and its stderr as it comes.
struct Up {
    child: tokio::process::Child,
    gateway: String,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

/// Starts `cube up` on `data_dir` with `args`, logging at `warn`, and waits for its "cube is up" line.
async fn start_up(data_dir: &std::path::Path, args: &[String]) -> Up {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cube"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-password",
            "a long enough password",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cube up");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    // Drained from the start so the child never blocks on a full pipe; handed back whole once it exits.
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
        .await
        .expect("cube up prints its address")
        .expect("read stdout")
        .unwrap_or_else(|| panic!("cube up exited before it was up"));
    let gateway = line
        .split("gateway listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no gateway address in {line:?}"))
        .to_owned();
    Up {
        child,
        gateway,
        stdout,
        stderr,
    }
}

impl Up {
    /// Reads stdout until a line starting with `prefix`, for at most 10 lines and 10 seconds.
    async fn line_starting(&mut self, prefix: &str) -> String {
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while seen.len() < 10 {
                let Some(line) = self.stdout.next_line().await.expect("read stdout") else {
                    break;
                };
                if line.starts_with(prefix) {
                    return line;
                }
                seen.push(line);
            }
            panic!("no line starting with {prefix:?} in {seen:#?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no line starting with {prefix:?} within 10 s"))
    }

    /// Stops it with SIGTERM and returns what it wrote to stderr.
    async fn stop(self) -> String {
        terminate(self.child).await;
        self.stderr.await.expect("stderr reader")
    }
}

#[tokio::test]
async fn cube_up_help_lists_the_ldap_and_token_lifetime_flags_without_secrets() {
    let output = Command::new(env!("CARGO_BIN_EXE_cube"))
        .args(["up", "--help"])
        .env("AUTH_LDAP_BIND_PASSWORD", "hunter2-in-the-environment")
        .output()
        .await
        .expect("run cube up --help");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "LDAP login:",
        "--ldap-server <SERVER>",
        "AUTH_LDAP_SERVER",
        "--ldap-use-tls",
        "--ldap-tls-cacertfile",
        "--ldap-bind-user",
        "--ldap-bind-password",
        "AUTH_LDAP_BIND_PASSWORD",
        "--ldap-search <SEARCH>",
        "--ldap-username-format",
        "--ldap-group-search <GROUP_SEARCH>",
        "--ldap-roles-mapping",
        "AUTH_ROLES_MAPPING",
        "--ldap-timeout",
        "--access-token-ttl <ACCESS_TOKEN_TTL>",
        "CUBE_ACCESS_TOKEN_TTL",
        "[default: 15m]",
        "--session-ttl <SESSION_TTL>",
        "CUBE_SESSION_TTL",
        "[default: 168h]",
    ] {
        assert!(help.contains(expected), "`cube up --help` lacks {expected:?}:\n{help}");
    }
    assert!(!help.contains("hunter2"), "the help shows the bind password:\n{help}");
}

#[tokio::test]
async fn cube_up_keeps_its_data_dir_private_and_says_when_ldap_is_on() {
    let base = cube_testkit::require("CUBE_TEST_LDAP_BASE_DN");
    let bind_password = cube_testkit::require("CUBE_TEST_LDAP_ADMIN_PASSWORD");
    let root = tempfile::tempdir().expect("tempdir");
    let data_dir = root.path().join("state");
    let databases = ["auth.db", "projects.db", "scheduler.db"];

    // A first start creates the data directory 0700 and every database file, with its WAL companions, 0600.
    let up = start_up(&data_dir, &[]).await;
    assert_eq!(mode(&data_dir), 0o700, "the data directory");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&data_dir).expect("list the data directory") {
        files.push(entry.expect("an entry").path());
    }
    for database in databases {
        assert!(
            files.contains(&data_dir.join(database)),
            "{database} missing from {files:?}"
        );
    }
    // The local runtime's workloads (their logs may hold secrets) are the owner's alone too.
    for file in &files {
        let private = if file.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(file), private, "{}", file.display());
    }
    let stderr = up.stop().await;
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in logs that go to a pipe:\n{stderr}"
    );

    // As an older Cube left them: readable by everyone. The next start tightens both and says so; with LDAP flags
    // it says LDAP login is on, naming the server and never the service account's password.
    std::fs::set_permissions(&data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(
        data_dir.join("auth.db"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let server = cube_testkit::require("CUBE_TEST_LDAP_URL");
    let ldap = [
        "--ldap-server".to_owned(),
        server.clone(),
        "--ldap-bind-user".into(),
        cube_testkit::require("CUBE_TEST_LDAP_ADMIN_DN"),
        "--ldap-bind-password".into(),
        bind_password.clone(),
        "--ldap-search".into(),
        format!("ou=people,{base}"),
        "--ldap-group-search".into(),
        format!("ou=groups,{base}"),
        "--access-token-ttl".into(),
        "2m".into(),
        "--session-ttl".into(),
        "1h".into(),
    ];
    let mut up = start_up(&data_dir, &ldap).await;
    let line = up.line_starting("LDAP login is on").await;
    assert!(line.contains(&format!("server {server}")), "{line}");
    assert!(line.contains(&format!("search under ou=people,{base}")), "{line}");
    assert!(!line.contains(&bind_password), "{line}");
    assert_eq!(mode(&data_dir), 0o700, "the data directory is tightened");
    assert_eq!(mode(&data_dir.join("auth.db")), 0o600, "auth.db is tightened");

    // LDAP login works through the gateway, and tokens live as long as the flags say.
    let mut auth = AuthServiceClient::new(connect(&up.gateway).await);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let login = auth
        .login(LoginRequest {
            username: "alice".into(),
            password: cube_testkit::require("CUBE_TEST_LDAP_ALICE_PASSWORD"),
        })
        .await
        .expect("alice logs in through LDAP")
        .into_inner();
    let lifetime = |time: Option<prost_types::Timestamp>| {
        let seconds = time.expect("an expiry").seconds;
        u64::try_from(seconds).expect("after 1970").saturating_sub(before)
    };
    let access = lifetime(login.access_token_expire_time);
    assert!((110..=130).contains(&access), "access token lives {access} s, not 2m");
    let session = lifetime(login.refresh_token_expire_time);
    assert!((3590..=3610).contains(&session), "session lives {session} s, not 1h");

    let stderr = up.stop().await;
    assert!(
        !stderr.contains(&bind_password),
        "the bind password is logged:\n{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in logs that go to a pipe:\n{stderr}"
    );
    for tightened in [data_dir.clone(), data_dir.join("auth.db")] {
        let path = tightened.display().to_string();
        assert!(
            stderr
                .lines()
                .any(|line| line.contains("tightened the permissions") && line.contains(&path)),
            "no warning about tightening {path}:\n{stderr}"
        );
    }
}

/// `message` with `token` as its bearer.
fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
    request
}

/// Every state a grpc-web `WatchRun` of `run` through `gateway` sees, until the run finishes.
async fn watch_run_over_grpc_web(
    gateway: std::net::SocketAddr,
    token: &str,
    run: &str,
) -> Vec<cube_proto::cube::workflow::v1::Run> {
    use cube_integration_tests::grpc_web::{GrpcWebClient, Http, frame};
    use prost::Message as _;
    let mut web = GrpcWebClient::connect(gateway, Http::One).await.expect("connecting");
    let bearer = format!("Bearer {token}");
    let mut stream = web
        .open(
            "/cube.workflow.v1.RunService/WatchRun",
            frame(&cube_proto::cube::workflow::v1::WatchRunRequest { name: run.to_owned() }),
            &[("authorization", &bearer)],
        )
        .await
        .expect("watching");
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = stream.message().await.expect("reading the watch") {
            seen.push(cube_proto::cube::workflow::v1::Run::decode(message).expect("a run"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the run did not finish: {:#?}", seen.last()));
    assert_eq!(stream.status().code(), tonic::Code::Ok, "{:?}", stream.status());
    seen
}

#[tokio::test]
async fn cube_up_runs_a_pipeline_of_local_processes_through_the_gateway() {
    use cube_proto::cube::auth::v1::user_service_client::UserServiceClient;
    use cube_proto::cube::auth::v1::{CreateUserRequest, User};
    use cube_proto::cube::workflow::v1::job_template_service_client::JobTemplateServiceClient;
    use cube_proto::cube::workflow::v1::pipeline_service_client::PipelineServiceClient;
    use cube_proto::cube::workflow::v1::run_service_client::RunServiceClient;
    use cube_proto::cube::workflow::v1::{
        CreateJobTemplateRequest, CreatePipelineRequest, CreateRunRequest, GetTaskLogsRequest, JobTemplate, Pipeline,
        RunState, Task, TemplateVersion,
    };
    let root = tempfile::tempdir().expect("tempdir");
    let up = start_up(&root.path().join("state"), &[]).await;
    let gateway = connect(&up.gateway).await;
    let admin = AuthServiceClient::new(gateway.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password: "a long enough password".into(),
        })
        .await
        .expect("login")
        .into_inner()
        .access_token;
    // A data scientist: every new user joins `public` as a developer.
    UserServiceClient::new(gateway.clone())
        .create_user(bearer(
            CreateUserRequest {
                user: Some(User {
                    email: "lena@example.com".into(),
                    ..User::default()
                }),
                user_id: "lena".into(),
                password: "lena's long password".into(),
            },
            &admin,
        ))
        .await
        .expect("creating a user");
    let token = AuthServiceClient::new(gateway.clone())
        .login(LoginRequest {
            username: "lena".into(),
            password: "lena's long password".into(),
        })
        .await
        .expect("login")
        .into_inner()
        .access_token;
    JobTemplateServiceClient::new(gateway.clone())
        .create_job_template(bearer(
            CreateJobTemplateRequest {
                job_template_id: "shell".into(),
                job_template: Some(JobTemplate {
                    image: "debian:12".into(),
                    version: TemplateVersion::Release as i32,
                    ..JobTemplate::default()
                }),
            },
            &token,
        ))
        .await
        .expect("creating a template");
    let task = |name: &str, command: &str, upstream: &[&str]| Task {
        name: name.into(),
        template: "jobTemplates/shell".into(),
        command: command.into(),
        upstream: upstream.iter().map(|name| (*name).to_owned()).collect(),
        ..Task::default()
    };
    let pipeline = PipelineServiceClient::new(gateway.clone())
        .create_pipeline(bearer(
            CreatePipelineRequest {
                parent: "projects/public".into(),
                pipeline_id: "hello".into(),
                pipeline: Some(Pipeline {
                    tasks: vec![
                        task("prepare", "echo \"preparing $KFJ_RUN_ID\"\nsleep 1", &[]),
                        task(
                            "train",
                            "echo \"training in $KFJ_TASK_NAME as $K8S_POD_NAME\"\nsleep 1",
                            &["prepare"],
                        ),
                    ],
                    ..Pipeline::default()
                }),
            },
            &token,
        ))
        .await
        .expect("creating a pipeline")
        .into_inner();
    let run = RunServiceClient::new(gateway.clone())
        .create_run(bearer(
            CreateRunRequest {
                parent: pipeline.name.clone(),
                request_id: String::new(),
            },
            &token,
        ))
        .await
        .expect("running the pipeline")
        .into_inner();
    let address = up
        .gateway
        .trim_start_matches("http://")
        .parse()
        .expect("the gateway's address");
    let seen = watch_run_over_grpc_web(address, &token, &run.name).await;
    let finished = seen.last().expect("the watch saw the run");
    assert_eq!(finished.state(), RunState::Succeeded, "{finished:#?}");
    // Each task was seen running, then done, the second only after the first.
    let order: Vec<(String, RunState)> = seen
        .iter()
        .flat_map(|run| run.tasks.iter().map(|task| (task.name.clone(), task.state())))
        .fold(Vec::new(), |mut order, change| {
            if !order.contains(&change) && change.1 != RunState::Pending {
                order.push(change);
            }
            order
        });
    assert_eq!(
        order,
        [
            ("prepare".to_owned(), RunState::Running),
            ("prepare".to_owned(), RunState::Succeeded),
            ("train".to_owned(), RunState::Running),
            ("train".to_owned(), RunState::Succeeded),
        ]
    );
    let mut logs = RunServiceClient::new(gateway)
        .get_task_logs(bearer(
            GetTaskLogsRequest {
                run: run.name.clone(),
                task: "train".into(),
                attempt: 0,
                follow: true,
            },
            &token,
        ))
        .await
        .expect("reading the log")
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await.expect("a log chunk") {
        text.extend(chunk.data);
    }
    let pod = &finished.tasks[1].attempts[0].pod;
    assert_eq!(String::from_utf8_lossy(&text), format!("training in train as {pod}\n"));
    let stderr = up.stop().await;
    assert!(!stderr.contains("ERROR"), "{stderr}");
}
