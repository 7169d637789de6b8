//! The slurm and hydra launchers: run the plan's `srun …` or `mpiexec.hydra …` command, whose
//! tasks are `cmpirun __rank`, and pass its status, signals and `--timeout` through.
//!
//! The plan reaches every task in the environment ([`super::rank::PLAN_VAR`]): srun and hydra
//! pass the caller's environment to their tasks, and no file has to be shared between nodes or
//! cleaned up after a kill.

use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::jobspec::{LauncherKind, OutputTag};
use crate::plan::{LaunchPlan, PLAN_FILE_PLACEHOLDER};

use super::LaunchError;
use super::local::kill_grace;
use super::rank::PLAN_VAR;
use super::status::{JobEnd, SIGNAL_BASE};
use crate::container::run::with_forwarded_signals_blocked;

/// The command line to run: the plan's, with the plan source filled in and the output-tag flag
/// of the launcher added (`srun --label`, hydra's `-prepend-rank`).
pub fn command_line(plan: &LaunchPlan) -> Result<Vec<String>, LaunchError> {
    let cmd = plan.launcher.commands.first().ok_or_else(|| {
        LaunchError::Failed("the plan has no launcher command for this launcher".into())
    })?;
    let mut argv: Vec<String> = cmd
        .argv
        .iter()
        .map(|a| a.replace(PLAN_FILE_PLACEHOLDER, &format!("env:{PLAN_VAR}")))
        .collect();
    if plan.job.output_tag != OutputTag::None && argv.len() > 1 {
        let flag = match plan.launcher.kind {
            LauncherKind::Slurm => "--label",
            _ => "-prepend-rank",
        };
        argv.insert(1, flag.to_owned());
    }
    Ok(argv)
}

/// Runs the launcher command and returns cmpirun's exit status: the launcher's own (srun and
/// hydra report the ranks' failures in it), 128+signal when a signal to cmpirun ended the job,
/// [`super::status::TIMEOUT`] after `--timeout`.
pub fn run(plan: &LaunchPlan) -> Result<i32, LaunchError> {
    let argv = command_line(plan)?;
    let json = serde_json::to_string(plan)
        .map_err(|e| LaunchError::Failed(format!("cannot serialise the plan: {e}")))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // Stray wire-up variables must not reach srun's or hydra's tasks: they set their own.
    for (k, _) in std::env::vars_os() {
        if cmpirun_pmi::env::is_wireup_var(&k) {
            cmd.env_remove(k);
        }
    }
    cmd.env(PLAN_VAR, json);
    let result = with_forwarded_signals_blocked(
        |errno| LaunchError::Sys {
            step: "block signals",
            errno,
        },
        |mask, old| run_blocked(plan, cmd, &argv[0], mask, old),
    );
    let prefix = match (plan.launcher.kind, std::env::var("SLURM_JOB_ID")) {
        (LauncherKind::Slurm, Ok(job)) => format!("slurm-{job}."),
        (LauncherKind::Slurm, Err(_)) => "slurm-".to_owned(),
        _ => "proxy-".to_owned(),
    };
    remove_stale_instances(&prefix);
    result
}

/// Removes this node's rendezvous files of instances (keys starting with `prefix`) that are gone.
///
/// An instance removes its files when its last rank ends, but srun and hydra end a failed step
/// with SIGKILL to every process of it, instance included; its socket and lock then stay behind.
pub fn remove_stale_instances(prefix: &str) {
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
        if !key.starts_with(prefix) {
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
}

fn run_blocked(
    plan: &LaunchPlan,
    mut cmd: Command,
    program: &str,
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
    tracing::info!("running {program}");
    let mut child = cmd.spawn().map_err(|e| {
        LaunchError::Usage(format!(
            "cannot run {program}: {e} (is it installed and on PATH?)"
        ))
    })?;
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = plan
        .job
        .timeout_secs
        .map(|s| (Instant::now() + Duration::from_secs(s), s));
    let grace = kill_grace();
    let mut end: Option<JobEnd> = None;
    let mut term_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| LaunchError::Io {
            step: "wait for the launcher",
            source: e,
        })? {
            let own = status
                .code()
                .unwrap_or_else(|| SIGNAL_BASE + status.signal().unwrap_or(0));
            return Ok(match end {
                Some(e) => e.exit_code(),
                None => own,
            });
        }
        let now = Instant::now();
        let mut wait = Duration::from_secs(60);
        if let (Some((d, secs)), None) = (deadline, &end) {
            if now >= d {
                let e = JobEnd::TimedOut { secs };
                if let Some(m) = e.message(plan.layout.size) {
                    eprintln!("cmpirun: {m}");
                }
                end = Some(e);
                let _ = kill(pid, Signal::SIGTERM);
                term_at = Some(now);
                continue;
            }
            wait = wait.min(d - now);
        }
        if let Some(t) = term_at.filter(|_| !killed) {
            if now >= t + grace {
                let _ = kill(pid, Signal::SIGKILL);
                killed = true;
            } else {
                wait = wait.min(t + grace - now);
            }
        }
        let mut pfd = [nix::poll::PollFd::new(
            sigfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = wait.as_millis().clamp(1, 60_000) as i32;
        let _ = nix::poll::poll(
            &mut pfd,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::NONE),
        );
        while let Ok(Some(info)) = sigfd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if sig == Signal::SIGCHLD {
                continue;
            }
            let _ = kill(pid, sig);
            if matches!(sig, Signal::SIGINT | Signal::SIGTERM | Signal::SIGHUP) && end.is_none() {
                end = Some(JobEnd::Interrupted(sig));
                term_at = Some(Instant::now());
            }
        }
    }
}
