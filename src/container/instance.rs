//! The node instance: one user + mount namespace holding the container root, joined by members.
//!
//! Life of an instance, in order (each step one function):
//! 1. [`NodeInstance::create`] forks the instance process from a single-threaded caller.
//! 2. The instance [`enter_namespaces`] (user + mount, identity maps), builds the root with
//!    [`super::executor::execute`] (which ends in `pivot_root`), and evaluates the image's
//!    environment scripts once ([`eval_image_env`]). A job whose parts name different images
//!    gets one mount namespace per image in the one user namespace: before it builds the first
//!    image's root, the instance mounts the tmpfs every root binds at `/dev/shm`
//!    ([`mount_shared_shm`]) and forks one *holder* per further image ([`start_holder`]), which
//!    unshares a mount namespace of its own, builds and enters that image's root, evaluates its
//!    scripts and stays until the instance ends.
//! 3. It hands every connection its namespace fds (the user namespace, then one mount
//!    namespace per image) and each image's environment changes; a connection is a membership.
//!    [`NodeInstance::spawn`] forks a member that `setns()`es into the user namespace and its
//!    image's mount namespace, `chdir`s and execs.
//! 4. When the last connection closes (its holder exited or was killed), the instance kills what
//!    is left in its user namespace ([`kill_leftovers`]), stops the image server and exits; the
//!    mount namespace and everything mounted in it go with it.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, getpid, getppid};

use super::env::{
    Env, EnvChange, decode_changes, encode_changes, image_changes, parse_environ,
    without_shell_noise,
};
use super::executor::{Assembled, RootError, execute};
use super::plan::{MountOp, RootConfig, ShmMode, plan_root};

/// At most this many images in one node instance (one descriptor per image's mount namespace
/// travels in each membership message).
pub const MAX_IMAGES: usize = 16;

/// What a node instance is built from.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// The container root (of image 0).
    pub root: RootConfig,
    /// The roots of further images (1, 2, …): MPMD parts that name another image. Each is built
    /// in a mount namespace of its own inside the instance's one user namespace, and every root
    /// binds the same private `/dev/shm`.
    pub other_roots: Vec<RootConfig>,
    /// The environment the image's scripts are evaluated in (the creator's, filtered by
    /// [`super::env::base_environment`]).
    pub script_env: Env,
}

/// Errors from creating, joining or using a node instance.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// User namespaces are not available to this user.
    #[error(
        "cannot create a user namespace ({errno}){detail}: ask the site to enable unprivileged \
         user namespaces (sysctl user.max_user_namespaces > 0; on Debian/Ubuntu kernels also \
         kernel.unprivileged_userns_clone=1 and no AppArmor userns restriction)"
    )]
    NoUserNamespace {
        /// The error from `unshare`.
        errno: Errno,
        /// What was found out about why.
        detail: String,
    },
    /// The root could not be built; the user can fix it.
    #[error("{0}")]
    Usage(String),
    /// The instance failed for another reason.
    #[error("{0}")]
    Failed(String),
    /// The image's environment scripts failed.
    #[error("the image's environment scripts (/.singularity.d/env/*.sh) failed: {0}")]
    ImageEnv(String),
    /// A system call on the cmpirun side failed.
    #[error("{step}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// The system error.
        errno: Errno,
    },
    /// Talking to the instance failed.
    #[error("node instance: {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The instance went away before it was ready.
    #[error("node instance exited before it was ready")]
    Vanished,
}

impl InstanceError {
    /// Whether the user can fix this by changing the command line or the image.
    pub fn is_usage(&self) -> bool {
        matches!(self, InstanceError::Usage(_))
    }
}

fn sys_err(step: &'static str) -> impl FnOnce(Errno) -> InstanceError {
    move |errno| InstanceError::Sys { step, errno }
}

fn io_err(step: &'static str) -> impl FnOnce(std::io::Error) -> InstanceError {
    move |source| InstanceError::Io { step, source }
}

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

/// A program to start in the container.
#[derive(Debug, Clone)]
pub struct MemberCommand {
    /// Program and arguments; a program without `/` is looked up in the container's `PATH`.
    pub argv: Vec<OsString>,
    /// The complete environment (see [`super::env::member_environment`]).
    pub env: Env,
    /// The working directory inside the container (falls back to `$HOME`, then `/`).
    pub cwd: PathBuf,
    /// Makes the member a session leader (`setsid`), as hydra's proxy does for each rank: with
    /// the kernel's autogroup scheduling every session is its own CPU group, so ranks that share
    /// their launcher's session share one group's CPU time. The member then no longer gets the
    /// terminal's signals; whoever starts it passes them on.
    pub new_session: bool,
    /// Which of the instance's images the member runs in: 0 is [`InstanceConfig::root`], `k`
    /// is `other_roots[k - 1]`.
    pub image: usize,
    /// Descriptors the member gets, `(number in the member, descriptor here)`, set up in the
    /// child after the fork (this process's own descriptors are left alone). Others are
    /// inherited as they are: those without close-on-exec.
    pub fds: Vec<(RawFd, Arc<OwnedFd>)>,
}

