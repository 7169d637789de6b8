//! The facts the plan is built from, gathered at the edge so that [`super::build_plan`] stays
//! pure: what the host offers (name, CPUs, environment, launchers on `PATH`, which profile paths
//! exist) and what each image is.
//!
//! The richer facts (the host libfabric's version and providers from `cmpirun-fabric`, the
//! image's MPI family, glibc and libfabric location from `cmpirun::image::facts`) plug into
//! [`HostFacts::libfabric`] and [`ImageInfo`] as they become available; until then the checks
//! that need them are reported as skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::jobspec::JobSpec;
use crate::profile::SiteProfile;

/// What the host offers, as data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// This host's name.
    pub hostname: String,
    /// CPUs available to this process (the default rank count of a local job).
    pub cpus: u32,
    /// The environment of the cmpirun process.
    pub env: BTreeMap<String, String>,
    /// Launcher programs found on `PATH` (`srun`, `mpiexec.hydra`, or the profile's
    /// `mpiexec`), by the name they were looked up with.
    pub programs: BTreeMap<String, PathBuf>,
    /// For every host path pattern in the profile and in `--bind` (as written), the existing
    /// files it names after `$VAR` expansion, version-sorted. Missing key or empty list: none.
    pub paths: BTreeMap<String, Vec<PathBuf>>,
    /// The cmpirun executable, as ranks started by srun or hydra must call it.
    pub cmpirun: PathBuf,
    /// The host libfabric the profile names, when one was found and could be read.
    pub libfabric: Option<HostLibfabric>,
    /// Why the host libfabric could not be read, when it could not.
    pub libfabric_error: Option<String>,
}

/// The host libfabric the profile names, as `cmpirun-fabric` read it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLibfabric {
    /// The library file.
    pub path: PathBuf,
    /// The file it resolves to.
    pub real_path: PathBuf,
    /// `fi_version()` as `major.minor`, when the library was probed.
    pub version: Option<String>,
    /// Providers that answered `fi_getinfo` on this node, when the library was probed.
    pub providers: Option<Vec<String>>,
    /// The `FABRIC_x.y` versions it defines.
    pub fabric_versions: Vec<String>,
    /// The directories of its provider plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// The libraries it and its plugins need, without glibc's and without itself.
    pub dependencies: Vec<PathBuf>,
    /// The newest `GLIBC_x.y` it or a dependency needs.
    pub glibc_needs: Option<String>,
    /// The library that needs it.
    pub glibc_needed_by: Option<PathBuf>,
    /// Why the library could not be probed for its providers, when that was tried and failed.
    pub probe_error: Option<String>,
}

/// How an image's MPI gets at libfabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LibfabricUse {
    /// Loads `libfabric.so.1` dynamically: a host copy can be bound over it.
    Dynamic,
    /// The MPI library carries libfabric inside itself: nothing can be injected.
    Embedded,
    /// Needs `libfabric.so.1` but the image's loader would not find it.
    Unresolved,
    /// Does not use libfabric.
    NotLinked,
}

/// What the plan knows about one image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The image as given on the command line.
    pub path: PathBuf,
    /// Its form (`sif`, `squashfs`, `directory`) once located.
    pub kind: Option<String>,
    /// Why it could not be located, if it could not.
    pub error: Option<String>,
    /// The MPI family of the image's MPI library (`mpich`, `openmpi`, `mpi-abi`), once image
    /// facts are read.
    pub mpi_family: Option<String>,
    /// The image's MPI library (path inside the image).
    pub mpi_library: Option<String>,
    /// How that MPI gets at libfabric.
    pub libfabric_use: Option<LibfabricUse>,
    /// The path inside the image of the `libfabric.so.1` file its MPI loads (symlinks resolved):
    /// the file a host copy is bound over.
    pub libfabric: Option<PathBuf>,
    /// The `FABRIC_x.y` versions the image's MPI stack needs from libfabric.
    pub fabric_needs: Vec<String>,
    /// The image's glibc version (`GLIBC_2.36`) and its file.
    pub glibc: Option<String>,
    /// The file of the image's glibc.
    pub glibc_file: Option<String>,
    /// The PMI libraries the image's MPI links (`libpmi2.so.0`, `libpmix.so.2`, …).
    pub pmi_libraries: Vec<ImageLibrary>,
    /// Why the image's facts could not be read, when they could not.
    pub facts_error: Option<String>,
    /// The files of the image's C library and MPI stack (paths inside the image, symlinks
    /// resolved): what each node serves from its library cache (see `docs/containers.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_files: Vec<String>,
}

