//! The publisher: from the queue's head to JetStream, in order, once.
//!
//! It reads records in chunks from the first unacknowledged one (memory does not grow
//! with the backlog), publishes every batch of every record with many acks in flight,
//! each with `Nats-Msg-Id: <epoch>-<sequence>-<part>`, and removes a record from the
//! queue only when all of its batches were acked. On any failure it drops what is in
//! flight and starts again from the head: what was stored already is re-sent with the
//! same id and dropped by JetStream's duplicate window.
//!
//! Order: one connection carries the publishes in queue order and JetStream stores them
//! in arrival order, so the stream holds them in queue order. A re-send after a failure
//! can only repeat a message, and the repeat is dropped as a duplicate.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::{
    ConnectErrorKind, ConnectOptions, Event,
    jetstream::{
        self, ErrorCode,
        context::{CreateStreamError, CreateStreamErrorKind, GetStreamErrorKind},
        message::PublishMessage,
        stream,
    },
};
use bytes::Bytes;
use tagstream_core::report::PublisherStatus;
use tagstream_crds::site::{Broker, CredentialsKind, StreamStorage};
use tagstream_proto::v1::{PointBatch, SourceKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::queue::{Queue, StoredBatch};

mod repair;
mod window;
use window::AckWindow;

/// Where the publisher sends and how.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub broker: Broker,
    pub stream: tagstream_crds::site::Stream,
    pub namespace: String,
    pub site: String,
    /// Where the broker Secret is mounted (files `username`, `password`, `token`, `nkey`,
    /// `user.creds`).
    pub credentials_dir: PathBuf,
    /// Where the TLS Secret is mounted (files `ca.crt`, `tls.crt`, `tls.key`).
    pub tls_dir: PathBuf,
    pub max_in_flight: usize,
    pub chunk_records: usize,
}

impl PublisherConfig {
    /// The subject of one source's batches.
    pub fn subject(&self, source: &str) -> String {
        format!(
            "{}.{}.{}.{source}",
            self.stream.subject_prefix, self.namespace, self.site
        )
    }

    /// The subject of a batch: its source's, and for a write audit the `write` token after it.
    pub fn batch_subject(&self, source: &str, source_kind: i32) -> String {
        if source_kind == i32::from(SourceKind::Write) {
            self.subject(&format!("{source}.write"))
        } else {
            self.subject(source)
        }
    }

    /// The subjects the stream is created on: everything under the prefix, so one stream
    /// serves every site and namespace that publishes under it, with no update per site.
    pub fn stream_subjects(&self) -> String {
        format!("{}.>", self.stream.subject_prefix)
    }

    /// Every subject of this site.
    pub fn site_subjects(&self) -> String {
        self.subject(">")
    }
}

/// Why connecting or publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read broker credentials {}: {source}", path.display())]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("the broker at {urls} refuses the Site's credentials: {message}")]
    CredentialsRefused { urls: String, message: String },
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// The broker answered and refused the Site's stream settings: retrying cannot help
    /// until someone changes them (or the stream they clash with).
    #[error("the broker refuses stream {stream}: {message}")]
    StreamRefused { stream: String, message: String },
    #[error("publish failed: {0}")]
    Publish(String),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

impl PublishError {
    /// Whether the Site's broker settings, not the broker's reachability, are what fails:
    /// credentials that are not mounted, a stream the broker refuses.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::Credentials { .. } | Self::CredentialsRefused { .. } | Self::StreamRefused { .. }
        )
    }
}

/// Whether JetStream refused a stream's creation or update for its settings (subjects
/// overlapping another stream's, replicas the cluster cannot place, ...), as opposed to
/// not answering or a cluster between leaders.
fn refuses_settings(error: &CreateStreamError) -> bool {
    match error.kind() {
        CreateStreamErrorKind::EmptyStreamName
        | CreateStreamErrorKind::InvalidStreamName
        | CreateStreamErrorKind::DomainAndExternalSet => true,
        CreateStreamErrorKind::JetStream(e) => ![
            ErrorCode::CLUSTER_NOT_ACTIVE,
            ErrorCode::CLUSTER_NOT_ASSIGNED,
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NOT_LEADER,
        ]
        .contains(&e.error_code()),
        _ => false,
    }
}

