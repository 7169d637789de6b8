//! The dynamic loader's search rules, applied to this host's files.
//!
//! For a `DT_NEEDED` name without a slash, glibc's loader searches, in order: the `DT_RPATH` of
//! the object that needs it (only when that object has no `DT_RUNPATH`), `LD_LIBRARY_PATH`, the
//! object's `DT_RUNPATH`, `/etc/ld.so.cache`, then the default directories. `$ORIGIN` is the
//! directory the needing object was found in (as found, symlinks not resolved).
//!
//! The `ld.so.cache` is approximated by the directories of `ld.so.conf`; its parser
//! ([`ld_so_conf_dirs_in`]) reads files through [`ConfFiles`], so the same code reads the host's
//! configuration ([`HostFiles`], [`ld_so_conf_dirs`]) and an image's, read without mounting it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::elf::{ElfFacts, ElfKind};

/// The sonames of glibc's own libraries. They belong to whichever glibc a process runs with, so
/// they are never injected into a container and a dependency closure stops at them.
pub const GLIBC_LIBRARIES: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libresolv.so.2",
    "libutil.so.1",
    "libanl.so.1",
    "libBrokenLocale.so.1",
    "libnsl.so.1",
    "libmvec.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "ld-linux.so.2",
    "ld64.so.2",
    "ld64.so.1",
    "ld-linux-riscv64-lp64d.so.1",
];

/// Whether `soname` is one of glibc's own libraries (see [`GLIBC_LIBRARIES`]).
pub fn is_glibc_library(soname: &str) -> bool {
    GLIBC_LIBRARIES.contains(&soname) || soname.starts_with("ld-linux")
}

/// Which step of the loader's search found a library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The `DT_NEEDED` entry was itself a path.
    Path,
    /// `DT_RPATH` of the loading object. `LD_LIBRARY_PATH` cannot override it.
    Rpath,
    /// `LD_LIBRARY_PATH`.
    LdLibraryPath,
    /// `DT_RUNPATH` of the loading object.
    Runpath,
    /// `ld.so.cache` (approximated by the directories of `/etc/ld.so.conf`).
    LdSoCache,
    /// The loader's default directories.
    DefaultDirs,
    /// Not a loader search: found by scanning install prefixes or component directories, or
    /// given by the caller.
    Scan,
}

/// The loader's built-in directories, multiarch first as Debian's loader has them, then the
/// lib64 directories of RPM distributions.
pub fn default_dirs() -> Vec<String> {
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    vec![
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib64".to_owned(),
        "/usr/lib64".to_owned(),
        "/lib".to_owned(),
        "/usr/lib".to_owned(),
    ]
}

/// The `glibc-hwcaps` subdirectories that glibc 2.33 and later search inside every search
/// directory before the directory itself, best first, for this machine's CPU (x86-64 levels;
/// none elsewhere, where cmpirun does not model them).
pub fn glibc_hwcaps_subdirs() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let v2 = has!("cmpxchg16b")
            && has!("popcnt")
            && has!("sse3")
            && has!("sse4.1")
            && has!("sse4.2")
            && has!("ssse3");
        let v3 = v2
            && has!("avx")
            && has!("avx2")
            && has!("bmi1")
            && has!("bmi2")
            && has!("f16c")
            && has!("fma")
            && has!("lzcnt")
            && has!("movbe")
            && has!("xsave");
        let v4 = v3
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl");
        [(v4, "x86-64-v4"), (v3, "x86-64-v3"), (v2, "x86-64-v2")]
            .into_iter()
            .filter(|(ok, _)| *ok)
            .map(|(_, name)| name.to_owned())
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The files the loader tries for `name` in `dir`, in order: the `glibc-hwcaps` subdirectories
/// (`hwcaps`, from [`glibc_hwcaps_subdirs`] when the glibc is 2.33 or later), then `dir` itself.
pub fn candidates_in(dir: &str, name: &str, hwcaps: &[String]) -> Vec<String> {
    let dir = dir.trim_end_matches('/');
    let mut paths: Vec<String> = hwcaps
        .iter()
        .map(|sub| format!("{dir}/glibc-hwcaps/{sub}/{name}"))
        .collect();
    paths.push(format!("{dir}/{name}"));
    paths
}

