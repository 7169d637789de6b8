//! The library cache: a launch stacks the node's unpacked copy of the image's C library and MPI
//! stack over the image's files (same bytes), fills it once, adds the ELF files earlier jobs
//! loaded through the mount, and does without it when it is off, unusable, or the image is
//! extracted anyway.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn cmpirun(cache: &Path) -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_LIBRARY_CACHE", cache)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
}

/// The inode number of `path` inside the container (a copy in the library cache shows its own),
/// and the file's SHA-256 there.
fn script(path: &str) -> String {
    format!("stat -L -c 'inode %i' {path}; sha256sum {path}")
}

/// The inode number [`script`] printed.
fn inode(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("inode ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no inode line in {text:?}"))
}

/// The inode number of a host file.
fn host_inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

/// Runs `cmd` (cmpirun with its flags) as a one-rank job of [`script`] for `path` in `image`;
/// records the run's tag for the leftover check.
fn run_script(cmd: TuserCommand, image: &Path, path: &str, tags: &mut Vec<String>) -> RunOutput {
    let out = cmd
        .args(["-n", "1"])
        .arg(image)
        .args(["sh", "-c", &script(path)])
        .run();
    tags.push(out.tag.clone());
    out
}

fn sha256(text: &str) -> String {
    text.lines()
        .find_map(|l| {
            let (sum, _) = l.split_once("  ")?;
            (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sum.to_owned())
        })
        .unwrap_or_else(|| panic!("no sha256sum line in {text:?}"))
}

/// The cache's entry directories of the MPI stack (not lock files, nor the entries of loaded
/// files).
fn entries(cache: &Path) -> Vec<PathBuf> {
    all_entries(cache)
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("-loads-"))
        .collect()
}

/// All the cache's entry directories.
fn all_entries(cache: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(cache) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_dir())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

/// The `--dry-run --json` plan of a one-rank `hello` job of `image` with the library cache
/// `cache`, and the run that printed it.
fn dry_run_plan(cache: &Path, image: &Path) -> (serde_json::Value, RunOutput) {
    let out = cmpirun(cache)
        .args(["--dry-run", "--json", "-n", "1"])
        .arg(image)
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_success();
    let plan = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    (plan, out)
}

/// The image path of the MPI library (a regular file: symlinks resolved) in a `--dry-run --json`
/// plan.
fn mpi_library(plan: &serde_json::Value) -> String {
    plan["apps"][0]["image"]["mpi_library"]
        .as_str()
        .unwrap_or_else(|| panic!("no mpi_library: {plan}"))
        .to_owned()
}

