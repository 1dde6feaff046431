//! Writing one tag on a connection its caller owns: the endpoint's polling task (so a
//! write never interleaves with a poll on the same bus) or the `write` command. The value
//! is checked against the tag and laid out as the device stores it; the tag is read first
//! (for compare-and-set, the audit, and the read-modify-write of a bit inside a register),
//! written, and read back.

use std::{borrow::Cow, fmt};

use tagstream_crds::{
    DeviceSpec,
    device::{DataType, Tag},
};
use tokio_modbus::{ExceptionCode, Request, Response};

use tagstream_core::point::PointValue;

use super::{
    connection::{self, Data, Link, RequestError},
    decode::{self, Layout},
    plan::Read,
};

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The device took the value.
    Written,
    /// The device answered with an exception.
    Refused(ExceptionCode),
    /// Outside the tag's bounds, its type's range, or not a multiple of its scale.
    OutOfRange,
    /// No such tag, or the tag is not writable.
    NotWritable,
    /// The device did not answer in time.
    Timeout,
    /// The tag did not read the value the request expected; nothing was written.
    ExpectedMismatch,
    /// The request cannot be used as it is (a value of the wrong kind, a reused id).
    Invalid,
    /// The device could not be reached or answered garbage.
    Failed,
}

impl Outcome {
    /// The outcome's name in metrics and `/status`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Refused(_) => "refused",
            Self::OutOfRange => "out_of_range",
            Self::NotWritable => "not_writable",
            Self::Timeout => "timeout",
            Self::ExpectedMismatch => "expected_mismatch",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Written => f.write_str("written"),
            Self::Refused(code) => write!(f, "refused with exception {}", u8::from(*code)),
            Self::OutOfRange => f.write_str("out of range"),
            Self::NotWritable => f.write_str("not writable"),
            Self::Timeout => f.write_str("timeout"),
            Self::ExpectedMismatch => f.write_str("expected value mismatch"),
            Self::Invalid => f.write_str("invalid request"),
            Self::Failed => f.write_str("failed"),
        }
    }
}

/// What a write did, for the reply and the audit.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteReport {
    pub outcome: Outcome,
    /// For people: why, or what the device reads back when it differs.
    pub detail: String,
    /// The tag's value before the write, when it was read.
    pub previous: Option<PointValue>,
    /// The tag's value read back after the write.
    pub read_back: Option<PointValue>,
    /// A recipe's tags, each with its value before and after (empty for one tag's write,
    /// whose values are `previous` and `read_back`).
    pub tags: Vec<TagResult>,
}

/// One tag of a recipe, as written.
#[derive(Clone, Debug, PartialEq)]
pub struct TagResult {
    pub tag: String,
    pub previous: Option<PointValue>,
    pub read_back: Option<PointValue>,
}

impl WriteReport {
    /// A write that did not happen.
    pub fn not_done(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
            previous: None,
            read_back: None,
            tags: Vec::new(),
        }
    }

    /// A write the device failed at; a timeout leaves open whether it took the value.
    pub fn failed(error: &RequestError, previous: Option<PointValue>) -> Self {
        let (outcome, detail) = match error {
            RequestError::Exception(code) => (Outcome::Refused(*code), error.to_string()),
            RequestError::Timeout(_) => (
                Outcome::Timeout,
                format!("{error}: the device may or may not have taken the value"),
            ),
            _ => (Outcome::Failed, error.to_string()),
        };
        Self {
            outcome,
            detail,
            previous,
            read_back: None,
            tags: Vec::new(),
        }
    }
}

/// A checked value, as the device stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Raw {
    Coil(bool),
    /// One bit of a register, written by read-modify-write.
    Bit(bool),
    Registers(Vec<u16>),
}

fn out_of_range(detail: String) -> WriteReport {
    WriteReport::not_done(Outcome::OutOfRange, detail)
}

