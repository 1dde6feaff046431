//! What the operator writes into `status`: pure functions from the objects and the
//! ingestor's report, and the rule for when a write is worth making.
//!
//! Two writers share each object's status, each owning its own fields, and each writes
//! them with server-side apply under its own field manager ([`FieldManager`]):
//! - the reconcile of a Site writes what it deployed: `observedGeneration`, Device
//!   `tagCount`, Site `devices`/`formulas`, and the Formula `Valid` condition and
//!   `dependencyOrder` ([`DeviceDeployed`], [`SiteDeployed`], [`FormulaDeployed`]);
//! - the status loop writes what the ingestor reports: Device and Site conditions, poll
//!   and queue figures, a Formula's last value ([`DeviceReported`], [`SiteReported`],
//!   [`FormulaReported`]).
//!
//! An apply sends a writer's whole intent for its fields, so the API server merges the
//! two by field (and `conditions`, a list keyed by `type`, by condition): a writer whose
//! cached object predates the other's last write cannot undo it, and a field a writer
//! stops sending (an empty queue's oldest age) is removed. A JSON merge patch did neither.
//!
//! Counters and timestamps change on every poll; writing them every period would load the
//! API server with a write per device every few seconds. They are written when something a
//! user acts on changed (a condition, an error), or when the object's last report write is
//! older than the heartbeat (`heartbeat_due`, kept by the caller), as the kubelet does with
//! node status.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::ResourceExt;
use serde::Serialize;
use tagstream_core::{calc::FormulaError, report::Status as Report};
use tagstream_crds::{
    Device, Formula, Site,
    condition_types::{BROKER_DURABLE, CONNECTED, QUEUE_HEALTHY, READY, VALID},
    site::QueueStatus,
};

/// The oldest queued point may be this old before the queue is reported unhealthy.
pub const QUEUE_BACKLOG_LIMIT: Duration = Duration::from_secs(300);

/// `status.dependencyOrder`'s `maxItems` in the Formula CRD.
const MAX_DEPENDENCY_ORDER: usize = 1024;

/// The field managers of the two status writers. Their fields are disjoint, so neither
/// takes a field from the other; their applies are forced all the same, to take over
/// what an earlier version of the operator wrote with merge patches (as an `Update`
/// manager, which a non-forced apply of a different value conflicts with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldManager {
    Reconcile,
    StatusLoop,
}

impl FieldManager {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reconcile => "tagstream-operator-reconcile",
            Self::StatusLoop => "tagstream-operator-status",
        }
    }
}

/// A condition's state: `True`, `False` or `Unknown` with a reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl State {
    fn new(status: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The condition `type_` in `state`, keeping its transition time when the status did not
/// change (Kubernetes conventions).
pub fn condition(
    existing: &[Condition],
    type_: &str,
    state: &State,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let previous = existing.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(c) if c.status == state.status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        last_transition_time,
        message: state.message.clone(),
        observed_generation: generation,
        reason: state.reason.into(),
        status: state.status.into(),
        type_: type_.into(),
    }
}

/// Whether two condition lists say the same thing (times aside).
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone());
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// The `Valid` condition of a formula.
pub fn formula_validity(issue: Option<&FormulaError>) -> State {
    match issue {
        None => State::new(
            "True",
            "Compiled",
            "the formula compiles, its inputs exist and it is on no cycle",
        ),
        Some(error) => State::new("False", error.reason(), error.to_string()),
    }
}

/// What the reconcile owns of a Formula's status.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FormulaDeployed {
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub dependency_order: Vec<String>,
}

