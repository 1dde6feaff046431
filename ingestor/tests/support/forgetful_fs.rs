//! A filesystem that forgets what was not fsynced, for power-cut tests: the equivalent of
//! LazyFS (the tool of Jepsen's NATS analysis), which is not in the package registries.
//!
//! A FUSE filesystem (the `fuser` crate, no libfuse) over a backing directory. File
//! contents written through it are held in memory, page by page, and reach the backing
//! directory only when the file is fsynced or fdatasynced; a [`ForgetfulMount::power_cut`]
//! unmounts it and drops every page that was not. What survives a cut is exactly what a
//! disk keeps when the power goes: the fsynced bytes. `sync_file_range`, which sled's own
//! flush uses, never reaches a FUSE filesystem, as it never reaches a disk's cache: it
//! survives nothing here.
//!
//! Namespace changes (create, mkdir, rename, unlink, truncate of the length kept on disk)
//! go to the backing directory at once, as LazyFS passes them through: a file created
//! and never synced survives a cut, empty. That is kinder than a real filesystem (ext4
//! may lose a rename that was not followed by an fsync of its directory) and harsher
//! than ext4's `auto_da_alloc` (which writes a replaced file's data before the rename).
//!
//! The processes using the mount must be killed before a cut: the unmount is refused
//! while files are open, and a cut is only a cut if nobody sees the old contents again.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const PAGE: u64 = 4096;
/// Attributes are never cached by the kernel: sizes change under it (a cut, dirty pages).
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// A file's contents not yet synced: whole pages, the file's length as its writers see
/// it, and how much of the backing file is still valid under them (a truncate below the
/// backing length makes the rest read as zeros once extended again).
#[derive(Debug, Default)]
struct Dirty {
    pages: BTreeMap<u64, Vec<u8>>,
    len: u64,
    backing_valid: u64,
}

impl Dirty {
    fn of(file: &File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            pages: BTreeMap::new(),
            len,
            backing_valid: len,
        })
    }

    /// The page at `index` as the writers see it.
    fn page(&self, file: &File, index: u64) -> io::Result<Vec<u8>> {
        if let Some(page) = self.pages.get(&index) {
            return Ok(page.clone());
        }
        let mut page = vec![0; PAGE as usize];
        let start = index * PAGE;
        if start < self.backing_valid {
            let valid = (self.backing_valid - start).min(PAGE) as usize;
            read_at_most(file, &mut page[..valid], start)?;
        }
        Ok(page)
    }

    fn write(&mut self, file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut written = 0;
        while written < data.len() {
            let at = offset + written as u64;
            let index = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min(data.len() - written);
            let mut page = self.page(file, index)?;
            page[within..within + n].copy_from_slice(&data[written..written + n]);
            self.pages.insert(index, page);
            written += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
        Ok(())
    }

    fn read(&self, file: &File, offset: u64, size: u64) -> io::Result<Vec<u8>> {
        let end = (offset + size).min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let page = self.page(file, at / PAGE)?;
            let within = (at % PAGE) as usize;
            let n = (PAGE as usize - within).min((end - at) as usize);
            out.extend_from_slice(&page[within..within + n]);
            at += n as u64;
        }
        Ok(out)
    }

    fn truncate(&mut self, len: u64) {
        self.pages.retain(|index, _| index * PAGE < len);
        if let Some(page) = self.pages.get_mut(&(len / PAGE)) {
            page[(len % PAGE) as usize..].fill(0);
        }
        self.backing_valid = self.backing_valid.min(len);
        self.len = len;
    }

    /// Writes the pages to the backing file and syncs it.
    fn sync(&self, file: &File) -> io::Result<()> {
        file.set_len(self.backing_valid.min(file.metadata()?.len()))?;
        file.set_len(self.len)?;
        for (index, page) in &self.pages {
            let start = index * PAGE;
            let n = (self.len.saturating_sub(start)).min(PAGE) as usize;
            file.write_all_at(&page[..n], start)?;
        }
        file.sync_all()
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[derive(Debug)]
struct Inodes {
    paths: HashMap<u64, PathBuf>,
    numbers: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn number(&mut self, path: &Path) -> u64 {
        if let Some(n) = self.numbers.get(path) {
            return *n;
        }
        let n = self.next;
        self.next += 1;
        self.paths.insert(n, path.to_path_buf());
        self.numbers.insert(path.to_path_buf(), n);
        n
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(n) = self.numbers.remove(path) {
            self.paths.remove(&n);
        }
    }

    /// Moves `from` (and, for a directory, everything under it) to `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        self.forget_path(to);
        let moved: Vec<(PathBuf, u64)> = self
            .numbers
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        for (old, n) in moved {
            // `join("")` would add a trailing slash, which opens as a directory only.
            let under = old.strip_prefix(from).expect("under from");
            let new = if under.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(under)
            };
            self.numbers.remove(&old);
            self.numbers.insert(new.clone(), n);
            self.paths.insert(n, new);
        }
    }
}