fn as_bool(value: &PointValue) -> Result<bool, WriteReport> {
    match value {
        PointValue::Bool(b) => Ok(*b),
        PointValue::Int(0) | PointValue::UInt(0) => Ok(false),
        PointValue::Int(1) | PointValue::UInt(1) => Ok(true),
        other => Err(WriteReport::not_done(
            Outcome::Invalid,
            format!("{other} is not a boolean (true, false, 1 or 0)"),
        )),
    }
}

fn as_number(value: &PointValue) -> Result<f64, WriteReport> {
    match value {
        PointValue::Int(i) => Ok(*i as f64),
        PointValue::UInt(u) => Ok(*u as f64),
        PointValue::Double(d) if d.is_finite() => Ok(*d),
        other => Err(WriteReport::not_done(
            Outcome::Invalid,
            format!("{other} is not a finite number"),
        )),
    }
}

/// The integer range of an integer type.
fn integer_range(data_type: DataType) -> Option<(i128, i128)> {
    Some(match data_type {
        DataType::Int16 => (i16::MIN.into(), i16::MAX.into()),
        DataType::Uint16 => (0, u16::MAX.into()),
        DataType::Int32 => (i32::MIN.into(), i32::MAX.into()),
        DataType::Uint32 => (0, u32::MAX.into()),
        DataType::Int64 => (i64::MIN.into(), i64::MAX.into()),
        DataType::Uint64 => (0, u64::MAX.into()),
        _ => return None,
    })
}

/// The raw integer a write of `value` sends: exact for an unscaled integer, otherwise
/// the unscaled number, which must be whole (a 0.1-scaled register cannot hold 21.55).
fn raw_integer(value: &PointValue, number: f64, layout: &Layout) -> Result<i128, WriteReport> {
    match value {
        PointValue::Int(i) if layout.scaling.is_identity() => return Ok(i128::from(*i)),
        PointValue::UInt(u) if layout.scaling.is_identity() => return Ok(i128::from(*u)),
        _ => {}
    }
    let raw = layout.scaling.raw(number);
    let whole = raw.round();
    if !whole.is_finite() || (raw - whole).abs() > 1e-6 * whole.abs().max(1.0) {
        return Err(out_of_range(format!(
            "{number} is not a whole number of raw units (it would be {raw})"
        )));
    }
    if whole.abs() >= 2f64.powi(100) {
        return Err(out_of_range(format!("{number} is far outside the type's range")));
    }
    Ok(whole as i128)
}

/// Checks `value` against the tag (bounds, type, scale) and lays it out as the device
/// stores it.
fn prepare(tag: &Tag, layout: &Layout, value: &PointValue) -> Result<Raw, WriteReport> {
    match tag.data_type {
        DataType::Bool => return as_bool(value).map(Raw::Coil),
        DataType::Bit => return as_bool(value).map(Raw::Bit),
        DataType::String => {
            let text = match value {
                PointValue::String(s) => s.clone(),
                other => other.to_string(),
            };
            let room = usize::from(layout.length) * usize::from(layout.chars_per_register);
            if text.len() > room {
                return Err(out_of_range(format!(
                    "{} bytes of text do not fit in {room}",
                    text.len()
                )));
            }
            return Ok(Raw::Registers(decode::encode_registers(
                &PointValue::String(text),
                layout,
            )));
        }
        _ => {}
    }
    let number = as_number(value)?;
    if let Some(min) = tag.min.filter(|min| number < *min) {
        return Err(out_of_range(format!("{number} is below the tag's min {min}")));
    }
    if let Some(max) = tag.max.filter(|max| number > *max) {
        return Err(out_of_range(format!("{number} is above the tag's max {max}")));
    }
    let raw = if let Some((low, high)) = integer_range(tag.data_type) {
        let raw = raw_integer(value, number, layout)?;
        if raw < low || raw > high {
            return Err(out_of_range(format!(
                "{number} is raw {raw}, outside {:?}'s {low}..={high}",
                tag.data_type
            )));
        }
        match i64::try_from(raw) {
            Ok(signed) => PointValue::Int(signed),
            Err(_) => PointValue::UInt(u64::try_from(raw).expect("checked against the type's range")),
        }
    } else {
        let raw = layout.scaling.raw(number);
        if !raw.is_finite() || (tag.data_type == DataType::Float32 && raw.abs() > f64::from(f32::MAX)) {
            return Err(out_of_range(format!("{number} does not fit a {:?}", tag.data_type)));
        }
        PointValue::Double(raw)
    };
    Ok(Raw::Registers(decode::encode_registers(&raw, layout)))
}