/// What the reconcile owns of a Formula's status, or `None` when the stored status
/// already says it.
pub fn formula_deployed(
    formula: &Formula,
    issue: Option<&FormulaError>,
    dependency_order: &[String],
    now: Timestamp,
) -> Option<FormulaDeployed> {
    let current = formula.status.clone().unwrap_or_default();
    let generation = formula.metadata.generation;
    // The schema bounds the list; a longer one would make the API server refuse the write.
    let dependency_order = &dependency_order[..dependency_order.len().min(MAX_DEPENDENCY_ORDER)];
    let valid = condition(&current.conditions, VALID, &formula_validity(issue), generation, now);
    let unchanged = current.observed_generation == generation
        && current.dependency_order == dependency_order
        && same_conditions(&current.conditions, std::slice::from_ref(&valid));
    (!unchanged).then(|| FormulaDeployed {
        conditions: vec![valid],
        observed_generation: generation,
        dependency_order: dependency_order.to_vec(),
    })
}

const AWAITING_INGESTOR: &str = "waiting for the site's ingestor to report";

/// What the reconcile owns of a Device's status.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDeployed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub tag_count: u32,
}

/// What the reconcile deployed for a Device, or `None` when stored.
pub fn device_deployed(device: &Device) -> Option<DeviceDeployed> {
    let current = device.status.clone().unwrap_or_default();
    let deployed = DeviceDeployed {
        observed_generation: device.metadata.generation,
        tag_count: device.spec.tags.len() as u32,
    };
    let stored =
        current.observed_generation == deployed.observed_generation && current.tag_count == Some(deployed.tag_count);
    (!stored).then_some(deployed)
}

/// What the reconcile owns of a Site's status.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteDeployed {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub devices: u32,
    pub formulas: u32,
    pub config_bytes: u64,
}

/// What the reconcile deployed for a Site, or `None` when stored.
pub fn site_deployed(site: &Site, devices: u32, formulas: u32, config_bytes: u64) -> Option<SiteDeployed> {
    let current = site.status.clone().unwrap_or_default();
    let stored = current.observed_generation == site.metadata.generation
        && current.devices == devices
        && current.formulas == formulas
        && current.config_bytes == config_bytes;
    (!stored).then_some(SiteDeployed {
        observed_generation: site.metadata.generation,
        devices,
        formulas,
        config_bytes,
    })
}

fn time_from_ns(ns: i64) -> Option<Time> {
    Timestamp::from_nanosecond(i128::from(ns)).ok().map(Time)
}

/// How the ingestor of a device's site answered.
pub type Reached<'a> = Result<&'a Report, &'a str>;

/// What the status loop owns of a Device's status.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReported {
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,
    pub polls: u64,
    pub failed_polls: u64,
    pub poll_cycles_skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A Device's status from its ingestor's report, or `None` when the stored status says
/// the same and is fresh enough.
pub fn device_reported(
    device: &Device,
    report: Reached<'_>,
    now: Timestamp,
    heartbeat_due: bool,
) -> Option<DeviceReported> {
    let current = device.status.clone().unwrap_or_default();
    let generation = device.metadata.generation;
    let health = report.ok().and_then(|r| r.devices.get(&device.name_any()));
    let (connected, ready) = match (report, health) {
        // Why it does not answer is on the Site; repeating it on every Device would cost a
        // write per Device whenever the reason changes.
        (Err(_), _) => (
            State::new("Unknown", "IngestorNotReady", AWAITING_INGESTOR),
            State::new("False", "IngestorNotReady", AWAITING_INGESTOR),
        ),
        (Ok(_), None) => (
            State::new(
                "Unknown",
                "NotPolled",
                "the site's ingestor does not poll this device yet",
            ),
            State::new(
                "False",
                "NotDeployed",
                "the site's ingestor does not run this device yet",
            ),
        ),
        (Ok(_), Some(h)) => {
            let connected = if h.connected {
                State::new("True", "Polling", "the last poll reached the device")
            } else if h.polls == 0 {
                State::new("Unknown", "NotPolled", "not polled yet")
            } else {
                State::new("False", "PollFailed", h.last_error.clone().unwrap_or_default())
            };
            let ready = if current.observed_generation == generation {
                State::new(
                    "True",
                    "Deployed",
                    "the site's ingestor runs this device's current spec",
                )
            } else {
                State::new("False", "Deploying", "the current spec is not deployed yet")
            };
            (connected, ready)
        }
    };
    let conditions = vec![
        condition(&current.conditions, CONNECTED, &connected, generation, now),
        condition(&current.conditions, READY, &ready, generation, now),
    ];
    let last_poll_time = health.and_then(|h| h.last_success_ns).and_then(time_from_ns);
    let last_error = health.and_then(|h| h.last_error.clone());
    let (polls, failed_polls, skipped) = health.map_or((0, 0, 0), |h| (h.polls, h.failed_polls, h.poll_cycles_skipped));
    let significant = !same_conditions(&current.conditions, &conditions) || current.last_error != last_error;
    let moved = current.polls != polls
        || current.failed_polls != failed_polls
        || current.poll_cycles_skipped != skipped
        || current.last_poll_time != last_poll_time;
    let write = significant || (moved && heartbeat_due);
    write.then_some(DeviceReported {
        conditions,
        last_poll_time,
        polls,
        failed_polls,
        poll_cycles_skipped: skipped,
        last_error,
    })
}

