//! [`NodeInstance`]: a handle on a node instance, got by creating one, connecting to one, or
//! either through the rendezvous ([`join_or_create`]); members are started through it.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::member::{MemberCommand, start as start_member};
use super::process::{RootPlans, start as start_instance};
use super::protocol::{MSG_READY, Message, decode_ready, failure_error, recv_message};
use super::{InstanceConfig, InstanceError, MAX_IMAGES};
use crate::container::member_env::EnvChange;
use crate::container::rendezvous::{Rendezvous, RendezvousError};

/// A handle on a node instance. While it exists (and any member started through it runs), the
/// instance lives; dropping every handle ends the instance.
#[derive(Debug)]
pub struct NodeInstance {
    conn: UnixStream,
    user_ns: Option<OwnedFd>,
    /// One mount namespace per image (empty once released).
    mnt_ns: Vec<OwnedFd>,
    /// What each image's environment scripts change.
    changes: Vec<Vec<EnvChange>>,
    pid: Pid,
    owned_child: bool,
}

impl NodeInstance {
    /// Forks a new node instance owned by this process and waits until it is ready.
    ///
    /// The caller must be single-threaded (the instance calls `unshare(CLONE_NEWUSER)` after the
    /// fork, which a copy of a threaded process may not do safely). With `listener`, the instance
    /// also accepts members on it (see [`crate::container::rendezvous`]); the rendezvous' lock
    /// file is taken again when the instance ends so no joiner connects to a dying instance.
    ///
    /// This process fills the library cache for the instance's roots
    /// ([`crate::container::library_cache`]); the instance keeps the entries' locks.
    ///
    /// With `owned`, [`Self::close`] waits for the instance to exit (it exits then unless other
    /// members joined through the listener).
    pub fn create(
        cfg: &InstanceConfig,
        listener: Option<(UnixListener, Rendezvous)>,
        owned: bool,
    ) -> Result<NodeInstance, InstanceError> {
        if cfg.other_roots.len() >= MAX_IMAGES {
            return Err(InstanceError::TooManyImages {
                n: cfg.other_roots.len() + 1,
            });
        }
        let (ours, theirs) = UnixStream::pair().map_err(|error| InstanceError::Io {
            step: "socketpair",
            error,
        })?;
        let plans = RootPlans::new(cfg);
        let child =
            start_instance(cfg, &plans, theirs, listener).map_err(|errno| InstanceError::Sys {
                step: "fork node instance",
                errno,
            })?;
        let mut inst = Self::handshake(ours, child)?;
        inst.owned_child = owned;
        Ok(inst)
    }

    /// Joins the instance listening at `socket`.
    pub fn connect(socket: &Path) -> Result<NodeInstance, InstanceError> {
        let conn = UnixStream::connect(socket).map_err(|error| InstanceError::Io {
            step: "connect to node instance",
            error,
        })?;
        Self::handshake(conn, Pid::from_raw(0))
    }

    /// Reads the instance's first message: ready (with its namespaces), or why not. `child` is
    /// the instance's pid when this process created it (and reaps it on failure), else 0.
    fn handshake(conn: UnixStream, child: Pid) -> Result<NodeInstance, InstanceError> {
        let created = child.as_raw() > 0;
        let reap = || {
            if created {
                // Our child, exiting after its failure message: only EINTR could interrupt.
                let _ = waitpid(child, None);
            }
        };
        let msg = match recv_message(&conn) {
            Ok(m) => m,
            Err(_) if created => {
                reap();
                return Err(InstanceError::Vanished);
            }
            Err(e) => return Err(e),
        };
        if msg.kind != MSG_READY {
            reap();
            return Err(failure_error(&msg));
        }
        let Message { fds, payload, .. } = msg;
        let Some((pid, changes)) =
            decode_ready(&payload).filter(|(_, c)| !c.is_empty() && fds.len() == c.len() + 1)
        else {
            reap();
            return Err(InstanceError::MalformedReady);
        };
        let mut fds = fds.into_iter();
        Ok(NodeInstance {
            conn,
            user_ns: fds.next(),
            mnt_ns: fds.collect(),
            changes,
            pid: if created { child } else { Pid::from_raw(pid) },
            owned_child: false,
        })
    }

    /// Whether this process created the instance (it is its child).
    pub fn created(&self) -> bool {
        self.owned_child
    }

    /// The instance process id (as seen by this process).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// What each image's environment scripts changed, by image (apply with
    /// [`crate::container::member_env::member_environment`]).
    pub fn env_changes(&self) -> &[Vec<EnvChange>] {
        &self.changes
    }

