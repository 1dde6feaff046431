//! Reading plans: a device's tags grouped by poll interval and data table, coalesced into
//! as few requests as the device allows.

use std::time::Duration;

use tagstream_crds::{
    DeviceSpec,
    device::{Addressing, RegisterKind},
};

/// A tag served by a read, and where its registers start in the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagSlot {
    /// Index of the tag in the device's `spec.tags`.
    pub tag: usize,
    /// Offset of the tag's first register (or bit) from the read's start.
    pub offset: u16,
    /// Registers (or bits) the tag occupies.
    pub count: u16,
}

/// One request: a run of registers or bits of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    pub kind: RegisterKind,
    /// Protocol address of the first register or bit.
    pub start: u16,
    pub count: u16,
    pub tags: Vec<TagSlot>,
}

impl Read {
    /// Splits a read into one read per distinct register range, so a range the device
    /// refuses only takes its own tags down. Tags reading the same range (bits of one
    /// register) stay together.
    pub fn split(&self) -> Vec<Read> {
        let mut reads: Vec<Read> = Vec::new();
        for slot in &self.tags {
            let start = self.start + slot.offset;
            let moved = TagSlot { offset: 0, ..*slot };
            match reads.iter_mut().find(|r| r.start == start && r.count == slot.count) {
                Some(read) => read.tags.push(moved),
                None => reads.push(Read {
                    kind: self.kind,
                    start,
                    count: slot.count,
                    tags: vec![moved],
                }),
            }
        }
        reads
    }
}

/// The reads done together every `interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollGroup {
    pub interval: Duration,
    pub reads: Vec<Read>,
}

/// The protocol address of tag `index`'s first register or bit.
pub fn protocol_address(spec: &DeviceSpec, index: usize) -> u16 {
    let address = spec.tags[index].address;
    match spec.addressing {
        Addressing::ZeroBased => address,
        Addressing::OneBased => address.saturating_sub(1),
    }
}

impl Read {
    /// A read of tag `index` alone.
    pub fn of_tag(spec: &DeviceSpec, index: usize) -> Self {
        let tag = &spec.tags[index];
        Self {
            kind: tag.register,
            start: protocol_address(spec, index),
            count: tag.register_count(),
            tags: vec![TagSlot {
                tag: index,
                offset: 0,
                count: tag.register_count(),
            }],
        }
    }
}

/// Plans a device's reads: tags grouped by interval and table, sorted by address, joined
/// while the joined read stays within the device's limits and gaps.
pub fn plan(spec: &DeviceSpec) -> Vec<PollGroup> {
    let mut slots: Vec<(Duration, RegisterKind, u16, usize, u16)> = spec
        .tags
        .iter()
        .enumerate()
        .map(|(index, tag)| {
            let interval = tag.poll_interval.unwrap_or(spec.poll_interval).get();
            (
                interval,
                tag.register,
                protocol_address(spec, index),
                index,
                tag.register_count(),
            )
        })
        .collect();
    slots.sort_unstable();

    let mut groups: Vec<PollGroup> = Vec::new();
    for (interval, kind, address, tag, count) in slots {
        if groups.last().is_none_or(|g| g.interval != interval) {
            groups.push(PollGroup {
                interval,
                reads: Vec::new(),
            });
        }
        let reads = &mut groups.last_mut().expect("pushed above").reads;
        let limit = if kind.is_bit_table() {
            spec.reads.max_bits
        } else {
            spec.reads.max_registers
        };
        let joinable = reads.last().filter(|read| {
            let end = u32::from(read.start) + u32::from(read.count);
            let new_end = end.max(u32::from(address) + u32::from(count));
            !spec.reads.request_per_tag
                && read.kind == kind
                && u32::from(address) <= end + u32::from(spec.reads.max_gap)
                && new_end - u32::from(read.start) <= u32::from(limit)
        });
        if joinable.is_some() {
            let read = reads.last_mut().expect("checked above");
            let end = (u32::from(read.start) + u32::from(read.count)).max(u32::from(address) + u32::from(count));
            read.count = (end - u32::from(read.start)) as u16;
            read.tags.push(TagSlot {
                tag,
                offset: address - read.start,
                count,
            });
        } else {
            reads.push(Read {
                kind,
                start: address,
                count,
                tags: vec![TagSlot { tag, offset: 0, count }],
            });
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(yaml: &str) -> DeviceSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const BASE: &str = "site: s\nconnection: {tcp: {host: h}}\npollInterval: 1s\n";

    fn reads(spec: &DeviceSpec) -> Vec<(RegisterKind, u16, u16, usize)> {
        plan(spec)
            .iter()
            .flat_map(|g| g.reads.iter().map(|r| (r.kind, r.start, r.count, r.tags.len())))
            .collect()
    }

    #[test]
    fn adjacent_tags_join_and_gaps_are_bridged_only_when_allowed() {
        let tags = "tags:
  - {name: a, register: holding, address: 0, type: float32}
  - {name: b, register: holding, address: 2, type: float32}
  - {name: c, register: holding, address: 10, type: uint16}
  - {name: d, register: coil, address: 0, type: bool}
  - {name: e, register: coil, address: 1, type: bool}
";
        let tight = device(&format!("{BASE}{tags}"));
        assert_eq!(
            reads(&tight),
            [
                (RegisterKind::Coil, 0, 2, 2),
                (RegisterKind::Holding, 0, 4, 2),
                (RegisterKind::Holding, 10, 1, 1)
            ]
        );
        let bridged = device(&format!("{BASE}reads: {{maxGap: 6}}\n{tags}"));
        assert_eq!(
            reads(&bridged),
            [(RegisterKind::Coil, 0, 2, 2), (RegisterKind::Holding, 0, 11, 3)]
        );
        let per_tag = device(&format!("{BASE}reads: {{requestPerTag: true}}\n{tags}"));
        assert_eq!(reads(&per_tag).len(), 5);
    }

    #[test]
    fn reads_respect_the_device_limit_and_intervals_split_groups() {
        let spec = device(&format!(
            "{BASE}reads: {{maxRegisters: 4}}\ntags:
  - {{name: a, register: input, address: 0, type: float32}}
  - {{name: b, register: input, address: 2, type: float32}}
  - {{name: c, register: input, address: 4, type: float32}}
  - {{name: slow, register: input, address: 6, type: float32, pollInterval: 10s}}
"
        ));
        let groups = plan(&spec);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].interval, Duration::from_secs(1));
        assert_eq!(
            groups[0].reads.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            [(0, 4), (4, 2)]
        );
        assert_eq!(groups[1].interval, Duration::from_secs(10));
    }

    #[test]
    fn one_based_addresses_are_sent_one_lower() {
        let spec = device(&format!(
            "{BASE}addressing: oneBased\ntags:\n  - {{name: a, register: holding, address: 1, type: int16}}\n"
        ));
        assert_eq!(reads(&spec), [(RegisterKind::Holding, 0, 1, 1)]);
    }

    #[test]
    fn splitting_keeps_bits_of_one_register_together() {
        let spec = device(&format!(
            "{BASE}tags:
  - {{name: a, register: holding, address: 0, type: uint32}}
  - {{name: b0, register: holding, address: 2, type: bit, bit: 0}}
  - {{name: b1, register: holding, address: 2, type: bit, bit: 1}}
"
        ));
        let read = &plan(&spec)[0].reads[0];
        assert_eq!((read.start, read.count), (0, 3));
        let split: Vec<_> = read.split().iter().map(|r| (r.start, r.count, r.tags.len())).collect();
        assert_eq!(split, [(0, 2, 1), (2, 1, 2)]);
    }
}
