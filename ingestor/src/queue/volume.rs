//! The filesystem under the queue: how much payload still fits on it, and a reserve file
//! that gives the queue room to recover when something else filled it.
//!
//! The configured `maxSize` assumes the queue has its volume to itself and that sled's
//! files stay near [`super::DISK_AMPLIFICATION`] times the payload. Neither always holds:
//! on k3s's local-path provisioner a claim is a directory on the node's disk, which
//! anything on the node can fill, and sled's files grow past 1.6x while it appends at the
//! tail and deletes at the head (2.7x on a full 8 MiB tmpfs, 3.0-3.4x on a 24 MiB one;
//! BENCHMARKS.md).
//! So each group's write is also checked against the free space the filesystem reports.
//!
//! When the free space falls below [`Volume::margin`], the queue stops growing its files:
//! the payload it may hold becomes what sled's file can take at
//! [`FULL_DISK_AMPLIFICATION`], and the full policy applies as for `maxSize`. The margin
//! absorbs sled's lag in reusing the space of deleted records. sled's file is never
//! counted out: a queue that keeps up with its broker needs no new space, and must not
//! drop points because the disk around it is full.
//!
//! sled stops for good after a failed write (its first I/O error is kept and returned by
//! every later call) and reopening it writes too, so a disk filled to the last byte from
//! outside would stop the queue until space came back. The reserve file is given up
//! first, before the queue reopens sled, and made again once the free space allows.
//! sled needs free space to delete too (a delete is a write to its log), so when the
//! reserve is not enough the queue holds new points, under either policy, until space
//! returns; it never refuses or loses them.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// sled's file per byte of payload while records are appended at the tail and deleted
/// at the head on a full disk (2.7-3.4x measured; see the module documentation).
pub const FULL_DISK_AMPLIFICATION: f64 = 3.0;

const RESERVE_FILE: &str = "tagstream-reserve";

/// The queue's filesystem, as the queue directory sees it.
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    total_bytes: u64,
    reserve_bytes: u64,
}

/// The filesystem's figures at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub available: u64,
    pub total: u64,
}

impl Volume {
    /// The reserve is a 16th of the filesystem, between 2 MiB and 16 MiB: room for sled
    /// to reopen and delete (its segments are 512 KiB; 1 MiB was not always enough).
    pub fn new(dir: &Path) -> Self {
        let total = space(dir).map_or(0, |s| s.total);
        Self {
            dir: dir.to_path_buf(),
            total_bytes: total,
            reserve_bytes: (total / 16).clamp(2 << 20, 16 << 20),
        }
    }

    /// The free space below which the disk, not `maxSize`, limits the queue: a tenth of
    /// the filesystem, between 4 MiB and 256 MiB (a tenth alone is 25 GB of a 250 GB
    /// node disk, which can be 90% full and fine).
    pub fn margin(&self) -> u64 {
        (self.total_bytes / 10).clamp(4 << 20, 256 << 20)
    }

    pub fn space(&self) -> Option<Space> {
        space(&self.dir)
    }

    /// The payload that fits when the disk is what limits the queue, or `None` while it
    /// has more than the margin free. `disk_bytes` gives what sled's files take now
    /// (space the queue can reuse); it is asked only below the margin, as it reads the
    /// file's metadata and sled's blob directory.
    pub fn payload_limit(&self, disk_bytes: impl FnOnce() -> u64) -> Option<u64> {
        let space = self.space()?;
        (space.available < self.margin()).then(|| (disk_bytes() as f64 / FULL_DISK_AMPLIFICATION) as u64)
    }

    /// Makes the reserve file when it is missing and the filesystem has room for it and
    /// the margin besides.
    pub fn ensure_reserve(&self) {
        let path = self.dir.join(RESERVE_FILE);
        if path.exists()
            || self
                .space()
                .is_none_or(|s| s.available < self.margin() + self.reserve_bytes)
        {
            return;
        }
        match write_reserve(&path, self.reserve_bytes) {
            Ok(()) => info!(path = %path.display(), bytes = self.reserve_bytes, "queue reserve file in place"),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                warn!(path = %path.display(), error = %e, "cannot make the queue's reserve file");
            }
        }
    }

    /// Deletes the reserve file; returns whether there was one.
    pub fn release_reserve(&self) -> bool {
        let path = self.dir.join(RESERVE_FILE);
        let released = std::fs::remove_file(&path).is_ok();
        if released {
            warn!(path = %path.display(), bytes = self.reserve_bytes, "gave up the queue's reserve file to recover from a full disk");
        }
        released
    }
}

fn space(dir: &Path) -> Option<Space> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(Space {
        available: stat.f_bavail * stat.f_frsize,
        total: stat.f_blocks * stat.f_frsize,
    })
}

/// Real bytes, not a sparse file: the blocks must be allocated to be given back later.
fn write_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}
