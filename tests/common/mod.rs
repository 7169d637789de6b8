//! Helpers shared by the integration tests.
//!
//! - **Test images**: [`image`] finds `.cache/images/<name>.sif` (built by `ci/build-images.sh`),
//!   [`staged_image`] and [`cmpirun_bin`] give copies the unprivileged test user can read.
//! - **Running as the test user**: [`TuserCommand`] runs a program as `tuser` with no capabilities,
//!   a clean environment, its own process group and a timeout that kills the whole job.
//! - **Leftovers**: [`Snapshot`] records the test user's processes, the mount table, `/dev/shm` and
//!   `/tmp/cmpirun*` before a run; [`assert_no_leftovers`] compares after it.
//!
//! How a test uses them:
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn hello_in_mpich4() {
//!     let _serial = exclusive(); // only needed by tests that check host-wide leftovers
//!     let before = Snapshot::take();
//!     let out = TuserCommand::cmpirun()
//!         .args(["exec"])
//!         .arg(staged_image("mpich4"))
//!         .args(["/usr/local/bin/hello"])
//!         .run();
//!     out.assert_success();
//!     assert!(out.stdout.contains("hello: rank=0 size=1"));
//!     assert_no_leftovers(&before, &[out.tag.as_str()]);
//! }
//! ```
//!
//! Why `setpriv` and not `runuser`/`su`: `runuser` goes through PAM (session modules, environment
//! changes, `pam_systemd` where installed) and keeps the capability bounding set; `setpriv
//! --reuid --regid --init-groups --inh-caps=-all --bounding-set=-all` changes the ids with nothing
//! else and leaves the process no way to regain capabilities, which is what an ordinary cluster user
//! has. It is run as root, so the tests that use it must run as root (CI does).
//!
//! Where images come from: `$CMPIRUN_TEST_IMAGES` if set (a folder holding `<name>.sif`), otherwise
//! `<repo>/.cache/images`. Until `cmpirun image pack` exists, an image may be a plain squashfs file
//! `<name>.sqfs`; [`image`] accepts either and prefers `.sif`.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// The unprivileged user the container tests run as (created by `ci/setup-test-user.sh`).
pub const TEST_USER: &str = "tuser";

/// The environment variable that marks every process a [`TuserCommand`] starts, so leftovers can
/// be attributed to the run that made them even when tests run in parallel.
pub const TAG_VAR: &str = "CMPIRUN_TEST_RUN";

/// The timeout of a [`TuserCommand`] unless the test sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The three test images every container and launch test can count on.
pub const TEST_IMAGES: [&str; 3] = ["mpich4", "mpich5", "openmpi4"];

/// The root of the source tree (where `Cargo.toml` of the cmpirun package is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder the test images are read from: `$CMPIRUN_TEST_IMAGES` or `<repo>/.cache/images`.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("CMPIRUN_TEST_IMAGES") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join(".cache/images"),
    }
}

/// The path of test image `name` (`mpich4`, `mpich5`, `openmpi4`, `demo`) where the build put it.
///
/// Panics with the command to run when the image has not been built. The path may not be
/// readable by [`TEST_USER`]; give that user [`staged_image`] instead.
pub fn image(name: &str) -> PathBuf {
    let dir = images_dir();
    for ext in ["sif", "sqfs"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "test image {name:?} not found in {}: build the test images with `ci/build-images.sh` \
         (or point CMPIRUN_TEST_IMAGES at a folder that holds {name}.sif)",
        dir.display()
    );
}

/// A copy of test image `name` that [`TEST_USER`] can read, in [`stage_dir`].
///
/// A hard link when the image is on the same file system, otherwise a copy; done once per image
/// and per test process, and skipped when the staged file is already current.
pub fn staged_image(name: &str) -> PathBuf {
    let src = image(name);
    let file_name = src
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_else(|| name.into());
    stage_once(&src, &file_name, 0o644)
}

