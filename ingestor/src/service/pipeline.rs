//! From polled batches to queued points: each poll becomes a device batch, feeds the
//! calculation DAG, and its formula results become batches of their own; everything one
//! drain of the channel yields is appended (and persisted) together.

use std::{collections::HashMap, sync::Arc};

use tagstream_proto::v1::{self as wire, SourceKind};
use tokio::sync::{Mutex, mpsc};
use tracing::error;

use tagstream_core::{
    calc::{Calc, Derived, SignalId},
    point::{PointValue, QualityLevel, Sample, now_ns},
};

use super::{encode::BatchEncoder, state::SiteState};
use crate::{
    acquisition::poller::PolledBatch,
    queue::{Queue, StoredBatch},
};

/// The DAG and how each device's tags map onto it; replaced on reload.
#[derive(Debug, Default)]
pub struct Derivation {
    pub calc: Calc,
    /// Device name -> its tags, and the signal of each (by index in the device's tags).
    pub signals: HashMap<String, DeviceSignals>,
}

/// The tags of a device as configured, and the signal each feeds.
#[derive(Debug, Default)]
pub struct DeviceSignals {
    tags: Vec<String>,
    ids: Vec<Option<SignalId>>,
}

impl DeviceSignals {
    /// The signal of tag `index` of a batch polled with `tags`. A batch polled before a
    /// reload that inserted, removed or reordered the device's tags carries indices into
    /// the old list: its tags are looked up by name (issue 28: mapped through the new
    /// order, they fed formulas the wrong tags with quality Good).
    fn of<'a>(
        &'a self,
        tags: &'a [tagstream_crds::device::Tag],
        calc: &'a Calc,
        device: &'a str,
    ) -> impl Fn(usize) -> Option<SignalId> + 'a {
        let current = tags.len() == self.tags.len() && tags.iter().zip(&self.tags).all(|(t, n)| t.name == *n);
        move |index| {
            if current {
                self.ids.get(index).copied().flatten()
            } else {
                tags.get(index).and_then(|t| calc.tag_signal(device, &t.name))
            }
        }
    }
}

impl Derivation {
    pub fn new(site: &tagstream_core::config::SiteConfig) -> Self {
        let calc = site.calc();
        let signals = signals(&calc, site);
        Self { calc, signals }
    }

    /// Applies a reloaded site. Signal ids belong to one `Calc`, so the map is rebuilt from
    /// this one, never from another instance.
    pub fn reconfigure(&mut self, site: &tagstream_core::config::SiteConfig) -> tagstream_core::calc::Reconfigured {
        let outcome = self.calc.configure(site.tags(), &site.formula_specs());
        self.signals = signals(&self.calc, site);
        outcome
    }
}

fn signals(calc: &Calc, site: &tagstream_core::config::SiteConfig) -> HashMap<String, DeviceSignals> {
    site.devices
        .iter()
        .map(|d| {
            let name = d.metadata.name.clone().unwrap_or_default();
            let signals = DeviceSignals {
                tags: d.spec.tags.iter().map(|t| t.name.clone()).collect(),
                ids: d.spec.tags.iter().map(|t| calc.tag_signal(&name, &t.name)).collect(),
            };
            (name, signals)
        })
        .collect()
}

/// A sample as a wire point of `tag`.
pub(crate) fn wire_point(tag: &str, sample: &Sample, unit: Option<&str>) -> wire::Point {
    use wire::point::Value;
    let value = sample.value.as_ref().map(|v| match v {
        PointValue::Bool(b) => Value::BoolValue(*b),
        PointValue::Int(i) => Value::IntValue(*i),
        PointValue::UInt(u) => Value::UintValue(*u),
        PointValue::Double(d) => Value::DoubleValue(*d),
        PointValue::String(s) => Value::StringValue(s.clone()),
    });
    let quality = match sample.quality.level {
        QualityLevel::Good => wire::Quality::Good,
        QualityLevel::Uncertain => wire::Quality::Uncertain,
        QualityLevel::Bad => wire::Quality::Bad,
    };
    wire::Point {
        tag: tag.to_owned(),
        timestamp_ns: sample.timestamp_ns,
        value,
        quality: quality.into(),
        quality_reason: sample.quality.reason.clone().unwrap_or_default(),
        unit: unit.unwrap_or_default().to_owned(),
    }
}

fn device_batch(polled: &PolledBatch) -> StoredBatch {
    let tags = &polled.device.spec.tags;
    let mut batch = BatchEncoder::new(&polled.device.name, SourceKind::Device, polled.points.len());
    for (index, sample) in &polled.points {
        batch.push(&tags[*index].name, sample, tags[*index].unit.as_deref());
    }
    batch.finish()
}

fn formula_batches(calc: &Calc, derived: &[Derived]) -> impl Iterator<Item = StoredBatch> {
    derived.iter().map(|d| {
        let formula = calc.formula(d.formula);
        let mut batch = BatchEncoder::new(&formula.name, SourceKind::Formula, 1);
        batch.push(&formula.name, &d.sample, formula.spec.unit.as_deref());
        batch.finish()
    })
}