/// Exit status of a member that could not be started: the program was not found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status of a member that could not be started: the program could not be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status of a member that could not join the instance's namespaces.
pub const EXIT_JOIN_FAILED: i32 = 255;

const MSG_READY: u8 = b'R';
const MSG_USAGE: u8 = b'U';
const MSG_FAILED: u8 = b'F';
const MSG_NO_USERNS: u8 = b'N';
const MSG_IMAGE_ENV: u8 = b'S';
/// From a holder: it has its own mount namespace now.
const MSG_UNSHARED: u8 = b'M';

impl NodeInstance {
    /// Forks a new node instance owned by this process and waits until it is ready.
    ///
    /// The caller must be single-threaded (the instance calls `unshare(CLONE_NEWUSER)` after the
    /// fork, which a copy of a threaded process may not do safely). With `listener`, the instance
    /// also accepts members on it (see [`super::rendezvous`]); `lock` is the rendezvous lock file,
    /// taken again when the instance ends so no joiner connects to a dying instance.
    ///
    /// With `owned`, [`Self::close`] waits for the instance to exit (it exits then unless other
    /// members joined through the listener).
    pub fn create(
        cfg: &InstanceConfig,
        listener: Option<(UnixListener, super::rendezvous::Rendezvous)>,
        owned: bool,
    ) -> Result<NodeInstance, InstanceError> {
        if cfg.other_roots.len() >= MAX_IMAGES {
            return Err(InstanceError::Usage(format!(
                "{} different images in one job: a node instance holds at most {MAX_IMAGES}",
                cfg.other_roots.len() + 1
            )));
        }
        let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
        let shared = shared_shm_dir(cfg);
        // The library cache is filled here, by the creator only; the instance keeps the
        // entries' locks.
        let mut cache_locks = Vec::new();
        let ops: Vec<Vec<MountOp>> = std::iter::once(&cfg.root)
            .chain(&cfg.other_roots)
            .map(|r| {
                let mut r = r.clone();
                if r.shm == ShmMode::Private {
                    r.shared_shm = shared.clone();
                }
                cache_locks.extend(super::library_cache::resolve(&mut r));
                plan_root(&r)
            })
            .collect();
        let uid = Uid::current();
        let gid = Gid::current();
        // SAFETY: the caller is single-threaded (documented requirement), so the child may do
        // anything a normal process does.
        match unsafe { fork() }.map_err(sys_err("fork node instance"))? {
            ForkResult::Child => {
                drop(ours);
                let mut keep = vec![theirs.as_raw_fd()];
                keep.extend(&cache_locks);
                if let Some((l, _)) = &listener {
                    keep.push(l.as_raw_fd());
                }
                close_inherited(&keep);
                let code = instance_main(cfg, &ops, shared.as_deref(), uid, gid, theirs, listener);
                // SAFETY: _exit skips destructors of the parent's copies, which is what we want.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                drop(listener);
                let mut inst = Self::handshake(ours, child)?;
                inst.owned_child = owned;
                Ok(inst)
            }
        }
    }

    /// Joins the instance listening at `socket`.
    pub fn connect(socket: &Path) -> Result<NodeInstance, InstanceError> {
        let conn = UnixStream::connect(socket).map_err(io_err("connect to node instance"))?;
        Self::handshake(conn, Pid::from_raw(0))
    }

