//! The unprivileged test user the container tests run their programs as.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The unprivileged user the container tests run as (created by `ci/setup-test-user.sh`).
pub const TEST_USER: &str = "tuser";

/// The identity of [`TEST_USER`].
#[derive(Debug, Clone)]
pub struct TestUser {
    /// User id (1001 in CI).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home folder.
    pub home: PathBuf,
}

/// Looks up [`TEST_USER`]; panics with the fix when it does not exist or the tests are not root.
pub fn tuser() -> TestUser {
    static USER: OnceLock<TestUser> = OnceLock::new();
    USER.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the container tests run programs as {TEST_USER} through setpriv and must themselves run \
             as root (CI does: see ci/test.sh)"
        );
        let user = nix::unistd::User::from_name(TEST_USER)
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!("user {TEST_USER} does not exist: run `ci/setup-test-user.sh` as root")
            });
        TestUser { uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir }
    })
    .clone()
}

/// Gives `path` to [`TEST_USER`] and the user's primary group (the tests run as root).
pub fn chown_to_tuser(path: &Path) {
    let user = tuser();
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .unwrap_or_else(|e| panic!("cannot chown {}: {e}", path.display()));
}
