//! Polling: one task owns each endpoint (a TCP host:port or a serial port). The devices
//! (unit ids) behind it share its one connection and their requests are serialised;
//! different endpoints poll in parallel. A device that fails backs off exponentially with
//! jitter and is skipped while it does, so it never delays its neighbours for longer than
//! one timeout, and never those on other endpoints.
//!
//! Writes to a device are sent to its endpoint's task, which performs them between two
//! polls: the task owns the connection, so a write never races a poll on a single-connection
//! gateway or a serial bus.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tagstream_crds::{Device, DeviceSpec};
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::ExceptionCode;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use tagstream_core::report::DeviceHealth;

use super::{
    connection::{self, Data, Link, RequestError},
    decode::{self, Layout},
    filter::Filter,
    plan::{self, PollGroup, Read, TagSlot},
    write::{self, Outcome, TagWrite, WriteReport},
};
use tagstream_core::point::{PointValue, Sample, now_ns};

/// A write for the endpoint task of the device to perform between polls.
#[derive(Debug)]
pub struct WriteJob {
    pub device: String,
    /// The tags to write together: one for a tag's write, several for a recipe.
    pub tags: Vec<NamedWrite>,
    /// Not started after this: the requester has given up waiting by then.
    pub deadline: Instant,
    pub reply: oneshot::Sender<WriteReport>,
}

/// One tag of a write job.
#[derive(Clone, Debug)]
pub struct NamedWrite {
    pub tag: String,
    /// In engineering units.
    pub value: PointValue,
    /// Write only if the tag reads this now.
    pub expected: Option<PointValue>,
}

/// Write jobs an endpoint task holds before new ones are refused as busy.
pub const WRITE_QUEUE: usize = 16;

/// A device as the rest of the ingestor sees it.
#[derive(Debug)]
pub struct PolledDevice {
    pub name: String,
    pub spec: DeviceSpec,
}

/// The points one poll of one device publishes.
#[derive(Debug)]
pub struct PolledBatch {
    pub device: Arc<PolledDevice>,
    /// (index in `spec.tags`, sample)
    pub points: Vec<(usize, Sample)>,
}

/// One tag as read: the raw data it was decoded from, when there was any, and the sample.
#[derive(Clone, Debug, PartialEq)]
pub struct TagReading {
    pub tag: usize,
    pub raw: Option<Data>,
    pub sample: Sample,
}

/// Decodes one tag of a successful read, with a copy of its raw data when `keep_raw`.
fn reading(layouts: &[Layout], slot: &TagSlot, data: &Data, at: i64, keep_raw: bool) -> TagReading {
    let range = usize::from(slot.offset)..usize::from(slot.offset + slot.count);
    let (raw, decoded) = match data {
        Data::Bits(bits) => {
            let part = &bits[range];
            (
                keep_raw.then(|| Data::Bits(part.to_vec())),
                Ok(PointValue::Bool(part[0])),
            )
        }
        Data::Registers(registers) => {
            let part = &registers[range];
            let value = decode::decode_registers(part, &layouts[slot.tag]);
            (keep_raw.then(|| Data::Registers(part.to_vec())), value)
        }
    };
    let sample = match decoded {
        Ok(raw_value) => Sample::good(layouts[slot.tag].scaling.apply(raw_value), at),
        Err(e) => Sample::bad(e.to_string(), at),
    };
    TagReading {
        tag: slot.tag,
        raw,
        sample,
    }
}