    fn handshake(conn: UnixStream, child: Pid) -> Result<NodeInstance, InstanceError> {
        let (kind, fds, payload) = match recv_message(&conn) {
            Ok(m) => m,
            Err(_) if child.as_raw() > 0 => {
                let _ = waitpid(child, None);
                return Err(InstanceError::Vanished);
            }
            Err(e) => return Err(e),
        };
        let text = || String::from_utf8_lossy(&payload).into_owned();
        let fail = |e| {
            if child.as_raw() > 0 {
                let _ = waitpid(child, None);
            }
            Err(e)
        };
        match kind {
            MSG_READY => {
                let Some((pid, changes)) = decode_ready(&payload)
                    .filter(|(_, c)| !c.is_empty() && fds.len() == c.len() + 1)
                else {
                    return fail(InstanceError::Failed("malformed ready message".into()));
                };
                let mut fds = fds.into_iter();
                let user_ns = fds.next();
                Ok(NodeInstance {
                    conn,
                    user_ns,
                    mnt_ns: fds.collect(),
                    changes,
                    pid: if child.as_raw() > 0 {
                        child
                    } else {
                        Pid::from_raw(pid)
                    },
                    owned_child: false,
                })
            }
            MSG_USAGE => fail(InstanceError::Usage(text())),
            MSG_NO_USERNS => {
                let (errno, detail) =
                    text().split_once('|').map_or((0, String::new()), |(e, d)| {
                        (e.parse().unwrap_or(0), d.to_owned())
                    });
                fail(InstanceError::NoUserNamespace {
                    errno: Errno::from_raw(errno),
                    detail,
                })
            }
            MSG_IMAGE_ENV => fail(InstanceError::ImageEnv(text())),
            _ => fail(InstanceError::Failed(text())),
        }
    }

    /// The instance process id (as seen by this process).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// What each image's environment scripts changed, by image (apply with
    /// [`super::env::member_environment`]).
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
                return Err(InstanceError::Failed(format!(
                    "the node instance holds {} image(s), not image {}",
                    self.mnt_ns.len(),
                    cmd.image
                )));
            }
            _ => {
                return Err(InstanceError::Failed(
                    "the namespaces of this instance were already released".into(),
                ));
            }
        };
        let prepared = Prepared::new(cmd)?;
        let parent = getpid();
        // SAFETY: the caller is single-threaded (documented requirement).
        match unsafe { fork() }.map_err(sys_err("fork member"))? {
            ForkResult::Child => {
                let code = member_main(&prepared, parent, user_ns, mnt_ns);
                // SAFETY: see `create`.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => Ok(child),
        }
    }

    /// Closes the namespace fds this handle holds (no more [`Self::spawn`]). A handle that keeps
    /// them keeps the mount namespace alive after the instance exits, so release them as soon as
    /// the last member is started.
    pub fn release_namespaces(&mut self) {
        self.user_ns = None;
        self.mnt_ns.clear();
    }

    /// Ends this membership. If this process created the instance, waits until it has exited
    /// (so its mounts are gone when this returns) unless other members keep it alive.
    pub fn close(mut self) {
        self.release_namespaces();
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if self.owned_child {
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Everything a member child needs, prepared before the fork.
struct Prepared {
    argv: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<CString>,
    cwd: CString,
    home: Option<CString>,
    name: String,
    new_session: bool,
    /// `(number in the member, descriptor here)`; the descriptors live as long as the command.
    fds: Vec<(RawFd, RawFd)>,
}

fn cstring(b: &[u8]) -> Result<CString, InstanceError> {
    CString::new(b).map_err(|_| InstanceError::Usage("an argument contains a NUL byte".into()))
}

impl Prepared {
    fn new(cmd: &MemberCommand) -> Result<Prepared, InstanceError> {
        let prog = cmd
            .argv
            .first()
            .ok_or_else(|| InstanceError::Usage("no command given".into()))?;
        let argv = cmd
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut envp = Vec::with_capacity(cmd.env.len());
        for (k, v) in &cmd.env {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            envp.push(cstring(&e)?);
        }
        let candidates = if prog.as_bytes().contains(&b'/') {
            vec![cstring(prog.as_bytes())?]
        } else {
            let path = cmd
                .env
                .get(std::ffi::OsStr::new("PATH"))
                .map(|p| p.as_bytes().to_vec())
                .unwrap_or_else(|| super::env::DEFAULT_PATH.as_bytes().to_vec());
            path.split(|&b| b == b':')
                .map(|d| {
                    let d = if d.is_empty() { b".".as_slice() } else { d };
                    let mut p = d.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(prog.as_bytes());
                    cstring(&p)
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Prepared {
            argv,
            envp,
            candidates,
            cwd: cstring(cmd.cwd.as_os_str().as_bytes())?,
            home: cmd
                .env
                .get(std::ffi::OsStr::new("HOME"))
                .and_then(|h| CString::new(h.as_bytes()).ok()),
            name: prog.to_string_lossy().into_owned(),
            new_session: cmd.new_session,
            fds: cmd.fds.iter().map(|(n, fd)| (*n, fd.as_raw_fd())).collect(),
        })
    }
}

fn say(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "cmpirun: {msg}");
}

/// The member child: join, chdir, exec. Returns the exit status if the exec did not happen.
fn member_main(p: &Prepared, parent: Pid, user_ns: BorrowedFd, mnt_ns: BorrowedFd) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
        return EXIT_JOIN_FAILED;
    }
    // A forked child is never a process group leader, so this cannot fail.
    if p.new_session {
        let _ = nix::unistd::setsid();
    }
    if let Err(e) = remap_fds(&p.fds) {
        say(&format!("cannot set up the program's descriptors: {e}"));
        return EXIT_JOIN_FAILED;
    }
    // The user namespace first: it grants the capabilities needed to join the mount namespace.
    if let Err(e) = setns(user_ns, CloneFlags::CLONE_NEWUSER) {
        say(&format!(
            "cannot join the node instance's user namespace: {e}"
        ));
        return EXIT_JOIN_FAILED;
    }
    if let Err(e) = setns(mnt_ns, CloneFlags::CLONE_NEWNS) {
        say(&format!(
            "cannot join the node instance's mount namespace: {e}"
        ));
        return EXIT_JOIN_FAILED;
    }
    if nix::unistd::chdir(p.cwd.as_c_str()).is_err() {
        let fallback = p
            .home
            .as_deref()
            .filter(|h| nix::unistd::chdir(*h).is_ok())
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|| {
                let _ = nix::unistd::chdir("/");
                "/".into()
            });
        say(&format!(
            "working directory {} does not exist in the container; using {fallback}",
            p.cwd.to_string_lossy()
        ));
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let mut not_executable = false;
    for c in &p.candidates {
        match nix::unistd::execve(c, &p.argv, &p.envp) {
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
            Err(_) => not_executable = true,
        }
    }
    if not_executable {
        say(&format!("{}: cannot execute in the container", p.name));
        EXIT_NOT_EXECUTABLE
    } else {
        say(&format!("{}: not found in the container", p.name));
        EXIT_NOT_FOUND
    }
}

/// Gives this (forked) process descriptor `target` as a copy of `source`, for every pair. Each
/// source is first copied above every target, so that a source that is also a target (fd 1 for
/// 2, say) is not overwritten before it is used; the copies are close-on-exec, the targets not.
fn remap_fds(fds: &[(RawFd, RawFd)]) -> Result<(), Errno> {
    let above = fds.iter().map(|(t, _)| *t).max().unwrap_or(2) + 1;
    let mut copies = Vec::with_capacity(fds.len());
    for (_, source) in fds {
        // SAFETY: plain descriptor calls on this process's own table.
        let copy = unsafe { libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, above) };
        copies.push(Errno::result(copy)?);
    }
    for ((target, _), copy) in fds.iter().zip(copies) {
        // SAFETY: as above; `copy` was made above every target, so it is never a target.
        Errno::result(unsafe { libc::dup2(copy, *target) })?;
        // SAFETY: as above.
        unsafe { libc::close(copy) };
    }
    Ok(())
}

