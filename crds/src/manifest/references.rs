//! Checks across objects: what the API server cannot see because it looks at one object at
//! a time. Errors remove the offending object from the report; warnings keep it.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::{Diagnostic, Loaded, Report, Severity, Source};
use crate::{Device, Formula, InputRef, device::Tag};

pub(super) fn check(report: &mut Report) {
    let mut found = Vec::new();
    reject_duplicate_names(&mut report.sites, "Site", &mut found);
    reject_duplicate_names(&mut report.devices, "Device", &mut found);
    reject_duplicate_names(&mut report.formulas, "Formula", &mut found);
    for device in &report.devices {
        check_device_tags(device, &mut found);
    }
    warn_on_shared_unit_ids(&report.devices, &mut found);
    warn_on_undefined_sites(report, &mut found);
    check_formula_names(report, &mut found);
    check_formula_inputs(report, &mut found);
    // Drop the formulas the checks refused; devices and sites with errors were already
    // dropped by the duplicate check, the only error that can hit them here.
    let refused: HashSet<Source> = found
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.source.clone())
        .collect();
    report.formulas.retain(|f| !refused.contains(&f.source));
    report.devices.retain(|d| !refused.contains(&d.source));
    report.diagnostics.extend(found);
}

fn diagnostic(severity: Severity, source: &Source, field: impl Into<String>, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        severity,
        source: source.clone(),
        field: field.into(),
        message: message.into(),
    }
}

/// Two documents for the same object: `kubectl apply` would keep only the last, silently.
fn reject_duplicate_names<K: kube::Resource>(objects: &mut Vec<Loaded<K>>, kind: &str, found: &mut Vec<Diagnostic>) {
    let mut first: HashMap<(String, String), Source> = HashMap::new();
    objects.retain(|o| {
        let key = (o.namespace().to_owned(), o.name().to_owned());
        if let Some(earlier) = first.get(&key) {
            found.push(diagnostic(
                Severity::Error,
                &o.source,
                "metadata.name",
                format!("{kind} {}/{} is already defined at {earlier}", key.0, key.1),
            ));
            return false;
        }
        first.insert(key, o.source.clone());
        true
    });
}

fn check_device_tags(device: &Loaded<Device>, found: &mut Vec<Diagnostic>) {
    let tags = &device.object.spec.tags;
    for (i, a) in tags.iter().enumerate() {
        for (j, b) in tags.iter().enumerate().skip(i + 1) {
            if overlaps(a, b) {
                found.push(diagnostic(
                    Severity::Warning,
                    &device.source,
                    format!("spec.tags[{j}]"),
                    format!(
                        "{} registers {}..{} overlap tag {:?} (spec.tags[{i}]); intended only when both read the same registers differently",
                        b.name,
                        b.address,
                        u32::from(b.address) + u32::from(b.register_count()) - 1,
                        a.name
                    ),
                ));
            }
        }
    }
}

/// Whether two tags read overlapping addresses of the same table. Bits of one register are
/// meant to share it, so distinct `bit` tags never overlap.
fn overlaps(a: &Tag, b: &Tag) -> bool {
    if a.register != b.register {
        return false;
    }
    if a.bit.is_some() && b.bit.is_some() && a.bit != b.bit {
        return false;
    }
    let (a0, a1) = (
        u32::from(a.address),
        u32::from(a.address) + u32::from(a.register_count()),
    );
    let (b0, b1) = (
        u32::from(b.address),
        u32::from(b.address) + u32::from(b.register_count()),
    );
    a0 < b1 && b0 < a1
}

fn warn_on_shared_unit_ids(devices: &[Loaded<Device>], found: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<(String, u8), &Loaded<Device>> = HashMap::new();
    for device in devices {
        let Some(endpoint) = device.object.spec.connection.endpoint() else {
            continue;
        };
        let unit = device.object.spec.unit_id;
        if let Some(other) = seen.insert((endpoint.clone(), unit), device) {
            found.push(diagnostic(
                Severity::Warning,
                &device.source,
                "spec.unitId",
                format!(
                    "Device {}/{} already polls unit {unit} at {endpoint}; both read the same device",
                    other.namespace(),
                    other.name()
                ),
            ));
        }
    }
}

