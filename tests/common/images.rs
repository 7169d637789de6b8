//! The test images and the binary under test, staged where the test user can read them.
//!
//! Where images come from: `$CMPIRUN_TEST_IMAGES` if set (a folder holding `<name>.sif`), otherwise
//! `<repo>/.cache/images`. Until `cmpirun image pack` exists, an image may be a plain squashfs file
//! `<name>.sqfs`; [`image`] accepts either and prefers `.sif`.

use std::collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher};
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The three test images every container and launch test can count on.
pub const TEST_IMAGES: [&str; 3] = ["mpich4", "mpich5", "openmpi4"];

/// The root of the source tree (where `Cargo.toml` of the cmpirun package is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder the test images are read from: `$CMPIRUN_TEST_IMAGES` or `<repo>/.cache/images`.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("CMPIRUN_TEST_IMAGES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join(".cache/images"),
    }
}

/// The path of test image `name` (`mpich4`, `mpich5`, `openmpi4`, `demo`) where the build put it.
///
/// Panics with the command to run when the image has not been built. The path may not be
/// readable by [`TEST_USER`](super::TEST_USER); give that user [`staged_image`] instead.
pub fn image(name: &str) -> PathBuf {
    let dir = images_dir();
    for ext in ["sif", "sqfs"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "test image {name:?} not found in {}: build the test images with `ci/build-images.sh` \
         (or point CMPIRUN_TEST_IMAGES at a folder that holds {name}.sif)",
        dir.display()
    );
}

/// A copy of test image `name` that [`TEST_USER`](super::TEST_USER) can read, in [`stage_dir`].
///
/// A hard link when the image is on the same file system, otherwise a copy; done once per image
/// and per test process, and skipped when the staged file is already current.
pub fn staged_image(name: &str) -> PathBuf {
    let src = image(name);
    let file_name = src
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_else(|| name.into());
    stage_once(&src, &file_name, 0o644)
}

/// A copy of the `cmpirun` binary under test that [`TEST_USER`](super::TEST_USER) can execute,
/// in [`stage_dir`].
///
/// The build's own binary may sit under a folder the test user cannot enter (a clone under
/// `/root`), hence the copy.
///
/// It is staged as an installation would lay it out, `<stage>/bin/cmpirun` next to
/// `<stage>/share/cmpirun/profiles/` holding the repository's `profiles/`, because cmpirun looks
/// for its shipped profiles beside its own binary and the source tree may be unreadable.
pub fn cmpirun_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin_dir = stage_dir().join("bin");
        let profiles = stage_dir().join("share/cmpirun/profiles");
        for dir in [&bin_dir, &profiles] {
            fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        for dir in [
            stage_dir().join("share"),
            stage_dir().join("share/cmpirun"),
            bin_dir.clone(),
            profiles.clone(),
        ] {
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        }
        let shipped = repo_root().join("profiles");
        let mut wanted = BTreeSet::new();
        if let Ok(entries) = fs::read_dir(&shipped) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    stage_file(&e.path(), &profiles.join(e.file_name()), 0o644);
                    wanted.insert(e.file_name());
                }
            }
        }
        // A profile removed from the source tree must not linger in the staged copy.
        if let Ok(entries) = fs::read_dir(&profiles) {
            for e in entries.flatten() {
                if !wanted.contains(&e.file_name()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let bin = bin_dir.join("cmpirun");
        stage_file(Path::new(env!("CARGO_BIN_EXE_cmpirun")), &bin, 0o755);
        bin
    })
    .clone()
}

/// A world-readable folder for staged images and binaries, one per source tree:
/// `/var/tmp/cmpirun-test-<hash of the repo path>`.
pub fn stage_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut h = DefaultHasher::new();
        repo_root().hash(&mut h);
        let dir = PathBuf::from(format!("/var/tmp/cmpirun-test-{:08x}", h.finish() as u32));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.display()));
        dir
    })
    .clone()
}

fn stage_once(src: &Path, name: &OsStr, mode: u32) -> PathBuf {
    static STAGED: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dst) = staged.get(src) {
        return dst.clone();
    }
    let dst = stage_dir().join(name);
    stage_file(src, &dst, mode);
    staged.insert(src.to_path_buf(), dst.clone());
    dst
}

