//! A member of a node instance: the program a forked child starts inside the instance's user
//! and mount namespaces.
//!
//! Everything the child needs is prepared before the fork ([`Prepared`]); the child then joins
//! the namespaces, changes directory and execs ([`member_main`]), allocating only to report a
//! failure.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::unistd::{Pid, getpid, getppid};

use super::InstanceError;
use crate::container::member_env::{DEFAULT_PATH, Env};
use crate::sys::process::fork_child;

/// A program to start in the container.
#[derive(Debug, Clone)]
pub struct MemberCommand {
    /// Program and arguments; a program without `/` is looked up in the container's `PATH`.
    pub argv: Vec<OsString>,
    /// The complete environment (see [`crate::container::member_env::member_environment`]).
    pub env: Env,
    /// The working directory inside the container (falls back to `$HOME`, then `/`).
    pub cwd: PathBuf,
    /// Makes the member a session leader (`setsid`), as hydra's proxy does for each rank: with
    /// the kernel's autogroup scheduling every session is its own CPU group, so ranks that share
    /// their launcher's session share one group's CPU time. The member then no longer gets the
    /// terminal's signals; whoever starts it passes them on.
    pub new_session: bool,
    /// Which of the instance's images the member runs in: 0 is
    /// [`super::InstanceConfig::root`], `k` is `other_roots[k - 1]`.
    pub image: usize,
    /// Descriptors the member gets, `(number in the member, descriptor here)`, set up in the
    /// child after the fork (this process's own descriptors are left alone). Others are
    /// inherited as they are: those without close-on-exec.
    pub fds: Vec<(RawFd, Arc<OwnedFd>)>,
    /// The CPUs the member may run on (`sched_setaffinity` before its exec), for CPU binding;
    /// `None` leaves the affinity it inherits.
    pub cpus: Option<nix::sched::CpuSet>,
}

/// Exit status of a member that could not be started: the program was not found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status of a member that could not be started: the program could not be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status of a member that could not join the instance's namespaces.
pub const EXIT_JOIN_FAILED: i32 = 255;

/// Forks the member child of `cmd`, which joins `user_ns` and `mnt_ns` and execs.
///
/// This process must be single-threaded (see [`super::NodeInstance::spawn`]).
pub fn start(
    cmd: &MemberCommand,
    user_ns: BorrowedFd,
    mnt_ns: BorrowedFd,
) -> Result<Pid, InstanceError> {
    let prepared = Prepared::new(cmd)?;
    let parent = getpid();
    // SAFETY: the caller is single-threaded (documented requirement of `NodeInstance::spawn`).
    unsafe { fork_child(|| member_main(&prepared, parent, user_ns, mnt_ns)) }.map_err(|errno| {
        InstanceError::Sys {
            step: "fork member",
            errno,
        }
    })
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
    cpus: Option<nix::sched::CpuSet>,
}

fn cstring(b: &[u8]) -> Result<CString, InstanceError> {
    CString::new(b).map_err(|_| InstanceError::NulByte)
}

impl Prepared {
    fn new(cmd: &MemberCommand) -> Result<Prepared, InstanceError> {
        let prog = cmd.argv.first().ok_or(InstanceError::NoCommand)?;
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
        Ok(Prepared {
            argv,
            envp,
            candidates: exec_candidates(cmd, prog)?,
            cwd: cstring(cmd.cwd.as_os_str().as_bytes())?,
            home: cmd
                .env
                .get(std::ffi::OsStr::new("HOME"))
                .and_then(|h| CString::new(h.as_bytes()).ok()),
            name: prog.to_string_lossy().into_owned(),
            new_session: cmd.new_session,
            fds: cmd.fds.iter().map(|(n, fd)| (*n, fd.as_raw_fd())).collect(),
            cpus: cmd.cpus,
        })
    }
}

/// The paths to try executing `prog` at: itself if it has a `/`, else each directory of the
/// command's `PATH` (the container's default if it has none; an empty entry is `.`).
fn exec_candidates(cmd: &MemberCommand, prog: &OsString) -> Result<Vec<CString>, InstanceError> {
    if prog.as_bytes().contains(&b'/') {
        return Ok(vec![cstring(prog.as_bytes())?]);
    }
    let path = cmd
        .env
        .get(std::ffi::OsStr::new("PATH"))
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_else(|| DEFAULT_PATH.as_bytes().to_vec());
    path.split(|&b| b == b':')
        .map(|d| {
            let d = if d.is_empty() { b".".as_slice() } else { d };
            let mut p = d.to_vec();
            p.push(b'/');
            p.extend_from_slice(prog.as_bytes());
            cstring(&p)
        })
        .collect()
}

fn say(msg: &str) {
    let mut e = std::io::stderr().lock();
    // Nowhere else to report a failed write to stderr.
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
    enter_cwd(p);
    // Before the exec, so that every thread the program starts inherits it.
    if let Some(cpus) = &p.cpus
        && let Err(e) = nix::sched::sched_setaffinity(Pid::from_raw(0), cpus)
    {
        say(&format!("cannot bind the program to its CPUs: {e}"));
        return EXIT_JOIN_FAILED;
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None) {
        say(&format!("cannot unblock the program's signals: {e}"));
        return EXIT_JOIN_FAILED;
    }
    exec_first(p)
}

/// Changes to the member's directory, else its `$HOME`, else `/`, saying so.
fn enter_cwd(p: &Prepared) {
    if nix::unistd::chdir(p.cwd.as_c_str()).is_ok() {
        return;
    }
    let fallback = p
        .home
        .as_deref()
        .filter(|h| nix::unistd::chdir(*h).is_ok())
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|| {
            // `/` exists in every root; should it fail, the program starts where it is.
            let _ = nix::unistd::chdir("/");
            "/".into()
        });
    say(&format!(
        "working directory {} does not exist in the container; using {fallback}",
        p.cwd.to_string_lossy()
    ));
}

/// Execs the first candidate that exists; returns the exit status when none could be run.
fn exec_first(p: &Prepared) -> i32 {
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