/// Sends one message: a kind byte, a length, optional fds, then the payload.
fn send_message(sock: &UnixStream, kind: u8, fds: &[RawFd], payload: &[u8]) -> std::io::Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| std::io::Error::other("message too large"))?;
    let mut header = [0u8; 8];
    header[0] = kind;
    header[4..].copy_from_slice(&len.to_le_bytes());
    let iov = [IoSlice::new(&header)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let mut sent = 0;
    while sent == 0 {
        sent = match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
    }
    let mut w = sock;
    w.write_all(&header[sent..])?;
    w.write_all(payload)
}

/// Receives one message sent by [`send_message`].
fn recv_message(sock: &UnixStream) -> Result<(u8, Vec<OwnedFd>, Vec<u8>), InstanceError> {
    let mut header = [0u8; 8];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_IMAGES + 1]);
    let mut fds = Vec::new();
    let got = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                for c in msg.cmsgs().map_err(sys_err("read node instance message"))? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds in this process for us.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break msg.bytes;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys_err("read node instance message")(e)),
        }
    };
    if got == 0 {
        return Err(InstanceError::Vanished);
    }
    let mut r = sock;
    r.read_exact(&mut header[got..])
        .map_err(io_err("read node instance message"))?;
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .map_err(io_err("read node instance message"))?;
    Ok((header[0], fds, payload))
}

/// The instance's state once ready.
struct Ready {
    _assembled: Assembled,
    /// The holders of the further images' mount namespaces; dropped (told to end, and waited
    /// for) after the members are gone.
    _holders: Vec<Holder>,
    user_ns: fs::File,
    /// One mount namespace per image: the instance's own, then each holder's.
    mnt_ns: Vec<OwnedFd>,
    payload: Vec<u8>,
}

