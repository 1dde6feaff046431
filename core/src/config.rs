//! A site's configuration: its Site settings, Devices and Formulas, grouped from the
//! manifests (the files users write, or the operator's rendered `ConfigMap`).

use std::{collections::BTreeMap, fmt::Write as _};

use tagstream_crds::{
    Device, Formula, FormulaSpec, SiteSpec,
    manifest::{Loaded, Report},
};

use crate::calc::Calc;

/// Everything one ingestor runs.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    pub namespace: String,
    pub name: String,
    /// The Site's spec, or the defaults when the manifests name the site without defining it.
    pub spec: SiteSpec,
    /// Whether the spec came from a Site object rather than the defaults.
    pub defined: bool,
    pub devices: Vec<Device>,
    pub formulas: Vec<Formula>,
}

impl SiteConfig {
    /// Every polled tag as `(device, tag)`.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.devices.iter().flat_map(|d| {
            let device = d.metadata.name.as_deref().unwrap_or_default();
            d.spec.tags.iter().map(move |t| (device, t.name.as_str()))
        })
    }

    /// The formulas by name, as the calculation DAG takes them.
    pub fn formula_specs(&self) -> Vec<(String, FormulaSpec)> {
        self.formulas
            .iter()
            .map(|f| (f.metadata.name.clone().unwrap_or_default(), f.spec.clone()))
            .collect()
    }

    /// The site's calculation DAG.
    pub fn calc(&self) -> Calc {
        let mut calc = Calc::new();
        calc.configure(self.tags(), &self.formula_specs());
        calc
    }
}

/// Groups the valid objects of a report by site, in (namespace, name) order.
pub fn sites(report: &Report) -> Vec<SiteConfig> {
    fn entry<'a>(
        sites: &'a mut BTreeMap<(String, String), SiteConfig>,
        namespace: &str,
        name: &str,
    ) -> &'a mut SiteConfig {
        sites
            .entry((namespace.to_owned(), name.to_owned()))
            .or_insert_with(|| SiteConfig {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                spec: SiteSpec::default(),
                defined: false,
                devices: Vec::new(),
                formulas: Vec::new(),
            })
    }
    let mut sites = BTreeMap::new();
    for site in &report.sites {
        let config = entry(&mut sites, site.namespace(), site.name());
        config.spec = site.object.spec.clone();
        config.defined = true;
    }
    for device in &report.devices {
        entry(&mut sites, device.namespace(), &device.object.spec.site)
            .devices
            .push(device.object.clone());
    }
    for formula in &report.formulas {
        entry(&mut sites, formula.namespace(), &formula.object.spec.site)
            .formulas
            .push(formula.object.clone());
    }
    sites.into_values().collect()
}

/// Counts a report's objects for a one-line summary.
pub fn summary(report: &Report) -> String {
    fn count<K>(items: &[Loaded<K>], one: &str) -> String {
        match items.len() {
            1 => format!("1 {one}"),
            n => format!("{n} {one}s"),
        }
    }
    let mut text = format!(
        "{}, {}, {}",
        count(&report.sites, "site"),
        count(&report.devices, "device"),
        count(&report.formulas, "formula")
    );
    if !report.ignored.is_empty() {
        let _ = write!(text, " ({} documents of other kinds passed over)", report.ignored.len());
    }
    text
}

/// A duration argument in the manifests' grammar (`500ms`, `20s`, `1m30s`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<tagstream_crds::Duration>()
        .map(tagstream_crds::Duration::get)
        .map_err(|e| e.to_string())
}

/// Bytes in a Kubernetes quantity (`512Mi`, `2Gi`, `1G`, `1500`), or `None` when it is not
/// one the Site schema accepts.
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    Some((value * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::quantity_bytes;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("2Gi"), Some(2 << 30));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536));
        assert_eq!(quantity_bytes("1500"), Some(1500));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("1Xi"), None);
    }
}
