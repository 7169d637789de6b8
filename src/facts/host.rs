//! What the host offers a launch, gathered once at the edge: its name, CPUs, environment, the
//! launcher programs on `PATH`, which of the profile's and `--bind`'s host paths exist, and the
//! host libfabric the profile names as `cmpirun-fabric` reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::patterns::existing_host_paths;
use crate::jobspec::JobSpec;
use crate::profile::{HostPath, SiteProfile};

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
    /// The first host libpmix file of [`HostFacts::pmix_candidates`] that exists: what the
    /// local launcher's PMIx server loads. Its version is read when a check needs it
    /// ([`HostPmix::version`]).
    #[serde(default)]
    pub pmix: Option<HostPmix>,
    /// The host PMI libraries the profile injects (`pmi.inject: true`), read as ELF: their
    /// dependency closures and glibc needs, by the pattern of `pmi.host_libraries` they came
    /// from.
    #[serde(default)]
    pub pmi_libraries: BTreeMap<String, HostPmiLibrary>,
}

/// A host PMI library the profile injects, as its ELF files say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPmiLibrary {
    /// The file.
    pub path: PathBuf,
    /// The non-glibc libraries it needs, directly or not (libevent, hwloc, munge, …), where
    /// the host's loader finds them.
    pub dependencies: Vec<PathBuf>,
    /// Libraries it needs that the host's loader does not find (`name (needed by file)`).
    pub missing: Vec<String>,
    /// The newest `GLIBC_x.y` the library or its closure needs, and which file needs it.
    pub glibc_needs: Option<String>,
    /// The file that needs [`HostPmiLibrary::glibc_needs`].
    pub glibc_needed_by: Option<PathBuf>,
    /// For a libpmix, its OpenPMIx version.
    pub pmix_version: Option<String>,
    /// Why it could not be read, when it could not.
    pub error: Option<String>,
}

impl HostPmiLibrary {
    /// Reads the library at `path`: its dependency closure through the host's loader, its glibc
    /// needs, and for a libpmix its version. Never fails: what could not be read is in `error`.
    pub fn read(path: &Path) -> HostPmiLibrary {
        let mut lib = HostPmiLibrary {
            path: path.to_owned(),
            ..HostPmiLibrary::default()
        };
        let loader = cmpirun_fabric::loader::HostLoader::from_env();
        match cmpirun_fabric::closure::dependency_closure(&[path.to_owned()], &loader) {
            Ok(c) => {
                let root = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
                lib.dependencies = c
                    .libraries
                    .iter()
                    .filter(|l| l.real_path != root && l.path != path)
                    .map(|l| l.path.clone())
                    .collect();
                lib.missing = c
                    .missing
                    .iter()
                    .map(|m| format!("{} (needed by {})", m.name, m.needed_by.display()))
                    .collect();
                if let Some((by, v)) = c.newest_glibc_need() {
                    lib.glibc_needs = Some(v.to_string());
                    lib.glibc_needed_by = Some(by.path.clone());
                }
            }
            Err(e) => lib.error = Some(e.to_string()),
        }
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libpmix.so"))
        {
            lib.pmix_version = std::fs::read(path)
                .ok()
                .and_then(|b| cmpirun_pmi::pmix::version::version_in(&b));
        }
        lib
    }
}

/// The host libpmix the local launcher's PMIx server would load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPmix {
    /// The file.
    pub path: PathBuf,
    /// Its OpenPMIx version (`4.2.2rc2`), when known already; else [`HostPmix::version`] reads
    /// it from the file (2 MiB for Debian's: about 1.7 ms, which only a PMIx job pays).
    pub version: Option<String>,
}

