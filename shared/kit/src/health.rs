//! `grpc.health.v1.Health`, with Watch streams that end when the server shuts down, and (in the gateway)
//! health of services behind it, asked of those services.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::channel::Channel;

#[derive(Debug, Default, Clone)]
struct State {
    statuses: HashMap<String, ServingStatus>,
    closing: bool,
}

/// The health registry of one server: a serving status per service name (`""` is the server as a whole).
///
/// Cloning shares the registry. After [`Health::close`], every status reads NOT_SERVING and Watch streams end
/// once they have sent it, so they do not hold up a graceful shutdown.
#[derive(Clone)]
pub struct Health {
    state: Arc<watch::Sender<State>>,
    upstreams: Arc<RwLock<Vec<(String, Channel)>>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Creates a registry in which nothing is known yet.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(State::default())),
            upstreams: Arc::default(),
        }
    }

    /// Marks `service` as serving.
    pub fn set_serving(&self, service: &str) {
        self.set(service, ServingStatus::Serving);
    }

    /// Marks `service` as not serving.
    pub fn set_not_serving(&self, service: &str) {
        self.set(service, ServingStatus::NotServing);
    }

    fn set(&self, service: &str, status: ServingStatus) {
        self.state
            .send_if_modified(|state| state.statuses.insert(service.to_owned(), status) != Some(status));
    }

    /// Answers for every service name under `package` (e.g. `cube.auth.v1`) by asking `channel`'s own health
    /// service, as the gateway does for the services behind it.
    pub fn delegate(&self, package: &str, channel: Channel) {
        if let Ok(mut upstreams) = self.upstreams.write() {
            upstreams.push((package.to_owned(), channel));
        }
    }

    /// Flips every service to NOT_SERVING for good and lets Watch streams end.
    pub fn close(&self) {
        self.state.send_modify(|state| {
            state.closing = true;
            for status in state.statuses.values_mut() {
                *status = ServingStatus::NotServing;
            }
        });
    }

    /// Returns the status of `service`, or `None` when it is unknown here.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        self.state.borrow().statuses.get(service).copied()
    }

    /// Returns the tonic service that serves this registry.
    pub fn service(&self) -> HealthServer<Self> {
        HealthServer::new(self.clone())
    }

    fn upstream_for(&self, service: &str) -> Option<Channel> {
        let upstreams = self.upstreams.read().ok()?;
        upstreams
            .iter()
            .find(|(package, _)| {
                service == package
                    || service
                        .strip_prefix(package.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .map(|(_, channel)| channel.clone())
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Health {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.get_ref().service.clone();
        if let Some(status) = self.status(&service) {
            return Ok(Response::new(HealthCheckResponse { status: status.into() }));
        }
        match self.upstream_for(&service) {
            Some(channel) => HealthClient::new(channel).check(request).await,
            None => Err(Status::not_found(format!("no health status for service {service:?}"))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.get_ref().service.clone();
        if self.status(&service).is_none()
            && let Some(channel) = self.upstream_for(&service)
        {
            let upstream = HealthClient::new(channel).watch(request).await?.into_inner();
            // The gateway's own shutdown ends relayed streams too.
            let closing = self.closed();
            return Ok(Response::new(Box::pin(upstream.take_until(closing))));
        }
        let receiver = self.state.subscribe();
        let stream = futures::stream::unfold((receiver, None, false), move |(mut receiver, last, done)| {
            let service = service.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let (status, closing) = {
                        let state = receiver.borrow_and_update();
                        let status = state
                            .statuses
                            .get(&service)
                            .copied()
                            .unwrap_or(ServingStatus::ServiceUnknown);
                        (status, state.closing)
                    };
                    if last != Some(status) {
                        let response = HealthCheckResponse { status: status.into() };
                        return Some((Ok(response), (receiver, Some(status), closing)));
                    }
                    if closing || receiver.changed().await.is_err() {
                        return None;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Health {
    /// Returns a future that resolves once [`Health::close`] has been called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.state.subscribe();
        async move {
            // An error means the registry is gone, which ends the stream just the same.
            let _ = receiver.wait_for(|state| state.closing).await;
        }
    }
}
