//! Fixtures for Cube's cross-service tests and benchmarks: the echo service that stands where a Cube service
//! would, and helpers that run servers in this process on loopback ports.

pub mod bench;
pub mod grpc_web;
pub mod platform;
pub mod shape;
pub mod workflow;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use cube_gateway::Gateway;
use cube_kit::config::ServerArgs;
use cube_kit::metrics::RpcMetrics;
use cube_kit::{ApiError, Channel};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

/// The generated echo API (`cube.testing.v1`).
pub mod echo {
    #![allow(missing_docs, unreachable_pub, clippy::all, reason = "generated code")]
    tonic::include_proto!("cube.testing.v1");

    /// The encoded `FileDescriptorSet` of the echo API.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));
}

use echo::echo_service_server::{EchoService, EchoServiceServer};
use echo::{EchoRequest, EchoResponse, EchoStreamRequest};

/// The proto package of the echo API, as the gateway routes it.
pub const ECHO_PACKAGE: &str = "cube.testing.v1";

/// The `ErrorInfo` domain of the echo service's errors.
pub const ECHO_DOMAIN: &str = "echo.cube.dev";

/// The echo service.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

impl Echo {
    async fn answer(request: EchoRequest, metadata: HashMap<String, String>) -> Result<EchoResponse, Status> {
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(request.delay_ms))).await;
        }
        match Code::from_i32(request.fail_code) {
            Code::Ok => Ok(EchoResponse {
                message: request.message,
                payload: request.payload,
                metadata,
            }),
            Code::InvalidArgument => Err(ApiError::invalid(
                "message",
                format!(
                    "{:?} is not accepted: the echo service was asked to refuse it",
                    request.message
                ),
            )
            .status(ECHO_DOMAIN)),
            code => {
                let details = tonic_types::ErrorDetails::with_error_info(
                    "ECHO_FAILURE",
                    ECHO_DOMAIN,
                    HashMap::from([("message".to_owned(), request.message)]),
                );
                Err(<Status as tonic_types::StatusExt>::with_error_details(
                    code,
                    "echo failed as asked",
                    details,
                ))
            }
        }
    }
}