fn warn_on_undefined_sites(report: &Report, found: &mut Vec<Diagnostic>) {
    let sites: HashSet<(&str, &str)> = report.sites.iter().map(|s| (s.namespace(), s.name())).collect();
    let users = report
        .devices
        .iter()
        .map(|d| (&d.source, d.namespace(), d.object.spec.site.as_str()))
        .chain(
            report
                .formulas
                .iter()
                .map(|f| (&f.source, f.namespace(), f.object.spec.site.as_str())),
        );
    for (source, namespace, site) in users {
        if !sites.contains(&(namespace, site)) {
            found.push(diagnostic(
                Severity::Warning,
                source,
                "spec.site",
                format!("Site {namespace}/{site} is not in these files; it runs with the default settings"),
            ));
        }
    }
}

/// A formula's result is published under its name, beside the site's devices, so a formula
/// and a device of one site cannot share a name.
fn check_formula_names(report: &Report, found: &mut Vec<Diagnostic>) {
    let devices: HashMap<(&str, &str), &Loaded<Device>> =
        report.devices.iter().map(|d| ((d.namespace(), d.name()), d)).collect();
    for formula in &report.formulas {
        if let Some(device) = devices.get(&(formula.namespace(), formula.name()))
            && device.object.spec.site == formula.object.spec.site
        {
            found.push(diagnostic(
                Severity::Error,
                &formula.source,
                "metadata.name",
                format!(
                    "Device {}/{} of the same site has this name; a formula's points are published under its name, beside the devices'",
                    device.namespace(),
                    device.name()
                ),
            ));
        }
    }
}

fn check_formula_inputs(report: &Report, found: &mut Vec<Diagnostic>) {
    let devices: HashMap<(&str, &str), &Device> = report
        .devices
        .iter()
        .map(|d| ((d.namespace(), d.name()), &d.object))
        .collect();
    let formulas: HashMap<(&str, &str), &Formula> = report
        .formulas
        .iter()
        .map(|f| ((f.namespace(), f.name()), &f.object))
        .collect();
    for formula in &report.formulas {
        let namespace = formula.namespace();
        let site = formula.object.spec.site.as_str();
        for (variable, reference) in &formula.object.spec.inputs {
            let field = format!("spec.inputs.{variable}");
            if !is_identifier(variable) {
                found.push(diagnostic(
                    Severity::Error,
                    &formula.source,
                    &field,
                    "a variable name must be an identifier (letters, digits and '_', not starting with a digit) of at most 64 characters",
                ));
                continue;
            }
            if let Some(problem) = resolve(
                InputRef::parse(reference),
                namespace,
                site,
                formula.name(),
                &devices,
                &formulas,
            ) {
                found.push(diagnostic(Severity::Error, &formula.source, field, problem));
            }
        }
    }
}

/// Why an input reference does not resolve within the formula's site, if it does not.
fn resolve(
    input: InputRef<'_>,
    namespace: &str,
    site: &str,
    this: &str,
    devices: &HashMap<(&str, &str), &Device>,
    formulas: &HashMap<(&str, &str), &Formula>,
) -> Option<String> {
    match input {
        InputRef::Tag { device, tag } => {
            let Some(d) = devices.get(&(namespace, device)) else {
                return Some(format!("no valid Device {namespace}/{device}"));
            };
            if d.spec.site != site {
                return Some(format!(
                    "Device {namespace}/{device} belongs to site {:?}, not {site:?}",
                    d.spec.site
                ));
            }
            if !d.spec.tags.iter().any(|t| t.name == tag) {
                let known: Vec<&str> = d
                    .spec
                    .tags
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                return Some(format!(
                    "Device {namespace}/{device} has no tag {tag:?} (it has: {})",
                    known.join(", ")
                ));
            }
            None
        }
        InputRef::Formula(name) if name == this => Some("a formula cannot read its own result".into()),
        InputRef::Formula(name) => match formulas.get(&(namespace, name)) {
            None => Some(format!(
                "no valid Formula {namespace}/{name} (a polled tag is written '<device>/<tag>')"
            )),
            Some(f) if f.spec.site != site => Some(format!(
                "Formula {namespace}/{name} belongs to site {:?}, not {site:?}",
                f.spec.site
            )),
            Some(_) => None,
        },
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