#[test]
fn the_mpi_stack_and_the_loaded_files_are_served_from_the_library_cache() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection that the
    // leftover checks of the other tests would count.
    let _serial = exclusive();
    let work = TuserDir::new();
    let cache = work.path().join("libraries");
    let image = staged_image("mpich4");
    let before = Snapshot::take();
    let mut tags = Vec::new();

    // The plan names the cache and the files.
    let (plan, out) = dry_run_plan(&cache, &image);
    assert_eq!(
        plan["mount"]["library_cache"].as_str(),
        Some(cache.to_str().unwrap()),
        "{out}"
    );
    let files: Vec<String> = plan["apps"][0]["image"]["stack_files"]
        .as_array()
        .unwrap_or_else(|| panic!("no stack_files: {out}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let mpi = mpi_library(&plan);
    assert!(files.contains(&mpi), "{files:?}");
    assert!(files.iter().any(|f| f.ends_with("/libc.so.6")), "{files:?}");

    // The first launch unpacks them and serves the copies.
    let out = run_script(cmpirun(&cache).arg("-v"), &image, &mpi, &mut tags);
    out.assert_success();
    assert!(out.stderr.contains("unpacking its MPI stack"), "{out}");
    let entry = match entries(&cache).as_slice() {
        [one] => one.clone(),
        other => panic!("expected one cache entry, found {other:?}"),
    };
    let copy = entry.join(mpi.trim_start_matches('/'));
    assert_eq!(inode(&out.stdout), host_inode(&copy), "{out}");
    for f in &files {
        assert!(
            entry.join(f.trim_start_matches('/')).is_file(),
            "{f} not in {}",
            entry.display()
        );
    }
    // The copy holds the image's bytes.
    let in_container = sha256(&out.stdout);
    let image_copy = cmpirun(&cache)
        .arg("exec")
        .arg(&image)
        .args(["sha256sum", &mpi])
        .run();
    tags.push(image_copy.tag.clone());
    image_copy.assert_success();
    assert_eq!(in_container, sha256(&image_copy.stdout));

    // The ELF files the job loaded through the mount (the shell, the dynamic loader) are listed
    // for the next job; the MPI stack, served from the cache, is not.
    let loads = cache.join(format!(
        "{}.loads",
        entry.file_name().unwrap().to_string_lossy()
    ));
    let listed = |what: &str| -> Vec<String> {
        let text = std::fs::read_to_string(&loads)
            .unwrap_or_else(|e| panic!("{}: {e} ({what})", loads.display()));
        let list: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        // The names the ranks looked up are listed too (the next instance looks them up
        // before it starts the ranks).
        assert!(
            list["names"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n == "/etc/ld.so.cache")),
            "{text}"
        );
        serde_json::from_value(list["files"].clone()).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let first = listed("after the first job");
    assert!(first.iter().any(|f| f.contains("ld-linux")), "{first:?}");
    assert!(!first.contains(&mpi), "{first:?}");

    // Later launches use the stack's entry as it is, unpack the listed files into an entry of
    // their own, and MPI runs from them.
    let out = cmpirun(&cache)
        .args(["-v", "-n", "2"])
        .arg(&image)
        .arg("/usr/local/bin/mpitest")
        .run();
    tags.push(out.tag.clone());
    assert_mpitest_ok(&out, 2);
    assert!(!out.stderr.contains("unpacking its MPI stack"), "{out}");
    assert!(
        out.stderr
            .contains("files its ranks loaded through the mount"),
        "{out}"
    );
    assert_eq!(entries(&cache), vec![entry.clone()]);
    let second = listed("after the second job");
    assert!(
        second.contains(&"/usr/local/bin/mpitest".to_owned()),
        "{second:?}"
    );
    // The next job finds the program in the cache.
    let out = run_script(cmpirun(&cache), &image, "/usr/local/bin/mpitest", &mut tags);
    out.assert_success();
    let served = inode(&out.stdout);
    assert!(
        all_entries(&cache)
            .iter()
            .any(|e| e.join("usr/local/bin/mpitest").is_file()
                && host_inode(&e.join("usr/local/bin/mpitest")) == served),
        "{out}"
    );
    let copy_inode = host_inode(&copy);

    // Off, or with the image extracted anyway: the image's own file, and no cache made.
    let other = work.path().join("other");
    for (setting, flags) in [
        ("off", &[][..]),
        (other.to_str().unwrap(), &["--image-mount", "extract"][..]),
    ] {
        let cmd = TuserCommand::cmpirun()
            .env("CMPIRUN_LIBRARY_CACHE", setting)
            .timeout(Duration::from_secs(300))
            .args(flags);
        let out = run_script(cmd, &image, &mpi, &mut tags);
        out.assert_success();
        assert_ne!(inode(&out.stdout), copy_inode, "{setting}: {out}");
        assert_eq!(sha256(&out.stdout), in_container);
    }
    assert!(!other.exists());

    // A cache that cannot be made: a warning, and the job runs from the image.
    let cmd = cmpirun(Path::new("/proc/cmpirun-library-cache"));
    let out = run_script(cmd, &image, &mpi, &mut tags);
    out.assert_success();
    assert!(
        out.stderr
            .contains("library cache /proc/cmpirun-library-cache")
            && out.stderr.contains("CMPIRUN_LIBRARY_CACHE=off"),
        "{out}"
    );
    assert_ne!(inode(&out.stdout), copy_inode, "{out}");

    // A cache on a noexec filesystem could not be loaded from: not used, with a warning.
    // (It is mounted inside /var/tmp, which the container binds with the mounts below it.)
    let noexec = TestTmpfs::mount(&work.path().join("noexec"), nix::mount::MsFlags::MS_NOEXEC);
    let out = run_script(
        cmpirun(&noexec.0.join("libraries")),
        &image,
        &mpi,
        &mut tags,
    );
    drop(noexec);
    out.assert_success();
    assert!(out.stderr.contains("noexec"), "{out}");
    assert_ne!(inode(&out.stdout), copy_inode, "{out}");

    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

#[test]
fn a_site_profile_moves_the_library_cache() {
    let work = TuserDir::new();
    let dir = work.path().join("node-local");
    let profile = work.path().join("site.yaml");
    std::fs::write(
        &profile,
        format!("name: site\nlibrary_cache: {}/$USER\n", dir.display()),
    )
    .unwrap();
    let expected = dir.join(TEST_USER);
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_PROFILE", &profile)
        .args(["--dry-run", "-n", "1"])
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_success();
    assert!(
        out.stdout.contains(&format!(
            "library cache: {} (profile site sets library_cache:",
            expected.display()
        )),
        "{out}"
    );
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_PROFILE", &profile)
        .args(["image", "cache"])
        .run();
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("{}: 0 library-cache entries", expected.display())),
        "{out}"
    );
}

