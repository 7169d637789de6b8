//! The local launcher's PMIx server, in a process of its own.
//!
//! `PMIx_server_init` starts the library's threads, and the local launcher must stay
//! single-threaded until every rank is forked into the node instance. So cmpirun forks a server
//! process (after the instance, so that only cmpirun holds the server's socket), which loads the
//! host's libpmix and runs `cmpirun_pmi::pmix::server::serve`: it registers the job, prepares
//! every rank's environment (`PMIx_server_setup_fork`) and sends them back, then reports what
//! the ranks do (connected, finalized, `MPI_Abort`) as JSON lines. cmpirun turns those into the
//! same events its own PMI-1/PMI-2 server gives, so the rest of the launcher is the same.
//!
//! Every wait has a deadline and says what it waited for: the server's start, each library
//! call inside it (a client registered with a wrong uid wedges some libpmix versions), and its
//! end (after which it is killed). The server's directory is removed by the server and again by
//! cmpirun, whichever ends last; if cmpirun is killed, the server sees its socket close and
//! cleans up.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cmpirun_pmi::pmix::server::{PmixJob, ServerMessage, serve};
use cmpirun_pmi::server::Event;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use super::node;
use crate::plan::LaunchPlan;

/// How long the server may take to start (load the library, register the job and every rank).
const START_WAIT: Duration = Duration::from_secs(30);
/// How long each library call inside the server may take.
const CALL_WAIT: Duration = Duration::from_secs(10);
/// How long the server may take to end once told to.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Errors of the PMIx server process.
#[derive(Debug, thiserror::Error)]
pub enum PmixError {
    /// The server process could not be made.
    #[error("cannot start the PMIx server process: {0}")]
    Start(String),
    /// The server said it could not start.
    #[error("the PMIx server could not start: {0}")]
    Failed(String),
    /// The server did not answer in time.
    #[error(
        "the PMIx server did not answer within {0} s (loading the host's libpmix, \
         PMIx_server_init, registering the job and its ranks); run with -v for its log"
    )]
    Timeout(u64),
}

/// The running server process.
pub struct PmixServerProcess {
    pid: Pid,
    conn: Option<UnixStream>,
    tmpdir: PathBuf,
    /// The host libpmix it loaded.
    pub library: String,
    /// Its `PMIx_Get_version()`.
    pub version: String,
    env: Vec<Vec<(String, String)>>,
}

