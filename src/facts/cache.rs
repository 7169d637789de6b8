//! The facts cache: the image facts of earlier launches, kept in the user's cache folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image::ImageSummary;

/// The version of the facts cache's file format and of what [`ImageSummary::read`] computes:
/// raise it when either changes, so that older entries are not used.
const FACTS_CACHE_FORMAT: u32 = 3;

/// The image facts of earlier launches, one small JSON file per image in the user's cache
/// folder, so that a launch of an image already seen reads no library out of it.
///
/// An entry is used only when everything the facts depend on is unchanged: the image file's
/// device, inode, size, modification and change times, the offset and size of its squashfs, the
/// cmpirun executable (its version and the size and modification time of its file), this
/// machine's `glibc-hwcaps` levels, and the format version. Unpacked directories are never cached
/// (a file deep in the tree can change without the directory's own times changing). Reading or
/// writing the cache never fails a launch: an unreadable, corrupt or mismatched entry is read
/// afresh and rewritten, and a folder that cannot be written to (a read-only home) only means no
/// entry is kept.
#[derive(Debug, Clone)]
pub struct FactsCache {
    dir: PathBuf,
}

/// What an entry of the [`FactsCache`] is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactsCacheKey {
    format: u32,
    cmpirun: String,
    exe_size: u64,
    exe_mtime_ns: i128,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    squashfs_offset: u64,
    squashfs_size: u64,
    hwcaps: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct FactsCacheEntry {
    key: FactsCacheKey,
    info: ImageSummary,
}

impl FactsCache {
    /// A cache kept in `dir` (created when the first entry is written).
    pub fn new(dir: &Path) -> FactsCache {
        FactsCache {
            dir: dir.to_owned(),
        }
    }

    /// The user's cache: `$XDG_CACHE_HOME/cmpirun/facts`, else `$HOME/.cache/cmpirun/facts` (next
    /// to the extract backend's `extract`); `None` when neither variable is set.
    pub fn from_env() -> Option<FactsCache> {
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache")
            }
        };
        Some(FactsCache::new(&base.join("cmpirun").join("facts")))
    }

    /// The folder the entries are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the facts of the image at `path` depend on, as it is now; `None` for an image that
    /// is not cached (a directory, or one that cannot be located or examined).
    pub fn key(path: &Path) -> Option<FactsCacheKey> {
        use std::os::unix::fs::MetadataExt;
        let loc = crate::image::locate(path).ok()?;
        if loc.kind == crate::image::ImageKind::Directory {
            return None;
        }
        let meta = std::fs::metadata(&loc.path).ok()?;
        let exe = std::env::current_exe().and_then(std::fs::metadata).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(FactsCacheKey {
            format: FACTS_CACHE_FORMAT,
            cmpirun: env!("CARGO_PKG_VERSION").to_owned(),
            exe_size: exe.len(),
            exe_mtime_ns: ns(exe.mtime(), exe.mtime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            squashfs_offset: loc.squashfs_offset,
            squashfs_size: loc.squashfs_size,
            hwcaps: cmpirun_fabric::loader::glibc_hwcaps_subdirs(),
        })
    }

    /// The file of the entry for `key`.
    pub fn entry_path(&self, key: &FactsCacheKey) -> PathBuf {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        // The key's JSON cannot fail to serialise (plain numbers and strings).
        h.update(serde_json::to_string(key).unwrap_or_default().as_bytes());
        self.dir.join(format!("{:032x}.json", h.digest128()))
    }

    /// The cached facts of the image at `path` (given as `path`), if an entry for `key` is there
    /// and readable.
    pub fn load(&self, path: &Path, key: &FactsCacheKey) -> Option<ImageSummary> {
        let file = self.entry_path(key);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!("image facts cache {}: {e}", file.display());
                }
                return None;
            }
        };
        match serde_json::from_slice::<FactsCacheEntry>(&bytes) {
            Ok(entry) if entry.key == *key => {
                tracing::debug!("image facts of {} from {}", path.display(), file.display());
                Some(ImageSummary {
                    path: path.to_owned(),
                    ..entry.info
                })
            }
            Ok(_) => {
                tracing::debug!("image facts cache {}: for another image", file.display());
                None
            }
            Err(e) => {
                tracing::debug!("image facts cache {}: unreadable ({e})", file.display());
                None
            }
        }
    }

    /// Keeps `info`, read while the image was as `key` says. Facts that could not be read are
    /// not kept (the error may be passing). Failures are logged at debug level only.
    pub fn store(&self, key: &FactsCacheKey, info: &ImageSummary) {
        if info.error.is_some() || info.facts_error.is_some() {
            return;
        }
        let file = self.entry_path(key);
        if let Err(e) = self.write(&file, key, info) {
            tracing::debug!("image facts cache {}: not written: {e}", file.display());
        }
    }

    fn write(&self, file: &Path, key: &FactsCacheKey, info: &ImageSummary) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let entry = FactsCacheEntry {
            key: key.clone(),
            info: ImageSummary {
                path: PathBuf::new(),
                ..info.clone()
            },
        };
        let json = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        // Written whole to a temporary file and renamed, so a reader never sees half an entry.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&json)?;
        tmp.persist(file).map_err(|e| e.error)?;
        self.prune();
        Ok(())
    }

    /// Keeps the folder small: every new cmpirun build and every changed image makes a new
    /// entry, so past [`FACTS_CACHE_MAX`] entries the least recently written half goes.
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= FACTS_CACHE_MAX {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - FACTS_CACHE_MAX / 2] {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!("image facts cache {}: not removed: {e}", path.display());
            }
        }
    }
}

/// How many entries the facts cache holds before the older ones are removed.
const FACTS_CACHE_MAX: usize = 256;
