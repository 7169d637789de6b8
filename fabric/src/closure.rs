//! The libraries a set of host libraries pulls in: what must travel with a host libfabric (and its
//! providers) into a container. glibc's own libraries stay behind: the container's glibc provides
//! them, and each library's `GLIBC_x.y` needs say how new that glibc must be.
//!
//! ```no_run
//! use cmpirun_fabric::closure::dependency_closure;
//! use cmpirun_fabric::loader::HostLoader;
//!
//! let core = std::path::PathBuf::from("/usr/lib/x86_64-linux-gnu/libfabric.so.1");
//! let closure = dependency_closure(&[core], &HostLoader::from_env())?;
//! for lib in &closure.libraries {
//!     println!("{} needs glibc {:?}", lib.path.display(), lib.glibc_needs);
//! }
//! # Ok::<(), cmpirun_fabric::elf::ReadError>(())
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use crate::elf::{ElfFacts, ReadError, SymbolVersion};
use crate::loader::{HostLoader, Via, is_glibc_library};

/// One library of a closure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostLibrary {
    /// The name it was needed as (a root's file name for the roots).
    pub name: String,
    /// Where the loader finds it (for a root: the path given).
    pub path: PathBuf,
    /// The file `path` resolves to.
    pub real_path: PathBuf,
    /// How it was found ([`Via::Scan`] for the roots).
    pub via: Via,
    /// The library that needs it; `None` for the roots.
    pub needed_by: Option<PathBuf>,
    /// Its `DT_SONAME`.
    pub soname: Option<String>,
    /// The newest `GLIBC_x.y` it needs.
    pub glibc_needs: Option<SymbolVersion>,
}

/// A `DT_NEEDED` entry the host loader would not find.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MissingLibrary {
    /// The needed name.
    pub name: String,
    /// The library that needs it.
    pub needed_by: PathBuf,
}

/// The dependency closure of some host libraries, without glibc's own libraries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Closure {
    /// The roots first, then their dependencies breadth first, each file once.
    pub libraries: Vec<HostLibrary>,
    /// Dependencies the loader would not find.
    pub missing: Vec<MissingLibrary>,
    /// The glibc libraries the closure needs (left to the container's glibc).
    pub glibc_libraries: BTreeSet<String>,
    /// The newest `GLIBC_x.y` any library of the closure needs: the oldest glibc that can load
    /// them all.
    pub glibc_needs: Option<SymbolVersion>,
}

impl Closure {
    /// The library of the closure that needs the newest glibc, with that version.
    pub fn newest_glibc_need(&self) -> Option<(&HostLibrary, &SymbolVersion)> {
        self.libraries
            .iter()
            .filter_map(|l| l.glibc_needs.as_ref().map(|v| (l, v)))
            .max_by(|a, b| a.1.cmp(b.1))
    }
}

/// Computes the closure of `roots` by the host loader's rules.
pub fn dependency_closure(roots: &[PathBuf], loader: &HostLoader) -> Result<Closure, ReadError> {
    let mut queue: VecDeque<HostLibrary> = VecDeque::new();
    let mut seen = BTreeSet::new();
    for root in roots {
        let real = real_path(root);
        if seen.insert(real.clone()) {
            queue.push_back(HostLibrary {
                name: root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: root.clone(),
                real_path: real,
                via: Via::Scan,
                needed_by: None,
                soname: None,
                glibc_needs: None,
            });
        }
    }
    let mut closure = Closure {
        libraries: Vec::new(),
        missing: Vec::new(),
        glibc_libraries: BTreeSet::new(),
        glibc_needs: None,
    };
    while let Some(mut lib) = queue.pop_front() {
        let facts = ElfFacts::read(&lib.path)?;
        lib.soname = facts.soname.clone();
        lib.glibc_needs = facts.needed_versions("GLIBC").into_iter().next_back();
        for name in &facts.needed {
            if is_glibc_library(name) {
                closure.glibc_libraries.insert(name.clone());
                continue;
            }
            match loader.find(name, Some((&lib.path, &facts))) {
                Some(found) => {
                    let real = real_path(&found.path);
                    if seen.insert(real.clone()) {
                        queue.push_back(HostLibrary {
                            name: name.clone(),
                            path: found.path,
                            real_path: real,
                            via: found.via,
                            needed_by: Some(lib.path.clone()),
                            soname: None,
                            glibc_needs: None,
                        });
                    }
                }
                None => closure.missing.push(MissingLibrary {
                    name: name.clone(),
                    needed_by: lib.path.clone(),
                }),
            }
        }
        closure.libraries.push(lib);
    }
    closure.glibc_needs = closure
        .libraries
        .iter()
        .filter_map(|l| l.glibc_needs.clone())
        .max();
    Ok(closure)
}

fn real_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}
