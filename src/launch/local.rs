//! The local launcher: one node instance, cmpirun's own PMI server, N ranks joined into the
//! instance, each with its end of a `PMI_FD` socketpair.
//!
//! The order matters. The instance and every rank are forked while cmpirun is still
//! single-threaded (`unshare(CLONE_NEWUSER)` and `setns(CLONE_NEWUSER)` refuse threaded
//! callers); only then does the PMI server's thread start. From there on one poll loop on the
//! main thread forwards output, reaps ranks, reacts to PMI events and signals, and ends the job.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use cmpirun_pmi::server::{Event, JobConfig, PmiServer, ServerControl};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use crate::container::instance::NodeInstance;
use crate::container::run::with_forwarded_signals_blocked;
use crate::jobspec::PmiKind;
use crate::plan::{LaunchPlan, expand_pattern};

use super::injected::{DeviceProof, Finding, InjectedLibfabric};
use super::output::{Dest, LineBuffer, Stream, tag, write_out};
use super::pmix::PmixServerProcess;
use super::singleton::{SingletonWatch, never_connected};
use super::status::{JobEnd, RankEnd};
use super::{LaunchError, binding, node};

/// Signals that end the job when cmpirun receives them (the others are only passed on).
fn ends_job(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
    )
}

fn sys(step: &'static str) -> impl FnOnce(Errno) -> LaunchError {
    move |errno| LaunchError::Sys { step, errno }
}

/// Runs the job of `plan` on this node. Must be called while cmpirun is single-threaded.
pub fn run(plan: &LaunchPlan) -> Result<JobEnd, LaunchError> {
    super::settings::log_settings();
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads > 1 {
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(LaunchError::Threaded { names });
    }
    ensure_limits(plan.layout.size)?;
    let cpus = rank_cpus(plan)?;
    let cfg = node::node_config(plan, &BTreeMap::new())?;
    with_forwarded_signals_blocked(sys("block signals"), |mask, _| {
        // Job control too: the ranks are session leaders, so the terminal's Ctrl-Z stops only
        // cmpirun, which stops them (and continues them) itself.
        let mut job_control = SigSet::empty();
        job_control.add(Signal::SIGTSTP);
        job_control.add(Signal::SIGCONT);
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&job_control), None)
            .map_err(sys("block signals"))?;
        let mut mask = *mask;
        mask.add(Signal::SIGTSTP);
        mask.add(Signal::SIGCONT);
        run_blocked(plan, &cfg, &cpus, &mask)
    })
}

/// The CPUs of each rank (`None`: not bound), from this node's topology and the CPUs this
/// process may use; with `--report-bindings`, says what each rank gets.
fn rank_cpus(plan: &LaunchPlan) -> Result<Vec<Option<Vec<usize>>>, LaunchError> {
    let spec = &plan.job.binding;
    let size = plan.layout.size as usize;
    if !spec.asked() {
        return Ok(vec![None; size]);
    }
    let node = binding::NodeCpus::read()?;
    let cpus = binding::assign(spec, &node, size)?;
    if let Some(note) = binding::overload_note(spec, &node, size) {
        tracing::info!("{note}");
    }
    if spec.report {
        let host = plan
            .layout
            .nodes
            .first()
            .map_or("localhost", |n| n.name.as_str());
        let mut text = String::new();
        for (rank, c) in cpus.iter().enumerate() {
            let line = binding::report_line(rank as u32, host, c.as_deref(), &node.allowed);
            text.push_str(&format!("cmpirun: {line}\n"));
        }
        write_out(Stream::Stderr, text.as_bytes());
    }
    Ok(cpus)
}