fn seen_metadata(metadata: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    metadata
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.starts_with("x-") || matches!(name, "grpc-timeout" | "traceparent" | "content-type")
        })
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let metadata = seen_metadata(request.metadata());
        Self::answer(request.into_inner(), metadata).await.map(Response::new)
    }

    type EchoStreamStream = ResponseStream;

    async fn echo_stream(
        &self,
        request: Request<EchoStreamRequest>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        let request = request.into_inner();
        let interval = Duration::from_millis(u64::from(request.interval_ms));
        let stream = futures::stream::iter(0..request.count).then(move |index| {
            let message = format!("{} {index}", request.message);
            async move {
                if index > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                Ok(EchoResponse {
                    message,
                    ..EchoResponse::default()
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn collect(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoResponse>, Status> {
        let metadata = seen_metadata(request.metadata());
        let mut stream = request.into_inner();
        let mut messages = Vec::new();
        let mut payload = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            messages.push(item.message);
            payload.extend_from_slice(&item.payload);
        }
        Ok(Response::new(EchoResponse {
            message: messages.join(","),
            payload,
            metadata,
        }))
    }

    type ChatStream = ResponseStream;

    async fn chat(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<Self::ChatStream>, Status> {
        let stream = request
            .into_inner()
            .then(|item| async move { Self::answer(item?, HashMap::new()).await });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A server running in this process on a loopback port; dropping it shuts the server down.
#[derive(Debug)]
pub struct Running {
    /// The address it listens on.
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Returns the server's `http://` URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Shuts the server down and waits until it has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap_or_else(|error| panic!("server task: {error}"));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Returns server flags for tests: loopback, port 0, a 30 s call timeout and a 2 s drain.
pub fn test_server_args() -> ServerArgs {
    ServerArgs {
        worker_threads: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        request_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(2),
    }
}

async fn loopback_listener() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|error| panic!("binding a loopback port: {error}"))
}

/// Starts the echo service behind the kit's server skeleton, open to anyone.
pub async fn start_echo() -> Running {
    start_server(
        cube_kit::Server::new("echo", ECHO_PACKAGE)
            .describe(echo::FILE_DESCRIPTOR_SET)
            .without_authentication()
            .add_service(EchoServiceServer::new(Echo)),
    )
    .await
}

/// Starts the echo service behind `gate`, like any Cube service: only callers with a valid token get through.
pub async fn start_echo_behind(gate: cube_kit::identity::Gate) -> Running {
    start_server(
        cube_kit::Server::new("echo", ECHO_PACKAGE)
            .describe(echo::FILE_DESCRIPTOR_SET)
            .authenticate(gate)
            .add_service(EchoServiceServer::new(Echo)),
    )
    .await
}

/// Serves `server` on a loopback port with [`test_server_args`].
pub async fn start_server(server: cube_kit::Server) -> Running {
    let listener = loopback_listener().await;
    let address = listener
        .local_addr()
        .unwrap_or_else(|error| panic!("local address: {error}"));
    let shutdown = CancellationToken::new();
    let metrics = RpcMetrics::register(&mut prometheus_client::registry::Registry::default());
    let signal = shutdown.clone().cancelled_owned();
    let name = server.name();
    let task = tokio::spawn(async move {
        if let Err(error) = server.serve(listener, &test_server_args(), &metrics, signal).await {
            panic!("{name} server failed: {error}");
        }
    });
    Running {
        address,
        shutdown,
        task: Some(task),
    }
}

/// Returns the echo service's routes, for calling it in-process.
pub fn echo_routes() -> tonic::service::Routes {
    cube_kit::Server::new("echo", ECHO_PACKAGE)
        .describe(echo::FILE_DESCRIPTOR_SET)
        .without_authentication()
        .add_service(EchoServiceServer::new(Echo))
        .into_routes()
        .unwrap_or_else(|error| panic!("echo routes: {error}"))
}

/// Returns a gateway that routes the echo API to `channel`, describes it in reflection, lets the origin
/// `http://web.test` call it, and forwards messages of up to `max_message_bytes`.
pub fn echo_gateway(channel: Channel, max_message_bytes: usize) -> Gateway {
    Gateway::new(max_message_bytes)
        .route(ECHO_PACKAGE, channel)
        .describe(echo::FILE_DESCRIPTOR_SET)
        .allow_origin("http://web.test")
        .unwrap_or_else(|error| panic!("origin: {error}"))
}

/// Starts `gateway` on a loopback port with `args`.
pub async fn start_gateway_with(gateway: Gateway, args: ServerArgs) -> Running {
    let listener = loopback_listener().await;
    let address = listener
        .local_addr()
        .unwrap_or_else(|error| panic!("local address: {error}"));
    let shutdown = CancellationToken::new();
    let metrics = RpcMetrics::register(&mut prometheus_client::registry::Registry::default());
    let signal = shutdown.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(error) = gateway.serve(listener, &args, &metrics, signal).await {
            panic!("gateway failed: {error}");
        }
    });
    Running {
        address,
        shutdown,
        task: Some(task),
    }
}

/// Starts `gateway` on a loopback port with [`test_server_args`].
pub async fn start_gateway(gateway: Gateway) -> Running {
    start_gateway_with(gateway, test_server_args()).await
}

/// Opens a plain gRPC channel to `running`.
pub async fn connect(running: &Running) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(running.url())
        .unwrap_or_else(|error| panic!("endpoint: {error}"))
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connecting to {}: {error}", running.address))
}

/// The fields an INVALID_ARGUMENT status names in its `BadRequest`, in order; panics on any other code.
pub fn bad_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|request| {
            request
                .field_violations
                .iter()
                .map(|violation| violation.field.clone())
                .collect()
        })
        .unwrap_or_default()
}
