//! `cube_kit::telemetry` exporting to a real OTLP/gRPC receiver that runs in the test: the kit server continues
//! the caller's W3C trace, and `Channel` carries the current span's trace to the callee.
//!
//! `telemetry::init` installs process-wide state (the subscriber and the propagator), so each test here needs a
//! process of its own: run them with `cargo nextest`, which does that.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use cube_kit::config::{LogFormat, ServerArgs, TelemetryArgs};
use cube_kit::metrics::RpcMetrics;
use cube_kit::telemetry::Telemetry;

/// A span as the receiver got it, with the service name of the resource it came with.
#[derive(Debug, Clone)]
struct Received {
    service: Option<String>,
    span: Span,
}

/// An OTLP/gRPC trace receiver that keeps every span exported to it.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("the receiver's lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans.resource.as_ref().and_then(|resource| {
                resource.attributes.iter().find_map(|attribute| {
                    match attribute.value.as_ref().and_then(|value| value.value.as_ref()) {
                        Some(Value::StringValue(name)) if attribute.key == "service.name" => Some(name.clone()),
                        _ => None,
                    }
                })
            });
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("the receiver's lock").clone()
    }
}

async fn loopback() -> TcpListener {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binding a loopback port")
}

/// Starts a receiver and points the kit's telemetry at it.
async fn export_to_receiver() -> (Receiver, Telemetry) {
    let listener = loopback().await;
    let address = listener.local_addr().expect("local address");
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .expect("the OTLP receiver failed");
    });
    let telemetry = cube_kit::telemetry::init(
        "probe",
        &TelemetryArgs {
            otlp_endpoint: Some(format!("http://{address}")),
            log_filter: "info".into(),
            log_format: LogFormat::Text,
        },
    )
    .expect("telemetry");
    (receiver, telemetry)
}