/// Makes sure this node's limits let the job start, before anything is started: cmpirun holds
/// three descriptors per rank (its PMI socket, the stdout and stderr pipes), and each rank is a
/// process of the user. The soft limit on open files (often 1024) is raised as far as the hard
/// limit allows (the ranks inherit it, as they would from mpirun); a job that needs more than the
/// hard limits, or more processes than the kernel's `pid_max` leaves, is refused with the
/// numbers and what to do, instead of failing half-started with `EMFILE`.
fn ensure_limits(size: u32) -> Result<(), LaunchError> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let size = u64::from(size);
    let files = 3 * size + 64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("getrlimit"))?;
    if hard != RLIM_INFINITY && hard < files {
        return Err(LaunchError::Limit {
            what: "open files".into(),
            need: files,
            limit: hard,
            fix: "run fewer ranks on this node (-n, or across nodes with -f HOSTFILE or srun), \
                  or ask the site to raise the hard limit (ulimit -Hn, limits.conf)"
                .into(),
        });
    }
    if soft < files {
        setrlimit(Resource::RLIMIT_NOFILE, files, hard).map_err(sys("setrlimit"))?;
    }
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    // Each rank a process, besides those the user runs already. A limit at or above pid_max
    // cannot be reached (there are no more process ids than that), so the user's processes are
    // counted (a walk of /proc, about a millisecond on a busy node) only when a limit could be.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NPROC).map_err(sys("getrlimit"))?;
    let reachable = |limit: u64| limit != RLIM_INFINITY && pid_max.is_none_or(|m| limit < m);
    if !reachable(soft) && !reachable(hard) {
        return check_pid_max(size, pid_max);
    }
    let running = user_processes();
    let procs = size + running + 16;
    if hard != RLIM_INFINITY && hard < procs {
        return Err(LaunchError::Limit {
            what: format!("processes of this user ({running} running)"),
            need: procs,
            limit: hard,
            fix: "run fewer ranks on this node, or ask the site to raise the hard limit \
                  (ulimit -Hu, limits.conf)"
                .into(),
        });
    }
    if soft != RLIM_INFINITY && soft < procs {
        setrlimit(Resource::RLIMIT_NPROC, procs, hard).map_err(sys("setrlimit"))?;
    }
    check_pid_max(size, pid_max)
}

/// Refuses a job of `size` ranks that the node's process ids (`pid_max`) could not hold.
fn check_pid_max(size: u64, pid_max: Option<u64>) -> Result<(), LaunchError> {
    if let Some(pid_max) = pid_max
        && pid_max < size + 1000
    {
        return Err(LaunchError::Limit {
            what: "process ids on this node (kernel.pid_max)".into(),
            need: size + 1000,
            limit: pid_max,
            fix: "run fewer ranks on this node, or across nodes with -f HOSTFILE or srun".into(),
        });
    }
    Ok(())
}

/// How many processes this user runs on this node.
fn user_processes() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::getuid().as_raw();
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
            .count() as u64
    })
}

/// One started rank as the loop sees it.
struct Rank {
    pid: Pid,
    done: bool,
    /// How it ended, once it did.
    end: Option<RankEnd>,
}

/// One output pipe of one rank.
struct Pipe {
    fd: OwnedFd,
    buf: LineBuffer,
    dest: Dest,
}

