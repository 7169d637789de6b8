//! `cmpirun exec` and `cmpirun shell`: gather the host facts, start a node instance, run one
//! member in it, pass its exit status and signals through.

use std::ffi::OsString;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Group, Pid, Uid, User};

use crate::image::{ImageKind, locate};
use crate::mount::{MountBackend, SquashfsSource, choose_backend};

use super::env::{base_environment, member_environment, parse_env};
use super::instance::{InstanceConfig, InstanceError, MemberCommand, NodeInstance, join_or_create};
use super::plan::{Account, ImageSource, LibraryCache, RootConfig, ShmMode, parse_bind};
use super::rendezvous::{RendezvousError, runtime_dir};

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
    /// With [`ShmMode::Private`]: the size limit of `/dev/shm` (a tmpfs `size=` value, the job's
    /// `--shm SIZE`); `None` keeps tmpfs's default.
    pub shm_size: Option<String>,
    /// Join (or create) the node instance of this key instead of a private one.
    pub instance_key: Option<String>,
    /// The library cache to serve `cached_files` from (`None`: off).
    pub library_cache: Option<PathBuf>,
    /// Files of the image (absolute paths inside it: the MPI stack the image facts name) to
    /// serve from the node's library cache rather than through the image mount, when the image
    /// is mounted (not extracted).
    pub cached_files: Vec<PathBuf>,
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
    /// Bad input the user can fix.
    #[error("{0}")]
    Usage(String),
    /// The node instance failed.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// The rendezvous failed.
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// Something else on the host failed.
    #[error("{0}")]
    Failed(String),
}

impl ExecError {
    /// Whether the user can fix this (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            ExecError::Usage(_) => true,
            ExecError::Instance(InstanceError::Rendezvous(RendezvousError::BadKey(_))) => true,
            ExecError::Instance(e) => e.is_usage(),
            ExecError::Rendezvous(RendezvousError::BadKey(_)) => true,
            _ => false,
        }
    }
}

fn usage(msg: impl Into<String>) -> ExecError {
    ExecError::Usage(msg.into())
}

/// The image's root filesystem, checked to exist and be readable.
pub fn image_source(path: &Path, backend: Option<MountBackend>) -> Result<ImageSource, ExecError> {
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(usage(format!(
                "image {}: no such file or directory",
                path.display()
            )));
        }
        Err(e) => return Err(usage(format!("image {}: {e}", path.display()))),
        Ok(m) if m.is_dir() => {
            fs::read_dir(path).map_err(|e| usage(format!("image {}: {e}", path.display())))?;
        }
        Ok(_) => {
            fs::File::open(path).map_err(|e| usage(format!("image {}: {e}", path.display())))?;
        }
    }
    let loc = locate(path).map_err(|e| usage(e.to_string()))?;
    Ok(match loc.kind {
        ImageKind::Directory => ImageSource::Directory(loc.path),
        ImageKind::Sif | ImageKind::Squashfs => {
            let backend = choose_backend(backend).map_err(|e| {
                if e.is_user_fixable() {
                    usage(e.to_string())
                } else {
                    ExecError::Failed(e.to_string())
                }
            })?;
            ImageSource::Squashfs {
                source: SquashfsSource {
                    path: loc.path,
                    offset: loc.squashfs_offset,
                    size: loc.squashfs_size,
                },
                backend,
            }
        }
    })
}

/// The current user as the container's `/etc/passwd` should show them.
pub fn current_account() -> Account {
    let uid = Uid::current();
    let gid = Gid::current();
    let user = User::from_uid(uid).ok().flatten();
    let group = Group::from_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| format!("group{gid}"));
    match user {
        Some(u) => Account {
            name: u.name,
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            group,
            gecos: u.gecos.to_string_lossy().into_owned(),
            home: u.dir,
            shell: u.shell,
        },
        None => Account {
            name: std::env::var("USER").unwrap_or_else(|_| format!("user{uid}")),
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            group,
            gecos: String::new(),
            home: std::env::var_os("HOME").map_or_else(|| "/".into(), PathBuf::from),
            shell: "/bin/sh".into(),
        },
    }
}

/// Host directories the staging tmpfs may cover, in order of preference: ones a container never
/// needs from the host.
const STAGE_CANDIDATES: &[&str] = &[
    "/mnt", "/media", "/srv", "/opt", "/boot", "/run", "/var/tmp", "/tmp",
];

/// Picks the host directory to cover with the staging tmpfs: one that holds none of `avoid`
/// (the image, bind sources, home, working directory, extract cache) and is not inside one.
pub fn pick_stage(avoid: &[PathBuf]) -> Option<PathBuf> {
    STAGE_CANDIDATES
        .iter()
        .map(Path::new)
        .filter(|c| c.is_dir())
        .find(|c| !avoid.iter().any(|a| a.starts_with(c) || c.starts_with(a)))
        .map(Path::to_owned)
}

/// Builds the node instance configuration for `req` from the host.
pub fn instance_config(req: &ExecRequest) -> Result<InstanceConfig, ExecError> {
    instance_config_images(std::slice::from_ref(req))
}

