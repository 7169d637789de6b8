//! The image mount backends (built-in FUSE server, squashfuse_ll, extraction), run by the test
//! user inside a real unprivileged user namespace through `cmpirun __mount-check`, compared
//! entry by entry with the image as backhand reads it.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const BACKENDS: [&str; 3] = ["fuse", "squashfuse", "extract"];

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tree with what a real image has: nested directories, a large incompressible file over
/// many blocks, small files packed into fragments, an empty file, a sparse file, symlinks
/// (relative, absolute, dangling), a fifo, odd names, and modes including read-only and private
/// directories and a setuid file.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| fs::write(root.join(p), data).unwrap();
    for d in [
        "usr/lib/deep/er",
        "etc",
        "ro",
        "private",
        "with space",
        "ünï",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    w("big.bin", &noise(3 * 1024 * 1024 + 12345, 7));
    w("usr/lib/exact.bin", &noise(256 * 1024, 9));
    for i in 0..60 {
        w(
            &format!("usr/lib/deep/small{i}.txt"),
            format!("small file {i}\n").repeat(i).as_bytes(),
        );
    }
    w("etc/hostname", b"image\n");
    w("empty", b"");
    w("with space/file name", b"spaces\n");
    w("ünï/ß.txt", "unicode\n".as_bytes());
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(2 * 1024 * 1024).unwrap();
    w("usr/lib/deep/er/leaf", b"leaf\n");
    symlink("lib/deep/small3.txt", root.join("usr/rel-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("no/such/file", root.join("dangling")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    w("private/secret", b"secret\n");
    // Hard links show as separate files; a device node is served by FUSE and left out of an
    // extraction (it needs privileges).
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname-link")).unwrap();
    nix::sys::stat::mknod(
        &root.join("etc/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    w("usr/bin-tool", b"#!/bin/sh\n");
    w("ro/readonly", b"ro\n");
    let chmod =
        |p: &str, m: u32| fs::set_permissions(root.join(p), fs::Permissions::from_mode(m)).unwrap();
    chmod("usr/bin-tool", 0o4755);
    chmod("ro/readonly", 0o444);
    chmod("ro", 0o555);
    chmod("private/secret", 0o600);
    chmod("private", 0o700);
}

/// Builds a squashfs of a fresh tree with `mksquashfs extra_args…`, readable by the test user.
fn build_image(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let image = dir.join(name);
    mksquashfs(&tree, &image, extra);
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
    image
}

/// A fresh, empty directory owned by the test user inside `dir`.
fn user_dir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir(&p).unwrap();
    chown_to_tuser(&p);
    p
}

fn mount_check(image: &Path, backend: &str, target: &Path, cache: &Path) -> TuserCommand {
    TuserCommand::cmpirun()
        .arg("__mount-check")
        .arg(image)
        .arg(backend)
        .arg("--target")
        .arg(target)
        .arg("--extract-cache")
        .arg(cache)
}

/// The report line of a finished `__mount-check`.
fn report(out: &RunOutput) -> serde_json::Value {
    let line = out.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no report from {}: {e}\n{out:?}", out.description))
}

fn verify_all_backends(image: &Path, work: &Path, offset: Option<u64>) {
    let cache = user_dir(work, "cache");
    for backend in BACKENDS {
        let target = user_dir(work, &format!("mnt-{backend}"));
        let before = Snapshot::take();
        let mut cmd = mount_check(image, backend, &target, &cache).arg("--verify");
        if let Some(off) = offset {
            cmd = cmd.arg("--offset").arg(off.to_string());
        }
        let out = cmd.run();
        out.assert_success();
        let mounted: serde_json::Value =
            serde_json::from_str(out.stdout.lines().next().unwrap_or_default()).unwrap();
        assert_eq!(
            mounted["threads"], 1,
            "{backend}: mounting left the caller multi-threaded"
        );
        let r = report(&out);
        assert_eq!(
            r["problems"],
            serde_json::json!([]),
            "{backend}: the mounted tree differs from the image"
        );
        assert!(
            r["files"].as_u64().unwrap() >= 65,
            "{backend}: too few files read: {r}"
        );
        assert!(r["bytes"].as_u64().unwrap() > 5_000_000, "{backend}: {r}");
        // The unmount ends the server's workers; that is not a worker lost while in use.
        assert!(
            !out.stderr.contains("image server:"),
            "{backend}: {}",
            out.stderr
        );
        assert_no_leftovers(&before, &[out.tag.as_str()]);
        if backend == "extract" {
            assert!(
                out.stderr.contains("extracting it into"),
                "extract says so once: {}",
                out.stderr
            );
        }
    }
}

#[test]
fn every_backend_serves_a_gzip_image_exactly() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let image = build_image(work.path(), "gzip.sqfs", &["-comp", "gzip"]);
    verify_all_backends(&image, work.path(), None);
}

#[test]
fn every_backend_serves_an_xz_image_with_small_blocks_at_an_offset() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let plain = build_image(work.path(), "xz.sqfs", &["-comp", "xz", "-b", "4096"]);
    // As inside a SIF: the squashfs starts after other data.
    let offset = 12345u64;
    let mut bytes = noise(offset as usize, 3);
    bytes.extend(fs::read(&plain).unwrap());
    let image = work.path().join("offset.img");
    fs::write(&image, bytes).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    verify_all_backends(&image, work.path(), Some(offset));
}

#[test]
fn zstd_and_lz4_images_are_served() {
    let _serial = exclusive();
    let work = TuserDir::new();
    for comp in ["zstd", "lz4"] {
        let image = build_image(work.path(), &format!("{comp}.sqfs"), &["-comp", comp]);
        let target = user_dir(work.path(), &format!("mnt-{comp}"));
        let cache = user_dir(work.path(), &format!("cache-{comp}"));
        let out = mount_check(&image, "fuse", &target, &cache)
            .arg("--verify")
            .run();
        out.assert_success();
        assert_eq!(report(&out)["problems"], serde_json::json!([]), "{comp}");
    }
}

/// SIGKILL of the process that owns the mount: the server goes with it, and nothing (process,
/// mount, FUSE connection) is left.
#[test]
fn fuse_servers_die_with_their_owner_on_sigkill() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let image = build_image(work.path(), "kill.sqfs", &[]);
    let cache = user_dir(work.path(), "cache");
    for backend in ["fuse", "squashfuse"] {
        let target = user_dir(work.path(), &format!("mnt-{backend}"));
        let ready = work.path().join(format!("ready-{backend}"));
        let before = Snapshot::take();
        let child = mount_check(&image, backend, &target, &cache)
            .arg("--hold")
            .arg("--ready-file")
            .arg(&ready)
            .timeout(Duration::from_secs(60))
            .spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            if let Ok(text) = fs::read_to_string(&ready)
                && text.ends_with('\n')
            {
                break text;
            }
            assert!(
                Instant::now() < deadline && !child.has_exited(),
                "{backend}: never mounted"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        let server = v["server_pid"].as_i64().expect("a server pid") as i32;
        assert!(
            Path::new(&format!("/proc/{server}")).exists(),
            "{backend}: server is running"
        );
        child.signal(nix::sys::signal::Signal::SIGKILL);
        let out = child.wait();
        assert_eq!(out.signal(), Some(9), "{backend}: {out:?}");
        let gone = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{server}")).exists() {
            assert!(
                Instant::now() < gone,
                "{backend}: server {server} outlived its owner"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_no_leftovers(&before, &[out.tag.as_str()]);
    }
}

/// Ranks of a node starting together extract the image once, and never see a partial tree.
#[test]
fn concurrent_extractions_share_one_cached_tree() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let image = build_image(work.path(), "shared.sqfs", &[]);
    let cache = user_dir(work.path(), "cache");
    // What a killed extraction leaves: a temporary tree (read-only inside) of a process that is
    // gone, which the next extraction removes; a live process's temporary is left alone.
    let dead = user_dir(&cache, "0123abcd.tmp-4194305");
    let inner = user_dir(&dead, "ro");
    fs::set_permissions(&inner, fs::Permissions::from_mode(0o555)).unwrap();
    let live = user_dir(&cache, &format!("4567ef.tmp-{}", std::process::id()));
    let children: Vec<_> = (0..3)
        .map(|i| {
            let target = user_dir(work.path(), &format!("mnt-{i}"));
            mount_check(&image, "extract", &target, &cache)
                .arg("--verify")
                .spawn()
        })
        .collect();
    for child in children {
        let out = child.wait();
        out.assert_success();
        assert_eq!(report(&out)["problems"], serde_json::json!([]));
    }
    assert!(!dead.exists(), "the dead extraction's temporary is removed");
    assert!(live.exists(), "a live extraction's temporary is kept");
    fs::remove_dir(&live).unwrap();
    let mut names: Vec<String> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "one tree and its lock file: {names:?}");
    assert!(names[1].ends_with(".lock") && names[1].starts_with(&names[0]));
}

