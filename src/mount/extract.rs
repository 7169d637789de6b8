//! The extract backend: unpack the squashfs once per node into a cache and bind it read-only.

use std::path::{Path, PathBuf};

use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// The default extract cache: `$XDG_CACHE_HOME/cmpirun/extract`, else
/// `$HOME/.cache/cmpirun/extract`.
pub fn default_extract_cache() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("cmpirun").join("extract"))
}

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let _ = (src, target, opts);
    Err(MountError::NotImplemented {
        backend: MountBackend::Extract,
    })
}
