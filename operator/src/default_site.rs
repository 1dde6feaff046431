//! The spec of the Site the operator creates for a Device or Formula naming a missing one,
//! read from a file (the chart's `defaultSite` values) and checked at start-up the way the
//! API server would check it, so that a bad value stops the operator with the field
//! named instead of failing every Site creation later.

use std::path::Path;

use tagstream_crds::{
    SiteSpec,
    manifest::{LoadError, Report, parse_into},
};

/// Reads and validates a Site spec (the `spec` of a Site, as YAML).
pub fn load(path: &Path) -> Result<SiteSpec, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Validates a Site spec given as YAML text; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<SiteSpec, LoadError> {
    let spec: serde_yaml::Value = serde_yaml::from_str(text).unwrap_or(serde_yaml::Value::Null);
    let document = serde_yaml::to_string(&serde_json::json!({
        "apiVersion": tagstream_crds::API_VERSION,
        "kind": "Site",
        "metadata": {"name": "default-site"},
        "spec": if spec.is_null() { serde_json::json!({}) } else { serde_json::to_value(&spec).unwrap_or_default() },
    }))
    .expect("JSON serialises to YAML");
    let mut report = Report::default();
    parse_into(&mut report, path, &document);
    if report.has_errors() {
        return Err(LoadError::Invalid(report.diagnostics));
    }
    Ok(report.sites.remove(0).object.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_api_defaults() {
        assert_eq!(parse(Path::new("d.yaml"), "").unwrap(), SiteSpec::default());
    }

    #[test]
    fn a_queue_larger_than_its_volume_is_refused_with_the_field_named() {
        let text = "storage: {size: 1Gi}\nqueue: {maxSize: 2Gi}\n";
        let error = parse(Path::new("d.yaml"), text).unwrap_err().to_string();
        assert!(error.contains("queue.maxSize"), "{error}");
    }
}