/// Whether a glibc of this release searches `glibc-hwcaps` subdirectories (2.33 and later).
pub fn searches_glibc_hwcaps(glibc: &crate::elf::SymbolVersion) -> bool {
    glibc.family == "GLIBC" && glibc.numbers.as_slice() >= [2, 33].as_slice()
}

/// Replaces `$ORIGIN` and `${ORIGIN}` in a search directory.
pub fn expand_origin(dir: &str, origin: &str) -> String {
    dir.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
}

/// The search directories of one request, in the loader's order, each with its step: `rpath`
/// and `runpath` are the needing object's, `ld_library_path` and `cache_dirs` the process's.
pub fn search_order(
    requester: Option<&ElfFacts>,
    ld_library_path: &[String],
    cache_dirs: &[String],
) -> Vec<(Via, String)> {
    let mut order = Vec::new();
    if let Some(r) = requester
        && r.runpath.is_empty()
    {
        order.extend(r.rpath.iter().map(|d| (Via::Rpath, d.clone())));
    }
    order.extend(
        ld_library_path
            .iter()
            .map(|d| (Via::LdLibraryPath, d.clone())),
    );
    if let Some(r) = requester {
        order.extend(r.runpath.iter().map(|d| (Via::Runpath, d.clone())));
    }
    order.extend(cache_dirs.iter().map(|d| (Via::LdSoCache, d.clone())));
    order.extend(default_dirs().into_iter().map(|d| (Via::DefaultDirs, d)));
    order
}

/// Where the host's loader looks, besides each object's own RPATH/RUNPATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoader {
    /// `LD_LIBRARY_PATH` directories.
    pub ld_library_path: Vec<String>,
    /// The directories `/etc/ld.so.cache` covers; empty without a cache.
    pub cache_dirs: Vec<String>,
    /// The `glibc-hwcaps` subdirectories searched in every directory; empty for a glibc older
    /// than 2.33.
    pub hwcaps: Vec<String>,
}

/// A library the host loader would load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The path as found (its directory is the library's `$ORIGIN`).
    pub path: PathBuf,
    /// The search step that found it.
    pub via: Via,
}

