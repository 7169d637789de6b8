//! The summary `cmpirun image inspect` prints for an image's facts.

use std::fmt;

use cmpirun_fabric::loader::Via;

use super::env_scripts::RUNSCRIPT;
use super::types::{ImageFacts, LibfabricLink};

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