/// Put `src` at `dst` (hard link or copy), atomically, unless `dst` already holds the same bytes.
fn stage_file(src: &Path, dst: &Path, mode: u32) {
    let meta = fs::metadata(src).unwrap_or_else(|e| panic!("cannot stat {}: {e}", src.display()));
    if let Ok(old) = fs::metadata(dst) {
        let same_inode = old.dev() == meta.dev() && old.ino() == meta.ino();
        let same_copy = old.len() == meta.len()
            && old.mtime() == meta.mtime()
            && old.mtime_nsec() == meta.mtime_nsec();
        if (same_inode || same_copy) && old.mode() & 0o777 == mode {
            return;
        }
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = dst.with_file_name(format!(
        ".stage.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&tmp);
    // A binary is always copied: cargo rewrites it in place, and a link would follow the old inode.
    let linked = mode & 0o111 == 0 && fs::hard_link(src, &tmp).is_ok();
    if !linked {
        // Copied by a `cp` process, not in this one: a test thread forking at that moment would
        // inherit a descriptor open for writing on the copy, and the exec of the staged binary
        // by another thread would fail with "text file busy" until that child execs.
        let status = Command::new("cp")
            .arg("--preserve=timestamps")
            .arg(src)
            .arg(&tmp)
            .status()
            .unwrap_or_else(|e| panic!("cannot run cp: {e}"));
        assert!(
            status.success(),
            "cannot copy {} to {}: cp {status}",
            src.display(),
            tmp.display()
        );
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    fs::rename(&tmp, dst)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), dst.display()));
}

/// Packs `tree` into the squashfs `image` (`mksquashfs TREE IMAGE -noappend -quiet -no-progress
/// extra…`) and makes the image readable by the test user.
pub fn mksquashfs(tree: &Path, image: &Path, extra: &[&str]) {
    let out = Command::new("mksquashfs")
        .arg(tree)
        .arg(image)
        .args(["-noappend", "-quiet", "-no-progress"])
        .args(extra)
        .output()
        .expect("mksquashfs (squashfs-tools) must be installed");
    assert!(
        out.status.success(),
        "mksquashfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::set_permissions(image, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Unpacks the root of SIF image `src` into `tree` (as root, with `unsquashfs`), replacing what
/// `tree` held.
pub fn unpack_image(src: &Path, tree: &Path) {
    let loc = cmpirun::image::locate(src).unwrap();
    let _ = fs::remove_dir_all(tree);
    let st = Command::new("unsquashfs")
        .args(["-q", "-n", "-o", &loc.squashfs_offset.to_string(), "-d"])
        .arg(tree)
        .arg(src)
        .status()
        .expect("unsquashfs (squashfs-tools) must be installed");
    assert!(st.success(), "unsquashfs of {} failed", src.display());
}

/// The content of `/etc/mpmd-marker`, which only a [`second_image`] has.
pub const MPMD_MARKER: &str = "second-image";

/// Test image `name` repacked as a second image for MPMD jobs, `<name>-mpmd.sif` in the stage
/// folder: the same root (so the same MPI) plus `/etc/mpmd-marker`, and its environment script
/// sets `CMPIRUN_TEST_IMAGE=<name>-mpmd`. Built once (as root, with `unsquashfs` and `cmpirun
/// image pack`), again when image `name` changes.
pub fn second_image(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let src = image(name);
    let out = stage_dir().join(format!("{name}-mpmd.sif"));
    let fresh = match (fs::metadata(&out), fs::metadata(&src)) {
        (Ok(o), Ok(s)) => o.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    if !fresh {
        let tree = stage_dir().join(format!("mpmd-root.{}", std::process::id()));
        unpack_image(&src, &tree);
        let env = tree.join(".singularity.d/env/90-environment.sh");
        let text = fs::read_to_string(&env).unwrap();
        fs::write(
            &env,
            text.replace(
                &format!("CMPIRUN_TEST_IMAGE=\"{name}\""),
                &format!("CMPIRUN_TEST_IMAGE=\"{name}-mpmd\""),
            ),
        )
        .unwrap();
        fs::write(tree.join("etc/mpmd-marker"), format!("{MPMD_MARKER}\n")).unwrap();
        let tmp = stage_dir().join(format!(".{name}-mpmd.{}.sif", std::process::id()));
        let st = Command::new(cmpirun_bin())
            .args(["image", "pack", "-o"])
            .arg(&tmp)
            .arg(&tree)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        fs::remove_dir_all(&tree).unwrap();
        assert!(st.success(), "cmpirun image pack failed");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&tmp, &out).unwrap();
    }
    built.insert(name.to_owned(), out.clone());
    out
}
