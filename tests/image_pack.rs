//! `cmpirun image pack` writes a SIF laid out exactly as the reference writer does, whose
//! squashfs holds the tree with its modes, owners, symlinks and times; `image inspect` reads it
//! back.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use cmpirun::image::rootfs::NodeKind;
use cmpirun::image::sif::{self, Arch};
use cmpirun::image::{ImageKind, locate, open_rootfs};

fn cmpirun(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(args)
        .output()
        .unwrap()
}

fn pack(src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "image".as_ref(),
        "pack".as_ref(),
        src.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    let out = cmpirun(&args);
    assert!(
        out.status.success(),
        "pack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small tree with everything pack must keep.
fn tree(root: &Path) -> PathBuf {
    let t = root.join("tree");
    fs::create_dir_all(t.join("usr/lib")).unwrap();
    fs::create_dir_all(t.join(".singularity.d/env")).unwrap();
    fs::write(t.join("usr/lib/libdemo.so.1"), vec![0x5a; 300_000]).unwrap();
    fs::write(t.join("empty"), b"").unwrap();
    fs::write(t.join("secret"), b"only root").unwrap();
    fs::set_permissions(t.join("secret"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(
        t.join(".singularity.d/env/90-environment.sh"),
        b"export DEMO=1\n",
    )
    .unwrap();
    fs::write(
        t.join(".singularity.d/runscript"),
        b"#!/bin/sh\nexec \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(
        t.join(".singularity.d/runscript"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("usr/lib", t.join("lib")).unwrap();
    symlink("libdemo.so.1", t.join("usr/lib/libdemo.so")).unwrap();
    let when = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    fs::File::options()
        .write(true)
        .open(t.join("usr/lib/libdemo.so.1"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    t
}

#[test]
fn deterministic_pack_is_laid_out_as_the_reference_writer_does() {
    let dir = tempfile::tempdir().unwrap();
    let src = tree(dir.path());
    let out = dir.path().join("out.sif");
    pack(&src, &out, &["--deterministic"]);
    let b = fs::read(&out).unwrap();
    let len = b.len() as i64;
    let i64_at = |o: usize| i64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());

    // Header (§1.1).
    assert_eq!(&b[0..32], b"#!/usr/bin/env run-singularity\n\0");
    assert_eq!(&b[32..42], b"SIF_MAGIC\0");
    assert_eq!(&b[42..45], b"01\0");
    assert_eq!(
        &b[45..48],
        &Arch::host().0,
        "header arch is the PrimSys arch"
    );
    assert_eq!(&b[48..64], &[0u8; 16], "deterministic: zero UUID");
    assert_eq!(i64_at(64), sif::GO_ZERO_TIME);
    assert_eq!(i64_at(72), sif::GO_ZERO_TIME);
    assert_eq!(i64_at(80), 47, "DescriptorsFree");
    assert_eq!(i64_at(88), 48, "DescriptorsTotal");
    assert_eq!(i64_at(96), 4096, "DescriptorsOffset");
    assert_eq!(i64_at(104), 48 * 585, "DescriptorsSize");
    assert_eq!(i64_at(112), 32176, "DataOffset");
    assert!(b[128..4096].iter().all(|&x| x == 0), "gap after header");

    // The one descriptor (§1.2, §1.3), the partition aligned to 4096 (§1.4).
    let d = 4096;
    assert_eq!(u32_at(d), 0x4004, "DataType Partition");
    assert_eq!(b[d + 4], 1, "Used");
    assert_eq!(u32_at(d + 5), 1, "ID");
    assert_eq!(u32_at(d + 9), 0xF000_0001, "GroupID");
    assert_eq!(u32_at(d + 13), 0, "LinkedID");
    let (off, size, padded) = (i64_at(d + 17), i64_at(d + 25), i64_at(d + 33));
    assert_eq!(off, 32768);
    assert_eq!(off + size, len, "the partition ends the file");
    assert_eq!(padded, off - 32176 + size, "SizeWithPadding");
    assert_eq!(i64_at(120), padded, "DataSize");
    assert_eq!(i64_at(d + 41), sif::GO_ZERO_TIME);
    assert_eq!(i64_at(d + 49), sif::GO_ZERO_TIME);
    assert_eq!(u32_at(d + 201), 1, "Fstype Squash");
    assert_eq!(u32_at(d + 205), 2, "Parttype PrimSys");
    assert_eq!(&b[d + 209..d + 212], &Arch::host().0);
    assert!(b[d + 212..d + 585].iter().all(|&x| x == 0), "rest of Extra");
    assert!(
        b[d + 585..4096 + 48 * 585].iter().all(|&x| x == 0),
        "unused slots are zero"
    );
    assert!(b[32176..32768].iter().all(|&x| x == 0), "alignment padding");
    assert_eq!(&b[32768..32772], b"hsqs");
    assert_eq!(fs::metadata(&out).unwrap().mode() & 0o777, 0o755);

    // Same tree, same bytes.
    let again = dir.path().join("again.sif");
    pack(&src, &again, &["--deterministic"]);
    assert!(fs::read(&again).unwrap() == b, "deterministic packs differ");
}

#[test]
fn pack_then_inspect_and_read_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let src = tree(dir.path());
    let out = dir.path().join("rt.sif");
    pack(&src, &out, &[]);

    let inspect = cmpirun(&[
        "image".as_ref(),
        "inspect".as_ref(),
        out.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(j["kind"], "sif");
    assert_eq!(j["sif"]["launch_script"], "#!/usr/bin/env run-singularity");
    assert_eq!(j["sif"]["primary_arch"], Arch::host().name());
    assert_ne!(j["sif"]["id"], "00000000-0000-0000-0000-000000000000");
    assert_eq!(
        j["sif"]["objects"][0]["type_label"],
        format!("FS (Squashfs/*System/{})", Arch::host())
    );
    assert_eq!(j["root_filesystem"]["offset"], 32768);
    assert_eq!(j["root_filesystem"]["squashfs"]["compression"], "zstd");
    assert_eq!(j["root_filesystem"]["squashfs"]["block_size"], 131072);
    assert!(j["facts"]["runscript"].is_string(), "{j}");

    let loc = locate(&out).unwrap();
    assert_eq!(loc.kind, ImageKind::Sif);
    let fs_ = open_rootfs(&loc).unwrap();
    for (path, host) in [
        ("/usr/lib/libdemo.so.1", "usr/lib/libdemo.so.1"),
        ("/empty", "empty"),
        ("/secret", "secret"),
        ("/.singularity.d/runscript", ".singularity.d/runscript"),
    ] {
        let m = fs_.metadata(path).unwrap().unwrap();
        let hm = fs::metadata(src.join(host)).unwrap();
        assert_eq!(m.kind, NodeKind::File, "{path}");
        assert_eq!(m.mode, hm.mode() & 0o7777, "{path} mode");
        assert_eq!(
            fs_.read_file(path).unwrap(),
            fs::read(src.join(host)).unwrap(),
            "{path}"
        );
    }
    assert_eq!(fs_.read_link("/lib").unwrap(), "usr/lib");
    assert_eq!(
        fs_.read_link("/usr/lib/libdemo.so").unwrap(),
        "libdemo.so.1"
    );

    // Owners and times, as the reference squashfs tools list them.
    let listing = Command::new("unsquashfs")
        .args(["-lln", "-o", "32768"])
        .arg(&out)
        .output()
        .expect("unsquashfs (squashfs-tools) is needed for this test");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing
        .lines()
        .find(|l| l.ends_with("/usr/lib/libdemo.so.1"))
        .unwrap_or_else(|| panic!("libdemo.so.1 missing from:\n{listing}"));
    let host = fs::metadata(src.join("usr/lib/libdemo.so.1")).unwrap();
    assert!(
        line.contains(&format!("{}/{}", host.uid(), host.gid())),
        "owner: {line}"
    );
    assert!(line.contains("2020-09-13"), "mtime 1600000000: {line}");
}

#[test]
fn every_compression_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let src = tree(dir.path());
    for comp in ["zstd", "gzip", "xz", "lz4"] {
        let out = dir.path().join(format!("{comp}.sif"));
        pack(&src, &out, &["--compression", comp]);
        let loc = locate(&out).unwrap();
        let fs_ = open_rootfs(&loc).unwrap();
        assert_eq!(
            fs_.read_file("/usr/lib/libdemo.so.1").unwrap().len(),
            300_000,
            "{comp}"
        );
        let info = cmpirun::image::squash::superblock(&out, loc.squashfs_offset, loc.squashfs_size)
            .unwrap();
        assert_eq!(info.compression, comp);
    }
}

#[test]
fn packing_a_file_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let out = dir.path().join("x.sif");
    let r = cmpirun(&[
        "image".as_ref(),
        "pack".as_ref(),
        file.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not-a-dir: not a directory"), "{stderr}");
    assert!(!out.exists());
    // No temporary file left next to the output.
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
}

#[test]
fn plain_squashfs_files_and_directories_are_inspected_too() {
    let dir = tempfile::tempdir().unwrap();
    let src = tree(dir.path());
    let sif_path = dir.path().join("img.sif");
    pack(&src, &sif_path, &[]);
    let bytes = fs::read(&sif_path).unwrap();
    let sqfs = dir.path().join("img.squashfs");
    fs::write(&sqfs, &bytes[32768..]).unwrap();

    for (path, kind) in [(&sqfs, "squashfs"), (&src, "directory")] {
        let out = cmpirun(&[
            "image".as_ref(),
            "inspect".as_ref(),
            path.as_os_str(),
            "--json".as_ref(),
        ]);
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["kind"], kind);
        assert!(j["sif"].is_null());
        assert_eq!(
            j["facts"]["runscript"], "#!/bin/sh\nexec \"$@\"\n",
            "{kind}: {j}"
        );
        let text = cmpirun(&["image".as_ref(), "inspect".as_ref(), path.as_os_str()]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("Environment scripts: 90-environment.sh"),
            "{kind}: {text}"
        );
    }
    let j: serde_json::Value = serde_json::from_slice(
        &cmpirun(&[
            "image".as_ref(),
            "inspect".as_ref(),
            sqfs.as_os_str(),
            "--json".as_ref(),
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(j["root_filesystem"]["offset"], 0);
    assert_eq!(j["root_filesystem"]["squashfs"]["compression"], "zstd");
}
