//! Bad images get a one-line error that names the file and the problem, exit status 2, and
//! never a panic. Each bad file is made from a reference fixture by patching bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use cmpirun::image::{ImageError, locate};

const DESC: usize = 4096;
const DESC_LEN: usize = 585;

fn fixture(name: &str) -> Vec<u8> {
    fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sif")
            .join(name),
    )
    .unwrap()
}

/// Byte offset of field `at` (relative to the descriptor) of slot `slot`.
fn desc(slot: usize, at: usize) -> usize {
    DESC + slot * DESC_LEN + at
}

fn put_i32(b: &mut [u8], at: usize, v: i32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_i64(b: &mut [u8], at: usize, v: i64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

struct Bad {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_bad(name: &str, bytes: &[u8]) -> Bad {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::write(&path, bytes).unwrap();
    Bad { _dir: dir, path }
}

/// Runs `image inspect` and checks the error contract; returns stderr.
fn inspect_fails(bad: &Bad, expect: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(["image", "inspect"])
        .arg(&bad.path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "status; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let name = bad.path.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name), "names the file: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
    stderr
}

#[test]
fn truncated_header() {
    let b = fixture("one-group.sif");
    let bad = write_bad("truncated.sif", &b[..100]);
    inspect_fails(&bad, &["truncated", "100 bytes"]);
    assert!(matches!(locate(&bad.path), Err(ImageError::Sif { .. })));
}

#[test]
fn wrong_magic() {
    let mut b = fixture("one-group.sif");
    b[32..42].copy_from_slice(b"SIF_MAGIX\0");
    let bad = write_bad("magic.sif", &b);
    inspect_fails(&bad, &["not a SIF file", "SIF_MAGIX"]);
}

#[test]
fn not_an_image_at_all() {
    let bad = write_bad("notes.txt", b"just some text, not an image\n");
    inspect_fails(&bad, &["not an image"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::NotAnImage { .. })
    ));
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Bad {
        path: dir.path().join("missing.sif"),
        _dir: dir,
    };
    inspect_fails(&bad, &["No such file"]);
}

#[test]
fn wrong_version() {
    let mut b = fixture("one-group.sif");
    b[42..45].copy_from_slice(b"02\0");
    let bad = write_bad("version.sif", &b);
    inspect_fails(&bad, &["unsupported SIF version", "02"]);
}

#[test]
fn descriptor_table_past_end_of_file() {
    let b = fixture("one-group.sif");
    let bad = write_bad("short-table.sif", &b[..10_000]);
    inspect_fails(
        &bad,
        &["descriptor table", "past the end of the file (10000 bytes)"],
    );

    let mut b = fixture("one-group.sif");
    put_i64(&mut b, 96, 1 << 40);
    let bad = write_bad("far-table.sif", &b);
    inspect_fails(&bad, &["descriptor table", "past the end"]);

    let mut b = fixture("one-group.sif");
    put_i64(&mut b, 88, i64::MAX);
    let bad = write_bad("huge-table.sif", &b);
    inspect_fails(&bad, &["DescriptorsTotal"]);
}

#[test]
fn object_past_end_of_file() {
    let b = fixture("one-group.sif");
    let bad = write_bad("short-object.sif", &b[..38_000]);
    inspect_fails(
        &bad,
        &["object 2", "past the end of the file (38000 bytes)"],
    );

    let mut b = fixture("one-group.sif");
    put_i64(&mut b, desc(0, 17), i64::MAX - 2);
    let bad = write_bad("overflow-object.sif", &b);
    inspect_fails(&bad, &["object 1", "past the end"]);
}

#[test]
fn no_primary_partition() {
    let mut b = fixture("one-group.sif");
    put_i32(&mut b, desc(1, 205), 1); // PrimSys -> System
    let bad = write_bad("no-primary.sif", &b);
    inspect_fails(&bad, &["no primary system partition"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::NoPrimaryPartition { .. })
    ));
}

#[test]
fn two_primary_partitions() {
    let mut b = fixture("one-group.sif");
    put_i32(&mut b, desc(0, 205), 2); // System -> PrimSys
    let bad = write_bad("two-primaries.sif", &b);
    inspect_fails(&bad, &["2 primary system partitions (objects 1, 2)"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::SeveralPrimaryPartitions { .. })
    ));
}

#[test]
fn ext3_primary_partition() {
    let mut b = fixture("two-groups.sif");
    put_i32(&mut b, desc(1, 205), 1); // the squashfs becomes System
    put_i32(&mut b, desc(2, 205), 2); // the ext3 becomes PrimSys
    let bad = write_bad("ext3-primary.sif", &b);
    inspect_fails(&bad, &["object 3", "Ext3, not squashfs"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::PrimaryNotSquashfs { .. })
    ));
}

