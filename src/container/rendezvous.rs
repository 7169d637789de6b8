//! The files by which unrelated processes of one user find the node instance of a key (job step
//! + image): the per-user runtime directory, and per key a lock file and a socket path.
//!
//! Per key, a per-user runtime directory holds `<key>.lock` and `<key>.sock`. A process takes the
//! lock (`flock`), connects to the socket if an instance listens there, or else creates the
//! instance with a listener bound to it; then it lets go of the lock
//! ([`crate::container::instance::join_or_create`]). The instance removes both
//! files under the same lock when its last member leaves, so there is no election race and no
//! file outlives the instance (an instance killed with SIGKILL leaves a stale socket, which the
//! next joiner finds refused and replaces).

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::Uid;

/// The files of one key.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    lock: PathBuf,
    socket: PathBuf,
}

/// Errors of the rendezvous directory.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// The runtime directory cannot be used.
    #[error("runtime directory {path}: {message}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key that cannot be a file name.
    #[error("instance key {0:?}: use letters, digits, '.', '_' and '-' only")]
    BadKey(String),
    /// Lock file trouble.
    #[error("{path}: {message}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// A bad key is the user's to fix (`cmpirun exec --instance-key`); the directory and lock files
/// are the host's.
impl crate::exit::Blame for RendezvousError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::user_if(matches!(self, RendezvousError::BadKey(_)))
    }
}

/// The per-user runtime directory, chosen by [`runtime_dir_in`] from this process's environment;
/// created mode 0700, refused if owned by someone else.
pub fn runtime_dir() -> Result<PathBuf, RendezvousError> {
    let (base, why) = runtime_dir_in(|name| std::env::var_os(name));
    if why.starts_with(NO_LOCAL_RUNTIME_DIR) {
        tracing::warn!("runtime directory {}: {why}", base.display());
    }
    match fs::DirBuilder::new().mode(0o700).create(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(RendezvousError::Dir {
                path: base,
                message: e.to_string(),
            });
        }
    }
    check_private_dir(&base)?;
    Ok(base)
}

/// Where this node's rendezvous files go, and why, with the environment read through `var`: the
/// first of `$XDG_RUNTIME_DIR/cmpirun` (when that is a directory of this user's), `/tmp/cmpirun-<uid>`
/// and `/dev/shm/cmpirun-<uid>` that is not on a network filesystem. An instance's key (the job
/// step) is the same on every node, so the nodes must not share this folder: their tasks would
/// lock each other's files and find each other's sockets. When every candidate is shared,
/// `/tmp/cmpirun-<uid>`, with a reason saying so.
pub fn runtime_dir_in(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> (PathBuf, String) {
    let uid = Uid::current().as_raw();
    let xdg = var("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .map(|x| {
            let mine = fs::metadata(&x)
                .map(|m| m.is_dir() && m.uid() == uid)
                .unwrap_or(false);
            (x, mine)
        });
    choose_runtime_dir(xdg, uid, |p| {
        p.is_dir()
            .then(|| crate::sys::shared_filesystem(p))
            .ok_or(())
    })
}

/// [`runtime_dir_in`]'s choice: `xdg` is `$XDG_RUNTIME_DIR` and whether it is a directory of
/// `uid`'s; `shared(dir)` is the network filesystem `dir` is on (`Ok(None)`: a local one,
/// `Err`: not a directory).
fn choose_runtime_dir(
    xdg: Option<(PathBuf, bool)>,
    uid: u32,
    shared: impl Fn(&Path) -> Result<Option<&'static str>, ()>,
) -> (PathBuf, String) {
    let mut skipped = Vec::new();
    match xdg {
        Some((x, true)) => match shared(&x) {
            Ok(None) => return (x.join("cmpirun"), "in $XDG_RUNTIME_DIR".into()),
            Ok(Some(fs)) => skipped.push(format!("$XDG_RUNTIME_DIR {} is on {fs}", x.display())),
            Err(()) => skipped.push(format!("$XDG_RUNTIME_DIR {} is gone", x.display())),
        },
        Some((x, false)) => skipped.push(format!(
            "$XDG_RUNTIME_DIR {} is not a directory of uid {uid}",
            x.display()
        )),
        None => skipped.push("$XDG_RUNTIME_DIR is not set".into()),
    }
    for base in ["/tmp", "/dev/shm"] {
        match shared(Path::new(base)) {
            Ok(None) => {
                return (
                    PathBuf::from(format!("{base}/cmpirun-{uid}")),
                    format!("in {base} ({})", skipped.join("; ")),
                );
            }
            Ok(Some(fs)) => skipped.push(format!("{base} is on {fs}")),
            Err(()) => {}
        }
    }
    (
        PathBuf::from(format!("/tmp/cmpirun-{uid}")),
        format!(
            "{NO_LOCAL_RUNTIME_DIR} ({}): nodes that share it may meet each other's \
             instances; set XDG_RUNTIME_DIR to a node-local directory",
            skipped.join("; ")
        ),
    )
}

/// The start of [`runtime_dir_in`]'s reason when it found no node-local folder.
const NO_LOCAL_RUNTIME_DIR: &str = "no node-local folder found";

