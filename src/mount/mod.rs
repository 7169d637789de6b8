//! Image mount backends: the built-in FUSE server, `squashfuse_ll`, and extraction into a cache.
//!
//! All of them are called by the node instance right after it has entered its new user and mount
//! namespaces, while it still holds that namespace's capabilities (no `execve` since `unshare`),
//! so `mount(2)` of a FUSE filesystem is allowed without a setuid helper.

use std::path::{Path, PathBuf};

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

/// Errors from mounting an image.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Placeholder until the backends land.
    #[error("{backend:?} image mount is not built yet")]
    NotImplemented {
        /// The backend asked for.
        backend: MountBackend,
    },
}

/// A mounted image. The mount (and any server behind it) lives as long as this value and the
/// processes that use it; dropping it stops the server.
#[derive(Debug)]
pub struct MountedImage {
    /// The directory the image's root is visible at.
    pub root: PathBuf,
    /// The backend that mounted it.
    pub backend: MountBackend,
}

/// Mounts `src` read-only at `target` (an existing empty directory) with `backend`.
///
/// Must be called inside the node instance's new user + mount namespaces while it still holds
/// their capabilities.
pub fn mount_squashfs(
    src: &SquashfsSource,
    target: &Path,
    backend: MountBackend,
) -> Result<MountedImage, MountError> {
    let _ = (src, target);
    Err(MountError::NotImplemented { backend })
}
