//! Carrying a [`LaunchPlan`] out: start the ranks, serve or pass PMI, forward output and
//! signals, and end with the status mpirun users expect (`docs/exit-status.md`).
//!
//! The launchers differ only in how ranks get started and where PMI comes from; the node
//! instance and the rank's command and environment are the same code under all of them
//! ([`node`]).
//!
//! - [`local`]: one node; cmpirun starts the instance and the ranks and serves PMI itself.
//! - [`front_end`]: the job's front end when `srun` or `mpiexec.hydra` starts the ranks (each
//!   as `cmpirun __rank`): runs the launcher, gathers the ranks' reports, ends as mpirun would.
//! - [`rank`]: the rank mode: join or create the node's instance, exec the rank.
//! - [`injected`]: the check, after start, that each rank loaded the injected host libfabric.
//! - [`report`], [`watch`]: how the rank mode sees its rank end (relaying its PMI connection to
//!   see an abort) and reports it to the front end, so that srun and hydra jobs end with the
//!   local launcher's statuses.
//! - [`settings`]: what a user may change through the environment (`CMPIRUN_KILL_GRACE`).
//! - [`status`], [`output`], [`rank_env`]: the pure parts (exit status, output lines, a rank's
//!   environment).

pub mod front_end;
pub mod injected;
pub mod local;
pub mod node;
pub mod output;
pub mod rank;
pub mod rank_env;
pub mod report;
pub mod settings;
pub mod status;
pub mod watch;

use nix::errno::Errno;

use crate::container::InstanceError;
use crate::jobspec::LauncherKind;
use crate::plan::LaunchPlan;

/// Errors that stop a launch before or while the ranks start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Bad input the user can fix.
    #[error("{0}")]
    Usage(String),
    /// Something on this host failed.
    #[error("{0}")]
    Failed(String),
    /// The node instance failed.
    #[error(transparent)]
    Instance(InstanceError),
    /// The node instance cannot be configured.
    #[error(transparent)]
    Config(#[from] crate::container::config::ConfigError),
    /// The node's limits do not let the job start.
    #[error("the job needs {need} {what} on this node, but the limit is {limit}: {fix}")]
    Limit {
        /// What is limited.
        what: String,
        /// How many the job needs.
        need: u64,
        /// The limit.
        limit: u64,
        /// What to do.
        fix: String,
    },
    /// A bind of the plan cannot be made.
    #[error(transparent)]
    Bind(#[from] crate::container::root::BindSpecError),
    /// The PMI server failed.
    #[error("PMI server: {0}")]
    Pmi(cmpirun_pmi::PmiError),
    /// A system call failed.
    #[error("{step}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// The error.
        errno: Errno,
    },
    /// An I/O operation failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl LaunchError {
    /// Whether the user can fix this (exit status 2).
    pub fn is_usage(&self) -> bool {
        match self {
            LaunchError::Usage(_) | LaunchError::Bind(_) | LaunchError::Limit { .. } => true,
            LaunchError::Instance(e) => e.is_usage(),
            LaunchError::Config(e) => e.is_usage(),
            _ => false,
        }
    }

    fn from_instance(e: InstanceError) -> LaunchError {
        LaunchError::Instance(e)
    }
}

/// Runs the job `plan` describes and returns cmpirun's exit status. Must be called while
/// cmpirun is single-threaded.
pub fn launch(plan: &LaunchPlan) -> Result<i32, LaunchError> {
    match plan.launcher.kind {
        LauncherKind::Local => Ok(local::run(plan)?.exit_code()),
        LauncherKind::Slurm | LauncherKind::Hydra => front_end::run(plan),
    }
}
