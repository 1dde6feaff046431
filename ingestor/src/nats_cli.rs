//! Connecting the command-line clients (`tail`, `write --subject`) to NATS as a user
//! would: credentials from the URL or a credentials file, and the server's refusals
//! (a permissions violation) surfaced instead of waited out.

use std::path::Path;

use anyhow::Context as _;
use async_nats::{Client, ConnectOptions, Event, ServerAddr, ServerError};
use tokio::sync::mpsc;

/// A connected client, and the permissions violations the server reports on it (the
/// server answers a forbidden publish or subscribe only with an asynchronous `-ERR`).
#[derive(Debug)]
pub struct Connected {
    pub client: Client,
    pub violations: mpsc::UnboundedReceiver<String>,
}

/// Connects to `url` as `name`: `nats://user:password@host:port` authenticates (async-nats
/// does not read the URL's credentials itself), else `creds`, a credentials file (JWT
/// and nkey seed, as `nsc` writes them).
pub async fn connect(
    url: &str,
    creds: Option<&Path>,
    name: &str,
    configure: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> anyhow::Result<Connected> {
    let address: ServerAddr = url.parse().with_context(|| format!("NATS URL {url}"))?;
    let options = match (address.username(), address.password(), creds) {
        (Some(user), Some(password), _) => ConnectOptions::with_user_and_password(user.into(), password.into()),
        (_, _, Some(path)) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?,
        _ => ConnectOptions::new(),
    };
    let (found, violations) = mpsc::unbounded_channel();
    let options = options.name(name).event_callback(move |event| {
        let found = found.clone();
        async move {
            if let Event::ServerError(ServerError::Other(message)) = event
                && message.to_lowercase().contains("permissions violation")
            {
                let _ = found.send(message);
            }
        }
    });
    let client = configure(options)
        .connect(address)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(Connected { client, violations })
}