#[test]
fn a_file_that_is_not_squashfs_fails_clearly_with_every_backend() {
    let work = TuserDir::new();
    let image = work.path().join("garbage.img");
    fs::write(&image, noise(100_000, 5)).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    let cache = user_dir(work.path(), "cache");
    for backend in BACKENDS {
        let target = user_dir(work.path(), &format!("mnt-{backend}"));
        let out = mount_check(&image, backend, &target, &cache)
            .arg("--offset")
            .arg("0")
            .run();
        out.assert_code(2);
        assert!(
            out.stderr.contains("garbage.img") && out.stderr.contains("squashfs"),
            "{backend}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
}

#[test]
fn an_unknown_backend_is_a_usage_error() {
    let work = TuserDir::new();
    let out = mount_check(
        Path::new("/nonexistent.sqfs"),
        "nfs",
        work.path(),
        work.path(),
    )
    .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("fuse, squashfuse or extract"),
        "{}",
        out.stderr
    );
}

/// A node without /dev/fuse (hidden for real in the check's own mount namespace): asking for a
/// FUSE backend fails with what to ask the site for; the automatic choice extracts and says so.
#[test]
fn without_dev_fuse_fuse_backends_fail_clearly_and_auto_extracts() {
    let work = TuserDir::new();
    let image = build_image(work.path(), "nofuse.sqfs", &[]);
    let cache = user_dir(work.path(), "cache");
    let target = user_dir(work.path(), "mnt");
    for backend in ["fuse", "squashfuse"] {
        let out = mount_check(&image, backend, &target, &cache)
            .arg("--hide-dev-fuse")
            .run();
        out.assert_code(2);
        assert!(
            out.stderr.contains("/dev/fuse")
                && out.stderr.contains("0666")
                && out.stderr.contains("--image-mount extract"),
            "{backend}: {}",
            out.stderr
        );
    }
    let out = mount_check(&image, "auto", &target, &cache)
        .arg("--hide-dev-fuse")
        .arg("--verify")
        .run();
    out.assert_success();
    assert!(
        out.stdout.contains("\"backend\":\"extract\""),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("extracting it into"), "{}", out.stderr);
    assert_eq!(report(&out)["problems"], serde_json::json!([]));
}

/// The real test images (SIF files: the squashfs sits at an offset found by `image::locate`)
/// through every backend, compared entry by entry with the image.
#[test]
fn the_test_images_mount_faithfully_with_every_backend() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let cache = user_dir(work.path(), "cache");
    for name in TEST_IMAGES {
        let image = staged_image(name);
        for backend in BACKENDS {
            let target = user_dir(work.path(), &format!("mnt-{name}-{backend}"));
            let before = Snapshot::take();
            let out = mount_check(&image, backend, &target, &cache)
                .arg("--verify")
                .run();
            out.assert_success();
            let r = report(&out);
            assert_eq!(r["problems"], serde_json::json!([]), "{name} via {backend}");
            assert!(
                r["files"].as_u64().unwrap() > 100,
                "{name} via {backend}: {r}"
            );
            assert_no_leftovers(&before, &[out.tag.as_str()]);
        }
    }
}

