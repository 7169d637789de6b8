//! ELF facts of real libraries on this machine: Debian's libfabric 1.17 and the PyPI `mpich`
//! 5.0.2 wheel (fetched by `ci/fetch-wheels.sh`).

use std::collections::BTreeSet;
mod common;
use common::mpich_wheel_lib;

use cmpirun_fabric::elf::{ElfClass, ElfFacts, SymbolVersion, exported_symbols};

const DEBIAN_LIBFABRIC: &str = "/usr/lib/x86_64-linux-gnu/libfabric.so.1";

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn fabric_versions(minor_max: u32) -> BTreeSet<String> {
    (0..=minor_max).map(|m| format!("FABRIC_1.{m}")).collect()
}

#[test]
fn debian_libfabric_1_17() {
    let facts = ElfFacts::read(DEBIAN_LIBFABRIC.as_ref()).unwrap();
    assert_eq!(facts.class, ElfClass::Elf64);
    assert_eq!(facts.machine.name(), Some("x86_64"));
    assert_eq!(facts.soname.as_deref(), Some("libfabric.so.1"));
    assert!(facts.needed.iter().any(|n| n == "libc.so.6"));
    let fabric: BTreeSet<String> = facts
        .version_definitions
        .iter()
        .filter(|v| v.starts_with("FABRIC_"))
        .cloned()
        .collect();
    assert_eq!(fabric, fabric_versions(6));
    assert_eq!(
        facts.max_defined_version("FABRIC"),
        SymbolVersion::parse("FABRIC_1.6")
    );
    let glibc = facts.needed_versions("GLIBC");
    assert!(glibc.contains(&SymbolVersion::parse("GLIBC_2.2.5").unwrap()));
    assert!(!facts.versions_needed_from("libc.so.6").is_empty());
}

#[test]
fn wheel_libfabric_2_5() {
    let lib = mpich_wheel_lib();
    let facts = ElfFacts::read(&lib.join("mpich/libfabric.so.1")).unwrap();
    assert_eq!(facts.soname.as_deref(), Some("libfabric.so.1"));
    assert_eq!(facts.runpath, vec!["$ORIGIN", "$ORIGIN/libfabric"]);
    assert!(facts.rpath.is_empty());
    assert_eq!(
        facts.defined_versions("FABRIC"),
        fabric_versions(9)
            .iter()
            .map(|v| SymbolVersion::parse(v).unwrap())
            .collect()
    );
}

#[test]
fn wheel_libmpi_needs() {
    let lib = mpich_wheel_lib();
    let facts = ElfFacts::read(&lib.join("libmpi.so.12")).unwrap();
    assert_eq!(facts.soname.as_deref(), Some("libmpi.so.12"));
    assert_eq!(facts.runpath, vec!["$ORIGIN", "$ORIGIN/mpich"]);
    assert!(facts.rpath.is_empty());
    assert!(facts.needed.iter().any(|n| n == "libfabric.so.1"));
    assert_eq!(
        facts.versions_needed_from("libfabric.so.1"),
        set(&["FABRIC_1.0", "FABRIC_1.1", "FABRIC_1.9"])
    );
    let glibc_max = facts
        .needed_versions("GLIBC")
        .into_iter()
        .next_back()
        .unwrap();
    // manylinux_2_28: nothing newer than glibc 2.28.
    assert!(glibc_max <= SymbolVersion::parse("GLIBC_2.28").unwrap());
    // It loads libfabric, it does not embed it.
    let exports = exported_symbols(&std::fs::read(lib.join("libmpi.so.12")).unwrap()).unwrap();
    assert!(exports.contains("MPI_Init"));
    assert!(!exports.contains("fi_getinfo"));
}

#[test]
fn libfabric_exports_its_api() {
    let exports = exported_symbols(&std::fs::read(DEBIAN_LIBFABRIC).unwrap()).unwrap();
    assert!(exports.contains("fi_getinfo"));
    assert!(exports.contains("fi_version"));
}

#[test]
fn host_glibc_version_from_libc() {
    let facts = ElfFacts::read("/lib/x86_64-linux-gnu/libc.so.6".as_ref()).unwrap();
    // Debian 12 ships glibc 2.36.
    assert_eq!(
        facts.max_defined_version("GLIBC"),
        SymbolVersion::parse("GLIBC_2.36")
    );
    assert!(facts.version_definitions.contains("GLIBC_PRIVATE"));
}

#[test]
fn missing_file_names_it() {
    let err = ElfFacts::read("/nonexistent/libx.so".as_ref()).unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/libx.so: "),
        "{err}"
    );
}

/// Corrupting a real library anywhere in its headers and dynamic tables gives an error or some
/// facts, never a panic.
#[test]
fn corrupted_libraries_never_panic() {
    let original = std::fs::read(DEBIAN_LIBFABRIC).unwrap();
    // Cover the ELF header, program headers, and then a stride over the whole file (which hits
    // the dynamic section, version tables and section headers).
    let mut offsets: Vec<usize> = (0..256).collect();
    offsets.extend((256..original.len()).step_by(4099));
    offsets.extend((original.len().saturating_sub(2048)..original.len()).step_by(7));
    for &offset in &offsets {
        for value in [0x00u8, 0xff] {
            let mut bytes = original.clone();
            bytes[offset] = value;
            let _ = ElfFacts::parse(&bytes);
            let _ = exported_symbols(&bytes);
        }
    }
    for len in [0, 4, 16, 63, 64, 65, 1000, original.len() / 2] {
        let _ = ElfFacts::parse(&original[..len]);
    }
}