/// A copy of the `cmpirun` binary under test that [`TEST_USER`] can execute, in [`stage_dir`].
///
/// The build's own binary may sit under a folder the test user cannot enter (a clone under
/// `/root`), hence the copy.
///
/// It is staged as an installation would lay it out, `<stage>/bin/cmpirun` next to
/// `<stage>/share/cmpirun/profiles/` holding the repository's `profiles/`, because cmpirun looks
/// for its shipped profiles beside its own binary and the source tree may be unreadable.
pub fn cmpirun_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin_dir = stage_dir().join("bin");
        let profiles = stage_dir().join("share/cmpirun/profiles");
        for dir in [&bin_dir, &profiles] {
            fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        for dir in [
            stage_dir().join("share"),
            stage_dir().join("share/cmpirun"),
            bin_dir.clone(),
            profiles.clone(),
        ] {
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        }
        let shipped = repo_root().join("profiles");
        let mut wanted = BTreeSet::new();
        if let Ok(entries) = fs::read_dir(&shipped) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    stage_file(&e.path(), &profiles.join(e.file_name()), 0o644);
                    wanted.insert(e.file_name());
                }
            }
        }
        // A profile removed from the source tree must not linger in the staged copy.
        if let Ok(entries) = fs::read_dir(&profiles) {
            for e in entries.flatten() {
                if !wanted.contains(&e.file_name()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let bin = bin_dir.join("cmpirun");
        stage_file(Path::new(env!("CARGO_BIN_EXE_cmpirun")), &bin, 0o755);
        bin
    })
    .clone()
}

/// A world-readable folder for staged images and binaries, one per source tree:
/// `/var/tmp/cmpirun-test-<hash of the repo path>`.
pub fn stage_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut h = DefaultHasher::new();
        repo_root().hash(&mut h);
        let dir = PathBuf::from(format!("/var/tmp/cmpirun-test-{:08x}", h.finish() as u32));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.display()));
        dir
    })
    .clone()
}

fn stage_once(src: &Path, name: &OsStr, mode: u32) -> PathBuf {
    static STAGED: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dst) = staged.get(src) {
        return dst.clone();
    }
    let dst = stage_dir().join(name);
    stage_file(src, &dst, mode);
    staged.insert(src.to_path_buf(), dst.clone());
    dst
}

/// Put `src` at `dst` (hard link or copy), atomically, unless `dst` already holds the same bytes.
fn stage_file(src: &Path, dst: &Path, mode: u32) {
    let meta = fs::metadata(src).unwrap_or_else(|e| panic!("cannot stat {}: {e}", src.display()));
    if let Ok(old) = fs::metadata(dst) {
        let same_inode = old.dev() == meta.dev() && old.ino() == meta.ino();
        let same_copy = old.len() == meta.len()
            && old.mtime() == meta.mtime()
            && old.mtime_nsec() == meta.mtime_nsec();
        if (same_inode || same_copy) && old.mode() & 0o777 == mode {
            return;
        }
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = dst.with_file_name(format!(
        ".stage.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&tmp);
    // A binary is always copied: cargo rewrites it in place, and a link would follow the old inode.
    let linked = mode & 0o111 == 0 && fs::hard_link(src, &tmp).is_ok();
    if !linked {
        // Copied by a `cp` process, not in this one: a test thread forking at that moment would
        // inherit a descriptor open for writing on the copy, and the exec of the staged binary
        // by another thread would fail with "text file busy" until that child execs.
        let status = Command::new("cp")
            .arg("--preserve=timestamps")
            .arg(src)
            .arg(&tmp)
            .status()
            .unwrap_or_else(|e| panic!("cannot run cp: {e}"));
        assert!(
            status.success(),
            "cannot copy {} to {}: cp {status}",
            src.display(),
            tmp.display()
        );
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    fs::rename(&tmp, dst)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), dst.display()));
}

/// The configuration file of the one-node Slurm test cluster, when `ci/start-slurm.sh` has
/// started it and slurmctld is running (`$SLURM_DIR/slurm.conf`, default
/// `/run/cmpirun-test-slurm/slurm.conf`).
pub fn slurm_conf() -> Option<PathBuf> {
    let dir = std::env::var_os("SLURM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cmpirun-test-slurm"));
    let conf = dir.join("slurm.conf");
    let pid: i32 = fs::read_to_string(dir.join("slurmctld.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    (alive && conf.is_file()).then_some(conf)
}

/// Like [`slurm_conf`], but panics with the command that starts the cluster.
pub fn require_slurm() -> PathBuf {
    slurm_conf().unwrap_or_else(|| {
        panic!("the Slurm test cluster is not running: start it with `ci/start-slurm.sh` (ci/test.sh does)")
    })
}

/// The identity of [`TEST_USER`].
#[derive(Debug, Clone)]
pub struct TestUser {
    /// User id (1001 in CI).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home folder.
    pub home: PathBuf,
}

/// Looks up [`TEST_USER`]; panics with the fix when it does not exist or the tests are not root.
pub fn tuser() -> TestUser {
    static USER: OnceLock<TestUser> = OnceLock::new();
    USER.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the container tests run programs as {TEST_USER} through setpriv and must themselves run \
             as root (CI does: see ci/test.sh)"
        );
        let user = nix::unistd::User::from_name(TEST_USER)
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!("user {TEST_USER} does not exist: run `ci/setup-test-user.sh` as root")
            });
        TestUser { uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir }
    })
    .clone()
}

