//! `cmpirun __rank --plan SOURCE`: what `srun` and `mpiexec.hydra` start for every rank.
//!
//! The rank mode reads the plan, joins its node's instance (creating it when it is the first
//! rank there; keyed by job step, and holding every image of the job), and starts the rank in it
//! with the PMI descriptors and variables it inherited from srun or hydra (`PMI_FD` through a
//! relay that sees an abort, [`super::watch`]). It stays as the rank's parent, passes signals on,
//! reports how the rank ended to the front end ([`super::report`]: a failure at once; a clean
//! end, which the front end counts, through the node instance, which reports all of its node's
//! at once as it ends) and exits the way the rank did.

use std::collections::BTreeMap;
use std::ffi::OsString;

use nix::sys::signal::SigSet;
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::container::instance::join_or_create;
use crate::container::rendezvous::runtime_dir;
use crate::container::run::{Outcome, propagate, with_forwarded_signals_blocked};
use crate::exit::Blame;
use crate::plan::LaunchPlan;

use super::injected::RankWatch;
use super::output::{Stream, write_out};
use super::report::{REPORT_VAR, Target};
use super::singleton::{SingletonWatch, never_connected};
use super::status::{JobEnd, RankEnd};
use super::watch::{Relay, watch};
use super::{LaunchError, node};

pub use crate::plan::encoding::PLAN_VAR;

/// How long a task whose rank failed waits for its node instance to say that an image mount
/// ended (the instance sees its server's end a moment after a rank may have failed on it).
const MOUNT_LOST_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// How often a task looks whether its node instance still runs.
const INSTANCE_WATCH: std::time::Duration = std::time::Duration::from_millis(500);

/// Reads the plan: `env:NAME` takes it from variable NAME, anything else is a file.
pub fn read_plan(source: &str) -> Result<LaunchPlan, LaunchError> {
    let text = match source.strip_prefix("env:") {
        Some(var) => std::env::var(var).map_err(|_| LaunchError::PlanVarUnset {
            plan: source.to_owned(),
            var: var.to_owned(),
        })?,
        None => std::fs::read_to_string(source).map_err(|error| LaunchError::PlanUnreadable {
            plan: source.to_owned(),
            error,
        })?,
    };
    parse_plan(source, &text)
}

/// The plan as the front end passes it to every task ([`crate::plan::encoding`]).
pub fn encode_plan(plan: &LaunchPlan) -> Result<String, LaunchError> {
    crate::plan::encoding::encode(plan).map_err(LaunchError::SerialisePlan)
}

/// Parses a plan: the encoded form the front end passes ([`encode_plan`]), or plain JSON (what
/// `--dry-run --json` prints, in a file); `source` (as given to `--plan`) is used in messages.
/// The layout is checked as it is read (slots, nodes and size agree).
pub fn parse_plan(source: &str, text: &str) -> Result<LaunchPlan, LaunchError> {
    let json = crate::plan::encoding::decode(text).map_err(|message| LaunchError::PlanFormat {
        plan: source.to_owned(),
        message,
    })?;
    serde_json::from_str(&json).map_err(|error| LaunchError::NotAPlan {
        plan: source.to_owned(),
        error,
    })
}

/// This task's rank, from what the launcher set: `PMI_RANK` (MPICH-style PMI, Slurm pmi2,
/// hydra), `OMPI_COMM_WORLD_RANK`, `PMIX_RANK`, then `SLURM_PROCID`.
pub fn task_rank(env: &BTreeMap<String, String>) -> Option<u32> {
    [
        "PMI_RANK",
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|k| env.get(*k).and_then(|v| v.parse().ok()))
}

/// The node instance key: the Slurm job step (`SLURM_JOB_ID.SLURM_STEP_ID`), else the launcher
/// process that started the ranks on this node (hydra's proxy). Not the image: the instance
/// holds every image of the job, so the ranks of MPMD parts with different images share its
/// user namespace (and shared memory).
pub fn instance_key(env: &BTreeMap<String, String>, parent: u32) -> String {
    let step = match (env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")) {
        (Some(j), Some(s)) => format!("slurm-{j}.{s}"),
        _ => format!("proxy-{parent}"),
    };
    let key: String = step
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    key
}

