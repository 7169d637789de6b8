//! The slurm and hydra launchers: run the plan's `srun …` or `mpiexec.hydra …` command, whose
//! tasks are `cmpirun __rank`, pass signals and `--timeout` through, collect the tasks' reports
//! of how their ranks ended and end with the status the local launcher would give.
//!
//! The plan reaches every task in the environment ([`super::rank::PLAN_VAR`]): srun and hydra
//! pass the caller's environment to their tasks, and no file has to be shared between nodes or
//! cleaned up after a kill.

use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::jobspec::{LauncherKind, OutputTag};
use crate::plan::encoding::{MAX_ARG_STRLEN, env_bytes};
use crate::plan::{LaunchPlan, PLAN_FILE_PLACEHOLDER};

use super::LaunchError;
use super::output::{Stream, write_out};
use super::rank::{PLAN_VAR, encode_plan};
use super::report::{Collector, REPORT_VAR, Report};
use super::settings::kill_grace;
use super::status::{JobEnd, RankEnd, SIGNAL_BASE};
use crate::container::run::with_forwarded_signals_blocked;

/// How long reports still on their way are read after the launcher exited.
const DRAIN: Duration = Duration::from_millis(300);

/// How long after the first failure report cmpirun ends hydra's job: the failed task says why
/// and exits meanwhile.
const HYDRA_END_DELAY: Duration = Duration::from_millis(500);

/// How long node instances adopted by cmpirun get to end after the launcher exited.
const REAP_PATIENCE: Duration = Duration::from_secs(10);

/// The command line to run: the plan's, with the plan source filled in and the output-tag flag
/// of the launcher added (`srun --label`, hydra's `-prepend-rank`).
pub fn command_line(plan: &LaunchPlan) -> Result<Vec<String>, LaunchError> {
    let cmd = plan
        .launcher
        .commands
        .first()
        .ok_or(LaunchError::NoLauncherCommand)?;
    let mut argv: Vec<String> = cmd
        .argv
        .iter()
        .map(|a| a.replace(PLAN_FILE_PLACEHOLDER, &format!("env:{PLAN_VAR}")))
        .collect();
    if plan.job.output_tag != OutputTag::None && argv.len() > 1 {
        let flag = match plan.launcher.kind {
            LauncherKind::Slurm => "--label",
            LauncherKind::Mpirun => "--tag-output",
            _ => "-prepend-rank",
        };
        argv.insert(1, flag.to_owned());
    }
    Ok(argv)
}