/// A folder owned by [`TEST_USER`] inside [`stage_dir`], removed (as root) when dropped.
///
/// Use it as the working directory or output folder of a run, instead of a folder under `/tmp`.
pub struct TuserDir {
    path: PathBuf,
}

impl TuserDir {
    /// Creates a fresh, empty folder owned by the test user.
    pub fn new() -> TuserDir {
        let user = tuser();
        let parent = stage_dir().join("work");
        fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        let _ = fs::set_permissions(&parent, fs::Permissions::from_mode(0o755));
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = parent.join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", path.display()));
        TuserDir { path }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TuserDir {
    fn default() -> Self {
        TuserDir::new()
    }
}

impl Drop for TuserDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

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
        let mut cmd = Command::new("setpriv");
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
            .current_dir(self.cwd.as_deref().unwrap_or(&user.home))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout can kill the whole job at once.
            .process_group(0);
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
    let uid = tuser().uid;
    for p in list_processes(uid) {
        if p.tag.as_deref() == Some(tag) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// What a [`TuserCommand`] did.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status of the program.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossily decoded).
    pub stdout: String,
    /// Everything it wrote to stderr (lossily decoded).
    pub stderr: String,
    /// The timeout passed and the job was killed.
    pub timed_out: bool,
    /// stdout or stderr stayed open 5 s after the program exited: some process it started kept
    /// them (a leftover); the output may be incomplete.
    pub pipes_held_open: bool,
    /// Wall-clock time from start to exit.
    pub elapsed: Duration,
    /// The value of [`TAG_VAR`] in this run's processes.
    pub tag: String,
    /// The command line, for messages.
    pub description: String,
}

impl RunOutput {
    /// The exit code, if the program exited (rather than being killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that killed the program, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Exited with status 0, in time.
    pub fn success(&self) -> bool {
        self.status.success() && !self.timed_out
    }

    /// Panics with the command, status and output unless the run succeeded.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics with the command, status and output unless the program exited with `code` in time.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert!(
            !self.timed_out && self.code() == Some(code),
            "expected exit status {code}:\n{self}"
        );
        self
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.description)?;
        writeln!(
            f,
            "status: {}{}{} after {:.2?}",
            self.status,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            if self.pipes_held_open {
                " (pipes held open by a leftover process)"
            } else {
                ""
            },
            self.elapsed
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Serialises the tests that check host-wide leftovers (`/dev/shm`, `/tmp`, the mount table):
/// within this test binary (a mutex) and across processes (an exclusive `flock` on
/// `/var/tmp/cmpirun-test.lock`). Hold the guard for the whole test.
pub struct Exclusive {
    _lock: nix::fcntl::Flock<fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// Takes the [`Exclusive`] guard, waiting for other holders.
pub fn exclusive() -> Exclusive {
    static LOCAL: Mutex<()> = Mutex::new(());
    let guard = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = Path::new("/var/tmp/cmpirun-test.lock");
    let file = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("cannot lock {}: {e}", path.display()));
    Exclusive {
        _lock: lock,
        _guard: guard,
    }
}

/// One process of the test user, as seen in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Start time in clock ticks since boot (with the pid, identifies the process).
    pub start: u64,
    /// Command name.
    pub comm: String,
    /// Command line, arguments joined by spaces.
    pub cmdline: String,
    /// The value of [`TAG_VAR`] in its environment, if any.
    pub tag: Option<String>,
    /// `/proc/PID/ns/user` link text, e.g. `user:[4026532000]`.
    pub userns: String,
    /// `/proc/PID/ns/mnt` link text.
    pub mntns: String,
}

fn list_processes(uid: u32) -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if meta.uid() != uid {
            continue;
        }
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // comm is in parentheses and may contain spaces; the fields after the last ')' are fixed.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // rest[0] is the state; ppid is field 4 and starttime field 22 of stat(5).
        if rest.first() == Some(&"Z") {
            // A zombie waiting for its parent is that parent's business, not a leftover yet.
            continue;
        }
        let ppid = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let start = rest.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let tag = fs::read(dir.join("environ")).ok().and_then(|env| {
            let prefix = format!("{TAG_VAR}=");
            env.split(|&c| c == 0).find_map(|kv| {
                kv.strip_prefix(prefix.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        });
        let link = |ns: &str| {
            fs::read_link(dir.join("ns").join(ns))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        out.push(ProcInfo {
            pid,
            ppid,
            start,
            comm,
            cmdline,
            tag,
            userns: link("user"),
            mntns: link("mnt"),
        });
    }
    out
}

/// The state leftovers are judged against: take one before a run, another after.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Processes of the test user, by (pid, start time).
    pub processes: BTreeMap<(i32, u64), ProcInfo>,
    /// Mounts of the test's own mount namespace: "mount point fstype source".
    pub mounts: BTreeSet<String>,
    /// Entries of `/dev/shm`.
    pub shm: BTreeSet<String>,
    /// Entries named `cmpirun*` in `/tmp` and `/var/tmp` (except the test staging folders).
    pub tmp: BTreeSet<String>,
    /// FUSE connections in `/sys/fs/fuse/connections` (empty when fusectl is not mounted).
    pub fuse_connections: BTreeSet<String>,
}

impl Snapshot {
    /// Records the current state.
    pub fn take() -> Snapshot {
        let uid = tuser().uid;
        let processes = list_processes(uid)
            .into_iter()
            .map(|p| ((p.pid, p.start), p))
            .collect();
        Snapshot {
            processes,
            mounts: read_mounts(Path::new("/proc/self/mountinfo")),
            shm: list_dir(Path::new("/dev/shm"), |_| true),
            tmp: ["/tmp", "/var/tmp"]
                .iter()
                .flat_map(|d| {
                    list_dir(Path::new(d), |n| {
                        n.starts_with("cmpirun") && !n.starts_with("cmpirun-test")
                    })
                })
                .collect(),
            fuse_connections: list_dir(Path::new("/sys/fs/fuse/connections"), |_| true),
        }
    }

    /// What exists now (in `self`) that did not exist in `before`.
    ///
    /// With `tags` empty, every new process of the test user counts. Otherwise only new processes
    /// that carry one of `tags`, or carry no tag at all and live in a user namespace other than
    /// the host's (a container's helper started with a cleared environment), count; processes of
    /// other tests or jobs running at the same time are ignored.
    pub fn leftovers_since(&self, before: &Snapshot, tags: &[&str]) -> Leftovers {
        let host_userns = fs::read_link("/proc/self/ns/user")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let processes: Vec<ProcInfo> = self
            .processes
            .iter()
            .filter(|(k, _)| !before.processes.contains_key(k))
            .map(|(_, p)| p.clone())
            .filter(|p| match p.tag.as_deref() {
                _ if tags.is_empty() => true,
                Some(t) => tags.contains(&t),
                // An untagged process is a helper started with a cleared environment; one in a
                // container (its own user namespace) counts, one in the host's user namespace
                // belongs to something else running on the machine.
                None => p.userns != host_userns,
            })
            .collect();
        // The mounts a leftover process still sees: the stale image mount is usually there.
        let mut process_mounts = Vec::new();
        let host_mntns = fs::read_link("/proc/self/ns/mnt")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut seen_ns = BTreeSet::new();
        for p in &processes {
            if p.mntns == host_mntns || !seen_ns.insert(p.mntns.clone()) {
                continue;
            }
            for m in read_mounts(&Path::new("/proc").join(p.pid.to_string()).join("mountinfo")) {
                if m.contains(" fuse") || m.contains("squashfs") || m.contains(" tmpfs") {
                    process_mounts.push(format!("{} (pid {}): {m}", p.mntns, p.pid));
                }
            }
        }
        let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
            a.difference(b).cloned().collect::<Vec<_>>()
        };
        Leftovers {
            processes,
            process_mounts,
            mounts: new(&self.mounts, &before.mounts),
            shm: new(&self.shm, &before.shm),
            tmp: new(&self.tmp, &before.tmp),
            fuse_connections: new(&self.fuse_connections, &before.fuse_connections),
        }
    }
}

/// What a run left behind; see [`Snapshot::leftovers_since`].
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Processes of the test user that were not there before.
    pub processes: Vec<ProcInfo>,
    /// FUSE, squashfs and tmpfs mounts seen by those processes (in their own mount namespaces).
    pub process_mounts: Vec<String>,
    /// New mounts in the test's mount namespace.
    pub mounts: Vec<String>,
    /// New entries of `/dev/shm`.
    pub shm: Vec<String>,
    /// New `cmpirun*` entries of `/tmp` and `/var/tmp`.
    pub tmp: Vec<String>,
    /// New FUSE connections.
    pub fuse_connections: Vec<String>,
}

