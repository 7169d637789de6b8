//! Image mount backends: the built-in FUSE server, `squashfuse_ll`, and extraction into a cache.
//!
//! All of them are called by the node instance right after it has entered its new user and mount
//! namespaces, while it still holds that namespace's capabilities (no `execve` since `unshare`),
//! so `mount(2)` of a FUSE filesystem is allowed without a setuid helper.
//!
//! The FUSE backends run their server in a child process forked (built-in server) or spawned
//! (`squashfuse_ll`) by the caller, with `PR_SET_PDEATHSIG=SIGKILL`: when the node instance dies,
//! even by SIGKILL, the server dies with it, the kernel aborts the FUSE connection, and the mount
//! goes away with the mount namespace. A child rather than threads keeps the caller
//! single-threaded, which `setns`/`unshare` of user namespaces and `fork` without `exec` need.

mod check;
mod extract;
mod fuse;
mod reader;
mod squashfuse;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::MntFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitPidFlag;
use nix::unistd::Pid;

pub use check::{CheckReport, check_mounted_tree, enter_private_namespaces};
pub use extract::{
    CACHE_LIMIT_ENV, CacheEntry, DEFAULT_CACHE_LIMIT, HeldLibraries, LIBRARY_CACHE_ENV,
    LOADS_SUFFIX, MAX_LOADS, cache_entries, cache_key, cache_limit, check_library_files,
    clear_cache, default_extract_cache, default_library_cache_in, hold_library_files,
    hold_loaded_files, library_cache_in, library_cache_setting,
};
pub(crate) use extract::{
    env_var, hold_entry, hold_until_exit, remove_entry, temporary_name, user_cache_in,
};
pub(crate) use reader::decompress as decompress_block;
pub use reader::read_through;

/// How to make an image's squashfs visible at a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountBackend {
    /// Open `/dev/fuse`, `mount(2)` it, and serve it from a built-in fuser + backhand server.
    Fuse,
    /// Open `/dev/fuse`, `mount(2)` it, and hand it to `squashfuse_ll -f … /dev/fd/N`.
    Squashfuse,
    /// Extract the squashfs once into a per-user cache with backhand and bind it read-only.
    Extract,
}

impl MountBackend {
    /// The name used on the command line (`--image-mount NAME`).
    pub fn name(self) -> &'static str {
        match self {
            MountBackend::Fuse => "fuse",
            MountBackend::Squashfuse => "squashfuse",
            MountBackend::Extract => "extract",
        }
    }
}

impl std::fmt::Display for MountBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MountBackend {
    type Err = MountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fuse" => Ok(MountBackend::Fuse),
            "squashfuse" => Ok(MountBackend::Squashfuse),
            "extract" => Ok(MountBackend::Extract),
            other => Err(MountError::UnknownBackend(other.to_owned())),
        }
    }
}

/// A squashfs filesystem inside a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashfsSource {
    /// The file that holds it (a SIF or a plain squashfs file).
    pub path: PathBuf,
    /// Byte offset of the squashfs superblock inside `path`.
    pub offset: u64,
    /// Size in bytes of the squashfs filesystem.
    pub size: u64,
}

/// Knobs of [`mount_squashfs`]; `MountOptions::default()` suits a node instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Where the extract backend keeps extracted images (one directory per image). `None`:
    /// [`default_extract_cache`] (`$XDG_CACHE_HOME/cmpirun/extract`).
    pub extract_cache: Option<PathBuf>,
    /// Worker threads of the built-in FUSE server.
    pub fuse_threads: usize,
    /// Bytes of decompressed data blocks and fragments the built-in server keeps in memory.
    /// The kernel's page cache (kept warm with `keep_cache`) already holds what was read, so
    /// this only needs to catch the next read of a partly read block or fragment block: a few
    /// blocks are as fast as 64 MiB and keep the server small. At least four blocks are kept
    /// whatever this says, so that images with large blocks still cache their fragments.
    pub block_cache_bytes: usize,
    /// Mount with `allow_other`, so processes of the instance with another uid or gid (setgid
    /// programs, nested user namespaces) can read the image. The kernel still refuses every
    /// process outside the instance's user namespace.
    pub allow_other: bool,
    /// A descriptor the built-in FUSE server appends to, one line each, the image path of
    /// every ELF file (executable or library: a read at offset 0 that starts with the ELF
    /// magic) it serves for the first time (`e` and the path), and of every name it is asked
    /// to look up (`n` and the path): what the ranks loaded and looked up through the mount,
    /// which the library cache then serves for the node's next jobs. Paths holding a newline
    /// are left out.
    pub record_loads: Option<std::os::fd::RawFd>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            extract_cache: None,
            fuse_threads: 4,
            block_cache_bytes: 512 << 10,
            allow_other: true,
            record_loads: None,
        }
    }
}