/// A data block that does not decompress (a corrupt image, or a disk error under it): every
/// read of it fails with EIO and the server says which file, while the rest of the image,
/// read in the same pass and in a second one, is served as before; no request is left
/// unanswered (a lost request would hang the reader until the test's timeout).
#[test]
fn a_corrupt_block_fails_its_reads_and_the_server_keeps_serving() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let tree = work.path().join("corrupt.tree");
    fs::create_dir_all(tree.join("small")).unwrap();
    // The only file with whole blocks, so its first block starts the data, right after the
    // 96-byte superblock (gzip with default options stores no compressor options).
    let text: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
    fs::write(tree.join("big.txt"), &text).unwrap();
    for i in 0..20 {
        fs::write(tree.join(format!("small/{i}.txt")), format!("small {i}\n")).unwrap();
    }
    let image = work.path().join("corrupt.sqfs");
    mksquashfs(&tree, &image, &["-comp", "gzip"]);
    let mut bytes = fs::read(&image).unwrap();
    for b in &mut bytes[96 + 16..96 + 48] {
        *b ^= 0x5a;
    }
    fs::write(&image, bytes).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();

    let target = user_dir(work.path(), "mnt");
    let cache = user_dir(work.path(), "cache");
    let before = Snapshot::take();
    let out = mount_check(&image, "fuse", &target, &cache)
        .arg("--passes")
        .arg("2")
        .timeout(Duration::from_secs(120))
        .run();
    out.assert_code(1);
    let reports: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "{out}");
    for r in &reports {
        let problems = r["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{r}");
        let p = problems[0].as_str().unwrap();
        assert!(
            p.contains("big.txt") && p.contains("os error 5"),
            "EIO for the corrupt file: {p}"
        );
        assert_eq!(r["files"], 20, "every other file is read: {r}");
    }
    assert!(
        out.stderr.contains("/big.txt") && out.stderr.contains("corrupt squashfs"),
        "the server names the file and the fault: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("image server:"),
        "no worker was lost: {}",
        out.stderr
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// A `squashfuse_ll` that never serves the mount (a wedged FUSE server, which cannot be caused
/// on purpose with the real one, so a stand-in that sleeps is found first on PATH): the start
/// gives up at its deadline with one line naming the image, the backend, the deadline and the
/// way out, and leaves no process, mount or temporary directory behind.
#[test]
fn a_squashfuse_ll_that_never_serves_times_out_and_leaves_nothing() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let image = build_image(work.path(), "hang.sqfs", &[]);
    let cache = user_dir(work.path(), "cache");
    let target = user_dir(work.path(), "mnt");
    let bin = work.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join("squashfuse_ll");
    fs::write(&fake, "#!/bin/sh\nexec sleep 300\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());

    let before = Snapshot::take();
    let started = Instant::now();
    let out = mount_check(&image, "squashfuse", &target, &cache)
        .env("PATH", &path)
        .env("CMPIRUN_MOUNT_TIMEOUT", "1.5")
        .timeout(Duration::from_secs(60))
        .run();
    let took = started.elapsed();
    out.assert_code(2);
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in [
        "hang.sqfs",
        "squashfuse",
        "1.5 s",
        "--image-mount extract",
        "CMPIRUN_MOUNT_TIMEOUT",
    ] {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);

    let out = mount_check(&image, "squashfuse", &target, &cache)
        .env("PATH", &path)
        .env("CMPIRUN_MOUNT_TIMEOUT", "soon")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("CMPIRUN_MOUNT_TIMEOUT") && out.stderr.contains("seconds"),
        "{}",
        out.stderr
    );
}