impl Leftovers {
    /// Nothing was left behind.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.shm.is_empty()
            && self.tmp.is_empty()
            && self.fuse_connections.is_empty()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.processes {
            writeln!(
                f,
                "process {} (ppid {}, {}, {}, tag {:?}): {} [{}]",
                p.pid, p.ppid, p.userns, p.mntns, p.tag, p.comm, p.cmdline
            )?;
        }
        for m in &self.process_mounts {
            writeln!(f, "mount seen by a leftover process: {m}")?;
        }
        for m in &self.mounts {
            writeln!(f, "mount: {m}")?;
        }
        for s in &self.shm {
            writeln!(f, "/dev/shm entry: {s}")?;
        }
        for t in &self.tmp {
            writeln!(f, "temporary entry: {t}")?;
        }
        for c in &self.fuse_connections {
            writeln!(f, "FUSE connection: /sys/fs/fuse/connections/{c}")?;
        }
        Ok(())
    }
}

/// Panics, listing them, if the runs tagged `tags` (or anything, when `tags` is empty) left
/// processes, mounts, `/dev/shm` entries or temporary folders that were not in `before`.
///
/// Tear-down is allowed to finish asynchronously: the check is repeated for up to 5 s before it
/// fails.
pub fn assert_no_leftovers(before: &Snapshot, tags: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = Snapshot::take().leftovers_since(before, tags);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("the run left things behind:\n{left}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn read_mounts(path: &Path) -> BTreeSet<String> {
    let Ok(text) = fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    text.lines()
        .filter_map(|line| {
            // mountinfo(5): "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(format!("{mount_point} {fstype} {source}"))
        })
        .collect()
}

fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| keep(n))
        .map(|n| dir.join(n).to_string_lossy().into_owned())
        .collect()
}

