//! `tagstream-ingestor read`: poll every tag of the given devices once and print a table of
//! raw registers and decoded values, optionally under every byte order, so a user can see
//! which order a device uses (like `mbpoll`, but from the Device manifest).

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;
use tagstream_crds::{
    Device,
    device::{ByteOrder, DataType},
    manifest::load,
};

use tagstream_core::point::{PointValue, Sample};

use crate::acquisition::{
    connection::Data,
    decode::{self, Layout},
    plan,
    poller::{self, TagReading},
};

/// The valid Devices in `paths`, or only the one named `only`; an error when there is none.
pub fn devices(paths: &[PathBuf], only: Option<&str>) -> anyhow::Result<Vec<Device>> {
    let devices: Vec<Device> = load(paths)?
        .devices
        .into_iter()
        .map(|d| d.object)
        .filter(|d| only.is_none_or(|name| d.metadata.name.as_deref() == Some(name)))
        .collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "no device in the manifests{}",
        only.map(|n| format!(" named {n:?}")).unwrap_or_default()
    );
    Ok(devices)
}

/// Reads every device in `paths` (or only `only`) once and renders the tables.
pub async fn read(paths: &[PathBuf], only: Option<&str>, all_orders: bool) -> anyhow::Result<String> {
    let mut text = String::new();
    for device in &devices(paths, only)? {
        let name = device.metadata.name.as_deref().unwrap_or_default();
        let readings = read_device(device)
            .await
            .with_context(|| format!("reading device {name}"))?;
        render(&mut text, device, &readings, all_orders);
    }
    Ok(text)
}

/// Polls every tag of one device once, in tag order.
pub async fn read_device(device: &Device) -> anyhow::Result<Vec<TagReading>> {
    let spec = &device.spec;
    let mut link = None;
    let context = poller::connected(&mut link, spec).await?;
    let layouts = poller::layouts(spec);
    let mut readings = Vec::new();
    for mut group in plan::plan(spec) {
        let at = tagstream_core::point::now_ns();
        readings.extend(poller::poll_reads(context, spec, &layouts, &mut group.reads, at, true, spec.retries).await?);
    }
    readings.sort_by_key(|r| r.tag);
    Ok(readings)
}

fn render(text: &mut String, device: &Device, readings: &[TagReading], all_orders: bool) {
    let spec = &device.spec;
    let _ = writeln!(
        text,
        "device {} ({}, unit {}, byte order {:?})",
        device.metadata.name.as_deref().unwrap_or_default(),
        spec.connection.endpoint().unwrap_or_default(),
        spec.unit_id,
        spec.byte_order
    );
    let mut rows = vec![vec![
        "TAG".to_owned(),
        "ADDRESS".into(),
        "RAW".into(),
        "VALUE".into(),
        "QUALITY".into(),
    ]];
    if all_orders {
        rows[0].extend(ByteOrder::ALL.iter().map(|o| format!("{o:?}")));
    }
    for reading in readings {
        let tag = &spec.tags[reading.tag];
        let unit = tag.unit.as_deref().map(|u| format!(" {u}")).unwrap_or_default();
        let mut row = vec![
            tag.name.clone(),
            format!("{} {}", register_name(tag.register), tag.address),
            raw_text(reading.raw.as_ref()),
            reading
                .sample
                .value
                .as_ref()
                .map_or_else(|| "-".into(), |v| format!("{}{unit}", shown(v))),
            reading.sample.quality.to_string(),
        ];
        if all_orders {
            row.extend(
                ByteOrder::ALL
                    .iter()
                    .map(|&order| under_order(tag, spec.byte_order, reading, order)),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(text, "  {}", line.join("  ").trim_end());
    }
    text.push('\n');
}

/// A value for a table cell: huge and tiny numbers (what a wrong byte order of a float
/// gives: 1.7e38, 4.2e-39) in scientific notation so they read as wrong at a glance;
/// anything an integer register can hold, scaled, in full (a scaled int32 of
/// -1033100000.5 is a legitimate reading).
fn shown(value: &PointValue) -> String {
    match value {
        PointValue::Double(d) if *d != 0.0 && !(1e-4..1e15).contains(&d.abs()) => format!("{d:.4e}"),
        other => other.to_string(),
    }
}

fn register_name(kind: tagstream_crds::device::RegisterKind) -> &'static str {
    use tagstream_crds::device::RegisterKind::{Coil, DiscreteInput, Holding, Input};
    match kind {
        Coil => "coil",
        DiscreteInput => "discrete",
        Holding => "holding",
        Input => "input",
    }
}

fn raw_text(raw: Option<&Data>) -> String {
    match raw {
        None => "-".into(),
        Some(Data::Bits(bits)) => bits.iter().map(|b| if *b { "1" } else { "0" }).collect(),
        Some(Data::Registers(registers)) => registers
            .iter()
            .map(|r| format!("{r:04X}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The tag's value had the device used `order`; only multi-register numbers depend on it.
fn under_order(
    tag: &tagstream_crds::device::Tag,
    device_order: ByteOrder,
    reading: &TagReading,
    order: ByteOrder,
) -> String {
    let Some(Data::Registers(registers)) = &reading.raw else {
        return "-".into();
    };
    if matches!(tag.data_type, DataType::Bool | DataType::Bit) {
        return "-".into();
    }
    let layout = Layout {
        order,
        ..Layout::of(tag, device_order)
    };
    match decode::decode_registers(registers, &layout) {
        Ok(raw) => shown(&layout.scaling.apply(raw)),
        Err(e) => Sample::bad(e.to_string(), 0).quality.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_scaled_readings_show_in_full_and_float_garbage_in_scientific_notation() {
        assert_eq!(shown(&PointValue::Double(-1_033_100_000.5)), "-1033100000.5");
        assert_eq!(shown(&PointValue::Double(111.1)), "111.1");
        assert_eq!(shown(&PointValue::Double(1.7e38)), "1.7000e38");
        assert_eq!(shown(&PointValue::Double(4.2e-39)), "4.2000e-39");
        assert_eq!(shown(&PointValue::Double(0.0)), "0");
    }
}
