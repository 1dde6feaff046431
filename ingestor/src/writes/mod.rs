//! Setpoint writes through the running ingestor: a NATS request/reply service on the
//! site's write subjects (`proto/tagstream/v1/write.proto`), running only when the Site
//! sets `writes.enabled`. A request goes to the endpoint task that owns its device's
//! connection, which performs it between two polls; every attempt on a device of the site
//! is audited through the queue before it is answered; a request id seen within the
//! window is answered with its first outcome and written once.

mod requests;
pub mod wire;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_nats::{Client, Message, Subject};
use bytes::Bytes;
use futures_util::{StreamExt as _, stream::FuturesUnordered};
use prost::Message as _;
use tagstream_crds::{DeviceSpec, site::Writes};
use tagstream_proto::v1::WriteRequest;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::{
    requests::{Requests, Seen},
    wire::Attempt,
};
use crate::{
    acquisition::{
        poller::{NamedWrite, WriteJob},
        write::{Outcome, WriteReport},
    },
    publish::{self, PublisherConfig},
    queue::Queue,
    service::state::SiteState,
};

/// Where a device's writes go, and its spec (for the tags' units in the audit).
#[derive(Clone, Debug)]
pub struct Route {
    pub jobs: mpsc::Sender<WriteJob>,
    pub spec: DeviceSpec,
}

/// The site's devices by name, kept current by the pollers across reloads.
pub type WriteRoutes = Arc<RwLock<HashMap<String, Route>>>;

/// How long a write may wait for its device's bus before it is given up unwritten.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How long the service waits on the broker for a reply or an unsubscription: with the
/// broker gone, the client would wait for a reconnection forever.
const BROKER_WAIT: Duration = Duration::from_secs(1);
/// How long a reply waits for its audit to be on disk.
const AUDIT_WAIT: Duration = Duration::from_secs(5);

/// The write service of one site.
#[derive(Debug)]
pub struct WriteService {
    /// The broker connection (the publisher's settings) and the site's names.
    pub broker: PublisherConfig,
    pub writes: Writes,
    pub routes: WriteRoutes,
    pub queue: Queue,
    pub state: Arc<SiteState>,
}

type Running = FuturesUnordered<Pin<Box<dyn Future<Output = (Attempt, WriteReport)> + Send>>>;

impl WriteService {
    /// `<writes.subjectPrefix>.<namespace>.<site>.`: what every write subject starts with.
    fn subject_base(&self) -> String {
        format!(
            "{}.{}.{}.",
            self.writes.subject_prefix, self.broker.namespace, self.broker.site
        )
    }

