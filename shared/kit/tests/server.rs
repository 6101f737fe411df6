//! The server skeleton on a loopback port: health, reflection, metrics on the admin server, and graceful
//! shutdown (health flips, Watch streams end, calls in flight drain, the grace bounds the wait).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use cube_kit::config::ServerArgs;
use cube_kit::health::Health;
use cube_kit::metrics::RpcMetrics;
use cube_kit::server::ServeError;

const PACKAGE: &str = "cube.probe.v1";

/// A unary method (`/cube.probe.v1.Gate/Pass`) that reports each call it starts and answers only when the test
/// releases it, so a call can be held in flight for as long as a test needs; a call for the service `panic`
/// panics in the handler instead.
#[derive(Clone)]
struct Gate {
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Semaphore>,
}

/// The test's handles on a [`Gate`].
struct GateControl {
    entered: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

fn gate() -> (Gate, GateControl) {
    let (sender, entered) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let gate = Gate {
        entered: sender,
        release: release.clone(),
    };
    (gate, GateControl { entered, release })
}

impl NamedService for Gate {
    const NAME: &'static str = "cube.probe.v1.Gate";
}

impl tower::Service<http::Request<tonic::body::Body>> for Gate {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let gate = self.clone();
        Box::pin(async move {
            let pass = tower::service_fn(move |request: tonic::Request<HealthCheckRequest>| {
                let gate = gate.clone();
                async move {
                    assert_ne!(request.get_ref().service, "panic", "the handler's own bug");
                    let _ = gate.entered.send(());
                    let permit = gate
                        .release
                        .acquire()
                        .await
                        .map_err(|_| tonic::Status::aborted("gate gone"))?;
                    permit.forget();
                    Ok(tonic::Response::new(HealthCheckResponse {
                        status: ServingStatus::Serving.into(),
                    }))
                }
            });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(pass, request).await)
        })
    }
}

/// Calls the gate's one method through `channel`.
async fn pass_gate(channel: Channel) -> Result<HealthCheckResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    grpc.unary(
        tonic::Request::new(HealthCheckRequest::default()),
        http::uri::PathAndQuery::from_static("/cube.probe.v1.Gate/Pass"),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A kit server running on a loopback port.
struct Running {
    address: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connecting to the server")
    }

    async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// Starts shutdown and waits (at most `limit`) for `serve` to return, giving how long that took.
    async fn stop_within(self, limit: Duration) -> Duration {
        let started = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(limit, self.task)
            .await
            .unwrap_or_else(|_| panic!("serve did not return within {limit:?} of shutdown"))
            .expect("the server task")
            .expect("serve returned an error");
        started.elapsed()
    }
}

fn args(shutdown_grace: Duration) -> ServerArgs {
    ServerArgs {
        worker_threads: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(30),
        shutdown_grace,
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binding a loopback port")
}

async fn start(server: cube_kit::Server, shutdown_grace: Duration, metrics: RpcMetrics) -> Running {
    let listener = loopback().await;
    let address = listener.local_addr().expect("local address");
    let health = server.health().clone();
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone().cancelled_owned();
    let task = tokio::spawn(async move { server.serve(listener, &args(shutdown_grace), &metrics, signal).await });
    Running {
        address,
        health,
        shutdown,
        task,
    }
}

fn unregistered_metrics() -> RpcMetrics {
    RpcMetrics::register(&mut Registry::default())
}

/// The admin HTTP server on a loopback port, with a shutdown of its own.
struct Admin {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(registry: Registry, health: Health) -> Self {
        let listener = loopback().await;
        let address = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(cube_kit::admin::serve(listener, Arc::new(registry), health, signal));
        Self {
            address,
            shutdown,
            task,
        }
    }

    async fn get(&self, path: &str) -> (http::StatusCode, String) {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{}{path}", self.address).parse().expect("a valid URI");
        let response = client.get(uri).await.expect("an admin response");
        let status = response.status();
        let body = response.into_body().collect().await.expect("the admin body").to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("a UTF-8 body"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the admin server stopped")
            .expect("the admin task")
            .expect("the admin server");
    }
}

/// Returns the value of the sample `name` whose labels include all of `labels`, from Prometheus text.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let has_all = labels.iter().all(|(key, value)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{key}=\"{value}\""))
        });
        has_all.then(|| value.parse().ok()).flatten()
    })
}

