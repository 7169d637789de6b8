//! The dynamic loader's search, emulated inside the image: which file `ld.so` would load for a
//! `DT_NEEDED` name, following RPATH (with what the loading objects pass on), `LD_LIBRARY_PATH`,
//! RUNPATH, the `ld.so.cache` directories and the default directories, `$ORIGIN`, the image's
//! symlinks and `glibc-hwcaps`, and skipping files of another ELF class or machine. The search
//! order itself is `cmpirun_fabric::loader`'s, shared with the host side.

use std::cell::RefCell;
use std::collections::HashMap;

use cmpirun_fabric::elf::{ElfFacts, ElfKind};
use cmpirun_fabric::loader::{
    Via, candidates_in, expand_origin, glibc_hwcaps_subdirs, search_order, searches_glibc_hwcaps,
};
use object::ReadCache;

use crate::image::rootfs::{RangedFile, RootFs};

use super::files::{io_err, join, parent, resolved_file};
use super::types::{FactsError, GlibcFacts, ResolvedLibrary};

/// The dynamic loader's view of the image.
pub(super) struct Loader<'a> {
    pub(super) fs: &'a dyn RootFs,
    /// `LD_LIBRARY_PATH`.
    pub(super) ld_library_path: Vec<String>,
    /// The directories the image's `ld.so.cache` covers; empty when it has none.
    pub(super) cache_dirs: Vec<String>,
    /// The ELF kind of every file checked, so a library needed by many is read once.
    kinds: RefCell<HashMap<String, Option<ElfKind>>>,
    /// The `glibc-hwcaps` subdirectories searched in every directory (none for a glibc older
    /// than 2.33).
    hwcaps: Vec<String>,
}

/// The object that asks for a library: its path and loader facts.
pub(super) struct Requester<'a> {
    /// Where it was found (its directory is its `$ORIGIN`).
    pub(super) path: &'a str,
    /// Its loader facts.
    pub(super) elf: &'a ElfFacts,
    /// The RPATH directories of the objects that loaded this one, up to the program, already
    /// expanded: glibc searches them after the object's own RPATH when it has no RUNPATH.
    pub(super) inherited_rpath: &'a [String],
}

impl Requester<'_> {
    /// What this object passes on to the libraries it loads: its own RPATH (unless it has a
    /// RUNPATH, which makes glibc ignore its RPATH) before what it inherited.
    pub(super) fn rpath_for_children(&self) -> Vec<String> {
        let mut dirs = Vec::new();
        if self.elf.runpath.is_empty() {
            let origin = parent(self.path);
            dirs.extend(self.elf.rpath.iter().map(|d| expand_origin(d, origin)));
        }
        dirs.extend(self.inherited_rpath.iter().cloned());
        dirs
    }
}

impl<'a> Loader<'a> {
    /// The loader of the image `fs`, with this `LD_LIBRARY_PATH` and these `ld.so.cache`
    /// directories, searching no `glibc-hwcaps` subdirectory until [`Loader::image_glibc`] has
    /// found a glibc that does.
    pub(super) fn new(
        fs: &'a dyn RootFs,
        ld_library_path: Vec<String>,
        cache_dirs: Vec<String>,
    ) -> Self {
        Self {
            fs,
            ld_library_path,
            cache_dirs,
            kinds: RefCell::new(HashMap::new()),
            hwcaps: Vec::new(),
        }
    }

    /// The image's glibc, as the loader finds `libc.so.6`. Its release decides whether
    /// `glibc-hwcaps` subdirectories are searched from now on; the CPU is the one the ranks will
    /// run on, this one. A `libc.so.6` that cannot be read is a note.
    pub(super) fn image_glibc(
        &mut self,
        notes: &mut Vec<String>,
    ) -> Result<Option<GlibcFacts>, FactsError> {
        let Some(found) = self.find("libc.so.6", None)? else {
            return Ok(None);
        };
        let version = match self.parse(&found.real_file) {
            Ok(facts) => facts.max_defined_version("GLIBC"),
            Err(e) => {
                notes.push(e.to_string());
                None
            }
        };
        if version.as_ref().is_some_and(searches_glibc_hwcaps) {
            self.hwcaps = glibc_hwcaps_subdirs();
        }
        Ok(Some(GlibcFacts {
            path: found.path,
            real_file: found.real_file,
            version,
        }))
    }
}

impl Loader<'_> {
    /// Whether `real` is an ELF object of kind `want`: the loader skips any other. Reads only
    /// the file's first 64 bytes.
    pub(super) fn fits(&self, real: &str, want: ElfKind) -> Result<bool, FactsError> {
        if let Some(kind) = self.kinds.borrow().get(real) {
            return Ok(*kind == Some(want));
        }
        let prefix = self.fs.read_at(real, 0, 64).map_err(|e| io_err(real, e))?;
        let kind = ElfKind::of(&prefix);
        self.kinds.borrow_mut().insert(real.to_owned(), kind);
        Ok(kind == Some(want))
    }

    /// `real` opened for the ELF parser, which reads only the parts it needs.
    pub(super) fn open(&self, real: &str) -> Result<ReadCache<RangedFile<'_>>, FactsError> {
        let file = RangedFile::open(self.fs, real).map_err(|e| io_err(real, e))?;
        Ok(ReadCache::new(file))
    }

    /// The ELF facts of `real`.
    pub(super) fn parse(&self, real: &str) -> Result<ElfFacts, FactsError> {
        let data = self.open(real)?;
        ElfFacts::parse_in(&data).map_err(|source| FactsError::Elf {
            path: real.to_owned(),
            source,
        })
    }

    /// Finds `name` as the loader would for `requester` (or for a program without RPATH/RUNPATH).
    /// Files of another ELF class or machine than the requester's (this host's without one) are
    /// skipped, as the loader skips them.
    pub(super) fn find(
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