impl Ready {
    /// The descriptors every membership message carries: the user namespace, then one mount
    /// namespace per image.
    fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.user_ns.as_raw_fd())
            .chain(self.mnt_ns.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }
}

/// The ready message's payload: the instance's pid, then each image's environment changes
/// (length-prefixed).
fn encode_ready(pid: Pid, changes: &[Vec<EnvChange>]) -> Vec<u8> {
    let mut out = pid.as_raw().to_le_bytes().to_vec();
    for c in changes {
        let e = encode_changes(c);
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(&e);
    }
    out
}

/// Reads what [`encode_ready`] wrote.
fn decode_ready(p: &[u8]) -> Option<(i32, Vec<Vec<EnvChange>>)> {
    let word = |b: &[u8]| -> Option<[u8; 4]> { b.get(..4)?.try_into().ok() };
    let pid = i32::from_le_bytes(word(p)?);
    let mut rest = &p[4..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_le_bytes(word(rest)?) as usize;
        let end = 4usize.checked_add(len)?;
        out.push(decode_changes(rest.get(4..end)?));
        rest = &rest[end..];
    }
    Some((pid, out))
}

/// The directory a multi-image instance mounts the `/dev/shm` tmpfs of all its roots on: the
/// first root's staging directory (a host directory no root needs; only the instance's own mount
/// namespace sees the tmpfs). `None` for a single image, whose root mounts its own.
fn shared_shm_dir(cfg: &InstanceConfig) -> Option<PathBuf> {
    let private = std::iter::once(&cfg.root)
        .chain(&cfg.other_roots)
        .any(|r| r.shm == ShmMode::Private);
    (!cfg.other_roots.is_empty() && private).then(|| cfg.root.stage.clone())
}

/// The size limit of the `/dev/shm` tmpfs that every image's root shares: that of the first root
/// with a private one (the launchers give every root the job's `--shm`).
fn shared_shm_size(cfg: &InstanceConfig) -> Option<&str> {
    std::iter::once(&cfg.root)
        .chain(&cfg.other_roots)
        .find(|r| r.shm == ShmMode::Private)
        .and_then(|r| r.shm_size.as_deref())
}

/// The body of the instance process. Returns its exit status.
fn instance_main(
    cfg: &InstanceConfig,
    ops: &[Vec<MountOp>],
    shared: Option<&Path>,
    uid: Uid,
    gid: Gid,
    owner: UnixStream,
    listener: Option<(UnixListener, super::rendezvous::Rendezvous)>,
) -> i32 {
    // Terminal signals belong to the members, not to the instance.
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: setting a disposition to SIG_IGN runs no code of ours.
        let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) };
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
    if let Ok(null) = fs::File::options().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
    }
    let ready = match setup(cfg, ops, shared, uid, gid) {
        Ok(r) => r,
        Err((kind, msg)) => {
            let _ = send_message(&owner, kind, &[], msg.as_bytes());
            return 1;
        }
    };
    if send_message(&owner, MSG_READY, &ready.fds(), &ready.payload).is_err() {
        kill_leftovers();
        return 0;
    }
    let sigfd = SignalFd::with_flags(&term, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).ok();
    serve(owner, listener, &ready, sigfd.as_ref());
    kill_leftovers();
    drop(ready);
    0
}

