//! The extract backend: unpack the squashfs once per node into a cache and bind it read-only;
//! and the library cache: unpack only the files of the image's MPI stack (and, in an entry of
//! their own, the other ELF files earlier jobs loaded through the mount), to be stacked over the
//! image's copies in the mounted root.
//!
//! The extract backend is used where FUSE is not (no `/dev/fuse`, permission denied). Each cache
//! holds one directory per image, named by a hash of the image's identity; it is filled in a
//! temporary sibling and renamed into place under a lock file, so concurrent ranks of a node
//! extract it once and never see a half-written tree.
//!
//! The library cache exists because a FUSE mount's page cache ends with the mount: each job
//! mounts the image anew, so every job would read and decompress its MPI libraries again (about
//! 35 ms of a one-rank MPICH launch here). Files of a host filesystem keep their pages between
//! jobs; stacked over the image's copies, the same bytes load from memory from the second job on.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::MsFlags;

use super::reader::{EntryKind, FileData, SquashImage};
use super::{MountBackend, MountError, MountOptions, MountedImage, SquashfsSource};

/// The warning that extraction is in use is given once per process.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The user's cache folder for cmpirun: `$XDG_CACHE_HOME/cmpirun`, else `$HOME/.cache/cmpirun`,
/// with the variables read through `var`.
pub(crate) fn user_cache_in(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let base = match set("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(set("HOME")?).join(".cache"),
    };
    Some(base.join("cmpirun"))
}

pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// The default extract cache: `$XDG_CACHE_HOME/cmpirun/extract`, else
/// `$HOME/.cache/cmpirun/extract`.
pub fn default_extract_cache() -> Option<PathBuf> {
    Some(user_cache_in(env_var)?.join("extract"))
}

/// The environment variable that moves the library cache (a directory) or turns it off (`off`).
pub const LIBRARY_CACHE_ENV: &str = "CMPIRUN_LIBRARY_CACHE";

/// What a `CMPIRUN_LIBRARY_CACHE` value means: `None` for `off` (or `no`, `0`, `false`), else
/// the directory it names.
pub fn library_cache_setting(value: &str) -> Option<PathBuf> {
    let off = ["off", "no", "0", "false"]
        .iter()
        .any(|off| value.eq_ignore_ascii_case(off));
    (!off).then(|| PathBuf::from(value))
}

/// The library cache's default directory in an environment read through `var`:
/// `$XDG_CACHE_HOME/cmpirun/libraries`, else `$HOME/.cache/cmpirun/libraries`; `None` with
/// neither set.
pub fn default_library_cache_in(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    Some(user_cache_in(var)?.join("libraries"))
}

/// The library cache's directory in an environment read through `var`: as
/// `$CMPIRUN_LIBRARY_CACHE` says ([`library_cache_setting`]), else the default
/// ([`default_library_cache_in`]). `None`: turned off, or no home to keep it in.
pub fn library_cache_in(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    match var(LIBRARY_CACHE_ENV).filter(|v| !v.is_empty()) {
        Some(v) => library_cache_setting(&v),
        None => default_library_cache_in(var),
    }
}

/// Entries of the library cache this process uses: their shared locks are held until it exits,
/// so that pruning by another job leaves them alone while this one's containers bind them. They
/// are never dropped (dropping a `Flock` unlocks the open file, which a node instance forked from
/// this process shares).
static HELD: std::sync::Mutex<Vec<Flock<File>>> = std::sync::Mutex::new(Vec::new());

/// An entry of the library cache, held: its shared lock stays taken until this process exits.
#[derive(Debug)]
pub struct HeldLibraries {
    /// The entry's directory: each file is at its image path under it.
    pub tree: PathBuf,
    /// The descriptor of the entry's shared lock, which a process forked from this one (the
    /// node instance) keeps open to go on holding the entry.
    pub lock_fd: std::os::fd::RawFd,
    /// Files of the entry that failed their check ([`check_library_files`]), with what is
    /// wrong: an entry with one is not used (the job reads its files through the image mount).
    pub damaged: Vec<(PathBuf, String)>,
}

/// The file, inside a library-cache entry, that lists what the entry holds: each unpacked
/// file's image path, size and modification time, as the image has them. Written into the
/// temporary tree before it is renamed into place, so an entry without one was not made by
/// this version (or not completely).
const MANIFEST: &str = ".cmpirun-manifest.json";

/// One file of a library-cache entry as the image has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ManifestFile {
    /// Absolute path inside the image.
    path: PathBuf,
    /// Size in bytes.
    size: u64,
    /// Modification time (seconds), which extraction gives the copy.
    mtime: i64,
}

/// Makes sure the library cache `cache` holds `files` (absolute paths inside image `src`, regular
/// files; others are skipped) and returns the entry, held. The entry, named `key` (the image's
/// [`cache_key`]), is unpacked once per cache folder and image; the lock is held until this process exits, and by any process forked from
/// it that keeps the descriptor open (the node instance).
///
/// Each copy is checked before it is used ([`check_library_files`]): a damaged entry (a copy
/// truncated or changed after it was made) is removed and unpacked again when no other job
/// uses it; otherwise its damaged files are left out, with a warning.
pub fn hold_library_files(
    src: &SquashfsSource,
    cache: &Path,
    key: &str,
    files: &[PathBuf],
) -> Result<HeldLibraries, MountError> {
    hold_library_entry(src, cache, key, files, "its MPI stack")
}