fn run_blocked(
    plan: &LaunchPlan,
    cfg: &crate::container::InstanceConfig,
    cpus: &[Option<Vec<usize>>],
    mask: &SigSet,
) -> Result<JobEnd, LaunchError> {
    let sigfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys("signalfd"))?;
    let size = plan.layout.size;
    let mut inst = NodeInstance::create(cfg, None, true).map_err(LaunchError::from_instance)?;
    // PMIx: a server process of its own, forked now (after the instance, so that it holds
    // none of the instance's descriptors, and while cmpirun is single-threaded).
    let mut pmix = if plan.launcher.pmi == PmiKind::Pmix {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        match PmixServerProcess::start(plan, &host) {
            Ok(p) => Some(p),
            Err(e) => {
                inst.close();
                return Err(LaunchError::Pmix(e));
            }
        }
    } else {
        None
    };
    let mut server = match &pmix {
        Some(_) => None,
        None => {
            let kvsname = format!("cmpirun-{}", std::process::id());
            let appnums: Vec<u32> = (0..size).map(|r| node::part_of(plan, r) as u32).collect();
            let config = JobConfig::new(kvsname, vec![0; size as usize])
                .appnums(appnums)
                .fence_report(super::settings::wireup_report());
            Some(PmiServer::new(config).map_err(LaunchError::Pmi)?)
        }
    };
    let mut ranks = Vec::with_capacity(size as usize);
    let mut pipes = Vec::with_capacity(2 * size as usize);
    let started = start_ranks(
        plan,
        cfg,
        cpus,
        &inst,
        |rank| match (&mut server, &pmix) {
            (Some(s), _) => {
                let pmi = s.add_socketpair(rank).map_err(LaunchError::Pmi)?;
                Ok((pmi.env, Some(pmi.fd)))
            }
            (None, Some(p)) => Ok((p.rank_env(rank), None)),
            (None, None) => Err(LaunchError::NoProgram),
        },
        &mut ranks,
        &mut pipes,
    );
    inst.release_namespaces();
    let wake = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(sys("pipe"));
    let (wake_r, wake_w) = match started.and(wake) {
        Ok(w) => w,
        Err(e) => return Err(abandon(&ranks, inst, e)),
    };
    // From here on cmpirun may have threads: every fork is done.
    let (tx, rx) = mpsc::channel();
    let (control, events) = match (server, &pmix) {
        (Some(server), _) => {
            let handle = match server.start() {
                Ok(h) => h,
                Err(e) => return Err(abandon(&ranks, inst, LaunchError::Pmi(e))),
            };
            let control = handle.control();
            let events = std::thread::spawn(move || {
                for ev in handle.events().iter() {
                    if tx.send(ev).is_err() {
                        break;
                    }
                    let _ = nix::unistd::write(&wake_w, b"e");
                }
                let _ = handle.join();
                drop(wake_w);
            });
            (Some(control), events)
        }
        (None, Some(p)) => match p.forward_events(tx, wake_w) {
            Ok(events) => (None, events),
            Err(e) => {
                return Err(abandon(
                    &ranks,
                    inst,
                    LaunchError::Io {
                        step: "start the PMIx event thread",
                        source: e,
                    },
                ));
            }
        },
        (None, None) => return Err(abandon(&ranks, inst, LaunchError::NoProgram)),
    };
    let mut job = Job {
        instance: &inst,
        instance_ended: false,
        injected: InjectedLibfabric::from_plan(plan),
        checked: vec![false; size as usize],
        host_loaded: vec![false; size as usize],
        devices: DeviceProof::from_plan(plan),
        device_decided: vec![false; size as usize],
        connected: vec![false; size as usize],
        singleton: SingletonWatch::new(size, Instant::now()),
        control: control.clone(),
        size,
        ranks,
        pipes,
        end: None,
        teardown: None,
        killed: false,
        deadline: plan
            .job
            .timeout_secs
            .map(|s| (Instant::now() + Duration::from_secs(s), s)),
        grace: super::settings::kill_grace(),
        pending_failure: None,
    };
    job.run(&sigfd, wake_r, &rx);
    if plan.job.print_all_exitcodes {
        let ends: Vec<Option<RankEnd>> = job.ranks.iter().map(|r| r.end).collect();
        write_out(
            Stream::Stderr,
            super::status::all_exit_codes(&ends).as_bytes(),
        );
    }
    let end = job.end.take().unwrap_or(JobEnd::Success);
    drop(job);
    if let Some(c) = &control {
        c.stop();
    }
    if let Some(p) = &mut pmix {
        p.stop();
    }
    let _ = events.join();
    inst.close();
    Ok(end)
}

/// Ends a job that could not be started completely: kills and reaps the ranks already started,
/// ends the instance, and returns `e`.
fn abandon(ranks: &[Rank], inst: NodeInstance, e: LaunchError) -> LaunchError {
    for r in ranks {
        let _ = kill(r.pid, Signal::SIGKILL);
        let _ = waitpid(r.pid, None);
    }
    inst.close();
    e
}

