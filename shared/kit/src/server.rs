//! The one server skeleton every Cube gRPC server runs on: health, reflection, tracing, metrics, deadlines and
//! a graceful shutdown that flips health to NOT_SERVING before it drains.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use http::Request;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::ApiError;
use crate::config::ServerArgs;
use crate::health::Health;
use crate::identity::Gate;
use crate::metrics::{MethodSet, RpcMetrics, RpcMetricsLayer};

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not read the descriptor set.
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A listener failed.
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
    /// The server has RPCs but nothing to authenticate their callers.
    #[error("server {0} serves RPCs but has no authentication: call Server::authenticate")]
    Unauthenticated(&'static str),
}

/// How a server authenticates the callers of its RPCs.
#[derive(Debug)]
enum Authentication {
    /// Not decided yet: serving RPCs in this state is refused.
    Unset,
    /// Bearer tokens checked by a gate.
    Gate(Gate),
    /// Anyone may call (test servers and benchmarks only).
    Open,
}

/// A gRPC server under construction: its services, plus health and reflection for them.
#[derive(Debug)]
pub struct Server {
    name: &'static str,
    package: String,
    routes: Routes,
    health: Health,
    reflected: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    authentication: Authentication,
}

impl Server {
    /// Starts a server for the Cube service `name` (e.g. `auth`) whose API lives in proto package `package`
    /// (e.g. `cube.auth.v1`); health reports `""` and `package` as serving.
    pub fn new(name: &'static str, package: &str) -> Self {
        let health = Health::new();
        health.set_serving("");
        health.set_serving(package);
        Self {
            name,
            package: package.to_owned(),
            routes: Routes::default(),
            health,
            reflected: Vec::new(),
            descriptor_sets: vec![cube_proto::FILE_DESCRIPTOR_SET],
            authentication: Authentication::Unset,
        }
    }

    /// Verifies the bearer token of every call to the server's RPCs with `gate` (health and reflection stay
    /// open); handlers read the caller with [`crate::Principal::of`].
    pub fn authenticate(mut self, gate: Gate) -> Self {
        self.authentication = Authentication::Gate(gate);
        self
    }

    /// Lets anyone call the server's RPCs; for test servers and benchmarks, never for a Cube service.
    pub fn without_authentication(mut self) -> Self {
        self.authentication = Authentication::Open;
        self
    }

    /// Adds a gRPC service, reports it as serving, and lists it in reflection.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<Request<tonic::body::Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.health.set_serving(S::NAME);
        self.reflected.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Adds the APIs in an encoded `FileDescriptorSet` to what reflection describes and to the methods the
    /// metrics name; Cube's own protos are always described, so only servers of other APIs (tests) need this.
    #[must_use]
    pub fn describe(mut self, descriptor_set: &'static [u8]) -> Self {
        self.descriptor_sets.push(descriptor_set);
        self
    }

    /// Returns the methods the server serves: those of its services, health and reflection.
    pub fn methods(&self) -> MethodSet {
        let mut services = self.reflected.clone();
        services.extend([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]);
        let mut sets = self.descriptor_sets.clone();
        sets.extend([
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]);
        MethodSet::of_services(&services, &sets)
    }

    /// Returns the server's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Returns the proto package of the server's API, e.g. `cube.auth.v1`.
    pub fn package(&self) -> &str {
        &self.package
    }

    /// Returns the server's health registry.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Returns every route of the server (its services, health and reflection), for serving or for calling
    /// in-process.
    ///
    /// # Errors
    /// Returns an error when the reflection service cannot be built from the descriptor sets.
    pub fn into_routes(self) -> Result<Routes, ServeError> {
        let domain = format!("{}.cube.dev", self.name);
        let routes = Routes::from(
            self.routes
                .into_axum_router()
                .layer(axum::middleware::from_fn_with_state(
                    Arc::<str>::from(domain.as_str()),
                    contain_panics,
                )),
        );
        let routes = match self.authentication {
            Authentication::Gate(gate) => gate.guard(routes, &domain),
            Authentication::Open => routes,
            Authentication::Unset if self.reflected.is_empty() => routes,
            Authentication::Unset => return Err(ServeError::Unauthenticated(self.name)),
        };
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for set in &self.descriptor_sets {
            v1 = v1.register_encoded_file_descriptor_set(set);
            v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
        }
        for name in &self.reflected {
            v1 = v1.with_service_name(*name);
            v1alpha = v1alpha.with_service_name(*name);
        }
        Ok(routes
            .add_service(self.health.service())
            .add_service(v1.build_v1()?)
            .add_service(v1alpha.build_v1alpha()?))
    }

