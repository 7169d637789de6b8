//! The facts cache: the image facts of earlier launches, kept in the user's cache folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image::ImageSummary;

/// The version of the facts cache's file format and of what [`ImageSummary::read`] computes:
/// raise it when either changes, so that older entries are not used.
const FACTS_CACHE_FORMAT: u32 = 4;

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
    store: JsonStore,
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

impl FactsCache {
    /// A cache kept in `dir` (created when the first entry is written).
    pub fn new(dir: &Path) -> FactsCache {
        FactsCache {
            store: JsonStore::new(dir, "image facts cache"),
        }
    }

    /// The user's cache: `$XDG_CACHE_HOME/cmpirun/facts`, else `$HOME/.cache/cmpirun/facts` (next
    /// to the extract backend's `extract`); `None` when neither variable is set.
    pub fn from_env() -> Option<FactsCache> {
        Some(FactsCache::new(&user_cache_dir("facts")?))
    }

    /// The folder the entries are in.
    pub fn dir(&self) -> &Path {
        &self.store.dir
    }

    /// What the facts of the image at `path` depend on, as it is now; `None` for an image that
    /// is not cached (a directory, or one that cannot be located or examined).
    pub fn key(path: &Path) -> Option<FactsCacheKey> {
        let loc = crate::image::locate(path).ok()?;
        if loc.kind == crate::image::ImageKind::Directory {
            return None;
        }
        let file = FileIdentity::of(&std::fs::metadata(&loc.path).ok()?);
        let exe = ExeIdentity::current()?;
        Some(FactsCacheKey {
            format: FACTS_CACHE_FORMAT,
            cmpirun: exe.version,
            exe_size: exe.size,
            exe_mtime_ns: exe.mtime_ns,
            dev: file.dev,
            ino: file.ino,
            size: file.size,
            mtime_ns: file.mtime_ns,
            ctime_ns: file.ctime_ns,
            squashfs_offset: loc.squashfs_offset,
            squashfs_size: loc.squashfs_size,
            hwcaps: cmpirun_fabric::loader::glibc_hwcaps_subdirs(),
        })
    }

    /// The file of the entry for `key`.
    pub fn entry_path(&self, key: &FactsCacheKey) -> PathBuf {
        self.store.entry_path(key)
    }

    /// The cached facts of the image at `path` (given as `path`), if an entry for `key` is there
    /// and readable.
    pub fn load(&self, path: &Path, key: &FactsCacheKey) -> Option<ImageSummary> {
        let info: ImageSummary = self.store.load(key)?;
        tracing::debug!(
            "image facts of {} from {}",
            path.display(),
            self.entry_path(key).display()
        );
        Some(ImageSummary {
            path: path.to_owned(),
            ..info
        })
    }

    /// Keeps `info`, read while the image was as `key` says. Facts that could not be read are
    /// not kept (the error may be passing). Failures are logged at debug level only.
    pub fn store(&self, key: &FactsCacheKey, info: &ImageSummary) {
        if info.error.is_some() || info.facts_error.is_some() {
            return;
        }
        self.store.store(
            key,
            &ImageSummary {
                path: PathBuf::new(),
                ..info.clone()
            },
        );
    }
}

/// `$XDG_CACHE_HOME/cmpirun/NAME`, else `$HOME/.cache/cmpirun/NAME` (beside the extract and
/// library caches); `None` when neither variable is set.
pub(crate) fn user_cache_dir(name: &str) -> Option<PathBuf> {
    Some(crate::mount::user_cache_in(crate::mount::env_var)?.join(name))
}

/// What identifies a file's contents without reading them: any write changes its change time,
/// which no user can set back (a new file at the path has another inode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// This cmpirun: its version, and the size and modification time of its executable, so that
/// another build (which may read or check images differently) does not use what this one kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExeIdentity {
    pub version: String,
    pub size: u64,
    pub mtime_ns: i128,
}

impl ExeIdentity {
    pub fn current() -> Option<ExeIdentity> {
        use std::os::unix::fs::MetadataExt;
        let exe = std::env::current_exe().and_then(std::fs::metadata).ok()?;
        Some(ExeIdentity {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            size: exe.len(),
            mtime_ns: ns(exe.mtime(), exe.mtime_nsec()),
        })
    }
}

fn ns(s: i64, n: i64) -> i128 {
    i128::from(s) * 1_000_000_000 + i128::from(n)
}

/// One small JSON file per key in a folder of the user's cache (the facts cache, the cache of
/// verified images): named by a hash of the key, holding the key and the value, and used only
/// when the key it holds is the one asked for. Reading or writing never fails a launch: an
/// unreadable, corrupt or mismatched entry is no entry, and a folder that cannot be written to
/// (a read-only home) only means nothing is kept.
#[derive(Debug, Clone)]
pub(crate) struct JsonStore {
    dir: PathBuf,
    /// What the store is, for log lines.
    what: &'static str,
}

#[derive(Serialize, Deserialize)]
struct StoreEntry<K, V> {
    key: K,
    value: V,
}

impl JsonStore {
    pub fn new(dir: &Path, what: &'static str) -> JsonStore {
        JsonStore {
            dir: dir.to_owned(),
            what,
        }
    }

    /// The file of the entry for `key`.
    pub fn entry_path<K: Serialize>(&self, key: &K) -> PathBuf {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        // The keys' JSON cannot fail to serialise (plain numbers and strings).
        h.update(serde_json::to_string(key).unwrap_or_default().as_bytes());
        self.dir.join(format!("{:032x}.json", h.digest128()))
    }

    /// The value kept for `key`, if its entry is there, readable and for that key.
    pub fn load<K, V>(&self, key: &K) -> Option<V>
    where
        K: Serialize + serde::de::DeserializeOwned + PartialEq,
        V: serde::de::DeserializeOwned,
    {
        let file = self.entry_path(key);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!("{} {}: {e}", self.what, file.display());
                }
                return None;
            }
        };
        match serde_json::from_slice::<StoreEntry<K, V>>(&bytes) {
            Ok(entry) if entry.key == *key => Some(entry.value),
            Ok(_) => {
                tracing::debug!("{} {}: for another key", self.what, file.display());
                None
            }
            Err(e) => {
                tracing::debug!("{} {}: unreadable ({e})", self.what, file.display());
                None
            }
        }
    }

    /// Keeps `value` for `key`. Failures are logged at debug level only.
    pub fn store<K: Serialize, V: Serialize>(&self, key: &K, value: &V) {
        let file = self.entry_path(key);
        if let Err(e) = self.write(&file, &StoreEntry { key, value }) {
            tracing::debug!("{} {}: not written: {e}", self.what, file.display());
        }
    }

    fn write<E: Serialize>(&self, file: &Path, entry: &E) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let json = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        // Written whole to a temporary file and renamed, so a reader never sees half an entry.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&json)?;
        tmp.persist(file).map_err(|e| e.error)?;
        self.prune();
        Ok(())
    }

    /// Keeps the folder small: every new cmpirun build and every changed image makes a new
    /// entry, so past [`STORE_MAX`] entries the least recently written half goes.
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= STORE_MAX {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - STORE_MAX / 2] {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!("{} {}: not removed: {e}", self.what, path.display());
            }
        }
    }
}

/// How many entries a [`JsonStore`] holds before the older ones are removed.
const STORE_MAX: usize = 256;