/// Errors from choosing a backend, mounting an image, or serving it.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A backend that is not built yet.
    #[error("{backend} image mount is not built yet")]
    NotImplemented {
        /// The backend asked for.
        backend: MountBackend,
    },
    /// `/dev/fuse` cannot be used by this user on this node.
    #[error(
        "/dev/fuse is not usable here ({reason}): ask the site administrator to make /dev/fuse \
         mode 0666 (and to allow FUSE mounts in user namespaces, Linux ≥ 4.18), or use \
         --image-mount extract"
    )]
    FuseUnusable {
        /// What failed, e.g. "open /dev/fuse: Permission denied".
        reason: String,
    },
    /// `squashfuse_ll` was asked for but is not installed.
    #[error(
        "squashfuse_ll was not found on PATH: install squashfuse (≥ 0.1.104 built with libfuse 3), \
         or use --image-mount fuse or --image-mount extract"
    )]
    SquashfuseMissing,
    /// An `--image-mount` value that names no backend.
    #[error("unknown image mount backend {0:?}: use fuse, squashfuse or extract")]
    UnknownBackend(String),
    /// The image could not be read as squashfs.
    #[error("{path}: cannot read the squashfs filesystem at byte offset {offset}: {reason}")]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// Offset of the squashfs inside it.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// A system call or file operation failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being attempted, naming the path.
        what: String,
        /// The error (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The FUSE server did not serve the mount within its start deadline; it was killed and
    /// the mount removed.
    #[error(
        "{path}: the {backend} image server did not serve the image within {seconds} s and was \
         stopped: use --image-mount extract (or fuse), or allow it longer with \
         CMPIRUN_MOUNT_TIMEOUT=SECONDS"
    )]
    StartTimeout {
        /// The backend.
        backend: MountBackend,
        /// The image file.
        path: PathBuf,
        /// The deadline that passed.
        seconds: f64,
    },
    /// A setting (environment variable) with a value that cannot be used.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    BadSetting {
        /// The setting's name.
        name: String,
        /// The value found.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// The FUSE server (built-in or `squashfuse_ll`) did not come up.
    #[error("{backend} image server for {path} failed: {reason}")]
    Server {
        /// The backend.
        backend: MountBackend,
        /// The image file.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// The user's (or the site's, on the user's request) to fix: a bad image, unusable FUSE, a
/// missing tool, a bad setting; the host's: a failed system call or image server.
impl crate::exit::Blame for MountError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::user_if(matches!(
            self,
            MountError::FuseUnusable { .. }
                | MountError::SquashfuseMissing
                | MountError::UnknownBackend(_)
                | MountError::BadImage { .. }
                | MountError::StartTimeout { .. }
                | MountError::BadSetting { .. }
        ))
    }
}

impl MountError {
    pub(crate) fn io(what: impl Into<String>, error: impl Into<std::io::Error>) -> Self {
        MountError::Io {
            what: what.into(),
            error: error.into(),
        }
    }
}

/// Picks the backend to use: `requested` if it can work here, else a clear error; with no
/// request, the built-in FUSE server when `/dev/fuse` is usable, otherwise extraction.
///
/// Run it before entering the namespaces (it only opens `/dev/fuse` and searches PATH), so a
/// bad `--image-mount` fails before anything is set up.
pub fn choose_backend(requested: Option<MountBackend>) -> Result<MountBackend, MountError> {
    match requested {
        Some(MountBackend::Extract) => Ok(MountBackend::Extract),
        Some(MountBackend::Fuse) => probe_fuse().map(|()| MountBackend::Fuse),
        Some(MountBackend::Squashfuse) => {
            probe_fuse()?;
            squashfuse::find_binary()?;
            Ok(MountBackend::Squashfuse)
        }
        None => match probe_fuse() {
            Ok(()) => Ok(MountBackend::Fuse),
            Err(e) => {
                tracing::debug!("{e}");
                Ok(MountBackend::Extract)
            }
        },
    }
}

/// Checks that `/dev/fuse` can be opened for reading and writing by this process.
pub fn probe_fuse() -> Result<(), MountError> {
    fuse::open_dev_fuse().map(drop)
}

/// A mounted image. The mount (and any server behind it) lives as long as this value and the
/// processes that use it; dropping it unmounts (lazily) and kills the server.
///
/// After the caller has `pivot_root`ed into the image, unmounting by path is moot (the mount
/// namespace dies with its last process): call [`MountedImage::mark_pivoted`]; dropping still
/// stops the server.
#[derive(Debug)]
pub struct MountedImage {
    /// The directory the image's root is visible at.
    pub root: PathBuf,
    /// The backend that mounted it.
    pub backend: MountBackend,
    /// Pid of the FUSE server child (`None` for extraction). The caller must not reap it in a
    /// `waitpid(-1)` loop without checking against this.
    server: Option<Pid>,
    /// The extracted tree behind a bind mount, for the extract backend.
    extracted: Option<PathBuf>,
    /// A shared lock on the extracted tree's cache entry, so pruning leaves it alone while the
    /// image is in use.
    _cache_lock: Option<nix::fcntl::Flock<std::fs::File>>,
    mounted: bool,
}

