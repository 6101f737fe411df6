//! Cube's gateway: one port that speaks gRPC (HTTP/2) and grpc-web (binary and text, over HTTP/1.1 and HTTP/2)
//! to browsers and SDKs, answers CORS, and forwards each call by its proto package to the service that owns it.
//!
//! The gateway serves its own health (`grpc.health.v1`, where a service name under a routed package is asked of
//! that service) and a reflection service listing the services it routes, its health and its reflection. It checks
//! what it forwards: framing, message size, `grpc-timeout`, and that a method taking one request message gets
//! exactly one, answering problems with gRPC errors carrying `google.rpc` details. Methods it knows from its
//! descriptor sets are named in its metrics; calls to any other path share the label value `unknown`.

mod edge;
mod frames;
mod proxy;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use cube_kit::config::ServerArgs;
use cube_kit::metrics::{MethodSet, RpcMetrics};
use cube_kit::server::ServeError;
use cube_kit::{Channel, Health};
use cube_proto::methods::MethodInfo;
use http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// One routing rule: calls to methods in `package` go to the service at `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A proto package, e.g. `cube.auth.v1`.
    pub package: String,
    /// The service's URL, e.g. `http://cube-auth:8080`.
    pub url: String,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (package, url) = text.split_once('=').ok_or_else(|| {
            format!("invalid route {text:?}: expected PACKAGE=URL, e.g. cube.auth.v1=http://cube-auth:8080")
        })?;
        if package.is_empty() || !package.split('.').all(|part| !part.is_empty()) {
            return Err(format!(
                "invalid route {text:?}: {package:?} is not a proto package like cube.auth.v1"
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "invalid route {text:?}: the URL must start with http:// or https://"
            ));
        }
        Ok(Self {
            package: package.to_owned(),
            url: url.to_owned(),
        })
    }
}

/// How the gateway treats browsers and messages, whether it runs alone or inside `cube up`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Browser origins allowed to call the gateway (CORS), e.g. https://cube.example.com; none by default.
    #[arg(long = "cors-origin", env = "CUBE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Largest request message the gateway forwards, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long = "max-message-bytes", env = "CUBE_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
}

/// Where each Cube service is found when they run as separate deployments (their Kubernetes Service names).
const DEFAULT_ROUTES: [&str; 7] = [
    "cube.auth.v1=http://cube-auth:8080",
    "cube.projects.v1=http://cube-projects:8080",
    "cube.scheduler.v1=http://cube-scheduler:8080",
    "cube.workflow.v1=http://cube-workflow:8080",
    "cube.notebook.v1=http://cube-notebook:8080",
    "cube.serving.v1=http://cube-serving:8080",
    "cube.watcher.v1=http://cube-watcher:8080",
];

/// The services the gateway serves itself rather than forwards: health and both versions of reflection.
const OWN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A route's URL is not a valid URI.
    #[error("route {package}: {source}")]
    Route {
        /// The route's package.
        package: String,
        /// Why the URL was refused.
        source: cube_kit::channel::InvalidUri,
    },
    /// A CORS origin is not a valid header value.
    #[error("invalid --cors-origin {0:?}: expected an origin like https://cube.example.com")]
    CorsOrigin(String),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The gateway, assembled from its routes.
pub struct Gateway {
    upstreams: HashMap<String, Channel>,
    cors_origins: Vec<HeaderValue>,
    max_message_bytes: usize,
    descriptor_sets: Vec<&'static [u8]>,
    health: Health,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("packages", &self.upstreams.keys().collect::<Vec<_>>())
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds a gateway from its flags, with no routes yet.
    ///
    /// # Errors
    /// Returns an error naming the origin that is invalid.
    pub fn from_args(args: &GatewayArgs) -> Result<Self, GatewayError> {
        let mut gateway = Self::new(args.max_message_bytes);
        for origin in &args.cors_origins {
            gateway = gateway.allow_origin(origin)?;
        }
        Ok(gateway)
    }

    /// Adds a network channel for each route.
    ///
    /// # Errors
    /// Returns an error naming the route whose URL is invalid.
    pub fn remote_routes(mut self, routes: &[Route]) -> Result<Self, GatewayError> {
        for route in routes {
            let channel = Channel::remote(&route.url).map_err(|source| GatewayError::Route {
                package: route.package.clone(),
                source,
            })?;
            self = self.route(&route.package, channel);
        }
        Ok(self)
    }

