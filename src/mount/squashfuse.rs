//! The squashfuse backend: mount `/dev/fuse` ourselves and hand the fd to `squashfuse_ll`.

use std::path::{Path, PathBuf};

use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// Finds `squashfuse_ll` on PATH.
pub(super) fn find_binary() -> Result<PathBuf, MountError> {
    which::which("squashfuse_ll").map_err(|_| MountError::SquashfuseMissing)
}

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let _ = (src, target, opts);
    Err(MountError::NotImplemented {
        backend: MountBackend::Squashfuse,
    })
}