/// [`hold_library_files`] for the files the ranks of earlier jobs loaded through the mount
/// ([`LOADS_SUFFIX`]): an entry of its own, named by the image and the list (a longer list is a
/// new entry; the older one goes when the cache is pruned).
pub fn hold_loaded_files(
    src: &SquashfsSource,
    cache: &Path,
    key: &str,
    files: &[PathBuf],
) -> Result<HeldLibraries, MountError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(b"\0");
    }
    let key = format!("{key}-loads-{:016x}", h.digest());
    let what = "the files its ranks loaded through the mount";
    hold_library_entry(src, cache, &key, files, what)
}

/// The name, in the library cache's folder, of the list of ELF files the ranks of an image
/// loaded through its mount (which the node's next jobs serve from the cache) and of the names
/// they looked up: the image's entry name and this suffix. JSON (`files`, `names`: image paths),
/// rewritten whole (under a temporary name, then renamed) by node instances as their jobs end.
pub const LOADS_SUFFIX: &str = ".loads";

/// The most paths a list of loaded files keeps: a job that loads more (thousands of plugins)
/// reads the rest through the mount.
pub const MAX_LOADS: usize = 4096;

/// The library-cache entry `key` of `cache` holding `files` (`what` they are, for the log),
/// filled if missing, checked, and held.
fn hold_library_entry(
    src: &SquashfsSource,
    cache: &Path,
    key: &str,
    files: &[PathBuf],
    what: &str,
) -> Result<HeldLibraries, MountError> {
    let opts = MountOptions::default();
    let extract = |src: &SquashfsSource| extract_keyed(src, cache, &opts, Some((files, what)), key);
    let (tree, lock) = extract(src)?;
    let mut damaged = check_library_files(&tree);
    let (tree, lock) = if damaged.is_empty() {
        (tree, lock)
    } else {
        // Another job may hold the entry; removing it waits for nobody.
        drop(lock);
        let removed = remove_entry(cache, &tree)?;
        let (tree, lock) = extract(src)?;
        if removed {
            damaged = check_library_files(&tree);
            for (file, problem) in &damaged {
                tracing::warn!(
                    "library cache {}: {} is damaged after unpacking it again ({problem}); \
                     reading the entry's files through the image mount",
                    tree.display(),
                    file.display()
                );
            }
            if damaged.is_empty() {
                tracing::warn!(
                    "library cache {}: the entry was damaged; unpacked it again",
                    tree.display()
                );
            }
        } else {
            damaged = check_library_files(&tree);
            for (file, problem) in &damaged {
                tracing::warn!(
                    "library cache {}: {} is damaged ({problem}) and another job uses the \
                     entry; reading the entry's files through the image mount (`cmpirun image \
                     cache --clear` removes the entry once no job uses it)",
                    tree.display(),
                    file.display()
                );
            }
        }
        (tree, lock)
    };
    let lock_fd = std::os::fd::AsRawFd::as_raw_fd(&*lock);
    hold_until_exit(lock);
    Ok(HeldLibraries {
        tree,
        lock_fd,
        damaged,
    })
}

/// Checks every copy a library-cache entry lists against its manifest: a regular file of the
/// image's size and modification time. This costs one small read and a `stat` per file (9 for
/// the MPICH test image), and finds a copy that was truncated (a full disk, a user's mistake)
/// or rewritten; it does not read the bytes, so a copy changed in place with its size and time
/// kept is not found. An entry without a readable manifest is damaged as a whole (the path
/// `/`). Returns the damaged files with what is wrong.
pub fn check_library_files(tree: &Path) -> Vec<(PathBuf, String)> {
    let manifest = match std::fs::read(tree.join(MANIFEST))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Vec<ManifestFile>>(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => return vec![(PathBuf::from("/"), format!("no manifest: {e}"))],
    };
    manifest
        .into_iter()
        .filter_map(|f| {
            let copy = tree.join(f.path.strip_prefix("/").unwrap_or(&f.path));
            let problem = match std::fs::symlink_metadata(&copy) {
                Err(e) => format!("cannot stat the copy: {e}"),
                Ok(m) if !m.is_file() => "the copy is not a regular file".to_owned(),
                Ok(m) if m.len() != f.size => {
                    format!("{} bytes, the image's file has {}", m.len(), f.size)
                }
                Ok(m) if m.mtime() != f.mtime => {
                    "changed since it was unpacked (modification time)".to_owned()
                }
                Ok(_) => return None,
            };
            Some((f.path, problem))
        })
        .collect()
}

/// Writes the manifest of the library-cache tree `tmp` (being filled with `files`).
fn write_manifest(tmp: &Path, files: &[PathBuf]) -> Result<(), MountError> {
    let listed: Vec<ManifestFile> = files
        .iter()
        .filter_map(|f| {
            let m = std::fs::symlink_metadata(tmp.join(f.strip_prefix("/").unwrap_or(f))).ok()?;
            m.is_file().then(|| ManifestFile {
                path: f.clone(),
                size: m.len(),
                mtime: m.mtime(),
            })
        })
        .collect();
    let path = tmp.join(MANIFEST);
    let json = serde_json::to_vec(&listed)
        .map_err(|e| MountError::io(format!("write {}", path.display()), e))?;
    std::fs::write(&path, json).map_err(|e| MountError::io(format!("write {}", path.display()), e))
}