fn setup(
    cfg: &InstanceConfig,
    ops: &[Vec<MountOp>],
    shared: Option<&Path>,
    uid: Uid,
    gid: Gid,
) -> Result<Ready, (u8, String)> {
    let started = std::time::Instant::now();
    enter_namespaces(uid, gid)?;
    if let Some(dir) = shared {
        mount_shared_shm(dir, shared_shm_size(cfg))?;
    }
    // The holders are forked now, while the instance is single-threaded (no image server yet)
    // and its mount namespace still shows the host: each builds its image's root from there,
    // at the same time as the instance builds the first one.
    let mut holders = Vec::with_capacity(cfg.other_roots.len());
    for (root, ops) in cfg.other_roots.iter().zip(ops.iter().skip(1)) {
        holders.push(start_holder(
            ops,
            &cfg.script_env,
            root.image.path().display().to_string(),
        )?);
    }
    let first = ops
        .first()
        .ok_or((MSG_FAILED, "no container root to build".to_owned()))?;
    let assembled = execute(first).map_err(|e: RootError| {
        let kind = if e.is_usage() { MSG_USAGE } else { MSG_FAILED };
        (kind, e.to_string())
    })?;
    tracing::debug!(
        "container root: {} mount operations in {:.1} ms",
        first.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let started = std::time::Instant::now();
    let changes = eval_image_env(&cfg.script_env).map_err(|e| (MSG_IMAGE_ENV, e))?;
    tracing::debug!(
        "image environment scripts: {} change(s) in {:.1} ms",
        changes.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let open_ns = |name: &str| {
        fs::File::open(format!("/proc/self/ns/{name}"))
            .map_err(|e| (MSG_FAILED, format!("open /proc/self/ns/{name}: {e}")))
    };
    let mut mnt_ns = vec![OwnedFd::from(open_ns("mnt")?)];
    let mut all = vec![changes];
    for h in &holders {
        let (fd, changes) = h.ready()?;
        mnt_ns.push(fd);
        all.push(changes);
    }
    Ok(Ready {
        _assembled: assembled,
        _holders: holders,
        user_ns: open_ns("user")?,
        mnt_ns,
        payload: encode_ready(getpid(), &all),
    })
}

/// Mounts the tmpfs that every image's root binds at `/dev/shm` (mode 1777, like the host's, and
/// of `size`, if given), in the instance's own mount namespace only.
fn mount_shared_shm(dir: &Path, size: Option<&str>) -> Result<(), (u8, String)> {
    let opts = super::plan::tmpfs_options(0o1777, size);
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| {
        (
            MSG_FAILED,
            format!(
                "mount the /dev/shm tmpfs shared by the images on {}: {e}",
                dir.display()
            ),
        )
    })
}

/// A child of the instance that holds the mount namespace of one further image: it builds the
/// image's root, enters it, and stays (the parent of that image's server) until the instance
/// lets go of it.
struct Holder {
    pid: Pid,
    conn: UnixStream,
    image: String,
}

impl Holder {
    /// Waits until the holder is ready; returns its mount namespace and what the image's
    /// environment scripts change.
    fn ready(&self) -> Result<(OwnedFd, Vec<EnvChange>), (u8, String)> {
        match recv_message(&self.conn) {
            Ok((MSG_READY, mut fds, payload)) if fds.len() == 1 => {
                Ok((fds.remove(0), decode_changes(&payload)))
            }
            Ok((MSG_READY, ..)) => Err((
                MSG_FAILED,
                format!("image {}: malformed ready message", self.image),
            )),
            other => Err(holder_failure(&self.image, other, " before it was ready")),
        }
    }
}

/// What a holder's answer other than the one awaited means: the failure it reported, or that it
/// exited (`when`: " before it was ready", or nothing).
fn holder_failure(
    image: &str,
    got: Result<(u8, Vec<OwnedFd>, Vec<u8>), InstanceError>,
    when: &str,
) -> (u8, String) {
    match got {
        Ok((kind, _, payload)) => (
            kind,
            format!("image {image}: {}", String::from_utf8_lossy(&payload)),
        ),
        Err(e) => (
            MSG_FAILED,
            format!("image {image}: the process building its root exited{when} ({e})"),
        ),
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        let _ = waitpid(self.pid, None);
    }
}

/// Forks the holder of one further image (see [`Holder`]).
fn start_holder(ops: &[MountOp], script_env: &Env, image: String) -> Result<Holder, (u8, String)> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| (MSG_FAILED, format!("socketpair for image {image}: {e}")))?;
    let instance = getpid();
    // SAFETY: the instance is single-threaded until it mounts its own image, after the holders
    // are forked.
    match unsafe { fork() } {
        Err(e) => Err((
            MSG_FAILED,
            format!("fork the process that builds image {image}: {e}"),
        )),
        Ok(ForkResult::Child) => {
            drop(ours);
            close_inherited(&[theirs.as_raw_fd()]);
            let code = holder_main(ops, script_env, instance, theirs);
            // SAFETY: _exit skips destructors of the instance's copies (other holders, the
            // owner's socket), which are not this process's to drop.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            let holder = Holder {
                pid: child,
                conn: ours,
                image,
            };
            // Until the holder has its own mount namespace it shares the instance's, and would
            // see (and copy) the next root's staging mounts: wait for it.
            match recv_message(&holder.conn) {
                Ok((MSG_UNSHARED, ..)) => Ok(holder),
                other => Err(holder_failure(&holder.image, other, "")),
            }
        }
    }
}