/// Runs the launcher command and returns cmpirun's exit status: that of the first event that
/// ended the job, as the local launcher gives it: the first failure a rank's task reported
/// ([`super::report`]), 128+signal when a signal to cmpirun ended the job,
/// [`super::status::TIMEOUT`] after `--timeout`; the launcher's own status when it failed and no
/// rank reported why.
pub fn run(plan: &LaunchPlan) -> Result<i32, LaunchError> {
    super::settings::log_settings();
    let mut argv = command_line(plan)?;
    let encoded = encode_plan(plan)?;
    // execve refuses a longer `NAME=value` string with E2BIG, which would read as a missing
    // launcher.
    let bytes = env_bytes(PLAN_VAR, &encoded);
    if bytes > MAX_ARG_STRLEN {
        return Err(LaunchError::PlanTooLarge {
            bytes,
            limit: MAX_ARG_STRLEN,
            ranks: plan.layout.size,
            nodes: plan.layout.nodes.len(),
        });
    }
    let nodes: Vec<String> = plan.layout.nodes.iter().map(|n| n.name.clone()).collect();
    let srun = plan.launcher.kind == LauncherKind::Slurm;
    let collector = Collector::bind(&nodes, srun);
    if let Ok(c) = &collector
        && plan.launcher.kind == LauncherKind::Hydra
    {
        hydra_localhost(&mut argv, c.reachable(), c.remote());
    }
    // Kept open until the launcher has started: hydra reads its hosts from it.
    let _hostfile = match plan.launcher.kind {
        LauncherKind::Hydra => hydra_hostfile(&mut argv)?,
        _ => None,
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // Stray wire-up variables must not reach srun's or hydra's tasks: they set their own.
    for (k, _) in std::env::vars_os() {
        if cmpirun_pmi::wireup::is_wireup_var(&k) {
            cmd.env_remove(k);
        }
    }
    cmd.env(PLAN_VAR, encoded);
    let mut collector = match collector {
        Ok(c) => {
            cmd.env(REPORT_VAR, c.env_value());
            Some(c)
        }
        Err(e) => {
            tracing::warn!(
                "cannot listen for the ranks' reports ({e}); the job's status will be {}'s",
                argv[0]
            );
            None
        }
    };
    // What jobs whose front end was killed left on this node (it could not clean up after
    // them): the files of instances that no longer answer.
    remove_stale_instances("", "");
    let result = with_forwarded_signals_blocked(
        |errno| LaunchError::Sys {
            step: "block signals",
            errno,
        },
        |mask, old| run_blocked(plan, cmd, &argv[0], collector.as_mut(), mask, old),
    );
    let prefix = match (plan.launcher.kind, std::env::var("SLURM_JOB_ID")) {
        (LauncherKind::Slurm, Ok(job)) => format!("slurm-{job}."),
        (LauncherKind::Slurm, Err(_)) => "slurm-".to_owned(),
        _ => "proxy-".to_owned(),
    };
    remove_stale_instances(&prefix, "");
    result
}

/// Tells hydra's proxies on other nodes the address to connect back to (`-localhost ADDR`),
/// the one the report port listens on, unless the command line already has one: hydra hands
/// out this host's name otherwise, which other nodes may resolve to loopback (Debian's
/// `127.0.1.1 hostname` line).
fn hydra_localhost(argv: &mut Vec<String>, addr: Option<std::net::IpAddr>, remote: bool) {
    if !remote || argv.len() < 2 || argv.iter().any(|a| a == "-localhost" || a == "--localhost") {
        return;
    }
    let Some(addr) = addr else {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let loopback_only = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0))
            .map(|mut a| a.all(|a| a.ip().is_loopback()))
            .unwrap_or(true);
        if loopback_only {
            say(&format!(
                "warning: the other nodes' names do not resolve here, and this host's name \
                 ({host}) resolves to loopback: {}'s proxies on the other nodes will not reach \
                 it; set CMPIRUN_REPORT_ADDR to this host's address on the nodes' network",
                argv[0]
            ));
        }
        return;
    };
    tracing::info!(
        "passing -localhost {addr} to {}: the address the other nodes reach this host at",
        argv[0]
    );
    argv.splice(1..1, ["-localhost".to_owned(), addr.to_string()]);
}

/// The longest `-hosts` list handed to hydra on its command line: a longer one goes in a
/// hostfile ([`hydra_hostfile`]). One argument may hold at most [`MAX_ARG_STRLEN`] bytes, about
/// 4,000 nodes of 30-character names.
const HYDRA_HOSTS_ARG_MAX: usize = 16 * 1024;