impl HostPmix {
    /// Its OpenPMIx version, when the file holds one.
    pub fn version(&self) -> Option<String> {
        self.version.clone().or_else(|| {
            std::fs::read(&self.path)
                .ok()
                .and_then(|b| cmpirun_pmi::pmix::version::version_in(&b))
        })
    }
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

impl HostFacts {
    /// Gathers the facts of this host that `spec` and `profile` need.
    pub fn gather(spec: &JobSpec, profile: &SiteProfile) -> HostFacts {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let paths = path_patterns(spec, profile)
            .into_iter()
            .map(|p| {
                let found = existing_host_paths(&p, &env);
                (p, found)
            })
            .collect();
        let mut facts = HostFacts {
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            env,
            programs: launcher_programs(profile),
            paths,
            cmpirun: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cmpirun")),
            libfabric: None,
            libfabric_error: None,
            pmix: None,
            pmi_libraries: BTreeMap::new(),
        };
        if profile.pmi.inject == Some(true) && !spec.no_inject {
            for lib in &profile.pmi.host_libraries {
                if let Some(p) = facts.paths.get(lib.as_str()).and_then(|v| v.last()) {
                    let read = HostPmiLibrary::read(p);
                    facts.pmi_libraries.insert(lib.as_str().to_owned(), read);
                }
            }
        }
        facts.pmix = facts
            .pmix_candidates(profile)
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_absolute() && p.is_file())
            .map(|path| HostPmix {
                path,
                version: None,
            });
        if let Some(path) = facts.libfabric_named_by(profile).map(|(_, p)| p) {
            match read_libfabric(&path, spec, profile) {
                Ok(lf) => facts.libfabric = Some(lf),
                Err(e) => facts.libfabric_error = Some(e),
            }
        }
        facts
    }

    /// Where the local launcher's PMIx server loads the host's libpmix from, in order: the
    /// `libpmix.so*` files of the profile's `pmi.host_libraries`, else the usual system
    /// locations (`cmpirun_pmi::pmix::SYSTEM_LIBRARIES`).
    pub fn pmix_candidates(&self, profile: &SiteProfile) -> Vec<String> {
        let named: Vec<String> = profile
            .pmi
            .host_libraries
            .iter()
            .map(|h| {
                self.paths
                    .get(h.as_str())
                    .and_then(|v| v.last())
                    .map_or_else(|| h.as_str().to_owned(), |p| p.display().to_string())
            })
            .filter(|p| {
                std::path::Path::new(p)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libpmix.so"))
            })
            .collect();
        if named.is_empty() {
            cmpirun_pmi::pmix::SYSTEM_LIBRARIES
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        } else {
            named
        }
    }

    /// The host libfabric `profile` names on this host: the first `fabric.libfabric` candidate
    /// that names a file; within a glob, the highest version. The pattern it came from is
    /// returned with it.
    pub fn libfabric_named_by<'a>(
        &self,
        profile: &'a SiteProfile,
    ) -> Option<(&'a HostPath, PathBuf)> {
        profile.fabric.libfabric.iter().find_map(|c| {
            self.paths
                .get(c.as_str())
                .and_then(|v| v.last())
                .map(|p| (c, p.clone()))
        })
    }
}

/// The launcher programs on `PATH`: `srun`, and the profile's `mpiexec` (else
/// `mpiexec.hydra`).
fn launcher_programs(profile: &SiteProfile) -> BTreeMap<String, PathBuf> {
    let mut programs = BTreeMap::new();
    let mpiexec = profile
        .launcher
        .mpiexec
        .clone()
        .unwrap_or_else(|| "mpiexec.hydra".into());
    for name in ["srun", mpiexec.as_str()]
        .into_iter()
        .chain(crate::plan::MPIRUN_NAMES)
    {
        if let Ok(p) = which::which(name) {
            programs.insert(name.to_owned(), p);
        }
    }
    programs
}

/// Every host path pattern the plan may bind, as written: the profile's fabric and PMI
/// libraries, provider directory, devices and `binds:`, and `--bind`'s sources.
fn path_patterns(spec: &JobSpec, profile: &SiteProfile) -> Vec<String> {
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
    patterns
}

/// Reads the host libfabric at `path` (its versions, dependency closure, plugins), and probes
/// its providers when the launch expects some and injects it; `Err` says why it could not be
/// read.
fn read_libfabric(
    path: &Path,
    spec: &JobSpec,
    profile: &SiteProfile,
) -> Result<HostLibfabric, String> {
    // The library itself is only read, not loaded: loading it would start libfabric's
    // threads in this process, which must stay single-threaded to create user namespaces.
    let loader = cmpirun_fabric::loader::HostLoader::from_env();
    let expects = !profile.fabric.providers.is_empty() || spec.expect_provider.is_some();
    let injects = !spec.no_inject && profile.fabric.inject != Some(false);
    let mut h =
        cmpirun_fabric::host::HostFabric::inspect(path, &loader).map_err(|e| e.to_string())?;
    // Only the providers check needs the library loaded; that happens in a forked child so
    // this process never starts libfabric's threads.
    let probe_error = (expects && injects)
        .then(|| h.probe_in_child(PROBE_TIMEOUT).err())
        .flatten()
        .map(|e| e.to_string());
    let mut lf = HostLibfabric::from_fabric(&h);
    lf.probe_error = probe_error;
    Ok(lf)
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
