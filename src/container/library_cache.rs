//! The node's library cache, as the creator of a node instance uses it: fill the entries of
//! each image (once per node; see [`crate::mount::hold_library_files`]) and stack them over the
//! image as read-only overlay layers; and, as a job ends, note which ELF files its ranks still
//! loaded through the mount, for the node's next jobs to serve from the cache too.
//!
//! An image has up to two entries:
//! - its C library and MPI stack, as the image facts name them (filled before the image's first
//!   job on the node starts);
//! - the other ELF files its ranks loaded through the mount in earlier jobs (the program, the
//!   dynamic loader, plugins the MPI stack `dlopen`s): recorded by the image's FUSE server as it
//!   serves them, listed by the instance as its job ends, and unpacked by the creator of the
//!   node's next instance.
//!
//! Only the process that creates the node instance fills entries, before the instance is
//! forked: the ranks that join a running instance never touch the cache, so no rank waits for a
//! cache lock while the ranks of another task wait for it in MPI wire-up.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;

use crate::mount::{HeldLibraries, LOADS_SUFFIX, MAX_LOADS, MountBackend};

use super::root::{ImageSource, RootConfig};

/// What a node instance keeps of the library cache for one root.
#[derive(Debug, Default)]
pub struct CacheUse {
    /// The entries' shared locks, which the instance keeps open for its life (so that no
    /// pruning removes an entry while the instance's root stacks it).
    pub locks: Vec<RawFd>,
    /// Where the image's FUSE server records the ELF files it serves.
    pub loads: Option<LoadsLog>,
    /// The names earlier jobs' ranks looked up in the image, for the node instance to look up
    /// before it starts this job's ranks ([`warm_names`]).
    pub names: Vec<PathBuf>,
}

/// What the image's list in the library cache holds (`<entry>.loads`, JSON).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loads {
    /// The ELF files the ranks loaded through the mount (image paths).
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// The names the ranks looked up in the image (image paths; found or not).
    #[serde(default)]
    pub names: Vec<PathBuf>,
}

/// The ELF files the image's FUSE server served, and where the list of the image's loaded
/// files is kept. Descriptors, not paths: the instance lists the files after it has moved into
/// the container's root, where the host's cache folder may not be visible.
#[derive(Debug)]
pub struct LoadsLog {
    /// An in-memory file the server appends a line to per ELF file served and per name looked
    /// up (`e` or `n`, then the image path).
    pub record: OwnedFd,
    /// The library cache's folder.
    dir: OwnedFd,
    /// The list's name in it: the image's entry name and [`LOADS_SUFFIX`].
    name: String,
    /// Image paths the entries hold already.
    known: BTreeSet<PathBuf>,
    /// Names the list holds already.
    names: BTreeSet<PathBuf>,
}

impl LoadsLog {
    /// Its descriptors, which the node instance keeps open.
    pub fn fds(&self) -> [RawFd; 2] {
        [self.record.as_raw_fd(), self.dir.as_raw_fd()]
    }
}

/// Fills `root`'s library-cache entries and sets [`RootConfig::cached`] to them, and, for the
/// built-in FUSE server, [`RootConfig::record_loads`]. The cache is an optimisation: when it is
/// off, or an entry cannot be filled (no space, no writable home), the files are read through
/// the mount.
pub fn resolve(root: &mut RootConfig) -> CacheUse {
    let mut used = CacheUse::default();
    let Some(cache) = root.library_cache.as_ref() else {
        return used;
    };
    let ImageSource::Squashfs { source, backend } = &root.image else {
        return used;
    };
    if *backend == MountBackend::Extract {
        return used;
    }
    let dir = cache.dir.as_path();
    let warn = |e: &dyn std::fmt::Display| {
        tracing::warn!(
            "library cache {}: {e}; reading the image's files through the mount (set {}=off to \
             skip the cache)",
            dir.display(),
            crate::mount::LIBRARY_CACHE_ENV
        );
    };
    let key = match crate::mount::cache_key(source) {
        Ok(key) => key,
        Err(e) => {
            warn(&e);
            return used;
        }
    };
    let mut known: BTreeSet<PathBuf> = cache.files.iter().cloned().collect();
    let listed = read_loads(dir, &key);
    let loaded: Vec<PathBuf> = listed
        .files
        .into_iter()
        .filter(|f| !known.contains(f))
        .collect();
    let mut layers = Vec::new();
    for (files, loads) in [(&loaded, true), (&cache.files, false)] {
        if files.is_empty() {
            continue;
        }
        let held = if loads {
            crate::mount::hold_loaded_files(source, dir, &key, files)
        } else {
            crate::mount::hold_library_files(source, dir, &key, files)
        };
        match held {
            Ok(held) => {
                used.locks.push(held.lock_fd);
                if let Some(tree) = usable(&held, dir) {
                    layers.push(tree);
                    known.extend(files.iter().cloned());
                }
            }
            Err(e) => warn(&e),
        }
    }
    root.cached = layers;
    if *backend == MountBackend::Fuse {
        used.loads = loads_log(dir, &key, known, listed.names.iter().cloned().collect());
        root.record_loads = used.loads.as_ref().map(|l| l.record.as_raw_fd());
    }
    used.names = listed.names;
    used
}

