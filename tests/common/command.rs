//! Running a program as the test user: [`TuserCommand`] builds the run, [`TuserChild`] is the
//! running job, and the job's whole process tree is killed on timeout.
//!
//! Why `setpriv` and not `runuser`/`su`: `runuser` goes through PAM (session modules, environment
//! changes, `pam_systemd` where installed) and keeps the capability bounding set; `setpriv
//! --reuid --regid --init-groups --inh-caps=-all --bounding-set=-all` changes the ids with nothing
//! else and leaves the process no way to regain capabilities, which is what an ordinary cluster user
//! has. It is run as root, so the tests that use it must run as root (CI does).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{RunOutput, TEST_USER, cmpirun_bin, require_slurm, tagged_processes, tuser};

/// The environment variable that marks every process a [`TuserCommand`] starts, so leftovers can
/// be attributed to the run that made them even when tests run in parallel.
pub const TAG_VAR: &str = "CMPIRUN_TEST_RUN";

/// The timeout of a [`TuserCommand`] unless the test sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A program to run as [`TEST_USER`] with no capabilities.
///
/// The environment starts empty: `PATH`, `HOME`, `USER`, `LOGNAME`, `SHELL`, `LANG` and
/// [`TAG_VAR`] are set, `RUST_BACKTRACE`, `RUST_LOG` and `CMPIRUN_LOG` pass through, and nothing
/// else (in particular no `PMI_*`, `PMIX_*`, `SLURM_*` or `OMPI_*` of the test's own environment)
/// unless the test adds it with [`env`](Self::env) or [`inherit_env`](Self::inherit_env). The
/// working directory defaults to the user's home. stdin is empty unless [`stdin`](Self::stdin) is
/// used.
pub struct TuserCommand {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    tag: String,
    /// The pid whose namespaces (network, UTS, IPC, mount) the program runs in: a node of the
    /// three-node test cluster.
    node: Option<i32>,
}

impl TuserCommand {
    /// Runs `program` (a path, or a name looked up in the user's `PATH`).
    pub fn new(program: impl AsRef<OsStr>) -> TuserCommand {
        let user = tuser();
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: &OsStr| {
            env.insert(OsString::from(k), v.to_os_string());
        };
        set(
            "PATH",
            OsStr::new("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"),
        );
        set("HOME", user.home.as_os_str());
        set("USER", OsStr::new(TEST_USER));
        set("LOGNAME", OsStr::new(TEST_USER));
        set("SHELL", OsStr::new("/bin/bash"));
        set("LANG", OsStr::new("C.UTF-8"));
        set(TAG_VAR, OsStr::new(&tag));
        for var in ["RUST_BACKTRACE", "RUST_LOG", "CMPIRUN_LOG"] {
            if let Some(v) = std::env::var_os(var) {
                set(var, &v);
            }
        }
        TuserCommand {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            env,
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
            stdin: None,
            tag,
            node: None,
        }
    }

    /// Runs the staged `cmpirun` binary under test ([`cmpirun_bin`]).
    pub fn cmpirun() -> TuserCommand {
        TuserCommand::new(cmpirun_bin())
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .insert(key.as_ref().to_os_string(), value.as_ref().to_os_string());
        self
    }