/// The body of a holder: a mount namespace of its own (the user namespace is the instance's),
/// the image's root, its environment scripts; then it waits for the instance to end.
fn holder_main(ops: &[MountOp], script_env: &Env, instance: Pid, conn: UnixStream) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != instance {
        return 1;
    }
    let fail = |kind: u8, msg: String| {
        let _ = send_message(&conn, kind, &[], msg.as_bytes());
        1
    };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWNS) {
        return fail(
            MSG_FAILED,
            format!("unshare a mount namespace for the image: {e}"),
        );
    }
    if send_message(&conn, MSG_UNSHARED, &[], &[]).is_err() {
        return 1;
    }
    let assembled = match execute(ops) {
        Ok(a) => a,
        Err(e) => {
            let kind = if e.is_usage() { MSG_USAGE } else { MSG_FAILED };
            return fail(kind, e.to_string());
        }
    };
    let changes = match eval_image_env(script_env) {
        Ok(c) => c,
        Err(e) => return fail(MSG_IMAGE_ENV, e),
    };
    let mnt = match fs::File::open("/proc/self/ns/mnt") {
        Ok(f) => f,
        Err(e) => return fail(MSG_FAILED, format!("open /proc/self/ns/mnt: {e}")),
    };
    if send_message(
        &conn,
        MSG_READY,
        &[mnt.as_raw_fd()],
        &encode_changes(&changes),
    )
    .is_err()
    {
        return 0;
    }
    drop(mnt);
    // Hold on until the instance closes the socket (or dies, and the parent-death signal ends
    // this process): the image's server is this process's child.
    let mut buf = [0u8; 16];
    loop {
        match (&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(assembled);
    0
}

/// `unshare(CLONE_NEWUSER | CLONE_NEWNS)` with identity maps (the user keeps their uid and gid),
/// then makes every mount private so nothing propagates back to the host.
fn enter_namespaces(uid: Uid, gid: Gid) -> Result<(), (u8, String)> {
    if let Err(errno) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        let detail = userns_detail(errno);
        return Err((MSG_NO_USERNS, format!("{}|{detail}", errno as i32)));
    }
    let write = |file: &str, text: String| {
        fs::write(format!("/proc/self/{file}"), text.as_bytes())
            .map_err(|e| (MSG_FAILED, format!("write /proc/self/{file}: {e}")))
    };
    // setgroups must be denied before an unprivileged gid_map write (user_namespaces(7)).
    write("setgroups", "deny".into())?;
    write("gid_map", format!("{gid} {gid} 1\n"))?;
    write("uid_map", format!("{uid} {uid} 1\n"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| {
        (
            MSG_FAILED,
            format!("make / private in the new mount namespace: {e}"),
        )
    })
}

/// Why `unshare(CLONE_NEWUSER)` may have failed, from what the system tells us.
fn userns_detail(errno: Errno) -> String {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
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

/// Applies the image's `/.singularity.d/env/*.sh` once, in lexical order, and returns what they
/// changed. Scripts made only of plain assignments are evaluated here
/// ([`super::env::eval_simple_scripts`]); otherwise the image's `/bin/sh` sources them and ends by
/// exec'ing a second shell that stops itself, so the result is read from `/proc/<pid>/environ`
/// with no tool from the image but `/bin/sh`.
fn eval_image_env(before: &Env) -> Result<Vec<EnvChange>, String> {
    let mut scripts: Vec<PathBuf> = match fs::read_dir("/.singularity.d/env") {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sh") && p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    if scripts.is_empty() {
        return Ok(Vec::new());
    }
    scripts.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    let texts: Vec<String> = scripts
        .iter()
        .filter_map(|p| fs::read(p).ok().and_then(|b| String::from_utf8(b).ok()))
        .collect();
    if texts.len() == scripts.len() {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        if let Some(after) = super::env::eval_simple_scripts(&refs, before) {
            return Ok(image_changes(before, &after));
        }
    }
    if !Path::new("/bin/sh").exists() {
        tracing::warn!(
            "the image's environment scripts need a shell and it has no /bin/sh; not applied"
        );
        return Ok(Vec::new());
    }
    const SCRIPT: &str = "for f in /.singularity.d/env/*.sh; do if [ -f \"$f\" ]; then . \"$f\"; fi; done; \
                          exec /bin/sh -c 'kill -STOP $$'";
    let argv = [
        c"sh".to_owned(),
        c"-c".to_owned(),
        CString::new(SCRIPT).map_err(|e| e.to_string())?,
    ];
    let envp: Vec<CString> = before
        .iter()
        .filter_map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            CString::new(e).ok()
        })
        .collect();
    // SAFETY: the instance may have image-server threads by now; the child only calls
    // async-signal-safe functions (sigprocmask, execve, _exit) on data prepared before the fork.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let _ = nix::unistd::execve(c"/bin/sh", &argv, &envp);
            // SAFETY: plain exit of the forked child.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, Some(WaitPidFlag::WUNTRACED)) {
                Ok(WaitStatus::Stopped(_, _)) => {
                    let block = fs::read(format!("/proc/{child}/environ"));
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    let after = without_shell_noise(parse_environ(
                        &block.map_err(|e| format!("read the environment: {e}"))?,
                    ));
                    return Ok(image_changes(before, &after));
                }
                Ok(WaitStatus::Exited(_, code)) => {
                    return Err(format!("/bin/sh exited with status {code}"));
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Err(format!("/bin/sh was killed by {sig}"));
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("waitpid: {e}")),
            }
        },
    }
}

