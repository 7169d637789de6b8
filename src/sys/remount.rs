//! Remounting a bind read-only in a user namespace.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::statvfs::{FsFlags, statvfs};

use super::SysError;

/// Remounts the bind mount at `target` read-only, adding `extra` (e.g. `MS_NOSUID | MS_NODEV`).
///
/// In a user namespace the kernel locks the flags a mount had when the namespace was made
/// (nosuid, nodev, noexec and the atime flags, see mount_namespaces(7) "MNT_LOCK_*"): a remount
/// that would clear one of them fails with EPERM. So the flags the mount has now are read
/// (`statvfs`) and kept.
pub fn remount_read_only(target: &Path, extra: MsFlags) -> Result<(), SysError> {
    let have = statvfs(target).map_err(SysError::at("statvfs"))?.flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | extra;
    for (had, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(had) {
            flags |= keep;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(SysError::at("remount read-only"))
}