fn read_secret(dir: &Path, key: &str) -> Result<String, PublishError> {
    let path = dir.join(key);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| PublishError::Credentials { path, source })
}

/// Connection options from the Site's broker settings and the mounted Secrets.
pub async fn connect_options(config: &PublisherConfig) -> Result<ConnectOptions, PublishError> {
    let dir = &config.credentials_dir;
    let mut options = match config.broker.credentials.as_ref().map(|c| c.kind) {
        None => ConnectOptions::new(),
        Some(CredentialsKind::UserPassword) => {
            ConnectOptions::with_user_and_password(read_secret(dir, "username")?, read_secret(dir, "password")?)
        }
        Some(CredentialsKind::Token) => ConnectOptions::with_token(read_secret(dir, "token")?),
        Some(CredentialsKind::Nkey) => ConnectOptions::with_nkey(read_secret(dir, "nkey")?),
        Some(CredentialsKind::CredsFile) => {
            let path = dir.join("user.creds");
            ConnectOptions::with_credentials_file(&path)
                .await
                .map_err(|source| PublishError::Credentials { path, source })?
        }
    };
    if let Some(tls) = &config.broker.tls {
        let ca = config.tls_dir.join("ca.crt");
        if ca.exists() {
            options = options.add_root_certificates(ca);
        }
        if tls.client_certificate {
            options = options.add_client_certificate(config.tls_dir.join("tls.crt"), config.tls_dir.join("tls.key"));
        }
        options = options.require_tls(true);
    }
    Ok(options
        .name(format!("tagstream-ingestor {}/{}", config.namespace, config.site))
        .connection_timeout(Duration::from_secs(5)))
}

/// Whether the subject filter `pattern` covers every subject `filter` covers.
fn covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('.');
    let mut f = filter.split('.');
    loop {
        match (p.next(), f.next()) {
            (Some(">"), Some(_)) | (None, None) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Creates the stream on `<prefix>.>` when it is missing, or checks that it covers the
/// site's subjects. A stream that exists without covering them gets `<prefix>.>` added
/// (once for the prefix, not once per site) when `stream.create` allows it.
pub async fn ensure_stream(context: &jetstream::Context, config: &PublisherConfig) -> Result<(), PublishError> {
    let spec = &config.stream;
    let site_subjects = config.site_subjects();
    let subjects = config.stream_subjects();
    let fail = |message: String| PublishError::Stream {
        stream: spec.name.clone(),
        message,
    };
    let refused = |message: String| PublishError::StreamRefused {
        stream: spec.name.clone(),
        message,
    };
    let refused_or_failed = |e: CreateStreamError| {
        if refuses_settings(&e) {
            refused(e.to_string())
        } else {
            fail(e.to_string())
        }
    };
    match context.get_stream(&spec.name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| fail(e.to_string()))?;
            if info.config.num_replicas != usize::from(spec.replicas) {
                warn!(
                    stream = %spec.name,
                    replicas = info.config.num_replicas,
                    site_asks = spec.replicas,
                    "the stream exists with other replicas than the Site's stream.replicas; an existing stream is left as it is (nats stream edit changes it)"
                );
            }
            if info.config.subjects.iter().any(|s| covers(s, &site_subjects)) {
                return Ok(());
            }
            if !spec.create {
                return Err(refused(format!(
                    "exists but does not cover {site_subjects}, and stream.create is false"
                )));
            }
            let mut updated = info.config.clone();
            updated.subjects.push(subjects.clone());
            context.update_stream(updated).await.map_err(refused_or_failed)?;
            warn!(stream = %spec.name, %subjects, "the stream did not cover this site; added the prefix's subjects");
            Ok(())
        }
        Err(e) if !spec.create => {
            let missing =
                matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND);
            let message = format!("cannot be read and stream.create is false: {e}");
            Err(if missing { refused(message) } else { fail(message) })
        }
        // Created only when JetStream says it does not exist: a cluster electing a leader
        // answers other errors (timeouts, no responders), and a stream is not made anew
        // on those.
        Err(e) if !matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            Err(fail(format!("cannot be read: {e}")))
        }
        Err(_) => {
            let storage = match spec.storage {
                StreamStorage::File => stream::StorageType::File,
                StreamStorage::Memory => stream::StorageType::Memory,
            };
            context
                .create_stream(stream::Config {
                    name: spec.name.clone(),
                    subjects: vec![subjects.clone()],
                    storage,
                    num_replicas: usize::from(spec.replicas),
                    duplicate_window: spec.duplicate_window.get(),
                    ..stream::Config::default()
                })
                .await
                .map_err(refused_or_failed)?;
            info!(stream = %spec.name, %subjects, "created the stream");
            Ok(())
        }
    }
}

