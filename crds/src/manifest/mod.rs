//! Loading the manifest files users `kubectl apply` (multi-document YAML) into typed objects,
//! validated offline the way the API server would validate them, plus the checks that need
//! every object of a site at once.
//!
//! Each document goes through, in order:
//! 1. the schema defaults (as the API server applies them before validating);
//! 2. the CRD's OpenAPI schema: types, bounds, patterns, enums, required fields;
//! 3. the CRD's CEL rules (`x-kubernetes-validations`), evaluated with kube-cel;
//! 4. unknown fields (what `kubectl apply --validate=strict` refuses) and list-map keys;
//! 5. deserialisation into the Rust types.
//!
//! Then [`references`] checks what no single object can: formula inputs that name a device,
//! tag or formula that does not exist, names shared by a device and a formula of one site,
//! overlapping registers (a warning), and so on.
//!
//! Every problem is a [`Diagnostic`] that names the file, the document, the object and the
//! field path. Invalid documents are left out and the valid ones kept, so a caller can run
//! what is good and report the rest.

mod references;
mod schema;

use std::{
    fmt::{self, Write as _},
    path::{Path, PathBuf},
};

use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Device, Formula, Site};

/// Where a problem was found.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    /// The file the document came from.
    pub file: PathBuf,
    /// 1-based index of the document in the file.
    pub document: usize,
    /// `Kind namespace/name`, when the document got that far.
    pub object: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Allowed, but probably a mistake.
    Warning,
    /// The object is refused.
    Error,
}

/// One problem with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub source: Source,
    /// Path of the field, e.g. `spec.tags[2].address`; empty for the whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{level}: {}: ", self.source)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// A valid object and the document it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded<K> {
    pub object: K,
    pub source: Source,
}

impl<K: Resource> Loaded<K> {
    /// The object's namespace; `default` when the manifest names none, as kubectl does.
    pub fn namespace(&self) -> &str {
        self.object.meta().namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        self.object.meta().name.as_deref().unwrap_or_default()
    }
}

/// Namespace of objects whose manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The valid objects found in a set of files, and every problem found on the way.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sites: Vec<Loaded<Site>>,
    pub devices: Vec<Loaded<Device>>,
    pub formulas: Vec<Loaded<Formula>>,
    /// Documents of other kinds (Namespaces, Secrets, ...), passed over.
    pub ignored: Vec<Source>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.severity == Severity::Warning)
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }
}

/// Why loading failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} contains no YAML manifests", path.display())]
    Empty { path: PathBuf },
    #[error("{}", Invalid(.0))]
    Invalid(Vec<Diagnostic>),
}

struct Invalid<'a>(&'a [Diagnostic]);

impl fmt::Display for Invalid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.0.iter().filter(|d| d.severity == Severity::Error).count();
        write!(f, "{errors} invalid field(s) in the manifests:")?;
        for d in self.0.iter().filter(|d| d.severity == Severity::Error) {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

/// Loads every `*.yaml` / `*.yml` file under the given files and directories (recursively,
/// in name order) and reports every problem; only an unreadable path is an `Err`.
pub fn load_report(paths: &[PathBuf]) -> Result<Report, LoadError> {
    let mut report = Report::default();
    for path in paths {
        let files = yaml_files(path)?;
        if files.is_empty() {
            return Err(LoadError::Empty { path: path.clone() });
        }
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
                path: file.clone(),
                source,
            })?;
            parse_into(&mut report, &file, &text);
        }
    }
    references::check(&mut report);
    Ok(report)
}

/// Like [`load_report`], but any error fails the load (warnings are kept in the report).
pub fn load(paths: &[PathBuf]) -> Result<Report, LoadError> {
    let report = load_report(paths)?;
    if report.has_errors() {
        return Err(LoadError::Invalid(report.diagnostics));
    }
    Ok(report)
}

