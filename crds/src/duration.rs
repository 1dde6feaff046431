//! A duration written the way Kubernetes users write them (`500ms`, `1s`, `1m30s`).
//!
//! The schema pattern admits only the subset that both the API server's CEL `duration()`
//! and this crate's parser accept, so a value that passes `kubectl apply` always parses here.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Integer amounts of `h`, `m`, `s` or `ms`, concatenated: `250ms`, `5s`, `1h30m`.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// A non-negative duration serialised as a Go-style duration string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: expected integer amounts of h, m, s or ms such as 500ms, 5s or 1m30s")]
pub struct ParseDurationError {
    input: String,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDurationError { input: s.to_owned() };
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        if rest.is_empty() {
            return Err(err());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err());
            }
            let amount: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (std::time::Duration::from_millis(1), 2)
            } else if rest.starts_with('s') {
                (std::time::Duration::from_secs(1), 1)
            } else if rest.starts_with('m') {
                (std::time::Duration::from_secs(60), 1)
            } else if rest.starts_with('h') {
                (std::time::Duration::from_secs(3600), 1)
            } else {
                return Err(err());
            };
            rest = &rest[len..];
            let part = unit.checked_mul(u32::try_from(amount).map_err(|_| err())?);
            total = part.and_then(|p| total.checked_add(p)).ok_or_else(err)?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    /// Prints the shortest exact form in the accepted grammar (`1m30s`, `250ms`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total_ms = self.0.as_millis();
        if total_ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (total_ms / 3_600_000, total_ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        for (amount, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if amount > 0 {
                write!(f, "{amount}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_style_durations() {
        let cases = [
            ("500ms", 500),
            ("1s", 1000),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("1h1m1s1ms", 3_661_001),
        ];
        for (text, ms) in cases {
            assert_eq!(text.parse::<Duration>().unwrap(), Duration::from_millis(ms), "{text}");
        }
    }

    #[test]
    fn refuses_what_the_schema_pattern_refuses() {
        for bad in [
            "",
            "1",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "1 s",
            "10us",
            "99999999999999999999s",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn display_round_trips() {
        for ms in [0, 1, 999, 1000, 61_001, 3_600_000, 3_723_004] {
            let d = Duration::from_millis(ms);
            assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }
        assert_eq!(Duration::from_millis(90_000).to_string(), "1m30s");
    }
}
