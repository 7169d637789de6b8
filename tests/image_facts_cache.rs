//! The image facts cache: a second gathering of the same image is served from the cache without
//! reading the image's libraries; a corrupt entry is read afresh and rewritten; a cache folder that
//! cannot be written to changes nothing but the time; a changed image is read again.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cmpirun::facts::{FactsCache, ImageSummary, gather_images_with};
use common::{TuserCommand, TuserDir, staged_image};

fn gather(image: &Path, cache: &FactsCache) -> ImageSummary {
    let mut infos = gather_images_with(&[image.to_owned()], Some(cache));
    assert_eq!(infos.len(), 1);
    infos.remove(0)
}

fn entry_of(image: &Path, cache: &FactsCache) -> PathBuf {
    cache.entry_path(&FactsCache::key(image).expect("a SIF image has a cache key"))
}

#[test]
fn a_second_gathering_is_served_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = FactsCache::new(&tmp.path().join("facts"));
    let image = common::image("mpich4");
    let fresh = ImageSummary::read(&image);
    assert_eq!(fresh.mpi_family.as_deref(), Some("mpich"));

    let first = gather(&image, &cache);
    assert_eq!(first, fresh);
    let entry = entry_of(&image, &cache);
    assert!(entry.is_file(), "no entry at {}", entry.display());
    assert_eq!(
        fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Mark the entry: only a gathering that reads the cache and not the image can see the mark.
    let text = fs::read_to_string(&entry).unwrap();
    let marked = text.replace("\"mpich\"", "\"from-the-cache\"");
    assert_ne!(text, marked);
    fs::write(&entry, marked).unwrap();
    let second = gather(&image, &cache);
    assert_eq!(second.mpi_family.as_deref(), Some("from-the-cache"));
    assert_eq!(second.path, image, "the path is the one asked for");
}

#[test]
fn a_corrupt_entry_is_read_afresh_and_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = FactsCache::new(&tmp.path().join("facts"));
    let image = common::image("openmpi4");
    let fresh = gather(&image, &cache);
    assert_eq!(fresh.mpi_family.as_deref(), Some("openmpi"));
    let entry = entry_of(&image, &cache);
    for garbage in [&b""[..], b"{\"key\": 1", b"\x00\xff not json at all"] {
        fs::write(&entry, garbage).unwrap();
        assert_eq!(gather(&image, &cache), fresh);
        let rewritten: serde_json::Value =
            serde_json::from_slice(&fs::read(&entry).unwrap()).unwrap();
        assert_eq!(rewritten["value"]["mpi_family"], "openmpi");
    }
}

#[test]
fn an_unwritable_cache_folder_is_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder below a regular file can be neither created nor written, not even by root.
    let file = tmp.path().join("file");
    fs::write(&file, "").unwrap();
    let cache = FactsCache::new(&file.join("facts"));
    let image = common::image("mpich5");
    let info = gather(&image, &cache);
    assert_eq!(info, ImageSummary::read(&image));
    assert_eq!(info.mpi_family.as_deref(), Some("mpich"));
}

#[test]
fn a_changed_image_is_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = FactsCache::new(&tmp.path().join("facts"));
    let image = tmp.path().join("copy.sif");
    fs::copy(common::image("mpich4"), &image).unwrap();
    gather(&image, &cache);
    let before = entry_of(&image, &cache);
    let text = fs::read_to_string(&before).unwrap();
    fs::write(&before, text.replace("\"mpich\"", "\"from-the-cache\"")).unwrap();

    // Same bytes, new modification time: another identity, so the marked entry is not used.
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(f);
    assert_ne!(entry_of(&image, &cache), before);
    assert_eq!(
        gather(&image, &cache).mpi_family.as_deref(),
        Some("mpich"),
        "facts of the changed image were taken from the old entry"
    );
}

