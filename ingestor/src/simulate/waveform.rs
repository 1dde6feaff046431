//! Deterministic signals for simulated tags: the same manifest gives the same values at the
//! same time since start, so tests and demos can predict them.

use std::{f64::consts::TAU, sync::Mutex, time::Duration};

use tagstream_crds::device::{DataType, Simulation, Tag, Waveform};

use tagstream_core::point::PointValue;

/// One tag's signal.
#[derive(Debug)]
pub struct Signal {
    simulation: Simulation,
    data_type: DataType,
    name: String,
    /// Whether the manifest gave a `simulation` block (else a default sine is used).
    explicit: bool,
    seed: u64,
    /// Random walk position: (step, value).
    walk: Mutex<(u64, f64)>,
}

impl Signal {
    /// Tags without a `simulation` block follow a one-minute sine between 0 and 100.
    pub fn new(tag: &Tag) -> Self {
        let simulation = tag.simulation.clone().unwrap_or(Simulation {
            waveform: Waveform::Sine,
            min: 0.0,
            max: 100.0,
            period: tagstream_crds::Duration::from_secs(60),
        });
        let seed = tag.name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let start = f64::midpoint(simulation.min, simulation.max);
        Self {
            simulation,
            data_type: tag.data_type,
            name: tag.name.clone(),
            explicit: tag.simulation.is_some(),
            seed,
            walk: Mutex::new((0, start)),
        }
    }

    /// The value in engineering units `elapsed` after the simulator started.
    pub fn engineering(&self, elapsed: Duration) -> f64 {
        let Simulation {
            waveform,
            min,
            max,
            period,
        } = self.simulation;
        let cycles = elapsed.as_secs_f64() / period.get().as_secs_f64().max(1e-3);
        match waveform {
            Waveform::Sine => min + (max - min) * (0.5 + 0.5 * (cycles * TAU).sin()),
            Waveform::Ramp => min + (max - min) * cycles.fract(),
            Waveform::Constant => min,
            Waveform::RandomWalk => self.walk_to(cycles as u64),
        }
    }

    fn walk_to(&self, step: u64) -> f64 {
        let Simulation { min, max, .. } = self.simulation;
        let mut walk = self.walk.lock().expect("walk lock");
        while walk.0 < step {
            walk.0 += 1;
            let delta = (fastrand::Rng::with_seed(self.seed ^ walk.0).f64() - 0.5) * (max - min) / 10.0;
            walk.1 = (walk.1 + delta).clamp(min, max);
        }
        walk.1
    }

    /// The value as the tag's type holds it, before the device's scaling.
    pub fn value(&self, elapsed: Duration, scale: Option<f64>, offset: Option<f64>) -> PointValue {
        let engineering = self.engineering(elapsed);
        match self.data_type {
            DataType::Bool | DataType::Bit => PointValue::Bool(engineering >= 0.5),
            DataType::String if !self.explicit => PointValue::String(self.name.to_uppercase()),
            DataType::String => PointValue::String(format!("{engineering:.0}")),
            _ => PointValue::Double(crate::acquisition::decode::unscale(engineering, scale, offset)),
        }
    }
}
