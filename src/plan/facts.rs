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
    /// The host libfabric as probed (`fi_version`, providers), when the probe ran.
    pub libfabric: Option<HostLibfabric>,
}

/// The host libfabric as the fabric probe saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLibfabric {
    /// The library file.
    pub path: PathBuf,
    /// `fi_version()` as `major.minor`.
    pub version: String,
    /// Providers that answered `fi_getinfo` on this node.
    pub providers: Vec<String>,
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
    /// The MPI family its program links (`mpich`, `openmpi`, `mpi-abi`), once image facts
    /// are read.
    pub mpi_family: Option<String>,
    /// The path inside the image of the `libfabric.so.1` its MPI loads, once image facts are
    /// read.
    pub libfabric: Option<PathBuf>,
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
        HostFacts {
            hostname,
            cpus,
            env,
            programs,
            paths,
            cmpirun,
            libfabric: None,
        }
    }
}

impl ImageInfo {
    /// Locates the image at `path` (without mounting it).
    pub fn gather(path: &Path) -> ImageInfo {
        match crate::image::locate(path) {
            Ok(loc) => ImageInfo {
                path: path.to_owned(),
                kind: serde_json::to_value(loc.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned)),
                ..ImageInfo::default()
            },
            Err(e) => ImageInfo {
                path: path.to_owned(),
                error: Some(e.to_string()),
                ..ImageInfo::default()
            },
        }
    }
}

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