/// Makes sure `dir` is a directory (not a symlink) of this user that nobody else can write to:
/// refused when another user owns it (in `/tmp` they could have made it first, to read or
/// replace the sockets in it), group and other bits removed when set.
pub fn check_private_dir(dir: &Path) -> Result<(), RendezvousError> {
    let uid = Uid::current().as_raw();
    let dir_err = |message: String| RendezvousError::Dir {
        path: dir.to_owned(),
        message,
    };
    let m = fs::symlink_metadata(dir).map_err(|e| dir_err(e.to_string()))?;
    if !m.is_dir() || m.uid() != uid {
        return Err(dir_err(format!(
            "is not a directory owned by uid {uid}; remove it or set XDG_RUNTIME_DIR"
        )));
    }
    if m.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| dir_err(e.to_string()))?;
    }
    Ok(())
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 100
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A held rendezvous lock.
#[derive(Debug)]
pub struct LockGuard(#[allow(dead_code)] Option<Flock<File>>);

impl Rendezvous {
    /// The files of `key` in `dir`.
    pub fn new(dir: &Path, key: &str) -> Result<Rendezvous, RendezvousError> {
        if !valid_key(key) {
            return Err(RendezvousError::BadKey(key.into()));
        }
        Ok(Rendezvous {
            lock: dir.join(format!("{key}.lock")),
            socket: dir.join(format!("{key}.sock")),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Takes the lock, making sure the file locked is still the one at the path (the instance
    /// removes it when it ends).
    pub fn try_lock(&self) -> Result<LockGuard, RendezvousError> {
        let err = |message: String| RendezvousError::Lock {
            path: self.lock.clone(),
            message,
        };
        loop {
            let f = match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&self.lock)
            {
                Ok(f) => f,
                // An ending instance removed the (empty) runtime directory meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(dir) = self.lock.parent() {
                        match fs::DirBuilder::new().mode(0o700).create(dir) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                            Err(e) => return Err(err(e.to_string())),
                        }
                    }
                    continue;
                }
                Err(e) => return Err(err(e.to_string())),
            };
            let held =
                Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| err(e.to_string()))?;
            let same = match (held.metadata(), fs::metadata(&self.lock)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                // An ending instance may have removed the directory, and in `/tmp` another user
                // may have made it again before this process opened the lock in it: checked
                // under the lock, which the directory's removal needs.
                if let Some(dir) = self.lock.parent() {
                    check_private_dir(dir)?;
                }
                return Ok(LockGuard(Some(held)));
            }
        }
    }

    /// Takes the lock, or an empty guard if that fails (used by a dying instance, which must go
    /// on removing its files).
    pub fn lock(&self) -> LockGuard {
        self.try_lock().unwrap_or(LockGuard(None))
    }

    /// Removes the socket and the lock file (hold the lock), and the runtime directory if that
    /// leaves it empty.
    pub fn remove_files(&self) {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.lock);
        if let Some(dir) = self.lock.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cmpirun-rv-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        d
    }

    #[test]
    fn the_runtime_dir_is_node_local() {
        let local = |_: &Path| Ok(None);
        let (d, why) = choose_runtime_dir(None, 7, local);
        assert_eq!(d, Path::new("/tmp/cmpirun-7"));
        assert_eq!(why, "in /tmp ($XDG_RUNTIME_DIR is not set)");
        let (d, _) = choose_runtime_dir(Some(("/run/user/7".into(), true)), 7, local);
        assert_eq!(d, Path::new("/run/user/7/cmpirun"));
        // $XDG_RUNTIME_DIR (or /tmp) on a network filesystem is passed over.
        let nfs = |names: &'static [&'static str]| {
            move |p: &Path| Ok(names.iter().any(|n| p == Path::new(n)).then_some("NFS"))
        };
        let (d, why) = choose_runtime_dir(
            Some(("/home/u/run".into(), true)),
            7,
            nfs(&["/home/u/run", "/tmp"]),
        );
        assert_eq!(d, Path::new("/dev/shm/cmpirun-7"));
        assert_eq!(
            why,
            "in /dev/shm ($XDG_RUNTIME_DIR /home/u/run is on NFS; /tmp is on NFS)"
        );
        let (d, why) = choose_runtime_dir(None, 7, nfs(&["/tmp", "/dev/shm"]));
        assert_eq!(d, Path::new("/tmp/cmpirun-7"));
        assert!(why.starts_with(NO_LOCAL_RUNTIME_DIR), "{why}");
    }

    #[test]
    fn a_lock_in_a_directory_of_another_user_is_refused() {
        let d = scratch("other");
        let other = if Uid::current().is_root() { 1 } else { 0 };
        if nix::unistd::chown(&d, Some(Uid::from_raw(other)), None).is_err() {
            // Only root can give a directory away; tests/security.rs runs this as a user.
            let _ = fs::remove_dir_all(&d);
            return;
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let rv = Rendezvous::new(&d, "slurm-1.0").unwrap();
        let r = rv.try_lock();
        let _ = fs::remove_dir_all(&d);
        assert!(matches!(r, Err(RendezvousError::Dir { .. })), "{r:?}");
    }

    #[test]
    fn group_and_other_bits_are_removed_and_symlinks_refused() {
        let d = scratch("mode");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        check_private_dir(&d).unwrap();
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let r = check_private_dir(&link);
        let _ = fs::remove_file(&link);
        let _ = fs::remove_dir_all(&d);
        assert_eq!(mode, 0o700);
        assert!(matches!(r, Err(RendezvousError::Dir { .. })), "{r:?}");
    }
}
