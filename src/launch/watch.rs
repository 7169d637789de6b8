//! The rank mode's wait for its rank: pass signals on, relay the rank's PMI connection, and tell
//! how the rank ended.
//!
//! Under srun (`--mpi=pmi2`) and hydra, `MPI_Abort` reaches the PMI server as an `abort` command,
//! and the server kills the whole step at once (with SIGKILL), this task included, while the rank
//! still waits for an answer: its exit never shows the code. So when the launcher gave the task a
//! `PMI_FD`, the task sits between the rank and the server ([`Relay`]): the rank gets one end of a
//! socketpair as its `PMI_FD`, the task copies bytes both ways, and it sees an `abort` before the
//! server does. Nothing else is changed on the connection. The relay also tells the rank mode
//! which commands the rank sent (it is an MPI rank once it speaks PMI; at `finalize` its memory
//! map is looked at a last time, [`super::injected::RankWatch`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use cmpirun_pmi::wire::{DEFAULT_MAX_MESSAGE, Decoded, decode};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{
    AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, send, shutdown, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::container::run::Outcome;

/// Bytes buffered per direction before the relay stops reading from the sender.
const HIGH_WATER: usize = 256 * 1024;

/// The task's place between its rank and the launcher's PMI server.
pub struct Relay {
    /// The launcher's connection (`PMI_FD` as the task got it).
    up: OwnedFd,
    /// The task's end of the socketpair whose other end the rank gets.
    down: OwnedFd,
    /// The rank's end, held until the rank is started.
    rank_end: Option<OwnedFd>,
}