impl MountedImage {
    /// Pid of the process serving the mount (built-in server or `squashfuse_ll`), if any.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.map(|p| p.as_raw() as u32)
    }

    /// For the extract backend: the cache directory holding the extracted tree.
    pub fn extracted_tree(&self) -> Option<&Path> {
        self.extracted.as_deref()
    }

    /// Tells the mount that the caller has `pivot_root`ed into it (or otherwise made its path
    /// meaningless): teardown then only stops the server, and never unmounts by the old path,
    /// which might name something else in the new root. The mount goes with the namespace.
    pub fn mark_pivoted(&mut self) {
        self.mounted = false;
    }

    /// Unmounts and stops the server now, reporting a failure to unmount (dropping ignores it).
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), MountError> {
        let mut result = Ok(());
        if self.mounted {
            self.mounted = false;
            if let Err(e) = nix::mount::umount2(&self.root, MntFlags::MNT_DETACH) {
                result = Err(MountError::io(
                    format!("unmount {}", self.root.display()),
                    e,
                ));
            }
        }
        if let Some(pid) = self.server.take() {
            // SIGKILL, not SIGTERM: libfuse's handler would try to exec /bin/umount, which may
            // not exist once the caller has pivoted into the image.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, Some(WaitPidFlag::__WALL));
        }
        result
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::debug!("{e}");
        }
    }
}

/// Mounts `src` read-only at `target` (an existing empty directory) with `backend`.
///
/// Must be called inside the node instance's new user + mount namespaces while it still holds
/// their capabilities (no `execve` since `unshare`), after `/` was made recursively private,
/// from the thread that will outlive the mount (the server child's parent-death signal follows
/// that thread), and preferably while single-threaded (the built-in server is `fork`ed).
pub fn mount_squashfs(
    src: &SquashfsSource,
    target: &Path,
    backend: MountBackend,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    match backend {
        MountBackend::Fuse => fuse::mount(src, target, opts),
        MountBackend::Squashfuse => squashfuse::mount(src, target, opts),
        MountBackend::Extract => extract::mount(src, target, opts),
    }
}

#[allow(dead_code)] // used by the FUSE backends as they land
impl MountedImage {
    pub(crate) fn new_served(root: &Path, backend: MountBackend, server: Pid) -> Self {
        MountedImage {
            root: root.to_owned(),
            backend,
            server: Some(server),
            extracted: None,
            _cache_lock: None,
            mounted: true,
        }
    }
}

/// Mount flags every backend applies to the image.
#[allow(dead_code)]
pub(crate) fn image_mount_flags() -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
}

/// `mount(2)` a FUSE filesystem on `target` served through `dev` (an open `/dev/fuse`).
#[allow(dead_code)]
pub(crate) fn mount_fuse_fd(
    dev: &OwnedFd,
    target: &Path,
    fsname: &str,
    subtype: &str,
    opts: &MountOptions,
) -> Result<(), MountError> {
    use std::os::fd::AsRawFd;
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let fstype = format!("fuse.{subtype}");
    nix::mount::mount(
        Some(fsname),
        target,
        Some(fstype.as_str()),
        image_mount_flags(),
        Some(data.as_str()),
    )
    .map_err(|e| match e {
        nix::errno::Errno::EPERM | nix::errno::Errno::ENODEV => MountError::FuseUnusable {
            reason: format!(
                "mount(2) of a FUSE filesystem on {}: {e}{}",
                target.display(),
                if e == nix::errno::Errno::EPERM {
                    " (is this inside a user namespace whose capabilities are still held, on \
                     Linux ≥ 4.18?)"
                } else {
                    ""
                }
            ),
        },
        e => MountError::io(format!("mount FUSE filesystem on {}", target.display()), e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Blame, Fault};

    #[test]
    fn backend_names_round_trip_and_unknown_ones_are_usage_errors() {
        for b in [
            MountBackend::Fuse,
            MountBackend::Squashfuse,
            MountBackend::Extract,
        ] {
            assert_eq!(b.name().parse::<MountBackend>().unwrap(), b);
        }
        let e = "nfs".parse::<MountBackend>().unwrap_err();
        assert!(e.fault() == Fault::User);
        assert!(e.to_string().contains("fuse, squashfuse or extract"));
    }

    #[test]
    fn unusable_fuse_says_what_to_ask_for() {
        let e = MountError::FuseUnusable {
            reason: "open /dev/fuse: Permission denied (os error 13)".into(),
        };
        let msg = e.to_string();
        assert!(msg.contains("/dev/fuse") && msg.contains("0666"));
        assert!(msg.contains("--image-mount extract"));
        assert!(e.fault() == Fault::User);
    }
}