/// What the status loop owns of a Formula's status: its latest result.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FormulaReported {
    pub last_value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_value_time: Option<Time>,
}

/// A Formula's latest result from its ingestor's report, or `None`. Results change every
/// cycle: they are written once per heartbeat at most.
pub fn formula_reported(formula: &Formula, report: Reached<'_>, heartbeat_due: bool) -> Option<FormulaReported> {
    let reported = report.ok()?.formulas.get(&formula.name_any())?;
    let last_value = reported.last_value.clone()?;
    let current = formula.status.clone().unwrap_or_default();
    let time = reported.last_value_ns.and_then(time_from_ns);
    let moved = current.last_value.as_ref() != Some(&last_value) || current.last_value_time != time;
    (moved && heartbeat_due).then_some(FormulaReported {
        last_value,
        last_value_time: time,
    })
}

/// The status of a Device whose Site does not exist (deleted, or not created yet): not
/// polled by anything, so no poll figures. `None` when its status already says so.
pub fn siteless_device(device: &Device, now: Timestamp) -> Option<DeviceReported> {
    let current = device.status.clone().unwrap_or_default();
    let generation = device.metadata.generation;
    let why = format!("Site {} does not exist in this namespace", device.spec.site);
    let conditions = vec![
        condition(
            &current.conditions,
            CONNECTED,
            &State::new("Unknown", "SiteNotFound", why.clone()),
            generation,
            now,
        ),
        condition(
            &current.conditions,
            READY,
            &State::new("False", "SiteNotFound", why),
            generation,
            now,
        ),
    ];
    (!same_conditions(&current.conditions, &conditions)).then_some(DeviceReported {
        conditions,
        last_poll_time: None,
        polls: 0,
        failed_polls: 0,
        poll_cycles_skipped: 0,
        last_error: None,
    })
}

/// `QueueHealthy` reasons that warrant a Warning event when they appear.
pub const DISK_FULL: &str = "DiskFull";
pub const QUEUE_WRITE_FAILING: &str = "QueueWriteFailing";
pub const BROKER_MISCONFIGURED: &str = "BrokerMisconfigured";