impl Relay {
    /// Interposes on the PMI connection at descriptor `pmi_fd` (inherited from srun or hydra).
    pub fn new(pmi_fd: RawFd) -> Result<Relay, Errno> {
        // SAFETY: the descriptor is only borrowed to check it is open.
        fcntl(unsafe { BorrowedFd::borrow_raw(pmi_fd) }, FcntlArg::F_GETFD)?;
        // SAFETY: `PMI_FD` was inherited for this process's use and nothing else in it owns it.
        let up = unsafe { OwnedFd::from_raw_fd(pmi_fd) };
        fcntl(&up, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        let (down, rank_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // The rank inherits its end across the fork and the exec.
        fcntl(&rank_end, FcntlArg::F_SETFD(FdFlag::empty()))?;
        for fd in [&up, &down] {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        Ok(Relay {
            up,
            down,
            rank_end: Some(rank_end),
        })
    }

    /// The descriptor number the rank gets as `PMI_FD`.
    pub fn rank_fd(&self) -> Option<RawFd> {
        self.rank_end.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes the rank's end in this process once the rank holds it.
    pub fn started(&mut self) {
        self.rank_end = None;
    }
}

/// One direction of the relay.
struct Flow {
    buf: Vec<u8>,
    /// The sender closed (or failed): nothing more to read.
    eof: bool,
    /// The receiver failed: nothing more can be written.
    broken: bool,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            buf: Vec::new(),
            eof: false,
            broken: false,
        }
    }

    fn wants_read(&self) -> bool {
        !self.eof && !self.broken && self.buf.len() < HIGH_WATER
    }

    /// Reads what `from` has; returns the new bytes.
    fn read(&mut self, from: BorrowedFd) -> &[u8] {
        let start = self.buf.len();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match nix::unistd::read(from, &mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() >= HIGH_WATER {
                        break;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        &self.buf[start..]
    }

    /// Writes what it can to `to` (MSG_NOSIGNAL: a closed peer must not kill the task).
    fn flush(&mut self, to: BorrowedFd) {
        while !self.buf.is_empty() && !self.broken {
            match send(to.as_raw_fd(), &self.buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(Errno::ENOTSOCK) => match nix::unistd::write(to, &self.buf) {
                    Ok(n) => {
                        self.buf.drain(..n);
                    }
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(_) => self.broken = true,
                },
                Err(_) => self.broken = true,
            }
        }
        if self.broken {
            self.buf.clear();
        }
    }
}

/// Reads the rank's PMI messages: their commands, and finds an `abort` in them (PMI-1 `cmd=abort exitcode=N`, PMI-2
/// `cmd=abort;isworld=1;msg=…;`, which has no code: 1, as the local launcher's server reads it).
struct AbortScanner {
    buf: Vec<u8>,
    broken: bool,
}

impl AbortScanner {
    /// Takes the next bytes from the rank; calls `on_cmd` with each complete message's command.
    fn push(
        &mut self,
        bytes: &[u8],
        mut on_cmd: impl FnMut(&str),
    ) -> Option<(i32, Option<String>)> {
        if self.broken {
            return None;
        }
        self.buf.extend_from_slice(bytes);
        let mut found = None;
        loop {
            match decode(&self.buf, DEFAULT_MAX_MESSAGE) {
                Ok(Decoded::Message(msg, used)) => {
                    self.buf.drain(..used);
                    on_cmd(&msg.cmd);
                    if msg.cmd == "abort" && found.is_none() {
                        let code = msg
                            .get_int("exitcode")
                            .and_then(|c| i32::try_from(c).ok())
                            .unwrap_or(1);
                        let text = msg.get("message").or_else(|| msg.get("msg"));
                        found = Some((code, text.map(str::to_owned)));
                    }
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    // Not a wire this task understands: keep relaying, stop looking.
                    tracing::debug!("PMI relay: {e}; no longer looking for an abort");
                    self.broken = true;
                    self.buf = Vec::new();
                    break;
                }
            }
        }
        found
    }
}

/// How the wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// How the rank ended.
    pub outcome: Outcome,
    /// Whether this task got (and passed on) a signal that ends a job: then the rank's end is
    /// the launcher's teardown, not a failure of its own.
    pub signalled: bool,
}

/// How long a task whose rank was killed by a job-ending signal (or SIGKILL) waits for the same
/// teardown to signal the task itself, before it reports the kill as the rank's own failure.
const TEARDOWN_SKEW_MS: u8 = 200;

/// Signals with which srun, hydra or the user end a job.
fn ends_job(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
    )
}

/// Waits for `child`, passing on every signal read from `sigfd` (but `SIGCHLD`) to its process
/// group, relaying its PMI connection through `relay` and calling `on_abort(code, message)` when
/// the rank sends an `abort`, before the server gets it; `on_cmd` is called with the command of
/// every message the rank sends, also before the server gets it. `tick` is called before each wait and
/// says when it wants to be called again (`None`: not before something happens). The caller
/// keeps `relay` (and so the launcher's descriptor) until it exits, as it would hold `PMI_FD`
/// without the relay.
pub fn watch(
    child: Pid,
    sigfd: &SignalFd,
    relay: Option<&Relay>,
    mut on_abort: impl FnMut(i32, Option<String>),
    mut on_cmd: impl FnMut(&str),
    mut tick: impl FnMut() -> Option<std::time::Duration>,
) -> Watched {
    let mut signalled = false;
    let read_signals = |signalled: &mut bool| {
        while let Ok(Some(info)) = sigfd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) | Err(_) => {}
                Ok(sig) => {
                    *signalled |= ends_job(sig);
                    // The rank leads its own session: its process group is the rank and what it
                    // started (the rank alone before it has called setsid).
                    if killpg(child, sig).is_err() {
                        let _ = kill(child, sig);
                    }
                }
            }
        }
    };
    let mut up_flow = Flow::new();
    let mut down_flow = Flow::new();
    let mut scanner = AbortScanner {
        buf: Vec::new(),
        broken: false,
    };
    loop {
        let outcome = match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(Outcome::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => Some(Outcome::Signaled(sig)),
            Ok(_) | Err(Errno::EINTR) => None,
            Err(_) => Some(Outcome::Exited(crate::exit::FAILURE)),
        };
        if let Some(outcome) = outcome {
            // A teardown signal may have reached the rank first: count it before judging. srun
            // signals the processes of a step one by one, so when the rank was ended by such a
            // signal and this task has none yet, it waits a moment for its own.
            read_signals(&mut signalled);
            if !signalled
                && matches!(outcome, Outcome::Signaled(sig) if sig == Signal::SIGKILL || ends_job(sig))
            {
                let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
                if matches!(poll(&mut fds, PollTimeout::from(TEARDOWN_SKEW_MS)), Ok(n) if n > 0) {
                    read_signals(&mut signalled);
                }
            }
            if let Some(r) = relay {
                up_flow.flush(r.up.as_fd());
            }
            return Watched { outcome, signalled };
        }
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        // A descriptor with nothing to wait for is left out: a hung-up one would wake poll
        // at once, again and again.
        let (mut down_at, mut up_at) = (None, None);
        if let Some(r) = relay {
            let mut down = PollFlags::empty();
            if up_flow.wants_read() {
                down |= PollFlags::POLLIN;
            }
            if !down_flow.buf.is_empty() {
                down |= PollFlags::POLLOUT;
            }
            let mut up = PollFlags::empty();
            if down_flow.wants_read() {
                up |= PollFlags::POLLIN;
            }
            if !up_flow.buf.is_empty() {
                up |= PollFlags::POLLOUT;
            }
            if !down.is_empty() {
                down_at = Some(fds.len());
                fds.push(PollFd::new(r.down.as_fd(), down));
            }
            if !up.is_empty() {
                up_at = Some(fds.len());
                fds.push(PollFd::new(r.up.as_fd(), up));
            }
        }
        let timeout = tick().map_or(PollTimeout::NONE, |d| {
            let ms = d.as_millis().clamp(1, 60_000) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE)
        });
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("poll: {e}");
                return Watched {
                    outcome: wait_blocking(child),
                    signalled,
                };
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            read_signals(&mut signalled);
        }
        let Some(r) = relay else { continue };
        let is_ready = |at: Option<usize>| at.is_some_and(|i| ready[i]);
        if is_ready(down_at) && up_flow.wants_read() {
            let new = up_flow.read(r.down.as_fd()).to_vec();
            if let Some((code, message)) = scanner.push(&new, &mut on_cmd) {
                // Before the server sees the abort and the launcher kills this task.
                on_abort(code, message);
            }
        }
        if is_ready(up_at) && down_flow.wants_read() {
            down_flow.read(r.up.as_fd());
        }
        up_flow.flush(r.up.as_fd());
        down_flow.flush(r.down.as_fd());
        // The server's close reaches the rank. The rank's does not reach the server: without
        // the relay this task would hold the launcher's descriptor open until it exits, and
        // Slurm's pmi2 plugin complains about a task that closes it early.
        if down_flow.eof && down_flow.buf.is_empty() {
            let _ = shutdown(r.down.as_raw_fd(), Shutdown::Write);
        }
    }
}