/// Replaces a `-hosts LIST` longer than [`HYDRA_HOSTS_ARG_MAX`] on hydra's command line `argv`
/// with `-f /dev/fd/N`: the same hosts, one `name:slots` a line, in an in-memory file that the
/// launcher inherits (so nothing is left on disk if cmpirun is killed). Returns that file, to
/// keep open until the launcher has started.
fn hydra_hostfile(argv: &mut [String]) -> Result<Option<std::fs::File>, LaunchError> {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;

    let Some(i) = argv.iter().position(|a| a == "-hosts") else {
        return Ok(None);
    };
    let Some(list) = argv.get(i + 1).filter(|l| l.len() > HYDRA_HOSTS_ARG_MAX) else {
        return Ok(None);
    };
    // Not close-on-exec: the launcher inherits it.
    let fd = nix::sys::memfd::memfd_create(c"cmpirun-hosts", nix::sys::memfd::MFdFlags::empty())
        .map_err(|errno| LaunchError::Sys {
            step: "memfd_create for hydra's hostfile",
            errno,
        })?;
    let mut file = std::fs::File::from(fd);
    let mut lines = list.replace(',', "\n");
    lines.push('\n');
    file.write_all(lines.as_bytes())
        .map_err(|e| LaunchError::Sys {
            step: "write hydra's hostfile",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    tracing::info!(
        "{} hosts: passed to {} in a hostfile (-f), not as -hosts ({} bytes)",
        lines.lines().count(),
        argv[0],
        list.len()
    );
    argv[i] = "-f".to_owned();
    argv[i + 1] = format!("/dev/fd/{}", file.as_raw_fd());
    Ok(Some(file))
}

/// Removes this node's rendezvous files of instances (keys starting with `prefix`, but `skip`)
/// that are gone.
///
/// An instance removes its files when its last rank ends, but srun and hydra end a failed step
/// with SIGKILL to every process of it, instance included; its socket and lock then stay behind.
/// The front end removes them on its own node when the job ends; on the other nodes the task
/// that creates the next instance there does ([`super::rank`]).
pub fn remove_stale_instances(prefix: &str, skip: &str) {
    use crate::container::rendezvous::{Rendezvous, runtime_dir};
    let Ok(dir) = runtime_dir() else { return };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(key) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".sock").or_else(|| n.strip_suffix(".lock")))
        else {
            continue;
        };
        if !key.starts_with(prefix) || key == skip {
            continue;
        }
        let Ok(rv) = Rendezvous::new(&dir, key) else {
            continue;
        };
        let Ok(_guard) = rv.try_lock() else { continue };
        match std::os::unix::net::UnixStream::connect(rv.socket()) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!("removing the files of the ended instance {key}");
                rv.remove_files();
            }
            Err(_) => {}
        }
    }
    // The sweep made the directory if it was not there: it goes again when empty, as an
    // instance's own removal leaves it.
    let _ = std::fs::remove_dir(&dir);
}

/// Prints one line on stderr in one write, so that it does not mix with the ranks' lines that
/// srun or hydra write to the same stderr.
fn say(m: &str) {
    write_out(Stream::Stderr, format!("cmpirun: {m}\n").as_bytes());
}

