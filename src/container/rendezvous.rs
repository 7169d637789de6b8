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

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/cmpirun` when that is a directory owned by
/// the user, else `/tmp/cmpirun-<uid>`. Created mode 0700; refused if owned by someone else.
pub fn runtime_dir() -> Result<PathBuf, RendezvousError> {
    let uid = Uid::current().as_raw();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| {
            fs::metadata(p)
                .map(|m| m.is_dir() && m.uid() == uid)
                .unwrap_or(false)
        })
        .map(|p| p.join("cmpirun"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/cmpirun-{uid}")));
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
