//! Observing every call a server handles: a tracing span that continues the caller's W3C trace, and per-RPC
//! metrics (calls handled by code, latency, calls in flight) kept in a Prometheus registry that the admin HTTP
//! server exposes at `/metrics`. One layer does both, with one body wrapper, because it runs on every call.
//!
//! The same layer holds every answer's error message and details to what gRPC clients accept
//! ([`crate::error::fit_status_headers`]), since its body wrapper sees the trailers anyway.
//!
//! Calls are labelled by method only for the methods the server serves (a [`MethodSet`]); every other path, made
//! up by a client or a scanner, is counted under the one label value `unknown`, so that no caller can add series.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
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
use tracing::Instrument;

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
    /// The series of each method path seen, so that a call finds its counters without building label sets.
    methods: Arc<RwLock<HashMap<String, Arc<MethodSeries>>>>,
}

/// The series of one method: its latency histogram and, once used, a counter per status code.
#[derive(Debug)]
struct MethodSeries {
    labels: MethodLabels,
    latency: Histogram,
    handled: [OnceLock<Counter>; 17],
}

impl RpcMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            handled: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20))),
            in_flight: Gauge::default(),
            methods: Arc::default(),
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

    /// Returns the series of the method at `path` (`/package.Service/Method`), creating it on first use.
    fn series(&self, path: &str) -> Arc<MethodSeries> {
        if let Some(series) = self.methods.read().ok().and_then(|methods| methods.get(path).cloned()) {
            return series;
        }
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|path| path.split_once('/'))
            .unwrap_or(("unknown", "unknown"));
        // Only served methods and `UNKNOWN_PATH` get here, so the map and the label sets stay bounded.
        let labels = MethodLabels {
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
        };
        let series = Arc::new(MethodSeries {
            latency: self.latency.get_or_create(&labels).clone(),
            labels,
            handled: Default::default(),
        });
        if let Ok(mut methods) = self.methods.write() {
            methods.insert(path.to_owned(), series.clone());
        }
        series
    }

    fn record(&self, path: &str, code: Code, elapsed: std::time::Duration) {
        let series = self.series(path);
        series.latency.observe(elapsed.as_secs_f64());
        let counter = series.handled[code as usize].get_or_init(|| {
            self.handled
                .get_or_create(&HandledLabels {
                    grpc_service: series.labels.grpc_service.clone(),
                    grpc_method: series.labels.grpc_method.clone(),
                    grpc_code: code_name(code).to_owned(),
                })
                .clone()
        });
        counter.inc();
    }

    /// Returns the tower layer that traces and records every call through it, naming the methods in `methods`
    /// and counting calls to any other path as `unknown`.
    pub fn layer(&self, methods: MethodSet) -> RpcMetricsLayer {
        RpcMetricsLayer {
            metrics: Arc::new(self.clone()),
            methods,
        }
    }
}

/// The label values of calls to paths a server does not serve.
const UNKNOWN_PATH: &str = "/unknown/unknown";

/// The method paths (`/package.Service/Method`) a server serves: the only ones its metrics name.
#[derive(Clone, Debug, Default)]
pub struct MethodSet(Arc<HashSet<String>>);

impl MethodSet {
    /// Builds the set of `paths`.
    pub fn new(paths: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new(paths.into_iter().collect()))
    }

    /// Builds the set of the methods of `services` (full names, e.g. `cube.auth.v1.AuthService`) declared in the
    /// encoded `FileDescriptorSet`s `sets`. A service found in none of them is logged, and its calls counted as
    /// `unknown`.
    pub fn of_services(services: &[&str], sets: &[&[u8]]) -> Self {
        let mut paths = HashSet::new();
        let mut described = HashSet::new();
        for set in sets {
            let methods = match cube_proto::methods::methods(set) {
                Ok(methods) => methods,
                Err(error) => {
                    tracing::warn!(%error, "a descriptor set does not decode; its methods are counted as unknown");
                    continue;
                }
            };
            for method in methods {
                if services.contains(&method.service.as_str()) {
                    described.insert(method.service);
                    paths.insert(method.path);
                }
            }
        }
        for service in services {
            if !described.contains(*service) {
                tracing::warn!(%service, "no descriptor describes the service; its calls are counted as unknown");
            }
        }
        Self(Arc::new(paths))
    }

    /// Returns whether the set holds `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.0.contains(path)
    }

    /// Returns the paths in the set.
    pub fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.0.iter().cloned()
    }

    /// Returns the number of methods in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Returns whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Records calls into [`RpcMetrics`].
#[derive(Clone, Debug)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
    methods: MethodSet,
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
            methods: self.methods.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around a server.
#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
    methods: MethodSet,
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
        let path = request.uri().path();
        let span = tracing::info_span!("rpc", rpc.method = %path, otel.kind = "server");
        if !span.is_disabled() && request.headers().contains_key("traceparent") {
            crate::telemetry::continue_trace(&span, request.headers());
        }
        let known = self.methods.contains(path);
        let recorder = Recorder::start(self.metrics.clone(), request.uri(), known);
        let future = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let mut recorder = recorder;
            match future.await {
                Ok(mut response) => {
                    crate::error::fit_status_headers(response.headers_mut());
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
    path: Option<http::uri::PathAndQuery>,
    start: Instant,
    code: Option<Code>,
}

impl Recorder {
    fn start(metrics: Arc<RpcMetrics>, uri: &http::Uri, known: bool) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            // A cheap clone of the request's bytes; the method's name is only looked at when the call ends.
            path: uri.path_and_query().filter(|_| known).cloned(),
            start: Instant::now(),
            code: None,
        }
    }

    fn finish(self, code: Code) {
        self.metrics.in_flight.dec();
        let path = self.path.as_ref().map_or(UNKNOWN_PATH, |p| p.path());
        self.metrics.record(path, code, self.start.elapsed());
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
        let mut frame = ready!(this.inner.poll_frame(cx));
        match &mut frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_mut() {
                    crate::error::fit_status_headers(trailers);
                    if let Some(recorder) = this.recorder.take() {
                        let code = status_code(trailers).or(recorder.code).unwrap_or(Code::Unknown);
                        recorder.finish(code);
                    }
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
