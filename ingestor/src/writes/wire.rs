//! Write requests, replies and audits in the wire format (`proto/tagstream/v1/write.proto`).

use std::collections::HashMap;

use tagstream_core::point::{PointValue, Sample, now_ns};
use tagstream_proto::v1::{self as proto, PointBatch, SourceKind, WriteAudit, WriteOutcome, WriteReply, value::Kind};

use crate::{
    acquisition::write::{Outcome, TagResult, WriteReport},
    service::pipeline::wire_point,
};

/// A wire value as the ingestor's value, `None` when no kind is set.
pub fn from_wire(value: &proto::Value) -> Option<PointValue> {
    Some(match value.kind.as_ref()? {
        Kind::BoolValue(b) => PointValue::Bool(*b),
        Kind::IntValue(i) => PointValue::Int(*i),
        Kind::UintValue(u) => PointValue::UInt(*u),
        Kind::DoubleValue(d) => PointValue::Double(*d),
        Kind::StringValue(s) => PointValue::String(s.clone()),
    })
}

pub fn to_wire(value: &PointValue) -> proto::Value {
    let kind = match value {
        PointValue::Bool(b) => Kind::BoolValue(*b),
        PointValue::Int(i) => Kind::IntValue(*i),
        PointValue::UInt(u) => Kind::UintValue(*u),
        PointValue::Double(d) => Kind::DoubleValue(*d),
        PointValue::String(s) => Kind::StringValue(s.clone()),
    };
    proto::Value { kind: Some(kind) }
}

fn outcome(outcome: Outcome) -> WriteOutcome {
    match outcome {
        Outcome::Written => WriteOutcome::Written,
        Outcome::Refused(_) => WriteOutcome::Refused,
        Outcome::OutOfRange => WriteOutcome::OutOfRange,
        Outcome::NotWritable => WriteOutcome::NotWritable,
        Outcome::Timeout => WriteOutcome::Timeout,
        Outcome::ExpectedMismatch => WriteOutcome::ExpectedMismatch,
        Outcome::Invalid => WriteOutcome::Invalid,
        Outcome::Failed => WriteOutcome::Failed,
    }
}

pub fn reply(request_id: &str, report: &WriteReport) -> WriteReply {
    WriteReply {
        request_id: request_id.to_owned(),
        outcome: outcome(report.outcome).into(),
        detail: report.detail.clone(),
        previous: report.previous.as_ref().map(to_wire),
        read_back: report.read_back.as_ref().map(to_wire),
        exception_code: match report.outcome {
            Outcome::Refused(code) => u32::from(u8::from(code)),
            _ => 0,
        },
        tags: report
            .tags
            .iter()
            .map(|t| proto::TagResult {
                tag: t.tag.clone(),
                previous: t.previous.as_ref().map(to_wire),
                read_back: t.read_back.as_ref().map(to_wire),
            })
            .collect(),
    }
}

/// The inverse of [`reply`]: a wire reply as a report.
pub fn report(reply: &WriteReply) -> WriteReport {
    let outcome = match WriteOutcome::try_from(reply.outcome) {
        Ok(WriteOutcome::Written) => Outcome::Written,
        Ok(WriteOutcome::Refused) => Outcome::Refused(tokio_modbus::ExceptionCode::new(
            u8::try_from(reply.exception_code).unwrap_or(0),
        )),
        Ok(WriteOutcome::OutOfRange) => Outcome::OutOfRange,
        Ok(WriteOutcome::NotWritable) => Outcome::NotWritable,
        Ok(WriteOutcome::Timeout) => Outcome::Timeout,
        Ok(WriteOutcome::ExpectedMismatch) => Outcome::ExpectedMismatch,
        Ok(WriteOutcome::Invalid) => Outcome::Invalid,
        _ => Outcome::Failed,
    };
    WriteReport {
        outcome,
        detail: reply.detail.clone(),
        previous: reply.previous.as_ref().and_then(from_wire),
        read_back: reply.read_back.as_ref().and_then(from_wire),
        tags: reply
            .tags
            .iter()
            .map(|t| TagResult {
                tag: t.tag.clone(),
                previous: t.previous.as_ref().and_then(from_wire),
                read_back: t.read_back.as_ref().and_then(from_wire),
            })
            .collect(),
    }
}

/// Who asked what of which tag (or tags, for a recipe).
#[derive(Clone, Debug)]
pub struct Attempt {
    pub device: String,
    /// The tag of a one-tag write; empty for a recipe (its tags are in `request.tags`).
    pub tag: String,
    /// Each tag's unit, by tag name, for the audit's points.
    pub units: HashMap<String, String>,
    pub request: proto::WriteRequest,
}

/// The audit of one attempt: a batch of the device with a point per tag written (as read
/// back, Good; or Bad with the outcome as its reason) and the whole exchange.
pub fn audit(attempt: &Attempt, reply: WriteReply) -> PointBatch {
    let at = now_ns();
    let written = reply.outcome == i32::from(WriteOutcome::Written);
    let failure = || {
        let name = WriteOutcome::try_from(reply.outcome).map_or("unknown", |o| o.as_str_name());
        Sample::bad(format!("{name}: {}", reply.detail), at)
    };
    let point = |tag: &str, read_back: Option<&proto::Value>| {
        let sample = match read_back.and_then(from_wire) {
            Some(value) if written => Sample::good(value, at),
            _ => failure(),
        };
        wire_point(tag, &sample, attempt.units.get(tag).map(String::as_str))
    };
    let points = if attempt.tag.is_empty() {
        attempt
            .request
            .tags
            .iter()
            .map(|asked| {
                let result = reply.tags.iter().find(|r| r.tag == asked.tag);
                point(&asked.tag, result.and_then(|r| r.read_back.as_ref()))
            })
            .collect()
    } else {
        vec![point(&attempt.tag, reply.read_back.as_ref())]
    };
    PointBatch {
        source: attempt.device.clone(),
        source_kind: SourceKind::Write.into(),
        points,
        write: Some(WriteAudit {
            request_id: attempt.request.request_id.clone(),
            requested_by: attempt.request.requested_by.clone(),
            tag: attempt.tag.clone(),
            requested: attempt.request.value.clone(),
            reply: Some(reply),
            requested_tags: attempt.request.tags.clone(),
        }),
        ..PointBatch::default()
    }
}
