//! What the dynamic loader needs to know about a shared library or program, read from its bytes.
//!
//! The input is a byte slice, or any `object::ReadRef` (such as an `object::ReadCache` over a
//! reader that decompresses only the parts asked for), so the same code reads a file on the host
//! and a file read out of a squashfs image without mounting it. Parsing is done by the `object`
//! crate's ELF reader; only the file header, the section headers, the dynamic section, the
//! version sections and their string tables are read (and the dynamic symbol table for
//! [`exported_symbols_in`]).
//!
//! ```no_run
//! use cmpirun_fabric::elf::{ElfFacts, SymbolVersion};
//!
//! let facts = ElfFacts::read("/usr/lib/x86_64-linux-gnu/libfabric.so.1".as_ref())?;
//! let newest = facts.max_defined_version("FABRIC");
//! assert!(newest >= SymbolVersion::parse("FABRIC_1.6"));
//! # Ok::<(), cmpirun_fabric::elf::ReadError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{Dyn, FileHeader, SectionHeader as _, SectionTable, Sym};
use object::{Endianness, FileKind, ReadRef};

/// Why bytes could not be read as an ELF shared object or program.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The bytes do not start with the ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// The ELF structures are inconsistent (truncated file, offsets out of range, bad tables).
    #[error("malformed ELF file: {0}")]
    Malformed(#[from] object::read::Error),
    /// A dynamic-section entry points outside its string table.
    #[error("malformed ELF file: a {what} points outside the string table")]
    BadString {
        /// Which kind of string (for example "DT_NEEDED entry").
        what: &'static str,
    },
    /// A string in the dynamic section or version tables is not UTF-8.
    #[error("malformed ELF file: a {what} is not valid UTF-8")]
    NotUtf8 {
        /// Which kind of string (for example "DT_NEEDED entry").
        what: &'static str,
    },
}

/// Why a file on the host could not be read as ELF; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file was read but is not a usable ELF file.
    #[error("{path}: {source}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: ElfError,
    },
}

/// The ELF class: 32-bit or 64-bit objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ElfClass {
    /// ELFCLASS32.
    Elf32,
    /// ELFCLASS64.
    Elf64,
}

/// The machine an ELF object was built for (`e_machine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Machine(pub u16);

impl Machine {
    /// The usual name of the architecture (as `uname -m` spells it), or `None` for machines cmpirun
    /// has no name for.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            elf::EM_X86_64 => "x86_64",
            elf::EM_AARCH64 => "aarch64",
            elf::EM_386 => "i386",
            elf::EM_PPC64 => "ppc64",
            elf::EM_S390 => "s390x",
            elf::EM_RISCV => "riscv64",
            elf::EM_LOONGARCH => "loongarch64",
            _ => return None,
        })
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "e_machine {}", self.0),
        }
    }
}

impl Machine {
    /// The machine this program was built for: what the loader on this host accepts.
    pub fn host() -> Self {
        Machine(match std::env::consts::ARCH {
            "x86_64" => elf::EM_X86_64,
            "aarch64" => elf::EM_AARCH64,
            "x86" => elf::EM_386,
            "powerpc64" => elf::EM_PPC64,
            "s390x" => elf::EM_S390,
            "riscv64" => elf::EM_RISCV,
            "loongarch64" => elf::EM_LOONGARCH,
            _ => elf::EM_NONE,
        })
    }
}

/// Class and machine together: the loader skips a library whose kind differs from the object
/// that needs it ("wrong ELF class"), so a multiarch image's i386 copy never satisfies an x86_64
/// library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ElfKind {
    /// 32-bit or 64-bit.
    pub class: ElfClass,
    /// The target machine.
    pub machine: Machine,
}

impl ElfKind {
    /// The kind of this program's own objects.
    pub fn host() -> Self {
        Self {
            class: if cfg!(target_pointer_width = "64") {
                ElfClass::Elf64
            } else {
                ElfClass::Elf32
            },
            machine: Machine::host(),
        }
    }

    /// The kind of the ELF file whose first bytes are `prefix` (64 bytes suffice); `None` if it
    /// is not ELF.
    pub fn of(prefix: &[u8]) -> Option<Self> {
        fn machine<Elf: FileHeader<Endian = Endianness>>(prefix: &[u8]) -> Option<Machine> {
            let header = Elf::parse(prefix).ok()?;
            let endian = header.endian().ok()?;
            Some(Machine(header.e_machine(endian)))
        }
        match FileKind::parse(prefix).ok()? {
            FileKind::Elf64 => Some(Self {
                class: ElfClass::Elf64,
                machine: machine::<elf::FileHeader64<Endianness>>(prefix)?,
            }),
            FileKind::Elf32 => Some(Self {
                class: ElfClass::Elf32,
                machine: machine::<elf::FileHeader32<Endianness>>(prefix)?,
            }),
            _ => None,
        }
    }

