//! Small, checked wrappers over the Linux system calls several parts of cmpirun need, each
//! written once: forking a child that never returns into its caller and closing inherited
//! descriptors ([`process`]), entering a user namespace as oneself ([`userns`]), remounting a
//! bind read-only while keeping the flags the kernel locked ([`remount`]).
//!
//! Nothing here knows about images, plans or launchers; `container`, `mount` and `launch` use
//! these.

pub mod process;
pub mod remount;
pub mod userns;

use nix::errno::Errno;

/// A system call that failed, and the step it was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {errno}")]
pub struct SysError {
    /// What was being done (e.g. "statvfs").
    pub step: &'static str,
    /// The system error.
    pub errno: Errno,
}

impl SysError {
    /// A mapper for `map_err` that names `step`.
    pub fn at(step: &'static str) -> impl FnOnce(Errno) -> SysError {
        move |errno| SysError { step, errno }
    }
}

/// Filesystem magic numbers (`statfs(2)` `f_type`) of network and parallel filesystems: folders
/// every node of a cluster may share.
const NETWORK_FILESYSTEMS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4750_4653, "GPFS"),
    (0x1983_0326, "BeeGFS"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x00C3_6400, "CephFS"),
];

/// The network filesystem `magic` names, if it names one.
pub fn network_filesystem(magic: i64) -> Option<&'static str> {
    NETWORK_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// The filesystem type (`statfs(2)` `f_type`) of `dir`, or of its nearest existing ancestor when
/// it does not exist yet (where it will be made).
pub fn filesystem_type(dir: &std::path::Path) -> Result<i64, SysError> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    let s = nix::sys::statfs::statfs(existing).map_err(SysError::at("statfs"))?;
    // fs_type_t is i64 on 64-bit glibc, another width elsewhere.
    #[allow(clippy::unnecessary_cast)]
    Ok(s.filesystem_type().0 as i64)
}

/// The network filesystem `dir` is (or will be made) on, if any: `Some("NFS")` for a folder
/// the nodes may share; `None` for a local one, or one whose type cannot be read.
pub fn shared_filesystem(dir: &std::path::Path) -> Option<&'static str> {
    filesystem_type(dir).ok().and_then(network_filesystem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_by_magic() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0x0BD0_0BD0), Some("Lustre"));
        assert_eq!(network_filesystem(0x4750_4653), Some("GPFS"));
        assert_eq!(network_filesystem(0x1983_0326), Some("BeeGFS"));
        // ext4, xfs, tmpfs are local.
        for local in [0xEF53, 0x5846_5342, 0x0102_1994] {
            assert_eq!(network_filesystem(local), None);
        }
    }
}