/// A library inside an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLibrary {
    /// The name it is needed as (`DT_NEEDED`).
    pub name: String,
    /// The file the loader finds, symlinks resolved inside the image.
    pub real_file: String,
}

impl HostFacts {
    /// Gathers the facts of this host that `spec` and `profile` need.
    pub fn gather(spec: &JobSpec, profile: &SiteProfile) -> HostFacts {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mut programs = BTreeMap::new();
        let mpiexec = profile
            .launcher
            .mpiexec
            .clone()
            .unwrap_or_else(|| "mpiexec.hydra".into());
        for name in ["srun", mpiexec.as_str()] {
            if let Ok(p) = which::which(name) {
                programs.insert(name.to_owned(), p);
            }
        }
        let mut patterns: Vec<String> = Vec::new();
        let f = &profile.fabric;
        patterns.extend(f.libfabric.iter().map(|p| p.as_str().to_owned()));
        patterns.extend(f.provider_dir.iter().map(|p| p.as_str().to_owned()));
        patterns.extend(f.devices.iter().map(|p| p.as_str().to_owned()));
        patterns.extend(f.libraries.iter().map(|p| p.as_str().to_owned()));
        patterns.extend(
            profile
                .pmi
                .host_libraries
                .iter()
                .map(|p| p.as_str().to_owned()),
        );
        patterns.extend(profile.binds.iter().map(|b| b.source.as_str().to_owned()));
        patterns.extend(spec.binds.iter().map(|b| b.source.display().to_string()));
        let mut paths = BTreeMap::new();
        for p in patterns {
            let found = expand_pattern(&p, &env);
            paths.insert(p, found);
        }
        let cmpirun = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cmpirun"));
        let mut facts = HostFacts {
            hostname,
            cpus,
            env,
            programs,
            paths,
            cmpirun,
            libfabric: None,
            libfabric_error: None,
        };
        // The library itself is only read, not loaded: loading it would start libfabric's
        // threads in this process, which must stay single-threaded to create user namespaces.
        if let Some(path) = super::chosen_libfabric(profile, &facts).map(|(_, p)| p) {
            let loader = cmpirun_fabric::loader::HostLoader::from_env();
            let expects = !profile.fabric.providers.is_empty() || spec.expect_provider.is_some();
            let injects = !spec.no_inject && profile.fabric.inject != Some(false);
            match cmpirun_fabric::host::HostFabric::inspect(&path, &loader) {
                Ok(mut h) => {
                    // Only the providers check needs the library loaded; that happens in a
                    // forked child so this process never starts libfabric's threads.
                    let probe_error = (expects && injects)
                        .then(|| h.probe_in_child(PROBE_TIMEOUT).err())
                        .flatten()
                        .map(|e| e.to_string());
                    let mut lf = HostLibfabric::from_fabric(&h);
                    lf.probe_error = probe_error;
                    facts.libfabric = Some(lf);
                }
                Err(e) => facts.libfabric_error = Some(e.to_string()),
            }
        }
        facts
    }
}

/// How long a libfabric probe may take (`fi_getinfo` asks every provider's hardware).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl HostLibfabric {
    /// Copies what the plan needs from `cmpirun-fabric`'s view of the library.
    pub fn from_fabric(h: &cmpirun_fabric::host::HostFabric) -> HostLibfabric {
        let roots: Vec<&Path> = std::iter::once(h.path.as_path())
            .chain(h.plugins.iter().map(|p| p.path.as_path()))
            .collect();
        let newest = h.closure.newest_glibc_need();
        HostLibfabric {
            path: h.path.clone(),
            real_path: h.real_path.clone(),
            version: h.api_version.as_ref().map(ToString::to_string),
            providers: h.providers.as_ref().map(|_| h.provider_names()),
            fabric_versions: h.fabric_versions.iter().map(ToString::to_string).collect(),
            plugin_dirs: h.plugin_dirs.clone(),
            dependencies: h
                .closure
                .libraries
                .iter()
                .filter(|l| !roots.contains(&l.path.as_path()))
                .map(|l| l.path.clone())
                .collect(),
            glibc_needs: newest.map(|(_, v)| v.to_string()),
            glibc_needed_by: newest.map(|(l, _)| l.path.clone()),
            probe_error: None,
        }
    }
}

