//! The one client channel type every Cube service and the gateway call each other through, over the network
//! or in-process.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tonic::body::Body;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::error::BoxError;

/// A gRPC channel: generated clients (`FooClient::new(channel)`) and the gateway's proxy both use it.
///
/// [`Channel::remote`] speaks HTTP/2 to another process; [`Channel::in_process`] calls a server's routes
/// directly, as `cube up` wires its services. Both carry the caller's trace context in `traceparent`.
#[derive(Clone)]
pub struct Channel {
    inner: BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

impl Channel {
    /// Creates a channel to the server at `uri` (e.g. `http://auth:8080`) over HTTP/2; it connects on first use,
    /// multiplexes calls on one connection and reconnects after failures. Encryption between services is the
    /// mesh's job (Istio mTLS), so only `http://` is accepted.
    ///
    /// # Errors
    /// Returns an error when `uri` is not an `http://host:port` URI.
    pub fn remote(uri: &str) -> Result<Self, InvalidUri> {
        let invalid = || InvalidUri(uri.to_owned());
        let parsed: Uri = uri.parse().map_err(|_| invalid())?;
        if parsed.scheme() != Some(&Scheme::HTTP) {
            return Err(invalid());
        }
        let authority = parsed.authority().cloned().ok_or_else(invalid)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(2 << 20)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
            .build(connector);
        let service = tower::service_fn(move |mut request: Request<Body>| {
            let client = client.clone();
            let origin = authority.clone();
            let target = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority.clone())
                .path_and_query(request.uri().path_and_query().map_or("/", |p| p.as_str()))
                .build();
            async move {
                *request.uri_mut() = target?;
                *request.version_mut() = http::Version::HTTP_2;
                // As a Status, the failure reaches generated clients as UNAVAILABLE rather than UNKNOWN.
                let response = client.request(request).await.map_err(|error| {
                    Box::new(tonic::Status::unavailable(format!("calling {origin}: {error}"))) as BoxError
                })?;
                Ok::<_, BoxError>(response.map(Body::new))
            }
        });
        Ok(Self::from_service(service))
    }

    /// Creates a channel that hands each call straight to `routes`, with no network in between.
    pub fn in_process(routes: tonic::service::Routes) -> Self {
        let routes = routes.prepare();
        Self::from_service(ServiceExt::<Request<Body>>::map_err(routes, |never| match never {}))
    }

    /// Creates a channel whose target is given later through the returned [`LateRoutes`]: for services that call each
    /// other in one process (`cube up`), where each needs the other's channel before the other is built. Calls
    /// before the routes are bound fail with UNAVAILABLE.
    pub fn late() -> (Self, LateRoutes) {
        let slot: Arc<OnceLock<Channel>> = Arc::new(OnceLock::new());
        let target = Arc::clone(&slot);
        let service = tower::service_fn(move |request: Request<Body>| {
            let channel = target.get().cloned();
            async move {
                match channel {
                    Some(mut channel) => channel.call(request).await,
                    None => Err(Box::new(tonic::Status::unavailable("the service is still starting")) as BoxError),
                }
            }
        });
        (Self::from_service(service), LateRoutes(slot))
    }

    fn from_service<S>(service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        let service = service.map_request(|mut request: Request<Body>| {
            crate::telemetry::inject_current_trace(request.headers_mut());
            request
        });
        Self {
            inner: BoxCloneSyncService::new(service),
        }
    }
}

/// Binds the routes of a [`Channel::late`] channel.
#[derive(Debug)]
pub struct LateRoutes(Arc<OnceLock<Channel>>);

impl LateRoutes {
    /// Sends the channel's calls through `channel` from now on; binding twice keeps the first.
    pub fn bind(&self, channel: Channel) {
        let _ = self.0.set(channel);
    }
}

/// A channel URI that is not `http://host:port`.
#[derive(Debug, thiserror::Error)]
#[error("invalid service URL {0:?}: expected http://HOST:PORT")]
pub struct InvalidUri(String);

impl Service<Request<Body>> for Channel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.inner.call(request)
    }
}
