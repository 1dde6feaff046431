//! `tagstream-ingestor write`: one value written to a writable tag, either directly on the
//! device from its manifest (commissioning, with no ingestor running against it) or
//! through the site's running ingestor over NATS, which serialises it with its polls and
//! audits it.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use prost::Message as _;
use tagstream_crds::device::{DataType, Tag};
use tagstream_proto::v1::{WriteReply, WriteRequest};

use tagstream_core::point::PointValue;

use crate::{
    acquisition::{
        poller,
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

/// Writes `text` to `tag` of the device in `paths` (or the one named `only`) directly.
pub async fn write_direct(
    paths: &[PathBuf],
    only: Option<&str>,
    tag: &str,
    text: &str,
    expected: Option<&str>,
) -> anyhow::Result<WriteReport> {
    let devices = read::devices(paths, only)?;
    let [device] = devices.as_slice() else {
        anyhow::bail!("the manifests hold {} devices; choose one with --device", devices.len());
    };
    let name = device.metadata.name.as_deref().unwrap_or_default();
    let spec = &device.spec;
    let index = spec
        .tags
        .iter()
        .position(|t| t.name == tag)
        .with_context(|| format!("device {name} has no tag {tag:?}"))?;
    let value = value_for(&spec.tags[index], text)?;
    let expected = expected.map(|e| value_for(&spec.tags[index], e)).transpose()?;
    let mut link = None;
    let context = poller::connected(&mut link, spec)
        .await
        .with_context(|| format!("connecting to device {name}"))?;
    let layouts = poller::layouts(spec);
    let written = write::write_tag(context, spec, &layouts, index, &value, expected.as_ref()).await;
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
    #[arg(short = 'f', long = "filename", requires = "tag")]
    pub paths: Vec<PathBuf>,
    /// The device, when the manifests hold several.
    #[arg(long, requires = "paths")]
    pub device: Option<String>,
    /// The tag to write, with `-f`.
    #[arg(long, requires = "paths")]
    pub tag: Option<String>,
    /// Write through a running ingestor: the tag's write subject,
    /// `<writes.subjectPrefix>.<namespace>.<site>.<device>.<tag>`.
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
    /// With `--subject`, send VALUE as text even when it reads as a number.
    #[arg(long, requires = "subject")]
    pub text: bool,
    /// Write only if the tag reads this value now.
    #[arg(long)]
    pub expected: Option<String>,
    /// How long to wait for the ingestor's answer.
    #[arg(long, value_parser = tagstream_core::config::parse_duration, default_value = "15s")]
    pub timeout: Duration,
    /// The value, in engineering units (`21.5`, `true`, `text`).
    pub value: String,
}

/// Writes as `options` say: directly with `-f`, through an ingestor with `--subject`.
pub async fn write(options: WriteOptions) -> anyhow::Result<WriteReport> {
    let Some(subject) = options.subject else {
        return write_direct(
            &options.paths,
            options.device.as_deref(),
            options.tag.as_deref().unwrap_or_default(),
            &options.value,
            options.expected.as_deref(),
        )
        .await;
    };
    let write = NatsWrite {
        url: options.nats_url,
        subject,
        value: value_of(&options.value, options.text),
        expected: options.expected.map(|e| value_of(&e, options.text)),
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

/// What `write --subject` sends.
#[derive(Clone, Debug)]
pub struct NatsWrite {
    pub url: String,
    pub subject: String,
    pub value: PointValue,
    pub expected: Option<PointValue>,
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
    let request = WriteRequest {
        request_id: write.request_id.clone(),
        value: Some(wire::to_wire(&write.value)),
        expected: write.expected.as_ref().map(wire::to_wire),
        requested_by: write.requested_by.clone(),
    };
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
                "no ingestor takes writes on {}: is the Site's spec.writes.enabled true, its ingestor running, and the subject <writes.subjectPrefix>.<namespace>.<site>.<device>.<tag>?",
                write.subject
            ),
            _ => anyhow::anyhow!("{e}"),
        })?;
    WriteReply::decode(answer.payload).context("the answer is not a WriteReply")
}

/// One line saying what a write did.
pub fn describe(report: &WriteReport) -> String {
    let mut line = report.outcome.to_string();
    if let Some(previous) = &report.previous {
        let _ = write!(line, "; was {previous}");
    }
    if let Some(read_back) = &report.read_back {
        let _ = write!(line, "; reads back {read_back}");
    }
    if !report.detail.is_empty() {
        let _ = write!(line, ": {}", report.detail);
    }
    line
}
