//! Folders the test user's runs work in: a scratch folder, a tmpfs mounted for a test, and the
//! user's rendezvous folder.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{TuserCommand, chown_to_tuser, stage_dir, tuser};

/// A folder owned by [`TEST_USER`](super::TEST_USER) inside [`stage_dir`], removed (as root)
/// when dropped.
///
/// Use it as the working directory or output folder of a run, instead of a folder under `/tmp`.
pub struct TuserDir {
    path: PathBuf,
}

impl TuserDir {
    /// Creates a fresh, empty folder owned by the test user.
    pub fn new() -> TuserDir {
        let parent = stage_dir().join("work");
        fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        let _ = fs::set_permissions(&parent, fs::Permissions::from_mode(0o755));
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = parent.join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        chown_to_tuser(&path);
        TuserDir { path }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TuserDir {
    fn default() -> Self {
        TuserDir::new()
    }
}

impl Drop for TuserDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A tmpfs mounted (by the test, as root) on a new folder `dir` owned by the test user, with
/// extra mount `flags` (`MS_NOEXEC`, as some sites mount `/tmp`); unmounted when dropped. Tests
/// that use one must hold [`exclusive`](super::exclusive): the leftover checks of other tests
/// would count it.
pub struct TestTmpfs(pub PathBuf);

impl TestTmpfs {
    /// Mounts it.
    pub fn mount(dir: &Path, flags: nix::mount::MsFlags) -> TestTmpfs {
        use nix::mount::{MsFlags, mount};
        fs::create_dir(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=256m"),
        )
        .unwrap_or_else(|e| panic!("cannot mount a tmpfs on {}: {e}", dir.display()));
        let guard = TestTmpfs(dir.to_owned());
        chown_to_tuser(dir);
        guard
    }
}

impl Drop for TestTmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The per-user rendezvous directory of node instances (`/tmp/cmpirun-UID`) persists by design,
/// like `$XDG_RUNTIME_DIR`; made before a snapshot, it does not count as a leftover. Returns it.
pub fn runtime_dir() -> String {
    let dir = format!("/tmp/cmpirun-{}", tuser().uid);
    TuserCommand::new("mkdir")
        .args(["-p", "-m", "700", &dir])
        .run()
        .assert_success();
    dir
}
