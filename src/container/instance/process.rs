//! The node instance process, from its fork until it is ready: it leaves the terminal's
//! signals to the members, enters a user and mount namespace of its own, builds every image's
//! root (the first itself, each further one in a [`Holder`]), evaluates the images' environment
//! scripts, and tells its creator it is ready. [`super::serve`] takes over from there.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{Pid, getpid};

use super::InstanceConfig;
use super::holder::{Holder, start_holder};
use super::image_env::eval_image_env;
use super::protocol::{MSG_READY, SetupError, encode_ready, send_message};
use super::serve::{kill_leftovers, serve};
use crate::container::executor::{Assembled, execute};
use crate::container::library_cache;
use crate::container::rendezvous::Rendezvous;
use crate::container::root::{MountOp, ShmMode, plan_root, tmpfs_options};
use crate::sys::SysError;
use crate::sys::process::{close_fds_except, fork_child};
use crate::sys::userns::enter_user_namespace;

/// What the instance builds, computed by its creator before the fork.
pub struct RootPlans {
    /// The mount operations of each image's root, image 0 first.
    ops: Vec<Vec<MountOp>>,
    /// Where the `/dev/shm` tmpfs shared by several images' roots is mounted ([`shared_shm_dir`]).
    shared_shm: Option<PathBuf>,
    /// The library-cache entries' lock descriptors, which the instance keeps open for its life.
    cache_locks: Vec<RawFd>,
    /// Per image served by the built-in FUSE server with the library cache on: what its ranks
    /// loaded through the mount, listed in the cache as the instance ends.
    loads: Vec<library_cache::LoadsLog>,
    /// The names earlier jobs' ranks looked up in the first image, looked up by the instance
    /// before it starts this job's ranks.
    names: Vec<PathBuf>,
}

impl RootPlans {
    /// Plans every root of `cfg`. Fills the library cache on the way: only the creator of an
    /// instance does that (see [`library_cache`]).
    pub fn new(cfg: &InstanceConfig) -> RootPlans {
        let shared_shm = shared_shm_dir(cfg);
        let mut cache_locks = Vec::new();
        let mut loads = Vec::new();
        let mut names = None;
        let ops = std::iter::once(&cfg.root)
            .chain(&cfg.other_roots)
            .map(|r| {
                let mut r = r.clone();
                if r.shm == ShmMode::Private {
                    r.shared_shm = shared_shm.clone();
                }
                let used = library_cache::resolve(&mut r);
                cache_locks.extend(used.locks);
                loads.extend(used.loads);
                names.get_or_insert(used.names);
                plan_root(&r)
            })
            .collect();
        RootPlans {
            ops,
            shared_shm,
            cache_locks,
            loads,
            names: names.unwrap_or_default(),
        }
    }
}

/// Forks the instance process. It talks to its creator over `creator` and, with `listener`,
/// accepts members there too. The caller must be single-threaded.
pub fn start(
    cfg: &InstanceConfig,
    plans: &RootPlans,
    creator: UnixStream,
    listener: Option<(UnixListener, Rendezvous)>,
) -> Result<Pid, nix::errno::Errno> {
    // SAFETY: the caller is single-threaded (documented requirement of `NodeInstance::create`),
    // so the child may do anything a normal process does.
    unsafe {
        fork_child(move || {
            // The instance must not hold its creator's pipes, locks or sockets; it keeps the
            // library cache's locks for as long as it binds the entries.
            let mut keep = vec![creator.as_raw_fd()];
            keep.extend(&plans.cache_locks);
            keep.extend(plans.loads.iter().flat_map(library_cache::LoadsLog::fds));
            if let Some((l, _)) = &listener {
                keep.push(l.as_raw_fd());
            }
            close_fds_except(3, &keep);
            instance_main(cfg, plans, creator, listener)
        })
    }
}

/// The body of the instance process. Returns its exit status.
fn instance_main(
    cfg: &InstanceConfig,
    plans: &RootPlans,
    creator: UnixStream,
    listener: Option<(UnixListener, Rendezvous)>,
) -> i32 {
    let sigterm = match detach_from_terminal() {
        Ok(s) => s,
        Err(e) => {
            e.send(&creator);
            return 1;
        }
    };
    let ready = match get_ready(cfg, plans) {
        Ok(r) => r,
        Err(e) => {
            e.send(&creator);
            return 1;
        }
    };
    if send_message(&creator, MSG_READY, &ready.fds(), &ready.payload).is_err() {
        kill_leftovers();
        return 0;
    }
    let mut clean_ends = std::collections::BTreeSet::new();
    if let Err(e) = serve(creator, listener, &ready, &sigterm, &mut clean_ends) {
        tracing::error!("node instance: {e}; ending it");
    }
    // Before anything else: the node's last task waits for this to end, and the launcher for
    // that task, so the front end has the report before the launcher ends.
    if let Some(report) = cfg.clean_ends.filter(|_| !clean_ends.is_empty()) {
        report(&clean_ends.into_iter().collect::<Vec<_>>());
    }
    for log in &plans.loads {
        library_cache::remember_loads(log);
    }
    kill_leftovers();
    drop(ready);
    0
}

