//! Write requests, replies and audits in the wire format (`proto/tagstream/v1/write.proto`).

use tagstream_core::point::{PointValue, Sample, now_ns};
use tagstream_proto::v1::{self as proto, PointBatch, SourceKind, WriteAudit, WriteOutcome, WriteReply, value::Kind};

use crate::{
    acquisition::write::{Outcome, WriteReport},
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
    }
}

/// Who asked what of which tag.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub device: String,
    pub tag: String,
    pub unit: Option<String>,
    pub request: proto::WriteRequest,
}

/// The audit of one attempt: a batch of the device with one point, the tag as read back
/// (Good) or the outcome as a Bad point's reason, and the whole exchange.
pub fn audit(attempt: &Attempt, reply: WriteReply) -> PointBatch {
    let at = now_ns();
    let read_back = reply.read_back.as_ref().and_then(from_wire);
    let sample = match read_back {
        Some(value) if reply.outcome == i32::from(WriteOutcome::Written) => Sample::good(value, at),
        _ => {
            let name = WriteOutcome::try_from(reply.outcome).map_or("unknown", |o| o.as_str_name());
            Sample::bad(format!("{name}: {}", reply.detail), at)
        }
    };
    PointBatch {
        source: attempt.device.clone(),
        source_kind: SourceKind::Write.into(),
        points: vec![wire_point(&attempt.tag, &sample, attempt.unit.as_deref())],
        write: Some(WriteAudit {
            request_id: attempt.request.request_id.clone(),
            requested_by: attempt.request.requested_by.clone(),
            tag: attempt.tag.clone(),
            requested: attempt.request.value.clone(),
            reply: Some(reply),
        }),
        ..PointBatch::default()
    }
}