    /// The kind of a file on the host, reading only its header; `None` if unreadable or not ELF.
    pub fn of_file(path: &Path) -> Option<Self> {
        use std::io::Read;
        let mut prefix = Vec::with_capacity(64);
        std::fs::File::open(path)
            .ok()?
            .take(64)
            .read_to_end(&mut prefix)
            .ok()?;
        Self::of(&prefix)
    }
}

/// The facts the dynamic loader uses about one ELF object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ElfFacts {
    /// 32-bit or 64-bit.
    pub class: ElfClass,
    /// The target machine.
    pub machine: Machine,
    /// `DT_SONAME`, if any.
    pub soname: Option<String>,
    /// `DT_NEEDED` entries, in file order.
    pub needed: Vec<String>,
    /// `DT_RPATH` directories (split at `:`), unexpanded (`$ORIGIN` stays as written).
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` directories (split at `:`), unexpanded.
    pub runpath: Vec<String>,
    /// The symbol versions this object defines (`FABRIC_1.0`, `GLIBC_2.34`), without the base
    /// version that only repeats the soname.
    pub version_definitions: BTreeSet<String>,
    /// The symbol versions this object needs, keyed by the library file (soname) they are needed
    /// from: `libc.so.6` → {`GLIBC_2.2.5`, `GLIBC_2.34`}.
    pub version_needs: BTreeMap<String, BTreeSet<String>>,
}

impl ElfFacts {
    /// The object's class and machine.
    pub fn kind(&self) -> ElfKind {
        ElfKind {
            class: self.class,
            machine: self.machine,
        }
    }

    /// Reads the facts from the bytes of an ELF file.
    pub fn parse(bytes: &[u8]) -> Result<Self, ElfError> {
        Self::parse_in(bytes)
    }

    /// Reads the facts from an ELF file seen through `data`, asking it only for the header,
    /// the section headers and the sections the facts come from.
    pub fn parse_in<'data, R: ReadRef<'data>>(data: R) -> Result<Self, ElfError> {
        match FileKind::parse(data) {
            Ok(FileKind::Elf64) => {
                parse_generic::<elf::FileHeader64<Endianness>, R>(data, ElfClass::Elf64)
            }
            Ok(FileKind::Elf32) => {
                parse_generic::<elf::FileHeader32<Endianness>, R>(data, ElfClass::Elf32)
            }
            _ => Err(ElfError::NotElf),
        }
    }

    /// Reads the facts from a file on the host.
    pub fn read(path: &Path) -> Result<Self, ReadError> {
        let bytes = std::fs::read(path).map_err(|source| ReadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes).map_err(|source| ReadError::Elf {
            path: path.to_owned(),
            source,
        })
    }

    /// The defined versions of one family (`"FABRIC"`, `"GLIBC"`), ordered.
    pub fn defined_versions(&self, family: &str) -> BTreeSet<SymbolVersion> {
        of_family(self.version_definitions.iter(), family)
    }

    /// The highest defined version of one family: for a `libc.so.6` with family `"GLIBC"`, the glibc
    /// release it belongs to.
    pub fn max_defined_version(&self, family: &str) -> Option<SymbolVersion> {
        self.defined_versions(family).into_iter().next_back()
    }

    /// The needed versions of one family, from whichever file they are needed.
    pub fn needed_versions(&self, family: &str) -> BTreeSet<SymbolVersion> {
        of_family(self.version_needs.values().flatten(), family)
    }

    /// The versions needed from the library whose soname is `file`; empty if none.
    pub fn versions_needed_from(&self, file: &str) -> BTreeSet<String> {
        self.version_needs.get(file).cloned().unwrap_or_default()
    }
}

/// The names of the symbols an ELF file exports from its dynamic symbol table (defined, global or
/// weak), without their version suffix. Used to tell an MPI that embeds libfabric (it exports
/// `fi_getinfo`) from one that loads it.
pub fn exported_symbols(bytes: &[u8]) -> Result<BTreeSet<String>, ElfError> {
    exported_symbols_in(bytes)
}

/// [`exported_symbols`] for an ELF file seen through `data` (reads the section headers, the
/// dynamic symbol table and its strings).
pub fn exported_symbols_in<'data, R: ReadRef<'data>>(
    data: R,
) -> Result<BTreeSet<String>, ElfError> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => exports_generic::<elf::FileHeader64<Endianness>, R>(data),
        Ok(FileKind::Elf32) => exports_generic::<elf::FileHeader32<Endianness>, R>(data),
        _ => Err(ElfError::NotElf),
    }
}

/// The header's byte order and section table, without reading the symbol tables (which the
/// `object` crate's whole-file parser reads up front, and which can be most of a library).
fn header_and_sections<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    data: R,
) -> Result<(Endianness, u16, SectionTable<'data, Elf, R>), ElfError> {
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let sections = header.sections(endian, data)?;
    Ok((endian, header.e_machine(endian), sections))
}

fn of_family<'a>(names: impl Iterator<Item = &'a String>, family: &str) -> BTreeSet<SymbolVersion> {
    names
        .filter_map(|n| SymbolVersion::parse(n))
        .filter(|v| v.family == family)
        .collect()
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, ElfError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ElfError::NotUtf8 { what })
}

fn split_path_list(s: &str) -> Vec<String> {
    s.split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_generic<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    bytes: R,
    class: ElfClass,
) -> Result<ElfFacts, ElfError> {
    let (endian, machine, sections) = header_and_sections::<Elf, R>(bytes)?;
    let machine = Machine(machine);

    let mut facts = ElfFacts {
        class,
        machine,
        soname: None,
        needed: Vec::new(),
        rpath: Vec::new(),
        runpath: Vec::new(),
        version_definitions: BTreeSet::new(),
        version_needs: BTreeMap::new(),
    };

    if let Some((entries, link)) = sections.dynamic(endian, bytes)? {
        let strings = sections.strings(endian, bytes, link)?;
        for entry in entries {
            let Some(tag) = entry.tag32(endian) else {
                continue;
            };
            let what = match tag {
                elf::DT_NULL => break,
                elf::DT_NEEDED => "DT_NEEDED entry",
                elf::DT_SONAME => "DT_SONAME",
                elf::DT_RPATH => "DT_RPATH",
                elf::DT_RUNPATH => "DT_RUNPATH",
                _ => continue,
            };
            // `Dyn::string` takes only a byte-slice string table; this is its body.
            let bytes = u32::try_from(entry.d_val(endian).into())
                .ok()
                .and_then(|offset| strings.get(offset).ok())
                .ok_or(ElfError::BadString { what })?;
            let value = utf8(bytes, what)?;
            match tag {
                elf::DT_NEEDED => facts.needed.push(value),
                elf::DT_SONAME => facts.soname = Some(value),
                elf::DT_RPATH => facts.rpath.extend(split_path_list(&value)),
                _ => facts.runpath.extend(split_path_list(&value)),
            }
        }
    }

    if let Some((mut defs, link)) = sections.gnu_verdef(endian, bytes)? {
        let strings = sections.strings(endian, bytes, link)?;
        while let Some((def, mut aux)) = defs.next()? {
            // The base definition only names the file itself.
            if def.vd_flags.get(endian) & elf::VER_FLG_BASE != 0 {
                continue;
            }
            // The first auxiliary entry is the version's own name; later ones are its parents.
            if let Some(first) = aux.next()? {
                let name = utf8(first.name(endian, strings)?, "version definition")?;
                facts.version_definitions.insert(name);
            }
        }
    }

    if let Some((mut needs, link)) = sections.gnu_verneed(endian, bytes)? {
        let strings = sections.strings(endian, bytes, link)?;
        while let Some((need, mut aux)) = needs.next()? {
            let file_name = utf8(need.file(endian, strings)?, "version need file")?;
            let versions = facts.version_needs.entry(file_name).or_default();
            while let Some(entry) = aux.next()? {
                versions.insert(utf8(entry.name(endian, strings)?, "version need")?);
            }
        }
    }

    Ok(facts)
}

fn exports_generic<'data, Elf: FileHeader<Endian = Endianness>, R: ReadRef<'data>>(
    bytes: R,
) -> Result<BTreeSet<String>, ElfError> {
    let (endian, _, sections) = header_and_sections::<Elf, R>(bytes)?;
    let table = sections.symbols(endian, bytes, elf::SHT_DYNSYM)?;
    let mut names = BTreeSet::new();
    if table.is_empty() {
        return Ok(names);
    }
    // The whole string table in one read: through a `ReadCache`, reading thousands of names one
    // by one costs more than the table.
    let strtab = sections
        .section(table.string_section())?
        .data(endian, bytes)?;
    let strings = object::StringTable::new(strtab, 0, strtab.len() as u64);
    for sym in table.iter() {
        let bind = sym.st_bind();
        if sym.st_shndx(endian) == elf::SHN_UNDEF
            || (bind != elf::STB_GLOBAL && bind != elf::STB_WEAK)
        {
            continue;
        }
        let name = sym.name(endian, strings)?;
        if !name.is_empty() {
            names.insert(utf8(name, "dynamic symbol name")?);
        }
    }
    Ok(names)
}

/// A numbered symbol version such as `GLIBC_2.34` or `FABRIC_1.9`: a family name and a dotted
/// release, ordered by family and then numerically (`GLIBC_2.34 > GLIBC_2.17`,
/// `FABRIC_1.10 > FABRIC_1.9`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SymbolVersion {
    /// The family: `GLIBC`, `FABRIC`, `GLIBCXX`.
    pub family: String,
    /// The release numbers: `[2, 2, 5]` for `GLIBC_2.2.5`.
    pub numbers: Vec<u32>,
}

impl SymbolVersion {
    /// Parses `FAMILY_N(.N)*`; `None` for names without a numbered release (`GLIBC_PRIVATE`).
    pub fn parse(name: &str) -> Option<Self> {
        let (family, release) = name.rsplit_once('_')?;
        if family.is_empty() {
            return None;
        }
        let numbers = release
            .split('.')
            .map(|n| {
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    n.parse().ok()
                }
            })
            .collect::<Option<Vec<u32>>>()?;
        Some(Self {
            family: family.to_owned(),
            numbers,
        })
    }
}

impl fmt::Display for SymbolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_", self.family)?;
        for (i, n) in self.numbers.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for SymbolVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SymbolVersion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        SymbolVersion::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("{name:?} is not a numbered symbol version"))
        })
    }
}

/// The versions of `needed` that `defined` lacks, in order: what a library providing `defined`
/// is missing for an object needing `needed` (for example the `FABRIC_1.9` an MPI needs from a
/// host libfabric 1.17).
pub fn missing_versions<'a>(
    needed: impl IntoIterator<Item = &'a SymbolVersion>,
    defined: &BTreeSet<SymbolVersion>,
) -> Vec<SymbolVersion> {
    needed
        .into_iter()
        .filter(|v| !defined.contains(v))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        let v = |s| SymbolVersion::parse(s).unwrap();
        assert!(v("GLIBC_2.34") > v("GLIBC_2.17"));
        assert!(v("GLIBC_2.3") > v("GLIBC_2.2.5"));
        assert!(v("FABRIC_1.10") > v("FABRIC_1.9"));
        assert_eq!(v("GLIBC_2.2.5").to_string(), "GLIBC_2.2.5");
        assert_eq!(v("GLIBCXX_3.4.29").family, "GLIBCXX");
        assert_eq!(SymbolVersion::parse("GLIBC_PRIVATE"), None);
        assert_eq!(SymbolVersion::parse("GLIBC_2..3"), None);
        assert_eq!(SymbolVersion::parse("libfabric.so.1"), None);
        assert_eq!(SymbolVersion::parse("_1.0"), None);
    }

    #[test]
    fn missing_versions_in_order() {
        let set = |names: &[&str]| -> BTreeSet<SymbolVersion> {
            names
                .iter()
                .map(|n| SymbolVersion::parse(n).unwrap())
                .collect()
        };
        let needed = set(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"]);
        let host = set(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.2", "FABRIC_1.6"]);
        assert_eq!(
            missing_versions(&needed, &host),
            vec![SymbolVersion::parse("FABRIC_1.9").unwrap()]
        );
        let json = serde_json::to_string(&needed).unwrap();
        assert_eq!(json, r#"["FABRIC_1.0","FABRIC_1.1","FABRIC_1.9"]"#);
        let back: BTreeSet<SymbolVersion> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, needed);
        assert!(serde_json::from_str::<SymbolVersion>(r#""GLIBC_PRIVATE""#).is_err());
    }

    #[test]
    fn kinds_from_headers() {
        let libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        assert_eq!(ElfKind::of(&libc[..64]), Some(ElfKind::host()));
        assert_eq!(ElfKind::host().machine.name(), Some("x86_64"));
        assert_eq!(ElfKind::of(&libc[..10]), None);
        assert_eq!(
            ElfKind::of(b"not an elf file at all, not at all, not at all, not at all, no"),
            None
        );
        assert_eq!(
            ElfKind::of_file(Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            Some(ElfFacts::parse(&libc).unwrap().kind())
        );
    }

    #[test]
    fn garbage_is_not_elf() {
        assert!(matches!(
            ElfFacts::parse(b"#!/bin/sh\n"),
            Err(ElfError::NotElf)
        ));
        assert!(matches!(ElfFacts::parse(b""), Err(ElfError::NotElf)));
    }

    #[test]
    fn truncated_elf_is_malformed() {
        let bytes = std::fs::read("/usr/lib/x86_64-linux-gnu/libfabric.so.1").unwrap();
        let err = ElfFacts::parse(&bytes[..200]).unwrap_err();
        assert!(matches!(err, ElfError::Malformed(_)), "{err}");
    }
}
