//! The HTTP plumbing both binaries serve their endpoints with.

use std::net::SocketAddr;

use axum::{Router, http::StatusCode, response::IntoResponse};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Binds `address` and serves `app` in a task until `shutdown`; returns the bound address
/// (port 0 picks one).
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