#[derive(Debug)]
struct State {
    inodes: Inodes,
    /// Open files: the backing file each handle reads and syncs through (it stays valid
    /// after an unlink, as an open file does).
    handles: HashMap<u64, (u64, Arc<File>)>,
    next_handle: u64,
    dirty: HashMap<u64, Dirty>,
}

/// The filesystem; [`ForgetfulMount`] mounts it.
#[derive(Debug)]
struct ForgetfulFs {
    backing: PathBuf,
    state: Mutex<State>,
    /// Bytes written through the mount that reached the backing directory by a sync.
    synced_bytes: Arc<AtomicU64>,
    /// How long `statfs` takes, in milliseconds: a disk (or network volume) that answers
    /// slowly.
    statfs_delay_ms: Arc<AtomicU64>,
}

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

fn kind(file_type: std::fs::FileType) -> FileType {
    FileType::from_std(file_type).unwrap_or(FileType::RegularFile)
}

impl ForgetfulFs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("filesystem state")
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.state().inodes.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path_of(parent)?.join(name))
    }

    fn attr(&self, path: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.backing.join(path)).map_err(|e| errno(&e))?;
        let mut state = self.state();
        let ino = state.inodes.number(path);
        let size = state.dirty.get(&ino).map_or(meta.len(), |d| d.len);
        let time = |secs: i64, nanos: i64| UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(meta.file_type()),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn open_handle(&self, ino: u64, file: File) -> FileHandle {
        let mut state = self.state();
        let handle = state.next_handle;
        state.next_handle += 1;
        state.handles.insert(handle, (ino, Arc::new(file)));
        FileHandle(handle)
    }

    fn handle(&self, fh: FileHandle) -> Result<(u64, Arc<File>), Errno> {
        self.state().handles.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn sync(&self, ino: u64, file: &File) -> io::Result<()> {
        let dirty = self.state().dirty.remove(&ino);
        if let Some(dirty) = dirty {
            let bytes = dirty.pages.len() as u64 * PAGE;
            if let Err(e) = dirty.sync(file) {
                self.state().dirty.insert(ino, dirty);
                return Err(e);
            }
            self.synced_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The unsynced state of `ino`, started from its backing file on the first write.
fn dirty_of<'a>(state: &'a mut State, ino: u64, file: &File) -> Result<&'a mut Dirty, Errno> {
    match state.dirty.entry(ino) {
        std::collections::hash_map::Entry::Occupied(dirty) => Ok(dirty.into_mut()),
        std::collections::hash_map::Entry::Vacant(slot) => Ok(slot.insert(Dirty::of(file).map_err(|e| errno(&e))?)),
    }
}

/// The backing file of a handle. Opened for writing even when the handle only reads: an
/// fsync through a read-only descriptor (which sled makes) writes the pages held for the
/// file, whoever wrote them.
fn open_backing(path: &Path, flags: OpenFlags) -> io::Result<File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && flags.acc_mode() == OpenAccMode::O_RDONLY => {
            OpenOptions::new().read(true).open(path)
        }
        other => other,
    }
}

