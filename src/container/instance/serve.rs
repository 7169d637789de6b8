//! The node instance once ready: it hands every connection its namespaces (a connection is a
//! membership), counts live connections, notes the ranks its members' starters say exited 0
//! ([`MSG_ENDED`]), and when the last one closes (or SIGTERM comes) kills what is left in its user
//! namespace and ends.

use std::collections::BTreeSet;
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
use super::protocol::{MSG_ENDED, MSG_MOUNT_LOST, MSG_READY, send_message};
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

/// One membership: the connection, and what it sent that is not a whole message yet.
struct Member {
    conn: UnixStream,
    unread: Vec<u8>,
}

impl Member {
    fn new(conn: UnixStream) -> Member {
        Member {
            conn,
            unread: Vec::new(),
        }
    }
}

/// Accepts members and counts live connections until none is left (or SIGTERM, or an image
/// server died: then every member is told, [`MSG_MOUNT_LOST`]). The ranks whose clean end the
/// members' starters told ([`MSG_ENDED`]) are added to `clean_ends`.
pub fn serve(
    creator: UnixStream,
    listener: Option<(UnixListener, Rendezvous)>,
    ready: &ReadyInstance,
    sigterm: &SignalFd,
    clean_ends: &mut BTreeSet<u32>,
) -> Result<(), ServeError> {
    let mut conns: Vec<Member> = vec![Member::new(creator)];
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
            conns.extend(accept_pending(l, &welcome)?.into_iter().map(Member::new));
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
                .map(|m| PollFd::new(m.conn.as_fd(), PollFlags::POLLIN)),
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
                for m in &conns {
                    let _ = send_message(&m.conn, MSG_MOUNT_LOST, &[], text.as_bytes());
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
        read_members(&mut conns, &revents[..nconns], clean_ends);
        if let Some((l, _)) = &listener
            && !revents[nconns].is_empty()
            && let Ok((c, _)) = l.accept()
            && welcome(&c)
        {
            conns.push(Member::new(c));
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

/// Reads the connections whose poll result shows them readable (one `read` each: they block):
/// notes the ranks of whole [`MSG_ENDED`] messages in `clean_ends`, discards anything else a
/// member sends, and drops the connections that closed.
fn read_members(conns: &mut Vec<Member>, revents: &[PollFlags], clean_ends: &mut BTreeSet<u32>) {
    let mut closed = Vec::new();
    for (i, ev) in revents.iter().enumerate() {
        if ev.is_empty() {
            continue;
        }
        let m = &mut conns[i];
        let mut buf = [0u8; 256];
        match (&m.conn).read(&mut buf) {
            Ok(0) | Err(_) => closed.push(i),
            Ok(n) => {
                m.unread.extend_from_slice(&buf[..n]);
                take_messages(&mut m.unread, clean_ends);
            }
        }
    }
    for i in closed.into_iter().rev() {
        conns.swap_remove(i);
    }
}

/// Takes the whole messages off the front of `unread` (a kind byte, three spare bytes, a
/// little-endian `u32` length, the payload; see [`super::protocol`]), noting the rank of each
/// [`MSG_ENDED`] in `clean_ends`. A member sends nothing else; whatever else comes, or a length
/// past a small bound, is dropped with all that is unread.
fn take_messages(unread: &mut Vec<u8>, clean_ends: &mut BTreeSet<u32>) {
    const HEADER: usize = 8;
    const MAX_PAYLOAD: usize = 64;
    loop {
        let Some(header) = unread.get(..HEADER) else {
            return;
        };
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_PAYLOAD {
            unread.clear();
            return;
        }
        let Some(payload) = unread.get(HEADER..HEADER + len) else {
            return;
        };
        if header[0] == MSG_ENDED
            && let Ok(rank) = <[u8; 4]>::try_from(payload)
        {
            clean_ends.insert(u32::from_le_bytes(rank));
        }
        unread.drain(..HEADER + len);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_messages_of_clean_ends_are_taken_and_the_rest_waits_or_goes() {
        let msg = |kind: u8, payload: &[u8]| {
            let mut m = vec![kind, 0, 0, 0];
            m.extend((payload.len() as u32).to_le_bytes());
            m.extend(payload);
            m
        };
        let mut ends = BTreeSet::new();
        let mut unread = msg(MSG_ENDED, &7u32.to_le_bytes());
        unread.extend(msg(b'?', b"what"));
        let second = msg(MSG_ENDED, &9u32.to_le_bytes());
        unread.extend(&second[..5]);
        take_messages(&mut unread, &mut ends);
        assert_eq!(ends, [7].into());
        assert_eq!(unread, second[..5]);
        unread.extend(&second[5..]);
        take_messages(&mut unread, &mut ends);
        assert_eq!(ends, [7, 9].into());
        assert!(unread.is_empty());
        // A rank of another size is not one; a huge length drops what is unread.
        let mut unread = msg(MSG_ENDED, &[1, 2]);
        unread.extend([MSG_ENDED, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1]);
        take_messages(&mut unread, &mut ends);
        assert_eq!(ends, [7, 9].into());
        assert!(unread.is_empty());
    }
}