    /// Starts `cmd` as a member of the instance: a forked child joins the user and mount
    /// namespaces, changes directory and execs. The child is killed if this process dies.
    ///
    /// This process must be single-threaded (a threaded process cannot `setns` into a user
    /// namespace; the forked child is a copy of this one). The child gets an empty signal mask.
    pub fn spawn(&self, cmd: &MemberCommand) -> Result<Pid, InstanceError> {
        let (user_ns, mnt_ns) = match (&self.user_ns, self.mnt_ns.get(cmd.image)) {
            (Some(u), Some(m)) => (u.as_fd(), m.as_fd()),
            (Some(_), None) if !self.mnt_ns.is_empty() => {
                return Err(InstanceError::NoSuchImage {
                    held: self.mnt_ns.len(),
                    image: cmd.image,
                });
            }
            _ => {
                return Err(InstanceError::Released);
            }
        };
        start_member(cmd, user_ns, mnt_ns)
    }

    /// Closes the namespace fds this handle holds (no more [`Self::spawn`]). A handle that keeps
    /// them keeps the mount namespace alive after the instance exits, so release them as soon as
    /// the last member is started.
    pub fn release_namespaces(&mut self) {
        self.user_ns = None;
        self.mnt_ns.clear();
    }

    /// Why the instance ended its processes, if it did because an image mount ended (its
    /// server died): the message the instance sent ([`super::protocol::MSG_MOUNT_LOST`]). Does
    /// not wait: call it when a member was killed by a signal nobody here sent.
    pub fn mount_lost(&self) -> Option<String> {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        // Peek first, without blocking: a member gets nothing else after the handshake.
        let mut kind = [0u8; 1];
        match recv(
            self.conn.as_raw_fd(),
            &mut kind,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(1) if kind[0] == super::protocol::MSG_MOUNT_LOST => {}
            _ => return None,
        }
        super::protocol::recv_message(&self.conn)
            .ok()
            .map(|m| m.text())
    }

    /// The connection to the instance, to poll: it becomes readable when the instance sends
    /// [`super::protocol::MSG_MOUNT_LOST`] or ends.
    pub fn connection(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.conn.as_fd()
    }

    /// Whether the instance has ended (its end of the connection is closed) with no message
    /// left to read. Does not wait.
    pub fn ended(&self) -> bool {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        matches!(
            recv(
                self.conn.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Ok(0) | Err(nix::errno::Errno::ECONNRESET)
        )
    }

    /// [`Self::mount_lost`], waiting up to `wait` for the message: a rank that saw its files
    /// vanish can fail before the instance has noticed its server's end.
    pub fn mount_lost_within(&self, wait: std::time::Duration) -> Option<String> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = [PollFd::new(self.conn.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut pfd,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE),
        );
        self.mount_lost()
    }

    /// Tells the instance that this membership's member, rank `rank`, exited 0, for the
    /// instance to report with the node's other clean ends as it ends
    /// ([`super::protocol::MSG_ENDED`]). `false` if it could not be told (the instance is gone):
    /// then report it another way.
    pub fn clean_end(&self, rank: u32) -> bool {
        super::protocol::send_message(
            &self.conn,
            super::protocol::MSG_ENDED,
            &[],
            &rank.to_le_bytes(),
        )
        .is_ok()
    }

    /// Ends this membership. If this process created the instance, waits until it has exited
    /// (so its mounts are gone when this returns) unless other members keep it alive.
    pub fn close(mut self) {
        self.release_namespaces();
        // The instance may already be gone; either way the membership is over.
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if self.owned_child {
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Joins the instance of `key` (its files in the runtime directory `dir`, see
/// [`crate::container::rendezvous`]), creating it from `cfg` if none is running.
///
/// The caller must be single-threaded. A created instance is not tied to its creator's life: it
/// ends when its last member's handle is gone.
pub fn join_or_create(
    dir: &Path,
    key: &str,
    cfg: &InstanceConfig,
) -> Result<NodeInstance, InstanceError> {
    let rv = Rendezvous::new(dir, key)?;
    let guard = rv.try_lock()?;
    match NodeInstance::connect(rv.socket()) {
        Ok(inst) => {
            drop(guard);
            return Ok(inst);
        }
        Err(InstanceError::Io { error, .. })
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) => {}
        Err(e) => return Err(e),
    }
    // A stale socket of an instance that was killed.
    let _ = fs::remove_file(rv.socket());
    let listener = UnixListener::bind(rv.socket()).map_err(|e| RendezvousError::Lock {
        path: rv.socket().to_owned(),
        message: format!("bind: {e}"),
    })?;
    // The creator waits for the instance when it closes its own membership: the instance is its
    // child, and reaping it there leaves no zombie behind.
    let result = NodeInstance::create(cfg, Some((listener, rv.clone())), true);
    if result.is_err() {
        rv.remove_files();
    }
    drop(guard);
    result
}
