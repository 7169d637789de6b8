//! The built-in FUSE server: fuser over a read-only squashfs index.
//!
//! `mount` parses the image, opens `/dev/fuse`, `mount(2)`s it and completes the FUSE handshake
//! in the caller, so every failure is reported there; it then forks the server child, which
//! serves the connection with several worker threads until the mount goes away or its parent
//! dies. The child makes no path lookups after the fork: the caller may `pivot_root` into the
//! image at once, and a lookup by the server into its own not-yet-served mount would deadlock.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request, Session,
    SessionACL,
};

use super::reader::{Entry, EntryKind, SquashImage};
use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// The image never changes while mounted, so the kernel may cache names and attributes for as
/// long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);
const W_OK: u32 = 2;

/// Opens `/dev/fuse` read-write, close-on-exec.
pub(super) fn open_dev_fuse() -> Result<OwnedFd, MountError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| MountError::FuseUnusable {
            reason: format!("open /dev/fuse: {e}"),
        })?;
    // Anything else at that path (a /dev/null bound over it, a regular file) opens just as
    // well, and would only fail at mount(2), after the choice of backend.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().map_err(|e| MountError::FuseUnusable {
        reason: format!("fstat /dev/fuse: {e}"),
    })?;
    let numbers = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    if !meta.file_type().is_char_device() || numbers != FUSE_DEVICE {
        return Err(MountError::FuseUnusable {
            reason: format!(
                "/dev/fuse is not the FUSE device (device {}:{}, expected {}:{})",
                numbers.0, numbers.1, FUSE_DEVICE.0, FUSE_DEVICE.1
            ),
        });
    }
    Ok(OwnedFd::from(file))
}

/// The FUSE device's major and minor numbers (the kernel's `Documentation/admin-guide/devices.txt`).
const FUSE_DEVICE: (u32, u32) = (10, 229);

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let image = SquashImage::open(src, opts.block_cache_bytes)?;
    let dev = open_dev_fuse()?;
    super::mount_fuse_fd(&dev, target, &src.path.to_string_lossy(), "cmpirun", opts)?;
    let unmount = || {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    };
    let image_fd = image.raw_fd();
    let loads = opts.record_loads.map(|fd| LoadRecord {
        fd,
        seen: (0..image.entries.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        names: std::sync::Mutex::new(std::collections::HashSet::new()),
    });
    let fs = ImageFs {
        image,
        no_open: AtomicBool::new(false),
        no_opendir: AtomicBool::new(false),
        loads,
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(opts.fuse_threads.max(1));
    // Each clone opens /dev/fuse by path when the server starts, which could race with the
    // caller's pivot_root; threads sharing one fd serve as well on a read-mostly load.
    config.clone_fd = false;
    config.acl = SessionACL::All;
    let session = match Session::from_fd(fs, dev, SessionACL::All, config) {
        Ok(s) => s,
        Err(e) => {
            unmount();
            return Err(MountError::Server {
                backend: MountBackend::Fuse,
                path: src.path.clone(),
                reason: format!("FUSE handshake: {e}"),
            });
        }
    };
    let parent = nix::unistd::getpid();
    // Owns the session: the child serves it, the parent drops it with this closure.
    let serve = move || {
        limit_malloc();
        match become_server_child(parent, &session, image_fd, opts.record_loads) {
            Ok(()) => match session.run() {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("image server for {}: {e}", src.path.display());
                    1
                }
            },
            Err(()) => 1,
        }
    };
    // SAFETY: the caller is expected to be single-threaded here (it has just entered a new user
    // namespace), so no lock is held by a vanished thread and the child may start the server's
    // threads.
    match unsafe { crate::sys::process::fork_child(serve) } {
        Ok(child) => {
            // Only the child holds the connection now (the parent's `session` went with the
            // uncalled `serve`): if it dies, the kernel aborts the mount instead of leaving
            // readers hanging.
            tracing::debug!(
                "image {} served at {} by built-in FUSE server pid {child}",
                src.path.display(),
                target.display()
            );
            Ok(MountedImage::new_served(target, MountBackend::Fuse, child))
        }
        Err(e) => {
            unmount();
            Err(MountError::io("fork the image server", e))
        }
    }
}