/// Forks every rank into the instance. Each child gets its PMI socket, its own stdout/stderr
/// pipes and (rank 0 only) the caller's stdin, as descriptors the member sets up after the fork
/// ([`crate::container::instance::MemberCommand::fds`]); cmpirun's own stay as they are.
fn start_ranks(
    plan: &LaunchPlan,
    cfg: &crate::container::InstanceConfig,
    cpus: &[Option<Vec<usize>>],
    inst: &NodeInstance,
    mut wireup: impl FnMut(u32) -> Result<(Vec<(String, String)>, Option<OwnedFd>), LaunchError>,
    ranks: &mut Vec<Rank>,
    pipes: &mut Vec<Pipe>,
) -> Result<(), LaunchError> {
    let null: Arc<OwnedFd> = Arc::new(
        std::fs::File::open("/dev/null")
            .map_err(|e| LaunchError::Io {
                step: "open /dev/null",
                source: e,
            })?
            .into(),
    );
    // SAFETY: the borrow of descriptor 0 lasts for this call only.
    let stdin = match fcntl(
        unsafe { BorrowedFd::borrow_raw(0) },
        FcntlArg::F_DUPFD_CLOEXEC(3),
    ) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        Ok(fd) => Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
        // cmpirun was started with stdin closed: rank 0 reads /dev/null too.
        Err(Errno::EBADF) => null.clone(),
        Err(e) => return Err(sys("dup stdin")(e)),
    };
    let host: Vec<_> = std::env::vars_os().collect();
    let mut files = OutputFiles::default();
    for rank in 0..plan.layout.size {
        let (env, pmi_fd) = wireup(rank)?;
        let mut cmd = node::rank_command(plan, cfg, rank, host.clone(), inst.env_changes(), &env);
        cmd.cpus = cpus
            .get(rank as usize)
            .and_then(|c| c.as_deref())
            .map(binding::cpu_set);
        let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let out_w = Arc::new(out_w);
        // --merge-stderr-to-stdout: one pipe for both, so their lines keep their order.
        let (err_r, err_w) = if plan.job.merge_stderr {
            (None, out_w.clone())
        } else {
            let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
            (Some(r), Arc::new(w))
        };
        // `PMI_FD` names the socket's number here; the rank gets it at the same number.
        cmd.fds = vec![
            (
                0,
                if rank == 0 {
                    stdin.clone()
                } else {
                    null.clone()
                },
            ),
            (1, out_w),
            (2, err_w),
        ];
        if let Some(fd) = pmi_fd {
            cmd.fds.push((fd.as_raw_fd(), Arc::new(fd)));
        }
        let streams = [(Some(out_r), Stream::Stdout), (err_r, Stream::Stderr)];
        let mut rank_pipes = Vec::with_capacity(2);
        for (fd, stream) in streams {
            let Some(fd) = fd else { continue };
            rank_pipes.push(Pipe {
                fd,
                buf: LineBuffer::new(tag(plan.job.output_tag, rank, stream))
                    .with_timestamps(plan.job.timestamp_output, stream),
                dest: files.dest(plan, rank, stream)?,
            });
        }
        let pid = inst.spawn(&cmd).map_err(LaunchError::from_instance)?;
        tracing::debug!("rank {rank} started as pid {pid}");
        ranks.push(Rank {
            pid,
            done: false,
            end: None,
        });
        pipes.extend(rank_pipes);
    }
    Ok(())
}

/// The output files of the ranks (`-outfile-pattern`, `-errfile-pattern`, `--output-filename`),
/// each opened once: a rank's two streams may name one file.
#[derive(Default)]
struct OutputFiles {
    open: BTreeMap<std::path::PathBuf, Arc<std::fs::File>>,
}

