//! Entering a new user and mount namespace as oneself, as a node instance does before it mounts
//! anything (and `cmpirun __mount-check` before it mounts an image).

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid};

/// Why [`enter_user_namespace`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UserNsError {
    /// `unshare(CLONE_NEWUSER)` was refused: user namespaces are not available to this user.
    #[error("cannot create a user namespace ({errno}){detail}")]
    Unshare {
        /// The error from `unshare`.
        errno: Errno,
        /// What the system says about why (`": user.max_user_namespaces is 0"`), or empty.
        detail: String,
    },
    /// An identity map could not be written.
    #[error("write /proc/self/{file}: {source}")]
    Map {
        /// `setgroups`, `gid_map` or `uid_map`.
        file: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The mounts could not be made private.
    #[error("make / private in the new mount namespace: {0}")]
    Private(Errno),
}

/// `unshare(CLONE_NEWUSER | CLONE_NEWNS)` with identity maps (the user keeps their uid and gid,
/// `setgroups` is denied), then makes every mount private so nothing propagates back to the host.
///
/// The caller must be single-threaded: the kernel refuses `CLONE_NEWUSER` to a threaded process.
pub fn enter_user_namespace() -> Result<(), UserNsError> {
    let (uid, gid) = (Uid::current(), Gid::current());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|errno| {
        UserNsError::Unshare {
            errno,
            detail: why_no_user_namespace(errno),
        }
    })?;
    let write = |file: &'static str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text.as_bytes())
            .map_err(|source| UserNsError::Map { file, source })
    };
    // setgroups must be denied before an unprivileged gid_map write (user_namespaces(7)).
    write("setgroups", "deny".into())?;
    write("gid_map", format!("{gid} {gid} 1\n"))?;
    write("uid_map", format!("{uid} {uid} 1\n"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(UserNsError::Private)
}

/// Why `unshare(CLONE_NEWUSER)` may have failed, from what the system tells us: `": reason, …"`,
/// or empty when nothing is known.
fn why_no_user_namespace(errno: Errno) -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let mut why = Vec::new();
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        why.push("user.max_user_namespaces is 0".to_owned());
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        why.push("kernel.unprivileged_userns_clone is 0".to_owned());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        why.push("kernel.apparmor_restrict_unprivileged_userns is 1".to_owned());
    }
    if why.is_empty() && errno == Errno::ENOSPC {
        why.push("the user namespace limit is reached".to_owned());
    }
    if why.is_empty() {
        String::new()
    } else {
        format!(": {}", why.join(", "))
    }
}