    /// Creates a gateway with no routes that forwards messages up to `max_message_bytes` long.
    pub fn new(max_message_bytes: usize) -> Self {
        let health = Health::new();
        health.set_serving("");
        Self {
            upstreams: HashMap::new(),
            cors_origins: Vec::new(),
            max_message_bytes,
            descriptor_sets: vec![cube_proto::FILE_DESCRIPTOR_SET],
            health,
        }
    }

    /// Sends calls to methods in `package` (e.g. `cube.auth.v1`) to `channel`, and asks it for their health.
    #[must_use]
    pub fn route(mut self, package: &str, channel: Channel) -> Self {
        self.health.delegate(package, channel.clone());
        self.upstreams.insert(package.to_owned(), channel);
        self
    }

    /// Lets browsers on `origin` call the gateway.
    ///
    /// # Errors
    /// Returns an error when `origin` is not a valid header value.
    pub fn allow_origin(mut self, origin: &str) -> Result<Self, GatewayError> {
        let value = HeaderValue::from_str(origin).map_err(|_| GatewayError::CorsOrigin(origin.to_owned()))?;
        self.cors_origins.push(value);
        Ok(self)
    }

    /// Adds the APIs in an encoded `FileDescriptorSet` to what the gateway's reflection describes.
    #[must_use]
    pub fn describe(mut self, descriptor_set: &'static [u8]) -> Self {
        self.descriptor_sets.push(descriptor_set);
        self
    }

    /// Returns the gateway's health registry.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Returns the methods the gateway forwards (those its descriptor sets declare in routed packages), by path.
    fn forwarded_methods(&self) -> HashMap<String, MethodInfo> {
        let mut methods = HashMap::new();
        for set in &self.descriptor_sets {
            match cube_proto::methods::methods(set) {
                Ok(listed) => methods.extend(
                    listed
                        .into_iter()
                        .filter(|method| {
                            method
                                .service
                                .rsplit_once('.')
                                .is_some_and(|(package, _)| self.upstreams.contains_key(package))
                        })
                        .map(|method| (method.path.clone(), method)),
                ),
                Err(error) => tracing::warn!(%error, "a descriptor set given to the gateway does not decode"),
            }
        }
        methods
    }

