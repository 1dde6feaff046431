//! The operator's `/metrics`, `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tagstream_ingestor::service::http::{metrics_response, spawn_server};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
struct Http {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

/// Serves until `shutdown` and returns the bound address. `/readyz` answers 200 once
/// `ready` is set: a standby replica waiting for the lease is ready too, since it can take
/// over at any time.
pub async fn serve(
    address: SocketAddr,
    registry: Registry,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Http {
            registry: Arc::new(registry),
            ready,
        });
    spawn_server(address, app, shutdown).await
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    metrics_response(&http.registry)
}

async fn readyz(State(http): State<Http>) -> impl IntoResponse {
    if http.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}