impl OutputFiles {
    /// Where `stream` of `rank` goes: its file if the job names one (made with its parent
    /// directories, emptied if it exists), else cmpirun's own stream.
    fn dest(&mut self, plan: &LaunchPlan, rank: u32, stream: Stream) -> Result<Dest, LaunchError> {
        let pattern = match stream {
            Stream::Stdout => plan.job.output_files.stdout.as_deref(),
            Stream::Stderr => plan.job.output_files.stderr.as_deref(),
        };
        let Some(pattern) = pattern else {
            return Ok(Dest::Terminal(stream));
        };
        let node = plan.layout.locate(rank).map_or(0, |p| p.node);
        let host = plan
            .layout
            .nodes
            .get(node as usize)
            .map_or("localhost", |n| n.name.as_str());
        let width = plan.job.output_files.rank_width(plan.layout.size);
        let path = std::path::PathBuf::from(expand_pattern(pattern, rank, width, host, node));
        if let Some(file) = self.open.get(&path) {
            return Ok(Dest::File(file.clone()));
        }
        let io = |source| LaunchError::OutputFile {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = Arc::new(std::fs::File::create(&path).map_err(io)?);
        self.open.insert(path, file.clone());
        Ok(Dest::File(file))
    }
}

/// The running job, as the main loop sees it.
struct Job<'a> {
    /// The node instance, which says why it ended the ranks if an image mount ended.
    instance: &'a NodeInstance,
    /// The instance's connection was seen readable (it ended, or said why it ended the ranks):
    /// it is polled no more.
    instance_ended: bool,
    /// The injected host libfabric, if the plan injects one.
    injected: Option<InjectedLibfabric>,
    /// Ranks whose memory map was checked for it.
    checked: Vec<bool>,
    /// Ranks whose memory map showed it.
    host_loaded: Vec<bool>,
    /// The device providers whose use the ranks must prove, if the plan expects any.
    devices: Option<DeviceProof>,
    /// Ranks seen holding such a device, or told about once they finalized without.
    device_decided: Vec<bool>,
    /// Ranks that spoke PMI (MPI ranks).
    connected: Vec<bool>,
    /// Ranks that loaded an MPI library, to fail those that never spoke PMI (singletons).
    singleton: SingletonWatch,
    /// Tells the PMI server which ranks have exited (their fences fail at once); none for the
    /// PMIx server, whose library sees a rank's connection close.
    control: Option<ServerControl>,
    size: u32,
    ranks: Vec<Rank>,
    pipes: Vec<Pipe>,
    end: Option<JobEnd>,
    /// When the ranks were sent SIGTERM (the grace period runs from there).
    teardown: Option<Instant>,
    killed: bool,
    deadline: Option<(Instant, u64)>,
    grace: Duration,
    /// A rank's failure (exit or signal) that ends the job once [`ABORT_WAIT`] has passed
    /// without an `MPI_Abort` of that job arriving: the abort travels from the PMI server's
    /// thread (or the PMIx server's process) and can be read after the rank's exit, which it
    /// caused.
    pending_failure: Option<(JobEnd, Instant)>,
}

/// How long a rank's failure waits for the `MPI_Abort` that may have caused it (see
/// [`Job::pending_failure`]).
const ABORT_WAIT: Duration = Duration::from_millis(100);

/// After the last rank exited, how long output of their leftover children is still read.
const DRAIN: Duration = Duration::from_secs(1);