/// The longest [`warm_names`] looks names up for.
const WARM_NAMES_FOR: std::time::Duration = std::time::Duration::from_millis(20);

/// Looks up `names` (paths inside the container root, which must be this process's root; and
/// reads the targets of those that are symlinks) and forgets the answers, so that the kernel
/// keeps them: the ranks then find every name they look up (the dynamic loader's search of its
/// library paths, mostly names that do not exist) without asking the image's FUSE server. Done
/// by the node instance before it starts the job's ranks, while the CPUs are free: with 64
/// ranks starting at once the server waits for a CPU, and each rank waited about 4 ms for each
/// of the 33 names a `hello` looks up. Stops after 20 ms.
pub fn warm_names(names: &[PathBuf]) {
    let start = std::time::Instant::now();
    for name in names {
        if start.elapsed() > WARM_NAMES_FOR {
            break;
        }
        // A symlink's target is read too: the kernel keeps it with the name.
        if std::fs::symlink_metadata(name).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = std::fs::read_link(name);
        }
    }
}

/// The entry's tree, if its copies may stand in for the image's: not when one is damaged (an
/// entry is a layer as a whole), nor on a `noexec` filesystem (libraries are mapped
/// executable, which it forbids).
fn usable(held: &HeldLibraries, dir: &Path) -> Option<PathBuf> {
    if !held.damaged.is_empty() {
        return None;
    }
    if nix::sys::statvfs::statvfs(&held.tree)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
    {
        tracing::warn!(
            "library cache {}: its filesystem is mounted noexec, so libraries there cannot be \
             loaded; reading the image's files through the mount (point {} at a directory on \
             another filesystem, or set it to off)",
            dir.display(),
            crate::mount::LIBRARY_CACHE_ENV
        );
        return None;
    }
    Some(held.tree.clone())
}

/// The list of loaded files and looked-up names of the image with entry name `key` in the
/// cache folder `dir` (empty when there is none or it cannot be read: the files are then read
/// through the mount).
pub fn read_loads(dir: &Path, key: &str) -> Loads {
    let path = dir.join(format!("{key}{LOADS_SUFFIX}"));
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Loads>(&b).ok())
        .map(|l| Loads {
            files: l.files.into_iter().filter(|p| p.is_absolute()).collect(),
            names: l.names.into_iter().filter(|p| p.is_absolute()).collect(),
        })
        .unwrap_or_default()
}

