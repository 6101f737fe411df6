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
        stderr.contains("expected a whole number followed by ms, s, m or h"),
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