pub(super) fn mount(
    src: &SquashfsSource,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountedImage, MountError> {
    let cache = match &opts.extract_cache {
        Some(dir) => dir.clone(),
        None => default_extract_cache().ok_or_else(|| {
            MountError::io(
                "find the extract cache",
                std::io::Error::other("neither XDG_CACHE_HOME nor HOME is set"),
            )
        })?,
    };
    let (tree, in_use) = extract_and_hold(src, &cache, opts, None)?;
    bind_read_only(&tree, target)?;
    Ok(MountedImage {
        root: target.to_owned(),
        backend: MountBackend::Extract,
        server: None,
        extracted: Some(tree),
        _cache_lock: Some(in_use),
        mounted: true,
    })
}

/// Makes sure the image is extracted in `cache` (only the regular files `only` and their
/// directories, if given); returns the tree's directory and a shared lock on the entry: while
/// it is held, pruning leaves the entry alone.
fn extract_and_hold(
    src: &SquashfsSource,
    cache: &Path,
    opts: &MountOptions,
    only: Option<&[PathBuf]>,
) -> Result<(PathBuf, Flock<File>), MountError> {
    let only = only.map(|files| (files, "its MPI stack"));
    extract_keyed(src, cache, opts, only, &cache_key(src)?)
}

/// The entry `key` of `cache`: the whole image, or with `only` those files (and what they are,
/// for the log), filled if missing, and held.
fn extract_keyed(
    src: &SquashfsSource,
    cache: &Path,
    opts: &MountOptions,
    only: Option<(&[PathBuf], &str)>,
    key: &str,
) -> Result<(PathBuf, Flock<File>), MountError> {
    // Only the extract backend warns: the library cache is no fallback.
    let warn = || only.is_none() && !WARNED.swap(true, Ordering::Relaxed);
    let (tree, in_use, fresh) = hold_entry(cache, key, |tmp| {
        if warn() {
            tracing::warn!(
                "image {}: FUSE mount not in use; extracting it into {} (once per node)",
                src.path.display(),
                cache.join(key).display()
            );
        }
        if let Some((files, what)) = only {
            tracing::info!(
                "image {}: unpacking {what} ({} files) into the library cache {} (once per node \
                 and image)",
                src.path.display(),
                files.len(),
                cache.join(key).display()
            );
        }
        unpack(src, opts, only.map(|(files, _)| files), tmp)
    })?;
    if !fresh && warn() {
        tracing::warn!(
            "image {}: FUSE mount not in use; using the copy extracted in {}",
            src.path.display(),
            tree.display()
        );
    }
    Ok((tree, in_use))
}

/// Unpacks the image (or the files `only`, with their manifest) into the new directory `tmp`.
fn unpack(
    src: &SquashfsSource,
    opts: &MountOptions,
    only: Option<&[PathBuf]>,
    tmp: &Path,
) -> Result<(), MountError> {
    let image = SquashImage::open(src, opts.block_cache_bytes)?;
    extract_into(&image, tmp, only)?;
    only.map_or(Ok(()), |files| write_manifest(tmp, files))
}

/// Makes sure the entry `key` of `cache` exists, filling it with `fill` when it does not, and
/// returns its directory, a shared lock on it (while it is held, pruning leaves the entry
/// alone) and whether it was filled now. `fill` writes the entry into the temporary directory
/// it is given (which does not exist yet); the entry appears at its place only when `fill`
/// succeeded (renamed there), and a failed or killed fill leaves nothing that is ever used.
///
/// Two locks per entry, so that no process waits for a lock while it holds one another waits
/// for:
/// - `<key>.lock`, the *use* lock: taken shared before the entry is looked at, and held for as
///   long as the entry is in use, filling included. Only pruning and `image cache --clear` take
///   it exclusively, never waiting for it (a held entry is skipped), and hold it only while they
///   remove the entry.
/// - `<key>.fill`, the *fill* lock: taken exclusively to fill a missing entry and let go as soon
///   as it is filled (its file is removed first, so the cache holds only entries and use-lock
///   files at rest). Its holder waits for nothing; a process waiting for it holds only use
///   locks, which nobody waits for. After the wait the entry is looked at again: usually the
///   holder filled it. A filler that dies lets go of it, and the next one starts over.
///
/// Used by the extract backend, the library cache and the cache of pulled images.
pub(crate) fn hold_entry<E: From<MountError>>(
    cache: &Path,
    key: &str,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(PathBuf, Flock<File>, bool), E> {
    std::fs::create_dir_all(cache)
        .map_err(|e| MountError::io(format!("create cache {}", cache.display()), e))?;
    let tree = cache.join(key);
    let lock_path = cache.join(format!("{key}.lock"));
    // The limit is checked before anything is filled, so a bad value fails at once.
    let limit = cache_limit()?;
    let in_use = lock_entry(&lock_path, FlockArg::LockShared)?.ok_or_else(|| {
        MountError::io(
            format!("lock {}", lock_path.display()),
            nix::errno::Errno::EWOULDBLOCK,
        )
    })?;
    // The lock file's modification time is the entry's last use, for pruning.
    let _ = in_use.set_modified(std::time::SystemTime::now());
    if tree.is_dir() {
        return Ok((tree, in_use, false));
    }
    let fill_path = cache.join(format!("{key}.fill"));
    let fill_lock = lock_entry(&fill_path, FlockArg::LockExclusive)?.ok_or_else(|| {
        MountError::io(
            format!("lock {}", fill_path.display()),
            nix::errno::Errno::EWOULDBLOCK,
        )
    })?;
    let filled = fill_entry(cache, key, &tree, fill);
    // The fill lock file goes while still locked: whoever waits on it then finds it is no
    // longer at its path, and looks at the entry again (`lock_entry`).
    let _ = std::fs::remove_file(&fill_path);
    drop(fill_lock);
    let fresh = filled?;
    if fresh {
        prune(cache, key, limit);
    }
    Ok((tree, in_use, fresh))
}

/// Keeps `lock` (an entry's use lock) taken until this process exits.
pub(crate) fn hold_until_exit(lock: Flock<File>) {
    match HELD.lock() {
        Ok(mut held) => held.push(lock),
        // A poisoned list still must not unlock the entry.
        Err(_) => std::mem::forget(lock),
    }
}

/// Whether the open (locked) file `file` is still the one at `path`.
fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(held), Ok(now)) => held.ino() == now.ino() && held.dev() == now.dev(),
        _ => false,
    }
}