    /// Returns the methods the gateway's metrics name: those it forwards, and its own health and reflection.
    fn metric_methods(forwarded: &HashMap<String, MethodInfo>) -> MethodSet {
        let own = MethodSet::of_services(
            &OWN_SERVICES,
            &[
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
        );
        let mut paths: Vec<String> = forwarded.keys().cloned().collect();
        paths.extend(own.paths());
        MethodSet::new(paths)
    }

    /// Returns the services reflection lists: those the gateway forwards, and its own health and reflection.
    /// Services its descriptor sets declare that no route serves (internal contracts such as
    /// `cube.common.v1.ProjectWorkloadService`) stay unlisted, though their types can still be looked up.
    fn listed_services(forwarded: &HashMap<String, MethodInfo>) -> BTreeSet<String> {
        let mut services: BTreeSet<String> = forwarded.values().map(|method| method.service.clone()).collect();
        services.extend(OWN_SERVICES.map(String::from));
        services
    }

    fn routes(self, request_timeout: Duration, methods: HashMap<String, MethodInfo>) -> Result<Routes, ServeError> {
        let mut v1 = tonic_reflection::server::Builder::configure();
        let mut v1alpha = tonic_reflection::server::Builder::configure();
        for set in [
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]
        .into_iter()
        .chain(self.descriptor_sets.iter().copied())
        {
            v1 = v1.register_encoded_file_descriptor_set(set);
            v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
        }
        // Both reflection descriptors are registered above, so neither builder adds its own a second time.
        v1 = v1.include_reflection_service(false);
        v1alpha = v1alpha.include_reflection_service(false);
        for service in Self::listed_services(&methods) {
            v1 = v1.with_service_name(service.clone());
            v1alpha = v1alpha.with_service_name(service);
        }
        let proxy = proxy::Proxy::new(self.upstreams, methods, self.max_message_bytes, request_timeout);
        let routes = Routes::default()
            .add_service(self.health.service())
            .add_service(v1.build_v1()?)
            .add_service(v1alpha.build_v1alpha()?);
        Ok(Routes::from(routes.into_axum_router().fallback_service(proxy)))
    }

    /// Serves gRPC and grpc-web on `listener` until `shutdown` resolves, then flips health to NOT_SERVING and
    /// drains calls in flight for at most `args.shutdown_grace`.
    ///
    /// # Errors
    /// Returns an error when the transport fails.
    pub async fn serve(
        self,
        listener: TcpListener,
        args: &ServerArgs,
        metrics: &RpcMetrics,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let address = listener.local_addr().map_err(ServeError::from)?;
        let health = self.health.clone();
        let cors = cors_layer(self.cors_origins.clone());
        let forwarded = self.forwarded_methods();
        let metric_methods = Self::metric_methods(&forwarded);
        let routes = self.routes(args.request_timeout, forwarded)?;
        let (incoming, cut) = cube_kit::server::incoming(listener);
        let routes = routes.prepare();
        let edge = edge::Edge {
            browser: tower::ServiceBuilder::new()
                .layer(cors)
                .layer(tonic_web::GrpcWebLayer::new())
                .service(routes.clone()),
            grpc: routes,
        };
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(metrics.layer(metric_methods))
            .serve_with_incoming_shutdown(edge, incoming, cube_kit::server::closing(health.clone(), shutdown));
        tracing::info!(%address, "gateway serving grpc and grpc-web");
        cube_kit::server::drain("gateway", &health, server, args.shutdown_grace, cut).await?;
        Ok(())
    }
}

/// Returns the CORS policy: the listed origins may POST gRPC-web calls with any request headers, and read the
/// gRPC status headers of the answer.
fn cors_layer(origins: Vec<HeaderValue>) -> CorsLayer {
    let exposed = ["grpc-status", "grpc-message", "grpc-status-details-bin"].map(HeaderName::from_static);
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(exposed)
        .max_age(Duration::from_secs(24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_bad_ones_say_what_is_expected() {
        let route: Route = "cube.auth.v1=http://127.0.0.1:1".parse().expect("route");
        assert_eq!(route.package, "cube.auth.v1");
        for bad in ["cube.auth.v1", "=http://x", "cube..v1=http://x", "cube.auth.v1=ftp://x"] {
            let err = bad.parse::<Route>().expect_err(bad);
            assert!(err.contains("invalid route"), "{err}");
        }
        for default in DEFAULT_ROUTES {
            default.parse::<Route>().expect(default);
        }
    }
}

/// The gateway binary's command line.
pub mod cli {
    use cube_kit::cli::ServeArgs;

    use super::{DEFAULT_ROUTES, Gateway, GatewayArgs, GatewayError, Route};

    /// The flags of `cube-gateway` (and of `cube serve gateway`).
    #[derive(Debug, Clone, clap::Parser)]
    #[command(about = "Cube's gateway: gRPC and grpc-web on one port, routed to the services")]
    pub struct GatewayCommand {
        /// Where to listen, logs and traces.
        #[command(flatten)]
        pub serve: ServeArgs,
        /// Where calls go, as PACKAGE=URL; repeat the flag, or separate with commas in the env var.
        #[arg(long = "route", env = "CUBE_GATEWAY_ROUTES", value_delimiter = ',', default_values = DEFAULT_ROUTES)]
        pub routes: Vec<Route>,
        /// CORS and limits.
        #[command(flatten)]
        pub gateway: GatewayArgs,
    }

    /// Runs the gateway until SIGTERM or SIGINT.
    ///
    /// # Errors
    /// Returns an error when a route is invalid or serving fails.
    pub async fn run(command: GatewayCommand) -> Result<(), cube_kit::cli::RunError> {
        let gateway = Gateway::from_args(&command.gateway)?.remote_routes(&command.routes)?;
        let health = gateway.health().clone();
        let server_args = command.serve.server.clone();
        cube_kit::cli::run("gateway", &command.serve, health, |bound| async move {
            gateway
                .serve(bound.listener, &server_args, &bound.metrics, bound.shutdown)
                .await
        })
        .await
    }

    /// Runs the gateway binary and returns its exit code.
    pub fn main(command: GatewayCommand) -> std::process::ExitCode {
        let threads = command.serve.server.worker_threads;
        cube_kit::cli::block_on(threads, run(command))
    }

    impl From<GatewayError> for cube_kit::cli::RunError {
        fn from(error: GatewayError) -> Self {
            Self::Serve(error.into())
        }
    }
}