/// Whether two values are the same reading (numbers compare by value, whatever their kind).
fn same_value(a: &PointValue, b: &PointValue) -> bool {
    match (a, b) {
        (PointValue::Bool(x), PointValue::Bool(y)) => x == y,
        (PointValue::String(x), PointValue::String(y)) => x == y,
        (PointValue::Bool(_) | PointValue::String(_), _) | (_, PointValue::Bool(_) | PointValue::String(_)) => false,
        _ => as_number(a).ok() == as_number(b).ok(),
    }
}

/// The tag's value in `data`, as a poll would publish it.
fn value_of(data: &Data, layout: &Layout) -> Option<PointValue> {
    match data {
        Data::Bits(bits) => bits.first().copied().map(PointValue::Bool),
        Data::Registers(registers) => decode::decode_registers(registers, layout)
            .ok()
            .map(|raw| layout.scaling.apply(raw)),
    }
}

/// What a write stores, by table and protocol address: each register's word and each
/// coil's state. A bit of a register is set in the word the register held before (and any
/// other bit of the same write).
#[derive(Debug, Default)]
struct Stores {
    registers: std::collections::BTreeMap<u16, u16>,
    coils: std::collections::BTreeMap<u16, bool>,
}

impl Stores {
    /// Adds tag `tag` (`raw` at `start`, which held `before`); `Err` names the register or
    /// coil another tag of the same write stores too.
    fn add(&mut self, start: u16, raw: &Raw, before: Option<&Data>, bit: u8) -> Result<(), u16> {
        match raw {
            Raw::Coil(on) => {
                if self.coils.insert(start, *on).is_some() {
                    return Err(start);
                }
            }
            Raw::Bit(set) => {
                let held = match before {
                    Some(Data::Registers(words)) => words.first().copied().unwrap_or(0),
                    _ => 0,
                };
                let current = self.registers.entry(start).or_insert(held);
                let mask = 1u16.checked_shl(u32::from(bit)).unwrap_or(0);
                *current = if *set { *current | mask } else { *current & !mask };
            }
            Raw::Registers(words) => {
                for (address, word) in (start..).zip(words) {
                    if self.registers.insert(address, *word).is_some() {
                        return Err(address);
                    }
                }
            }
        }
        Ok(())
    }

    /// The requests that store everything: contiguous registers in one write multiple
    /// registers (16), contiguous coils in one write multiple coils (15), as the device's
    /// quirks allow.
    fn requests(&self, spec: &DeviceSpec) -> Vec<Request<'static>> {
        let quirks = &spec.quirks;
        let mut requests = Vec::new();
        for (start, words) in runs(&self.registers, MAX_REGISTERS_PER_WRITE) {
            match words.as_slice() {
                [word] if !quirks.write_multiple => requests.push(Request::WriteSingleRegister(start, *word)),
                _ if quirks.write_single => requests.extend(
                    words
                        .iter()
                        .zip(start..)
                        .map(|(word, address)| Request::WriteSingleRegister(address, *word)),
                ),
                _ => requests.push(Request::WriteMultipleRegisters(start, Cow::Owned(words))),
            }
        }
        for (start, states) in runs(&self.coils, MAX_COILS_PER_WRITE) {
            match states.as_slice() {
                [on] if !quirks.write_multiple => requests.push(Request::WriteSingleCoil(start, *on)),
                _ => requests.push(Request::WriteMultipleCoils(start, Cow::Owned(states))),
            }
        }
        requests
    }
}