/// Waits for the processes this process adopted as a subreaper (node instances whose creating
/// task the launcher killed, still unmounting and cleaning up), so that nothing of the job is
/// left on this node when cmpirun exits; SIGTERM (the instance's "end now") after `patience`.
fn reap_adopted(patience: Duration) {
    let start = Instant::now();
    let mut termed = false;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        if start.elapsed() >= patience && !termed {
            tracing::warn!("node instances still running {patience:?} after the launcher ended");
            for pid in adopted_children() {
                let _ = kill(pid, Signal::SIGTERM);
            }
            termed = true;
        }
        if start.elapsed() >= patience * 2 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This process's children, from `/proc/self/task/*/children`.
fn adopted_children() -> Vec<Pid> {
    let me = std::process::id();
    std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// Takes the first failure among `reports` as the job's end, unless its end is decided; marks
/// every reporting rank in `reported`.
fn note_reports(end: &mut Option<JobEnd>, reported: &mut [bool], reports: Vec<Report>, size: u32) {
    for r in reports {
        let Some(ranks) = r.ranks_below(size) else {
            tracing::debug!("rank reports: a malformed report of clean ends was ignored");
            continue;
        };
        for rank in ranks {
            if let Some(seen) = reported.get_mut(rank as usize) {
                *seen = true;
            }
        }
        // A node's report of clean ends decides nothing but that those ranks ended well.
        if let Some(list) = &r.ranks {
            tracing::debug!("ranks {list} reported a clean end");
            continue;
        }
        tracing::debug!("rank {} reported {:?}", r.rank, r.end);
        // A lost image mount is the reason, also when a rank that failed on a vanished file
        // reported first.
        if matches!(
            end,
            Some(JobEnd::RankExited { .. } | JobEnd::RankSignaled { .. })
        ) && r.end == RankEnd::MountLost
            && let Some(e) = JobEnd::of_report(r.rank, r.end, r.message.as_deref())
        {
            if let Some(m) = e.message(size) {
                say(&m);
            }
            *end = Some(e);
            continue;
        }
        if end.is_some() {
            continue;
        }
        if let Some(m) = r
            .message
            .as_deref()
            .filter(|m| !m.is_empty() && *m != "abort")
        {
            tracing::info!("rank {} aborted: {m}", r.rank);
        }
        if let Some(e) = JobEnd::of_report(r.rank, r.end, r.message.as_deref()) {
            if let Some(m) = e.message(size) {
                say(&m);
            }
            *end = Some(e);
        }
    }
}

/// The ranks that never reported how they ended, with their nodes, as the job's end, when some
/// did report or the launcher exited with 0.
fn ranks_lost(plan: &LaunchPlan, reported: &[bool], launcher: &str, code: i32) -> Option<JobEnd> {
    let missing: Vec<u32> = (0..plan.layout.size)
        .filter(|&r| !reported.get(r as usize).copied().unwrap_or(false))
        .collect();
    // No rank at all and a failed launcher: it failed to start them, or ended them all.
    if missing.is_empty() || (missing.len() == reported.len() && code != 0) {
        return None;
    }
    let places = plan.layout.places();
    let mut seen = vec![false; plan.layout.nodes.len()];
    let mut nodes: Vec<String> = Vec::new();
    for &r in &missing {
        if let Some(p) = places.get(r as usize)
            && let Some(n) = plan.layout.nodes.get(p.node as usize)
            && !std::mem::replace(&mut seen[p.node as usize], true)
        {
            nodes.push(n.name.clone());
        }
    }
    Some(JobEnd::RanksLost {
        ranks: super::report::rank_list(&missing),
        nodes,
        launcher: launcher.to_owned(),
        code,
    })
}

fn run_blocked(
    plan: &LaunchPlan,
    mut cmd: Command,
    program: &str,
    mut collector: Option<&mut Collector>,
    mask: &SigSet,
    old: SigSet,
) -> Result<i32, LaunchError> {
    let sigfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|errno| LaunchError::Sys {
            step: "signalfd",
            errno,
        })?;
    // SAFETY: the closure only calls sigprocmask and prctl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Ok(())
        });
    }
    // Node instances on this node outlive the task that created them when the launcher kills
    // it: as their subreaper, cmpirun can wait for them before it exits.
    let subreaper = nix::sys::prctl::set_child_subreaper(true).is_ok();
    tracing::info!("running {program}");
    let mut child = cmd.spawn().map_err(|error| LaunchError::LauncherMissing {
        program: program.to_string(),
        error,
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = plan
        .job
        .timeout_secs
        .map(|s| (Instant::now() + Duration::from_secs(s), s));
    let grace = kill_grace();
    let mut end: Option<JobEnd> = None;
    let mut reported = vec![false; plan.layout.size as usize];
    let mut term_at: Option<Instant> = None;
    let mut end_hydra_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| LaunchError::Io {
            step: "wait for the launcher",
            source: e,
        })? {
            let own = status
                .code()
                .unwrap_or_else(|| SIGNAL_BASE + status.signal().unwrap_or(0));
            if let Some(c) = collector.as_mut() {
                note_reports(&mut end, &mut reported, c.drain(DRAIN), plan.layout.size);
            }
            if subreaper {
                reap_adopted(REAP_PATIENCE);
            }
            if end.is_none()
                && collector.is_some()
                && let Some(e) = ranks_lost(plan, &reported, program, own)
            {
                say(&e.message(plan.layout.size).unwrap_or_default());
                end = Some(e);
            }
            if end.is_none() && own != 0 {
                let e = JobEnd::Unreported {
                    launcher: program.to_owned(),
                    code: own,
                };
                if collector.is_some()
                    && let Some(m) = e.message(plan.layout.size)
                {
                    say(&m);
                }
                end = Some(e);
            }
            return Ok(end.map_or(0, |e| e.exit_code()));
        }
        let now = Instant::now();
        let mut wait = Duration::from_secs(60);
        if let (Some((d, secs)), None) = (deadline, &end) {
            if now >= d {
                let e = JobEnd::TimedOut { secs };
                if let Some(m) = e.message(plan.layout.size) {
                    say(&m);
                }
                end = Some(e);
                let _ = kill(pid, Signal::SIGTERM);
                term_at = Some(now);
                continue;
            }
            wait = wait.min(d - now);
        }
        if let Some(at) = end_hydra_at {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(t) = term_at.filter(|_| !killed) {
            if now >= t + grace {
                let _ = kill(pid, Signal::SIGKILL);
                killed = true;
            } else {
                wait = wait.min(t + grace - now);
            }
        }
        let mut pfd = vec![nix::poll::PollFd::new(
            sigfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if let Some(c) = collector.as_ref() {
            pfd.extend(
                c.fds()
                    .into_iter()
                    .map(|fd| nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)),
            );
        }
        let ms = wait.as_millis().clamp(1, 60_000) as i32;
        let _ = nix::poll::poll(
            &mut pfd,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::NONE),
        );
        drop(pfd);
        if let Some(c) = collector.as_mut() {
            let decided = end.is_some();
            note_reports(&mut end, &mut reported, c.service(), plan.layout.size);
            // hydra ends a job only when a rank's task exits with a failure, and not at all
            // when the other ranks wait in MPI_Init for the failed one: the first failure
            // reported ends it, as under the local launcher (srun's --kill-on-bad-exit does).
            // The failed task gets a moment to say why and exit first.
            if !decided && end.is_some() && plan.launcher.kind == LauncherKind::Hydra {
                end_hydra_at = Some(Instant::now() + HYDRA_END_DELAY);
            }
        }
        if let Some(at) = end_hydra_at.filter(|at| Instant::now() >= *at && term_at.is_none()) {
            tracing::info!("ending {program}: a rank failed {HYDRA_END_DELAY:?} ago");
            let _ = kill(pid, Signal::SIGTERM);
            term_at = Some(at);
            end_hydra_at = None;
        }
        while let Ok(Some(info)) = sigfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if sig == Signal::SIGCHLD {
                continue;
            }
            let _ = kill(pid, sig);
            if matches!(
                sig,
                Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP | Signal::SIGQUIT
            ) && end.is_none()
            {
                let e = JobEnd::Interrupted(sig);
                if let Some(m) = e.message(plan.layout.size) {
                    say(&m);
                }
                end = Some(e);
                term_at = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_host_list_reaches_hydra_in_a_hostfile() {
        let hosts: Vec<String> = (0..10_000)
            .map(|i| format!("cn{i:05}.cluster.example.org:128"))
            .collect();
        let mut argv: Vec<String> = ["mpiexec.hydra", "-hosts", &hosts.join(","), "-n", "4"]
            .map(str::to_owned)
            .to_vec();
        let file = hydra_hostfile(&mut argv).unwrap();
        assert!(file.is_some());
        assert_eq!(argv[1], "-f");
        assert!(argv[2].starts_with("/dev/fd/"), "{argv:?}");
        assert_eq!(argv[3..], ["-n", "4"]);
        let text = std::fs::read_to_string(&argv[2]).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), hosts);
        // A short list stays on the command line.
        let mut argv: Vec<String> = ["mpiexec.hydra", "-hosts", "a:2,b:2", "-n", "4"]
            .map(str::to_owned)
            .to_vec();
        assert!(hydra_hostfile(&mut argv).unwrap().is_none());
        assert_eq!(argv[2], "a:2,b:2");
    }
}