/// Opens and locks `path`, making sure the file locked is still the one at `path` (pruning
/// unlinks the lock files of the entries it removes). `None`: a non-blocking lock is held
/// by another process.
fn lock_entry(path: &Path, how: FlockArg) -> Result<Option<Flock<File>>, MountError> {
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| MountError::io(format!("open lock file {}", path.display()), e))?;
        let lock = match Flock::lock(file, how) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(MountError::io(format!("lock {}", path.display()), e)),
        };
        if still_at(&lock, path) {
            return Ok(Some(lock));
        }
    }
}

/// Fills the entry `key` at `tree` with `fill` unless it is there; `true` if it was filled
/// now. The caller holds the entry's use lock shared and its fill lock.
fn fill_entry<E: From<MountError>>(
    cache: &Path,
    key: &str,
    tree: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<bool, E> {
    // Killed fills of other entries leave temporaries too; those whose filler is gone can go
    // now (a live one keeps its pid in the name).
    remove_stale_temporaries(cache, None);
    if tree.is_dir() {
        return Ok(false);
    }
    // Left-overs of a fill that was killed: nobody else works on this key while we hold its
    // fill lock, on this node or another one sharing the cache.
    let prefix = format!("{key}.tmp-");
    remove_stale_temporaries(cache, Some(&prefix));
    let tmp = cache.join(temporary_name(key));
    let result = fill(&tmp).and_then(|()| {
        std::fs::rename(&tmp, tree).map_err(|e| {
            MountError::io(format!("rename {} to {}", tmp.display(), tree.display()), e).into()
        })
    });
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    Ok(true)
}

/// The default size limit of the extract cache.
pub const DEFAULT_CACHE_LIMIT: u64 = 20 << 30;

/// The environment variable that overrides [`DEFAULT_CACHE_LIMIT`]: bytes, with an optional
/// `K`, `M`, `G` or `T` suffix (powers of 1024).
pub const CACHE_LIMIT_ENV: &str = "CMPIRUN_EXTRACT_CACHE_MAX";

/// The cache's size limit: `$CMPIRUN_EXTRACT_CACHE_MAX`, else [`DEFAULT_CACHE_LIMIT`].
pub fn cache_limit() -> Result<u64, MountError> {
    let Some(raw) = std::env::var_os(CACHE_LIMIT_ENV).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_CACHE_LIMIT);
    };
    let text = raw.to_string_lossy().trim().to_owned();
    let (num, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => 64,
            };
            (&text[..i], shift)
        }
        _ => (text.as_str(), 0),
    };
    match num.parse::<u64>() {
        Ok(n) if shift < 64 && n.checked_shl(shift).is_some_and(|v| v >> shift == n) => {
            Ok(n << shift)
        }
        _ => Err(MountError::BadSetting {
            name: CACHE_LIMIT_ENV.into(),
            value: text,
            expected: "a size in bytes with an optional K, M, G or T suffix, e.g. 20G".into(),
        }),
    }
}

/// One extracted image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The entry's directory (named by the image's hash).
    pub path: PathBuf,
    /// Bytes the tree takes on disk.
    pub bytes: u64,
    /// When a job last started with it.
    pub last_used: std::time::SystemTime,
    /// Whether a running job holds it (its lock is taken).
    pub in_use: bool,
}