/// Reads `reads` in order on an open connection addressed to the device. A coalesced read
/// the device refuses with an exception is split, in place, so later polls keep the good
/// tags flowing; a refused single range makes its tags Bad. A transport failure ends the
/// poll with `Err`. A read that times out is sent again up to `retries` times. Each reading
/// keeps a copy of its raw data when `keep_raw` (for `read`; polling publishes samples
/// only, and the copy was one allocation per point).
pub async fn poll_reads(
    context: &mut Link,
    device: &DeviceSpec,
    layouts: &[Layout],
    reads: &mut Vec<Read>,
    at: i64,
    keep_raw: bool,
    retries: u8,
) -> Result<Vec<TagReading>, RequestError> {
    let mut readings = Vec::new();
    let mut index = 0;
    while index < reads.len() {
        if index > 0
            && let Some(pause) = device.quirks.request_delay
        {
            tokio::time::sleep(pause.get()).await;
        }
        match execute_with_retries(context, &reads[index], device, retries).await {
            Ok(data) => {
                readings.extend(
                    reads[index]
                        .tags
                        .iter()
                        .map(|slot| reading(layouts, slot, &data, at, keep_raw)),
                );
                index += 1;
            }
            Err(RequestError::Exception(code)) if reads[index].split().len() > 1 => {
                let parts = reads[index].split();
                debug!(start = reads[index].start, count = reads[index].count, exception = %code, "splitting a refused read");
                reads.splice(index..=index, parts);
            }
            Err(error @ RequestError::Exception(_)) => {
                let reason = error.to_string();
                readings.extend(reads[index].tags.iter().map(|slot| TagReading {
                    tag: slot.tag,
                    raw: None,
                    sample: Sample::bad(reason.clone(), at),
                }));
                index += 1;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(readings)
}

/// One read, asked again after a busy exception (the `busyRetries` quirk) and after a
/// timeout (`retries`). A timeout that ends the retries on a link where the request before
/// it went unanswered too marks the link silent: nothing answers there any more (a
/// half-open connection, a gateway gone), and it is reopened. One that follows an answer
/// leaves the connection to the unit's neighbours.
async fn execute_with_retries(
    context: &mut Link,
    read: &Read,
    device: &DeviceSpec,
    retries: u8,
) -> Result<Data, RequestError> {
    let mut busy_retries = device.quirks.busy_retries;
    let mut timeout_retries = retries;
    let answered_before = context.unanswered() == 0;
    loop {
        match connection::execute(context, read, device.timeout.get()).await {
            Err(RequestError::Exception(ExceptionCode::ServerDeviceBusy)) if busy_retries > 0 => {
                busy_retries -= 1;
                tokio::time::sleep(device.timeout.get() / 4).await;
            }
            Err(RequestError::Timeout(_)) if timeout_retries > 0 => {
                timeout_retries -= 1;
                context.note_retry();
            }
            Err(error @ RequestError::Timeout(_)) => {
                if !answered_before {
                    context.mark_silent();
                }
                return Err(error);
            }
            other => return other,
        }
    }
}

/// A device's polling state inside its endpoint's task.
#[derive(Debug)]
pub struct DevicePoller {
    device: Arc<PolledDevice>,
    layouts: Vec<Layout>,
    groups: Vec<(PollGroup, Instant)>,
    filters: Vec<Filter>,
    health: Arc<Mutex<DeviceHealth>>,
    failures: u32,
    backoff_until: Instant,
    /// When skipped cycles were last logged (at most once a minute per device).
    skips_logged: Option<Instant>,
}

/// How often a device that keeps skipping poll cycles is logged.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl DevicePoller {
    pub fn new(name: &str, spec: &DeviceSpec, health: Arc<Mutex<DeviceHealth>>) -> Self {
        let now = Instant::now();
        Self {
            layouts: layouts(spec),
            groups: plan::plan(spec).into_iter().map(|g| (g, now)).collect(),
            filters: spec.tags.iter().map(Filter::new).collect(),
            device: Arc::new(PolledDevice {
                name: name.to_owned(),
                spec: spec.clone(),
            }),
            health,
            failures: 0,
            backoff_until: now,
            skips_logged: None,
        }
    }

    /// Counts cycles skipped because a poll of `group` outlasted its interval.
    fn skipped(&mut self, group: usize, cycles: u64) {
        let total = {
            let mut health = self.health.lock().expect("health lock");
            health.record_skipped(cycles);
            health.poll_cycles_skipped
        };
        if self.skips_logged.is_none_or(|at| at.elapsed() >= SKIP_LOG_INTERVAL) {
            self.skips_logged = Some(Instant::now());
            let interval = self.groups[group].0.interval;
            warn!(device = %self.device.name, ?interval, skipped = total, "polling falls behind: a cycle outlasted the poll interval and the cycles it overran are skipped");
        }
    }

    fn next(&self) -> Option<(usize, Instant)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, (_, due))| (i, (*due).max(self.backoff_until)))
            .min_by_key(|(_, due)| *due)
    }

    fn backoff(&mut self, error: &RequestError) {
        self.failures += 1;
        let base = Duration::from_millis(500).saturating_mul(1 << self.failures.min(7).saturating_sub(1));
        let delay = base.min(Duration::from_secs(60)).mul_f64(0.8 + fastrand::f64() * 0.4);
        self.backoff_until = Instant::now() + delay;
        let mut health = self.health.lock().expect("health lock");
        health.record_failure(error.to_string(), self.failures);
        if self.failures == 1 {
            warn!(device = %self.device.name, %error, retry_in = ?delay, "device poll failed");
        } else {
            debug!(device = %self.device.name, %error, failures = self.failures, retry_in = ?delay, "device still failing");
        }
    }
}

/// Read layouts of a device's tags.
pub fn layouts(spec: &DeviceSpec) -> Vec<Layout> {
    spec.tags.iter().map(|t| Layout::of(t, spec.byte_order)).collect()
}

