//! What the operator writes into `status`: pure functions from the objects and the
//! ingestor's report, and the rule for when a write is worth making.
//!
//! Two writers share each object's status, on disjoint fields (JSON merge patches):
//! - the reconcile of a Site writes what it deployed: `observedGeneration`, Device
//!   `tagCount`, Site `devices`/`formulas`, and the Formula `Valid` condition;
//! - the status loop writes what the ingestor reports: Device and Site conditions, poll
//!   and queue figures.
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
use serde_json::{Value, json};
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

/// The merge patch of a Formula's status written by the reconcile, or `None` when the
/// stored status already says it.
pub fn formula_patch(
    formula: &Formula,
    issue: Option<&FormulaError>,
    dependency_order: &[String],
    now: Timestamp,
) -> Option<Value> {
    let current = formula.status.clone().unwrap_or_default();
    let generation = formula.metadata.generation;
    // The schema bounds the list; a longer one would make the API server refuse the patch.
    let dependency_order = &dependency_order[..dependency_order.len().min(MAX_DEPENDENCY_ORDER)];
    let valid = condition(&current.conditions, VALID, &formula_validity(issue), generation, now);
    let unchanged = current.observed_generation == generation
        && current.dependency_order == dependency_order
        && same_conditions(&current.conditions, std::slice::from_ref(&valid));
    (!unchanged).then(|| {
        json!({"status": {
            "conditions": [valid],
            "observedGeneration": generation,
            "dependencyOrder": dependency_order,
        }})
    })
}

const AWAITING_INGESTOR: &str = "waiting for the site's ingestor to report";

