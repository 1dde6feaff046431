//! `/metrics`, `/healthz`, `/readyz` and `/status`.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tagstream_core::http::{metrics_response, spawn_server};
use tokio_util::sync::CancellationToken;

use super::state::{Metrics, SiteState};

#[derive(Clone, Debug)]
struct Http {
    state: Arc<SiteState>,
    registry: Arc<Registry>,
}

/// Serves until `shutdown`. Returns the bound address through `bound` (port 0 picks one).
pub async fn serve(
    address: SocketAddr,
    state: Arc<SiteState>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Metrics(Arc::clone(&state))));
    let ack_latency = state.publisher.lock().expect("publisher lock").ack_latency.clone();
    registry.register(
        "tagstream_publish_ack_latency_seconds",
        "Time from publish to JetStream's ack",
        ack_latency,
    );
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state(Http {
            state,
            registry: Arc::new(registry),
        });
    Ok(spawn_server(address, app, shutdown).await?)
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    metrics_response(&http.registry)
}

async fn ready(State(http): State<Http>) -> impl IntoResponse {
    if http.state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn status(State(http): State<Http>) -> impl IntoResponse {
    Json(http.state.status())
}
