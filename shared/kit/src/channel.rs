//! The one client channel type every Cube service and the gateway call each other through, over the network
//! or in-process.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
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
    /// Creates a channel to the server at `uri` (e.g. `http://auth:8080`); it connects on first use and
    /// reconnects after failures.
    ///
    /// # Errors
    /// Returns an error when `uri` is not a valid URI.
    pub fn remote(uri: &str) -> Result<Self, tonic::transport::Error> {
        let endpoint = tonic::transport::Endpoint::from_shared(uri.to_owned())?
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        let channel = endpoint.connect_lazy();
        Ok(Self::from_service(channel.map_err(BoxError::from)))
    }

    /// Creates a channel that hands each call straight to `routes`, with no network in between.
    pub fn in_process(routes: tonic::service::Routes) -> Self {
        let routes = routes.prepare();
        Self::from_service(ServiceExt::<Request<Body>>::map_err(routes, |never| match never {}))
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