fn loads_log(
    dir: &Path,
    key: &str,
    known: BTreeSet<PathBuf>,
    names: BTreeSet<PathBuf>,
) -> Option<LoadsLog> {
    let record =
        nix::sys::memfd::memfd_create(c"cmpirun-loads", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .ok()?;
    let dir_fd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    Some(LoadsLog {
        record,
        dir: dir_fd,
        name: format!("{key}{LOADS_SUFFIX}"),
        known,
        names,
    })
}

/// As the job ends: adds the ELF files the server recorded that the cache does not hold yet,
/// and the names looked up that the list does not hold yet, to the image's list, for the node's
/// next instance. Never fails the job: a list that cannot be written only means those files
/// are read, and those names looked up, through the mount next time too.
pub fn remember_loads(log: &LoadsLog) {
    let recorded = read_all(log.record.as_fd());
    let (files, names) = parse_record(&recorded);
    let files: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| !log.known.contains(p))
        .collect();
    let names: Vec<PathBuf> = names
        .into_iter()
        .filter(|p| !log.names.contains(p))
        .collect();
    if files.is_empty() && names.is_empty() {
        return;
    }
    let dir = log.dir.as_fd();
    let mut list: Loads = openat_read(dir, &log.name)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let added = merge(&mut list.files, files) + merge(&mut list.names, names);
    if added == 0 {
        return;
    }
    let Ok(json) = serde_json::to_vec(&list) else {
        return;
    };
    // Written whole under a name of this process's own, then renamed over the list: a reader,
    // on this node or another sharing the folder, sees the old list or the new one. Two nodes
    // ending jobs at once may each rename theirs: one's additions are then lost, and recorded
    // again by its next job. A file of this name can only be left by a killed process that had
    // this pid before.
    let tmp = crate::mount::temporary_name(&log.name);
    let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    if openat_write(dir, &tmp, &json).is_err()
        || nix::fcntl::renameat2(
            dir,
            tmp.as_str(),
            dir,
            log.name.as_str(),
            RenameFlags::empty(),
        )
        .is_err()
    {
        let _ = nix::unistd::unlinkat(dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return;
    }
    tracing::debug!(
        "library cache: {added} files loaded or names looked up through the mount listed for the next job"
    );
}

/// The ELF files (`e` lines) and names (`n` lines) of a server's record.
fn parse_record(recorded: &[u8]) -> (BTreeSet<PathBuf>, BTreeSet<PathBuf>) {
    use std::os::unix::ffi::OsStrExt;
    let (mut files, mut names) = (BTreeSet::new(), BTreeSet::new());
    for line in recorded.split(|&b| b == b'\n') {
        let Some((&kind, path)) = line.split_first() else {
            continue;
        };
        if path.first() != Some(&b'/') {
            continue;
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
        match kind {
            b'e' => files.insert(path),
            b'n' => names.insert(path),
            _ => false,
        };
    }
    (files, names)
}

/// Adds `new` to `list` (sorted, at most [`MAX_LOADS`]); returns how many were added.
fn merge(list: &mut Vec<PathBuf>, new: Vec<PathBuf>) -> usize {
    let mut all: BTreeSet<PathBuf> = std::mem::take(list).into_iter().collect();
    let had = all.len();
    for p in new {
        if all.len() >= MAX_LOADS {
            break;
        }
        all.insert(p);
    }
    let added = all.len() - had;
    *list = all.into_iter().collect();
    added
}

/// Everything in the file at `fd` (from its start), up to 1 MiB.
fn read_all(fd: BorrowedFd<'_>) -> Vec<u8> {
    let mut out = vec![0u8; 1 << 20];
    let mut len = 0;
    while len < out.len() {
        match nix::sys::uio::pread(fd, &mut out[len..], len as i64) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    out.truncate(len);
    out
}

fn openat_read(dir: BorrowedFd<'_>, name: &str) -> Option<Vec<u8>> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let fd = nix::fcntl::openat(dir, name, flags, Mode::empty()).ok()?;
    Some(read_all(fd.as_fd()))
}

fn openat_write(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let fd = nix::fcntl::openat(dir, name, flags, Mode::from_bits_truncate(0o644))?;
    std::fs::File::from(fd).write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_gives_its_elf_files_and_names_and_skips_what_is_not_a_line_of_either() {
        let (files, names) = parse_record(
            b"e/usr/bin/hello\nn/etc/ld.so.cache\ne/usr/bin/hello\nx/what\neno-slash\n\nn/tmp\ne/lib/ld.so",
        );
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            [PathBuf::from("/lib/ld.so"), PathBuf::from("/usr/bin/hello")]
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [PathBuf::from("/etc/ld.so.cache"), PathBuf::from("/tmp")]
        );
    }

    #[test]
    fn merged_lists_stay_sorted_without_duplicates_and_within_their_limit() {
        let mut list = vec![PathBuf::from("/b")];
        assert_eq!(merge(&mut list, vec!["/a".into(), "/b".into()]), 1);
        assert_eq!(list, [PathBuf::from("/a"), PathBuf::from("/b")]);
        let mut full: Vec<PathBuf> = (0..MAX_LOADS).map(|i| format!("/f{i}").into()).collect();
        assert_eq!(merge(&mut full, vec!["/new".into()]), 0);
        assert_eq!(full.len(), MAX_LOADS);
    }

    #[test]
    fn a_job_adds_what_the_cache_lacks_to_the_list_under_a_temporary_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let known: BTreeSet<PathBuf> = [PathBuf::from("/usr/lib/libmpi.so.12")].into();
        let names: BTreeSet<PathBuf> = [PathBuf::from("/etc/ld.so.cache")].into();
        let log = loads_log(dir.path(), "k", known, names).unwrap();
        let record = b"e/usr/bin/hello\ne/usr/lib/libmpi.so.12\nn/etc/ld.so.cache\nn/usr/lib/x";
        nix::unistd::write(&log.record, record).unwrap();
        // Left by a killed process that had this pid before: it does not stop the write.
        let ours = crate::mount::temporary_name("k.loads");
        assert!(ours.starts_with("k.loads.tmp-"), "{ours}");
        std::fs::write(dir.path().join(&ours), b"half").unwrap();
        // Another node's list being written (same pid there): left alone.
        let theirs = format!("k.loads.tmp-another-node.{}", std::process::id());
        std::fs::write(dir.path().join(&theirs), b"half").unwrap();
        remember_loads(&log);
        assert_eq!(
            read_loads(dir.path(), "k"),
            Loads {
                files: vec!["/usr/bin/hello".into()],
                names: vec!["/usr/lib/x".into()],
            }
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["k.loads".to_owned(), theirs]);
    }

    #[test]
    fn a_list_that_cannot_be_read_is_empty_and_relative_paths_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_loads(dir.path(), "k"), Loads::default());
        std::fs::write(dir.path().join("k.loads"), b"[\"an older list\"]").unwrap();
        assert_eq!(read_loads(dir.path(), "k"), Loads::default());
        std::fs::write(
            dir.path().join("k.loads"),
            br#"{"files": ["/usr/bin/hello", "rel"], "names": ["/etc", "etc"]}"#,
        )
        .unwrap();
        assert_eq!(
            read_loads(dir.path(), "k"),
            Loads {
                files: vec!["/usr/bin/hello".into()],
                names: vec!["/etc".into()],
            }
        );
    }
}