async fn check(health: &mut HealthClient<Channel>, service: &str) -> Result<ServingStatus, tonic::Status> {
    let response = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

#[tokio::test]
async fn health_serves_the_server_and_its_package_and_not_unknown_names() {
    let (gate, _control) = gate();
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate);
    let running = start(server, Duration::from_secs(5), unregistered_metrics()).await;
    let mut health = running.health().await;

    for service in ["", PACKAGE, "cube.probe.v1.Gate"] {
        let status = check(&mut health, service).await.expect("a health answer");
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let err = check(&mut health, "cube.unknown.v1")
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    running.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_health_and_added_services() {
    use tonic_reflection::pb::{v1, v1alpha};

    let (gate, _control) = gate();
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate);
    let running = start(server, Duration::from_secs(5), unregistered_metrics()).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(running.channel().await);
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("a v1 reflection stream")
        .into_inner();
    let response = responses.message().await.expect("a v1 answer").expect("one v1 message");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = response.message_response
    else {
        panic!("v1 answered {response:?} to list_services");
    };
    let v1_names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(running.channel().await);
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("a v1alpha reflection stream")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("a v1alpha answer")
        .expect("one v1alpha message");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1alpha answered {response:?} to list_services");
    };
    let v1alpha_names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();

    for names in [&v1_names, &v1alpha_names] {
        for expected in ["grpc.health.v1.Health", "cube.probe.v1.Gate"] {
            assert!(
                names.iter().any(|name| name == expected),
                "{expected} missing from {names:?}"
            );
        }
    }
    running.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn admin_metrics_count_calls_by_code_and_healthz_follows_health() {
    let mut registry = Registry::with_prefix("cube");
    let metrics = RpcMetrics::register(&mut registry);
    let server = cube_kit::Server::new("probe", PACKAGE);
    let running = start(server, Duration::from_secs(5), metrics).await;
    let admin = Admin::start(registry, running.health.clone()).await;

    let (status, body) = admin.get("/healthz").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");

    let mut health = running.health().await;
    check(&mut health, "").await.expect("an OK call");
    check(&mut health, "cube.unknown.v1")
        .await
        .expect_err("a NOT_FOUND call");

    let check_labels = [("grpc_service", "grpc.health.v1.Health"), ("grpc_method", "Check")];
    let text = cube_testkit::eventually("both calls in /metrics", Duration::from_secs(5), || async {
        let (status, text) = admin.get("/metrics").await;
        assert_eq!(status, http::StatusCode::OK, "{text}");
        let counted = sample(&text, "cube_grpc_server_handling_seconds_count", &check_labels);
        (counted == Some(2.0)).then_some(text)
    })
    .await;
    for code in ["OK", "NOT_FOUND"] {
        let labels = [check_labels[0], check_labels[1], ("grpc_code", code)];
        assert_eq!(
            sample(&text, "cube_grpc_server_handled_total", &labels),
            Some(1.0),
            "{code} calls in:\n{text}"
        );
    }
    assert_eq!(sample(&text, "cube_grpc_server_in_flight", &[]), Some(0.0), "{text}");
    assert!(
        sample(&text, "cube_grpc_server_handling_seconds_sum", &check_labels).is_some_and(|sum| sum > 0.0),
        "{text}"
    );

    // The admin server outlives the gRPC server, and reports it gone.
    running.stop_within(Duration::from_secs(5)).await;
    let (status, body) = admin.get("/healthz").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    admin.stop().await;
}

#[tokio::test]
async fn shutdown_flips_health_ends_watch_streams_and_returns_before_the_grace() {
    let grace = Duration::from_secs(20);
    let running = start(cube_kit::Server::new("probe", PACKAGE), grace, unregistered_metrics()).await;
    let admin = Admin::start(Registry::default(), running.health.clone()).await;
    assert_eq!(admin.get("/healthz").await.0, http::StatusCode::OK);

    let mut health = running.health().await;
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("a Watch stream")
        .into_inner();
    let first = watch.message().await.expect("a first status").expect("an open stream");
    assert_eq!(first.status(), ServingStatus::Serving);

    let started = Instant::now();
    running.shutdown.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status after shutdown")
        .expect("a status, not an error")
        .expect("the stream still open for NOT_SERVING");
    assert_eq!(next.status(), ServingStatus::NotServing);
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the stream ends after NOT_SERVING");
    assert!(
        matches!(end, Ok(None)),
        "expected the stream to end cleanly, got {end:?}"
    );
    assert_eq!(admin.get("/healthz").await.0, http::StatusCode::SERVICE_UNAVAILABLE);

    // The client still holds its end of the finished stream and its connection: serve must not wait for it.
    let stopped = tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .expect("serve returned well before the grace")
        .expect("the server task");
    stopped.expect("serve succeeded");
    assert!(started.elapsed() < grace, "serve waited out the grace");
    drop(watch);
    admin.stop().await;
}

#[tokio::test]
async fn a_call_in_flight_when_shutdown_starts_completes_while_new_connections_are_refused() {
    let (gate, mut control) = gate();
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate);
    let running = start(server, Duration::from_secs(20), unregistered_metrics()).await;

    let call = tokio::spawn(pass_gate(running.channel().await));
    tokio::time::timeout(Duration::from_secs(5), control.entered.recv())
        .await
        .expect("the call reached the handler")
        .expect("the gate is alive");

    running.shutdown.cancel();
    cube_testkit::eventually("health to turn NOT_SERVING", Duration::from_secs(5), || async {
        (running.health.status("") == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    let address = running.address;
    cube_testkit::eventually("new connections to be refused", Duration::from_secs(5), || async move {
        TcpStream::connect(address).await.is_err().then_some(())
    })
    .await;
    assert!(
        !running.task.is_finished(),
        "serve returned with a call still in flight"
    );
    assert!(!call.is_finished(), "the held call ended before it was released");

    control.release.add_permits(1);
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call finished once released")
        .expect("the call task")
        .expect("the call in flight completed despite shutdown");
    assert_eq!(answer.status(), ServingStatus::Serving);
    tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .expect("serve returned once the call drained")
        .expect("the server task")
        .expect("serve succeeded");
}

#[tokio::test]
async fn serve_returns_after_the_grace_when_a_call_never_finishes() {
    let grace = Duration::from_millis(500);
    let (gate, mut control) = gate();
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate);
    let running = start(server, grace, unregistered_metrics()).await;

    let _call = tokio::spawn(pass_gate(running.channel().await));
    tokio::time::timeout(Duration::from_secs(5), control.entered.recv())
        .await
        .expect("the call reached the handler")
        .expect("the gate is alive");

    let took = running.stop_within(grace + Duration::from_secs(5)).await;
    assert!(
        took >= grace,
        "serve returned after {took:?}, before the {grace:?} grace was up"
    );
}

#[tokio::test]
async fn calls_still_running_after_the_grace_are_cut_off() {
    let grace = Duration::from_millis(500);
    let (gate, mut control) = gate();
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate);
    let running = start(server, grace, unregistered_metrics()).await;

    let call = tokio::spawn(pass_gate(running.channel().await));
    tokio::time::timeout(Duration::from_secs(5), control.entered.recv())
        .await
        .expect("the call reached the handler")
        .expect("the gate is alive");
    running.stop_within(grace + Duration::from_secs(5)).await;

    let ended = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call was cut off when serve gave up on it")
        .expect("the call task");
    let err = ended.expect_err("a call cut off by shutdown cannot succeed");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Cancelled | Code::Unknown),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_the_connection_keeps_serving() {
    let server = cube_kit::Server::new("probe", PACKAGE)
        .without_authentication()
        .add_service(gate().0);
    let running = start(server, Duration::from_secs(1), unregistered_metrics()).await;
    let channel = running.channel().await;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    for _ in 0..2 {
        grpc.ready().await.expect("the channel is ready");
        let answer: Result<tonic::Response<HealthCheckResponse>, _> = grpc
            .unary(
                tonic::Request::new(HealthCheckRequest {
                    service: "panic".into(),
                }),
                http::uri::PathAndQuery::from_static("/cube.probe.v1.Gate/Pass"),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        let status = answer.expect_err("the handler panicked");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(status.message(), "internal error", "the panic is logged, not sent");
    }
    let healthy = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("the same connection still serves")
        .into_inner();
    assert_eq!(healthy.status(), ServingStatus::Serving);
    running.stop_within(Duration::from_secs(5)).await;
}