/// The conditions of a Device or Site deployed but not yet reported on by its ingestor,
/// or `None` once it has conditions: the object says what the operator knows (the
/// ingestor is not ready yet) instead of nothing.
fn awaiting_ingestor(
    existing: &[Condition],
    states: &[(&str, &'static str)],
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Vec<Condition>> {
    existing.is_empty().then(|| {
        states
            .iter()
            .map(|(type_, status)| {
                let state = State::new(status, "IngestorNotReady", AWAITING_INGESTOR);
                condition(existing, type_, &state, generation, now)
            })
            .collect()
    })
}

/// The merge patch of what the reconcile deployed for a Device, or `None` when stored.
pub fn device_deployed_patch(device: &Device, now: Timestamp) -> Option<Value> {
    let current = device.status.clone().unwrap_or_default();
    let generation = device.metadata.generation;
    let tags = device.spec.tags.len() as u32;
    let awaiting = awaiting_ingestor(
        &current.conditions,
        &[(CONNECTED, "Unknown"), (READY, "False")],
        generation,
        now,
    );
    let deployed = current.observed_generation == generation && current.tag_count == Some(tags);
    deployed_patch(
        deployed,
        json!({"observedGeneration": generation, "tagCount": tags}),
        awaiting,
    )
}

/// The merge patch of what the reconcile deployed for a Site, or `None` when stored.
pub fn site_deployed_patch(site: &Site, devices: u32, formulas: u32, now: Timestamp) -> Option<Value> {
    let current = site.status.clone().unwrap_or_default();
    let generation = site.metadata.generation;
    let awaiting = awaiting_ingestor(
        &current.conditions,
        &[(READY, "False"), (QUEUE_HEALTHY, "Unknown")],
        generation,
        now,
    );
    let deployed =
        current.observed_generation == generation && current.devices == devices && current.formulas == formulas;
    deployed_patch(
        deployed,
        json!({"observedGeneration": generation, "devices": devices, "formulas": formulas}),
        awaiting,
    )
}

/// The merge patch of a deploy's `fields` (and the conditions awaiting the ingestor), or
/// `None` when the stored status already holds them.
fn deployed_patch(deployed: bool, mut fields: Value, awaiting: Option<Vec<Condition>>) -> Option<Value> {
    if deployed && awaiting.is_none() {
        return None;
    }
    if let Some(conditions) = awaiting {
        fields["conditions"] = json!(conditions);
    }
    Some(json!({ "status": fields }))
}

fn time_from_ns(ns: i64) -> Option<Time> {
    Timestamp::from_nanosecond(i128::from(ns)).ok().map(Time)
}

/// How the ingestor of a device's site answered.
pub type Reached<'a> = Result<&'a Report, &'a str>;

/// The merge patch of a Device's status from its ingestor's report, or `None` when the
/// stored status says the same and is fresh enough.
pub fn device_report_patch(device: &Device, report: Reached<'_>, now: Timestamp, heartbeat_due: bool) -> Option<Value> {
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
    write.then(|| {
        json!({"status": {
            "conditions": conditions,
            "lastPollTime": last_poll_time,
            "polls": polls,
            "failedPolls": failed_polls,
            "pollCyclesSkipped": skipped,
            "lastError": last_error,
        }})
    })
}

/// The merge patch of a Formula's latest result from its ingestor's report, or `None`.
/// Results change every cycle: they are written once per heartbeat at most.
pub fn formula_report_patch(formula: &Formula, report: Reached<'_>, heartbeat_due: bool) -> Option<Value> {
    let reported = report.ok()?.formulas.get(&formula.name_any())?;
    let current = formula.status.clone().unwrap_or_default();
    let time = reported.last_value_ns.and_then(time_from_ns);
    let moved = current.last_value != reported.last_value || current.last_value_time != time;
    (moved && heartbeat_due && reported.last_value.is_some())
        .then(|| json!({"status": {"lastValue": reported.last_value, "lastValueTime": time}}))
}

/// The merge patch of a Device whose Site does not exist (deleted, or not created yet),
/// or `None` when its status already says so.
pub fn siteless_device_patch(device: &Device, now: Timestamp) -> Option<Value> {
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
    (!same_conditions(&current.conditions, &conditions)).then(|| json!({"status": {"conditions": conditions}}))
}

/// `QueueHealthy` reasons that warrant a Warning event when they appear.
pub const DISK_FULL: &str = "DiskFull";
pub const QUEUE_WRITE_FAILING: &str = "QueueWriteFailing";

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

/// The merge patch of a Site's status from its ingestor's report, or `None`.
pub fn site_report_patch(site: &Site, report: Reached<'_>, now: Timestamp, heartbeat_due: bool) -> Option<Value> {
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
    // Every field spelled out: a merge patch leaves an omitted field as it was, so an
    // empty queue's absent oldest age would keep the last backlog's.
    let queue = queue.map(
        |q| json!({"depth": q.depth, "bytes": q.bytes, "oldestAgeSeconds": q.oldest_age_seconds, "dropped": q.dropped}),
    );
    write.then(|| json!({"status": {"conditions": conditions, "queue": queue}}))
}

/// Whether `patch` turns the condition `type_` to `False` from anything else in `before`
/// (for events, which say a thing once, when it happens).
pub fn turns_false(before: &[Condition], patch: &Value, type_: &str) -> bool {
    turns(before, patch, type_, "False")
}

/// Whether `patch` turns the condition `type_` to `to` from anything else in `before`.
pub fn turns(before: &[Condition], patch: &Value, type_: &str, to: &str) -> bool {
    let after: Vec<Condition> = serde_json::from_value(patch["status"]["conditions"].clone()).unwrap_or_default();
    condition_status(&after, type_) == Some(to) && condition_status(before, type_) != Some(to)
}

/// The condition `type_` in `patch`, when `patch` turns it to a new reason (for events).
pub fn new_reason(before: &[Condition], patch: &Value, type_: &str) -> Option<Condition> {
    let after: Vec<Condition> = serde_json::from_value(patch["status"]["conditions"].clone()).unwrap_or_default();
    let now = after.into_iter().find(|c| c.type_ == type_)?;
    let was = before.iter().find(|c| c.type_ == type_).map(|c| c.reason.as_str());
    (was != Some(now.reason.as_str())).then_some(now)
}

/// The status (`True`, `False`, `Unknown`) of the condition `type_` in `list`.
pub fn condition_status<'a>(list: &'a [Condition], type_: &str) -> Option<&'a str> {
    list.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
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
        let patch = formula_patch(&formula(), None, &order, Timestamp::now()).unwrap();
        assert_eq!(
            patch["status"]["dependencyOrder"].as_array().unwrap().len(),
            MAX_DEPENDENCY_ORDER
        );
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
}