/// Builds the configuration of a node instance that holds the roots of several images, one per
/// request (the first is [`InstanceConfig::root`]), from the host. Every root is staged on the
/// same host directory, one that holds none of what any root needs: the instance mounts the
/// `/dev/shm` all roots share there before it builds them.
pub fn instance_config_images(reqs: &[ExecRequest]) -> Result<InstanceConfig, ExecError> {
    let cwd = std::env::current_dir()
        .map_err(|e| ExecError::Failed(format!("cannot read the working directory: {e}")))?;
    let account = current_account();
    let mut avoid: Vec<PathBuf> = vec![account.home.clone(), cwd.clone()];
    avoid.extend(crate::mount::default_extract_cache());
    let mut roots = Vec::with_capacity(reqs.len());
    for req in reqs {
        let image = image_source(&req.image, req.backend)?;
        let mut binds = Vec::new();
        for spec in &req.binds {
            let b = parse_bind(spec, &cwd).map_err(|e| usage(e.to_string()))?;
            if fs::symlink_metadata(&b.src).is_err() || fs::metadata(&b.src).is_err() {
                return Err(usage(format!(
                    "--bind {spec:?}: source {} does not exist on the host",
                    b.src.display()
                )));
            }
            binds.push(b);
        }
        avoid.push(req.image.clone());
        avoid.push(image.path().to_owned());
        avoid.extend(binds.iter().map(|b| b.src.clone()));
        // Bind sources must not depend on the working directory of whoever opens them.
        let cache = req.library_cache.as_ref().map(|dir| LibraryCache {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
            files: req.cached_files.clone(),
        });
        roots.push((image, binds, cache, req.shm, req.shm_size.clone()));
    }
    let host_dirs: Vec<PathBuf> = ["/tmp", "/var/tmp"]
        .iter()
        .filter(|p| Path::new(p).is_dir())
        .map(PathBuf::from)
        .collect();
    // Binds take the mounts below their sources with them, so the staging tmpfs must not be
    // mounted inside one.
    avoid.extend(host_dirs.iter().cloned());
    let stage = pick_stage(&avoid).ok_or_else(|| {
        ExecError::Failed(format!(
            "no host directory to stage the container root on (tried {}; each holds the image, \
             a bind source, the home or the working directory)",
            STAGE_CANDIDATES.join(", ")
        ))
    })?;
    let host_files: Vec<PathBuf> = ["/etc/hosts", "/etc/resolv.conf", "/etc/localtime"]
        .iter()
        .filter(|p| Path::new(p).exists())
        .map(PathBuf::from)
        .collect();
    let mut roots = roots
        .into_iter()
        .map(|(image, binds, library_cache, shm, shm_size)| RootConfig {
            image,
            stage: stage.clone(),
            bind_home: account.home.is_dir(),
            account: account.clone(),
            cwd: Some(cwd.clone()),
            host_files: host_files.clone(),
            host_dirs: host_dirs.clone(),
            binds,
            library_cache,
            cached: Vec::new(),
            shm,
            shared_shm: None,
            shm_size,
        });
    let root = roots.next().ok_or_else(|| usage("no image given"))?;
    let other_roots: Vec<RootConfig> = roots.collect();
    let script_env = base_environment(std::env::vars_os(), &root.account.home);
    Ok(InstanceConfig {
        root,
        other_roots,
        script_env,
    })
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
pub fn with_forwarded_signals_blocked<T, E>(
    block_failed: impl FnOnce(Errno) -> E,
    f: impl FnOnce(&SigSet, SigSet) -> Result<T, E>,
) -> Result<T, E> {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
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
        return Err(usage("no command given"));
    }
    let user_env: Vec<(OsString, OsString)> = req
        .env
        .iter()
        .map(|s| parse_env(s).map_err(|e| usage(e.to_string())))
        .collect::<Result<_, _>>()?;
    let cfg = instance_config(req)?;
    with_forwarded_signals_blocked(
        |e| ExecError::Failed(format!("block signals: {e}")),
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
        .map_err(|e| ExecError::Failed(format!("signalfd: {e}")))?;
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
    fn stage_avoids_what_the_container_needs() {
        let s = pick_stage(&[]).unwrap();
        assert!(STAGE_CANDIDATES.contains(&s.to_str().unwrap()));
        let all: Vec<PathBuf> = STAGE_CANDIDATES.iter().map(PathBuf::from).collect();
        assert_eq!(pick_stage(&all), None);
        let avoid = vec![s.join("x/image.sif")];
        assert_ne!(pick_stage(&avoid), Some(s.clone()));
        assert_ne!(pick_stage(&[PathBuf::from("/")]), Some(s));
    }

    #[test]
    fn usage_errors() {
        assert!(ExecError::Usage("x".into()).is_usage());
        assert!(!ExecError::Failed("x".into()).is_usage());
        assert!(ExecError::Instance(InstanceError::Usage("x".into())).is_usage());
    }
}
