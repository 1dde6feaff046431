//! `/metrics`, `/healthz`, `/readyz` and `/status`.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
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

/// Binds `address` and serves `app` in a task until `shutdown`; returns the bound address
/// (port 0 picks one). Shared with the operator's endpoints.
pub async fn spawn_server(
    address: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    metrics_response(&http.registry)
}

/// A registry in the `OpenMetrics` text format, as `/metrics` answers it.
pub fn metrics_response(registry: &Registry) -> impl IntoResponse + use<> {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "cannot encode metrics".into(),
        ),
    }
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