/// The `QueueHealthy` condition from the ingestor's report.
fn queue_health(report: &Report) -> State {
    let queue = &report.queue;
    if let Some(path) = &queue.moved_aside {
        return State::new(
            "False",
            "QueueCorrupt",
            format!("the queue was corrupt and moved aside to {path}"),
        );
    }
    if let Some(error) = &queue.write_error {
        return State::new(
            "False",
            QUEUE_WRITE_FAILING,
            format!("the queue cannot write ({error}); new points are held until it can"),
        );
    }
    if queue.disk_full {
        // No changing figures in the message: a new message is a status write and an
        // event; the count is in status.queue.dropped.
        let policy = if queue.paused {
            "polling is paused until the broker takes queued points (pausePolling)"
        } else {
            "the oldest points are dropped to make room (dropOldest; status.queue.dropped counts them)"
        };
        return State::new(
            "False",
            DISK_FULL,
            format!("the queue's volume is nearly full: {policy}"),
        );
    }
    if queue.paused {
        return State::new("False", "QueueFull", "the queue is full and polling is paused");
    }
    if let Some(refused) = &report.publisher.config_error {
        return State::new("False", BROKER_MISCONFIGURED, refused.clone());
    }
    if !report.publisher.connected {
        let why = report
            .publisher
            .last_error
            .clone()
            .unwrap_or_else(|| "not connected".into());
        return State::new("False", "BrokerUnreachable", why);
    }
    match queue.oldest_age_seconds {
        Some(age) if age > QUEUE_BACKLOG_LIMIT.as_secs_f64() => {
            State::new("False", "Backlog", format!("the oldest queued point is {age:.0} s old"))
        }
        _ => State::new("True", "Publishing", "points are published as they are polled"),
    }
}

/// The `BrokerDurable` reason that warrants a Warning event when it appears.
pub const BROKER_LOST_RECORDS: &str = "BrokerLostRecords";

/// How long a broker's loss keeps `BrokerDurable` False after it was found.
const BROKER_LOSS_SHOWN_FOR: Duration = Duration::from_secs(3600);

/// The `BrokerDurable` condition from the ingestor's report: False for an hour after the
/// publisher found that the broker no longer held records it had acknowledged.
fn broker_durability(report: &Report, now: Timestamp) -> State {
    let publisher = &report.publisher;
    let recent = publisher.last_broker_loss_ns.is_some_and(|at| {
        let age_ns = now.as_nanosecond().saturating_sub(i128::from(at));
        age_ns < BROKER_LOSS_SHOWN_FOR.as_nanos() as i128
    });
    match &publisher.last_broker_loss {
        Some(loss) if recent => State::new("False", BROKER_LOST_RECORDS, loss.clone()),
        _ => State::new(
            "True",
            "AcknowledgedRecordsHeld",
            "the broker held every record it acknowledged when the ingestor last (re)connected",
        ),
    }
}

/// What the status loop owns of a Site's status.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteReported {
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
}

/// A Site's status from its ingestor's report, or `None`.
pub fn site_reported(site: &Site, report: Reached<'_>, now: Timestamp, heartbeat_due: bool) -> Option<SiteReported> {
    let current = site.status.clone().unwrap_or_default();
    let generation = site.metadata.generation;
    let (ready, queue_state, broker_state, queue) = match report {
        Err(why) => (
            State::new("False", "IngestorNotReady", why),
            State::new("Unknown", "IngestorNotReady", why),
            State::new("Unknown", "IngestorNotReady", why),
            current.queue.clone(),
        ),
        Ok(report) => (
            State::new("True", "IngestorRunning", "the site's ingestor is running"),
            queue_health(report),
            broker_durability(report, now),
            Some(QueueStatus {
                depth: report.queue.points,
                bytes: report.queue.disk_bytes,
                oldest_age_seconds: report.queue.oldest_age_seconds,
                dropped: report.queue.dropped_points,
            }),
        ),
    };
    let conditions = vec![
        condition(&current.conditions, READY, &ready, generation, now),
        condition(&current.conditions, QUEUE_HEALTHY, &queue_state, generation, now),
        condition(&current.conditions, BROKER_DURABLE, &broker_state, generation, now),
    ];
    let significant = !same_conditions(&current.conditions, &conditions);
    let write = significant || (current.queue != queue && heartbeat_due);
    write.then_some(SiteReported { conditions, queue })
}

/// Whether `after` turns the condition `type_` to `False` from anything else in `before`
/// (for events, which say a thing once, when it happens).
pub fn turns_false(before: &[Condition], after: &[Condition], type_: &str) -> bool {
    turns(before, after, type_, "False")
}