fn wait_blocking(child: Pid) -> Outcome {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Outcome::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Outcome::Signaled(sig),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return Outcome::Exited(crate::exit::FAILURE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborts_are_found_on_either_wire() {
        let mut s = AbortScanner {
            buf: Vec::new(),
            broken: false,
        };
        let mut cmds = Vec::new();
        assert_eq!(
            s.push(b"cmd=init pmi_version=1 pmi_subversion=1\ncmd=abo", |c| {
                cmds.push(c.to_owned())
            }),
            None
        );
        assert_eq!(cmds, ["init"]);
        assert_eq!(
            s.push(
                b"rt exitcode=7 message=application called MPI_Abort(MPI_COMM_WORLD, 7)\n",
                |_| {}
            ),
            Some((
                7,
                Some("application called MPI_Abort(MPI_COMM_WORLD, 7)".into())
            ))
        );
        let v2 = b"cmd=abort;isworld=1;msg=oops;";
        let mut wire = format!("{:<6}", v2.len()).into_bytes();
        wire.extend_from_slice(v2);
        let mut s = AbortScanner {
            buf: Vec::new(),
            broken: false,
        };
        assert_eq!(s.push(&wire, |_| {}), Some((1, Some("oops".into()))));
        assert_eq!(s.push(b"\x00garbage", |_| {}), None);
        assert!(s.broken);
    }
}
