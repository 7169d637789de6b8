//! Everything a launcher needs to know about one host libfabric, gathered in one value that can
//! be printed, serialised, and passed from a probing child process to its parent.
//!
//! [`HostFabric::inspect`] only reads files (ELF facts, provider plugins, dependency closure);
//! [`HostFabric::probe`] also loads the library to ask `fi_version()` and `fi_getinfo`.
//!
//! ```no_run
//! use cmpirun_fabric::elf::{SymbolVersion, missing_versions};
//! use cmpirun_fabric::host::HostFabric;
//! use cmpirun_fabric::loader::HostLoader;
//!
//! let host = HostFabric::inspect(
//!     "/usr/lib/x86_64-linux-gnu/libfabric.so.1".as_ref(),
//!     &HostLoader::from_env(),
//! )?;
//! let needed = [SymbolVersion::parse("FABRIC_1.9").unwrap()];
//! let missing = missing_versions(&needed, &host.fabric_versions);
//! assert_eq!(missing, needed); // Debian's 1.17 defines FABRIC_1.0 to 1.6
//! # Ok::<(), cmpirun_fabric::host::HostFabricError>(())
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::closure::{Closure, dependency_closure};
use crate::elf::{ElfFacts, ReadError, SymbolVersion};
use crate::libfabric::{
    ApiVersion, HostLibfabric, LibfabricError, Provider, ProviderPlugin, provider_plugins,
};
use crate::loader::HostLoader;

/// Why a host libfabric could not be inspected or probed.
#[derive(Debug, thiserror::Error)]
pub enum HostFabricError {
    /// A library file could not be read as ELF.
    #[error(transparent)]
    Elf(#[from] ReadError),
    /// Loading or asking the library failed.
    #[error(transparent)]
    Libfabric(#[from] LibfabricError),
    /// The probe in a child process failed, hung or could not start.
    #[error("{path}: probing it in a child process failed: {message}")]
    Probe {
        /// The library.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file is an ELF library but not a libfabric core.
    #[error("{path}: not a libfabric core library (its soname is {soname:?}, not libfabric.so.1)")]
    NotLibfabric {
        /// The library.
        path: PathBuf,
        /// Its soname.
        soname: Option<String>,
    },
}

/// A host libfabric core library, its providers and what it drags along.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFabric {
    /// The path given.
    pub path: PathBuf,
    /// The file it resolves to.
    pub real_path: PathBuf,
    /// The `FABRIC_x.y` versions it defines: an image's MPI loads it only if these cover every
    /// version the MPI needs.
    pub fabric_versions: BTreeSet<SymbolVersion>,
    /// Its provider plugins.
    pub plugins: Vec<ProviderPlugin>,
    /// The directories holding the plugins, in order: the value for `FI_PROVIDER_PATH` once they
    /// are bound into a container.
    pub plugin_dirs: Vec<PathBuf>,
    /// The libraries the core and its plugins pull in (without glibc's), with their glibc needs.
    pub closure: Closure,
    /// `fi_version()`, when probed.
    pub api_version: Option<ApiVersion>,
    /// The providers that answered `fi_getinfo` on this node, when probed.
    pub providers: Option<Vec<Provider>>,
}

impl HostFabric {
    /// Reads the facts that need no loading: version definitions, plugins, dependency closure
    /// (resolved with `loader`).
    pub fn inspect(path: &Path, loader: &HostLoader) -> Result<Self, HostFabricError> {
        let facts = ElfFacts::read(path)?;
        if facts.soname.as_deref() != Some("libfabric.so.1") {
            return Err(HostFabricError::NotLibfabric {
                path: path.to_owned(),
                soname: facts.soname,
            });
        }
        let plugins = provider_plugins(path)?;
        let mut plugin_dirs: Vec<PathBuf> = Vec::new();
        for p in &plugins {
            if let Some(dir) = p.path.parent()
                && !plugin_dirs.iter().any(|d| d == dir)
            {
                plugin_dirs.push(dir.to_owned());
            }
        }
        let mut roots = vec![path.to_owned()];
        roots.extend(plugins.iter().map(|p| p.path.clone()));
        let closure = dependency_closure(&roots, loader)?;
        Ok(Self {
            path: path.to_owned(),
            real_path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
            fabric_versions: facts.defined_versions("FABRIC"),
            plugins,
            plugin_dirs,
            closure,
            api_version: None,
            providers: None,
        })
    }

    /// Loads the library into this process and fills in [`HostFabric::api_version`] and
    /// [`HostFabric::providers`]. See [`crate::libfabric`] on threads.
    pub fn probe(&mut self) -> Result<(), HostFabricError> {
        let lib = HostLibfabric::load(&self.path)?;
        self.api_version = Some(lib.version());
        self.providers = Some(lib.providers()?);
        Ok(())
    }

    /// Like [`HostFabric::probe`], but the library is loaded in a forked child, so this process
    /// starts none of libfabric's threads and keeps none of its state (it can still `unshare` a
    /// user namespace afterwards). Forking is only safe from a single-threaded process, so this
    /// refuses to run in any other; a child that does not answer within `timeout` is killed.
    pub fn probe_in_child(&mut self, timeout: Duration) -> Result<(), HostFabricError> {
        let outcome =
            run_probe_child(&self.path, timeout).map_err(|message| HostFabricError::Probe {
                path: self.path.clone(),
                message,
            })?;
        match outcome {
            ProbeOutcome::Answered {
                api_version,
                providers,
            } => {
                self.api_version = Some(api_version);
                self.providers = Some(providers);
                Ok(())
            }
            ProbeOutcome::Failed(message) => Err(HostFabricError::Probe {
                path: self.path.clone(),
                message,
            }),
        }
    }

    /// The names of the providers that answered the probe, each once, layered ones split
    /// (`tcp;ofi_rxm` gives `tcp` and `ofi_rxm`); empty when not probed.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in self.providers.iter().flatten() {
            for part in p.parts() {
                if !names.iter().any(|n| n == part) {
                    names.push(part.to_owned());
                }
            }
        }
        names
    }

    /// Whether a provider of this name answered the probe (`None` when not probed).
    pub fn has_provider(&self, name: &str) -> Option<bool> {
        self.providers
            .as_ref()
            .map(|ps| ps.iter().any(|p| p.parts().any(|part| part == name)))
    }
}

/// What a probing child reports to its parent.
#[derive(serde::Serialize, serde::Deserialize)]
enum ProbeOutcome {
    Answered {
        api_version: ApiVersion,
        providers: Vec<Provider>,
    },
    Failed(String),
}

fn probe_here(path: &Path) -> ProbeOutcome {
    let answer = HostLibfabric::load(path).and_then(|lib| Ok((lib.version(), lib.providers()?)));
    match answer {
        Ok((api_version, providers)) => ProbeOutcome::Answered {
            api_version,
            providers,
        },
        Err(e) => ProbeOutcome::Failed(e.to_string()),
    }
}

fn run_probe_child(path: &Path, timeout: Duration) -> Result<ProbeOutcome, String> {
    crate::child::answer_in_child(timeout, || probe_here(path))
}