/// The protocol's most registers and coils in one write (function codes 16 and 15).
const MAX_REGISTERS_PER_WRITE: usize = 123;
const MAX_COILS_PER_WRITE: usize = 1968;

/// Runs of consecutive addresses, each at most `longest` long.
fn runs<T: Copy>(values: &std::collections::BTreeMap<u16, T>, longest: usize) -> Vec<(u16, Vec<T>)> {
    let mut runs: Vec<(u16, Vec<T>)> = Vec::new();
    for (address, value) in values {
        match runs.last_mut() {
            Some((start, run))
                if run.len() < longest && u32::from(*start) + run.len() as u32 == u32::from(*address) =>
            {
                run.push(*value);
            }
            _ => runs.push((*address, vec![*value])),
        }
    }
    runs
}

/// Whether the device's answer acknowledges `request`.
fn acknowledges(request: &Request<'_>, response: &Response) -> bool {
    match (request, response) {
        (Request::WriteSingleCoil(a, v), Response::WriteSingleCoil(b, w)) => a == b && v == w,
        (Request::WriteSingleRegister(a, v), Response::WriteSingleRegister(b, w)) => a == b && v == w,
        (Request::WriteMultipleCoils(a, v), Response::WriteMultipleCoils(b, n)) => a == b && usize::from(*n) == v.len(),
        (Request::WriteMultipleRegisters(a, v), Response::WriteMultipleRegisters(b, n)) => {
            a == b && usize::from(*n) == v.len()
        }
        _ => false,
    }
}

/// Whether what the device reads back holds what was written.
fn holds(read: &Data, raw: &Raw, bit: u8) -> bool {
    match (read, raw) {
        (Data::Bits(bits), Raw::Coil(on)) => bits.first() == Some(on),
        (Data::Registers(words), Raw::Bit(set)) => words
            .first()
            .is_some_and(|w| (w.checked_shr(u32::from(bit)).unwrap_or(0) & 1 == 1) == *set),
        (Data::Registers(words), Raw::Registers(written)) => words == written,
        _ => false,
    }
}

/// One tag of a write: its index in the device's tags, the value (engineering units) and
/// the value it must read now for the write to happen (compare and set).
#[derive(Clone, Debug)]
pub struct TagWrite {
    pub index: usize,
    pub value: PointValue,
    pub expected: Option<PointValue>,
}

/// A tag of a write, checked and laid out, with what it read before.
struct Prepared<'a> {
    write: &'a TagWrite,
    raw: Raw,
    read: Read,
    before: Option<Data>,
    previous: Option<PointValue>,
}

/// Writes `value` (engineering units) to tag `index` of the device on `link`, which is
/// addressed to the device: [`write_tags`] with one tag.
pub async fn write_tag(
    link: &mut Link,
    spec: &DeviceSpec,
    layouts: &[Layout],
    index: usize,
    value: &PointValue,
    expected: Option<&PointValue>,
) -> Result<WriteReport, RequestError> {
    let write = TagWrite {
        index,
        value: value.clone(),
        expected: expected.cloned(),
    };
    write_tags(link, spec, layouts, std::slice::from_ref(&write)).await
}