/// Lists the extracted images in `cache`, least recently used first.
pub fn cache_entries(cache: &Path) -> Result<Vec<CacheEntry>, MountError> {
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(MountError::io(format!("read {}", cache.display()), e)),
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let lock_path = cache.join(format!("{name}.lock"));
        let last_used = std::fs::metadata(&lock_path)
            .or_else(|_| entry.metadata())
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        let in_use = match lock_entry(&lock_path, FlockArg::LockExclusiveNonblock) {
            Ok(Some(_)) => false,
            Ok(None) => true,
            Err(_) => true,
        };
        out.push(CacheEntry {
            bytes: tree_bytes(&path),
            path,
            last_used,
            in_use,
        });
    }
    out.sort_by_key(|e| e.last_used);
    Ok(out)
}

/// Removes every entry of `cache` no running job holds; returns the entries removed.
pub fn clear_cache(cache: &Path) -> Result<Vec<CacheEntry>, MountError> {
    remove_stale_temporaries(cache, None);
    let mut removed = Vec::new();
    for entry in cache_entries(cache)? {
        if remove_entry(cache, &entry.path)? {
            removed.push(entry);
        }
    }
    Ok(removed)
}

/// Removes one entry if nobody holds it: takes its use lock without waiting, removes the tree,
/// then unlinks the fill lock file and the use lock file while still holding the use lock
/// (whoever fills an entry holds its use lock). `false`: it is in use.
pub(crate) fn remove_entry(cache: &Path, tree: &Path) -> Result<bool, MountError> {
    let Some(name) = tree.file_name() else {
        return Ok(false);
    };
    let lock_path = cache.join(format!("{}.lock", name.to_string_lossy()));
    let Some(_lock) = lock_entry(&lock_path, FlockArg::LockExclusiveNonblock)? else {
        return Ok(false);
    };
    remove_tree(tree).map_err(|e| MountError::io(format!("remove {}", tree.display()), e))?;
    let _ = std::fs::remove_file(cache.join(format!("{}.fill", name.to_string_lossy())));
    // A library-cache entry's list of loaded files goes with it.
    let _ = std::fs::remove_file(cache.join(format!("{}{LOADS_SUFFIX}", name.to_string_lossy())));
    let _ = std::fs::remove_file(&lock_path);
    Ok(true)
}

/// Removes the least recently used entries no job holds until the cache fits in `limit`
/// bytes; never `keep` (the entry just made). Failures only leave the cache larger.
fn prune(cache: &Path, keep: &str, limit: u64) {
    let Ok(entries) = cache_entries(cache) else {
        return;
    };
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    for e in entries {
        if total <= limit {
            break;
        }
        if e.in_use || e.path.file_name().is_some_and(|n| n == keep) {
            continue;
        }
        match remove_entry(cache, &e.path) {
            Ok(true) => {
                tracing::info!(
                    "extract cache over {limit} bytes: removed {} ({} bytes, unused)",
                    e.path.display(),
                    e.bytes
                );
                total = total.saturating_sub(e.bytes);
            }
            Ok(false) => {}
            Err(err) => tracing::warn!("extract cache: {err}"),
        }
    }
}

/// Bytes a tree takes on disk (allocated blocks), not following symlinks.
fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir()
        && let Ok(rd) = std::fs::read_dir(path)
    {
        for entry in rd.flatten() {
            total += tree_bytes(&entry.path());
        }
    }
    total
}

/// The name of this process's temporary for `name` in a cache folder,
/// `<name>.tmp-<host>.<pid>`: no other process makes one of that name, on this node or on
/// another one sharing the folder, and once this process is gone the cache's sweeps remove it
/// (`remove_stale_temporaries`). For an entry's tree and for an image's list of loaded files.
pub(crate) fn temporary_name(name: &str) -> String {
    format!("{name}.tmp-{}", temporary_owner())
}

/// What names a temporary tree's extractor: `<host>.<pid>`. A cache folder may be shared by
/// several nodes (a home on a network filesystem), and a pid means something only on its own
/// node.
fn temporary_owner() -> String {
    format!("{}.{}", this_host(), std::process::id())
}

fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Whether the extractor named by a temporary's `owner` (`<host>.<pid>`, or `<pid>` as earlier
/// versions named it) is known to be gone: it ran on this host and its process no longer
/// exists. One of another host is never known to be gone.
fn owner_gone(owner: &str, this_host: &str) -> bool {
    let (host, pid) = match owner.rsplit_once('.') {
        Some((host, pid)) => (host, pid),
        None => (this_host, owner),
    };
    host == this_host
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes `<name>.tmp-<owner>` temporaries in `cache` (the trees of fills, and lists of loaded
/// files being written): with `prefix` (a key's, whose fill lock is held) all of that key's
/// trees, without it those whose writer is known to be gone.
fn remove_stale_temporaries(cache: &Path, prefix: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    let this_host = this_host();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, owner)) = name.split_once(".tmp-") else {
            continue;
        };
        let stale = match prefix {
            Some(prefix) => name.starts_with(prefix),
            None => owner_gone(owner, &this_host),
        };
        if stale {
            let _ = remove_tree(&entry.path());
        }
    }
}