impl ImageInfo {
    /// Locates the image at `path` (without mounting it).
    pub fn gather(path: &Path) -> ImageInfo {
        let loc = match crate::image::locate(path) {
            Ok(loc) => loc,
            Err(e) => {
                return ImageInfo {
                    path: path.to_owned(),
                    error: Some(e.to_string()),
                    ..ImageInfo::default()
                };
            }
        };
        let mut info = ImageInfo {
            path: path.to_owned(),
            kind: serde_json::to_value(loc.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
            ..ImageInfo::default()
        };
        let facts = crate::image::open_rootfs(&loc)
            .map_err(|e| e.to_string())
            .and_then(|fs| {
                crate::image::facts::image_facts(fs.as_ref()).map_err(|e| e.to_string())
            });
        match facts {
            Ok(f) => info.apply_facts(&f),
            Err(e) => info.facts_error = Some(e),
        }
        info
    }

    /// Copies what the plan needs from the image's facts.
    pub fn apply_facts(&mut self, f: &crate::image::facts::ImageFacts) {
        use crate::image::facts::LibfabricLink;
        if let Some(g) = &f.glibc {
            self.glibc = g.version.as_ref().map(ToString::to_string);
            self.glibc_file = Some(g.real_file.clone());
        }
        if let Some(m) = &f.mpi {
            self.mpi_family = Some(m.family.name().to_owned());
            self.mpi_library = Some(m.real_file.clone());
            self.libfabric_use = Some(match &m.libfabric {
                LibfabricLink::Dynamic(_) => LibfabricUse::Dynamic,
                LibfabricLink::Unresolved { .. } => LibfabricUse::Unresolved,
                LibfabricLink::Embedded => LibfabricUse::Embedded,
                LibfabricLink::NotLinked => LibfabricUse::NotLinked,
            });
            self.libfabric = f.libfabric_target().map(PathBuf::from);
            self.fabric_needs = m.fabric_needs.iter().map(ToString::to_string).collect();
            self.pmi_libraries = m
                .pmi_libraries
                .iter()
                .map(|l| ImageLibrary {
                    name: l.name.clone(),
                    real_file: l.real_file.clone(),
                })
                .collect();
        }
        let glibc = f.glibc.iter().map(|g| &g.real_file);
        let stack = f
            .mpi
            .iter()
            .flat_map(|m| m.stack.iter().map(|l| &l.real_file));
        self.stack_files.clear();
        for file in glibc.chain(stack) {
            if !self.stack_files.contains(file) {
                self.stack_files.push(file.clone());
            }
        }
    }
}

/// The version of the facts cache's file format and of what [`ImageInfo::gather`] computes:
/// raise it when either changes, so that older entries are not used.
const FACTS_CACHE_FORMAT: u32 = 2;

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
    info: ImageInfo,
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
    pub fn load(&self, path: &Path, key: &FactsCacheKey) -> Option<ImageInfo> {
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
                Some(ImageInfo {
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
    pub fn store(&self, key: &FactsCacheKey, info: &ImageInfo) {
        if info.error.is_some() || info.facts_error.is_some() {
            return;
        }
        let file = self.entry_path(key);
        if let Err(e) = self.write(&file, key, info) {
            tracing::debug!("image facts cache {}: not written: {e}", file.display());
        }
    }

    fn write(&self, file: &Path, key: &FactsCacheKey, info: &ImageInfo) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let entry = FactsCacheEntry {
            key: key.clone(),
            info: ImageInfo {
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

/// Expands `$VAR`/`${VAR}` from `env` and the glob in `pattern`; returns the existing paths,
/// sorted so that version numbers compare as numbers (`1.22.0` after `1.9.0`). An unset
/// variable makes the pattern name nothing.
pub fn expand_pattern(pattern: &str, env: &BTreeMap<String, String>) -> Vec<PathBuf> {
    let Some(expanded) = expand_vars(pattern, env) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = match glob::glob(&expanded) {
        Ok(paths) => paths
            .filter_map(Result::ok)
            .filter(|p| p.exists())
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort_by(|a, b| version_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    found
}

/// Replaces `$VAR` and `${VAR}`; `None` if a variable is unset or empty.
pub fn expand_vars(s: &str, env: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}')?;
            (&inner[..end], &inner[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = env.get(name).filter(|v| !v.is_empty())?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Some(out)
}

/// Compares strings with digit runs compared as numbers.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_and_versions() {
        let env: BTreeMap<String, String> = [("A".to_owned(), "/x".to_owned())].into();
        assert_eq!(expand_vars("$A/lib", &env).as_deref(), Some("/x/lib"));
        assert_eq!(expand_vars("${A}lib", &env).as_deref(), Some("/xlib"));
        assert_eq!(expand_vars("$B/lib", &env), None);
        assert_eq!(
            version_cmp("/opt/1.9.0/lib", "/opt/1.22.0/lib"),
            std::cmp::Ordering::Less
        );
    }
}