    /// Connects and takes requests until `stop`; then answers the writes already handed
    /// to a device.
    pub async fn run(self, stop: CancellationToken) {
        let Some(client) = self.connect(&stop).await else {
            return;
        };
        let subjects = format!("{}>", self.subject_base());
        let mut subscriber = match client.subscribe(subjects.clone()).await {
            Ok(subscriber) => subscriber,
            Err(e) => {
                error!(subjects, error = %e, "cannot subscribe to the write subjects; writes are not taken");
                return;
            }
        };
        info!(subjects, "taking write requests");
        let mut requests = Requests::default();
        let mut running = Running::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                Some(message) = subscriber.next() => self.arrive(&client, message, &mut requests, &mut running).await,
                Some((attempt, report)) = running.next() => self.finish(&client, &attempt, &report, Target::Waiters(&mut requests)).await,
            }
        }
        let _ = tokio::time::timeout(BROKER_WAIT, subscriber.unsubscribe()).await;
        let drained = tokio::time::timeout(DEADLINE + Duration::from_secs(5), async {
            while let Some((attempt, report)) = running.next().await {
                self.finish(&client, &attempt, &report, Target::Waiters(&mut requests))
                    .await;
            }
        });
        if drained.await.is_err() {
            warn!("writes still running at shutdown are left unanswered");
        }
        let _ = tokio::time::timeout(BROKER_WAIT, client.flush()).await;
    }

    async fn connect(&self, stop: &CancellationToken) -> Option<Client> {
        loop {
            let connected = match publish::connect_options(&self.broker).await {
                Ok(options) => options
                    .connect(self.broker.broker.urls.as_slice())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match connected {
                Ok(client) => return Some(client),
                Err(error) => warn!(%error, "the write service cannot connect to the broker; retrying in 5s"),
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Takes one request: answers what needs no device at once, hands the rest to the
    /// device's endpoint task.
    async fn arrive(&self, client: &Client, message: Message, requests: &mut Requests, running: &mut Running) {
        let Some(reply_to) = message.reply.clone() else {
            warn!(subject = %message.subject, "a write request without a reply subject is ignored (send it as a request)");
            return;
        };
        // Answered without an audit: nothing names a device of the site to audit it under.
        let unattributed = |report: WriteReport| {
            let id = WriteRequest::decode(message.payload.clone())
                .map(|r| r.request_id)
                .unwrap_or_default();
            publish_reply(client, &reply_to, wire::reply(&id, &report).encode_to_vec().into())
        };
        // <device>.<tag> for one tag, <device> alone for a recipe.
        let Some((device, tag)) = message
            .subject
            .strip_prefix(&self.subject_base())
            .filter(|rest| !rest.is_empty())
            .map(|rest| rest.split_once('.').unwrap_or((rest, "")))
        else {
            let expected = format!("{}<device>.<tag> (or <device> for a recipe)", self.subject_base());
            let report = WriteReport::not_done(Outcome::Invalid, format!("the subject is not {expected}"));
            return unattributed(report).await;
        };
        let Some(route) = self.routes.read().expect("routes lock").get(device).cloned() else {
            warn!(subject = %message.subject, "a write request for a device the site does not have");
            return unattributed(WriteReport::not_done(
                Outcome::NotWritable,
                format!("the site has no device {device}"),
            ))
            .await;
        };
        let attempt = |request: WriteRequest| Attempt {
            device: device.to_owned(),
            tag: tag.to_owned(),
            units: route
                .spec
                .tags
                .iter()
                .filter(|t| t.name == tag || request.tags.iter().any(|w| w.tag == t.name))
                .filter_map(|t| Some((t.name.clone(), t.unit.clone()?)))
                .collect(),
            request,
        };
        let request = match WriteRequest::decode(message.payload.clone()) {
            Ok(request) => request,
            Err(e) => {
                let report = WriteReport::not_done(Outcome::Invalid, format!("not a WriteRequest: {e}"));
                let attempt = attempt(WriteRequest::default());
                return self.finish(client, &attempt, &report, Target::One(reply_to)).await;
            }
        };
        let writes = match usable(tag, &request) {
            Ok(writes) => writes,
            Err(why) => {
                let report = WriteReport::not_done(Outcome::Invalid, why);
                return self
                    .finish(client, &attempt(request), &report, Target::One(reply_to))
                    .await;
            }
        };
        let fingerprint = fingerprint(&message.subject, &request);
        match requests.arrive(&request.request_id, fingerprint, reply_to.clone()) {
            Seen::New => {}
            Seen::Running => return,
            Seen::Answered(reply) => return publish_reply(client, &reply_to, reply).await,
            Seen::Conflict => {
                let report = WriteReport::not_done(
                    Outcome::Invalid,
                    format!("request id {} was used for a different write", request.request_id),
                );
                return self
                    .finish(client, &attempt(request), &report, Target::One(reply_to))
                    .await;
            }
        }
        self.dispatch(client, &route, attempt(request), writes, requests, running)
            .await;
    }

    /// Hands a new request to its device's endpoint task, or answers why it cannot.
    async fn dispatch(
        &self,
        client: &Client,
        route: &Route,
        attempt: Attempt,
        writes: Vec<NamedWrite>,
        requests: &mut Requests,
        running: &mut Running,
    ) {
        if self.queue.is_paused() {
            // Its audit could not be stored: no write goes unaudited.
            let report = WriteReport::not_done(
                Outcome::Failed,
                "the queue is full (pausePolling) and could not keep the write's audit; not written",
            );
            return self.finish(client, &attempt, &report, Target::Waiters(requests)).await;
        }
        let (reply, outcome) = oneshot::channel();
        let job = WriteJob {
            device: attempt.device.clone(),
            tags: writes,
            deadline: Instant::now() + DEADLINE,
            reply,
        };
        if let Err(e) = route.jobs.try_send(job) {
            let detail = match e {
                mpsc::error::TrySendError::Full(_) => "the device's bus has too many writes waiting; not written",
                mpsc::error::TrySendError::Closed(_) => "the device's polling restarts; not written",
            };
            let report = WriteReport::not_done(Outcome::Failed, detail);
            return self.finish(client, &attempt, &report, Target::Waiters(requests)).await;
        }
        running.push(Box::pin(async move {
            let report = outcome.await.unwrap_or_else(|_| {
                WriteReport::not_done(
                    Outcome::Failed,
                    "the device's polling stopped before the write; not written",
                )
            });
            (attempt, report)
        }));
    }

    /// Audits an attempt through the queue, then answers it.
    async fn finish(&self, client: &Client, attempt: &Attempt, report: &WriteReport, target: Target<'_>) {
        let reply = wire::reply(&attempt.request.request_id, report);
        let encoded = Bytes::from(reply.encode_to_vec());
        // A full queue (pausePolling) holds appends until the broker takes points: the
        // audit's append runs on in its own task and lands then, and the requester is not
        // kept waiting for it.
        let queue = self.queue.clone();
        let audit = wire::audit(attempt, reply);
        let appended = tokio::spawn(async move { queue.append(vec![audit]).await });
        let wait = if self.queue.is_paused() {
            Duration::ZERO
        } else {
            AUDIT_WAIT
        };
        match tokio::time::timeout(wait, appended).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                error!(device = %attempt.device, tag = %attempt.tag, error = %e, "the audit of a write could not be persisted");
            }
            Ok(Err(e)) => error!(error = %e, "the audit's append task failed"),
            Err(_) => {
                warn!(device = %attempt.device, tag = %attempt.tag, "the audit of a write waits for room in the queue");
            }
        }
        self.state.count_write(report.outcome.label());
        let subjects = match target {
            Target::One(subject) => vec![subject],
            Target::Waiters(requests) => requests.answer(&attempt.request.request_id, encoded.clone()),
        };
        for subject in subjects {
            publish_reply(client, &subject, encoded.clone()).await;
        }
    }
}

/// The writes a request asks of `tag` (empty on a recipe's subject), or why it cannot be
/// used.
fn usable(tag: &str, request: &WriteRequest) -> Result<Vec<NamedWrite>, String> {
    if request.request_id.is_empty() {
        return Err("request_id is required: it makes a repeated request safe".into());
    }
    let value = |value: Option<&tagstream_proto::v1::Value>| value.and_then(wire::from_wire);
    if !tag.is_empty() {
        if !request.tags.is_empty() {
            return Err("a recipe (tags) goes to the device's subject, without a tag".into());
        }
        let value = value(request.value.as_ref()).ok_or("no value to write")?;
        return Ok(vec![NamedWrite {
            tag: tag.to_owned(),
            value,
            expected: request.expected.as_ref().and_then(wire::from_wire),
        }]);
    }
    if request.tags.is_empty() || request.value.is_some() || request.expected.is_some() {
        return Err("on a device's subject the request is a recipe: its tags, and no value or expected".into());
    }
    let mut writes: Vec<NamedWrite> = Vec::with_capacity(request.tags.len());
    for asked in &request.tags {
        if writes.iter().any(|w| w.tag == asked.tag) {
            return Err(format!("tag {} is in the recipe twice", asked.tag));
        }
        writes.push(NamedWrite {
            tag: asked.tag.clone(),
            value: value(asked.value.as_ref()).ok_or_else(|| format!("no value for tag {}", asked.tag))?,
            expected: asked.expected.as_ref().and_then(wire::from_wire),
        });
    }
    Ok(writes)
}

/// What a request asks, whoever asks it: the same id must always ask the same.
fn fingerprint(subject: &Subject, request: &WriteRequest) -> Bytes {
    let asked = WriteRequest {
        request_id: String::new(),
        requested_by: String::new(),
        ..request.clone()
    };
    [subject.as_bytes(), &asked.encode_to_vec()].concat().into()
}

/// Who gets a reply: one requester, or every requester waiting on the request id.
enum Target<'a> {
    One(Subject),
    Waiters(&'a mut Requests),
}

async fn publish_reply(client: &Client, subject: &Subject, reply: Bytes) {
    match tokio::time::timeout(BROKER_WAIT, client.publish(subject.clone(), reply)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(%subject, error = %e, "a write reply could not be sent"),
        Err(_) => warn!(%subject, "a write reply could not be sent: the broker takes nothing"),
    }
}