impl Filesystem for ForgetfulFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.attr(&p)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path_of(ino).and_then(|p| self.attr(&p)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let path = self.path_of(ino)?;
            let real = self.backing.join(&path);
            if let Some(mode) = mode {
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&real, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                let file = match fh {
                    Some(fh) => self.handle(fh)?.1,
                    None => Arc::new(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&real)
                            .map_err(|e| errno(&e))?,
                    ),
                };
                let mut state = self.state();
                dirty_of(&mut state, ino.0, &file)?.truncate(size);
            }
            self.attr(&path)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.child(parent, name).and_then(|path| {
            let real = self.backing.join(&path);
            std::fs::create_dir(&real).map_err(|e| errno(&e))?;
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode & !umask)).map_err(|e| errno(&e))?;
            self.attr(&path)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            std::fs::remove_file(self.backing.join(&path)).map_err(|e| errno(&e))?;
            let mut state = self.state();
            if let Some(ino) = state.inodes.numbers.get(&path).copied() {
                state.dirty.remove(&ino);
            }
            state.inodes.forget_path(&path);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            std::fs::remove_dir(self.backing.join(&path)).map_err(|e| errno(&e))?;
            self.state().inodes.forget_path(&path);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            std::fs::rename(self.backing.join(&from), self.backing.join(&to)).map_err(|e| errno(&e))?;
            let mut state = self.state();
            if let Some(replaced) = state.inodes.numbers.get(&to).copied() {
                state.dirty.remove(&replaced);
            }
            state.inodes.rename(&from, &to);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.path_of(ino).and_then(|path| {
            let file = open_backing(&self.backing.join(path), flags).map_err(|e| errno(&e))?;
            Ok(self.open_handle(ino.0, file))
        });
        match result {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.child(parent, name).and_then(|path| {
            let real = self.backing.join(&path);
            let mut options = OpenOptions::new();
            options.read(true).write(true).create(true);
            if flags & 0o200 != 0 {
                // O_EXCL
                options.create_new(true);
            }
            let file = options.open(&real).map_err(|e| errno(&e))?;
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode & !umask)).map_err(|e| errno(&e))?;
            let attr = self.attr(&path)?;
            Ok((attr, self.open_handle(attr.ino.0, file)))
        });
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.handle(fh).and_then(|(_, file)| {
            let state = self.state();
            if let Some(dirty) = state.dirty.get(&ino.0) {
                return dirty.read(&file, offset, u64::from(size)).map_err(|e| errno(&e));
            }
            drop(state);
            let mut buf = vec![0; size as usize];
            let n = read_at_most(&file, &mut buf, offset).map_err(|e| errno(&e))?;
            buf.truncate(n);
            Ok(buf)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.handle(fh).and_then(|(_, file)| {
            let mut state = self.state();
            dirty_of(&mut state, ino.0, &file)?
                .write(&file, offset, data)
                .map_err(|e| errno(&e))
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self
            .handle(fh)
            .and_then(|(_, file)| self.sync(ino.0, &file).map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.path_of(ino).and_then(|path| {
            let mut entries = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
                (ino.0, FileType::Directory, OsStr::new("..").to_os_string()),
            ];
            for entry in std::fs::read_dir(self.backing.join(&path)).map_err(|e| errno(&e))? {
                let entry = entry.map_err(|e| errno(&e))?;
                let file_type = entry.file_type().map_err(|e| errno(&e))?;
                let number = self.state().inodes.number(&path.join(entry.file_name()));
                entries.push((number, kind(file_type), entry.file_name()));
            }
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                for (i, (number, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(number), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        std::thread::sleep(Duration::from_millis(self.statfs_delay_ms.load(Ordering::Relaxed)));
        match rustix::fs::statvfs(&self.backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }
}

/// The filesystem mounted on a directory of its own; unmounted on drop.
pub struct ForgetfulMount {
    backing: PathBuf,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    synced_bytes: Arc<AtomicU64>,
    statfs_delay_ms: Arc<AtomicU64>,
}

impl ForgetfulMount {
    /// Mounts a filesystem over `backing` on `mountpoint` (both existing directories).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Self {
        let mut mount = Self {
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
            synced_bytes: Arc::new(AtomicU64::new(0)),
            statfs_delay_ms: Arc::new(AtomicU64::new(0)),
        };
        mount.start();
        mount
    }

    fn start(&mut self) {
        let mut inodes = Inodes {
            paths: HashMap::new(),
            numbers: HashMap::new(),
            next: ROOT + 1,
        };
        inodes.paths.insert(ROOT, PathBuf::new());
        inodes.numbers.insert(PathBuf::new(), ROOT);
        let fs = ForgetfulFs {
            backing: self.backing.clone(),
            state: Mutex::new(State {
                inodes,
                handles: HashMap::new(),
                next_handle: 1,
                dirty: HashMap::new(),
            }),
            synced_bytes: Arc::clone(&self.synced_bytes),
            statfs_delay_ms: Arc::clone(&self.statfs_delay_ms),
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("tagstream-forgetful".into())];
        config.n_threads = Some(4);
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &config).unwrap_or_else(|e| {
            panic!(
                "cannot mount the power-cut filesystem on {} (FUSE needs /dev/fuse and root or fusermount3): {e}",
                self.mountpoint.display()
            )
        }));
    }

    /// The power goes and comes back: every byte written since its file's last fsync is
    /// forgotten. Kill every process using the mount first.
    pub fn power_cut(&mut self) {
        if let Some(session) = self.session.take() {
            session.umount_and_join().expect("unmount after killing its users");
        }
        self.start();
    }

    /// Makes every `statfs` (what `statvfs` asks) take `delay`.
    pub fn slow_statfs(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.statfs_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes that reached the backing directory through an fsync so far.
    pub fn synced_bytes(&self) -> u64 {
        self.synced_bytes.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for ForgetfulMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}
