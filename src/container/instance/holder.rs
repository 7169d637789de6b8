//! Holders: the children of a node instance that hold the mount namespaces of a job's further
//! images.
//!
//! A job whose parts name different images gets one mount namespace per image in the
//! instance's one user namespace. The instance builds the first image's root itself; for each
//! further image it forks a holder ([`start_holder`]) that unshares a mount namespace of its
//! own, builds and enters that image's root, evaluates its environment scripts, hands the
//! instance its namespace ([`Holder::ready`]) and stays, the parent of that image's server,
//! until the instance lets go of it.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, getpid, getppid};

use super::InstanceError;
use super::image_env::eval_image_env;
use super::protocol::{
    MSG_READY, MSG_SETUP, MSG_UNSHARED, Message, SetupError, recv_message, send_message,
};
use crate::container::executor::execute;
use crate::container::member_env::{Env, EnvChange, decode_changes, encode_changes};
use crate::container::root::MountOp;
use crate::sys::SysError;
use crate::sys::process::{close_fds_except, fork_child};

/// A child of the instance that holds the mount namespace of one further image: it builds the
/// image's root, enters it, and stays (the parent of that image's server) until the instance
/// lets go of it (drops this handle).
pub struct Holder {
    pid: Pid,
    conn: UnixStream,
    image: String,
}

impl Holder {
    /// The holder's pid and the image it holds.
    pub fn who(&self) -> (Pid, &str) {
        (self.pid, &self.image)
    }

    /// Waits until the holder is ready; returns its mount namespace and what the image's
    /// environment scripts change.
    pub fn ready(&self) -> Result<(OwnedFd, Vec<EnvChange>), SetupError> {
        match recv_message(&self.conn) {
            Ok(Message {
                kind: MSG_READY,
                mut fds,
                payload,
            }) if fds.len() == 1 => Ok((fds.remove(0), decode_changes(&payload))),
            Ok(Message {
                kind: MSG_READY, ..
            }) => Err(SetupError::Holder {
                image: self.image.clone(),
                kind: MSG_SETUP,
                text: "malformed ready message".into(),
            }),
            other => Err(self.failure(other, " before it was ready")),
        }
    }

    /// What an answer other than the one awaited means: the failure the holder reported, or
    /// that it exited (`when`: " before it was ready", or nothing).
    fn failure(&self, got: Result<Message, InstanceError>, when: &str) -> SetupError {
        let (kind, text) = match got {
            Ok(msg) => (msg.kind, msg.text()),
            Err(e) => (
                MSG_SETUP,
                format!("the process building its root exited{when} ({e})"),
            ),
        };
        SetupError::Holder {
            image: self.image.clone(),
            kind,
            text,
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing the socket tells the holder to end; it is our child, so waiting cannot fail
        // but for EINTR, after which it is reaped with the instance.
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        let _ = waitpid(self.pid, None);
    }
}

/// Forks the holder of one further image (see [`Holder`]) and waits until it has a mount
/// namespace of its own.
///
/// The instance must be single-threaded (it is until it mounts its own image, after the holders
/// are forked).
pub fn start_holder(
    ops: &[MountOp],
    script_env: &Env,
    image: String,
) -> Result<Holder, SetupError> {
    let (ours, theirs) = UnixStream::pair().map_err(|source| SetupError::Io {
        step: format!("socketpair for image {image}"),
        source,
    })?;
    let instance = getpid();
    // SAFETY: the instance is single-threaded here (see above).
    let pid = unsafe {
        fork_child(move || {
            close_fds_except(3, &[theirs.as_raw_fd()]);
            holder_main(ops, script_env, instance, theirs)
        })
    }
    .map_err(|errno| SetupError::Io {
        step: format!("fork the process that builds image {image}"),
        source: errno.into(),
    })?;
    let holder = Holder {
        pid,
        conn: ours,
        image,
    };
    // Until the holder has its own mount namespace it shares the instance's, and would see
    // (and copy) the next root's staging mounts: wait for it.
    match recv_message(&holder.conn) {
        Ok(Message {
            kind: MSG_UNSHARED, ..
        }) => Ok(holder),
        other => Err(holder.failure(other, "")),
    }
}

/// The body of a holder: a mount namespace of its own (the user namespace is the instance's),
/// the image's root, its environment scripts; then it waits for the instance to end.
fn holder_main(ops: &[MountOp], script_env: &Env, instance: Pid, conn: UnixStream) -> i32 {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != instance {
        return 1;
    }
    let fail = |e: SetupError| {
        e.send(&conn);
        1
    };
    if let Err(errno) = unshare(CloneFlags::CLONE_NEWNS) {
        return fail(
            SysError {
                step: "unshare a mount namespace for the image",
                errno,
            }
            .into(),
        );
    }
    if send_message(&conn, MSG_UNSHARED, &[], &[]).is_err() {
        return 1;
    }
    let assembled = match execute(ops) {
        Ok(a) => a,
        Err(e) => return fail(e.into()),
    };
    let changes = match eval_image_env(script_env) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let mnt = match std::fs::File::open("/proc/self/ns/mnt") {
        Ok(f) => f,
        Err(source) => {
            return fail(SetupError::Io {
                step: "open /proc/self/ns/mnt".into(),
                source,
            });
        }
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
    let code = wait_until_let_go(&conn);
    drop(assembled);
    code
}

/// The exit status of a holder whose image server ended before the instance let it go: the
/// instance, whose child the holder is, takes it for a lost mount.
pub const EXIT_SERVER_ENDED: i32 = 3;

/// Holds on until the instance closes the socket (or dies, and the parent-death signal ends
/// this process), or the image's server, this process's child, ends (SIGCHLD, blocked since
/// the instance forked this process): returns the holder's exit status.
fn wait_until_let_go(conn: &UnixStream) -> i32 {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::SigSet;
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let mut child = SigSet::empty();
    child.add(Signal::SIGCHLD);
    // Without it, the holder still ends with the instance; it only cannot notice its server.
    let sigfd = SignalFd::with_flags(&child, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).ok();
    let mut buf = [0u8; 16];
    loop {
        let mut pfds = vec![PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        if let Some(s) = &sigfd {
            pfds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        if let Err(e) = poll(&mut pfds, PollTimeout::NONE)
            && e != nix::errno::Errno::EINTR
        {
            return 0;
        }
        let ready: Vec<bool> = pfds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        if ready.get(1).copied().unwrap_or(false)
            && let Some(s) = &sigfd
        {
            while let Ok(Some(_)) = s.read_signal() {}
            let flags = nix::sys::wait::WaitPidFlag::WEXITED
                | nix::sys::wait::WaitPidFlag::WNOHANG
                | nix::sys::wait::WaitPidFlag::WNOWAIT;
            if matches!(
                nix::sys::wait::waitid(nix::sys::wait::Id::All, flags),
                Ok(nix::sys::wait::WaitStatus::Exited(..)
                    | nix::sys::wait::WaitStatus::Signaled(..))
            ) {
                return EXIT_SERVER_ENDED;
            }
        }
        if ready[0] {
            match (&*conn).read(&mut buf) {
                Ok(0) => return 0,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return 0,
            }
        }
    }
}