/// The MPI test programs every test image holds in `/usr/local/bin` (see `examples/mpi/`).
pub const PROGRAMS: [&str; 5] = ["mpitest", "bigmsg", "hello", "abort", "pingpong"];

/// The path of test program `name` inside a test image.
pub fn program(name: &str) -> String {
    format!("/usr/local/bin/{name}")
}

/// One `hello:` line of `mpitest` (or `hello`, which prints only rank, size and host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloLine {
    /// `rank=`
    pub rank: u32,
    /// `size=`
    pub size: u32,
    /// `host=`
    pub host: String,
    /// `uid=` (mpitest only)
    pub uid: Option<u32>,
    /// `userns=`: inode of the rank's user namespace (mpitest only).
    pub userns: Option<u64>,
    /// `mntns=`: inode of the rank's mount namespace (mpitest only).
    pub mntns: Option<u64>,
    /// `pid=` as the rank sees it (mpitest only).
    pub pid: Option<u32>,
}

/// The `key=value` fields of the first line of `text` that contains `prefix` (for instance
/// `"mpitest: OK"`), or of every such line with [`find_fields_all`]. A rank tag a launcher puts in
/// front of the line (`[1] `, `1: `) is ignored because the search starts at `prefix`.
pub fn find_fields(text: &str, prefix: &str) -> Option<BTreeMap<String, String>> {
    find_fields_all(text, prefix).into_iter().next()
}

