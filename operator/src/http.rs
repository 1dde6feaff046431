//! The operator's `/metrics`, `/healthz` and `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use tagstream_core::http::{metrics_response, spawn_server};
use tokio_util::sync::CancellationToken;

/// Serves until `shutdown` and returns the bound address. `/readyz` answers 200 as soon
/// as the server runs: a standby replica waiting for the lease is ready too, since it can
/// take over at any time, and the leader's work needs no traffic routed to it.
pub async fn serve(
    address: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(Arc::new(registry));
    spawn_server(address, app, shutdown).await
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    metrics_response(&registry)
}
