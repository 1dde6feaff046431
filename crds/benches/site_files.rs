//! The size of a site's rendered configuration (its ConfigMaps' data) against the 1 MiB
//! Kubernetes allows one ConfigMap, for sites of 2,000, 20,000 and 100,000 tags.
//!
//! Run: `cargo bench -p tagstream-crds --bench site_files`
//!
//! Each device has 100 tags as a meter's or a drive's register map has them (a name of
//! 20-odd characters, a float32 or int16 holding register, a unit; every tenth a scale).
//! Before issue 27 the whole configuration went into one ConfigMap: the "fits one
//! ConfigMap" column is what that rendering met.

use std::fmt::Write as _;

use tagstream_crds::{
    Device, Site,
    site_files::{CONFIG_MAP_LIMIT, data_bytes, site_files},
};

const TAGS_PER_DEVICE: usize = 100;

fn device(index: usize) -> Device {
    let mut yaml = format!(
        "apiVersion: tagstream.io/v1alpha1\nkind: Device\nmetadata: {{name: inverter-{index:04}, namespace: plant}}\nspec:\n  site: plant-a\n  connection: {{tcp: {{host: 10.0.{}.{}, port: 502}}}}\n  unitId: 1\n  tags:\n",
        index / 250,
        index % 250 + 1
    );
    for tag in 0..TAGS_PER_DEVICE {
        let (kind, unit) = if tag % 2 == 0 {
            ("float32", "kW")
        } else {
            ("int16", "degC")
        };
        let scale = if tag % 10 == 0 { ", scale: 0.1" } else { "" };
        let _ = writeln!(
            yaml,
            "    - {{name: string{:02}_channel{tag:03}_value, register: holding, address: {}, type: {kind}, unit: {unit}{scale}}}",
            tag % 24,
            tag * 2
        );
    }
    serde_yaml::from_str(&yaml).expect("a valid Device")
}

fn main() {
    println!(
        "| tags | devices | configuration bytes | fits one ConfigMap (before) | ConfigMaps now | largest, % of 1 MiB | bytes per tag | render ms |"
    );
    println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    let mut site = Site::new(
        "plant-a",
        serde_yaml::from_str("broker: {urls: [nats://nats:4222]}").expect("spec"),
    );
    site.metadata.namespace = Some("plant".into());
    for tags in [2_000, 20_000, 100_000] {
        let devices: Vec<Device> = (0..tags / TAGS_PER_DEVICE).map(device).collect();
        let refs: Vec<&Device> = devices.iter().collect();
        let started = std::time::Instant::now();
        let files = site_files(&site, &refs, &[]).expect("laid out");
        let render_ms = started.elapsed().as_secs_f64() * 1000.0;
        let sizes: Vec<usize> = files.iter().map(data_bytes).collect();
        let total: usize = sizes.iter().sum();
        let largest = sizes.iter().copied().max().unwrap_or_default();
        assert!(largest <= CONFIG_MAP_LIMIT);
        println!(
            "| {tags} | {} | {total} | {} | {} | {:.1} | {:.0} | {render_ms:.0} |",
            devices.len(),
            if total <= CONFIG_MAP_LIMIT { "yes" } else { "no" },
            files.len(),
            largest as f64 * 100.0 / CONFIG_MAP_LIMIT as f64,
            total as f64 / tags as f64,
        );
    }
}
