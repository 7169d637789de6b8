//! Forking a child that never returns into its caller, and closing the descriptors a child
//! inherited.
//!
//! Every process cmpirun forks without exec'ing a program right away (the node instance, a
//! member before its `execve`, an image's holder, the image server, the facts reader) goes
//! through [`fork_child`], so the rules of life between `fork` and `_exit` are stated once.

use std::os::fd::RawFd;
use std::panic::AssertUnwindSafe;

use nix::errno::Errno;
use nix::unistd::{ForkResult, Pid, fork};

/// Exit status of a forked child whose body panicked (Rust's own status for a panic).
pub const EXIT_PANICKED: i32 = 101;

/// Forks; the child runs `child` and ends with `_exit` of what it returns, and the parent gets
/// the child's pid.
///
/// The child never returns into the caller's code: its exit status is `child`'s value (or
/// [`EXIT_PANICKED`] if `child` panics), and `_exit` skips the exit handlers and the destructors
/// of everything the child inherited, which are the parent's to run. In the parent, `child` is
/// dropped without being called, so whatever it owns is closed there: move the child's end of a
/// socketpair into it and the parent needs no `drop` of its own.
///
/// # Safety
///
/// After `fork` the child has only the calling thread; any lock another thread held (the
/// allocator's, stdio's, the logger's) stays locked for ever in it. The caller must make sure
/// `child` can run there: either this process is single-threaded at the call (then the child may
/// do anything the parent could), or `child` calls only async-signal-safe functions on data
/// prepared before the fork (no allocation, no locking, no logging). Each call site says which
/// of the two holds.
pub unsafe fn fork_child<F: FnOnce() -> i32>(child: F) -> Result<Pid, Errno> {
    // SAFETY: this function's contract, which the caller upholds, is exactly `fork`'s.
    match unsafe { fork() }? {
        ForkResult::Parent { child: pid } => Ok(pid),
        ForkResult::Child => {
            let code = std::panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_PANICKED);
            // SAFETY: ends the forked child here, without running the parent's exit handlers or
            // destructors (see above); `_exit` is async-signal-safe.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Closes every descriptor numbered `from` or higher except those in `keep`, so a child holds
/// none of its parent's pipes, sockets or locks.
///
/// Allocates nothing and calls only `close_range(2)` (Linux 5.9; before that, `getrlimit` and
/// `close` on each number up to the open-files limit), so it may run in a forked child of a
/// threaded process and between `fork` and `exec`.
pub fn close_fds_except(from: RawFd, keep: &[RawFd]) {
    let mut next = u32::try_from(from).unwrap_or(0);
    loop {
        // The lowest kept descriptor at or above `next`, found without sorting a copy.
        let kept = keep
            .iter()
            .filter_map(|&fd| u32::try_from(fd).ok())
            .filter(|&fd| fd >= next)
            .min();
        match kept {
            Some(k) => {
                if k > next {
                    close_range(next, k - 1);
                }
                match k.checked_add(1) {
                    Some(n) => next = n,
                    None => return,
                }
            }
            None => {
                close_range(next, u32::MAX);
                return;
            }
        }
    }
}

/// Closes descriptors `first..=last`.
fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes descriptors of this process; the caller of
    // `close_fds_except` has said nothing in it uses them.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc == 0 || Errno::last() != Errno::ENOSYS {
        // The other errors are EINVAL for bad arguments, which `first <= last` rules out.
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        u32::try_from(limit.rlim_cur).unwrap_or(u32::MAX)
    } else {
        1 << 20
    };
    for fd in first..=last.min(max.saturating_sub(1)) {
        // SAFETY: as above; closing a number that is not open only returns EBADF.
        unsafe { libc::close(fd as RawFd) };
    }
}

/// Makes writes to this process's stderr never block: for a pipe, a FIFO or a terminal, stderr
/// is reopened through `/proc/self/fd/2` (a new open file description, so the flag reaches no
/// other process writing there) with `O_NONBLOCK` and put at descriptor 2. A regular file, whose
/// writes do not block, and a socket, which cannot be reopened so, stay as they are; so does
/// stderr when reopening fails (a pipe whose reader is gone). A log line that would block is
/// then dropped (cmpirun's logger ignores failed writes), so a process that must keep serving
/// (the image server) never waits for a terminal that is stopped or a reader that does not read.
pub fn nonblocking_stderr() {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return;
    };
    let kind = meta.file_type();
    if !(kind.is_fifo() || kind.is_char_device()) {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/proc/self/fd/2")
    else {
        return;
    };
    // On failure stderr stays the blocking one it was.
    let _ = nix::unistd::dup2_stderr(&file);
}

/// Whether `sig` is ignored (`SIG_IGN`) in this process: what `nohup` does to `SIGHUP`, and a
/// non-interactive shell to `SIGINT` and `SIGQUIT` of the jobs it starts with `&`.
pub fn ignored(sig: nix::sys::signal::Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`, which is valid for
    // writes (zeroed memory of the right type).
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: `sigaction` filled `old` when it returned 0; zeroed memory is a valid value anyway.
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_child_exits_with_what_its_body_returns_and_closes_what_it_is_told() {
        let kept = std::fs::File::open("/dev/null").expect("open /dev/null");
        let closed = std::fs::File::open("/dev/null").expect("open /dev/null");
        let (k, c) = (kept.as_raw_fd(), closed.as_raw_fd());
        let body = || {
            close_fds_except(3, &[k]);
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let open = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            match (open(k), open(c)) {
                (true, false) => 7,
                _ => 1,
            }
        };
        // SAFETY: the child only makes system calls (fcntl, close_range) on data prepared
        // before the fork, which is safe even though the test harness has threads.
        let pid = unsafe { fork_child(body) }.expect("fork");
        let status = nix::sys::wait::waitpid(pid, None).expect("waitpid");
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 7));
    }

    #[test]
    fn ignored_reads_the_disposition_without_changing_it() {
        use nix::sys::signal::{SigHandler, Signal, signal};
        // SIGUSR2 is not used by the test harness.
        // SAFETY: no handler function is installed, only SIG_IGN and SIG_DFL.
        let before = unsafe { signal(Signal::SIGUSR2, SigHandler::SigIgn) }.unwrap();
        assert!(ignored(Signal::SIGUSR2));
        assert!(ignored(Signal::SIGUSR2));
        // SAFETY: as above.
        unsafe { signal(Signal::SIGUSR2, SigHandler::SigDfl) }.unwrap();
        assert!(!ignored(Signal::SIGUSR2));
        // SAFETY: as above; `before` was a disposition of this process.
        unsafe { signal(Signal::SIGUSR2, before) }.unwrap();
    }
}