/// A kit server on a loopback port.
struct Running {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start() -> Self {
        let listener = loopback().await;
        let address = listener.local_addr().expect("local address");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let server = cube_kit::Server::new("probe", "cube.probe.v1");
        let args = ServerArgs {
            worker_threads: None,
            listen: address,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        };
        let metrics = RpcMetrics::register(&mut prometheus_client::registry::Registry::default());
        let task = tokio::spawn(async move {
            server
                .serve(listener, &args, &metrics, signal)
                .await
                .expect("the kit server failed");
        });
        Self {
            address,
            shutdown,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops the server and waits until its connections are gone, so every server span has ended.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the kit server stopped")
            .expect("the kit server task");
    }
}

/// Flushes every span still buffered (dropping the guard shuts the exporter down) and returns what the receiver
/// got.
fn flush(receiver: &Receiver, telemetry: Telemetry) -> Vec<Received> {
    drop(telemetry);
    receiver.spans()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn describe(spans: &[Received]) -> String {
    spans
        .iter()
        .map(|received| {
            format!(
                "{} trace={} span={} parent={} service={:?}",
                received.span.name,
                hex(&received.span.trace_id),
                hex(&received.span.span_id),
                hex(&received.span.parent_span_id),
                received.service
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// The test's body runs on its own thread, so dropping the telemetry guard (which blocks until the exporter has
// flushed) leaves both worker threads to drive the exporter's connection and the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_span_continues_the_callers_trace() {
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";
    let (receiver, telemetry) = export_to_receiver().await;
    let server = Running::start().await;

    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("a valid URI")
        .connect()
        .await
        .expect("connecting to the kit server");
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_ID}-01")
            .parse()
            .expect("a metadata value"),
    );
    let status = HealthClient::new(channel)
        .check(request)
        .await
        .expect("a health answer")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    server.stop().await;

    let spans = flush(&receiver, telemetry);
    let span = spans
        .iter()
        .find(|received| hex(&received.span.trace_id) == TRACE_ID)
        .unwrap_or_else(|| panic!("no span of trace {TRACE_ID} among:\n{}", describe(&spans)));
    assert_eq!(hex(&span.span.parent_span_id), PARENT_ID, "{}", describe(&spans));
    assert_eq!(span.span.kind(), SpanKind::Server, "{}", describe(&spans));
    assert_eq!(span.service.as_deref(), Some("cube-probe"));
    let method = span
        .span
        .attributes
        .iter()
        .find(|attribute| attribute.key == "rpc.method");
    let method = method.and_then(|attribute| attribute.value.as_ref()?.value.as_ref());
    assert_eq!(
        method,
        Some(&Value::StringValue("/grpc.health.v1.Health/Check".into())),
        "{span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_channel_makes_the_server_span_a_child_of_the_current_span() {
    let (receiver, telemetry) = export_to_receiver().await;
    let server = Running::start().await;
    let channel = cube_kit::Channel::remote(&server.url()).expect("a valid URI");

    let client_span = tracing::info_span!("probe client");
    let parent = client_span.context().span().span_context().clone();
    assert!(parent.is_valid(), "the client span is not traced");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .instrument(client_span)
        .await
        .expect("a health answer")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    server.stop().await;

    let spans = flush(&receiver, telemetry);
    let trace_id = parent.trace_id().to_string();
    let server_span = spans
        .iter()
        .find(|received| hex(&received.span.trace_id) == trace_id && received.span.kind() == SpanKind::Server)
        .unwrap_or_else(|| panic!("no server span of trace {trace_id} among:\n{}", describe(&spans)));
    assert_eq!(
        hex(&server_span.span.parent_span_id),
        parent.span_id().to_string(),
        "{}",
        describe(&spans)
    );
    let client = spans
        .iter()
        .find(|received| hex(&received.span.span_id) == parent.span_id().to_string())
        .unwrap_or_else(|| panic!("the client span was not exported:\n{}", describe(&spans)));
    assert_eq!(client.span.name, "probe client");
}

/// A health service that only notes the `traceparent` each call carried.
#[derive(Debug, Clone, Default)]
struct TraceparentRecorder {
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for TraceparentRecorder {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .map(|value| value.to_str().expect("an ASCII traceparent").to_owned());
        self.seen.lock().expect("the recorder's lock").push(traceparent);
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving.into(),
        }))
    }

    type WatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send + 'static>>;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the recorder only answers Check"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_channel_sends_the_current_span_as_traceparent() {
    let (_receiver, telemetry) = export_to_receiver().await;
    let recorder = TraceparentRecorder::default();
    let routes = tonic::service::Routes::new(tonic_health::pb::health_server::HealthServer::new(recorder.clone()));
    let mut client = HealthClient::new(cube_kit::Channel::in_process(routes));

    client
        .check(HealthCheckRequest::default())
        .await
        .expect("a call outside any span");
    let span = tracing::info_span!("probe in-process client");
    let context = span.context().span().span_context().clone();
    client
        .check(HealthCheckRequest::default())
        .instrument(span)
        .await
        .expect("a call inside a span");

    let seen = recorder.seen.lock().expect("the recorder's lock").clone();
    let expected = format!("00-{}-{}-01", context.trace_id(), context.span_id());
    assert_eq!(seen, [None, Some(expected)]);
    drop(telemetry);
}

/// Ends a span, and returns its span id as hex.
fn one_span(name: &'static str) -> String {
    let span = tracing::info_span!("flushed", probe = name);
    span.context().span().span_context().span_id().to_string()
}

fn assert_flushed(spans: &[Received], span_id: &str, took: Duration) {
    assert!(
        spans.iter().any(|received| hex(&received.span.span_id) == span_id),
        "span {span_id} was not flushed:\n{}",
        describe(spans)
    );
    // The SDK gives up on a flush after 5 s; a flush that had to wait for it lost its spans.
    assert!(took < Duration::from_secs(4), "flushing took {took:?}");
}

#[tokio::test]
async fn shutdown_on_a_current_thread_runtime_flushes_without_stalling() {
    let (receiver, telemetry) = export_to_receiver().await;
    let span_id = one_span("current thread");
    let started = Instant::now();
    telemetry.shutdown().await;
    assert_flushed(&receiver.spans(), &span_id, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn dropping_the_guard_on_the_only_runtime_worker_still_flushes() {
    let (receiver, telemetry) = export_to_receiver().await;
    let span_id = one_span("only worker");
    let took = tokio::spawn(async move {
        let started = Instant::now();
        drop(telemetry);
        started.elapsed()
    })
    .await
    .expect("the dropping task");
    assert_flushed(&receiver.spans(), &span_id, took);
}

#[test]
fn an_invalid_log_filter_is_named() {
    let err = cube_kit::telemetry::init(
        "probe",
        &TelemetryArgs {
            otlp_endpoint: None,
            log_filter: "cube=loud".into(),
            log_format: LogFormat::Json,
        },
    )
    .expect_err("`loud` is not a level");
    assert!(err.to_string().contains("--log-filter \"cube=loud\""), "{err}");
}
