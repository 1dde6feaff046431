//! Reading an ingestor's `/status`.
//!
//! In the cluster the operator can call the site's Service directly. A developer running
//! the operator on a laptop against a remote cluster cannot resolve `*.svc` names, so the
//! default goes through the API server's service proxy, which works from anywhere the
//! kubeconfig works (at the price of one API request per site per period).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use kube::Client;
use tagstream_core::report::Status as Report;

use crate::render::{HTTP_PORT, object_name};

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot reach the ingestor through the API server: {0}")]
    Proxy(#[source] kube::Error),
    #[error("cannot reach the ingestor at {url}: {message}")]
    Direct { url: String, message: String },
    #[error("the ingestor's /status is not understood: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("no answer from the ingestor within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the ingestor through the API server: HTTP {0}")]
    ProxyStatus(http::StatusCode),
    #[error("the ingestor's /status is larger than {} MiB, more than any site reports", MAX_REPORT_BYTES >> 20)]
    TooLarge,
}

/// The largest `/status` body read: a site of 1,000 devices reports about 1 MiB. The
/// whole body used to be read whatever its size, so one wrong or hostile answer could
/// take the operator's memory (issue 28).
pub const MAX_REPORT_BYTES: usize = 16 << 20;

/// A response body, read up to [`MAX_REPORT_BYTES`].
async fn read_limited<B>(body: B, failed: impl Fn(String) -> ReportError) -> Result<Vec<u8>, ReportError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, MAX_REPORT_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReportError::TooLarge),
        Err(e) => Err(failed(e.to_string())),
    }
}

impl ReportError {
    /// What the Site's `Ready` condition says. Every way of not answering (a pending pod's
    /// 503 through the service proxy, a timeout while the API server is busy) reads the
    /// same, so that alternating between them does not rewrite the status at every pass:
    /// found against a real API server, where both happen to the same site. The detail
    /// is logged.
    pub fn condition_message(&self) -> String {
        match self {
            Self::Decode(_) | Self::TooLarge => self.to_string(),
            Self::Proxy(_) | Self::ProxyStatus(_) | Self::Direct { .. } | Self::Timeout(_) => NOT_ANSWERING.to_owned(),
        }
    }
}

/// The `Ready` message of a site whose ingestor does not answer.
const NOT_ANSWERING: &str = "the site's ingestor does not answer on /status (not running yet, or not reachable)";

/// Where the operator reads the ingestors' reports.
#[derive(Clone)]
pub enum ReportSource {
    /// `GET /api/v1/namespaces/<ns>/services/tagstream-<site>:http/proxy/status`.
    ApiServerProxy(Client),
    /// A URL template with `{namespace}`, `{service}`, `{site}` and `{port}`, e.g.
    /// `http://{service}.{namespace}.svc:{port}/status`.
    Direct {
        template: String,
        http: HttpClient<HttpConnector, Empty<Bytes>>,
    },
}

impl std::fmt::Debug for ReportSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ApiServerProxy(_) => f.write_str("ApiServerProxy"),
            Self::Direct { template, .. } => f.debug_struct("Direct").field("template", template).finish(),
        }
    }
}

impl ReportSource {
    pub fn direct(template: &str) -> Self {
        Self::Direct {
            template: template.to_owned(),
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The report of one site's ingestor, given up after `timeout`.
    pub async fn fetch(&self, namespace: &str, site: &str, timeout: Duration) -> Result<Report, ReportError> {
        let body = tokio::time::timeout(timeout, self.body(namespace, site))
            .await
            .map_err(|_| ReportError::Timeout(timeout))??;
        Ok(serde_json::from_slice(&body)?)
    }

    async fn body(&self, namespace: &str, site: &str) -> Result<Vec<u8>, ReportError> {
        let service = object_name(site);
        match self {
            Self::ApiServerProxy(client) => {
                let request = http::Request::get(format!(
                    "/api/v1/namespaces/{namespace}/services/{service}:http/proxy/status"
                ))
                .body(kube::client::Body::empty())
                .expect("a valid request");
                let response = client.send(request).await.map_err(ReportError::Proxy)?;
                if !response.status().is_success() {
                    return Err(ReportError::ProxyStatus(response.status()));
                }
                read_limited(response.into_body(), |message| ReportError::Direct {
                    url: "the API server's service proxy".into(),
                    message,
                })
                .await
            }
            Self::Direct { template, http } => {
                let url = template
                    .replace("{namespace}", namespace)
                    .replace("{service}", &service)
                    .replace("{site}", site)
                    .replace("{port}", &HTTP_PORT.to_string());
                let failed = |message: String| ReportError::Direct {
                    url: url.clone(),
                    message,
                };
                let uri = url.parse().map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
                let response = http.get(uri).await.map_err(|e| failed(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(failed(format!("HTTP {}", response.status())));
                }
                read_limited(response.into_body(), failed).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_of_not_answering_reads_the_same_in_the_condition() {
        let timeout = ReportError::Timeout(Duration::from_secs(1));
        let refused = ReportError::Direct {
            url: "http://tagstream-plant-a.plant.svc:9464/status".into(),
            message: "connection refused".into(),
        };
        assert_eq!(timeout.condition_message(), refused.condition_message());
        let garbled = ReportError::Decode(serde_json::from_str::<Report>("{").unwrap_err());
        assert_ne!(garbled.condition_message(), timeout.condition_message());
    }
}