/// Makes the cached copy `copy` shorter, as a full disk or a user's mistake would.
fn truncate(copy: &Path) {
    let mut perm = std::fs::metadata(copy).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(copy, perm).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(copy)
        .and_then(|f| f.set_len(4096))
        .unwrap();
}

#[test]
fn a_damaged_library_cache_entry_is_unpacked_again_or_left_out() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let cache = work.path().join("libraries");
    let image = staged_image("mpich4");
    let before = Snapshot::take();
    let mut tags = Vec::new();
    let mpi = &mpi_library(&dry_run_plan(&cache, &image).0);
    let out = run_script(cmpirun(&cache), &image, mpi, &mut tags);
    out.assert_success();
    let entry = match entries(&cache).as_slice() {
        [one] => one.clone(),
        other => panic!("expected one cache entry, found {other:?}"),
    };
    let image_sum = sha256(&out.stdout);
    let real = entry.join(mpi.trim_start_matches('/'));
    let len = std::fs::metadata(&real).unwrap().len();

    // No job holds the entry: it is unpacked again, and MPI runs from it.
    truncate(&real);
    let out = cmpirun(&cache)
        .args(["-n", "2"])
        .arg(&image)
        .arg("/usr/local/bin/mpitest")
        .run();
    tags.push(out.tag.clone());
    assert_mpitest_ok(&out, 2);
    assert!(
        out.stderr
            .contains("the entry was damaged; unpacked it again"),
        "{out}"
    );
    assert_eq!(std::fs::metadata(&real).unwrap().len(), len);

    // A running job holds it: the damaged copy is left out (read through the image mount), with
    // a warning, and the job runs.
    let holder = cmpirun(&cache)
        .args(["-n", "1"])
        .arg(&image)
        .args(["sleep", "60"])
        .spawn();
    // Held: its lock cannot be taken exclusively.
    let lock = entry.with_extension("lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let file = std::fs::File::open(&lock).unwrap();
        if nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the holder did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    truncate(&real);
    let out = run_script(cmpirun(&cache), &image, mpi, &mut tags);
    out.assert_success();
    assert!(
        out.stderr.contains("is damaged") && out.stderr.contains("another job uses the entry"),
        "{out}"
    );
    assert_eq!(sha256(&out.stdout), image_sum, "the image's bytes: {out}");
    holder.kill_all();
    tags.push(holder.tag().to_owned());
    drop(holder.wait());
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}
