//! The facts an image yields: its glibc, its MPI and the libraries the MPI loads, its
//! environment scripts, and the errors that stop reading them. Plain serialisable values; how they
//! are read is in the sibling modules, how they print in `summary.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;

use cmpirun_fabric::elf::{ElfError, SymbolVersion};
use cmpirun_fabric::loader::Via;

/// Errors that stop reading an image's facts. Problems with single files that do not stop the
/// rest (an unreadable dependency, a library that is not ELF) are listed in
/// [`ImageFacts::notes`] instead.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// Reading a path inside the image failed.
    #[error("{path} (inside the image): {source}")]
    Io {
        /// The path inside the image.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The image's MPI library is not a usable ELF file.
    #[error("{path} (inside the image): {source}")]
    Elf {
        /// The path inside the image.
        path: String,
        /// What is wrong with it.
        source: ElfError,
    },
}

/// The MPI ABI an image's MPI library implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MpiFamily {
    /// `libmpi.so.12` (or Debian's `libmpich.so.12`): MPICH and its derivatives (Cray MPICH,
    /// Intel MPI, MVAPICH). Serialised as `mpich`.
    #[serde(rename = "mpich")]
    MpichAbi,
    /// `libmpi.so.40`: Open MPI 3 to 5. Serialised as `openmpi`.
    #[serde(rename = "openmpi")]
    OpenMpi,
    /// `libmpi_abi.so`: the MPI-5 standard ABI. Serialised as `mpi-abi`.
    #[serde(rename = "mpi-abi")]
    MpiAbi,
}

impl MpiFamily {
    /// The short name profiles and plans use: `mpich`, `openmpi`, `mpi-abi`.
    pub fn name(self) -> &'static str {
        match self {
            MpiFamily::MpichAbi => "mpich",
            MpiFamily::OpenMpi => "openmpi",
            MpiFamily::MpiAbi => "mpi-abi",
        }
    }

    /// The library file names that identify this family, most specific first.
    pub fn library_names(self) -> &'static [&'static str] {
        match self {
            MpiFamily::MpichAbi => &["libmpi.so.12", "libmpich.so.12"],
            MpiFamily::OpenMpi => &["libmpi.so.40"],
            MpiFamily::MpiAbi => &["libmpi_abi.so.1", "libmpi_abi.so"],
        }
    }
}

/// One library as the loader would find it inside the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedLibrary {
    /// The name that was looked up (the `DT_NEEDED` entry).
    pub name: String,
    /// The path where the loader finds it (symlinks not resolved; `$ORIGIN` of this library is
    /// its directory).
    pub path: String,
    /// How it was found.
    pub via: Via,
    /// `path` with every symlink resolved inside the image: the file a bind would cover.
    pub real_file: String,
    /// The path of the object whose `DT_NEEDED` named it; `None` for a search root.
    pub needed_by: Option<String>,
}

/// How an image's MPI gets at libfabric.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LibfabricLink {
    /// Loaded dynamically as `libfabric.so.1`: a host copy can be bound over `real_file`.
    Dynamic(ResolvedLibrary),
    /// Some library of the MPI stack needs `libfabric.so.1`, but the loader would not find it in
    /// the image.
    Unresolved {
        /// The object that needs it.
        needed_by: String,
    },
    /// The MPI library carries libfabric inside itself (it exports `fi_getinfo` and needs no
    /// `libfabric.so.1`): a host libfabric cannot be injected.
    Embedded,
    /// The MPI stack does not use libfabric (for example MPICH built for ch4:ucx).
    NotLinked,
}

/// A library needed by the MPI stack that the loader would not find in the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// The `DT_NEEDED` entry.
    pub name: String,
    /// The object that needs it.
    pub needed_by: String,
}

