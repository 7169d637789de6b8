//! Helpers for the PMI tests: compile the C clients, run a job of real processes against the
//! server, collect its events.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use cmpirun_pmi::server::{Event, JobConfig, JobReport, PmiError, PmiServer};
use cmpirun_pmi::wireup::{inherit_fd, scrub_env};

/// The C sources of the test clients.
pub fn client_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Run a compiler command and panic with its output when it fails.
pub fn compile(mut cmd: Command) {
    let out = cmd.output().expect("run the C compiler");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The data folder (bin/include/lib) of the `mpich==5.0.2` wheel that `ci/fetch-wheels.sh`
/// unpacks; the script runs first if the wheel is not there yet (it is idempotent).
pub fn mpich_wheel() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join(".cache/wheels/mpich-5.0.2/mpich-5.0.2.data/data");
    if !dir.join("lib").is_dir() {
        let st = Command::new(root.join("ci/fetch-wheels.sh"))
            .status()
            .expect("run ci/fetch-wheels.sh");
        assert!(st.success(), "ci/fetch-wheels.sh failed");
    }
    dir
}

/// How ranks reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Inherited socketpair, `PMI_FD`.
    Fd,
    /// Loopback TCP, `PMI_PORT` + `PMI_ID`.
    Tcp,
}

/// The files under /dev/shm that process `pid` has mapped or open (a segment is open between
/// its creation and its mapping).
fn shm_files_of(pid: u32) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut files: Vec<PathBuf> = maps
        .lines()
        .filter(|l| !l.ends_with("(deleted)"))
        .filter_map(|l| l.find(" /dev/shm/").map(|i| PathBuf::from(&l[i + 1..])))
        .collect();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        files.extend(
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|t| t.starts_with("/dev/shm/")),
        );
    }
    files
}

/// What a job did.
#[derive(Debug)]
pub struct Outcome {
    pub report: Result<JobReport, PmiError>,
    pub events: Vec<Event>,
    pub outputs: Vec<Output>,
    pub killed: bool,
}

impl Outcome {
    /// Panic with everything known unless every rank exited 0 and the server ended cleanly.
    pub fn assert_success(&self) -> &JobReport {
        let report = match &self.report {
            Ok(r) => r,
            Err(e) => panic!(
                "server error {e}; events {:?}; {}",
                self.events,
                self.dump()
            ),
        };
        for (rank, out) in self.outputs.iter().enumerate() {
            assert!(
                out.status.success(),
                "rank {rank} failed ({:?}); events {:?}; {}",
                out.status,
                self.events,
                self.dump()
            );
        }
        assert!(!self.killed, "job was killed; {}", self.dump());
        report
    }

    pub fn dump(&self) -> String {
        self.outputs
            .iter()
            .enumerate()
            .map(|(r, o)| {
                format!(
                    "--- rank {r} {:?}\nstdout: {}\nstderr: {}\n",
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .collect()
    }
}

/// Start `n` ranks of `program args` against a fresh server and wait for the job to end.
/// Ranks are killed when one aborts, disconnects early, or after `limit`.
pub fn run_job(
    program: &Path,
    args: &[&str],
    n: u32,
    mode: Mode,
    extra_env: &[(&str, &str)],
    config: Option<JobConfig>,
    limit: Duration,
) -> Outcome {
    run(program, args, n, mode, extra_env, config, limit, true)
}

/// Like [`run_job`], but a rank that disconnects does not get the others killed: they must
/// notice on their own (a failed fence) and exit, or the test's time limit kills them.
pub fn run_job_without_kill_on_disconnect(
    program: &Path,
    n: u32,
    extra_env: &[(&str, &str)],
    limit: Duration,
) -> Outcome {
    run(program, &[], n, Mode::Fd, extra_env, None, limit, false)
}

#[allow(clippy::too_many_arguments)]
fn run(
    program: &Path,
    args: &[&str],
    n: u32,
    mode: Mode,
    extra_env: &[(&str, &str)],
    config: Option<JobConfig>,
    limit: Duration,
    kill_on_disconnect: bool,
) -> Outcome {
    let config = config.unwrap_or_else(|| {
        JobConfig::single_node(format!("kvs_{}_{n}", std::process::id()), n)
            .connect_timeout(Duration::from_secs(60))
    });
    let mut server = PmiServer::new(config).expect("server");
    let base_env = scrub_env(std::env::vars_os());
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(base_env.iter().map(|(k, v)| (k, v)))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let keep = match mode {
            Mode::Fd => {
                let rank_fd = server.add_socketpair(rank).expect("socketpair");
                cmd.envs(rank_fd.env.iter().map(|(k, v)| (k, v)));
                let raw = rank_fd.fd.as_raw_fd();
                // SAFETY: inherit_fd only calls fcntl.
                unsafe { cmd.pre_exec(move || inherit_fd(raw)) };
                Some(rank_fd)
            }
            Mode::Tcp => {
                let env = server.tcp_env(rank).expect("tcp env");
                cmd.envs(env);
                None
            }
        };
        children.push(cmd.spawn().expect("spawn rank"));
        drop(keep);
    }
    let handle = server.start().expect("start server");
    let deadline = Instant::now() + limit;
    let mut events = Vec::new();
    let mut killed = false;
    // Killed or aborted MPICH ranks do not unlink their shared-memory segments; note the ones
    // they map or hold open at every event of the job (an aborting rank may be gone by the time
    // the abort is seen) and before killing them, and remove those afterwards, so the host's
    // /dev/shm stays as it was (removing one a rank already unlinked does nothing).
    let mut leftovers: Vec<PathBuf> = Vec::new();
    let kill_all = |children: &mut Vec<Child>, leftovers: &mut Vec<PathBuf>| {
        for c in children.iter_mut() {
            leftovers.extend(shm_files_of(c.id()));
            let _ = c.kill();
        }
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match handle.events().recv_timeout(left) {
            Ok(e) => {
                for c in &children {
                    leftovers.extend(shm_files_of(c.id()));
                }
                leftovers.sort();
                leftovers.dedup();
                let fatal = match e {
                    Event::Aborted { .. } | Event::ConnectTimeout { .. } => true,
                    Event::Disconnected { .. } => kill_on_disconnect,
                    _ => false,
                };
                events.push(e);
                if fatal {
                    kill_all(&mut children, &mut leftovers);
                    killed = true;
                    handle.stop();
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                kill_all(&mut children, &mut leftovers);
                killed = true;
                handle.stop();
                // Drain what remains until the loop ends.
                while handle
                    .events()
                    .recv_timeout(Duration::from_secs(10))
                    .is_ok()
                {}
                break;
            }
        }
    }
    let report = handle.join();
    let outputs = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait for rank"))
        .collect();
    leftovers.sort();
    leftovers.dedup();
    for f in leftovers {
        let _ = std::fs::remove_file(f);
    }
    Outcome {
        report,
        events,
        outputs,
        killed,
    }
}