impl Job<'_> {
    fn live(&self) -> usize {
        self.ranks.iter().filter(|r| !r.done).count()
    }

    fn run(&mut self, sigfd: &SignalFd, wake: OwnedFd, rx: &mpsc::Receiver<Event>) {
        let mut wake = Some(wake);
        let mut all_done_at: Option<Instant> = None;
        loop {
            // Events first: a rank's PMI connection is known before its end is judged.
            while let Ok(ev) = rx.try_recv() {
                self.event(ev);
            }
            self.reap();
            if self.live() == 0 {
                let at = *all_done_at.get_or_insert_with(Instant::now);
                // A failure still waiting for its abort is decided before the job ends.
                if (self.pipes.is_empty() || at.elapsed() >= DRAIN)
                    && self.pending_failure.is_none()
                {
                    break;
                }
            }
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let mut sooner = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
            if let Some((end, at)) = self.pending_failure.take() {
                if self.end.is_some() {
                    // An abort (or a signal, a timeout) decided the end meanwhile.
                } else if now >= at + ABORT_WAIT {
                    self.finish(end);
                    continue;
                } else {
                    sooner(at + ABORT_WAIT);
                    self.pending_failure = Some((end, at));
                }
            }
            if let Some((d, secs)) = self.deadline {
                if now >= d {
                    self.deadline = None;
                    self.finish(JobEnd::TimedOut { secs });
                    continue;
                }
                sooner(d);
            }
            if let Some(t) = self.teardown.filter(|_| !self.killed) {
                if now >= t + self.grace {
                    self.kill_all(Signal::SIGKILL);
                    self.killed = true;
                } else {
                    sooner(t + self.grace);
                }
            }
            if let Some(at) = all_done_at {
                sooner(at + DRAIN);
            }
            let ranks = &self.ranks;
            self.singleton.tick(now, |r| {
                ranks
                    .get(r as usize)
                    .filter(|x| !x.done)
                    .map(|x| x.pid.as_raw())
            });
            if let Some(t) = self.singleton.next(|r| !ranks[r as usize].done) {
                sooner(t);
            }
            let timeout = match next {
                None => PollTimeout::NONE,
                Some(t) => {
                    let ms = t
                        .saturating_duration_since(now)
                        .as_millis()
                        .clamp(1, 60_000);
                    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::NONE)
                }
            };
            let mut pfds: Vec<PollFd> = Vec::with_capacity(self.pipes.len() + 2);
            pfds.push(PollFd::new(sigfd.as_fd(), PollFlags::POLLIN));
            if let Some(w) = &wake {
                pfds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
            }
            let first_pipe = pfds.len();
            for p in &self.pipes {
                pfds.push(PollFd::new(p.fd.as_fd(), PollFlags::POLLIN));
            }
            // Last, so that the pipes' indexes stay as they are: the node instance, watched
            // until it is seen to end.
            let instance_at = pfds.len();
            if !self.instance_ended {
                pfds.push(PollFd::new(self.instance.connection(), PollFlags::POLLIN));
            }
            match poll(&mut pfds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("poll: {e}");
                    break;
                }
            }
            let ready: Vec<bool> = pfds
                .iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(pfds);
            if ready[0] {
                self.signals(sigfd);
            }
            if ready.get(instance_at).copied().unwrap_or(false) {
                self.instance_watch();
            }
            if let Some(w) = wake.as_ref().filter(|_| ready[1]) {
                let mut buf = [0u8; 256];
                match nix::unistd::read(w.as_fd(), &mut buf) {
                    Ok(0) => wake = None,
                    Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(_) => wake = None,
                }
            }
            while let Ok(ev) = rx.try_recv() {
                self.event(ev);
            }
            self.read_pipes(&ready[first_pipe..]);
        }
        let mut out = Vec::new();
        for p in &mut self.pipes {
            p.buf.finish(&mut out);
            p.dest.write(&out);
            out.clear();
        }
    }

    fn read_pipes(&mut self, ready: &[bool]) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        let mut closed = Vec::new();
        let mut gone: Option<Stream> = None;
        for (i, p) in self.pipes.iter_mut().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) {
                continue;
            }
            match nix::unistd::read(p.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    p.buf.finish(&mut out);
                    closed.push(i);
                }
                Ok(n) => p.buf.push(&buf[..n], &mut out),
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                Err(_) => {
                    p.buf.finish(&mut out);
                    closed.push(i);
                }
            }
            if !p.dest.write(&out)
                && let Dest::Terminal(stream) = p.dest
            {
                gone.get_or_insert(stream);
            }
            out.clear();
        }
        for i in closed.into_iter().rev() {
            self.pipes.remove(i);
        }
        // The reader of cmpirun's output went away: the job ends, as under hydra (the ranks'
        // further output is read and dropped, so none of them blocks on a full pipe).
        if let Some(stream) = gone.filter(|_| self.end.is_none()) {
            self.finish(JobEnd::OutputClosed {
                stream: stream.name(),
            });
        }
    }

    /// The node instance's connection became readable: a lost image mount is handled when a
    /// rank fails ([`Self::reap`]); an instance that ended while ranks run (killed) ends the
    /// job, since the ranks' image went with it.
    fn instance_watch(&mut self) {
        // Readable once: a message (left for `reap`), or the end. Either way, no more polling.
        self.instance_ended = true;
        if !self.instance.ended() {
            return;
        }
        if self.end.is_none() && self.live() > 0 {
            self.finish(JobEnd::InstanceLost);
        }
    }

    fn reap(&mut self) {
        for rank in 0..self.ranks.len() {
            if self.ranks[rank].done {
                continue;
            }
            let status = match waitpid(self.ranks[rank].pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => Some(Ok(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => Some(Err(sig)),
                Ok(_) | Err(Errno::EINTR) => None,
                Err(_) => Some(Ok(crate::exit::FAILURE)),
            };
            let Some(status) = status else { continue };
            self.ranks[rank].done = true;
            let rank = rank as u32;
            if let Some(c) = &self.control {
                c.rank_exited(rank);
            }
            tracing::debug!("rank {rank} ended: {status:?}");
            let end = match status {
                Ok(code) => RankEnd::Exited(code),
                Err(signal) => RankEnd::Signaled(signal as i32),
            };
            self.ranks[rank as usize].end = Some(end);
            // A rank that failed because an image mount ended (its files vanished, or the node
            // instance killed it for that): the mount is the reason, also when the failure of a
            // rank that saw its files vanish first was taken for the job's end.
            if end != RankEnd::Exited(0)
                && matches!(
                    self.end,
                    None | Some(JobEnd::RankExited { .. } | JobEnd::RankSignaled { .. })
                )
                && let Some(lost) = self
                    .instance
                    .mount_lost()
                    .map(|message| JobEnd::MountLost { rank, message })
                    // Or the instance itself is gone (killed), and the image with it.
                    .or_else(|| self.instance.ended().then_some(JobEnd::InstanceLost))
            {
                match self.end {
                    None => self.finish(lost),
                    Some(_) => {
                        if let Some(msg) = lost.message(self.size) {
                            write_out(Stream::Stderr, format!("cmpirun: {msg}\n").as_bytes());
                        }
                        self.end = Some(lost);
                    }
                }
                continue;
            }
            // Failures after the job's end was decided are its consequences.
            if self.end.is_some() {
                continue;
            }
            // An MPI rank that exited with 0 without ever speaking PMI ran as a singleton: its
            // "success" is not the job's. One that failed ends the job with its status, and the
            // line says it never connected (its MPI did not find the server, or was refused).
            if let (RankEnd::Exited(code), Some(library)) = (end, self.singleton.singleton(rank)) {
                let library = library.to_owned();
                if code == 0 {
                    self.finish(JobEnd::Singleton { rank, library });
                    continue;
                }
                write_out(Stream::Stderr, never_connected(rank, &library).as_bytes());
            }
            if let Some(end) = JobEnd::of_rank(rank, end) {
                self.pending_failure.get_or_insert((end, Instant::now()));
            } else if self.connected[rank as usize] {
                // An MPI rank that ended before its finalize was looked at.
                self.check_injected(rank, true);
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Aborted {
                rank,
                exit_code,
                message,
            } => {
                if let Some(m) = message.filter(|m| !m.is_empty() && m != "abort") {
                    tracing::info!("rank {rank} aborted: {m}");
                }
                if self.end.is_none() {
                    self.finish(JobEnd::Aborted {
                        rank,
                        code: exit_code,
                    });
                }
            }
            Event::Connected { rank } => {
                if let Some(c) = self.connected.get_mut(rank as usize) {
                    *c = true;
                }
                self.singleton.spoke(rank);
                self.check_injected(rank, false)
            }
            Event::Fenced { rank } => self.check_devices(rank, false),
            Event::Finalized { rank } => {
                self.check_injected(rank, true);
                self.check_devices(rank, true);
            }
            Event::ProtocolError { rank, error } => {
                tracing::warn!(
                    "PMI protocol error from {}: {error}",
                    rank.map_or("a rank".to_owned(), |r| format!("rank {r}"))
                );
            }
            Event::FenceWaiting(wait) => {
                tracing::warn!("{wait}; the job goes on waiting (--timeout ends it)");
            }
            other => tracing::trace!("PMI: {other:?}"),
        }
    }

    /// Confirms from the memory map of `rank` that it loaded the injected host libfabric (at
    /// its first PMI message: the MPI library and its libfabric are loaded by then). A rank that
    /// has not mapped any libfabric yet is looked at again when it finalizes (`last`), or, when
    /// it ended first, counts as one that loaded none. Only MPI ranks (they spoke PMI) come here,
    /// so one that loaded none fails a job that expects the host's provider.
    fn check_injected(&mut self, rank: u32, last: bool) {
        let Some(inj) = &self.injected else { return };
        let Some(r) = self.ranks.get(rank as usize) else {
            return;
        };
        if self.checked[rank as usize] || (r.done && !last) {
            return;
        }
        let finding = if r.done {
            Finding::NoLibfabric
        } else {
            inj.look(r.pid, last)
        };
        if finding == Finding::Undecided {
            return;
        }
        self.checked[rank as usize] = true;
        self.host_loaded[rank as usize] = matches!(finding, Finding::Host(_));
        if let Some(end) = inj.job_end(rank, &finding, true) {
            if self.end.is_none() {
                self.finish(end);
            }
        } else if let Some((line, warning)) = inj.report(rank, &finding, true) {
            if warning {
                tracing::warn!("{line}");
            } else {
                tracing::info!("{line}");
            }
        }
    }

    /// Looks whether `rank` holds a device of the expected device providers open (at each of
    /// its fences until seen); at its finalize (`last`) a rank that loaded the host libfabric
    /// and was never seen with one is reported.
    fn check_devices(&mut self, rank: u32, last: bool) {
        let (Some(proof), Some(r)) = (&self.devices, self.ranks.get(rank as usize)) else {
            return;
        };
        let i = rank as usize;
        if self.device_decided[i] {
            return;
        }
        let held = if r.done { None } else { proof.look(r.pid) };
        if held.is_none() && !last {
            return;
        }
        self.device_decided[i] = true;
        if held.is_none() && !self.host_loaded[i] {
            // It did not load the host libfabric: said already (check_injected).
            return;
        }
        let (line, warning) = proof.report(rank, held.as_ref());
        if warning {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    fn signals(&mut self, sigfd: &SignalFd) {
        while let Ok(Some(info)) = sigfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if sig == Signal::SIGCHLD {
                continue;
            }
            // The ranks are session leaders: the terminal's signals (SI_KERNEL) reach only
            // cmpirun, so every signal is passed on, once.
            match sig {
                Signal::SIGTSTP => {
                    self.kill_all(Signal::SIGSTOP);
                    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
                    continue;
                }
                Signal::SIGCONT => {
                    self.kill_all(Signal::SIGCONT);
                    continue;
                }
                _ => {}
            }
            if !ends_job(sig) {
                self.kill_all(sig);
                continue;
            }
            if self.end.is_none() {
                self.kill_all(sig);
                let end = JobEnd::Interrupted(sig);
                if let Some(msg) = end.message(self.size) {
                    write_out(Stream::Stderr, format!("cmpirun: {msg}\n").as_bytes());
                }
                self.end = Some(end);
                self.teardown = Some(Instant::now());
            } else if !self.killed {
                // A second interrupt: no more waiting.
                self.kill_all(Signal::SIGKILL);
                self.killed = true;
            }
        }
    }

    /// Decides how the job ended and starts the teardown: SIGTERM now, SIGKILL after the grace.
    fn finish(&mut self, end: JobEnd) {
        if let Some(msg) = end.message(self.size) {
            write_out(Stream::Stderr, format!("cmpirun: {msg}\n").as_bytes());
        }
        self.end = Some(end);
        if self.teardown.is_none() {
            self.kill_all(Signal::SIGTERM);
            self.teardown = Some(Instant::now());
        }
    }

    /// Signals every rank still running, with the processes of its session (what the
    /// terminal would reach if the ranks were in its foreground group). A rank that has not
    /// called `setsid` yet has no group of its own: then the rank alone.
    fn kill_all(&self, sig: Signal) {
        for r in self.ranks.iter().filter(|r| !r.done) {
            if killpg(r.pid, sig).is_err() {
                let _ = kill(r.pid, sig);
            }
        }
    }
}