/// The `key=value` fields of every line of `text` that contains `prefix`.
pub fn find_fields_all(text: &str, prefix: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter_map(|line| line.find(prefix).map(|at| &line[at + prefix.len()..]))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Every `hello:` line in `stdout`, in the order printed.
pub fn hello_lines(stdout: &str) -> Vec<HelloLine> {
    find_fields_all(stdout, "hello: ")
        .into_iter()
        .filter_map(|f| {
            let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
            Some(HelloLine {
                rank: num("rank")? as u32,
                size: num("size")? as u32,
                host: f.get("host")?.clone(),
                uid: num("uid").map(|v| v as u32),
                userns: num("userns"),
                mntns: num("mntns"),
                pid: num("pid").map(|v| v as u32),
            })
        })
        .collect()
}

/// Checks the output of an `mpitest` job of `n` ranks: every rank said hello exactly once with
/// size `n`, the ring and the allreduce passed, and rank 0 printed `mpitest: OK size=n`. Returns
/// the hello lines, sorted by rank, for further checks (uid, namespaces).
pub fn assert_mpitest_ok(out: &RunOutput, n: u32) -> Vec<HelloLine> {
    out.assert_success();
    let mut hellos = hello_lines(&out.stdout);
    hellos.sort_by_key(|h| h.rank);
    let ranks: Vec<u32> = hellos.iter().map(|h| h.rank).collect();
    assert_eq!(
        ranks,
        (0..n).collect::<Vec<_>>(),
        "every rank must say hello once:\n{out}"
    );
    assert!(
        hellos.iter().all(|h| h.size == n),
        "a rank saw the wrong size:\n{out}"
    );
    assert!(out.stdout.contains("ring: OK"), "no ring result:\n{out}");
    assert!(
        out.stdout
            .contains(&format!("allreduce: OK sum={}", n * (n + 1) / 2)),
        "no checked allreduce:\n{out}"
    );
    assert!(
        out.stdout.contains(&format!("mpitest: OK size={n}")),
        "{out}"
    );
    hellos
}

/// Checks that all ranks that said hello on one host share one user and one mount namespace
/// (one container per node) and run as `uid`.
pub fn assert_one_container_per_host(hellos: &[HelloLine], uid: u32) {
    // (user namespace, mount namespace) inodes seen on each host.
    type Namespaces = BTreeSet<(Option<u64>, Option<u64>)>;
    let mut per_host: BTreeMap<&str, Namespaces> = BTreeMap::new();
    for h in hellos {
        assert_eq!(
            h.uid,
            Some(uid),
            "rank {} runs as uid {:?}, not {uid}",
            h.rank,
            h.uid
        );
        per_host
            .entry(&h.host)
            .or_default()
            .insert((h.userns, h.mntns));
    }
    for (host, namespaces) in per_host {
        assert_eq!(
            namespaces.len(),
            1,
            "ranks on {host} are in different (user, mount) namespaces: {namespaces:?}"
        );
    }
}

/// Checks the output of a `bigmsg` job of `n` ranks.
pub fn assert_bigmsg_ok(out: &RunOutput, n: u32) {
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("bigmsg: OK size={n} bytes=16777216")),
        "{out}"
    );
}

