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
