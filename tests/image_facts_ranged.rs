//! Ranged reads give the same ELF facts as whole files: for every ELF file under the library and
//! program directories of each test image, the facts parsed from the parts the parser asks for
//! (`RootFs::read_at` through an `object::ReadCache`) equal those parsed from the whole file read
//! out of the squashfs, and so do the exported symbols.

mod common;

use cmpirun::image::rootfs::{RangedFile, RootFs};
use cmpirun::image::squash::SquashfsRootFs;
use cmpirun::image::{locate, open_rootfs};
use cmpirun_fabric::elf::{ElfFacts, ElfKind, exported_symbols, exported_symbols_in};
use object::ReadCache;

/// Every regular file of the image whose path looks like a library or a program.
fn elf_candidates(name: &str) -> Vec<String> {
    let location = locate(&common::image(name)).unwrap();
    let fs = SquashfsRootFs::open(&location.path, location.squashfs_offset).unwrap();
    fs.reader()
        .files()
        .filter(|n| matches!(n.inner, backhand::InnerNode::File(_)))
        .map(|n| n.fullpath.to_string_lossy().into_owned())
        .filter(|p| p.contains(".so") || p.starts_with("/usr/local/bin/"))
        .collect()
}

fn compare_image(name: &str) {
    let location = locate(&common::image(name)).unwrap();
    let fs = open_rootfs(&location).unwrap();
    let fs: &dyn RootFs = fs.as_ref();
    let mut elf_files = 0;
    for path in elf_candidates(name) {
        let whole = fs.read_file(&path).unwrap();
        if ElfKind::of(&whole).is_none() {
            continue;
        }
        elf_files += 1;
        let ranged = ReadCache::new(RangedFile::open(fs, &path).unwrap());
        let from_whole = ElfFacts::parse(&whole).map_err(|e| e.to_string());
        let from_ranges = ElfFacts::parse_in(&ranged).map_err(|e| e.to_string());
        assert_eq!(from_whole, from_ranges, "{name}:{path}");
        let exports_whole = exported_symbols(&whole).map_err(|e| e.to_string());
        let exports_ranges = exported_symbols_in(&ranged).map_err(|e| e.to_string());
        assert_eq!(exports_whole, exports_ranges, "{name}:{path}");
        // A range in the middle of the file reads the same bytes as the whole file has there.
        let mid = whole.len() as u64 / 2;
        let part = fs.read_at(&path, mid, 70_000).unwrap();
        let end = whole.len().min(mid as usize + 70_000);
        assert_eq!(part, &whole[mid as usize..end], "{name}:{path} at {mid}");
    }
    assert!(elf_files > 20, "{name}: only {elf_files} ELF files checked");
}

#[test]
fn mpich4_ranged_facts_equal_whole_file_facts() {
    compare_image("mpich4");
}

#[test]
fn mpich5_ranged_facts_equal_whole_file_facts() {
    compare_image("mpich5");
}

#[test]
fn openmpi4_ranged_facts_equal_whole_file_facts() {
    compare_image("openmpi4");
}
