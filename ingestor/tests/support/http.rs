//! A plain HTTP/1.0 GET, enough for `/status`, `/metrics` and nats-server's monitoring.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The body of `GET path`, or `None` when nothing answers within five seconds.
pub async fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), get).await.ok().flatten()
}