/// The wire-up variables this task got from its launcher: they go to the rank unchanged (the
/// plan may add others from them: `PMIX_MCA_*` from a PMIx server's module choice).
pub fn launcher_env(env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| cmpirun_pmi::wireup::is_wireup_var(std::ffi::OsStr::new(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// With `report`, puts this task between the rank and its launcher's `PMI_FD` connection (see
/// [`super::watch`]) and gives the rank the relay's descriptor in `wireup`; without one, or
/// when that fails, the rank gets the launcher's descriptor as it is.
fn relayed(
    report: bool,
    mut wireup: Vec<(String, String)>,
) -> (Option<Relay>, Vec<(String, String)>) {
    let Some(fd) = report
        .then(|| wireup.iter().find(|(k, _)| k == "PMI_FD"))
        .flatten()
        .and_then(|(_, v)| v.parse().ok())
    else {
        return (None, wireup);
    };
    match Relay::new(fd) {
        Ok(relay) => {
            if let Some(n) = relay.rank_fd() {
                for (k, v) in &mut wireup {
                    if k == "PMI_FD" {
                        *v = n.to_string();
                    }
                }
            }
            (Some(relay), wireup)
        }
        Err(e) => {
            tracing::warn!("cannot relay PMI_FD {fd}: {e}; an MPI_Abort code will not be seen");
            (None, wireup)
        }
    }
}

/// The launcher variables that give the size of the world a task's rank joins, in the order
/// they are believed: PMI-1/PMI-2 (`srun --mpi=pmi2`, hydra), Open MPI's `mpirun`, then Slurm's
/// step size (which `srun --mpi=pmix` gives the PMIx server).
const WORLD_SIZE_VARS: [&str; 3] = ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"];

/// The variable and the world size the launcher gave this task, when it is not the job's size
/// `size` (the ranks would form another world than `-n` says: a profile's `srun_args` or
/// `mpiexec_args` that change the task count, say).
pub fn world_size_mismatch(env: &BTreeMap<String, String>, size: u32) -> Option<(String, String)> {
    let (var, value) = WORLD_SIZE_VARS
        .iter()
        .find_map(|v| env.get(*v).map(|x| (*v, x)))?;
    (value.trim().parse::<u32>().ok() != Some(size)).then(|| (var.to_owned(), value.clone()))
}

/// Runs one rank (`cmpirun __rank`). Returns the exit status to end with. Must be called while
/// cmpirun is single-threaded.
pub fn run(plan_source: &str) -> Result<i32, LaunchError> {
    let mut plan = read_plan(plan_source)?;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let rank = task_rank(&env).ok_or(LaunchError::NoRank)?;
    // Computed from the plan's layout rule alone (no list of ranks travels with the plan).
    if let Some(v) = node::rank_view(&plan, rank) {
        tracing::debug!(
            "rank {rank} of {}: node {} ({}), local rank {}, part {} ({})",
            plan.layout.size,
            v.node,
            v.node_name,
            v.local_rank,
            v.part,
            v.program
        );
    }
    if let Some((var, value)) = world_size_mismatch(&env, plan.layout.size) {
        let e = LaunchError::WorldSize {
            var,
            value,
            size: plan.layout.size,
        };
        if let Some(t) = Target::from_env() {
            t.send(rank, RankEnd::Exited(e.fault().status()), None);
        }
        return Err(e);
    }
    let key = instance_key(&env, std::os::unix::process::parent_id());
    let result = node::fetch_registry_images(&mut plan)
        .and_then(|()| node::node_config(&plan, &env))
        .map(|mut cfg| {
            // The node's clean ends go to the front end in one report, from the instance.
            if Target::from_env().is_some() {
                cfg.clean_ends = Some(super::report::send_clean_ends);
            }
            cfg
        })
        .and_then(|cfg| {
            with_forwarded_signals_blocked(
                |errno| LaunchError::Sys {
                    step: "block signals",
                    errno,
                },
                |mask, _| run_member(&plan, &cfg, rank, &key, &env, mask),
            )
        });
    match result {
        Ok(outcome) => Ok(propagate(outcome)),
        Err(e) => {
            // The rank never ran: without a report the job's status would be the launcher's
            // teardown of the other ranks.
            if let Some(t) = Target::from_env() {
                t.send(rank, RankEnd::Exited(e.fault().status()), None);
            }
            Err(e)
        }
    }
}

fn run_member(
    plan: &LaunchPlan,
    cfg: &crate::container::InstanceConfig,
    rank: u32,
    key: &str,
    env: &BTreeMap<String, String>,
    mask: &SigSet,
) -> Result<Outcome, LaunchError> {
    let sigfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|errno| LaunchError::Sys {
            step: "signalfd",
            errno,
        })?;
    let dir = runtime_dir().map_err(LaunchError::Rendezvous)?;
    let mut inst = join_or_create(&dir, key, cfg).map_err(|e| match e {
        crate::container::InstanceError::Rendezvous(r) => LaunchError::Rendezvous(r),
        other => LaunchError::Instance(other),
    })?;
    if inst.created() {
        // What jobs killed on this node left (no front end runs here to remove it).
        super::front_end::remove_stale_instances("", key);
    }
    let host: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != REPORT_VAR)
        .collect();
    let target = Target::from_env();
    let (mut relay, wireup) = relayed(target.is_some(), launcher_env(env));
    let cmd = node::rank_command(plan, cfg, rank, host, inst.env_changes(), &wireup);
    let child = match inst.spawn(&cmd) {
        Ok(c) => c,
        Err(e) => {
            inst.close();
            return Err(LaunchError::Instance(e));
        }
    };
    inst.release_namespaces();
    if let Some(r) = &mut relay {
        r.started();
    }
    // Every signal this process gets is passed on to the rank; in between, the rank's memory map
    // shows whether it loaded the injected host libfabric.
    // The relay's commands and the ticks both reach the check.
    let maps = std::cell::RefCell::new(RankWatch::new(plan, rank, child));
    // Where PMI passes through this task, an MPI rank that never speaks it ran as a singleton.
    let singleton = std::cell::RefCell::new(
        relay
            .is_some()
            .then(|| SingletonWatch::new(1, std::time::Instant::now())),
    );
    let instance_gone = std::cell::Cell::new(false);
    let mut aborted = false;
    let watched = watch(
        child,
        &sigfd,
        relay.as_ref(),
        |code, message| {
            aborted = true;
            if let Some(t) = &target {
                t.send(rank, RankEnd::Aborted(code), message);
            }
        },
        |cmd| {
            if let Some(w) = maps.borrow_mut().as_mut() {
                w.pmi_command(cmd);
            }
            if let Some(s) = singleton.borrow_mut().as_mut() {
                s.spoke(0);
            }
        },
        || {
            // A node instance that ended while the rank runs was killed: its image and
            // container went with it, so the rank goes too (and the job is told why, below).
            if !instance_gone.get() && inst.ended() {
                instance_gone.set(true);
                // The rank leads a session of its own: all of it.
                if nix::sys::signal::killpg(child, nix::sys::signal::Signal::SIGKILL).is_err() {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let next = maps.borrow_mut().as_mut().and_then(RankWatch::tick);
            let now = std::time::Instant::now();
            let look = singleton.borrow_mut().as_mut().and_then(|s| {
                s.tick(now, |_| Some(child.as_raw()));
                s.next(|_| true).map(|t| t.saturating_duration_since(now))
            });
            let next = match (next, look) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Some(next.map_or(INSTANCE_WATCH, |n| n.min(INSTANCE_WATCH)))
        },
    );
    let mut maps = maps.into_inner();
    if let Some(w) = maps.as_mut().filter(|w| !w.failed()) {
        w.finish(!aborted && !watched.signalled && watched.outcome == Outcome::Exited(0));
    }
    let singleton = singleton
        .into_inner()
        .filter(|_| !aborted)
        .and_then(|s| s.singleton(0).map(str::to_owned));
    // A failed rank ends the job with its own status; the line says it never connected.
    let singleton = match (&singleton, watched.outcome) {
        (Some(library), Outcome::Exited(code)) if code != 0 => {
            write_out(Stream::Stderr, never_connected(rank, library).as_bytes());
            None
        }
        (Some(_), Outcome::Exited(0)) => singleton,
        _ => None,
    };
    if let Some(library) = &singleton {
        let end = JobEnd::Singleton {
            rank,
            library: library.clone(),
        };
        if let Some(msg) = end.message(plan.layout.size) {
            write_out(Stream::Stderr, format!("cmpirun: {msg}\n").as_bytes());
        }
    }
    let outcome = match &maps {
        Some(w) if w.failed() => Outcome::Exited(crate::exit::FAILURE),
        _ if singleton.is_some() => Outcome::Exited(crate::exit::FAILURE),
        _ => watched.outcome,
    };
    // Failed because an image mount ended (killed by the node instance for it, or failing on a
    // file that vanished before the instance said so): say so, whatever else ends.
    let lost = (outcome != Outcome::Exited(0) && !watched.signalled)
        .then(|| inst.mount_lost_within(MOUNT_LOST_WAIT))
        .flatten()
        .or_else(|| {
            (instance_gone.get() || (outcome != Outcome::Exited(0) && inst.ended())).then(|| {
                format!(
                    "the node instance of node {} ended while the rank ran (killed?); its image \
                     and container went with it; the job was ended",
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                        .unwrap_or_else(|| "?".into())
                )
            })
        });
    // The front end says it for the job; without one, this task does.
    if let Some(message) = lost.as_ref().filter(|_| target.is_none()) {
        tracing::error!("rank {rank}: {message}");
    }
    // A rank ended by the launcher's teardown (this task got its signal) did not fail itself.
    if let Some(t) = target.as_ref().filter(|_| !aborted && !watched.signalled) {
        let end = match (outcome, &lost) {
            (_, Some(_)) => RankEnd::MountLost,
            (_, None) if singleton.is_some() => RankEnd::Singleton,
            (Outcome::Exited(code), None) => RankEnd::Exited(code),
            (Outcome::Signaled(sig), None) => RankEnd::Signaled(sig as i32),
        };
        // A clean end is reported too: the front end counts the reports, so that ranks of a
        // lost node cannot pass for a success. It goes through the node instance, which
        // reports the node's clean ends at once as it ends (one connection to the front end
        // per node, not per rank); directly if the instance cannot be told.
        let through_instance =
            end == RankEnd::Exited(0) && cfg.clean_ends.is_some() && inst.clean_end(rank);
        if !through_instance {
            t.send(rank, end, lost.or_else(|| singleton.clone()));
        }
    }
    match outcome {
        // The rank that created the instance waits for it to end (its mounts go with it) once
        // every rank of the node is done.
        Outcome::Exited(0) => inst.close(),
        // A failed rank must not wait for its peers: srun and hydra end the job only when they
        // see this task exit. The instance ends by itself when the last rank leaves.
        _ => drop(inst),
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn rank_from_any_launcher() {
        assert_eq!(task_rank(&env(&[("PMI_RANK", "3")])), Some(3));
        assert_eq!(
            task_rank(&env(&[("PMIX_RANK", "2"), ("SLURM_PROCID", "5")])),
            Some(2)
        );
        assert_eq!(task_rank(&env(&[("SLURM_PROCID", "5")])), Some(5));
        assert_eq!(task_rank(&env(&[])), None);
    }

    #[test]
    fn world_size_from_the_launcher() {
        assert_eq!(world_size_mismatch(&env(&[("PMI_SIZE", "4")]), 4), None);
        assert_eq!(world_size_mismatch(&env(&[]), 4), None);
        assert_eq!(
            world_size_mismatch(&env(&[("SLURM_STEP_NUM_TASKS", "2")]), 4),
            Some(("SLURM_STEP_NUM_TASKS".into(), "2".into()))
        );
        // PMI_SIZE is what the rank's MPI is told; it wins.
        assert_eq!(
            world_size_mismatch(&env(&[("PMI_SIZE", "1"), ("SLURM_STEP_NUM_TASKS", "4")]), 4),
            Some(("PMI_SIZE".into(), "1".into()))
        );
    }

    #[test]
    fn keys() {
        let a = instance_key(&env(&[("SLURM_JOB_ID", "12"), ("SLURM_STEP_ID", "0")]), 7);
        assert_eq!(a, "slurm-12.0");
        assert_eq!(instance_key(&env(&[]), 7), "proxy-7");
        assert_ne!(instance_key(&env(&[]), 8), "proxy-7");
    }

    #[test]
    fn the_launchers_wireup_variables_pass() {
        let e = launcher_env(&env(&[
            ("PMIX_PTL_MODULE", "tcp"),
            ("PMI_FD", "5"),
            ("HOME", "/h"),
        ]));
        assert!(e.contains(&("PMIX_PTL_MODULE".into(), "tcp".into())));
        assert!(e.contains(&("PMI_FD".into(), "5".into())));
        assert!(!e.iter().any(|(k, _)| k == "HOME"));
    }
}
