//! A point: one value of one tag at one time, with its quality.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

/// A decoded or computed value.
#[derive(Clone, Debug, PartialEq)]
pub enum PointValue {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    String(String),
}

impl fmt::Display for PointValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(v) => write!(f, "{v}"),
            Self::Int(v) => write!(f, "{v}"),
            Self::UInt(v) => write!(f, "{v}"),
            Self::Double(v) => write!(f, "{v}"),
            Self::String(v) => write!(f, "{v:?}"),
        }
    }
}

/// How far a value can be trusted, worst last (so `max` gives the worse of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QualityLevel {
    Good,
    Uncertain,
    Bad,
}

/// A quality level with the reason it is not Good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quality {
    pub level: QualityLevel,
    /// Why the level is not Good; `None` for Good.
    pub reason: Option<String>,
}

impl Quality {
    pub const GOOD: Self = Self {
        level: QualityLevel::Good,
        reason: None,
    };

    pub fn uncertain(reason: impl Into<String>) -> Self {
        Self {
            level: QualityLevel::Uncertain,
            reason: Some(reason.into()),
        }
    }

    pub fn bad(reason: impl Into<String>) -> Self {
        Self {
            level: QualityLevel::Bad,
            reason: Some(reason.into()),
        }
    }

    pub fn is_good(&self) -> bool {
        self.level == QualityLevel::Good
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            QualityLevel::Good => "good",
            QualityLevel::Uncertain => "uncertain",
            QualityLevel::Bad => "bad",
        };
        match &self.reason {
            Some(reason) => write!(f, "{level} ({reason})"),
            None => f.write_str(level),
        }
    }
}

/// A value at a time with its quality. A Bad sample may carry no value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub value: Option<PointValue>,
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: i64,
    pub quality: Quality,
}

impl Sample {
    pub fn good(value: PointValue, timestamp_ns: i64) -> Self {
        Self {
            value: Some(value),
            timestamp_ns,
            quality: Quality::GOOD,
        }
    }

    pub fn bad(reason: impl Into<String>, timestamp_ns: i64) -> Self {
        Self {
            value: None,
            timestamp_ns,
            quality: Quality::bad(reason),
        }
    }
}

/// Nanoseconds since the Unix epoch, now: the clock every point's timestamp comes from.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
