//! The node's library cache, as the creator of a node instance uses it: fill the entry of each
//! image (once per node; see [`crate::mount::hold_library_files`]) and bind its copies over the
//! image's files.
//!
//! Only the process that creates the node instance does this, before the instance is forked:
//! the ranks that join a running instance never touch the cache, so no rank waits for a cache
//! lock while the ranks of another task wait for it in MPI wire-up.

use std::fs;
use std::os::fd::RawFd;
use std::path::Path;

use crate::mount::MountBackend;

use super::root::{HostBind, ImageSource, LibraryCache, RootConfig};

/// Fills `root`'s library-cache entry and sets [`RootConfig::cached`] to its binds; returns the
/// descriptor of the entry's shared lock, which the node instance keeps open for its life (so
/// that no pruning removes the entry while the instance binds it). The cache is an
/// optimisation: when it is off, or cannot be filled (no space, no writable home), `cached`
/// stays empty and the files are read through the mount.
pub fn resolve(root: &mut RootConfig) -> Option<RawFd> {
    let cache = root.library_cache.as_ref()?;
    let (binds, lock) = cached_binds(&root.image, cache)?;
    root.cached = binds;
    Some(lock)
}

/// Read-only binds of the cache's files over the image's copies, for an image that a FUSE
/// server serves, and the entry's lock descriptor.
fn cached_binds(image: &ImageSource, cache: &LibraryCache) -> Option<(Vec<HostBind>, RawFd)> {
    let ImageSource::Squashfs { source, backend } = image else {
        return None;
    };
    if cache.files.is_empty() || *backend == MountBackend::Extract {
        return None;
    }
    let dir = cache.dir.as_path();
    let held = match crate::mount::hold_library_files(source, dir, &cache.files) {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(
                "library cache {}: {e}; reading the image's MPI libraries through the mount \
                 (set {}=off to skip the cache)",
                dir.display(),
                crate::mount::LIBRARY_CACHE_ENV
            );
            return None;
        }
    };
    let tree = held.tree;
    // Libraries are mapped executable, which a noexec filesystem (a /tmp mounted so) forbids.
    if nix::sys::statvfs::statvfs(&tree)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
    {
        tracing::warn!(
            "library cache {}: its filesystem is mounted noexec, so libraries there cannot be \
             loaded; reading the image's MPI libraries through the mount (point {} at a \
             directory on another filesystem, or set it to off)",
            dir.display(),
            crate::mount::LIBRARY_CACHE_ENV
        );
        return None;
    }
    let binds = cache
        .files
        .iter()
        // A damaged copy is read through the mount.
        .filter(|f| {
            !held
                .damaged
                .iter()
                .any(|(d, _)| d == *f || d == Path::new("/"))
        })
        .filter_map(|f| {
            let src = tree.join(f.strip_prefix("/").unwrap_or(f));
            // A file the image does not have (or not as a regular file) was not unpacked.
            fs::symlink_metadata(&src)
                .is_ok_and(|m| m.is_file())
                .then(|| HostBind {
                    src,
                    dst: f.clone(),
                    readonly: true,
                    recursive: false,
                })
        })
        .collect();
    Some((binds, held.lock_fd))
}