/// Child-side set-up: die with the parent, leave the terminal's process group (a Ctrl-C must
/// reach the job, not cut the image from under it), drop inherited descriptors except stderr
/// and the server's own, and make stderr never block.
fn become_server_child(
    parent: nix::unistd::Pid,
    session: &Session<ImageFs>,
    image_fd: i32,
    record_loads: Option<i32>,
) -> Result<(), ()> {
    use std::os::fd::AsFd;
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
        return Err(());
    }
    if nix::unistd::getppid() != parent {
        return Err(());
    }
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    let _ = nix::sys::prctl::set_name(c"cmpirun-fuse");
    let fs = session.as_fd().as_raw_fd();
    let mut keep = vec![2, fs, image_fd];
    keep.extend(record_loads);
    crate::sys::process::close_fds_except(0, &keep);
    // The server's log lines must never make it wait (a stopped terminal, a reader that does
    // not read): its readers, the ranks, would wait with it in uninterruptible sleep.
    crate::sys::process::nonblocking_stderr();
    FUSE_FD.store(fs, Ordering::Relaxed);
    Ok(())
}

/// The FUSE connection's descriptor in the server child (-1 elsewhere), for [`WorkerWatch`].
static FUSE_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// Armed by every request a worker serves; dropped when that worker thread ends.
    static WORKER_WATCH: WorkerWatch = const { WorkerWatch };
}

/// Ends the whole server when a worker thread ends while the mount is still in use.
///
/// fuser's workers leave their loop on an unexpected read error from `/dev/fuse` or a request
/// it cannot parse (that request then never gets an answer), and a panic outside
/// [`ImageFs::serve`] ends its thread. The other workers would go on serving, so the job would
/// not fail, but every process waiting on the lost request (a rank faulting in a page of a
/// library, say) would wait for ever. Exiting instead makes the kernel abort the connection:
/// waiting readers get an error at once, and the node instance sees its server gone.
struct WorkerWatch;

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        let fd = FUSE_FD.load(Ordering::Relaxed);
        if fd < 0 || connection_ended(fd) {
            return;
        }
        let name = nix::sys::prctl::get_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Raw write(2): this runs while the thread's thread-locals are being destroyed, where
        // the logging machinery may no longer work.
        let msg = format!(
            "cmpirun: image server: worker thread {name} ended while the image is mounted; \
             ending the server so that readers of the image fail instead of waiting for ever\n"
        );
        // SAFETY: writes a buffer we own to stderr, then ends the process without running
        // anything else of it (the other workers are in the middle of requests).
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(1)
        }
    }
}

/// Whether the FUSE connection on `fd` is gone (unmounted or aborted): `poll` then reports an
/// error on it, as the kernel does for a connection it no longer serves.
fn connection_ended(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n < 0 || p.revents & (libc::POLLERR | libc::POLLNVAL) != 0
}

/// Keeps the server's heap close to what it holds (it is per node, but its peak counts against
/// the point of one server per node): one malloc arena for all worker threads instead of one
/// each (each grew to several MiB of mostly freed blocks), and buffers of 256 KiB or more (the
/// kernel's reads of up to 1 MiB) mapped and unmapped rather than left on the heap. Must run
/// before the worker threads start.
fn limit_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; this process has one thread here.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// The fuser filesystem over a squashfs index.
struct ImageFs {
    image: SquashImage,
    /// The kernel accepts ENOSYS for open and then skips those round trips, keeping the page
    /// cache (`FUSE_NO_OPEN_SUPPORT`, Linux ≥ 4.20).
    no_open: AtomicBool,
    /// The same for opendir (`FUSE_NO_OPENDIR_SUPPORT`, Linux ≥ 5.1).
    no_opendir: AtomicBool,
    /// Where the ELF files served and the names looked up are recorded
    /// ([`MountOptions::record_loads`]).
    loads: Option<LoadRecord>,
}

/// The ELF files a server has served and the names it was asked for, and the descriptor it
/// records them to: one line each, `e` and the image path of an ELF file, `n` and the path of
/// a name looked up (found or not).
struct LoadRecord {
    fd: i32,
    /// Per entry: recorded already.
    seen: Vec<AtomicBool>,
    /// The names recorded already.
    names: std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
}

impl LoadRecord {
    /// Records entry `idx` (its image path `path`) once, when `head` (the data served from
    /// offset 0) starts with the ELF magic. One `write(2)` of one line: lines from several
    /// worker threads do not mix.
    fn note(&self, idx: usize, head: &[u8], path: impl FnOnce() -> std::path::PathBuf) {
        use std::os::unix::ffi::OsStringExt;
        if !head.starts_with(b"\x7fELF")
            || self
                .seen
                .get(idx)
                .is_none_or(|s| s.swap(true, Ordering::Relaxed))
        {
            return;
        }
        self.write(b'e', path().into_os_string().into_vec());
    }