/// The first wait before resending after a publish failure; it doubles while failures
/// follow each other, up to 5 s.
const FIRST_DELAY: Duration = Duration::from_millis(100);

/// How long points may wait in the queue with no ack arriving before the publisher
/// drops its connection and makes a new one.
const STALL_LIMIT: Duration = Duration::from_secs(20);

/// The publisher's loop: runs until `shutdown`, then returns once nothing is in flight.
pub async fn run(
    queue: Queue,
    config: PublisherConfig,
    status: Arc<Mutex<PublisherStatus>>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let (context, disconnects) = tokio::select! {
            () = shutdown.cancelled() => return,
            connected = connect(&config) => match connected {
                Ok(connected) => connected,
                Err(e) => {
                    let refused = e.is_configuration().then(|| e.to_string());
                    let already_said = {
                        let mut s = status.lock().expect("status lock");
                        s.last_error = Some(e.to_string());
                        std::mem::replace(&mut s.config_error, refused.clone()) == refused
                    };
                    if refused.is_none() {
                        warn!(error = %e, retry_in = ?delay, "broker not reachable; points stay in the queue");
                    } else if !already_said {
                        error!(error = %e, retry_in = ?delay, "the Site's broker settings do not work; points stay in the queue until they are fixed");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        delay = Duration::from_millis(200);
        // Connected, with the stream in place: true before the first publish, so that an
        // idle site does not look cut off.
        {
            let mut s = status.lock().expect("status lock");
            s.connected = true;
            s.last_error = None;
            s.config_error = None;
        }
        let connection = Connection {
            queue: &queue,
            context,
            disconnects,
            config: &config,
            status: &status,
            shutdown: &shutdown,
        };
        if connection.publish().await {
            return;
        }
    }
}

/// The publisher on one broker connection.
struct Connection<'a> {
    queue: &'a Queue,
    context: jetstream::Context,
    /// Counts the client's disconnections (see [`connect`]).
    disconnects: watch::Receiver<u64>,
    config: &'a PublisherConfig,
    status: &'a Mutex<PublisherStatus>,
    shutdown: &'a CancellationToken,
}

impl Connection<'_> {
    /// Publishes on this connection; returns `true` at shutdown and `false` when the
    /// connection looks stuck and a new one should be made.
    async fn publish(&self) -> bool {
        let Self {
            queue,
            context,
            config,
            status,
            shutdown,
            ..
        } = self;
        let mut delay = FIRST_DELAY;
        loop {
            let acked_before = status.lock().expect("status lock").acked_records;
            let outcome = tokio::select! {
                result = self.publish_backlog() => result,
                () = stalled(queue, status) => {
                    warn!(limit = ?STALL_LIMIT, "points are queued but no ack arrived; reconnecting to the broker");
                    status.lock().expect("status lock").failures += 1;
                    return false;
                }
            };
            let Err(e) = outcome else { return true };
            {
                let mut s = status.lock().expect("status lock");
                // The backoff is for failures in a row: one after records went through
                // starts again from the shortest wait (it had grown to 5 s, and every
                // later failover paused that long).
                if s.acked_records != acked_before {
                    delay = FIRST_DELAY;
                }
                s.failures += 1;
                s.connected = false;
                if s.last_error.as_deref() != Some(&e.to_string()) {
                    warn!(error = %e, "publishing failed; resuming from the first unacknowledged record");
                }
                s.last_error = Some(e.to_string());
            }
            tokio::select! {
                () = shutdown.cancelled() => return true,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            // The stream may be what failed (deleted, or lost with the broker's disk). A
            // cluster electing the stream's leader does not answer: the check is bounded so
            // it does not add the request timeout to every failover.
            match tokio::time::timeout(Duration::from_secs(1), ensure_stream(context, config)).await {
                Ok(Err(e)) => debug!(error = %e, "stream check before retrying failed"),
                Err(_) => debug!("stream check before retrying got no answer within a second"),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Publishes from the queue's head until the queue is empty and `shutdown`, or a failure.
    async fn publish_backlog(&self) -> Result<(), PublishError> {
        let Self {
            queue,
            config,
            status,
            shutdown,
            ..
        } = *self;
        let epoch = queue.epoch();
        let mut window = AckWindow::new(self.disconnects.clone());
        self.repair(epoch, &mut window).await?;
        // The next chunk is read (and decoded, on the blocking pool) while this one is sent.
        let read_after = |after: Option<u64>| {
            let queue = queue.clone();
            let max = config.chunk_records;
            tokio::spawn(async move { queue.read(after, max).await })
        };
        let mut next = read_after(None);
        let mut sent_through = None;
        loop {
            let chunk = next
                .await
                .map_err(|e| PublishError::Publish(format!("queue reader failed: {e}")))??;
            let mut acked = Vec::new();
            let Some(last) = chunk.last().map(|s| s.sequence) else {
                window.settle(0, status, &mut acked).await?;
                queue.ack(acked).await?;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = queue.wait_for_records(Duration::from_millis(250)) => {}
                }
                // Everything up to the last sent record is acked and gone, so what follows
                // it is the head (and most likely still in the queue's memory).
                next = read_after(sent_through);
                continue;
            };
            sent_through = Some(last);
            next = read_after(Some(last));
            // Acked records leave the queue once per chunk: one delete pass, not one per record.
            for stored in chunk {
                let sequence = stored.sequence;
                let parts = stored
                    .record
                    .batches
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| (i as u32, b));
                self.send_parts(epoch, sequence, parts, &mut window).await?;
                window.settle(config.max_in_flight, status, &mut acked).await?;
            }
            queue.ack(acked).await?;
        }
    }

    /// Sends `parts` (part number and batch) of record `sequence`, in order.
    async fn send_parts(
        &self,
        epoch: u64,
        sequence: u64,
        parts: impl ExactSizeIterator<Item = (u32, StoredBatch)>,
        window: &mut AckWindow,
    ) -> Result<(), PublishError> {
        let Self {
            context,
            config,
            status,
            ..
        } = self;
        let count = parts.len();
        for (i, (part, batch)) in parts.enumerate() {
            let payload = with_envelope(&batch.encoded, config, epoch, sequence, part);
            // Nothing more is sent once a publish failed: what follows it must not reach
            // the stream before it is sent again.
            window.check()?;
            let message = PublishMessage::build()
                .payload(payload)
                .message_id(format_message_id(epoch, sequence, part));
            let ack = context
                .send_publish(config.batch_subject(&batch.source, batch.source_kind), message)
                .await
                .map_err(|e| PublishError::Publish(e.to_string()))?;
            window.push(sequence, i + 1 == count, ack);
            status.lock().expect("status lock").published_batches += 1;
        }
        Ok(())
    }
}

/// Resolves when records have waited in the queue for [`STALL_LIMIT`] without any ack.
async fn stalled(queue: &Queue, status: &Mutex<PublisherStatus>) {
    let mut last = (status.lock().expect("status lock").acked_records, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acked = status.lock().expect("status lock").acked_records;
        if acked != last.0 || queue.records() == 0 {
            last = (acked, Instant::now());
        } else if last.1.elapsed() >= STALL_LIMIT {
            return;
        }
    }
}

/// Connects, makes sure of the stream, and counts the client's disconnections: the ack of
/// a message sent before a disconnection never comes when the server that took it died,
/// and waiting out the ack timeout would add it to every failover. The publisher resends
/// from the first unacknowledged record instead; JetStream drops what it already has
/// (same message id).
async fn connect(config: &PublisherConfig) -> Result<(jetstream::Context, watch::Receiver<u64>), PublishError> {
    let (count, disconnects) = watch::channel(0u64);
    let count = Arc::new(count);
    // A list, not one comma-joined string: async-nats parses a string as one URL, so a
    // Site with several broker URLs never connected (found by tests/jetstream_cluster.rs).
    let client = connect_options(config)
        .await?
        .event_callback(move |event| {
            let count = Arc::clone(&count);
            async move {
                if matches!(event, Event::Disconnected) {
                    count.send_modify(|n| *n += 1);
                }
            }
        })
        .connect(config.broker.urls.as_slice())
        .await
        .map_err(|e| {
            let (urls, message) = (config.broker.urls.join(","), e.to_string());
            match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    PublishError::CredentialsRefused { urls, message }
                }
                _ => PublishError::Connect { urls, message },
            }
        })?;
    // The publisher bounds what it has in flight itself. async-nats holds an ack permit
    // until the ack future is dropped, and after a lost connection those futures only fail
    // when polled: with blocking backpressure and no spare permits, the next publish would
    // wait forever. Spare permits and an error instead of a wait keep failures failures.
    let context = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(config.max_in_flight * 2 + 1)
        .backpressure_on_inflight(false)
        .build(client);
    ensure_stream(&context, config).await?;
    Ok((context, disconnects))
}

/// `<epoch as 16 hex digits>-<sequence>-<part>`, as documented in the proto.
pub fn message_id(batch: &PointBatch) -> String {
    format_message_id(batch.epoch, batch.sequence, batch.part)
}

fn format_message_id(epoch: u64, sequence: u64, part: u32) -> String {
    format!("{epoch:016x}-{sequence}-{part}")
}

/// A stored batch's encoding followed by the fields it was stored without: the message
/// a consumer decodes is the whole batch (protobuf takes fields in any order).
fn with_envelope(encoded: &Bytes, config: &PublisherConfig, epoch: u64, sequence: u64, part: u32) -> Bytes {
    use prost::encoding::{fixed64, string, uint32, uint64};
    use tagstream_proto::fields::point_batch::{EPOCH, NAMESPACE, PART, SEQUENCE, SITE};
    let mut payload = Vec::with_capacity(encoded.len() + config.namespace.len() + config.site.len() + 32);
    payload.extend_from_slice(encoded);
    string::encode(NAMESPACE, &config.namespace, &mut payload);
    string::encode(SITE, &config.site, &mut payload);
    fixed64::encode(EPOCH, &epoch, &mut payload);
    uint64::encode(SEQUENCE, &sequence, &mut payload);
    uint32::encode(PART, &part, &mut payload);
    Bytes::from(payload)
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn subject_coverage() {
        assert!(covers(">", "tagstream.default.plant.>"));
        assert!(covers("tagstream.>", "tagstream.default.plant.>"));
        assert!(covers("tagstream.*.plant.>", "tagstream.default.plant.>"));
        assert!(covers("tagstream.default.plant.>", "tagstream.default.plant.>"));
        assert!(!covers("tagstream.default.plant.*", "tagstream.default.plant.>"));
        assert!(!covers("other.>", "tagstream.default.plant.>"));
        assert!(!covers("tagstream.default.other.>", "tagstream.default.plant.>"));
    }
}
