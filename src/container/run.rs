//! `cmpirun exec` and `cmpirun shell`: turn the command line into a root request
//! ([`super::config`]), start a node instance, run one member in it, pass its exit status and
//! signals through.

use std::ffi::OsString;
use std::fs;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::exit::{Blame, Fault};
use crate::mount::MountBackend;

use super::config::{ConfigError, RootRequest, instance_config};
use super::instance::{InstanceConfig, InstanceError, MemberCommand, NodeInstance, join_or_create};
use super::member_env::{EnvSpecError, member_environment, parse_env};
use super::rendezvous::{RendezvousError, runtime_dir};
use super::root::{BindSpecError, ShmMode, parse_bind};

/// What `cmpirun exec` was asked to do.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The image path.
    pub image: PathBuf,
    /// `--bind` values.
    pub binds: Vec<String>,
    /// `--env` values.
    pub env: Vec<String>,
    /// `--image-mount`, if given.
    pub backend: Option<MountBackend>,
    /// `--shm`.
    pub shm: ShmMode,
    /// Join (or create) the node instance of this key instead of a private one.
    pub instance_key: Option<String>,
    /// The program and its arguments.
    pub argv: Vec<OsString>,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(Signal),
}

/// Errors of `cmpirun exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No program was given.
    #[error("no command given")]
    NoCommand,
    /// A `--bind` value cannot be parsed.
    #[error(transparent)]
    Bind(#[from] BindSpecError),
    /// A `--bind` source does not exist on the host.
    #[error("--bind {spec:?}: source {} does not exist on the host", src.display())]
    BindSourceMissing {
        /// The `--bind` value as given.
        spec: String,
        /// Its source, made absolute.
        src: PathBuf,
    },
    /// An `--env` value cannot be parsed.
    #[error(transparent)]
    Env(#[from] EnvSpecError),
    /// The node instance failed.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// The rendezvous failed.
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// The node instance cannot be configured.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A system call on this side failed (blocking signals, the signalfd).
    #[error("{step}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// The system error.
        errno: Errno,
    },
}

/// The user's to fix: the command line (program, `--bind`, `--env`, `--instance-key`) and what
/// the instance or its configuration says is theirs.
impl Blame for ExecError {
    fn fault(&self) -> Fault {
        match self {
            ExecError::NoCommand
            | ExecError::Bind(_)
            | ExecError::BindSourceMissing { .. }
            | ExecError::Env(_) => Fault::User,
            ExecError::Instance(e) => e.fault(),
            ExecError::Rendezvous(e) => e.fault(),
            ExecError::Config(e) => e.fault(),
            ExecError::Sys { .. } => Fault::Host,
        }
    }
}

/// The node instance configuration of `cmpirun exec`: `--bind` values parsed against the
/// working directory and checked to exist, then [`instance_config`].
pub fn exec_config(req: &ExecRequest) -> Result<InstanceConfig, ExecError> {
    let cwd =
        std::env::current_dir().map_err(|e| ExecError::Config(ConfigError::WorkingDirectory(e)))?;
    let mut binds = Vec::new();
    for spec in &req.binds {
        let b = parse_bind(spec, &cwd)?;
        if fs::symlink_metadata(&b.src).is_err() || fs::metadata(&b.src).is_err() {
            return Err(ExecError::BindSourceMissing {
                spec: spec.clone(),
                src: b.src,
            });
        }
        binds.push(b);
    }
    let root = RootRequest {
        image: req.image.clone(),
        binds,
        backend: req.backend,
        shm: req.shm,
        shm_size: None,
        library_cache: None,
    };
    Ok(instance_config(std::slice::from_ref(&root))?)
}

/// Signals cmpirun passes on to the programs it runs (`exec`) and to every rank (launch).
pub const FORWARDED: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Blocks [`FORWARDED`] and `SIGCHLD` (so that they are read from a signalfd instead of
/// interrupting anything), runs `f` with the blocked set and the mask that was in force before,
/// then restores that mask.
///
/// A signal of [`FORWARDED`] that was ignored when cmpirun started (`nohup` ignores `SIGHUP`, a
/// non-interactive shell `SIGINT` and `SIGQUIT` for a job started with `&`) stays ignored, by
/// cmpirun and by the programs it starts, which inherit the disposition: it neither ends the job
/// nor is passed on, as for any other program started that way.
pub fn with_forwarded_signals_blocked<T, E>(
    block_failed: impl FnOnce(Errno) -> E,
    f: impl FnOnce(&SigSet, SigSet) -> Result<T, E>,
) -> Result<T, E> {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        if crate::sys::process::ignored(*s) {
            tracing::debug!("{s} was ignored when cmpirun started: it stays ignored");
            continue;
        }
        mask.add(*s);
    }
    mask.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old)).map_err(block_failed)?;
    let result = f(&mask, old);
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    result
}

/// Runs `cmpirun exec`: returns how the program ended. Must be called while single-threaded.
pub fn exec(req: &ExecRequest) -> Result<Outcome, ExecError> {
    if req.argv.is_empty() {
        return Err(ExecError::NoCommand);
    }
    let user_env: Vec<(OsString, OsString)> = req
        .env
        .iter()
        .map(|s| parse_env(s).map_err(ExecError::from))
        .collect::<Result<_, _>>()?;
    let cfg = exec_config(req)?;
    with_forwarded_signals_blocked(
        |errno| ExecError::Sys {
            step: "block signals",
            errno,
        },
        |mask, _| run_member(req, &cfg, &user_env, mask),
    )
}