/// Accepts members and counts live connections until none is left (or SIGTERM).
fn serve(
    owner: UnixStream,
    mut listener: Option<(UnixListener, super::rendezvous::Rendezvous)>,
    ready: &Ready,
    sigfd: Option<&SignalFd>,
) {
    let mut conns: Vec<UnixStream> = vec![owner];
    let fds = ready.fds();
    loop {
        if conns.is_empty() {
            match &listener {
                // Under the rendezvous lock: a joiner that connected before we got the lock is
                // still accepted; after it, the socket is gone and joiners create a new instance.
                Some((l, rv)) => {
                    let guard = rv.lock();
                    let _ = l.set_nonblocking(true);
                    while let Ok((c, _)) = l.accept() {
                        let _ = c.set_nonblocking(false);
                        if send_message(&c, MSG_READY, &fds, &ready.payload).is_ok() {
                            conns.push(c);
                        }
                    }
                    let _ = l.set_nonblocking(false);
                    if conns.is_empty() {
                        rv.remove_files();
                        drop(guard);
                        listener = None;
                        let _ = listener;
                        return;
                    }
                    drop(guard);
                }
                None => return,
            }
        }
        let mut pfds: Vec<PollFd> = Vec::with_capacity(conns.len() + 2);
        for c in &conns {
            pfds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        let nconns = conns.len();
        if let Some((l, _)) = &listener {
            pfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let has_listener = listener.is_some();
        if let Some(s) = sigfd {
            pfds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut pfds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        let revents: Vec<PollFlags> = pfds
            .iter()
            .map(|p| p.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(pfds);
        if sigfd.is_some() && !revents[revents.len() - 1].is_empty() {
            // SIGTERM: end now, and let nobody join an instance that is going away.
            if let Some((_, rv)) = &listener {
                let _guard = rv.lock();
                rv.remove_files();
            }
            return;
        }
        let mut closed = Vec::new();
        for (i, ev) in revents[..nconns].iter().enumerate() {
            if ev.is_empty() {
                continue;
            }
            let mut buf = [0u8; 64];
            match (&conns[i]).read(&mut buf) {
                Ok(0) | Err(_) => closed.push(i),
                Ok(_) => {}
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if has_listener
            && !revents[nconns].is_empty()
            && let Some((l, _)) = &listener
            && let Ok((c, _)) = l.accept()
            && send_message(&c, MSG_READY, &fds, &ready.payload).is_ok()
        {
            conns.push(c);
        }
    }
}

/// Kills every process left in this instance's user namespace (descendants of members that
/// outlived them), except the instance itself and its own children (the image server, and the
/// holders of further images, which stop their own servers when they are let go).
fn kill_leftovers() {
    let me = getpid();
    let Ok(own) = fs::read_link("/proc/self/ns/user") else {
        return;
    };
    for _round in 0..5 {
        let mut found = false;
        let Ok(dir) = fs::read_dir("/proc") else {
            return;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me.as_raw() {
                continue;
            }
            if fs::read_link(format!("/proc/{pid}/ns/user")).ok().as_ref() != Some(&own) {
                continue;
            }
            if parent_of(pid) == Some(me.as_raw()) {
                continue;
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            found = true;
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Closes every fd above stderr but `keep`: the instance must not hold its creator's pipes, locks
/// or sockets.
fn close_inherited(keep: &[RawFd]) {
    let fds: Vec<RawFd> = match fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: the fds belong to this freshly forked process; nothing else uses them.
            unsafe { libc::close(fd) };
        }
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_payload_round_trip() {
        let images = vec![
            vec![EnvChange::Set("PATH".into(), "/opt/a/bin:/bin".into())],
            vec![],
            vec![
                EnvChange::Unset("X".into()),
                EnvChange::Set("IMAGE".into(), "b".into()),
            ],
        ];
        let p = encode_ready(Pid::from_raw(4242), &images);
        assert_eq!(decode_ready(&p), Some((4242, images)));
        // Truncated: no panic, no partial answer.
        assert_eq!(decode_ready(&p[..p.len() - 1]), None);
        assert_eq!(decode_ready(&p[..3]), None);
    }
}
