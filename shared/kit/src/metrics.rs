//! Per-RPC metrics (calls handled by code, latency, calls in flight) kept in a Prometheus registry that the
//! admin HTTP server exposes at `/metrics`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: String,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// The RPC metrics of one server, named as grpc-prometheus names them so existing dashboards work.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    handled: Family<HandledLabels, Counter>,
    latency: LatencyFamily,
    in_flight: Gauge,
}

impl RpcMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            handled: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20))),
            in_flight: Gauge::default(),
        };
        registry.register(
            "grpc_server_handled",
            "Calls completed, by service, method and gRPC status code",
            metrics.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a call's arrival to its last response byte, by service and method",
            metrics.latency.clone(),
        );
        registry.register(
            "grpc_server_in_flight",
            "Calls being handled now",
            metrics.in_flight.clone(),
        );
        metrics
    }

    /// Returns the tower layer that records every call through it.
    pub fn layer(&self) -> RpcMetricsLayer {
        RpcMetricsLayer {
            metrics: Arc::new(self.clone()),
        }
    }
}

/// Records calls into [`RpcMetrics`].
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a server.
#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let recorder = Recorder::start(self.metrics.clone(), request.uri().path());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut recorder = recorder;
            match future.await {
                Ok(response) => {
                    recorder.code = status_code(response.headers());
                    Ok(response.map(|body| MetricsBody {
                        inner: body,
                        recorder: Some(recorder),
                    }))
                }
                Err(error) => {
                    recorder.finish(Code::Unavailable);
                    Err(error)
                }
            }
        })
    }
}

struct Recorder {
    metrics: Arc<RpcMetrics>,
    service: String,
    method: String,
    start: Instant,
    code: Option<Code>,
}

impl Recorder {
    fn start(metrics: Arc<RpcMetrics>, path: &str) -> Self {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|path| path.split_once('/'))
            .unwrap_or(("unknown", "unknown"));
        metrics.in_flight.inc();
        Self {
            metrics,
            service: service.to_owned(),
            method: method.to_owned(),
            start: Instant::now(),
            code: None,
        }
    }

    fn finish(self, code: Code) {
        let Self {
            metrics,
            service,
            method,
            start,
            ..
        } = self;
        metrics.in_flight.dec();
        // Unknown methods get one label value, so random paths cannot blow up the series count.
        let (service, method) = if code == Code::Unimplemented {
            ("unknown".to_owned(), "unknown".to_owned())
        } else {
            (service, method)
        };
        metrics
            .latency
            .get_or_create(&MethodLabels {
                grpc_service: service.clone(),
                grpc_method: method.clone(),
            })
            .observe(start.elapsed().as_secs_f64());
        metrics
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: service,
                grpc_method: method,
                grpc_code: code_name(code).to_owned(),
            })
            .inc();
    }
}

fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when the status arrives in the trailers, or when it is dropped
    /// before that (the client went away: CANCELLED).
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }

    impl<B> PinnedDrop for MetricsBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(recorder) = this.recorder.take() {
                let code = recorder.code.unwrap_or(Code::Cancelled);
                recorder.finish(code);
            }
        }
    }
}

impl<B: HttpBody> HttpBody for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(recorder) = this.recorder.take()
                {
                    let code = status_code(trailers).or(recorder.code).unwrap_or(Code::Unknown);
                    recorder.finish(code);
                }
            }
            Some(Err(_)) => {
                if let Some(recorder) = this.recorder.take() {
                    recorder.finish(Code::Internal);
                }
            }
            None => {
                if let Some(recorder) = this.recorder.take() {
                    let code = recorder.code.unwrap_or(Code::Unknown);
                    recorder.finish(code);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