/// The name of image `src`'s entries in a cache folder: its extracted tree, its library-cache
/// entry (what [`hold_library_files`] and [`hold_loaded_files`] take; its list of loaded files is
/// this plus [`LOADS_SUFFIX`]). A hash of its superblock and metadata tables (which describe
/// every file's blocks) and of the file's identity, so a rewritten image never reuses a stale
/// tree. Reads only the superblock and the tables, without parsing them; compute it once per
/// image.
pub fn cache_key(src: &SquashfsSource) -> Result<String, MountError> {
    let file = File::open(&src.path)
        .map_err(|e| MountError::io(format!("open image {}", src.path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| MountError::io(format!("stat image {}", src.path.display()), e))?;
    let mut sb = [0u8; 96];
    file.read_exact_at(&mut sb, src.offset)
        .map_err(|e| MountError::io(format!("read image {}", src.path.display()), e))?;
    let le64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&sb[at..at + 8]);
        u64::from_le_bytes(b)
    };
    // The squashfs superblock: magic "hsqs" at 0, modification time at 8, bytes_used at 40,
    // inode_table_start at 64.
    let (bytes_used, table_start) = (le64(40), le64(64));
    if &sb[..4] != b"hsqs"
        || table_start > bytes_used
        || src
            .offset
            .checked_add(bytes_used)
            .is_none_or(|end| end > meta.len())
    {
        return Err(MountError::BadImage {
            path: src.path.clone(),
            offset: src.offset,
            reason: "no squashfs superblock there".into(),
        });
    }
    let mkfs_time = u32::from_le_bytes([sb[8], sb[9], sb[10], sb[11]]);
    // The same values, in the same order, as before the key was read without parsing the
    // image, so that trees extracted then are still found.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for v in [
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        src.offset,
        bytes_used,
        u64::from(mkfs_time),
    ] {
        h.update(&v.to_le_bytes());
    }
    h.update(&sb);
    let mut pos = table_start;
    let end = bytes_used;
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], src.offset + pos)
            .map_err(|e| MountError::io(format!("read image {}", src.path.display()), e))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// Writes every entry of `image` under `dir` (which must not exist), preserving modes,
/// modification times, symlinks and fifos. Device nodes and sockets cannot be made without
/// privileges and are left out. With `only`: just those regular files (absolute paths in the
/// image) and the directories that lead to them.
fn extract_into(
    image: &SquashImage,
    dir: &Path,
    only: Option<&[PathBuf]>,
) -> Result<(), MountError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        MountError::io(format!("extract: {what} {}", p.display()), e)
    };
    let mut paths: Vec<PathBuf> = Vec::with_capacity(image.entries.len());
    let mut skipped = 0usize;
    // Regular files are created in the walk and filled after it, in parallel.
    let mut files: Vec<(usize, &FileData)> = Vec::new();
    let wanted = only.map(selection);
    let mut kept = vec![true; image.entries.len()];
    for (i, e) in image.entries.iter().enumerate() {
        let path = if i == 0 {
            dir.to_owned()
        } else {
            paths[e.parent as usize].join(&e.name)
        };
        if let Some(wanted) = &wanted
            && i != 0
        {
            let inside = Path::new("/").join(path.strip_prefix(dir).unwrap_or(&path));
            let keep = kept[e.parent as usize]
                && match &e.kind {
                    EntryKind::Dir { .. } => wanted.dirs.contains(&inside),
                    EntryKind::File(_) => wanted.files.contains(&inside),
                    _ => false,
                };
            if !keep {
                kept[i] = false;
                paths.push(path);
                continue;
            }
        }
        match &e.kind {
            EntryKind::Dir { .. } => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|err| io("create directory", &path, err))?;
            }
            EntryKind::File(data) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|err| io("create", &path, err))?;
                files.push((i, data));
            }
            EntryKind::Symlink(t) => {
                std::os::unix::fs::symlink(t, &path).map_err(|err| io("symlink", &path, err))?;
                set_mtime(&path, e.mtime, true);
            }
            EntryKind::Fifo => {
                nix::unistd::mkfifo(
                    &path,
                    nix::sys::stat::Mode::from_bits_truncate(u32::from(e.perm)),
                )
                .map_err(|err| io("mkfifo", &path, err.into()))?;
                let _ = std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(u32::from(e.perm)),
                );
            }
            EntryKind::CharDevice(_) | EntryKind::BlockDevice(_) | EntryKind::Socket => {
                skipped += 1;
            }
        }
        paths.push(path);
    }
    fill_files(image, &paths, &files)?;
    for &(i, _) in &files {
        let (e, path) = (&image.entries[i], &paths[i]);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(u32::from(e.perm)))
            .map_err(|err| io("chmod", path, err))?;
        set_mtime(path, e.mtime, false);
    }
    // Directory modes last and deepest first, so read-only directories could be filled.
    for (i, e) in image.entries.iter().enumerate().rev() {
        if let EntryKind::Dir { .. } = e.kind
            && kept[i]
        {
            let path = &paths[i];
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(u32::from(e.perm)))
                .map_err(|err| io("chmod", path, err))?;
            set_mtime(path, e.mtime, false);
        }
    }
    if skipped > 0 {
        tracing::info!(
            "{}: {skipped} device nodes and sockets not extracted (they need privileges)",
            image.path().display()
        );
    }
    Ok(())
}

