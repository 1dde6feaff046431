//! `tagstream-ingestor check`: validate manifests and show each site's formula order.

use std::{fmt::Write as _, path::PathBuf};

use tagstream_crds::{
    Site,
    manifest::load_report,
    site_files::{CONFIG_MAP_LIMIT, data_bytes, site_files},
};

use tagstream_core::config::{self, SiteConfig};

/// The printed report and whether it found errors.
#[derive(Debug)]
pub struct CheckOutcome {
    pub text: String,
    pub errors: usize,
}

/// Validates every object (schema, CEL rules, references) and compiles each site's formulas.
pub fn check(paths: &[PathBuf]) -> anyhow::Result<CheckOutcome> {
    let report = load_report(paths)?;
    let mut text = format!("checked {}\n", config::summary(&report));
    let mut errors = 0;
    for diagnostic in &report.diagnostics {
        let _ = writeln!(text, "{diagnostic}");
    }
    errors += report.errors().count();
    for site in config::sites(&report) {
        errors += describe_site(&site, &mut text);
    }
    if errors == 0 {
        text.push_str("OK\n");
    } else {
        let _ = writeln!(text, "FAILED: {errors} error(s)");
    }
    Ok(CheckOutcome { text, errors })
}

fn describe_site(site: &SiteConfig, text: &mut String) -> usize {
    let calc = site.calc();
    let _ = writeln!(
        text,
        "\nsite {}/{}{}: {} devices, {} tags, {} formulas",
        site.namespace,
        site.name,
        if site.defined { "" } else { " (default settings)" },
        site.devices.len(),
        site.tags().count(),
        site.formulas.len()
    );
    if calc.order().next().is_some() {
        text.push_str("  formula evaluation order:\n");
        for (position, formula) in calc.order().enumerate() {
            let unit = formula
                .spec
                .unit
                .as_deref()
                .map(|u| format!(" [{u}]"))
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "    {}. {} = {}{unit}",
                position + 1,
                formula.name,
                formula.spec.expression
            );
        }
    }
    for (name, issue) in calc.issues() {
        let _ = writeln!(text, "  error: formula {}/{name}: {issue}", site.namespace);
    }
    calc.issues().len() + describe_size(site, calc.issues(), text)
}

/// The size of the ConfigMaps the operator would render for `site`, against Kubernetes'
/// limit; 1 error when they cannot be laid out under it.
fn describe_size(
    site: &SiteConfig,
    issues: &std::collections::BTreeMap<String, tagstream_core::calc::FormulaError>,
    text: &mut String,
) -> usize {
    let mut object = Site::new(&site.name, site.spec.clone());
    object.metadata.namespace = Some(site.namespace.clone());
    let devices: Vec<_> = site.devices.iter().collect();
    let formulas: Vec<_> = site
        .formulas
        .iter()
        .filter(|f| !issues.contains_key(f.metadata.name.as_deref().unwrap_or_default()))
        .collect();
    match site_files(&object, &devices, &formulas) {
        Ok(files) => {
            let sizes: Vec<String> = files
                .iter()
                .map(|f| format!("{:.0}%", data_bytes(f) as f64 * 100.0 / CONFIG_MAP_LIMIT as f64))
                .collect();
            let _ = writeln!(
                text,
                "  rendered configuration: {} bytes in {} ConfigMap(s), each of Kubernetes' {CONFIG_MAP_LIMIT} used {}",
                files.iter().map(data_bytes).sum::<usize>(),
                files.len(),
                sizes.join(", ")
            );
            0
        }
        Err(too_large) => {
            let _ = writeln!(text, "  error: {too_large}");
            1
        }
    }
}
