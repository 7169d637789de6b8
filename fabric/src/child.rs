//! Asking a forked child a question: the child computes a value and sends it back as JSON, so
//! whatever computing it starts (a loaded library's threads, a namespace it enters, a mount)
//! stays in the child and ends with it.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! let pid: u32 = cmpirun_fabric::child::answer_in_child(Duration::from_secs(5), std::process::id)?;
//! assert_ne!(pid, std::process::id());
//! # Ok::<(), String>(())
//! ```

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Runs `question` in a forked child and returns its answer; `Err` says why there is none (the
/// child panicked, was killed, or did not answer within `timeout`, after which it is killed).
///
/// Forking is only safe from a single-threaded process, so this refuses to run in any other.
/// The child leaves with `_exit`: it never returns into the caller's code and runs none of the
/// parent's destructors.
pub fn answer_in_child<T, F>(timeout: Duration, question: F) -> Result<T, String>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> T,
{
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("cannot count this process's threads: {e}"))?
        .count();
    if threads != 1 {
        return Err(format!(
            "this process has {threads} threads and forking it is unsafe; ask in a helper process instead"
        ));
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", io::Error::last_os_error()));
    }
    // SAFETY: the descriptors are fresh and owned here from now on.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded (checked above), so the child may do anything the
    // parent could; it leaves with _exit and never returns into the caller's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        // A parent killed while waiting takes the child (and its question) with it.
        // SAFETY: prctl with an integer argument; it only sets this process's parent-death signal.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(question)) {
            Ok(answer) => {
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                let mut out = std::fs::File::from(write_end);
                if out.write_all(&bytes).is_ok() { 0 } else { 1 }
            }
            Err(_) => 101,
        };
        // SAFETY: ends the child without running the parent's exit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    drop(write_end);
    let result = read_with_deadline(read_end, Instant::now() + timeout);
    if result.is_err() {
        // SAFETY: pid is our child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let bytes = result?;
    if bytes.is_empty() {
        return Err(if libc::WIFSIGNALED(status) {
            format!("the child was killed by signal {}", libc::WTERMSIG(status))
        } else if libc::WEXITSTATUS(status) == 101 {
            "the child panicked".to_owned()
        } else {
            format!(
                "the child exited with status {} without an answer",
                libc::WEXITSTATUS(status)
            )
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer from the child: {e}"))
}

fn read_with_deadline(fd: OwnedFd, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no answer before the timeout; the child was killed".into());
        }
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if ready == 0 {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}
