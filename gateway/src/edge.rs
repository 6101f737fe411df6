//! The split at the gateway's edge: calls from browsers (grpc-web, or anything carrying an `Origin`) go through
//! CORS and the grpc-web translation; plain gRPC calls from SDKs and services skip both.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Response, header};
use tonic::body::Body;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// Sends browser calls to `browser` and plain gRPC calls to `grpc`.
#[derive(Clone, Debug)]
pub(crate) struct Edge<B, G> {
    pub(crate) browser: B,
    pub(crate) grpc: G,
}

/// Whether a request needs the browser path: grpc-web framing, or a cross-origin caller (preflights included).
fn from_browser(request: &Request<Body>) -> bool {
    request.headers().contains_key(header::ORIGIN)
        || request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc-web"))
        || request.version() < http::Version::HTTP_2
}

impl<B, G> Service<Request<Body>> for Edge<B, G>
where
    B: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
    G: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Oneshot<B, Request<Body>>, Oneshot<G, Request<Body>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call readies its own clone of the path it takes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if from_browser(&request) {
            Either::Left(self.browser.clone().oneshot(request))
        } else {
            Either::Right(self.grpc.clone().oneshot(request))
        }
    }
}
