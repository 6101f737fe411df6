//! The admin HTTP server beside every gRPC port: `/metrics` in Prometheus text format and `/healthz`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::health::Health;

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    health: Health,
}

/// Serves `/metrics` from `registry` and `/healthz` from `health` on `listener` until `shutdown` resolves.
///
/// # Errors
/// Returns an error when the listener fails.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AdminState { registry, health });
    tracing::info!(%address, "serving admin http");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(error) => {
            tracing::error!(%error, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "encoding metrics failed\n".to_owned(),
            )
        }
    }
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    match state.health.status("") {
        Some(ServingStatus::Serving) => (StatusCode::OK, "serving\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not serving\n"),
    }
}
