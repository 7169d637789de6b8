//! The extract backend's cache: pruning of the least recently used entries beyond the size
//! limit, never the one just made nor one a running job holds, and `cmpirun image cache`.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A squashfs holding one incompressible file (`seed` makes each image distinct).
fn small_image(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    fs::create_dir(&tree).unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..512 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(tree.join("data.bin"), data).unwrap();
    let image = dir.join(name);
    mksquashfs(&tree, &image, &[]);
    image
}

/// Bytes a tree takes on disk, as the cache counts them.
fn tree_bytes(path: &Path) -> u64 {
    let meta = fs::symlink_metadata(path).unwrap();
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            total += tree_bytes(&e.unwrap().path());
        }
    }
    total
}

/// The cache's entry directories (not lock files or temporaries).
fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().contains('.'))
        .collect();
    out.sort();
    out
}

/// Extracts `image` into `cache` as the test user, with the cache limit `limit`; returns the
/// entry it used.
fn extract(work: &Path, image: &Path, cache: &Path, limit: u64) -> PathBuf {
    let before = entries(cache);
    let target = work.join("mnt");
    let out = TuserCommand::cmpirun()
        .arg("__mount-check")
        .arg(image)
        .arg("extract")
        .arg("--target")
        .arg(&target)
        .arg("--extract-cache")
        .arg(cache)
        .env("CMPIRUN_EXTRACT_CACHE_MAX", limit.to_string())
        .run();
    out.assert_success();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains(&cache.display().to_string()));
    let after = entries(cache);
    after
        .iter()
        .find(|p| !before.contains(p))
        .cloned()
        .or_else(|| {
            after
                .iter()
                .find(|p| line.is_some_and(|l| l.contains(&p.display().to_string())))
                .cloned()
        })
        .unwrap_or_else(|| panic!("no entry for {}: {out:?}", image.display()))
}

#[test]
fn the_least_recently_used_unused_entries_go_and_one_in_use_stays() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let xdg = work.path().join("xdg");
    fs::create_dir(&xdg).unwrap();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    for p in [&xdg, &mnt] {
        chown_to_tuser(p);
    }
    let cache = xdg.join("cmpirun/extract");

    // A running job holds the oldest entry.
    let held_image = staged_image("mpich4");
    let before = Snapshot::take();
    let job = TuserCommand::cmpirun()
        .args(["exec", "--image-mount", "extract"])
        .arg(&held_image)
        .args(["sleep", "600"])
        .env("XDG_CACHE_HOME", &xdg)
        .timeout(Duration::from_secs(300))
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    let held = loop {
        let listing = TuserCommand::cmpirun()
            .args(["image", "cache"])
            .env("XDG_CACHE_HOME", &xdg)
            .run();
        listing.assert_success();
        if let Some(line) = listing.stdout.lines().find(|l| l.ends_with("(in use)")) {
            let path = line.split_whitespace().rev().nth(2).unwrap();
            break PathBuf::from(path);
        }
        assert!(
            Instant::now() < deadline && !job.has_exited(),
            "the job never held its entry: {listing:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let held_bytes = tree_bytes(&held);
    // A second job of the same image uses the entry alongside the first (a shared lock), rather
    // than waiting for it to end.
    let second = TuserCommand::cmpirun()
        .args(["exec", "--image-mount", "extract"])
        .arg(&held_image)
        .arg("true")
        .env("XDG_CACHE_HOME", &xdg)
        .timeout(Duration::from_secs(60))
        .run();
    second.assert_success();
    assert!(
        second.stderr.contains("using the copy extracted in"),
        "{second}"
    );

    let images: Vec<PathBuf> = (0..4)
        .map(|i| small_image(work.path(), &format!("img{i}.sqfs"), i + 1))
        .collect();
    // Room for the held entry and two and a half small ones.
    let a = extract(work.path(), &images[0], &cache, u64::MAX);
    let small = tree_bytes(&a);
    let limit = held_bytes + 2 * small + small / 2;
    std::thread::sleep(Duration::from_millis(20));
    let b = extract(work.path(), &images[1], &cache, limit);
    std::thread::sleep(Duration::from_millis(20));
    let c = extract(work.path(), &images[2], &cache, limit);
    assert!(!a.exists(), "the oldest unused entry goes");
    assert!(b.exists() && c.exists(), "the newer ones stay");
    assert!(held.exists(), "the entry of the running job stays");
    assert!(!Path::new(&format!("{}.lock", a.display())).exists());

    // Using b again makes c the least recently used.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(extract(work.path(), &images[1], &cache, limit), b);
    std::thread::sleep(Duration::from_millis(20));
    let d = extract(work.path(), &images[3], &cache, limit);
    assert!(!c.exists(), "the least recently used entry goes");
    assert!(b.exists() && d.exists() && held.exists());

    // --clear keeps what is in use.
    let out = TuserCommand::cmpirun()
        .args(["image", "cache", "--clear"])
        .env("XDG_CACHE_HOME", &xdg)
        .run();
    out.assert_success();
    assert!(out.stdout.contains("removed 2 "), "{}", out.stdout);
    assert_eq!(entries(&cache), vec![held.clone()]);

    job.signal_group(nix::sys::signal::Signal::SIGKILL);
    let out = job.wait();
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    let out = TuserCommand::cmpirun()
        .args(["image", "cache", "--clear"])
        .env("XDG_CACHE_HOME", &xdg)
        .run();
    out.assert_success();
    assert!(entries(&cache).is_empty());
}

#[test]
fn a_bad_cache_limit_is_a_usage_error() {
    let work = TuserDir::new();
    let out = TuserCommand::cmpirun()
        .args(["image", "cache", "--dir"])
        .arg(work.path())
        .env("CMPIRUN_EXTRACT_CACHE_MAX", "lots")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("CMPIRUN_EXTRACT_CACHE_MAX") && out.stderr.trim().lines().count() == 1,
        "{}",
        out.stderr
    );
}