impl HostLoader {
    /// The loader as this process sees it: its `LD_LIBRARY_PATH`, and the directories of
    /// `/etc/ld.so.conf` when `/etc/ld.so.cache` exists.
    pub fn from_env() -> Self {
        let ld_library_path = std::env::var("LD_LIBRARY_PATH")
            .map(|v| {
                v.split(':')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let cache_dirs = if Path::new("/etc/ld.so.cache").is_file() {
            ld_so_conf_dirs(Path::new("/etc/ld.so.conf"))
        } else {
            Vec::new()
        };
        // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
        let release = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        let hwcaps =
            crate::elf::SymbolVersion::parse(&format!("GLIBC_{}", release.to_string_lossy()))
                .filter(searches_glibc_hwcaps)
                .map(|_| glibc_hwcaps_subdirs())
                .unwrap_or_default();
        Self {
            ld_library_path,
            cache_dirs,
            hwcaps,
        }
    }

    /// Finds `name` as the loader would when the object at `requester` (with its facts) needs
    /// it; `None` when the loader would fail. Files of another ELF class or machine than the
    /// requester (this host's kind without one) are skipped, as the loader does.
    pub fn find(&self, name: &str, requester: Option<(&Path, &ElfFacts)>) -> Option<Found> {
        let want = requester.map_or_else(ElfKind::host, |(_, f)| f.kind());
        let fits = |path: &Path| path.is_file() && ElfKind::of_file(path) == Some(want);
        let origin = requester
            .and_then(|(p, _)| p.parent())
            .unwrap_or(Path::new("/"))
            .to_string_lossy()
            .into_owned();
        if name.contains('/') {
            let path = Path::new(&origin).join(name);
            return fits(&path).then_some(Found {
                path,
                via: Via::Path,
            });
        }
        search_order(
            requester.map(|(_, f)| f),
            &self.ld_library_path,
            &self.cache_dirs,
        )
        .into_iter()
        .flat_map(|(via, dir)| {
            candidates_in(&expand_origin(&dir, &origin), name, &self.hwcaps)
                .into_iter()
                .map(move |path| (via, PathBuf::from(path)))
        })
        .find(|(_, path)| fits(path))
        .map(|(via, path)| Found { path, via })
    }
}

/// How the `ld.so.conf` reader gets at files: on the host ([`HostFiles`]), or inside an image
/// that is read without mounting it (the `cmpirun` crate's image facts).
pub trait ConfFiles {
    /// A read that failed and must stop the reading ([`std::convert::Infallible`] where an
    /// unreadable file counts as empty, as for ldconfig).
    type Error;
    /// `path` with every symlink resolved, when it names a regular file; `None` otherwise.
    fn regular_file(&self, path: &str) -> Result<Option<String>, Self::Error>;
    /// The text of the regular file `real` (as [`ConfFiles::regular_file`] returned it);
    /// `None` to pass over it.
    fn read_text(&self, real: &str) -> Result<Option<String>, Self::Error>;
    /// The names of the entries of the directory `dir`, sorted; empty when it is not a
    /// directory.
    fn dir_entries(&self, dir: &str) -> Result<Vec<String>, Self::Error>;
}

/// The host's own files: symlinks resolved by the host, unreadable files counted as empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFiles;

impl ConfFiles for HostFiles {
    type Error = std::convert::Infallible;

    fn regular_file(&self, path: &str) -> Result<Option<String>, Self::Error> {
        Ok(std::fs::canonicalize(path)
            .ok()
            .filter(|real| real.is_file())
            .map(|real| real.to_string_lossy().into_owned()))
    }

    fn read_text(&self, real: &str) -> Result<Option<String>, Self::Error> {
        Ok(std::fs::read_to_string(real).ok())
    }

    fn dir_entries(&self, dir: &str) -> Result<Vec<String>, Self::Error> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// The directories of an `ld.so.conf` file on the host, following `include` lines (with `*`
/// wildcards in their last component). Unreadable files count as empty, as for ldconfig.
pub fn ld_so_conf_dirs(conf: &Path) -> Vec<String> {
    match ld_so_conf_dirs_in(&HostFiles, &conf.to_string_lossy()) {
        Ok(dirs) => dirs,
        Err(never) => match never {},
    }
}

/// The directories of the `ld.so.conf` file `conf` as `files` sees it, in order and without
/// repeats, following `include` lines (relative to the including file's directory, with `*`
/// wildcards in their last component, as Debian's `include /etc/ld.so.conf.d/*.conf`). A file
/// included twice (or including itself) is read once.
pub fn ld_so_conf_dirs_in<F: ConfFiles + ?Sized>(
    files: &F,
    conf: &str,
) -> Result<Vec<String>, F::Error> {
    let mut dirs = Vec::new();
    let mut visited = BTreeSet::new();
    read_conf(files, conf, &mut dirs, &mut visited)?;
    Ok(dirs)
}

fn read_conf<F: ConfFiles + ?Sized>(
    files: &F,
    path: &str,
    dirs: &mut Vec<String>,
    visited: &mut BTreeSet<String>,
) -> Result<(), F::Error> {
    let Some(real) = files.regular_file(path)? else {
        return Ok(());
    };
    if !visited.insert(real.clone()) {
        return Ok(());
    }
    let Some(text) = files.read_text(&real)? else {
        return Ok(());
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            let pattern = pattern.trim();
            if pattern.is_empty() {
                continue;
            }
            let pattern = if pattern.starts_with('/') {
                pattern.to_owned()
            } else {
                join(parent(&real), pattern)
            };
            for file in glob_files(files, &pattern)? {
                read_conf(files, &file, dirs, visited)?;
            }
        } else if line.starts_with('/') {
            // Old syntax allowed "dir=type" and lists separated by spaces or commas.
            for d in line.split([' ', '\t', ',', ':']) {
                let d = d.split('=').next().unwrap_or("");
                if d.starts_with('/') && !dirs.iter().any(|x| x == d) {
                    dirs.push(d.to_owned());
                }
            }
        }
    }
    Ok(())
}

/// The files matching `pattern`, whose last component may hold `*` wildcards, sorted.
fn glob_files<F: ConfFiles + ?Sized>(files: &F, pattern: &str) -> Result<Vec<String>, F::Error> {
    let dir = parent(pattern);
    let name = pattern.rsplit('/').next().unwrap_or(pattern);
    if !name.contains('*') {
        return Ok(vec![pattern.to_owned()]);
    }
    Ok(files
        .dir_entries(dir)?
        .into_iter()
        .filter(|n| wildcard_match(name, n))
        .map(|n| join(dir, &n))
        .collect())
}

/// The directory part of an absolute path (`/` for a top-level name).
fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Shell-style matching of `*` (any run of characters) against a file name.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && wildcard_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpath_only_without_runpath() {
        let mut facts =
            ElfFacts::parse(&std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap()).unwrap();
        facts.rpath = vec!["/r".into()];
        let order = search_order(Some(&facts), &["/l".into()], &["/c".into()]);
        assert_eq!(order[0], (Via::Rpath, "/r".into()));
        assert_eq!(order[1], (Via::LdLibraryPath, "/l".into()));
        assert_eq!(order[2], (Via::LdSoCache, "/c".into()));
        facts.runpath = vec!["/u".into()];
        let order = search_order(Some(&facts), &["/l".into()], &[]);
        assert_eq!(order[0], (Via::LdLibraryPath, "/l".into()));
        assert_eq!(order[1], (Via::Runpath, "/u".into()));
        assert_eq!(order[2].0, Via::DefaultDirs);
    }

    #[test]
    fn host_ld_so_conf() {
        let dirs = ld_so_conf_dirs(Path::new("/etc/ld.so.conf"));
        assert!(
            dirs.iter().any(|d| d == "/usr/lib/x86_64-linux-gnu"),
            "{dirs:?}"
        );
    }

    #[test]
    fn host_finds_libfabric_in_the_cache_dirs() {
        let loader = HostLoader {
            ld_library_path: vec![],
            cache_dirs: ld_so_conf_dirs(Path::new("/etc/ld.so.conf")),
            hwcaps: vec![],
        };
        let found = loader.find("libfabric.so.1", None).unwrap();
        assert_eq!(found.via, Via::LdSoCache);
        assert!(found.path.ends_with("x86_64-linux-gnu/libfabric.so.1"));
        assert_eq!(loader.find("libnonexistent.so.7", None), None);
    }

    #[test]
    fn hwcaps_candidates_come_first() {
        let hw = vec!["x86-64-v3".to_owned(), "x86-64-v2".to_owned()];
        assert_eq!(
            candidates_in("/usr/lib/", "libx.so.1", &hw),
            [
                "/usr/lib/glibc-hwcaps/x86-64-v3/libx.so.1",
                "/usr/lib/glibc-hwcaps/x86-64-v2/libx.so.1",
                "/usr/lib/libx.so.1"
            ]
        );
        let v = |s| crate::elf::SymbolVersion::parse(s).unwrap();
        assert!(searches_glibc_hwcaps(&v("GLIBC_2.33")));
        assert!(searches_glibc_hwcaps(&v("GLIBC_2.36")));
        assert!(!searches_glibc_hwcaps(&v("GLIBC_2.28")));
        // Every x86-64 machine this runs on is at least v2.
        assert!(glibc_hwcaps_subdirs().iter().any(|s| s == "x86-64-v2"));
        assert!(!HostLoader::from_env().hwcaps.is_empty());
    }

    #[test]
    fn ld_so_conf_includes_globs_repeats_and_loops() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        std::fs::create_dir(root.path().join("conf.d")).unwrap();
        std::fs::write(
            root.path().join("ld.so.conf"),
            format!("# comment\n/first /second=libc5,/first\ninclude conf.d/*.conf\ninclude {r}/ld.so.conf\n"),
        )
        .unwrap();
        std::fs::write(root.path().join("conf.d/b.conf"), "/b\n").unwrap();
        std::fs::write(
            root.path().join("conf.d/a.conf"),
            "/a # why\ninclude ../ld.so.conf\n",
        )
        .unwrap();
        std::fs::write(root.path().join("conf.d/c.txt"), "/not-read\n").unwrap();
        let dirs = ld_so_conf_dirs(&root.path().join("ld.so.conf"));
        assert_eq!(dirs, ["/first", "/second", "/a", "/b"]);
        assert!(ld_so_conf_dirs(&root.path().join("missing.conf")).is_empty());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.conf", "libc.conf"));
        assert!(!wildcard_match("*.conf", "libc.txt"));
        assert!(wildcard_match("a*b*c", "aXbYc"));
    }
}
