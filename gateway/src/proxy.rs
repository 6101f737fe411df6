//! Forwarding a call to the service that owns its proto package, streaming both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cube_kit::{ApiError, Channel};
use cube_proto::methods::MethodInfo;
use futures::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::frames::{CheckedBody, Rules, Violation};

/// The `ErrorInfo` domain of errors the gateway itself returns.
pub(crate) const DOMAIN: &str = "gateway.cube.dev";

/// Hop-by-hop headers that describe one connection and never cross the proxy.
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::HOST,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::HeaderName::from_static("keep-alive"),
];

/// The fallback of the gateway's router: every call that is not the gateway's own health or reflection.
#[derive(Clone)]
pub(crate) struct Proxy {
    upstreams: Arc<HashMap<String, Channel>>,
    /// The methods the descriptor sets declare in routed packages, by path.
    methods: Arc<HashMap<String, MethodInfo>>,
    max_message_bytes: usize,
    request_timeout: Duration,
}

impl Proxy {
    pub(crate) fn new(
        upstreams: HashMap<String, Channel>,
        methods: HashMap<String, MethodInfo>,
        max_message_bytes: usize,
        request_timeout: Duration,
    ) -> Self {
        Self {
            upstreams: Arc::new(upstreams),
            methods: Arc::new(methods),
            max_message_bytes,
            request_timeout,
        }
    }

    async fn forward(self, request: Request<axum::body::Body>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path();
        let unknown = || ApiError::UnknownService {
            method: path.to_owned(),
        };
        let package = package_of(path).ok_or_else(unknown)?;
        let channel = self.upstreams.get(package).ok_or_else(unknown)?.clone();
        let package = package.to_owned();
        let timeout = match request.headers().get("grpc-timeout") {
            Some(value) => parse_grpc_timeout(value)?.min(self.request_timeout),
            None => self.request_timeout,
        };

        let rules = Rules {
            // A method no descriptor declares is forwarded as it comes; its service answers for it.
            single_message: self.methods.get(path).is_some_and(|method| !method.client_streaming),
            compressed: request
                .headers()
                .get("grpc-encoding")
                .is_some_and(|encoding| encoding != "identity"),
        };
        let (mut parts, body) = request.into_parts();
        for name in &HOP_BY_HOP {
            parts.headers.remove(name);
        }
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        forwarded_for(&mut parts);
        let violation = Violation::default();
        let body = Body::new(CheckedBody::new(body, self.max_message_bytes, rules, violation.clone()));
        let call = channel.oneshot(Request::from_parts(parts, body));
        let started = tokio::time::Instant::now();
        // tonic's own timer for the same `grpc-timeout` started when the request arrived, a moment before this
        // one, and would answer CANCELLED ("Timeout expired"); ending a hair earlier answers DEADLINE_EXCEEDED.
        let result = tokio::time::timeout(timeout.saturating_sub(DEADLINE_MARGIN), call).await;
        if let Some(error) = violation.take() {
            return Err(error);
        }
        match result {
            // The network channel enforces `grpc-timeout` too, and its expiry is an error like any other.
            Err(_) => Err(ApiError::DeadlineExceeded(timeout)),
            Ok(Err(_)) if started.elapsed() >= timeout.saturating_sub(DEADLINE_MARGIN) => {
                Err(ApiError::DeadlineExceeded(timeout))
            }
            Ok(Err(source)) => Err(ApiError::Unavailable {
                service: package,
                source,
            }),
            // A service's own deadline can fire a moment before ours; tonic reports that as CANCELLED
            // ("Timeout expired"), but for the caller it is the deadline they set.
            Ok(Ok(response))
                if started.elapsed() >= timeout.saturating_sub(DEADLINE_MARGIN)
                    && grpc_status(&response) == Some("1") =>
            {
                Err(ApiError::DeadlineExceeded(timeout))
            }
            Ok(Ok(mut response)) => {
                for name in &HOP_BY_HOP[..4] {
                    response.headers_mut().remove(name);
                }
                Ok(response)
            }
        }
    }
}

impl Service<Request<axum::body::Body>> for Proxy {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<axum::body::Body>) -> Self::Future {
        let proxy = self.clone();
        Box::pin(async move {
            Ok(proxy
                .forward(request)
                .await
                .unwrap_or_else(|error| error.status(DOMAIN).into_http()))
        })
    }
}

/// How much before the caller's deadline the gateway gives up on a call.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Returns the `grpc-status` of a trailers-only response.
fn grpc_status<B>(response: &Response<B>) -> Option<&str> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
}

/// Appends the caller's address to `x-forwarded-for`, so that services behind the gateway (which trust it only
/// from the gateway) know who is calling, e.g. to throttle failed logins per client.
fn forwarded_for(parts: &mut http::request::Parts) {
    let Some(peer) = parts
        .extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
    else {
        return;
    };
    let name = header::HeaderName::from_static("x-forwarded-for");
    let value = match parts.headers.get(&name).and_then(|value| value.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        parts.headers.insert(name, value);
    }
}

/// Returns the proto package of a gRPC method path: `cube.auth.v1` for `/cube.auth.v1.AuthService/Login`.
fn package_of(path: &str) -> Option<&str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if method.is_empty() || method.contains('/') {
        return None;
    }
    let (package, _) = service.rsplit_once('.')?;
    Some(package)
}

/// Parses a `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n), as the gRPC spec says.
fn parse_grpc_timeout(value: &HeaderValue) -> Result<Duration, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "grpc-timeout",
            format!(
                "{:?} is not a gRPC timeout: expected 1 to 8 digits followed by H, M, S, m, u or n (e.g. 500m)",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
    };
    let text = value.to_str().map_err(|_| invalid())?;
    let unit_at = text.len().checked_sub(1).ok_or_else(invalid)?;
    let (digits, unit) = text.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    match unit {
        "H" => Ok(Duration::from_secs(amount * 3600)),
        "M" => Ok(Duration::from_secs(amount * 60)),
        "S" => Ok(Duration::from_secs(amount)),
        "m" => Ok(Duration::from_millis(amount)),
        "u" => Ok(Duration::from_micros(amount)),
        "n" => Ok(Duration::from_nanos(amount)),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_come_from_method_paths() {
        assert_eq!(package_of("/cube.auth.v1.AuthService/Login"), Some("cube.auth.v1"));
        assert_eq!(package_of("/grpc.health.v1.Health/Check"), Some("grpc.health.v1"));
        for bad in [
            "",
            "/",
            "/NoPackage/Call",
            "/cube.auth.v1.AuthService/",
            "/a.B/c/d",
            "cube.a.B/C",
        ] {
            assert_eq!(package_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn grpc_timeouts_follow_the_spec() {
        let parse = |text: &'static str| parse_grpc_timeout(&HeaderValue::from_static(text));
        assert_eq!(parse("5S").expect("5S"), Duration::from_secs(5));
        assert_eq!(parse("250m").expect("250m"), Duration::from_millis(250));
        assert_eq!(parse("99999999n").expect("n"), Duration::from_nanos(99_999_999));
        assert_eq!(parse("2H").expect("H"), Duration::from_secs(7200));
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S", "abcS", "5 S"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.to_string().contains("grpc-timeout"), "{err}");
        }
    }
}