/// Facts about the image's MPI library and the libraries it loads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MpiFacts {
    /// Which ABI it implements.
    pub family: MpiFamily,
    /// Where it is (the directory where it was found, symlinks not resolved).
    pub path: String,
    /// The file `path` resolves to inside the image.
    pub real_file: String,
    /// Its `DT_SONAME`.
    pub soname: Option<String>,
    /// Its `DT_NEEDED` entries.
    pub needed: Vec<String>,
    /// Its `DT_RPATH`, unexpanded.
    pub rpath: Vec<String>,
    /// Its `DT_RUNPATH`, unexpanded.
    pub runpath: Vec<String>,
    /// How the stack gets at libfabric.
    pub libfabric: LibfabricLink,
    /// Every `FABRIC_x.y` the stack needs, ordered.
    pub fabric_needs: BTreeSet<SymbolVersion>,
    /// The `FABRIC_x.y` versions each library of the stack needs, by path.
    pub fabric_needs_by_file: BTreeMap<String, BTreeSet<SymbolVersion>>,
    /// The newest `GLIBC_x.y` any library of the stack needs: the image's glibc must be at least
    /// this for the stack to load.
    pub glibc_needs: Option<SymbolVersion>,
    /// The newest `GLIBC_x.y` each library of the stack needs, by path.
    pub glibc_needs_by_file: BTreeMap<String, SymbolVersion>,
    /// The PMI libraries (`libpmi.so*`, `libpmi2.so*`, `libpmix.so*`) the stack links.
    pub pmi_libraries: Vec<ResolvedLibrary>,
    /// Open MPI components that reach libfabric (`mca_mtl_ofi.so`, `mca_btl_ofi.so`) or PMIx
    /// (`mca_pmix_*.so`), which the MPI opens at run time rather than through `DT_NEEDED`.
    pub components: Vec<String>,
    /// Every library of the stack (the MPI library, its components, and their `DT_NEEDED`
    /// closure, without glibc's own libraries), in the order the loader would meet them.
    pub stack: Vec<ResolvedLibrary>,
    /// Libraries the stack needs that the loader would not find in the image.
    pub unresolved: Vec<Unresolved>,
}

/// The image's C library.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GlibcFacts {
    /// Where the loader finds `libc.so.6`.
    pub path: String,
    /// The file it resolves to.
    pub real_file: String,
    /// The newest `GLIBC_x.y` it defines: the glibc release (`GLIBC_2.36`).
    pub version: Option<SymbolVersion>,
}

/// One Apptainer environment script (`/.singularity.d/env/*.sh`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EnvScript {
    /// The file name (`90-environment.sh`).
    pub name: String,
    /// Its contents (invalid UTF-8 replaced).
    pub contents: String,
}

/// What an image holds that a launch needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageFacts {
    /// The image's glibc, if it has one.
    pub glibc: Option<GlibcFacts>,
    /// The image's MPI, if it has one.
    pub mpi: Option<MpiFacts>,
    /// Other MPI libraries found besides the chosen one (for example a wheel's `libmpi_abi.so.1`
    /// next to its `libmpi.so.12`).
    pub other_mpi_libraries: Vec<String>,
    /// The `LD_LIBRARY_PATH` the facts assume: as the image's environment scripts set it (when it
    /// could be read from them without running them), or as [`FactsOptions`] gave it.
    pub ld_library_path: Vec<String>,
    /// Whether the image has an `/etc/ld.so.cache`.
    pub ld_so_cache: bool,
    /// The directories of the image's `/etc/ld.so.conf` (with its `include`s).
    pub ld_so_conf_dirs: Vec<String>,
    /// `/.singularity.d/env/*.sh`, in the order Apptainer sources them.
    pub env_scripts: Vec<EnvScript>,
    /// `/.singularity.d/runscript`, if present.
    pub runscript: Option<String>,
    /// Files that could not be read as expected; none of them stopped the rest.
    pub notes: Vec<String>,
}

impl fmt::Display for MpiFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MpiFamily::MpichAbi => "MPICH ABI (libmpi.so.12)",
            MpiFamily::OpenMpi => "Open MPI (libmpi.so.40)",
            MpiFamily::MpiAbi => "MPI-5 standard ABI (libmpi_abi.so)",
        })
    }
}

/// Choices that change what the loader inside the image would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactsOptions {
    /// The `LD_LIBRARY_PATH` the ranks will run with, when the launch sets it; `None` to use
    /// what the image's environment scripts set.
    pub ld_library_path: Option<Vec<String>>,
    /// The program the ranks will run (an absolute path inside the image), when known: the MPI
    /// is then the one this program loads, found through its RPATH/RUNPATH (which glibc also
    /// applies, as RPATH, to the libraries it loads), rather than the first one a scan finds.
    pub program: Option<String>,
}

impl ImageFacts {
    /// The file inside the image that a host libfabric must be bound over: the real file the
    /// image's MPI loads as `libfabric.so.1`. `None` when the MPI does not load one dynamically.
    pub fn libfabric_target(&self) -> Option<&str> {
        match &self.mpi.as_ref()?.libfabric {
            LibfabricLink::Dynamic(l) => Some(&l.real_file),
            _ => None,
        }
    }
}