/// Whether `after` turns the condition `type_` to `to` from anything else in `before`.
pub fn turns(before: &[Condition], after: &[Condition], type_: &str, to: &str) -> bool {
    condition_status(after, type_) == Some(to) && condition_status(before, type_) != Some(to)
}

/// The condition `type_` in `after`, when it has a new reason since `before` (for events).
pub fn new_reason<'a>(before: &[Condition], after: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    let now = after.iter().find(|c| c.type_ == type_)?;
    let was = before.iter().find(|c| c.type_ == type_).map(|c| c.reason.as_str());
    (was != Some(now.reason.as_str())).then_some(now)
}

/// The status (`True`, `False`, `Unknown`) of the condition `type_` in `list`.
pub fn condition_status<'a>(list: &'a [Condition], type_: &str) -> Option<&'a str> {
    list.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn formula() -> Formula {
        let spec = serde_json::from_value(json!({"site": "a", "inputs": {"x": "d/t"}, "expression": "x"})).unwrap();
        let mut formula = Formula::new("f", spec);
        formula.metadata.generation = Some(1);
        formula
    }

    #[test]
    fn a_dependency_order_longer_than_the_schema_allows_is_cut_to_fit() {
        let order: Vec<String> = (0..2000).map(|i| format!("f{i}")).collect();
        let deployed = formula_deployed(&formula(), None, &order, Timestamp::now()).unwrap();
        assert_eq!(deployed.dependency_order.len(), MAX_DEPENDENCY_ORDER);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let then = Timestamp::from_second(1_700_000_000).unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let true_ = State::new("True", "Polling", "ok");
        let first = condition(&[], CONNECTED, &true_, Some(1), then);
        let again = condition(std::slice::from_ref(&first), CONNECTED, &true_, Some(1), now);
        assert_eq!(again.last_transition_time, Time(then));
        let false_ = State::new("False", "PollFailed", "timeout");
        let changed = condition(&[again], CONNECTED, &false_, Some(1), now);
        assert_eq!(changed.last_transition_time, Time(now));
    }

    fn fields(status: &impl Serialize) -> Vec<String> {
        let Value::Object(map) = serde_json::to_value(status).unwrap() else {
            panic!("a status is an object");
        };
        map.keys().cloned().collect()
    }

    /// The two writers apply disjoint fields of each kind's status: neither removes or
    /// conflicts with the other's (every optional field set, so that each is counted).
    #[test]
    fn the_reconcile_and_the_status_loop_own_disjoint_fields() {
        let time = Some(Time(Timestamp::now()));
        let reported = DeviceReported {
            conditions: vec![],
            last_poll_time: time.clone(),
            polls: 1,
            failed_polls: 1,
            poll_cycles_skipped: 1,
            last_error: Some("e".into()),
        };
        let deployed = DeviceDeployed {
            observed_generation: Some(1),
            tag_count: 1,
        };
        let site_reported = SiteReported {
            conditions: vec![],
            queue: Some(QueueStatus::default()),
        };
        let site_deployed = SiteDeployed {
            observed_generation: Some(1),
            devices: 1,
            formulas: 1,
            config_bytes: 1,
        };
        let formula_reported = FormulaReported {
            last_value: "1".into(),
            last_value_time: time,
        };
        let formula_deployed = FormulaDeployed {
            conditions: vec![],
            observed_generation: Some(1),
            dependency_order: vec![],
        };
        for (reconcile, status_loop) in [
            (fields(&deployed), fields(&reported)),
            (fields(&site_deployed), fields(&site_reported)),
            (fields(&formula_deployed), fields(&formula_reported)),
        ] {
            assert!(
                reconcile.iter().all(|f| !status_loop.contains(f)),
                "{reconcile:?} and {status_loop:?} share a field"
            );
        }
    }
}
