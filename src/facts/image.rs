//! What a launch plan records of one image ([`ImageSummary`]), and reading it from the image.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::content::{ImageFacts, LibfabricLink};

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

/// What a launch plan records of one image: where it is, its form or why it could not be
/// located, and the few of its [`ImageFacts`] that the plan decides on, as plain strings.
///
/// It is not [`ImageFacts`] itself, for three reasons. An image that cannot be located or read
/// still needs an entry, carrying the reason, so that the plan shows a failed `image` check
/// instead of stopping at the first bad image. It is what the plan serialises (`--dry-run
/// --json`, and `CMPIRUN_PLAN` for `cmpirun __rank` on every node) and what the [facts
/// cache](super::FactsCache) stores, so it stays small and stable while [`ImageFacts`] grows
/// (environment scripts, loader search paths, per-file symbol versions). And the rank mode and
/// the plan's tests build it directly, without an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The image as given on the command line; for an `oras://` image, its file in the cache of
    /// pulled images (the reference is in `registry`).
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
    /// The OpenPMIx version of the image's `libpmix` (`5.0.11rc1`), read from the file: the
    /// PMIx client a PMIx server must serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmix_version: Option<String>,
    /// Why the image's facts could not be read, when they could not.
    pub facts_error: Option<String>,
    /// The files of the image's C library and MPI stack (paths inside the image, symlinks
    /// resolved): what each node serves from its library cache (see `docs/containers.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack_files: Vec<String>,
    /// The registry image `path` was pulled from (`oras://`), resolved to its digests: every
    /// node of the job uses the same layer (from its cache, or pulled by that digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<crate::image::oras::RegistryImage>,
}

/// A library inside an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLibrary {
    /// The name it is needed as (`DT_NEEDED`).
    pub name: String,
    /// The file the loader finds, symlinks resolved inside the image.
    pub real_file: String,
}

impl ImageSummary {
    /// Reads the image at `path` in this process (without mounting it): locates it, then reads
    /// its facts. Never fails: what could not be read is recorded in `error` or `facts_error`.
    pub fn read(path: &Path) -> ImageSummary {
        let loc = match crate::image::locate(path) {
            Ok(loc) => loc,
            Err(e) => {
                return ImageSummary {
                    path: path.to_owned(),
                    error: Some(e.to_string()),
                    ..ImageSummary::default()
                };
            }
        };
        let mut info = ImageSummary {
            path: path.to_owned(),
            kind: serde_json::to_value(loc.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
            ..ImageSummary::default()
        };
        let fs = match crate::image::open_rootfs(&loc) {
            Ok(fs) => fs,
            Err(e) => {
                info.facts_error = Some(e.to_string());
                return info;
            }
        };
        match crate::image::content::image_facts(fs.as_ref()) {
            Ok(f) => info.apply_facts(&f),
            Err(e) => info.facts_error = Some(e.to_string()),
        }
        // The PMIx client's version, from its library file (the version string is in it).
        info.pmix_version = info
            .pmi_libraries
            .iter()
            .find(|l| l.name.starts_with("libpmix.so"))
            .and_then(|l| fs.read_file(&l.real_file).ok())
            .and_then(|bytes| cmpirun_pmi::pmix::version::version_in(&bytes));
        info
    }

    /// Copies what the plan decides on from the image's facts.
    pub fn apply_facts(&mut self, f: &ImageFacts) {
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
