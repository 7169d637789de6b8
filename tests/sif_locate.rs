//! `cmpirun::image::locate` and `open_rootfs` on the reference SIF fixtures, a plain squashfs
//! file and a directory.

use std::path::{Path, PathBuf};

use cmpirun::image::rootfs::{NodeKind, resolve};
use cmpirun::image::{ImageError, ImageKind, locate, open_rootfs};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sif")
        .join(name)
}

#[test]
fn sif_primary_partition_is_found_and_readable() {
    let loc = locate(&fixture("one-group.sif")).unwrap();
    assert_eq!(loc.kind, ImageKind::Sif);
    assert_eq!(loc.squashfs_offset, 36864);
    assert_eq!(loc.squashfs_size, 4096);
    let fs = open_rootfs(&loc).unwrap();
    assert_eq!(fs.list_dir("/").unwrap(), vec!["hello.txt"]);
    let meta = fs.metadata("/hello.txt").unwrap().unwrap();
    assert_eq!(meta.kind, NodeKind::File);
    assert_eq!(meta.size, 19);
    assert_eq!(fs.read_file("/hello.txt").unwrap().len(), 19);
    assert!(fs.metadata("/nope").unwrap().is_none());
}

#[test]
fn plain_squashfs_file_is_located_at_offset_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sqfs = dir.path().join("root.squashfs");
    let bytes = std::fs::read(fixture("one-group.sif")).unwrap();
    std::fs::write(&sqfs, &bytes[36864..40960]).unwrap();
    let loc = locate(&sqfs).unwrap();
    assert_eq!(loc.kind, ImageKind::Squashfs);
    assert_eq!(loc.squashfs_offset, 0);
    assert_eq!(loc.squashfs_size, 4096);
    let fs = open_rootfs(&loc).unwrap();
    assert_eq!(fs.list_dir("/").unwrap(), vec!["hello.txt"]);
}

#[test]
fn directory_never_follows_symlinks_out_of_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/lib")).unwrap();
    std::fs::write(root.join("usr/lib/libx.so.1"), b"abc").unwrap();
    std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
    let loc = locate(root).unwrap();
    assert_eq!(loc.kind, ImageKind::Directory);
    let fs = open_rootfs(&loc).unwrap();
    assert_eq!(fs.list_dir("/").unwrap(), vec!["lib", "passwd", "usr"]);
    // Through an intermediate symlink nothing is found; resolve() follows it inside the image.
    assert!(fs.metadata("/lib/libx.so.1").unwrap().is_none());
    assert_eq!(
        resolve(fs.as_ref(), "/lib/libx.so.1").unwrap().as_deref(),
        Some("/usr/lib/libx.so.1")
    );
    // A link to a host file is a link, and reading it as a file does not reach the host.
    assert_eq!(
        fs.metadata("/passwd").unwrap().unwrap().kind,
        NodeKind::Symlink
    );
    assert_eq!(fs.read_link("/passwd").unwrap(), "/etc/passwd");
    assert!(fs.read_file("/passwd").is_err());
    assert!(resolve(fs.as_ref(), "/passwd").unwrap().is_none());
    assert!(fs.read_file("/lib/../../etc/passwd").is_err());
}

#[test]
fn empty_sif_has_no_root_filesystem() {
    let err = locate(&fixture("empty.sif")).unwrap_err();
    assert!(
        matches!(err, ImageError::NoPrimaryPartition { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("empty.sif"), "{err}");
}
