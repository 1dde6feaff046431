//! Counting what a reopened queue holds without reading every record.
//!
//! Reading every record at open made start-up cost grow with the backlog, and sled keeps
//! memory for every page an iteration touches (spacejam/sled#1036): a restarted pod with
//! 100 million queued points reached 1.1 GiB before polling again, past any sensible
//! memory limit, so it would have been killed on every restart and never drained.
//!
//! Each record carries the totals of the records appended before it, so the queue holds
//! `last.before + last - first.before`, and its records are the keys from first to last.
//! Records only leave from the head, except a corrupt one the publisher skips: that
//! leaves a hole, noted in the meta tree under `hole/<sequence>` until the head passes
//! it. While there is a hole (what a corrupt record counted cannot be trusted), or when
//! the ends predate the totals or are corrupt, the records are counted one by one, as
//! before: rare cases, paid for with the old cost. When the last record gives no totals
//! to follow, new records start a new chain, so the same note keeps the counting one by
//! one until the head is past the old chain.

use super::{
    QueueStats,
    record::{self, Totals},
};

const HOLE_PREFIX: &str = "hole/";

/// What a reopened queue holds, and the totals the next record follows.
pub fn summarize(records: &sled::Tree, meta: &sled::Tree, db: &sled::Db) -> Result<(QueueStats, Totals), sled::Error> {
    let disk_bytes = db.size_on_disk()?;
    let (Some((first_key, first)), Some((last_key, last))) = (records.first()?, records.last()?) else {
        forget_holes(meta, u64::MAX)?;
        let stats = QueueStats {
            disk_bytes,
            ..QueueStats::default()
        };
        return Ok((stats, Totals::default()));
    };
    let (first_seq, last_seq) = (sequence(&first_key), sequence(&last_key));
    forget_holes(meta, first_seq)?;
    let first = record::decode(&first)
        .ok()
        .and_then(|r| Some((r.before?, r.enqueued_ns)));
    let end = record::decode(&last)
        .ok()
        .and_then(|r| Some(r.before?.then(u64::from(r.points), last.len() as u64)));
    let holes = meta.scan_prefix(HOLE_PREFIX).next().is_some();
    if let (Some((start, oldest)), Some(end), false) = (first, end, holes) {
        let stats = QueueStats {
            records: last_seq - first_seq + 1,
            points: end.points - start.points,
            payload_bytes: end.bytes - start.bytes,
            disk_bytes,
            oldest_enqueued_ns: Some(oldest),
            ..QueueStats::default()
        };
        return Ok((stats, end));
    }
    let stats = scan(records, disk_bytes)?;
    let totals = if let Some(end) = end {
        end
    } else {
        // The last record gives no totals to follow (written before they existed, or
        // corrupt): new records start from the counted ones, and the queue is counted
        // one by one until the head passes this record.
        note_hole(meta, last_seq)?;
        Totals {
            points: stats.points,
            bytes: stats.payload_bytes,
        }
    };
    Ok((stats, totals))
}

/// What the record at `sequence` added to the totals when it was appended, from its
/// neighbours' totals (its own cannot be trusted when it is corrupt); `None` at either
/// end of the queue or when a neighbour gives no totals.
pub fn counted_for(records: &sled::Tree, sequence: u64) -> Result<Option<Totals>, sled::Error> {
    let key = sequence.to_be_bytes();
    let (Some((_, previous)), Some((_, next))) = (records.get_lt(key)?, records.get_gt(key)?) else {
        return Ok(None);
    };
    let previous_end = record::decode(&previous)
        .ok()
        .and_then(|r| Some(r.before?.then(u64::from(r.points), previous.len() as u64)));
    let next_start = record::decode(&next).ok().and_then(|r| r.before);
    Ok(previous_end.zip(next_start).map(|(end, start)| Totals {
        points: start.points.saturating_sub(end.points),
        bytes: start.bytes.saturating_sub(end.bytes),
    }))
}

/// Notes that the record at `sequence` was removed out of order.
pub fn note_hole(meta: &sled::Tree, sequence: u64) -> Result<(), sled::Error> {
    meta.insert(hole_key(sequence), &[])?;
    Ok(())
}

fn hole_key(sequence: u64) -> String {
    format!("{HOLE_PREFIX}{sequence:020}")
}

fn sequence(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or_default())
}

/// Drops the notes of holes the head has passed.
fn forget_holes(meta: &sled::Tree, head: u64) -> Result<(), sled::Error> {
    let passed: Vec<_> = meta
        .range(HOLE_PREFIX.to_owned()..hole_key(head))
        .keys()
        .collect::<Result<_, _>>()?;
    for key in passed {
        meta.remove(key)?;
    }
    Ok(())
}

/// Counts the records one by one (queues written before the totals existed).
fn scan(records: &sled::Tree, disk_bytes: u64) -> Result<QueueStats, sled::Error> {
    let mut stats = QueueStats {
        disk_bytes,
        ..QueueStats::default()
    };
    for entry in records {
        let (_, value) = entry?;
        stats.records += 1;
        stats.payload_bytes += value.len() as u64;
        if let Ok((points, enqueued)) = record::header(&value) {
            stats.points += u64::from(points);
            stats.oldest_enqueued_ns.get_or_insert(enqueued);
        }
    }
    Ok(stats)
}