/// Polls every device behind one endpoint until `shutdown`, sending published points to
/// `out`, and performs the `writes` between polls. Ends early when `out` is closed.
pub async fn run_endpoint(
    mut devices: Vec<DevicePoller>,
    out: mpsc::Sender<PolledBatch>,
    mut writes: mpsc::Receiver<WriteJob>,
    shutdown: CancellationToken,
) {
    let Some(first) = devices.first() else { return };
    let endpoint = first.device.spec.connection.endpoint().unwrap_or_default();
    let mut context: Option<Link> = None;
    let mut wrote_last = false;
    info!(%endpoint, devices = devices.len(), "polling endpoint");
    loop {
        let Some((d, g, due)) = devices
            .iter()
            .enumerate()
            .filter_map(|(d, dev)| dev.next().map(|(g, due)| (d, g, due)))
            .min_by_key(|(_, _, due)| *due)
        else {
            return;
        };
        // A write goes first, but never two in a row while a poll is due: a stream of
        // writes cannot starve polling, nor a device that falls behind starve the writes.
        let poll_due = Instant::now() >= due;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(job) = writes.recv(), if !(wrote_last && poll_due) => {
                serve_write(&mut context, &devices, job).await;
                wrote_last = true;
                continue;
            }
            () = tokio::time::sleep_until(due.into()) => {}
        }
        wrote_last = false;
        let device = &mut devices[d];
        let result = poll_group(&mut context, device, g).await;
        let interval = device.groups[g].0.interval;
        let now = Instant::now();
        let next_due = &mut device.groups[g].1;
        *next_due += interval;
        if *next_due <= now {
            // Missed cycles are skipped, keeping the cadence.
            let behind = now.duration_since(*next_due).as_nanos() / interval.as_nanos().max(1) + 1;
            *next_due += interval * u32::try_from(behind).unwrap_or(u32::MAX);
            // Only a device that answers counts as falling behind: a failing one says so
            // already, and its retries wait out a backoff longer than its interval.
            if result.is_ok() {
                device.skipped(g, u64::try_from(behind).unwrap_or(u64::MAX));
            }
        }
        let batch = match result {
            Ok(points) => points,
            Err(error) => {
                // A link gone silent is reopened by `connected` before the next request.
                if error.breaks_connection() {
                    context = None;
                }
                let first_failure = device.failures == 0;
                device.backoff(&error);
                if !first_failure {
                    continue;
                }
                // One Bad point per tag when a device goes down; none while it stays down.
                let at = now_ns();
                let reason = error.to_string();
                let tags: Vec<usize> = device.groups[g]
                    .0
                    .reads
                    .iter()
                    .flat_map(|r| r.tags.iter().map(|s| s.tag))
                    .collect();
                tags.into_iter()
                    .map(|tag| (tag, Sample::bad(reason.clone(), at)))
                    .filter(|(tag, sample)| device.filters[*tag].admit(sample))
                    .collect()
            }
        };
        if device.device.spec.quirks.close_after_poll {
            context = None;
        }
        if batch.is_empty() {
            continue;
        }
        let message = PolledBatch {
            device: Arc::clone(&device.device),
            points: batch,
        };
        // A full channel (a paused queue) must not hold a shutdown: the batch in hand was
        // never stored, and the stop goes on without it.
        tokio::select! {
            sent = out.send(message) => if sent.is_err() { return },
            () = shutdown.cancelled() => break,
        }
    }
    if let Some(link) = context {
        link.disconnect().await;
    }
}

/// The endpoint's connection, opened when needed (or reopened when it is no longer
/// usable), addressed to the device.
pub async fn connected<'a>(context: &'a mut Option<Link>, spec: &DeviceSpec) -> Result<&'a mut Link, RequestError> {
    if let Some(old) = context.take_if(|link| !link.usable()) {
        old.disconnect().await;
    }
    if context.is_none() {
        let fresh = connection::connect(&spec.connection, spec.unit_id, spec.timeout.get()).await?;
        if let Some(pause) = spec.quirks.connect_delay {
            tokio::time::sleep(pause.get()).await;
        }
        *context = Some(fresh);
    }
    let link = context.as_mut().expect("connected above");
    link.set_unit(spec.unit_id);
    Ok(link)
}