/// Removes the directories of this user's earlier servers whose cmpirun is gone (the server
/// removes its own when cmpirun ends or is killed; only a server killed itself leaves one).
fn sweep_stale(tmp: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::getuid().as_raw();
    let Ok(dir) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("cmpirun-pmix-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let mine = e
            .path()
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if mine && kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
            tracing::debug!("removing {} (its cmpirun is gone)", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private directory for the server, under `/tmp` (which every node instance binds at the
/// same path, so the ranks see the session directories there).
fn private_dir() -> Result<PathBuf, PmixError> {
    sweep_stale(&std::env::temp_dir());
    let mut last = None;
    for i in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "cmpirun-pmix-{}-{:x}",
            std::process::id(),
            nanos ^ i
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last = Some(format!("{}: {e}", dir.display())),
        }
    }
    Err(PmixError::Start(last.unwrap_or_default()))
}

/// Closes every descriptor of this (just forked) process but `keep` and 0, 1, 2: the server
/// must not hold the node instance's connection or the ranks' pipes.
fn close_others(keep: RawFd) {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // SAFETY: closing a descriptor this process does not use any more (the read_dir's own
        // descriptor is closed already, and a stale number only gives EBADF).
        unsafe { libc::close(fd) };
    }
}

impl PmixServerProcess {
    /// Forks the server of `plan`'s job and waits until it is ready. Must be called while
    /// cmpirun is single-threaded.
    pub fn start(plan: &LaunchPlan, hostname: &str) -> Result<PmixServerProcess, PmixError> {
        let tmpdir = private_dir()?;
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "/".into());
        let job = PmixJob {
            nspace: format!("cmpirun-{}", std::process::id()),
            hostname: hostname.to_owned(),
            appnums: (0..plan.layout.size)
                .map(|r| node::part_of(plan, r) as u32)
                .collect(),
            wdirs: plan
                .apps
                .iter()
                .map(|a| {
                    a.wdir
                        .clone()
                        .or_else(|| plan.job.wdir.clone())
                        .map_or_else(|| cwd.clone(), |d| d.display().to_string())
                })
                .collect(),
            tmpdir: tmpdir.clone(),
            // The ranks' user namespace maps the user to itself: they report these ids.
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            deadline: CALL_WAIT,
        };
        let (conn, theirs) = UnixStream::pair().map_err(|e| PmixError::Start(e.to_string()))?;
        // SAFETY: cmpirun is single-threaded here (the local launcher checks it first), so the
        // child may do anything; it never returns into the launcher (it ends with _exit).
        match unsafe { fork() } {
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmpdir);
                Err(PmixError::Start(format!("fork: {e}")))
            }
            Ok(ForkResult::Child) => {
                drop(conn);
                close_others(theirs.as_raw_fd());
                let status = serve(&plan.launcher.pmix_libraries, &job, theirs);
                let _ = std::fs::remove_dir_all(&job.tmpdir);
                // SAFETY: ends this process at once, without running the launcher's exit
                // handlers or waiting for the library's threads.
                unsafe { libc::_exit(status) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                let mut server = PmixServerProcess {
                    pid: child,
                    conn: Some(conn),
                    tmpdir,
                    library: String::new(),
                    version: String::new(),
                    env: Vec::new(),
                };
                match server.ready() {
                    Ok(()) => Ok(server),
                    Err(e) => {
                        server.stop();
                        Err(e)
                    }
                }
            }
        }
    }

    /// Reads the server's first line: ready, or why not.
    fn ready(&mut self) -> Result<(), PmixError> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| PmixError::Start("no connection".into()))?;
        conn.set_read_timeout(Some(START_WAIT))
            .map_err(|e| PmixError::Start(e.to_string()))?;
        let mut line = String::new();
        let read = BufReader::new(conn).read_line(&mut line);
        let _ = conn.set_read_timeout(None);
        match read {
            Ok(0) => Err(PmixError::Failed(
                "the server process ended without a word".into(),
            )),
            Ok(_) => match serde_json::from_str(&line) {
                Ok(ServerMessage::Ready {
                    library,
                    version,
                    env,
                }) => {
                    tracing::info!("PMIx server: {library} ({version})");
                    self.library = library;
                    self.version = version;
                    self.env = env;
                    Ok(())
                }
                Ok(ServerMessage::Failed { error }) => Err(PmixError::Failed(error)),
                Ok(other) => Err(PmixError::Failed(format!("unexpected {other:?}"))),
                Err(e) => Err(PmixError::Failed(format!(
                    "unreadable answer {line:?}: {e}"
                ))),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(PmixError::Timeout(START_WAIT.as_secs()))
            }
            Err(e) => Err(PmixError::Failed(e.to_string())),
        }
    }

    /// The variables of rank `rank` (from `PMIx_server_setup_fork`).
    pub fn rank_env(&self, rank: u32) -> Vec<(String, String)> {
        self.env.get(rank as usize).cloned().unwrap_or_default()
    }

    /// Forwards the server's reports as PMI events to `tx` (and a byte to `wake`) on a thread,
    /// until the server ends.
    pub fn forward_events(
        &self,
        tx: mpsc::Sender<Event>,
        wake: std::os::fd::OwnedFd,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let conn = match &self.conn {
            Some(c) => c.try_clone()?,
            None => return Err(std::io::ErrorKind::NotConnected.into()),
        };
        std::thread::Builder::new()
            .name("pmix-events".into())
            .spawn(move || {
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { break };
                    let ev = match serde_json::from_str(&line) {
                        Ok(ServerMessage::Connected { rank }) => Event::Connected { rank },
                        Ok(ServerMessage::Finalized { rank }) => Event::Finalized { rank },
                        Ok(ServerMessage::Aborted {
                            rank,
                            status,
                            message,
                        }) => Event::Aborted {
                            rank,
                            exit_code: status,
                            message,
                        },
                        Ok(other) => {
                            tracing::debug!("PMIx server: {other:?}");
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!("PMIx server: unreadable line {line:?}: {e}");
                            continue;
                        }
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                    let _ = nix::unistd::write(&wake, b"e");
                }
            })
    }

    /// Ends the server: tells it, waits for it ([`STOP_WAIT`], then SIGKILL), and removes its
    /// directory.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = c.write_all(b"stop\n");
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let end = Instant::now() + STOP_WAIT;
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(WaitStatus::StillAlive) => {
                    tracing::warn!(
                        "the PMIx server (pid {}) did not end within {} s of the job's end; killed",
                        self.pid,
                        STOP_WAIT.as_secs()
                    );
                    let _ = kill(self.pid, Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    break;
                }
                _ => break,
            }
        }
        let _ = std::fs::remove_dir_all(&self.tmpdir);
    }
}

impl Drop for PmixServerProcess {
    fn drop(&mut self) {
        if self.conn.is_some() {
            self.stop();
        }
    }
}
