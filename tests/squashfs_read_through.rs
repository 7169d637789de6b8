//! `cmpirun::mount::read_through`, the reader the `squashfs_read` fuzz target drives
//! (docs/fuzzing.md): it reads what the FUSE server would serve, and refuses what is not an
//! image with an error, not a panic.

mod common;

use std::fs;

use cmpirun::mount::{MountError, SquashfsSource, read_through};
use common::mksquashfs;

fn source(path: &std::path::Path) -> SquashfsSource {
    SquashfsSource {
        path: path.to_owned(),
        offset: 0,
        size: fs::metadata(path).unwrap().len(),
    }
}

#[test]
fn every_file_is_read_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("a"), b"hello\n").unwrap();
    fs::write(tree.join("sub/big"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    for comp in ["gzip", "xz", "zstd", "lz4"] {
        let image = dir.path().join(format!("{comp}.sqfs"));
        mksquashfs(&tree, &image, &["-comp", comp, "-b", "4096"]);
        assert_eq!(
            read_through(&source(&image), u64::MAX).unwrap(),
            300_006,
            "{comp}"
        );
        // At most the limit of each file, in whole reads.
        let limited = read_through(&source(&image), 1).unwrap();
        assert!((6..=6 + 128 * 1024).contains(&limited), "{comp}: {limited}");
    }
}

#[test]
fn bytes_that_are_not_squashfs_are_a_bad_image() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    fs::write(&junk, vec![0x5au8; 4096]).unwrap();
    let err = read_through(&source(&junk), u64::MAX).unwrap_err();
    assert!(matches!(err, MountError::BadImage { .. }), "{err:?}");
}