    /// Records the lookup of `path` once.
    fn note_name(&self, path: std::path::PathBuf) {
        use std::os::unix::ffi::OsStringExt;
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= super::MAX_LOADS || !names.insert(path.clone()) {
            return;
        }
        drop(names);
        self.write(b'n', path.into_os_string().into_vec());
    }

    /// One `write(2)` of one line, `kind` and `path`: lines from several worker threads do not
    /// mix. A lost line only means the file or name is read through the mount next time too.
    fn write(&self, kind: u8, path: Vec<u8>) {
        if path.contains(&b'\n') {
            return;
        }
        let mut line = Vec::with_capacity(path.len() + 2);
        line.push(kind);
        line.extend(path);
        line.push(b'\n');
        // SAFETY: writes a buffer we own to a descriptor this process keeps open.
        let _ = unsafe { libc::write(self.fd, line.as_ptr().cast(), line.len()) };
    }
}

impl ImageFs {
    /// Runs one request's handler on a worker thread: arms the [`WorkerWatch`] of the thread,
    /// and turns a panic into a logged error instead of the end of the thread. The handler owns
    /// the reply, so a panic drops it unsent and fuser answers the request with EIO.
    fn serve(&self, op: &str, ino: u64, handler: impl FnOnce()) {
        WORKER_WATCH.with(|_| ());
        let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) else {
            return;
        };
        let why = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        let what = match ino.checked_sub(1).map(|i| i as usize) {
            Some(i) if i < self.image.entries.len() => self.image.path_of(i).display().to_string(),
            _ => format!("inode {ino}"),
        };
        tracing::error!(
            "{}: {op} of {what} failed ({why}); answered with an I/O error",
            self.image.path().display()
        );
    }

    fn attr(&self, ino: u64, e: &Entry) -> FileAttr {
        let (kind, size, rdev, nlink) = match &e.kind {
            EntryKind::Dir { children } => {
                let subdirs = children
                    .iter()
                    .filter(|&&c| {
                        matches!(self.image.entries[c as usize].kind, EntryKind::Dir { .. })
                    })
                    .count();
                (FileType::Directory, 0, 0, 2 + subdirs as u32)
            }
            EntryKind::File(f) => (FileType::RegularFile, f.size, 0, 1),
            EntryKind::Symlink(t) => (FileType::Symlink, t.len() as u64, 0, 1),
            EntryKind::CharDevice(d) => (FileType::CharDevice, 0, *d, 1),
            EntryKind::BlockDevice(d) => (FileType::BlockDevice, 0, *d, 1),
            EntryKind::Fifo => (FileType::NamedPipe, 0, 0, 1),
            EntryKind::Socket => (FileType::Socket, 0, 0, 1),
        };
        let time = UNIX_EPOCH + Duration::from_secs(u64::from(e.mtime));
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: e.perm,
            nlink,
            uid: e.uid,
            gid: e.gid,
            rdev,
            blksize: self.image.block_size,
            flags: 0,
        }
    }

    fn file_type(e: &Entry) -> FileType {
        match e.kind {
            EntryKind::Dir { .. } => FileType::Directory,
            EntryKind::File(_) => FileType::RegularFile,
            EntryKind::Symlink(_) => FileType::Symlink,
            EntryKind::CharDevice(_) => FileType::CharDevice,
            EntryKind::BlockDevice(_) => FileType::BlockDevice,
            EntryKind::Fifo => FileType::NamedPipe,
            EntryKind::Socket => FileType::Socket,
        }
    }

    /// The directory's listing as (inode, name) with "." and ".." first.
    fn dir_entries(&self, ino: u64) -> Option<Vec<(u64, &OsStr)>> {
        let e = self.image.entry(ino)?;
        let EntryKind::Dir { children } = &e.kind else {
            return None;
        };
        let mut out = Vec::with_capacity(children.len() + 2);
        out.push((ino, OsStr::new(".")));
        out.push((u64::from(e.parent) + 1, OsStr::new("..")));
        for &c in children {
            out.push((
                u64::from(c) + 1,
                self.image.entries[c as usize].name.as_os_str(),
            ));
        }
        Some(out)
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES;
        let offered = config.capabilities();
        let _ = config.add_capabilities(wanted & offered);
        self.no_open.store(
            offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT),
            Ordering::Relaxed,
        );
        self.no_opendir.store(
            offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            Ordering::Relaxed,
        );
        // Let the kernel read ahead as far as it allows and keep many reads in flight, so
        // sequential reads of large files keep all worker threads busy decompressing.
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.serve("lookup", parent.0, || {
            if let Some(loads) = &self.loads
                && let Some(dir) = parent.0.checked_sub(1)
                && (dir as usize) < self.image.entries.len()
            {
                loads.note_name(self.image.path_of(dir as usize).join(name));
            }
            match self.image.lookup(parent.0, name) {
                Some(ino) => match self.image.entry(ino) {
                    Some(e) => reply.entry(&TTL, &self.attr(ino, e), Generation(0)),
                    None => reply.error(Errno::ENOENT),
                },
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve("getattr", ino.0, || match self.image.entry(ino.0) {
            Some(e) => reply.attr(&TTL, &self.attr(ino.0, e)),
            None => reply.error(Errno::ENOENT),
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.serve("readlink", ino.0, || {
            match self.image.entry(ino.0).map(|e| &e.kind) {
                Some(EntryKind::Symlink(t)) => {
                    use std::os::unix::ffi::OsStrExt;
                    reply.data(t.as_bytes())
                }
                Some(_) => reply.error(Errno::EINVAL),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.serve("open", ino.0, || {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            if self.no_open.load(Ordering::Relaxed) {
                return reply.error(Errno::ENOSYS);
            }
            match self.image.entry(ino.0).map(|e| &e.kind) {
                Some(EntryKind::File(_)) => {
                    reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
                }
                Some(EntryKind::Dir { .. }) => reply.error(Errno::EISDIR),
                Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.serve("read", ino.0, || {
            let Some(EntryKind::File(file)) = self.image.entry(ino.0).map(|e| &e.kind) else {
                return reply.error(Errno::EINVAL);
            };
            let mut buf = Vec::new();
            match self.image.read(file, offset, size as usize, &mut buf) {
                Ok(()) => {
                    if let Some(loads) = &self.loads
                        && offset == 0
                    {
                        let idx = (ino.0 - 1) as usize;
                        loads.note(idx, &buf, || self.image.path_of(idx));
                    }
                    reply.data(&buf)
                }
                Err(e) => {
                    tracing::error!(
                        "{}: reading {} at {offset}: {e}",
                        self.image.path().display(),
                        self.image.path_of((ino.0 - 1) as usize).display()
                    );
                    reply.error(Errno::EIO)
                }
            }
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush in a read-only image: ENOSYS tells the kernel so, and it sends no
        // more FLUSH (one per close of a file of the image, by every rank) on this connection.
        self.serve("flush", _ino.0, || reply.error(Errno::ENOSYS))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.serve("opendir", ino.0, || {
            if self.no_opendir.load(Ordering::Relaxed) {
                return reply.error(Errno::ENOSYS);
            }
            match self.image.entry(ino.0).map(|e| &e.kind) {
                Some(EntryKind::Dir { .. }) => reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                ),
                Some(_) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.serve("readdir", ino.0, || {
            let Some(list) = self.dir_entries(ino.0) else {
                return reply.error(Errno::ENOTDIR);
            };
            for (i, (child, name)) in list.iter().enumerate().skip(offset as usize) {
                let kind = self
                    .image
                    .entry(*child)
                    .map(Self::file_type)
                    .unwrap_or(FileType::Directory);
                if reply.add(INodeNo(*child), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.serve("readdirplus", ino.0, || {
            let Some(list) = self.dir_entries(ino.0) else {
                return reply.error(Errno::ENOTDIR);
            };
            for (i, (child, name)) in list.iter().enumerate().skip(offset as usize) {
                let Some(e) = self.image.entry(*child) else {
                    continue;
                };
                if reply.add(
                    INodeNo(*child),
                    i as u64 + 1,
                    name,
                    &TTL,
                    &self.attr(*child, e),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.serve("statfs", _ino.0, || {
            let bs = self.image.block_size;
            reply.statfs(
                self.image.bytes_used.div_ceil(u64::from(bs)),
                0,
                0,
                self.image.entries.len() as u64,
                0,
                bs,
                256,
                bs,
            )
        })
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.serve("access", ino.0, || {
            // Only called without `default_permissions`; answer as the kernel would with it.
            let Some(e) = self.image.entry(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            let mask = mask.bits() as u32;
            if mask & W_OK != 0 {
                return reply.error(Errno::EROFS);
            }
            let perm = u32::from(e.perm);
            let bits = if req.uid() == e.uid {
                perm >> 6
            } else if req.gid() == e.gid {
                perm >> 3
            } else {
                perm
            } & 7;
            if mask & !bits & 7 != 0 {
                reply.error(Errno::EACCES)
            } else {
                reply.ok()
            }
        })
    }
}