#[test]
fn several_images_keep_their_order_when_only_some_are_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = FactsCache::new(&tmp.path().join("facts"));
    let (mpich4, openmpi4, dir) = (
        common::image("mpich4"),
        common::image("openmpi4"),
        tmp.path().join("not-an-image"),
    );
    fs::create_dir(&dir).unwrap();
    gather(&openmpi4, &cache);
    let entry = entry_of(&openmpi4, &cache);
    let text = fs::read_to_string(&entry).unwrap();
    fs::write(&entry, text.replace("\"openmpi\"", "\"from-the-cache\"")).unwrap();
    let paths = [
        mpich4.clone(),
        openmpi4.clone(),
        dir.clone(),
        mpich4.clone(),
    ];
    let infos = gather_images_with(&paths, Some(&cache));
    let families: Vec<Option<&str>> = infos.iter().map(|i| i.mpi_family.as_deref()).collect();
    assert_eq!(
        families,
        [Some("mpich"), Some("from-the-cache"), None, Some("mpich")]
    );
    let given: Vec<&Path> = infos.iter().map(|i| i.path.as_path()).collect();
    assert_eq!(
        given,
        paths.iter().map(PathBuf::as_path).collect::<Vec<_>>()
    );
}

#[test]
fn old_entries_are_removed_past_256() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("facts");
    fs::create_dir(&dir).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    for i in 0..300 {
        let f = dir.join(format!("{i:032x}.json"));
        fs::write(&f, "{}").unwrap();
        let f = fs::OpenOptions::new().write(true).open(&f).unwrap();
        f.set_modified(old + std::time::Duration::from_secs(i))
            .unwrap();
    }
    fs::write(dir.join("unrelated.txt"), "").unwrap();
    let cache = FactsCache::new(&dir);
    let image = common::image("mpich5");
    gather(&image, &cache);
    let left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The newest 127 of the old ones, the new entry, and the file that is not an entry.
    assert_eq!(left.len(), 129, "{left:?}");
    assert!(left.contains(&format!("{:032x}.json", 299)));
    assert!(!left.contains(&format!("{:032x}.json", 172)));
    assert!(left.contains(&"unrelated.txt".to_owned()));
    assert!(entry_of(&image, &cache).is_file());
}

#[test]
fn directories_are_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(FactsCache::key(tmp.path()).is_none());
}

/// As the unprivileged user: `--dry-run` shows the same plan with and without a cache entry, and
/// with a cache folder it may not write to.
#[test]
fn dry_run_as_tuser_with_writable_and_read_only_caches() {
    let image = staged_image("mpich4");
    let work = TuserDir::new();
    let dry_run = |cache_home: &Path| {
        let out = TuserCommand::cmpirun()
            .env("XDG_CACHE_HOME", cache_home)
            // The library cache's folder is shown, and would differ with XDG_CACHE_HOME.
            .env("CMPIRUN_LIBRARY_CACHE", "/nonexistent/libraries")
            .args(["--dry-run", "-n", "1"])
            .arg(&image)
            .arg("/usr/local/bin/hello")
            .run();
        out.assert_success();
        assert!(
            out.stdout.contains("pass    mpi-family:"),
            "no mpi-family check in:\n{}",
            out.stdout
        );
        out.stdout
    };

    let writable = work.path().join("cache");
    let first = dry_run(&writable);
    let entries: Vec<_> = fs::read_dir(writable.join("cmpirun/facts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let second = dry_run(&writable);
    assert_eq!(first, second);

    // A root-owned folder the user may read but not write, like a read-only home.
    let read_only = work.path().join("read-only");
    fs::create_dir(&read_only).unwrap();
    fs::set_permissions(&read_only, fs::Permissions::from_mode(0o755)).unwrap();
    // The same plan; only the caches' folders named in its node state differ.
    assert_eq!(
        dry_run(&read_only).replace(read_only.to_str().unwrap(), writable.to_str().unwrap()),
        first
    );
    assert!(!read_only.join("cmpirun").exists());
}