/// Writes the contents of `files` (entry index, data) into the files already created at
/// `paths[index]`, in pieces of up to 1 MiB shared out among a thread per CPU (at most 4):
/// decompression is the cost, and a node's first launch waits for it. The threads end before
/// this returns.
fn fill_files(
    image: &SquashImage,
    paths: &[PathBuf],
    files: &[(usize, &FileData)],
) -> Result<(), MountError> {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    let chunk = (image.block_size as u64 * 8).max(1 << 20);
    let pieces: Vec<(usize, u64)> = files
        .iter()
        .enumerate()
        .flat_map(|(f, (_, data))| (0..data.size.div_ceil(chunk)).map(move |k| (f, k * chunk)))
        .collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<MountError>> = Mutex::new(None);
    let work = || {
        let mut buf = Vec::new();
        let mut open: Option<(usize, File)> = None;
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(f, off)) = pieces.get(n) else {
                return;
            };
            if failed.lock().map_or(true, |e| e.is_some()) {
                return;
            }
            let (i, data) = files[f];
            let path = &paths[i];
            let result = (|| {
                if open.as_ref().is_none_or(|(g, _)| *g != f) {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| ("open", e))?;
                    open = Some((f, file));
                }
                image
                    .read(data, off, chunk as usize, &mut buf)
                    .map_err(|e| ("read image data for", e))?;
                if let Some((_, file)) = &open {
                    file.write_all_at(&buf, off).map_err(|e| ("write", e))?;
                }
                Ok(())
            })();
            if let Err((what, e)) = result
                && let Ok(mut slot) = failed.lock()
            {
                slot.get_or_insert(MountError::io(
                    format!("extract: {what} {}", path.display()),
                    e,
                ));
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(pieces.len());
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
    }
    match failed.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(MountError::io(
            "extract",
            std::io::Error::other("an extracting thread failed"),
        )),
    }
}

/// The files to unpack and every directory above them, as absolute paths in the image.
struct Selection {
    files: std::collections::HashSet<PathBuf>,
    dirs: std::collections::HashSet<PathBuf>,
}

fn selection(files: &[PathBuf]) -> Selection {
    let mut sel = Selection {
        files: files.iter().cloned().collect(),
        dirs: std::collections::HashSet::new(),
    };
    for f in files {
        let mut dir = f.parent();
        while let Some(d) = dir {
            if !sel.dirs.insert(d.to_owned()) {
                break;
            }
            dir = d.parent();
        }
    }
    sel
}

fn set_mtime(path: &Path, mtime: u32, symlink: bool) {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(i64::from(mtime), 0);
    let flag = if symlink {
        UtimensatFlags::NoFollowSymlink
    } else {
        UtimensatFlags::FollowSymlink
    };
    let _ = utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, flag);
}

