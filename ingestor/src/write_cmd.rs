//! `tagstream-ingestor write`: a value written to a writable tag (or several, together, as
//! a recipe), either directly on the
//! device from its manifest (commissioning, with no ingestor running against it) or
//! through the site's running ingestor over NATS, which serialises it with its polls and
//! audits it.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use prost::Message as _;
use tagstream_crds::device::{DataType, Tag};
use tagstream_proto::v1::{TagWrite, WriteReply, WriteRequest};

use tagstream_core::point::PointValue;

use crate::{
    acquisition::{
        poller::{self, NamedWrite},
        write::{self, WriteReport},
    },
    read,
    writes::wire,
};

/// A number as the narrowest value that holds it: an integer when it is one.
fn number(text: &str) -> Option<PointValue> {
    text.parse::<i64>()
        .map(PointValue::Int)
        .or_else(|_| text.parse::<u64>().map(PointValue::UInt))
        .or_else(|_| text.parse::<f64>().map(PointValue::Double))
        .ok()
}

fn boolean(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "on" => Some(true),
        "false" | "off" => Some(false),
        _ => None,
    }
}

/// `text` as a value for `tag`, by the tag's type.
fn value_for(tag: &Tag, text: &str) -> anyhow::Result<PointValue> {
    let value = match tag.data_type {
        DataType::String => Some(PointValue::String(text.to_owned())),
        DataType::Bool | DataType::Bit => boolean(text).map(PointValue::Bool).or_else(|| number(text)),
        _ => number(text),
    };
    value.with_context(|| {
        format!(
            "{text:?} is not a value for tag {} of type {:?}",
            tag.name, tag.data_type
        )
    })
}

/// `text` as a value when the tag's type is not known here: a boolean, a number, or text.
pub fn value_of(text: &str, as_text: bool) -> PointValue {
    if as_text {
        return PointValue::String(text.to_owned());
    }
    boolean(text)
        .map(PointValue::Bool)
        .or_else(|| number(text))
        .unwrap_or_else(|| PointValue::String(text.to_owned()))
}