fn run_member(
    req: &ExecRequest,
    cfg: &InstanceConfig,
    user_env: &[(OsString, OsString)],
    mask: &SigSet,
) -> Result<Outcome, ExecError> {
    let sigfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|errno| ExecError::Sys {
            step: "signalfd",
            errno,
        })?;
    let mut inst = match &req.instance_key {
        None => NodeInstance::create(cfg, None, true)?,
        Some(key) => {
            let dir = runtime_dir()?;
            join_or_create(&dir, key, cfg)?
        }
    };
    let env = member_environment(
        std::env::vars_os(),
        &cfg.root.account.home,
        inst.env_changes().first().map_or(&[], Vec::as_slice),
        user_env,
    );
    let cmd = MemberCommand {
        argv: req.argv.clone(),
        env,
        cwd: cfg.root.cwd.clone().unwrap_or_else(|| "/".into()),
        new_session: false,
        cpus: None,
        image: 0,
        fds: Vec::new(),
    };
    let child = match inst.spawn(&cmd) {
        Ok(c) => c,
        Err(e) => {
            inst.close();
            return Err(e.into());
        }
    };
    inst.release_namespaces();
    let instance = inst.pid();
    // Signals the terminal sent to the whole foreground process group (SI_KERNEL) reached the
    // program too, and one from the instance itself would be odd: neither is passed on.
    let outcome = wait_forwarding(child, &sigfd, |info| {
        info.ssi_code != libc::SI_KERNEL && info.ssi_pid as i32 != instance.as_raw()
    });
    // A program that failed because the image mount ended (its server died): say so.
    if outcome != Outcome::Exited(0)
        && let Some(message) = inst.mount_lost_within(std::time::Duration::from_millis(200))
    {
        tracing::error!("{message}");
    }
    inst.close();
    Ok(outcome)
}

/// Waits for `child`, passing on to it the signals read from `sigfd` (other than `SIGCHLD`) for
/// which `forward` says yes.
pub fn wait_forwarding(
    child: Pid,
    sigfd: &SignalFd,
    forward: impl Fn(&libc::signalfd_siginfo) -> bool,
) -> Outcome {
    wait_forwarding_ticking(child, sigfd, forward, || None)
}

/// Like [`wait_forwarding`], and calls `tick` before every wait: it returns how long the wait
/// may last at most (`None`: until the next signal), so the caller can look at the child now and
/// then while it runs (the rank mode's memory-map check).
pub fn wait_forwarding_ticking(
    child: Pid,
    sigfd: &SignalFd,
    forward: impl Fn(&libc::signalfd_siginfo) -> bool,
    mut tick: impl FnMut() -> Option<std::time::Duration>,
) -> Outcome {
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Outcome::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Outcome::Signaled(sig),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return Outcome::Exited(crate::exit::FAILURE),
        }
        let timeout = tick().map_or(nix::poll::PollTimeout::NONE, |d| {
            let ms = d.as_millis().clamp(1, 60_000) as i32;
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::NONE)
        });
        let mut pfd = [nix::poll::PollFd::new(
            sigfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut pfd, timeout);
        while let Ok(Some(info)) = sigfd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) | Err(_) => {}
                Ok(sig) if forward(&info) => {
                    let _ = kill(child, sig);
                }
                Ok(_) => {}
            }
        }
    }
}

/// Ends this process the way the program ended: the same exit status, or the same signal
/// (without a core dump of cmpirun).
pub fn propagate(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Exited(code) => code,
        Outcome::Signaled(sig) => {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            // SAFETY: restoring the default disposition runs no code of ours.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
            let mut set = SigSet::empty();
            set.add(sig);
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
            let _ = nix::sys::signal::raise(sig);
            128 + sig as i32
        }
    }
}

/// What `cmpirun shell` runs: `$SHELL` if the container has it, else `/bin/sh`.
pub fn shell_argv() -> Vec<OsString> {
    [
        "/bin/sh",
        "-c",
        "if [ -n \"$SHELL\" ] && [ -x \"$SHELL\" ]; then exec \"$SHELL\"; fi; exec /bin/sh",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors() {
        assert!(ExecError::NoCommand.fault() == Fault::User);
        assert!(
            ExecError::Sys {
                step: "signalfd",
                errno: Errno::EMFILE
            }
            .fault()
                != Fault::User
        );
        assert!(ExecError::Instance(InstanceError::Root("x".into())).fault() == Fault::User);
        let bad_key = RendezvousError::BadKey("a/b".into());
        assert!(ExecError::Instance(InstanceError::Rendezvous(bad_key)).fault() == Fault::User);
    }

    #[test]
    fn messages_say_their_cause_once() {
        // cmpirun prints an error with its sources: a cause in the message is not also one.
        let e = ExecError::Instance(InstanceError::Io {
            step: "connect to node instance",
            error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(
            crate::exit::Fatal::from(e).to_string(),
            "node instance: connect to node instance: connection refused"
        );
    }
}