/// Leaves the terminal's signals and input to the members: a process group of its own,
/// SIGINT/SIGQUIT/SIGHUP/SIGPIPE ignored, stdin and stdout on `/dev/null`. SIGTERM (which ends
/// the instance) and SIGCHLD (an image server or a holder that died) are blocked and read from
/// the returned descriptor.
fn detach_from_terminal() -> Result<SignalFd, SetupError> {
    let zero = Pid::from_raw(0);
    nix::unistd::setpgid(zero, zero).map_err(SysError::at("leave the terminal's process group"))?;
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: setting a disposition to SIG_IGN runs no code of ours.
        unsafe { signal(s, SigHandler::SigIgn) }.map_err(SysError::at("ignore a signal"))?;
    }
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    term.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&term), None)
        .map_err(SysError::at("block SIGTERM and SIGCHLD"))?;
    let sigfd = SignalFd::with_flags(&term, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(SysError::at("signalfd for SIGTERM and SIGCHLD"))?;
    let null = fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| SetupError::Io {
            step: "open /dev/null".into(),
            source,
        })?;
    nix::unistd::dup2_stdin(&null).map_err(SysError::at("stdin to /dev/null"))?;
    nix::unistd::dup2_stdout(&null).map_err(SysError::at("stdout to /dev/null"))?;
    Ok(sigfd)
}

/// The instance's state once ready.
pub struct ReadyInstance {
    _assembled: Assembled,
    /// The holders of the further images' mount namespaces; dropped (told to end, and waited
    /// for) after the members are gone.
    _holders: Vec<Holder>,
    user_ns: fs::File,
    /// One mount namespace per image: the instance's own, then each holder's.
    mnt_ns: Vec<OwnedFd>,
    /// The ready message's payload ([`encode_ready`]).
    pub payload: Vec<u8>,
}

impl ReadyInstance {
    /// The holders of further images: pid and image.
    pub fn holders(&self) -> Vec<(Pid, String)> {
        self._holders
            .iter()
            .map(|h| {
                let (pid, image) = h.who();
                (pid, image.to_owned())
            })
            .collect()
    }

    /// The descriptors every membership message carries: the user namespace, then one mount
    /// namespace per image.
    pub fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.user_ns.as_raw_fd())
            .chain(self.mnt_ns.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }
}

/// Enters the namespaces, builds every root and evaluates every image's scripts.
fn get_ready(cfg: &InstanceConfig, plans: &RootPlans) -> Result<ReadyInstance, SetupError> {
    let started = std::time::Instant::now();
    enter_user_namespace()?;
    if let Some(dir) = &plans.shared_shm {
        mount_shared_shm(dir, shared_shm_size(cfg))?;
    }
    // The holders are forked now, while the instance is single-threaded (no image server yet)
    // and its mount namespace still shows the host: each builds its image's root from there,
    // at the same time as the instance builds the first one.
    let holders = cfg
        .other_roots
        .iter()
        .zip(plans.ops.iter().skip(1))
        .map(|(root, ops)| {
            start_holder(
                ops,
                &cfg.script_env,
                root.image.path().display().to_string(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let first = plans
        .ops
        .first()
        .ok_or_else(|| SetupError::Protocol("no container root to build".to_owned()))?;
    let assembled = execute(first)?;
    tracing::debug!(
        "container root: {} mount operations in {:.1} ms",
        first.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    library_cache::warm_names(&plans.names);
    let started = std::time::Instant::now();
    let changes = eval_image_env(&cfg.script_env)?;
    tracing::debug!(
        "image environment scripts: {} change(s) in {:.1} ms",
        changes.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let mut mnt_ns = vec![OwnedFd::from(open_ns("mnt")?)];
    let mut all = vec![changes];
    for h in &holders {
        let (fd, changes) = h.ready()?;
        mnt_ns.push(fd);
        all.push(changes);
    }
    Ok(ReadyInstance {
        _assembled: assembled,
        _holders: holders,
        user_ns: open_ns("user")?,
        mnt_ns,
        payload: encode_ready(getpid(), &all),
    })
}

/// Opens this process's namespace `name` (`/proc/self/ns/NAME`).
fn open_ns(name: &str) -> Result<fs::File, SetupError> {
    let path = format!("/proc/self/ns/{name}");
    fs::File::open(&path).map_err(|source| SetupError::Io {
        step: format!("open {path}"),
        source,
    })
}

/// The directory a multi-image instance mounts the `/dev/shm` tmpfs of all its roots on: the
/// first root's staging directory (a host directory no root needs; only the instance's own mount
/// namespace sees the tmpfs). `None` for a single image, whose root mounts its own.
fn shared_shm_dir(cfg: &InstanceConfig) -> Option<PathBuf> {
    let private = std::iter::once(&cfg.root)
        .chain(&cfg.other_roots)
        .any(|r| r.shm == ShmMode::Private);
    (!cfg.other_roots.is_empty() && private).then(|| cfg.root.stage.clone())
}

/// The size limit of the `/dev/shm` tmpfs that every image's root shares: that of the first root
/// with a private one (the launchers give every root the job's `--shm`).
fn shared_shm_size(cfg: &InstanceConfig) -> Option<&str> {
    std::iter::once(&cfg.root)
        .chain(&cfg.other_roots)
        .find(|r| r.shm == ShmMode::Private)
        .and_then(|r| r.shm_size.as_deref())
}

/// Mounts the tmpfs that every image's root binds at `/dev/shm` (mode 1777, like the host's, and
/// of `size`, if given), in the instance's own mount namespace only.
fn mount_shared_shm(dir: &Path, size: Option<&str>) -> Result<(), SetupError> {
    let opts = tmpfs_options(0o1777, size);
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|errno| SetupError::Io {
        step: format!(
            "mount the /dev/shm tmpfs shared by the images on {}",
            dir.display()
        ),
        source: errno.into(),
    })
}