#[test]
fn encrypted_primary_partition() {
    let mut b = fixture("one-group.sif");
    put_i32(&mut b, desc(1, 201), 5); // Squashfs -> Encrypted squashfs
    let bad = write_bad("encrypted.sif", &b);
    inspect_fails(&bad, &["encrypted", "object 2"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::PrimaryEncrypted { .. })
    ));
}

#[test]
fn corrupt_squashfs_superblock() {
    let mut b = fixture("one-group.sif");
    b[36864..36868].copy_from_slice(b"junk");
    let bad = write_bad("bad-magic-squashfs.sif", &b);
    inspect_fails(&bad, &["bad squashfs", "offset 36864", "no squashfs magic"]);
    assert!(matches!(
        locate(&bad.path),
        Err(ImageError::BadSquashfs { .. })
    ));

    let mut b = fixture("one-group.sif");
    b[36864 + 20] = 42; // unknown compression id
    let bad = write_bad("bad-compression.sif", &b);
    inspect_fails(&bad, &["bad squashfs", "unknown compression id 42"]);

    let mut b = fixture("one-group.sif");
    put_i64(&mut b, 36864 + 40, 1 << 30); // bytes_used past the partition
    let bad = write_bad("bad-size.sif", &b);
    inspect_fails(&bad, &["bad squashfs", "truncated?"]);
}

#[test]
fn corrupt_squashfs_tables() {
    let mut b = fixture("one-group.sif");
    // The inode and directory tables (after the 96-byte superblock) overwritten with garbage.
    for (i, x) in b[36864 + 96..36864 + 249].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(37) ^ 0xA5;
    }
    let bad = write_bad("bad-tables.sif", &b);
    inspect_fails(&bad, &["bad squashfs"]);
}

#[test]
fn plain_squashfs_that_is_corrupt() {
    let b = fixture("one-group.sif");
    let mut sq = b[36864..40960].to_vec();
    sq[28] = 3; // squashfs 3.x
    let bad = write_bad("old.squashfs", &sq);
    inspect_fails(&bad, &["bad squashfs", "version 3.0"]);
}

#[test]
fn image_for_another_architecture() {
    let mut b = fixture("one-group.sif");
    b[45..47].copy_from_slice(b"04");
    b[desc(1, 209)..desc(1, 209) + 2].copy_from_slice(b"04"); // 386 -> arm64
    let bad = write_bad("arm64.sif", &b);
    // inspect shows it, arch named, and succeeds: the image is fine, only not for this host.
    let out = Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(["image", "inspect"])
        .arg(&bad.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Primary Architecture: arm64"), "{stdout}");
    assert!(stdout.contains("FS (Squashfs/*System/arm64)"), "{stdout}");
    assert!(stdout.contains("cannot run"), "{stdout}");
    // Launching refuses it, naming both architectures.
    let err = locate(&bad.path).unwrap_err();
    assert!(matches!(err, ImageError::WrongArch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("arm64.sif") && msg.contains("built for arm64"),
        "{msg}"
    );
}