/// One `fabric:` line of `mpitest` under `MPITEST_FABRIC=1`: the libfabric a rank has mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricLine {
    /// `rank=`
    pub rank: u32,
    /// `path=`: the file as the rank sees it, or `none` when no libfabric is mapped.
    pub path: String,
    /// `dev=`: `st_dev` of that path inside the rank's root.
    pub dev: Option<u64>,
    /// `ino=`: `st_ino` of that path.
    pub ino: Option<u64>,
    /// `fi_version=` of the mapped copy, e.g. `1.17` or `2.5`.
    pub fi_version: Option<String>,
}

/// Every `fabric:` line in `stdout`.
pub fn fabric_lines(stdout: &str) -> Vec<FabricLine> {
    find_fields_all(stdout, "fabric: ")
        .into_iter()
        .filter_map(|f| {
            Some(FabricLine {
                rank: f.get("rank")?.parse().ok()?,
                path: f.get("path")?.clone(),
                dev: f.get("dev").and_then(|v| v.parse().ok()),
                ino: f.get("ino").and_then(|v| v.parse().ok()),
                fi_version: f.get("fi_version").cloned(),
            })
        })
        .collect()
}

/// A tmpfs mounted (by the test, as root) on a new folder `dir` owned by the test user, with
/// extra mount `flags` (`MS_NOEXEC`, as some sites mount `/tmp`); unmounted when dropped. Tests
/// that use one must hold [`exclusive`]: the leftover checks of other tests would count it.
pub struct TestTmpfs(pub PathBuf);

impl TestTmpfs {
    /// Mounts it.
    pub fn mount(dir: &Path, flags: nix::mount::MsFlags) -> TestTmpfs {
        use nix::mount::{MsFlags, mount};
        fs::create_dir(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=256m"),
        )
        .unwrap_or_else(|e| panic!("cannot mount a tmpfs on {}: {e}", dir.display()));
        let guard = TestTmpfs(dir.to_owned());
        let u = tuser();
        nix::unistd::chown(
            dir,
            Some(nix::unistd::Uid::from_raw(u.uid)),
            Some(nix::unistd::Gid::from_raw(u.gid)),
        )
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", dir.display()));
        guard
    }
}

impl Drop for TestTmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Packs `tree` into the squashfs `image` (`mksquashfs TREE IMAGE -noappend -quiet -no-progress
/// extra…`) and makes the image readable by the test user.
pub fn mksquashfs(tree: &Path, image: &Path, extra: &[&str]) {
    let out = Command::new("mksquashfs")
        .arg(tree)
        .arg(image)
        .args(["-noappend", "-quiet", "-no-progress"])
        .args(extra)
        .output()
        .expect("mksquashfs (squashfs-tools) must be installed");
    assert!(
        out.status.success(),
        "mksquashfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::set_permissions(image, fs::Permissions::from_mode(0o644)).unwrap();
}

/// The per-user rendezvous directory of node instances (`/tmp/cmpirun-UID`) persists by design,
/// like `$XDG_RUNTIME_DIR`; made before a snapshot, it does not count as a leftover. Returns it.
pub fn runtime_dir() -> String {
    let dir = format!("/tmp/cmpirun-{}", tuser().uid);
    TuserCommand::new("mkdir")
        .args(["-p", "-m", "700", &dir])
        .run()
        .assert_success();
    dir
}
