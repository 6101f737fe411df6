//! The RPC metrics cannot be grown by callers: made-up method paths share one label value, while the methods a
//! server serves keep their own; and every answer's error trailers are held to what gRPC clients accept.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::server::NamedService;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use cube_kit::config::ServerArgs;
use cube_kit::error::MAX_STATUS_BYTES;
use cube_kit::metrics::RpcMetrics;

/// How many made-up methods the cardinality test calls.
const MADE_UP_CALLS: usize = 20_000;

/// Stands where a gated Cube service would: every call to any method of `cube.auth.v1.AuthService` is refused
/// with UNAUTHENTICATED before any routing by method, as the token gate does; `/…/Huge` fails with an error far
/// larger than clients accept.
#[derive(Clone)]
struct Refuser;

impl NamedService for Refuser {
    const NAME: &'static str = "cube.auth.v1.AuthService";
}

impl tower::Service<http::Request<tonic::body::Body>> for Refuser {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let huge = request.uri().path().ends_with("/Huge");
        Box::pin(async move {
            if huge {
                let mut details = tonic_types::ErrorDetails::new();
                for index in 0..1000 {
                    details.add_bad_request_violation(format!("labels[\"{index}\"]"), "x".repeat(400));
                }
                let status = <tonic::Status as tonic_types::StatusExt>::with_error_details(
                    Code::InvalidArgument,
                    "y".repeat(50_000),
                    details,
                );
                return Ok(status.into_http());
            }
            Ok(tonic::Status::unauthenticated("this call needs a bearer token").into_http())
        })
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binding a loopback port")
}

fn args() -> ServerArgs {
    ServerArgs {
        worker_threads: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(1),
    }
}

/// The server and its admin server, with `/metrics` readable.
struct Running {
    channel: tonic::transport::Channel,
    admin: SocketAddr,
    shutdown: CancellationToken,
}

impl Running {
    async fn start() -> Self {
        let mut registry = Registry::with_prefix("cube");
        let metrics = RpcMetrics::register(&mut registry);
        let server = cube_kit::Server::new("probe", "cube.auth.v1")
            .without_authentication()
            .add_service(Refuser);
        let health = server.health().clone();
        let listener = loopback().await;
        let address = listener.local_addr().expect("local address");
        let admin_listener = loopback().await;
        let admin = admin_listener.local_addr().expect("admin address");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        tokio::spawn(async move { server.serve(listener, &args(), &metrics, signal).await });
        tokio::spawn(cube_kit::admin::serve(
            admin_listener,
            Arc::new(registry),
            health,
            shutdown.clone().cancelled_owned(),
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connecting to the server");
        Self {
            channel,
            admin,
            shutdown,
        }
    }

    async fn metrics(&self) -> String {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{}/metrics", self.admin).parse().expect("a valid URI");
        let response = client.get(uri).await.expect("an admin response");
        assert_eq!(response.status(), http::StatusCode::OK);
        let body = response.into_body().collect().await.expect("the admin body").to_bytes();
        String::from_utf8(body.to_vec()).expect("a UTF-8 body")
    }

    /// Calls `path` with an empty health request and returns the status.
    async fn call(&self, path: String) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("the channel is ready");
        let path = http::uri::PathAndQuery::try_from(path).expect("a valid path");
        grpc.unary::<_, HealthCheckResponse, _>(
            tonic::Request::new(HealthCheckRequest::default()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("every call to the refuser fails")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The made-up path of call `index`: methods of a served service, of unknown services, and odd shapes.
fn made_up(index: usize) -> String {
    match index % 4 {
        0 => format!("/cube.auth.v1.AuthService/Made{index}"),
        1 => format!("/cube.x{index}.v1.Nothing/Call"),
        2 => format!("/grpc.health.v1.Health/Probe{index}"),
        _ => format!("/n{index}"),
    }
}

#[tokio::test]
async fn made_up_methods_share_one_label_and_metrics_stay_small() {
    let running = Running::start().await;
    // A served method: named in the metrics whatever its code.
    let status = running.call("/cube.auth.v1.AuthService/Login".into()).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    let before = running.metrics().await;

    let started = Instant::now();
    let codes: Vec<Code> = futures::stream::iter(0..MADE_UP_CALLS)
        .map(|index| {
            let running = &running;
            async move { running.call(made_up(index)).await.code() }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        codes
            .iter()
            .all(|code| matches!(code, Code::Unauthenticated | Code::Unimplemented)),
        "unexpected codes"
    );
    let text = cube_testkit::eventually("every made-up call counted", Duration::from_secs(10), || async {
        let text = running.metrics().await;
        let counted: usize = text
            .lines()
            .filter(|line| {
                line.starts_with("cube_grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\"")
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<usize>().ok())
            .sum();
        (counted == MADE_UP_CALLS).then_some(text)
    })
    .await;
    let growth = text.len().saturating_sub(before.len());
    eprintln!(
        "{MADE_UP_CALLS} made-up calls in {:?}: /metrics grew from {} to {} bytes ({growth})",
        started.elapsed(),
        before.len(),
        text.len()
    );
    assert!(growth < 10 * 1024, "/metrics grew by {growth} bytes:\n{text}");
    assert!(
        text.contains(
            r#"cube_grpc_server_handled_total{grpc_service="cube.auth.v1.AuthService",grpc_method="Login",grpc_code="UNAUTHENTICATED"} 1"#
        ),
        "{text}"
    );
    assert!(!text.contains("Made0"), "a made-up method is named:\n{text}");
}

#[tokio::test]
async fn oversized_errors_reach_the_client_shortened() {
    let running = Running::start().await;
    let status = running.call("/cube.auth.v1.AuthService/Huge".into()).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = <tonic::Status as tonic_types::StatusExt>::get_error_details(&status);
    let violations = &details.bad_request().expect("bad request").field_violations;
    assert_eq!(violations[0].field, "labels[\"0\"]");
    assert!(
        violations
            .last()
            .is_some_and(|last| last.description.ends_with("more violations not listed")),
        "{violations:?}"
    );
    let response = status.clone().into_http::<()>();
    let sent: usize = ["grpc-message", "grpc-status-details-bin"]
        .iter()
        .map(|name| response.headers().get(*name).map_or(0, |value| value.len()))
        .sum();
    assert!(sent <= MAX_STATUS_BYTES, "{sent} bytes of message and details");
}