    /// Serves the server on `listener` until `shutdown` resolves, then flips health to NOT_SERVING and drains
    /// calls in flight for at most `args.shutdown_grace`.
    ///
    /// # Errors
    /// Returns an error when the server cannot be built or the transport fails.
    pub async fn serve(
        self,
        listener: TcpListener,
        args: &ServerArgs,
        metrics: &RpcMetrics,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let name = self.name;
        let health = self.health.clone();
        let layer = metrics.layer(self.methods());
        let routes = self.into_routes()?;
        serve_routes(name, routes, health, listener, args, layer, shutdown).await
    }
}

/// Answers a call whose handler panicked with INTERNAL, logged, instead of the connection dropping under every
/// call multiplexed on it.
async fn contain_panics(
    axum::extract::State(domain): axum::extract::State<Arc<str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%method, panic = %what, "a handler panicked");
            ApiError::internal(format!("{method} panicked: {what}"))
                .status(&domain)
                .into_http()
        }
    }
}

/// Serves `routes` (HTTP/2 only) with the kit's layers.
///
/// # Errors
/// Returns an error when the transport fails.
async fn serve_routes(
    name: &'static str,
    routes: Routes,
    health: Health,
    listener: TcpListener,
    args: &ServerArgs,
    metrics: RpcMetricsLayer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let (incoming, cut) = incoming(listener);
    let server = tonic::transport::Server::builder()
        .timeout(args.request_timeout)
        .layer(metrics)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, closing(health.clone(), shutdown));
    tracing::info!(server = name, %address, "serving grpc");
    drain(name, &health, server, args.shutdown_grace, cut).await
}

/// Waits for `shutdown`, then closes `health`; the signal handed to `serve_with_incoming_shutdown`.
pub async fn closing(health: Health, shutdown: impl Future<Output = ()> + Send) {
    shutdown.await;
    tracing::info!("shutting down: health is NOT_SERVING, draining calls in flight");
    health.close();
}

/// Runs `server` to completion; once `health` has been closed for `grace`, cuts the connections still open
/// (calls in flight on them fail) and lets the server finish.
///
/// # Errors
/// Returns the server's own error.
pub async fn drain<E>(
    name: &'static str,
    health: &Health,
    server: impl Future<Output = Result<(), E>>,
    grace: Duration,
    cut: CancellationToken,
) -> Result<(), ServeError>
where
    ServeError: From<E>,
{
    let deadline = health.closed();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { deadline.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(server = name, ?grace, "calls still in flight after the shutdown grace, cutting their connections");
            cut.cancel();
            server.await?;
        }
    }
    tracing::info!(server = name, "stopped");
    Ok(())
}

/// Accepts connections from `listener` (with `TCP_NODELAY`) that all fail at once when the returned token is
/// cancelled, so that a shutdown can end calls that outlive their grace.
pub fn incoming(
    listener: TcpListener,
) -> (
    impl futures::Stream<Item = std::io::Result<CuttableStream>> + Send,
    CancellationToken,
) {
    use futures::StreamExt;
    let cut = CancellationToken::new();
    let token = cut.clone();
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |accepted| {
            accepted.map(|stream| CuttableStream {
                stream,
                cut: Box::pin(token.clone().cancelled_owned()),
            })
        });
    (incoming, cut)
}

pin_project_lite::pin_project! {
    /// An accepted TCP connection whose reads and writes fail once its server cuts connections.
    pub struct CuttableStream {
        #[pin]
        stream: TcpStream,
        cut: Pin<Box<WaitForCancellationFutureOwned>>,
    }
}

impl std::fmt::Debug for CuttableStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CuttableStream")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection cut at the end of the shutdown grace",
    )
}

impl AsyncRead for CuttableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if this.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        this.stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        if this.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        this.stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        if this.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        this.stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

impl Connected for CuttableStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