/// Parses the documents of one file's text into `report` (no cross-object checks).
pub fn parse_into(report: &mut Report, file: &Path, text: &str) {
    use serde::Deserialize as _;
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut source = Source {
            file: file.to_path_buf(),
            document: index + 1,
            object: None,
        };
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                report
                    .diagnostics
                    .push(error(source, "", format!("not valid YAML: {e}")));
                // The YAML stream cannot be resumed after a syntax error.
                return;
            }
        };
        match identify(&value) {
            Identity::Ours(kind) => {
                source.object = Some(describe(kind, &value));
                match kind {
                    Kind::Site => admit(&mut report.sites, kind, value, source, &mut report.diagnostics),
                    Kind::Device => admit(&mut report.devices, kind, value, source, &mut report.diagnostics),
                    Kind::Formula => admit(&mut report.formulas, kind, value, source, &mut report.diagnostics),
                }
            }
            Identity::Foreign => report.ignored.push(source),
            Identity::Broken(field, message) => report.diagnostics.push(error(source, field, message)),
        }
    }
}

/// The three kinds of this API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Site,
    Device,
    Formula,
}

impl Kind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Site => "Site",
            Self::Device => "Device",
            Self::Formula => "Formula",
        }
    }
}

enum Identity {
    Ours(Kind),
    Foreign,
    Broken(&'static str, String),
}

fn identify(value: &Value) -> Identity {
    let Some(object) = value.as_object() else {
        return Identity::Broken("", "a manifest must be a mapping with apiVersion and kind".into());
    };
    let Some(api_version) = object.get("apiVersion").and_then(Value::as_str) else {
        return Identity::Broken("apiVersion", "required".into());
    };
    let Some(kind) = object.get("kind").and_then(Value::as_str) else {
        return Identity::Broken("kind", "required".into());
    };
    let group = api_version.split_once('/').map_or("", |(group, _)| group);
    if group != crate::GROUP {
        return Identity::Foreign;
    }
    if api_version != crate::API_VERSION {
        return Identity::Broken(
            "apiVersion",
            format!(
                "unsupported version {api_version:?}; this release serves {}",
                crate::API_VERSION
            ),
        );
    }
    match kind {
        "Site" => Identity::Ours(Kind::Site),
        "Device" => Identity::Ours(Kind::Device),
        "Formula" => Identity::Ours(Kind::Formula),
        other => Identity::Broken(
            "kind",
            format!(
                "unknown kind {other:?} in {}; expected Site, Device or Formula",
                crate::GROUP
            ),
        ),
    }
}

fn describe(kind: Kind, value: &Value) -> String {
    let text = |key: &str| value.pointer(&format!("/metadata/{key}")).and_then(Value::as_str);
    format!(
        "{} {}/{}",
        kind.name(),
        text("namespace").unwrap_or(DEFAULT_NAMESPACE),
        text("name").unwrap_or("<unnamed>")
    )
}

/// Validates one document of a known kind and keeps it when it has no error.
fn admit<K: DeserializeOwned>(
    into: &mut Vec<Loaded<K>>,
    kind: Kind,
    value: Value,
    source: Source,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let defaulted = match schema::validate(kind, value) {
        Ok(defaulted) => defaulted,
        Err(problems) => {
            diagnostics.extend(
                problems
                    .into_iter()
                    .map(|(field, message)| error(source.clone(), field, message)),
            );
            return;
        }
    };
    match serde_path_to_error::deserialize::<_, K>(&defaulted) {
        Ok(object) => into.push(Loaded { object, source }),
        Err(e) => {
            let field = field_path_from_serde(e.path());
            diagnostics.push(error(source, field, e.into_inner().to_string()));
        }
    }
}

fn error(source: Source, field: impl Into<String>, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        source,
        field: field.into(),
        message: message.into(),
    }
}

fn field_path_from_serde(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => push_property(&mut out, key),
            Segment::Unknown => push_property(&mut out, "?"),
        }
    }
    out
}

/// Appends `.name` (or just `name` at the start) to a field path.
pub(crate) fn push_property(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

/// The manifest files `path` names: itself when it is a file, else every `*.yaml` and
/// `*.yml` under it (hidden entries left out), in a stable order.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .map_err(read_err)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    entries.sort();
    for entry in entries {
        // Kubernetes ConfigMap mounts keep their real files in `..data` dirs; follow only the
        // visible names so each document is read once.
        let hidden = entry.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            files.extend(yaml_files(&entry)?);
        } else if entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(entry);
        }
    }
    Ok(files)
}
