//! The built-in FUSE server: fuser over a read-only squashfs index.

use std::os::fd::OwnedFd;
use std::path::Path;

use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// Opens `/dev/fuse` read-write, close-on-exec.
pub(super) fn open_dev_fuse() -> Result<OwnedFd, MountError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(OwnedFd::from)
        .map_err(|e| MountError::FuseUnusable {
            reason: format!("open /dev/fuse: {e}"),
        })
}

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let _ = (src, target, opts);
    Err(MountError::NotImplemented {
        backend: MountBackend::Fuse,
    })
}