/// Writes several tags of the device on `link` (addressed to it) together, as a recipe:
/// every value is checked against its tag and every `expected` compared before anything is
/// written; then contiguous registers (and coils) go in one request each, all in this one
/// turn of the bus; then every tag is read back. A device that refuses one request of
/// several keeps the earlier ones: the report says which request it was. `Err` is a
/// transport failure, timeout or garbage: the caller decides about the connection; a
/// device's exception is an `Ok` report.
pub async fn write_tags(
    link: &mut Link,
    spec: &DeviceSpec,
    layouts: &[Layout],
    writes: &[TagWrite],
) -> Result<WriteReport, RequestError> {
    let job = Job {
        spec,
        layouts,
        recipe: writes.len() > 1,
    };
    let prepared = match job.prepare_all(writes) {
        Ok(prepared) => prepared,
        Err(refusal) => return Ok(refusal),
    };
    let tags = match job.read_before(link, prepared).await? {
        Ok(tags) => tags,
        Err(refusal) => return Ok(refusal),
    };
    let mut stores = Stores::default();
    for tag in &tags {
        let bit = layouts[tag.write.index].bit;
        if let Err(address) = stores.add(tag.read.start, &tag.raw, tag.before.as_ref(), bit) {
            let detail = format!("protocol address {address} is also written by another tag of this write");
            return Ok(WriteReport::not_done(Outcome::Invalid, job.named(tag.write, detail)));
        }
    }
    let requests = stores.requests(spec);
    if let Some((sent, error)) = job.send(link, &requests).await? {
        let previous = tags.first().and_then(|t| t.previous.clone()).filter(|_| !job.recipe);
        let mut report = WriteReport::failed(&error, previous);
        if job.recipe {
            report.detail = format!(
                "{}: request {} of {} refused, the {sent} before it were written",
                report.detail,
                sent + 1,
                requests.len()
            );
            report.tags = results(&tags, spec, Vec::new());
        }
        return Ok(report);
    }
    let (mut read_backs, differ) = job.read_back(link, &tags).await?;
    let detail = if differ.is_empty() {
        String::new()
    } else {
        format!("the device took the write but {}", differ.join(", "))
    };
    let mut report = WriteReport::not_done(Outcome::Written, detail);
    if job.recipe {
        report.tags = results(&tags, spec, read_backs);
    } else {
        report.previous.clone_from(&tags[0].previous);
        report.read_back = read_backs.pop().flatten();
    }
    Ok(report)
}

/// One write of one tag or several, on one device.
struct Job<'a> {
    spec: &'a DeviceSpec,
    layouts: &'a [Layout],
    /// Several tags: refusals name theirs.
    recipe: bool,
}