/// Removes a tree even where its directories are read-only.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Binds `tree` at `target` read-only, nosuid, nodev, keeping the flags the kernel locked on
/// the source mount (noexec, atime) so the read-only remount is allowed in a user namespace
/// ([`crate::sys::remount::remount_read_only`]).
fn bind_read_only(tree: &Path, target: &Path) -> Result<(), MountError> {
    nix::mount::mount(
        Some(tree),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        MountError::io(
            format!("bind {} on {}", tree.display(), target.display()),
            e,
        )
    })?;
    crate::sys::remount::remount_read_only(target, super::image_mount_flags()).map_err(|e| {
        // The bind is useless writable: take it away again.
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        MountError::io(format!("make {} read-only", target.display()), e.errno)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A small squashfs with `/lib/libx.so` in a fresh folder (kept alive by the returned guard).
    fn image() -> (tempfile::TempDir, SquashfsSource) {
        let dir = tempfile::tempdir().expect("temporary folder");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("lib")).expect("tree");
        std::fs::write(tree.join("lib/libx.so"), vec![7u8; 100_000]).expect("file");
        let path = dir.path().join("image.sqfs");
        let status = std::process::Command::new("mksquashfs")
            .arg(&tree)
            .arg(&path)
            .args(["-noappend", "-quiet", "-no-progress"])
            .status()
            .expect("mksquashfs (squashfs-tools) runs");
        assert!(status.success());
        let size = std::fs::metadata(&path).expect("image").len();
        let src = SquashfsSource {
            path,
            offset: 0,
            size,
        };
        (dir, src)
    }

    /// A process that finds an entry being filled waits only for the fill: once the filler has
    /// it in place it gets the entry, although the filler goes on holding it (for its job) as
    /// it would, and while it waited it held nothing the filler needed.
    #[test]
    fn a_waiter_gets_the_entry_when_its_fill_ends_while_the_filler_uses_it() {
        let (dir, src) = image();
        let cache = dir.path().join("cache");
        std::fs::create_dir(&cache).expect("cache folder");
        let key = cache_key(&src).expect("key");
        // The filler: uses the entry and fills it.
        let in_use = lock_entry(&cache.join(format!("{key}.lock")), FlockArg::LockShared)
            .expect("use lock")
            .expect("not held exclusively");
        let fill = lock_entry(&cache.join(format!("{key}.fill")), FlockArg::LockExclusive)
            .expect("fill lock")
            .expect("free");
        let (tx, rx) = mpsc::channel();
        let files = vec![PathBuf::from("/lib/libx.so")];
        let waiter = {
            let (src, cache, files) = (src.clone(), cache.clone(), files.clone());
            std::thread::spawn(move || {
                let got = extract_and_hold(&src, &cache, &MountOptions::default(), Some(&files));
                let _ = tx.send(got.map(|(tree, _lock)| tree).map_err(|e| e.to_string()));
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the waiter must wait for the fill"
        );
        // The fill ends: the entry is in place; the filler keeps using it.
        let tree = cache.join(&key);
        let fresh = fill_entry(&cache, &key, &tree, |tmp| {
            unpack(&src, &MountOptions::default(), Some(&files), tmp)
        })
        .expect("fill");
        assert!(fresh);
        drop(fill);
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the waiter got the entry while the filler still holds it")
            .expect("no error");
        assert_eq!(got, tree);
        assert_eq!(
            std::fs::read(tree.join("lib/libx.so")).expect("cached copy"),
            vec![7u8; 100_000]
        );
        waiter.join().expect("waiter thread");
        drop(in_use);
    }

    /// With nobody holding it, an entry is filled by the first process and used by the next
    /// without a second extraction; removing it takes its lock files along.
    #[test]
    fn an_entry_is_filled_once_and_removed_with_its_lock_files() {
        let (dir, src) = image();
        let cache = dir.path().join("cache");
        let files = vec![PathBuf::from("/lib/libx.so")];
        let (tree, first) =
            extract_and_hold(&src, &cache, &MountOptions::default(), Some(&files)).expect("fill");
        let mtime = std::fs::metadata(tree.join("lib/libx.so"))
            .and_then(|m| m.modified())
            .expect("file");
        let (again, second) =
            extract_and_hold(&src, &cache, &MountOptions::default(), Some(&files)).expect("use");
        assert_eq!(tree, again);
        drop((first, second));
        assert_eq!(
            std::fs::metadata(again.join("lib/libx.so"))
                .and_then(|m| m.modified())
                .expect("file"),
            mtime
        );
        assert!(remove_entry(&cache, &tree).expect("remove"));
        let left: Vec<_> = std::fs::read_dir(&cache)
            .expect("cache")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A copy truncated after the entry was made is found; the entry is unpacked again when no
    /// other job holds it, and the damaged file is left out while one does.
    #[test]
    fn a_damaged_copy_is_found_and_refilled_or_left_out() {
        let (dir, src) = image();
        let cache = dir.path().join("cache");
        let files = vec![PathBuf::from("/lib/libx.so")];
        let (tree, lock) =
            extract_and_hold(&src, &cache, &MountOptions::default(), Some(&files)).expect("fill");
        assert_eq!(check_library_files(&tree), vec![]);
        let copy = tree.join("lib/libx.so");
        let truncate = || {
            let mut perm = std::fs::metadata(&copy).expect("copy").permissions();
            perm.set_mode(0o644);
            std::fs::set_permissions(&copy, perm).expect("chmod");
            OpenOptions::new()
                .write(true)
                .open(&copy)
                .and_then(|f| f.set_len(10))
                .expect("truncate");
        };
        truncate();
        let damaged = check_library_files(&tree);
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].0, PathBuf::from("/lib/libx.so"));
        assert!(damaged[0].1.contains("10 bytes"), "{damaged:?}");
        // Nobody else holds it: unpacked again.
        drop(lock);
        let key = cache_key(&src).expect("key");
        let held = hold_library_files(&src, &cache, &key, &files).expect("hold");
        assert_eq!(held.damaged, vec![]);
        assert_eq!(std::fs::metadata(&copy).expect("copy").len(), 100_000);
        // This process holds it now (as a running job would): left out, not removed.
        truncate();
        let again = hold_library_files(&src, &cache, &key, &files).expect("hold");
        assert_eq!(again.tree, held.tree);
        assert_eq!(again.damaged.len(), 1, "{:?}", again.damaged);
        // An entry without a manifest (an earlier version's) is damaged as a whole.
        std::fs::remove_file(tree.join(MANIFEST)).expect("remove manifest");
        assert_eq!(check_library_files(&tree)[0].0, PathBuf::from("/"));
    }

    #[test]
    fn temporaries_of_other_hosts_are_never_known_to_be_gone() {
        assert!(!owner_gone("n2.4000000", "n1"));
        assert!(!owner_gone(&format!("n1.{}", std::process::id()), "n1"));
        assert!(owner_gone("n1.4000000", "n1"));
        assert!(
            owner_gone("4000000", "n1"),
            "an earlier version's name: this host"
        );
        assert!(!owner_gone("n1.x", "n1"));
    }

    #[test]
    fn clearing_a_cache_sweeps_the_temporaries_whose_writer_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = this_host();
        let gone = format!("k.loads.tmp-{host}.4000000");
        let live = temporary_name("k.loads");
        let elsewhere = "k.loads.tmp-another-node.4000000".to_owned();
        for name in [&gone, &live, &elsewhere] {
            std::fs::write(dir.path().join(name), b"{").expect("write");
        }
        assert_eq!(clear_cache(dir.path()).expect("clear"), vec![]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![elsewhere, live];
        want.sort();
        assert_eq!(left, want);
    }
}
