//! The node instance once ready: it hands every connection its namespaces (a connection is a
//! membership), counts live connections, and when the last one closes (or SIGTERM comes) kills
//! what is left in its user namespace and ends.

use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::unistd::{Pid, getpid};

use super::process::ReadyInstance;
use super::protocol::{MSG_MOUNT_LOST, MSG_READY, send_message};
use crate::container::rendezvous::Rendezvous;

/// Why the instance stopped serving before its last member left.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Waiting for members failed.
    #[error("poll: {0}")]
    Poll(Errno),
    /// The listener could not be switched between blocking and non-blocking.
    #[error("make the member socket {mode}: {source}")]
    Listener {
        /// "non-blocking" or "blocking".
        mode: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Accepts members and counts live connections until none is left (or SIGTERM, or an image
/// server died: then every member is told, [`MSG_MOUNT_LOST`]).
pub fn serve(
    creator: UnixStream,
    listener: Option<(UnixListener, Rendezvous)>,
    ready: &ReadyInstance,
    sigterm: &SignalFd,
) -> Result<(), ServeError> {
    let mut conns: Vec<UnixStream> = vec![creator];
    let fds = ready.fds();
    let welcome = |c: &UnixStream| send_message(c, MSG_READY, &fds, &ready.payload).is_ok();
    loop {
        if conns.is_empty() {
            let Some((l, rv)) = &listener else {
                return Ok(());
            };
            // Under the rendezvous lock: a joiner that connected before we got the lock is
            // still accepted; after it, the socket is gone and joiners create a new instance.
            let guard = rv.lock();
            conns.extend(accept_pending(l, &welcome)?);
            if conns.is_empty() {
                rv.remove_files();
                drop(guard);
                return Ok(());
            }
            drop(guard);
        }
        let mut pfds: Vec<PollFd> = Vec::with_capacity(conns.len() + 2);
        pfds.extend(
            conns
                .iter()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        let nconns = conns.len();
        if let Some((l, _)) = &listener {
            pfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        pfds.push(PollFd::new(sigterm.as_fd(), PollFlags::POLLIN));
        match poll(&mut pfds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ServeError::Poll(e)),
        }
        let revents: Vec<PollFlags> = pfds
            .iter()
            .map(|p| p.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(pfds);
        if revents.last().is_some_and(|r| !r.is_empty()) {
            let (term, child) = read_signals(sigterm);
            // An image server (or a holder, whose server died) is gone while members run: their
            // files are gone too. Say so to every member, end every process of the instance, and
            // end the instance.
            if let Some(how) = child.then(|| died_child(&ready.holders())).flatten() {
                let text = format!(
                    "the image mount of node {} ended ({how}); the job was ended",
                    hostname()
                );
                tracing::error!("node instance: {text}");
                for c in &conns {
                    let _ = send_message(c, MSG_MOUNT_LOST, &[], text.as_bytes());
                }
                forget_rendezvous(&listener);
                return Ok(());
            }
            if term {
                // SIGTERM: end now, and let nobody join an instance that is going away.
                forget_rendezvous(&listener);
                return Ok(());
            }
            continue;
        }
        drop_closed(&mut conns, &revents[..nconns]);
        if let Some((l, _)) = &listener
            && !revents[nconns].is_empty()
            && let Ok((c, _)) = l.accept()
            && welcome(&c)
        {
            conns.push(c);
        }
    }
}

/// Removes the rendezvous files (under their lock), so that nobody joins an instance that is
/// going away.
fn forget_rendezvous(listener: &Option<(UnixListener, Rendezvous)>) {
    if let Some((_, rv)) = listener {
        let _guard = rv.lock();
        rv.remove_files();
    }
}

/// Reads the pending signals: whether SIGTERM came, and whether SIGCHLD did.
fn read_signals(sigfd: &SignalFd) -> (bool, bool) {
    let (mut term, mut child) = (false, false);
    while let Ok(Some(info)) = sigfd.read_signal() {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGTERM) => term = true,
            Ok(Signal::SIGCHLD) => child = true,
            _ => {}
        }
    }
    (term, child)
}

/// How a child of the instance that ended did (`its server, pid 12, was killed by signal 9
/// (SIGKILL)`), without reaping it: the image's mount and the holders reap their own. The
/// instance's children are the first image's server and the holders of further images, none
/// of which ends while members run.
fn died_child(holders: &[(Pid, String)]) -> Option<String> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let (pid, how) = match waitid(Id::All, flags) {
        Ok(WaitStatus::Exited(pid, super::holder::EXIT_SERVER_ENDED)) => {
            (pid, "left because its image server ended".to_owned())
        }
        Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exited with status {code}")),
        Ok(WaitStatus::Signaled(pid, sig, _)) => {
            (pid, format!("was killed by signal {} ({sig})", sig as i32))
        }
        _ => return None,
    };
    Some(match holders.iter().find(|(p, _)| *p == pid) {
        Some((_, image)) => format!("the holder of image {image}, pid {pid}, {how}"),
        None => format!("its server, pid {pid}, {how}"),
    })
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into())
}

/// Accepts every member already waiting on `l`, without waiting for more.
fn accept_pending(
    l: &UnixListener,
    welcome: &impl Fn(&UnixStream) -> bool,
) -> Result<Vec<UnixStream>, ServeError> {
    let mode = |mode, nonblocking| {
        l.set_nonblocking(nonblocking)
            .map_err(|source| ServeError::Listener { mode, source })
    };
    mode("non-blocking", true)?;
    let mut accepted = Vec::new();
    while let Ok((c, _)) = l.accept() {
        // An accepted socket may inherit the listener's O_NONBLOCK; a member that cannot be
        // switched back is not welcomed (its handshake could fail half-way).
        if c.set_nonblocking(false).is_ok() && welcome(&c) {
            accepted.push(c);
        }
    }
    mode("blocking", false)?;
    Ok(accepted)
}

/// Drops the connections whose poll result shows them closed (or readable: a member never
/// sends anything, so what it sends is read and discarded).
fn drop_closed(conns: &mut Vec<UnixStream>, revents: &[PollFlags]) {
    let mut closed = Vec::new();
    for (i, ev) in revents.iter().enumerate() {
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
}

/// Kills every process left in this instance's user namespace (descendants of members that
/// outlived them), except the instance itself and its own children (the image server, and the
/// holders of further images, which stop their own servers when they are let go).
pub fn kill_leftovers() {
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
            if pid == me.as_raw()
                || fs::read_link(format!("/proc/{pid}/ns/user")).ok().as_ref() != Some(&own)
                || parent_of(pid) == Some(me.as_raw())
            {
                continue;
            }
            // A process that is already gone needs no killing.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            found = true;
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}