/// Runs until the channel closes (every poller stopped), then returns once the last
/// points are persisted.
pub async fn run(
    mut polled: mpsc::Receiver<PolledBatch>,
    derivation: Arc<Mutex<Derivation>>,
    queue: Queue,
    state: Arc<SiteState>,
) {
    let mut derived = Vec::new();
    while let Some(first) = polled.recv().await {
        let mut group = vec![first];
        while group.len() < 1024 {
            match polled.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let mut batches = Vec::with_capacity(group.len() * 2);
        {
            let mut derivation = derivation.lock().await;
            let Derivation { calc, signals } = &mut *derivation;
            derived.clear();
            // Every change of the drain first, then one evaluation: a formula reading two
            // devices polled into one drain is evaluated once, from both new values, not
            // once per device with one new input and one old (issue 28).
            let mut changes = Vec::new();
            for polled in &group {
                batches.push(device_batch(polled));
                let Some(device) = signals.get(&polled.device.name) else {
                    continue;
                };
                let signal = device.of(&polled.device.spec.tags, calc, &polled.device.name);
                changes.extend(polled.points.iter().filter_map(|(i, s)| signal(*i).map(|id| (id, s))));
            }
            calc.update(changes, now_ns(), &mut derived);
            batches.extend(formula_batches(calc, &derived));
            let mut values = state.formula_values.lock().expect("values lock");
            for d in &derived {
                let name = &calc.formula(d.formula).name;
                match values.get_mut(name) {
                    Some(last) => last.clone_from(&d.sample),
                    None => {
                        values.insert(name.clone(), d.sample.clone());
                    }
                }
            }
        }
        let points: u64 = batches.iter().map(|b| u64::from(b.points)).sum();
        let derived_points = derived.len() as u64;
        match queue.append(batches).await {
            Ok(()) => state.count_points(points - derived_points, derived_points),
            Err(e) => {
                error!(error = %e, points, "points could not be persisted and are lost");
                state.count_lost(points);
            }
        }
    }
}

/// Evaluates what a reconfiguration left pending (changed formulas and their dependents)
/// and queues the results.
pub async fn flush_reconfigured(derivation: &Mutex<Derivation>, queue: &Queue) {
    let batches: Vec<StoredBatch> = {
        let mut derivation = derivation.lock().await;
        let mut derived = Vec::new();
        derivation.calc.update([], now_ns(), &mut derived);
        formula_batches(&derivation.calc, &derived).collect()
    };
    if let Err(e) = queue.append(batches).await {
        error!(error = %e, "re-evaluated formula results could not be persisted");
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::Derivation;
    use tagstream_core::config::{SiteConfig, sites};

    fn site(devices: usize) -> SiteConfig {
        let mut text = String::new();
        for d in 0..devices {
            let _ = write!(
                text,
                "---\napiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: d{d}}}\nspec:\n  site: s\n  connection: {{tcp: {{host: h, port: {}}}}}\n  tags:\n",
                1000 + d
            );
            for t in 0..20 {
                let _ = writeln!(
                    text,
                    "    - {{name: t{t}, register: holding, address: {t}, type: uint16}}"
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.yaml"), text).unwrap();
        let report = tagstream_crds::manifest::load(&[dir.path().to_path_buf()]).unwrap();
        sites(&report).remove(0)
    }

    /// Two devices polled into one drain feed a formula reading both once, after both
    /// changes: it was evaluated once per device, publishing an intermediate value that
    /// mixed one new input with an old one (issue 28).
    #[tokio::test]
    async fn a_formula_of_two_devices_in_one_drain_is_evaluated_once() {
        use std::sync::Arc;

        use tagstream_core::point::{PointValue, Sample};
        use tagstream_proto::v1::point::Value;
        use tokio::sync::{Mutex, mpsc};

        use super::run;
        use crate::{
            acquisition::poller::{PolledBatch, PolledDevice},
            queue::{Queue, QueueConfig},
            service::state::SiteState,
        };

        let mut text = site(2).devices.iter().fold(String::new(), |mut text, device| {
            let _ = write!(text, "---\n{}", serde_yaml::to_string(device).unwrap());
            text
        });
        text.push_str(
            "---\napiVersion: tagstream.io/v1alpha1\nkind: Formula\nmetadata: {name: sum}\n\
             spec: {site: s, inputs: {a: d0/t0, b: d1/t0}, expression: a + b}\n",
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("site.yaml"), text).unwrap();
        let report = tagstream_crds::manifest::load(&[dir.path().to_path_buf()]).unwrap();
        let site = sites(&report).remove(0);
        let queue = Queue::open(QueueConfig::new(dir.path().join("queue"))).unwrap().queue;
        let state = Arc::new(SiteState::new("default", "s", queue.clone(), None));
        let derivation = Arc::new(Mutex::new(super::Derivation::new(&site)));
        // One drain with both devices, then another with both changed.
        for values in [[1u64, 2], [10, 20]] {
            let (tx, rx) = mpsc::channel(16);
            for (device, value) in site.devices.iter().zip(values) {
                let polled = PolledBatch {
                    device: Arc::new(PolledDevice {
                        name: device.metadata.name.clone().unwrap(),
                        spec: device.spec.clone(),
                    }),
                    points: vec![(0, Sample::good(PointValue::UInt(value), 1))],
                };
                tx.send(polled).await.unwrap();
            }
            drop(tx);
            run(rx, Arc::clone(&derivation), queue.clone(), Arc::clone(&state)).await;
        }
        let sums: Vec<_> = queue
            .read(None, 100)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|stored| stored.record.batches)
            .filter(|batch| batch.source == "sum")
            .flat_map(|batch| batch.decode().points)
            .filter_map(|point| point.value)
            .collect();
        assert_eq!(
            sums,
            [Value::IntValue(3), Value::IntValue(30)],
            "one result per drain, from both new inputs"
        );
    }

    #[test]
    fn after_a_reload_every_tag_maps_to_its_own_signal() {
        let mut derivation = Derivation::new(&site(2));
        let bigger = site(5);
        derivation.reconfigure(&bigger);
        for device in &bigger.devices {
            let name = device.metadata.name.as_deref().unwrap();
            for (index, tag) in device.spec.tags.iter().enumerate() {
                assert_eq!(
                    derivation.signals[name].ids[index],
                    derivation.calc.tag_signal(name, &tag.name),
                    "{name}/{}",
                    tag.name
                );
            }
        }
    }
}