impl Job<'_> {
    /// `detail` of a refusal, naming the tag in a recipe.
    fn named(&self, write: &TagWrite, detail: String) -> String {
        if self.recipe {
            format!(
                "tag {}: {detail}; nothing was written",
                self.spec.tags[write.index].name
            )
        } else {
            detail
        }
    }

    /// Checks every tag and value and lays each out as the device stores it.
    fn prepare_all<'w>(&self, writes: &'w [TagWrite]) -> Result<Vec<(&'w TagWrite, Raw)>, WriteReport> {
        writes
            .iter()
            .map(|write| {
                let (tag, layout) = (&self.spec.tags[write.index], &self.layouts[write.index]);
                if !tag.writable {
                    let detail = format!("tag {} is not writable (spec.tags[{}].writable)", tag.name, write.index);
                    return Err(WriteReport::not_done(Outcome::NotWritable, self.named(write, detail)));
                }
                prepare(tag, layout, &write.value)
                    .map(|raw| (write, raw))
                    .map_err(|refusal| WriteReport::not_done(refusal.outcome, self.named(write, refusal.detail)))
            })
            .collect()
    }

    /// Reads every tag before the write and compares the expected values; the inner `Err`
    /// is a refusal.
    async fn read_before<'w>(
        &self,
        link: &mut Link,
        prepared: Vec<(&'w TagWrite, Raw)>,
    ) -> Result<Result<Vec<Prepared<'w>>, WriteReport>, RequestError> {
        let timeout = self.spec.timeout.get();
        let mut tags = Vec::with_capacity(prepared.len());
        for (write, raw) in prepared {
            let read = Read::of_tag(self.spec, write.index);
            let before = match connection::execute(link, &read, timeout).await {
                Ok(data) => Some(data),
                // A write-only register may refuse reads; only a bit and a compare-and-set need one.
                Err(RequestError::Exception(code)) if write.expected.is_none() && !matches!(raw, Raw::Bit(_)) => {
                    tracing::debug!(tag = %self.spec.tags[write.index].name, exception = %code, "the tag cannot be read before its write");
                    None
                }
                Err(error @ RequestError::Exception(_)) => {
                    let mut report = WriteReport::failed(&error, None);
                    report.detail = self.named(write, format!("reading the current value: {}", report.detail));
                    return Ok(Err(report));
                }
                Err(error) => return Err(error),
            };
            let previous = before
                .as_ref()
                .and_then(|data| value_of(data, &self.layouts[write.index]));
            if let Some(expected) = &write.expected
                && !previous.as_ref().is_some_and(|p| same_value(p, expected))
            {
                let reads = previous
                    .as_ref()
                    .map_or_else(|| "nothing".to_owned(), ToString::to_string);
                let detail = format!("the tag reads {reads}, not the expected {expected}");
                let mut report = WriteReport::not_done(Outcome::ExpectedMismatch, self.named(write, detail));
                report.previous = previous.filter(|_| !self.recipe);
                return Ok(Err(report));
            }
            tags.push(Prepared {
                write,
                raw,
                read,
                before,
                previous,
            });
        }
        Ok(Ok(tags))
    }

    /// Sends `requests` in order; `Some` is the one the device refused (the earlier ones
    /// were taken) and its exception.
    async fn send(
        &self,
        link: &mut Link,
        requests: &[Request<'static>],
    ) -> Result<Option<(usize, RequestError)>, RequestError> {
        for (sent, request) in requests.iter().enumerate() {
            match connection::call(link, request.clone(), self.spec.timeout.get()).await {
                Ok(response) if acknowledges(request, &response) => {}
                Ok(response) => {
                    return Err(RequestError::Garbage(format!(
                        "{response:?} does not acknowledge {request:?}"
                    )));
                }
                Err(error @ RequestError::Exception(_)) => return Ok(Some((sent, error))),
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    /// Reads every tag back: its value, and what reads back other than written.
    async fn read_back(
        &self,
        link: &mut Link,
        tags: &[Prepared<'_>],
    ) -> Result<(Vec<Option<PointValue>>, Vec<String>), RequestError> {
        let mut read_backs = Vec::with_capacity(tags.len());
        let mut differ = Vec::new();
        for tag in tags {
            let layout = &self.layouts[tag.write.index];
            let after = connection::execute(link, &tag.read, self.spec.timeout.get()).await?;
            let read_back = value_of(&after, layout);
            if !holds(&after, &tag.raw, layout.bit) {
                let shown = read_back
                    .as_ref()
                    .map_or_else(|| "nothing".to_owned(), ToString::to_string);
                differ.push(if self.recipe {
                    format!("tag {} reads back {shown}", self.spec.tags[tag.write.index].name)
                } else {
                    format!("reads back {shown}")
                });
            }
            read_backs.push(read_back);
        }
        Ok((read_backs, differ))
    }
}

/// A recipe's tags with their values before and, where read, after.
fn results(tags: &[Prepared<'_>], spec: &DeviceSpec, read_backs: Vec<Option<PointValue>>) -> Vec<TagResult> {
    let mut read_backs = read_backs.into_iter();
    tags.iter()
        .map(|tag| TagResult {
            tag: spec.tags[tag.write.index].name.clone(),
            previous: tag.previous.clone(),
            read_back: read_backs.next().flatten(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tagstream_crds::device::ByteOrder;

    use super::*;

    fn tag(yaml: &str) -> (Tag, Layout) {
        let tag: Tag = serde_yaml::from_str(yaml).unwrap();
        let layout = Layout::of(&tag, ByteOrder::ABCD);
        (tag, layout)
    }

    fn outcome(yaml: &str, value: &PointValue) -> Result<Raw, (Outcome, String)> {
        let (tag, layout) = tag(yaml);
        prepare(&tag, &layout, value).map_err(|r| (r.outcome, r.detail))
    }

    const SETPOINT: &str =
        "{name: sp, register: holding, address: 0, type: int16, scale: 0.1, writable: true, min: -20, max: 90}";

    #[test]
    fn a_scaled_setpoint_is_sent_raw_within_its_bounds() {
        assert_eq!(
            outcome(SETPOINT, &PointValue::Double(21.5)),
            Ok(Raw::Registers(vec![215]))
        );
        assert_eq!(
            outcome(SETPOINT, &PointValue::Double(-2.5)),
            Ok(Raw::Registers(vec![(-25i16) as u16]))
        );
        assert_eq!(outcome(SETPOINT, &PointValue::Int(90)), Ok(Raw::Registers(vec![900])));
        let (kind, detail) = outcome(SETPOINT, &PointValue::Double(90.1)).unwrap_err();
        assert_eq!(
            (kind, detail.as_str()),
            (Outcome::OutOfRange, "90.1 is above the tag's max 90")
        );
        let (kind, detail) = outcome(SETPOINT, &PointValue::Double(21.55)).unwrap_err();
        assert_eq!(kind, Outcome::OutOfRange);
        assert!(detail.contains("not a whole number of raw units"), "{detail}");
        let (kind, _) = outcome(SETPOINT, &PointValue::Bool(true)).unwrap_err();
        assert_eq!(kind, Outcome::Invalid);
    }

    #[test]
    fn a_value_outside_its_type_is_refused_not_saturated() {
        let u16_tag = "{name: n, register: holding, address: 0, type: uint16, writable: true}";
        assert_eq!(
            outcome(u16_tag, &PointValue::UInt(65535)),
            Ok(Raw::Registers(vec![65535]))
        );
        for value in [PointValue::Int(65536), PointValue::Int(-1), PointValue::Double(1e30)] {
            let (kind, _) = outcome(u16_tag, &value).unwrap_err();
            assert_eq!(kind, Outcome::OutOfRange, "{value}");
        }
        let u64_tag = "{name: n, register: holding, address: 0, type: uint64, writable: true}";
        assert_eq!(
            outcome(u64_tag, &PointValue::UInt(u64::MAX)),
            Ok(Raw::Registers(vec![u16::MAX; 4]))
        );
        let f32_tag = "{name: f, register: holding, address: 0, type: float32, writable: true}";
        assert_eq!(
            outcome(f32_tag, &PointValue::Double(1e39)).unwrap_err().0,
            Outcome::OutOfRange
        );
        let text = "{name: s, register: holding, address: 0, type: string, length: 2, writable: true}";
        assert_eq!(
            outcome(text, &PointValue::String("AB".into())),
            Ok(Raw::Registers(vec![0x4142, 0]))
        );
        assert_eq!(
            outcome(text, &PointValue::String("ABCDE".into())).unwrap_err().0,
            Outcome::OutOfRange
        );
    }

    /// The requests of a one-tag write.
    fn requests(spec: &DeviceSpec, start: u16, raw: &Raw, before: Option<&Data>, bit: u8) -> Vec<Request<'static>> {
        let mut stores = Stores::default();
        stores.add(start, raw, before, bit).unwrap();
        stores.requests(spec)
    }

    #[test]
    fn a_recipe_joins_contiguous_registers_and_coils_and_the_bits_of_a_register() {
        let spec: DeviceSpec = serde_yaml::from_str(
            "site: s\nconnection: {tcp: {host: h}}\ntags:\n  - {name: t, register: coil, address: 0, type: bool}\n",
        )
        .unwrap();
        let mut stores = Stores::default();
        stores.add(0, &Raw::Registers(vec![1]), None, 0).unwrap();
        stores.add(1, &Raw::Registers(vec![2, 3]), None, 0).unwrap();
        stores.add(10, &Raw::Registers(vec![4]), None, 0).unwrap();
        let before = Data::Registers(vec![0b1]);
        stores.add(20, &Raw::Bit(true), Some(&before), 3).unwrap();
        stores.add(20, &Raw::Bit(false), Some(&before), 0).unwrap();
        stores.add(5, &Raw::Coil(true), None, 0).unwrap();
        stores.add(6, &Raw::Coil(false), None, 0).unwrap();
        assert_eq!(
            stores.requests(&spec),
            [
                Request::WriteMultipleRegisters(0, Cow::Owned(vec![1, 2, 3])),
                Request::WriteSingleRegister(10, 4),
                Request::WriteSingleRegister(20, 0b1000),
                Request::WriteMultipleCoils(5, Cow::Owned(vec![true, false])),
            ]
        );
        assert_eq!(
            stores.add(2, &Raw::Registers(vec![9]), None, 0),
            Err(2),
            "written twice"
        );
        assert_eq!(stores.add(6, &Raw::Coil(true), None, 0), Err(6), "written twice");
    }

    #[test]
    fn a_long_run_is_split_at_the_protocols_limit() {
        let values: std::collections::BTreeMap<u16, u16> = (0..250).map(|a| (a, a)).collect();
        let lengths: Vec<(u16, usize)> = runs(&values, MAX_REGISTERS_PER_WRITE)
            .iter()
            .map(|(start, run)| (*start, run.len()))
            .collect();
        assert_eq!(lengths, [(0, 123), (123, 123), (246, 4)]);
    }

    #[test]
    fn a_bit_is_written_by_read_modify_write_of_its_register() {
        let spec: DeviceSpec = serde_yaml::from_str(
            "site: s\nconnection: {tcp: {host: h}}\ntags:\n  - {name: b, register: holding, address: 7, type: bit, bit: 3, writable: true}\n",
        )
        .unwrap();
        let before = Data::Registers(vec![0b1000_0001]);
        let set = requests(&spec, 7, &Raw::Bit(true), Some(&before), 3);
        assert_eq!(set, [Request::WriteSingleRegister(7, 0b1000_1001)]);
        let before = Data::Registers(vec![0b1000_1001]);
        let clear = requests(&spec, 7, &Raw::Bit(false), Some(&before), 3);
        assert_eq!(clear, [Request::WriteSingleRegister(7, 0b1000_0001)]);
    }

    #[test]
    fn the_write_quirks_choose_the_function_codes() {
        let mut spec: DeviceSpec = serde_yaml::from_str(
            "site: s\nconnection: {tcp: {host: h}}\ntags:\n  - {name: f, register: holding, address: 0, type: float32, writable: true}\n",
        )
        .unwrap();
        let words = Raw::Registers(vec![1, 2]);
        assert_eq!(
            requests(&spec, 4, &words, None, 0),
            [Request::WriteMultipleRegisters(4, Cow::Owned(vec![1, 2]))]
        );
        assert_eq!(
            requests(&spec, 4, &Raw::Coil(true), None, 0),
            [Request::WriteSingleCoil(4, true)]
        );
        spec.quirks.write_single = true;
        assert_eq!(
            requests(&spec, 4, &words, None, 0),
            [Request::WriteSingleRegister(4, 1), Request::WriteSingleRegister(5, 2)]
        );
        spec.quirks.write_single = false;
        spec.quirks.write_multiple = true;
        assert_eq!(
            requests(&spec, 4, &Raw::Registers(vec![9]), None, 0),
            [Request::WriteMultipleRegisters(4, Cow::Owned(vec![9]))]
        );
        assert_eq!(
            requests(&spec, 4, &Raw::Coil(false), None, 0),
            [Request::WriteMultipleCoils(4, Cow::Owned(vec![false]))]
        );
    }
}