    /// Removes an environment variable (one of the defaults, for instance `HOME`).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.remove(key.as_ref());
        self
    }

    /// Copies a variable from the test's own environment, if it is set there.
    pub fn inherit_env(mut self, key: &str) -> Self {
        if let Some(v) = std::env::var_os(key) {
            self.env.insert(key.into(), v);
        }
        self
    }

    /// Points Slurm's clients (`srun`, `salloc`, `sbatch`, `sinfo`) at the test cluster: sets
    /// `SLURM_CONF` to [`require_slurm`].
    pub fn slurm(self) -> Self {
        let conf = require_slurm();
        self.env("SLURM_CONF", conf)
    }

    /// Sets the working directory (it must be accessible to the test user).
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Sets the timeout after which the whole job is killed (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Feeds these bytes to stdin, then closes it.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Runs the program on node `node` (`n1`..`n3`) of the three-node test cluster: in its
    /// network, UTS, IPC and mount namespaces (its host name, address, `/tmp` and `/dev/shm`), as
    /// a login on that node would.
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(super::node_anchor(node));
        self
    }

    /// The value of [`TAG_VAR`] this command's processes carry.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The command line as it will run, for messages.
    pub fn describe(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Starts the program; use [`TuserChild`] to signal it and wait for it.
    pub fn spawn(self) -> TuserChild {
        let user = tuser();
        let description = self.describe();
        let cwd = self.cwd.clone().unwrap_or_else(|| user.home.clone());
        let mut cmd = match self.node {
            // nsenter enters the namespaces and execs setpriv (no fork: the pid stays the
            // program's); entering a mount namespace resets the working directory, hence --wd.
            Some(anchor) => {
                let mut c = Command::new("nsenter");
                c.arg("-t")
                    .arg(anchor.to_string())
                    .args(["-n", "-u", "-i", "-m"])
                    .arg(format!("--wd={}", cwd.display()))
                    .args(["--", "setpriv"]);
                c
            }
            None => Command::new("setpriv"),
        };
        cmd.arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .args([
                "--init-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(&self.program)
            .args(&self.args)
            .env_clear()
            .envs(&self.env)
            .current_dir(&cwd)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout can kill the whole job at once.
            .process_group(0);
        // The signals a job's user sends start with their default action, as from a terminal's
        // shell, whatever the test run inherited (a run started with `&` from a script ignores
        // SIGINT and SIGQUIT, under `nohup` SIGHUP; cmpirun keeps such signals ignored).
        // SAFETY: the closure runs between fork and exec and calls only `signal`, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::signal::{SigHandler, Signal, signal};
                for s in [
                    Signal::SIGINT,
                    Signal::SIGQUIT,
                    Signal::SIGHUP,
                    Signal::SIGTERM,
                    Signal::SIGUSR1,
                    Signal::SIGUSR2,
                ] {
                    signal(s, SigHandler::SigDfl).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `setpriv … {description}`: {e}"));
        if let (Some(bytes), Some(mut stdin)) = (self.stdin, child.stdin.take()) {
            thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        TuserChild {
            pgid: child.id() as i32,
            child,
            stdout,
            stderr,
            started: Instant::now(),
            timeout: self.timeout,
            tag: self.tag,
            description,
        }
    }

    /// Runs the program to completion (or its timeout) and returns what it did.
    pub fn run(self) -> RunOutput {
        self.spawn().wait()
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// A running [`TuserCommand`].
pub struct TuserChild {
    child: Child,
    pgid: i32,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<Vec<u8>>,
    started: Instant,
    timeout: Duration,
    tag: String,
    description: String,
}

impl TuserChild {
    /// The pid of the program (setpriv execs it, so it is the same process).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The value of [`TAG_VAR`] in this run's processes.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Sends `signal` to the program only.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Sends `signal` to the program's whole process group.
    pub fn signal_group(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid), signal);
    }

    /// Whether the program has exited (without reaping it).
    pub fn has_exited(&self) -> bool {
        let flags = nix::sys::wait::WaitPidFlag::WNOHANG | nix::sys::wait::WaitPidFlag::WNOWAIT;
        matches!(
            nix::sys::wait::waitid(nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(self.pid())),
                nix::sys::wait::WaitPidFlag::WEXITED | flags),
            Ok(status) if status != nix::sys::wait::WaitStatus::StillAlive
        )
    }

    /// Waits until the program exits or the timeout passes; on timeout, kills its process group
    /// and every process carrying its tag (SIGKILL) and reports `timed_out`.
    pub fn wait(mut self) -> RunOutput {
        let deadline = self.started + self.timeout;
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("waiting for `{}`: {e}", self.description),
            }
            if Instant::now() >= deadline {
                timed_out = true;
                self.kill_all();
                break self
                    .child
                    .wait()
                    .unwrap_or_else(|e| panic!("waiting for `{}`: {e}", self.description));
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        // A process left behind may hold the pipes open: wait a little, but never forever, so the
        // leftover check (not a hang) reports it.
        let grace = Duration::from_secs(5);
        let mut pipes_held_open = false;
        let mut collect = |rx: &mpsc::Receiver<Vec<u8>>| match rx.recv_timeout(grace) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => {
                pipes_held_open = true;
                String::new()
            }
        };
        let stdout = collect(&self.stdout);
        let stderr = collect(&self.stderr);
        RunOutput {
            status,
            stdout,
            stderr,
            timed_out,
            pipes_held_open,
            elapsed,
            tag: self.tag,
            description: self.description,
        }
    }

    /// Kills the process group and every process of the test user carrying this run's tag.
    pub fn kill_all(&self) {
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
        kill_tagged(&self.tag);
    }
}

/// SIGKILLs every process of [`TEST_USER`] whose environment carries `tag` in [`TAG_VAR`].
pub fn kill_tagged(tag: &str) {
    for p in tagged_processes(tag) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
