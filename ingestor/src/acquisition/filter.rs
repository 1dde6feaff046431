//! Deadband and heartbeat: which polled values are worth publishing.

use tagstream_crds::device::Tag;

use tagstream_core::point::{PointValue, QualityLevel, Sample};

/// Per-tag publishing rule. Without a deadband or heartbeat every poll is published;
/// with either, a value is published when it changed (by more than the deadband for
/// numbers), when its quality changed, or when the heartbeat is due.
#[derive(Clone, Debug)]
pub struct Filter {
    deadband: Option<f64>,
    heartbeat_ns: Option<i64>,
    last: Option<(Option<PointValue>, QualityLevel, i64)>,
}

impl Filter {
    pub fn new(tag: &Tag) -> Self {
        Self {
            deadband: tag.deadband,
            heartbeat_ns: tag
                .heartbeat
                .map(|d| i64::try_from(d.get().as_nanos()).unwrap_or(i64::MAX)),
            last: None,
        }
    }

    /// Whether to publish `sample`; remembers it when so.
    pub fn admit(&mut self, sample: &Sample) -> bool {
        let publish = match (&self.last, self.deadband, self.heartbeat_ns) {
            (_, None, None) | (None, _, _) => true,
            (Some((value, level, at)), deadband, heartbeat) => {
                *level != sample.quality.level
                    || heartbeat.is_some_and(|h| sample.timestamp_ns.saturating_sub(*at) >= h)
                    || moved(value.as_ref(), sample.value.as_ref(), deadband.unwrap_or(0.0))
            }
        };
        if publish {
            self.last = Some((sample.value.clone(), sample.quality.level, sample.timestamp_ns));
        }
        publish
    }
}

fn moved(old: Option<&PointValue>, new: Option<&PointValue>, deadband: f64) -> bool {
    match (old.and_then(number), new.and_then(number)) {
        (Some(a), Some(b)) => (a - b).abs() > deadband,
        _ => old != new,
    }
}

fn number(value: &PointValue) -> Option<f64> {
    match value {
        PointValue::Int(i) => Some(*i as f64),
        PointValue::UInt(u) => Some(*u as f64),
        PointValue::Double(d) => Some(*d),
        PointValue::Bool(_) | PointValue::String(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tagstream_core::point::Sample;

    fn tag(extra: &str) -> Tag {
        serde_yaml::from_str(&format!(
            "{{name: t, register: holding, address: 0, type: float32{extra}}}"
        ))
        .unwrap()
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn without_deadband_or_heartbeat_everything_is_published() {
        let mut filter = Filter::new(&tag(""));
        assert!(filter.admit(&Sample::good(PointValue::Double(1.0), 0)));
        assert!(filter.admit(&Sample::good(PointValue::Double(1.0), 1)));
    }

    #[test]
    fn deadband_holds_small_moves_until_the_heartbeat() {
        let mut filter = Filter::new(&tag(", deadband: 0.5, heartbeat: 10s"));
        assert!(filter.admit(&Sample::good(PointValue::Double(10.0), 0)));
        assert!(!filter.admit(&Sample::good(PointValue::Double(10.4), S)));
        assert!(
            filter.admit(&Sample::good(PointValue::Double(10.6), 2 * S)),
            "moved past the deadband"
        );
        assert!(!filter.admit(&Sample::good(PointValue::Double(10.7), 3 * S)));
        assert!(
            filter.admit(&Sample::good(PointValue::Double(10.7), 12 * S)),
            "heartbeat due"
        );
        assert!(filter.admit(&Sample::bad("timeout", 13 * S)), "quality changed");
        assert!(!filter.admit(&Sample::bad("timeout", 14 * S)));
    }

    #[test]
    fn a_heartbeat_alone_publishes_on_change() {
        let mut filter = Filter::new(&tag(", heartbeat: 5s"));
        assert!(filter.admit(&Sample::good(PointValue::Double(1.0), 0)));
        assert!(!filter.admit(&Sample::good(PointValue::Double(1.0), S)));
        assert!(filter.admit(&Sample::good(PointValue::Double(1.5), 2 * S)));
    }
}