/// Writes `writes` (tag name, value text, expected text) to the device in `paths` (or the
/// one named `only`) directly: one tag, or several together as a recipe.
pub async fn write_direct(
    paths: &[PathBuf],
    only: Option<&str>,
    writes: &[(String, String, Option<String>)],
) -> anyhow::Result<WriteReport> {
    let devices = read::devices(paths, only)?;
    let [device] = devices.as_slice() else {
        anyhow::bail!("the manifests hold {} devices; choose one with --device", devices.len());
    };
    let name = device.metadata.name.as_deref().unwrap_or_default();
    let spec = &device.spec;
    let writes = writes
        .iter()
        .map(|(tag, text, expected)| {
            let index = spec
                .tags
                .iter()
                .position(|t| t.name == *tag)
                .with_context(|| format!("device {name} has no tag {tag:?}"))?;
            Ok(write::TagWrite {
                index,
                value: value_for(&spec.tags[index], text)?,
                expected: expected
                    .as_deref()
                    .map(|e| value_for(&spec.tags[index], e))
                    .transpose()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut link = None;
    let context = poller::connected(&mut link, spec)
        .await
        .with_context(|| format!("connecting to device {name}"))?;
    let layouts = poller::layouts(spec);
    let written = write::write_tags(context, spec, &layouts, &writes).await;
    if let Some(link) = link {
        link.disconnect().await;
    }
    Ok(written.unwrap_or_else(|e| WriteReport::failed(&e, None)))
}

/// The `write` command's arguments.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["paths", "subject"])))]
pub struct WriteOptions {
    /// Manifest files or directories with the Device: write to it directly.
    #[arg(short = 'f', long = "filename", requires = "tags")]
    pub paths: Vec<PathBuf>,
    /// The device, when the manifests hold several.
    #[arg(long, requires = "paths")]
    pub device: Option<String>,
    /// A tag and its value (`--tag setpoint 72.5`); several are written together, as a
    /// recipe: all checked first, contiguous registers in one request, no poll in between.
    #[arg(long = "tag", num_args = 2, value_names = ["NAME", "VALUE"])]
    pub tags: Vec<String>,
    /// Write through a running ingestor: the tag's write subject,
    /// `<writes.subjectPrefix>.<namespace>.<site>.<device>.<tag>` (with VALUE), or the
    /// device's, `<...>.<device>`, for a recipe (with `--tag` pairs).
    #[arg(long, conflicts_with = "paths")]
    pub subject: Option<String>,
    /// NATS server URL, with `--subject`; `nats://user:password@host:port` authenticates.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// A NATS credentials file (JWT and nkey seed, as `nsc` writes them), with `--subject`.
    #[arg(long, requires = "subject")]
    pub creds: Option<PathBuf>,
    /// Who asks, recorded in the audit (default: $USER).
    #[arg(long, requires = "subject")]
    pub requested_by: Option<String>,
    /// Request id, to repeat a request safely (default: a random one).
    #[arg(long, requires = "subject")]
    pub request_id: Option<String>,
    /// With `--subject`, send values as text even when they read as numbers.
    #[arg(long, requires = "subject")]
    pub text: bool,
    /// Write only if the tag reads this value now (a one-tag write).
    #[arg(long, conflicts_with = "expect")]
    pub expected: Option<String>,
    /// Write only if tag NAME reads VALUE now (compare and set per tag; repeat it).
    #[arg(long, num_args = 2, value_names = ["NAME", "VALUE"])]
    pub expect: Vec<String>,
    /// How long to wait for the ingestor's answer.
    #[arg(long, value_parser = tagstream_core::config::parse_duration, default_value = "15s")]
    pub timeout: Duration,
    /// The value of a one-tag write through `--subject`, in engineering units (`21.5`,
    /// `true`, `text`).
    pub value: Option<String>,
}

/// NAME VALUE pairs as clap collects them.
fn pairs(flat: &[String]) -> Vec<(String, String)> {
    flat.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect()
}

/// The writes `options` ask: (tag, value, expected), by tag name; the tag of a one-tag
/// write through `--subject` is its subject's, and named "" here.
fn asked(options: &WriteOptions) -> anyhow::Result<Vec<(String, String, Option<String>)>> {
    let tags = pairs(&options.tags);
    let expect = pairs(&options.expect);
    let writes: Vec<(String, String, Option<String>)> = match (&options.value, tags.is_empty()) {
        (Some(_), false) => anyhow::bail!("give the value with --tag NAME VALUE, not after it"),
        (None, true) => anyhow::bail!("nothing to write: give --tag NAME VALUE (or VALUE with a tag's --subject)"),
        (Some(value), true) if options.subject.is_some() => {
            vec![(String::new(), value.clone(), options.expected.clone())]
        }
        (Some(_), true) => anyhow::bail!("with -f, give the tag and its value as --tag NAME VALUE"),
        (None, false) => {
            let single = tags.len() == 1;
            tags.into_iter()
                .map(|(tag, value)| {
                    let expected = expect
                        .iter()
                        .find(|(name, _)| *name == tag)
                        .map(|(_, e)| e.clone())
                        .or_else(|| options.expected.clone().filter(|_| single));
                    (tag, value, expected)
                })
                .collect()
        }
    };
    if let Some((name, _)) = expect
        .iter()
        .find(|(name, _)| !writes.iter().any(|(tag, ..)| tag == name))
    {
        anyhow::bail!("--expect names tag {name:?}, which this write does not write");
    }
    if options.expected.is_some() && writes.len() > 1 {
        anyhow::bail!("--expected is for a one-tag write: give each tag's as --expect NAME VALUE");
    }
    Ok(writes)
}

/// Writes as `options` say: directly with `-f`, through an ingestor with `--subject`.
pub async fn write(options: WriteOptions) -> anyhow::Result<WriteReport> {
    let writes = asked(&options)?;
    let Some(subject) = options.subject else {
        return write_direct(&options.paths, options.device.as_deref(), &writes).await;
    };
    let as_value = |text: &str| value_of(text, options.text);
    let asked = match writes.as_slice() {
        [(tag, value, expected)] if tag.is_empty() => Asked::Tag {
            value: as_value(value),
            expected: expected.as_deref().map(as_value),
        },
        _ => Asked::Recipe(
            writes
                .iter()
                .map(|(tag, value, expected)| NamedWrite {
                    tag: tag.clone(),
                    value: as_value(value),
                    expected: expected.as_deref().map(as_value),
                })
                .collect(),
        ),
    };
    let write = NatsWrite {
        url: options.nats_url,
        subject,
        asked,
        request_id: options
            .request_id
            .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..))),
        requested_by: options
            .requested_by
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default(),
        credentials_file: options.creds,
        timeout: options.timeout,
    };
    Ok(wire::report(&write_via_nats(&write).await?))
}

/// What a write through the ingestor asks.
#[derive(Clone, Debug)]
pub enum Asked {
    /// One tag, the subject's.
    Tag {
        value: PointValue,
        expected: Option<PointValue>,
    },
    /// Several tags of the subject's device, together.
    Recipe(Vec<NamedWrite>),
}

/// What `write --subject` sends.
#[derive(Clone, Debug)]
pub struct NatsWrite {
    pub url: String,
    pub subject: String,
    pub asked: Asked,
    pub request_id: String,
    pub requested_by: String,
    /// A NATS credentials file (JWT and nkey seed), unless the URL carries user:password.
    pub credentials_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// Sends a write request to a running ingestor and waits for its reply.
pub async fn write_via_nats(write: &NatsWrite) -> anyhow::Result<WriteReply> {
    let crate::nats_cli::Connected { client, mut violations } = crate::nats_cli::connect(
        &write.url,
        write.credentials_file.as_deref(),
        "tagstream-ingestor write",
        |options| options.request_timeout(Some(write.timeout)),
    )
    .await?;
    let mut request = WriteRequest {
        request_id: write.request_id.clone(),
        requested_by: write.requested_by.clone(),
        ..WriteRequest::default()
    };
    match &write.asked {
        Asked::Tag { value, expected } => {
            request.value = Some(wire::to_wire(value));
            request.expected = expected.as_ref().map(wire::to_wire);
        }
        Asked::Recipe(tags) => {
            request.tags = tags
                .iter()
                .map(|t| TagWrite {
                    tag: t.tag.clone(),
                    value: Some(wire::to_wire(&t.value)),
                    expected: t.expected.as_ref().map(wire::to_wire),
                })
                .collect();
        }
    }
    let asked = client.request(write.subject.clone(), request.encode_to_vec().into());
    // A user who may not publish on the subject (or take the reply) gets no answer but
    // the server's `-ERR`: say that, instead of waiting out the timeout.
    let answer = tokio::select! {
        answer = asked => answer,
        Some(violation) = violations.recv() => anyhow::bail!(
            "the broker refused the request: {violation} (the NATS user may not publish on {} or subscribe to its reply inbox; docs/writes.md)",
            write.subject
        ),
    };
    let answer = answer.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => anyhow::anyhow!(
                "no ingestor takes writes on {}: is the Site's spec.writes.enabled true, its ingestor running, and the subject <writes.subjectPrefix>.<namespace>.<site>.<device>.<tag> (or <...>.<device> for a recipe)?",
                write.subject
            ),
            _ => anyhow::anyhow!("{e}"),
        })?;
    WriteReply::decode(answer.payload).context("the answer is not a WriteReply")
}

/// What a write did: one line, and one more per tag of a recipe.
pub fn describe(report: &WriteReport) -> String {
    let mut line = report.outcome.to_string();
    let values = |line: &mut String, previous: Option<&PointValue>, read_back: Option<&PointValue>| {
        if let Some(previous) = previous {
            let _ = write!(line, "; was {previous}");
        }
        if let Some(read_back) = read_back {
            let _ = write!(line, "; reads back {read_back}");
        }
    };
    values(&mut line, report.previous.as_ref(), report.read_back.as_ref());
    if !report.detail.is_empty() {
        let _ = write!(line, ": {}", report.detail);
    }
    for tag in &report.tags {
        let _ = write!(line, "\n  {}", tag.tag);
        values(&mut line, tag.previous.as_ref(), tag.read_back.as_ref());
    }
    line
}
