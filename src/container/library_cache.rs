//! The node's library cache, as the creator of a node instance uses it: bind the copies of an
//! image's MPI stack over the image's files when the node has them, and unpack them (once per
//! node; see [`crate::mount::hold_library_files`]) when it does not.
//!
//! Only the process that creates the node instance does this: the ranks that join a running
//! instance never touch the cache, so no rank waits for a cache lock while the ranks of another
//! task wait for it in MPI wire-up.
//!
//! A launch that finds no entry for its image (the image's first launch on the node) does not
//! wait for one: its ranks read the files through the image mount, as with the cache off, and
//! the creator unpacks them meanwhile, on a thread started once every process of the job is
//! forked ([`start_deferred_fills`]), for the launches after it. Unpacking is decompression
//! (44 MiB for Debian's MPICH), which a rank touching a part of its libraries never pays for;
//! waiting for it made an image's first launch about 30 ms slower on two cores than reading
//! through the mount. The creator waits for the thread before it exits
//! ([`finish_deferred_fills`]), so no fill outlives its job.

use std::fs;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Mutex;
use std::thread::JoinHandle;

use crate::mount::{MountBackend, SquashfsSource};

use super::root::{HostBind, ImageSource, LibraryCache, RootConfig};

/// Entries this process found missing while planning its instance: unpacked by
/// [`start_deferred_fills`].
static DEFERRED: Mutex<Vec<(SquashfsSource, LibraryCache)>> = Mutex::new(Vec::new());

/// The thread unpacking [`DEFERRED`], once started.
static FILLING: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

/// Sets [`RootConfig::cached`] to the binds of `root`'s library-cache entry when the node has
/// it; returns the descriptor of the entry's shared lock, which the node instance keeps open for
/// its life (so that no pruning removes the entry while the instance binds it). An entry the
/// node does not have is left to [`start_deferred_fills`]. The cache is an optimisation: when it
/// is off, missing, or cannot be filled (no space, no writable home), `cached` stays empty and
/// the files are read through the mount.
pub fn resolve(root: &mut RootConfig) -> Option<RawFd> {
    let cache = root.library_cache.as_ref()?;
    let (binds, lock) = cached_binds(&root.image, cache)?;
    root.cached = binds;
    Some(lock)
}

/// Starts unpacking the entries [`resolve`] found missing, on a thread of its own. Call it once
/// every process of the job is forked (the thread must not be copied into a fork, and the node
/// instance needs a single-threaded creator).
pub fn start_deferred_fills() {
    let pending = std::mem::take(&mut *DEFERRED.lock().unwrap_or_else(|e| e.into_inner()));
    if pending.is_empty() {
        return;
    }
    let thread = std::thread::Builder::new()
        .name("library-cache".into())
        .spawn(move || {
            for (source, cache) in pending {
                match crate::mount::hold_library_files(&source, &cache.dir, &cache.files) {
                    Ok(held) => {
                        loadable(&held.tree, &cache.dir);
                    }
                    Err(e) => warn_unusable(&cache.dir, &e.to_string()),
                }
            }
        });
    match thread {
        Ok(t) => *FILLING.lock().unwrap_or_else(|e| e.into_inner()) = Some(t),
        Err(e) => tracing::debug!("library cache: no thread to unpack into it: {e}"),
    }
}

/// Waits for the thread of [`start_deferred_fills`], if one runs, and forgets entries found
/// missing but never started (a job that failed before its ranks started).
pub fn finish_deferred_fills() {
    DEFERRED.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let thread = FILLING.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = thread {
        let _ = t.join();
    }
}

fn warn_unusable(dir: &Path, why: &str) {
    tracing::warn!(
        "library cache {}: {why}; reading the image's MPI libraries through the mount (set {}=off \
         to skip the cache)",
        dir.display(),
        crate::mount::LIBRARY_CACHE_ENV
    );
}

/// Whether libraries can be loaded from the entry `tree` of the cache `dir`: not when its
/// filesystem is mounted noexec (a /tmp mounted so), which is said.
fn loadable(tree: &Path, dir: &Path) -> bool {
    let noexec = nix::sys::statvfs::statvfs(tree)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
    if noexec {
        tracing::warn!(
            "library cache {}: its filesystem is mounted noexec, so libraries there cannot be \
             loaded; reading the image's MPI libraries through the mount (point {} at a \
             directory on another filesystem, or set it to off)",
            dir.display(),
            crate::mount::LIBRARY_CACHE_ENV
        );
    }
    !noexec
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
    if !crate::mount::library_entry_present(source, dir) {
        DEFERRED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((source.clone(), cache.clone()));
        return None;
    }
    let held = match crate::mount::hold_library_files(source, dir, &cache.files) {
        Ok(held) => held,
        Err(e) => {
            warn_unusable(dir, &e.to_string());
            return None;
        }
    };
    let tree = held.tree;
    if !loadable(&tree, dir) {
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