/// Performs one write job on the endpoint's connection and replies to it.
async fn serve_write(context: &mut Option<Link>, devices: &[DevicePoller], job: WriteJob) {
    let report = if Instant::now() > job.deadline {
        WriteReport::not_done(
            Outcome::Timeout,
            "the device's bus was busy past the request's deadline; not written",
        )
    } else if let Some(device) = devices.iter().find(|d| d.device.name == job.device) {
        let spec = &device.device.spec;
        let resolved: Result<Vec<TagWrite>, String> = job
            .tags
            .iter()
            .map(|named| {
                let index = spec.tags.iter().position(|t| t.name == named.tag);
                index
                    .map(|index| TagWrite {
                        index,
                        value: named.value.clone(),
                        expected: named.expected.clone(),
                    })
                    .ok_or_else(|| format!("device {} has no tag {}", job.device, named.tag))
            })
            .collect();
        match resolved {
            Err(missing) => WriteReport::not_done(Outcome::NotWritable, missing),
            Ok(writes) => {
                let written = match connected(context, spec).await {
                    Ok(link) => write::write_tags(link, spec, &device.layouts, &writes).await,
                    Err(error) => Err(error),
                };
                // A device shared with another master gets its connection back after a write
                // as after a poll.
                if spec.quirks.close_after_poll || written.as_ref().is_err_and(RequestError::breaks_connection) {
                    *context = None;
                }
                written.unwrap_or_else(|error| WriteReport::failed(&error, None))
            }
        }
    } else {
        WriteReport::not_done(Outcome::NotWritable, format!("no device {}", job.device))
    };
    let tags: Vec<String> = job.tags.iter().map(|t| format!("{}={}", t.tag, t.value)).collect();
    info!(device = %job.device, tags = %tags.join(" "), outcome = %report.outcome, detail = %report.detail, "write");
    let _ = job.reply.send(report);
}

/// Polls one group of one device, connecting first when needed; returns the points the
/// filters let through.
async fn poll_group(
    context: &mut Option<Link>,
    device: &mut DevicePoller,
    group: usize,
) -> Result<Vec<(usize, Sample)>, RequestError> {
    let spec = &device.device.spec;
    let ctx = connected(context, spec).await?;
    let at = now_ns();
    // A failing device is probed once per backoff; retries are for one that answers.
    let retries = if device.failures == 0 { spec.retries } else { 0 };
    let polled = poll_reads(
        ctx,
        spec,
        &device.layouts,
        &mut device.groups[group].0.reads,
        at,
        false,
        retries,
    )
    .await;
    let sent_again = ctx.take_retried();
    if sent_again > 0 {
        device.health.lock().expect("health lock").requests_retried += sent_again;
    }
    let readings = polled?;
    if device.failures > 0 {
        info!(device = %device.device.name, failures = device.failures, "device answers again");
    }
    device.failures = 0;
    device.health.lock().expect("health lock").record_success(at);
    Ok(readings
        .into_iter()
        .filter(|r| device.filters[r.tag].admit(&r.sample))
        .map(|r| (r.tag, r.sample))
        .collect())
}

/// Each device's health, by device name.
pub type HealthMap = BTreeMap<String, Arc<Mutex<DeviceHealth>>>;

/// The devices grouped by the endpoint they share: one connection, one polling task each.
pub fn by_endpoint(devices: &[Device]) -> BTreeMap<String, Vec<Device>> {
    let mut map: BTreeMap<String, Vec<Device>> = BTreeMap::new();
    for device in devices {
        map.entry(device.spec.connection.endpoint().unwrap_or_default())
            .or_default()
            .push(device.clone());
    }
    map
}

/// A started endpoint task.
#[derive(Debug)]
pub struct EndpointTask {
    pub task: tokio::task::JoinHandle<()>,
    /// Each device's health, by device name.
    pub health: HealthMap,
    /// Where writes to its devices go.
    pub writes: mpsc::Sender<WriteJob>,
}

/// Starts the polling task of devices that share one endpoint.
pub fn spawn_endpoint(
    devices: &[Device],
    out: &mpsc::Sender<PolledBatch>,
    shutdown: &CancellationToken,
) -> EndpointTask {
    let mut health = BTreeMap::new();
    let pollers = devices
        .iter()
        .map(|device| {
            let name = device.metadata.name.clone().unwrap_or_default();
            let state = Arc::new(Mutex::new(DeviceHealth::default()));
            health.insert(name.clone(), Arc::clone(&state));
            DevicePoller::new(&name, &device.spec, state)
        })
        .collect();
    let (writes, jobs) = mpsc::channel(WRITE_QUEUE);
    let task = tokio::spawn(run_endpoint(pollers, out.clone(), jobs, shutdown.clone()));
    EndpointTask { task, health, writes }
}

/// Starts one polling task per endpoint for `devices`; returns each device's health.
pub fn spawn(
    devices: &[Device],
    out: &mpsc::Sender<PolledBatch>,
    shutdown: &CancellationToken,
) -> (Vec<tokio::task::JoinHandle<()>>, HealthMap) {
    let mut health = BTreeMap::new();
    let tasks = by_endpoint(devices)
        .values()
        .map(|group| {
            let endpoint = spawn_endpoint(group, out, shutdown);
            health.extend(endpoint.health);
            endpoint.task
        })
        .collect();
    (tasks, health)
}
