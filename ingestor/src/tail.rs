//! `tagstream-ingestor tail`: print the points arriving on a subject, decoded.

use std::{io::ErrorKind, path::Path};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use prost::Message as _;
use tagstream_proto::v1::{Point, PointBatch, Quality, point::Value};

use crate::nats_cli::{Connected, connect};

/// Subscribes to `subject` and prints each point until `count` were printed (or forever,
/// or until whoever reads the output stops: `tail | head` ends quietly).
pub async fn tail(
    url: &str,
    creds: Option<&Path>,
    subject: &str,
    json: bool,
    count: Option<usize>,
) -> anyhow::Result<()> {
    let Connected { client, mut violations } =
        connect(url, creds, "tagstream-ingestor tail", |options| options).await?;
    let mut messages = client
        .subscribe(subject.to_owned())
        .await
        .with_context(|| format!("cannot subscribe to {subject}"))?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0;
    if !json {
        let header = format!(
            "{:<30}  {:<24}  {:<20}  {:<24}  {:<20}  QUALITY",
            "TIME", "SITE", "SOURCE", "TAG", "VALUE"
        );
        if !print(&mut out, &header)? {
            return Ok(());
        }
    }
    loop {
        let message = tokio::select! {
            message = messages.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
            Some(violation) = violations.recv() => anyhow::bail!(
                "the broker refused the subscription: {violation} (the NATS user may not subscribe to {subject})"
            ),
        };
        let batch = match PointBatch::decode(message.payload.as_ref()) {
            Ok(batch) => batch,
            Err(e) => {
                eprintln!("{}: not a tagstream.v1.PointBatch: {e}", message.subject);
                continue;
            }
        };
        for point in &batch.points {
            let line = if json {
                json_line(&batch, point)
            } else {
                table_line(&batch, point)
            };
            printed += 1;
            if !print(&mut out, &line)? || count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
    }
}

/// Writes `line` and flushes it (the output is often a pipe to `grep`); `false` once the
/// reader has gone. `println!` panicked there ("failed printing to stdout: Broken pipe").
fn print(out: &mut impl std::io::Write, line: &str) -> anyhow::Result<bool> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn value_text(point: &Point) -> String {
    match &point.value {
        None => "-".into(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::UintValue(u)) => u.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::StringValue(s)) => format!("{s:?}"),
    }
}

fn quality_text(point: &Point) -> String {
    let level = match point.quality() {
        Quality::Good => "good",
        Quality::Uncertain => "uncertain",
        Quality::Bad => "bad",
        Quality::Unspecified => "unspecified",
    };
    if point.quality_reason.is_empty() {
        level.into()
    } else {
        format!("{level} ({})", point.quality_reason)
    }
}

fn time_text(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        nanos / 1_000_000
    )
}

/// The source, and for a write audit who asked: `boiler write by operator-7`.
fn source_text(batch: &PointBatch) -> String {
    match &batch.write {
        Some(audit) if audit.requested_by.is_empty() => format!("{} write", batch.source),
        Some(audit) => format!("{} write by {}", batch.source, audit.requested_by),
        None => batch.source.clone(),
    }
}

fn table_line(batch: &PointBatch, point: &Point) -> String {
    let value = if point.unit.is_empty() {
        value_text(point)
    } else {
        format!("{} {}", value_text(point), point.unit)
    };
    format!(
        "{:<30}  {:<24}  {:<20}  {:<24}  {:<20}  {}",
        time_text(point.timestamp_ns),
        format!("{}/{}", batch.namespace, batch.site),
        source_text(batch),
        point.tag,
        value,
        quality_text(point)
    )
}

fn json_line(batch: &PointBatch, point: &Point) -> String {
    let value = match &point.value {
        None => serde_json::Value::Null,
        Some(Value::BoolValue(b)) => (*b).into(),
        Some(Value::IntValue(i)) => (*i).into(),
        Some(Value::UintValue(u)) => (*u).into(),
        Some(Value::DoubleValue(d)) => (*d).into(),
        Some(Value::StringValue(s)) => s.clone().into(),
    };
    let write = batch.write.as_ref().map(|audit| {
        let reply = audit.reply.clone().unwrap_or_default();
        serde_json::json!({
            "requestId": audit.request_id,
            "requestedBy": audit.requested_by,
            "outcome": reply.outcome().as_str_name(),
            "detail": reply.detail,
        })
    });
    serde_json::json!({
        "time": time_text(point.timestamp_ns),
        "namespace": batch.namespace,
        "site": batch.site,
        "source": batch.source,
        "tag": point.tag,
        "value": value,
        "unit": point.unit,
        "quality": quality_text(point),
        "sequence": batch.sequence,
        "part": batch.part,
        "write": write,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::time_text;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time_text(1_795_358_891_640_806_645), "2026-11-22T14:48:11.640Z");
        assert_eq!(time_text(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
