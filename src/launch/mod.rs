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

pub mod binding;
pub mod front_end;
pub mod injected;
pub mod local;
pub mod node;
pub mod output;
pub mod pmix;
pub mod rank;
pub mod rank_env;
pub mod report;
pub mod settings;
pub mod singleton;
pub mod status;
pub mod watch;

use nix::errno::Errno;

use crate::container::InstanceError;
use crate::container::instance::MAX_IMAGES;
use crate::container::rendezvous::RendezvousError;
use crate::exit::{Blame, Fault};
use crate::jobspec::LauncherKind;
use crate::plan::LaunchPlan;

/// Errors that stop a launch before or while the ranks start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The plan has no program to run.
    #[error("the job has no program")]
    NoProgram,
    /// The job's parts name more images than one node instance holds.
    #[error(
        "the job's parts name {n} different images; a node runs at most {MAX_IMAGES}: put \
         programs that share an image into one image"
    )]
    TooManyImages {
        /// How many images the parts name.
        n: usize,
    },
    /// The rank mode's plan variable is not set.
    #[error(
        "__rank --plan {plan}: ${var} is not set (the rank mode is started by cmpirun through \
         srun or mpiexec, which pass it)"
    )]
    PlanVarUnset {
        /// The `--plan` value.
        plan: String,
        /// The variable it names.
        var: String,
    },
    /// The rank mode's plan file cannot be read.
    #[error("__rank --plan {plan}: {error}")]
    PlanUnreadable {
        /// The `--plan` value.
        plan: String,
        /// The error (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The rank mode's plan is not a launch plan.
    #[error("__rank --plan {plan}: not a launch plan: {error}")]
    NotAPlan {
        /// The `--plan` value.
        plan: String,
        /// The error (part of the message, so not also a `source`).
        error: serde_json::Error,
    },
    /// The rank mode's plan is not in the encoded form this cmpirun reads.
    #[error("__rank --plan {plan}: not a launch plan: {message}")]
    PlanFormat {
        /// The `--plan` value.
        plan: String,
        /// What is wrong.
        message: String,
    },
    /// The rank mode does not know its rank.
    #[error(
        "__rank: no PMI_RANK, OMPI_COMM_WORLD_RANK, PMIX_RANK or SLURM_PROCID: the rank mode runs \
         under srun or mpiexec"
    )]
    NoRank,
    /// The launcher gave the rank mode another world size than the job's.
    #[error(
        "__rank: the launcher started this rank in a world of {value} ranks (${var}), but the \
         job has {size} (-n): its ranks would not form the job's world; remove the task count \
         from the profile's launcher arguments (srun_args, mpiexec_args)"
    )]
    WorldSize {
        /// The variable that gave it.
        var: String,
        /// Its value.
        value: String,
        /// The job's size.
        size: u32,
    },
    /// The launcher (`srun`, `mpiexec.hydra`) cannot be started.
    #[error("cannot run {program}: {error} (is it installed and on PATH?)")]
    LauncherMissing {
        /// The launcher program.
        program: String,
        /// The error (part of the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The plan is too large for the one environment variable srun and hydra carry it in.
    #[error(
        "the launch plan of this job ({ranks} ranks on {nodes} nodes) is {bytes} bytes, more \
         than the {limit} bytes one environment variable may hold on Linux (MAX_ARG_STRLEN); \
         srun and hydra pass it to every task in CMPIRUN_PLAN, and its size grows with the \
         nodes' names (numbered names compress best): run on fewer nodes per job (see \
         docs/scale.md)"
    )]
    PlanTooLarge {
        /// The plan's size in the environment (`CMPIRUN_PLAN=…`).
        bytes: usize,
        /// The limit.
        limit: usize,
        /// The job's ranks.
        ranks: u32,
        /// The job's nodes.
        nodes: usize,
    },
    /// The plan has no command for its launcher (a plan cmpirun did not build).
    #[error("the plan has no launcher command for this launcher")]
    NoLauncherCommand,
    /// The plan cannot be written for the ranks.
    #[error("cannot serialise the plan: {0}")]
    SerialisePlan(serde_json::Error),
    /// The local launcher was called from a threaded process (a bug of cmpirun's).
    #[error(
        "internal error: threads {names:?} before the node instance was created (it must be \
         created by a single-threaded process)"
    )]
    Threaded {
        /// The names of the threads found.
        names: Vec<String>,
    },
    /// The node instance failed.
    #[error(transparent)]
    Instance(InstanceError),
    /// The rank mode's node instance cannot be found or created through its rendezvous files
    /// (its key is cmpirun's own, the job step's).
    #[error(transparent)]
    Rendezvous(RendezvousError),
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
    /// An image of the plan pulled from a registry cannot be had on this node.
    #[error(transparent)]
    Registry(#[from] crate::image::oras::OrasError),
    /// The PMI server failed.
    #[error("PMI server: {0}")]
    Pmi(cmpirun_pmi::PmiError),
    /// The PMIx server process failed.
    #[error(transparent)]
    Pmix(pmix::PmixError),
    /// A system call failed.
    #[error("{step}: {errno}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The ranks cannot be bound to CPUs as asked.
    #[error(transparent)]
    Binding(#[from] binding::BindingError),
    /// A rank's output file (`-outfile-pattern`, `--output-filename`) cannot be made.
    #[error("cannot create the output file {path}: {source}")]
    OutputFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
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

/// The user's to fix: the job's programs and images, the plan the rank mode is given, the
/// launcher to install, a bind of theirs, and what the node instance or its configuration says
/// is theirs. The rank mode's rendezvous is the host's: its key is cmpirun's.
impl Blame for LaunchError {
    fn fault(&self) -> Fault {
        match self {
            LaunchError::NoProgram
            | LaunchError::TooManyImages { .. }
            | LaunchError::PlanVarUnset { .. }
            | LaunchError::PlanUnreadable { .. }
            | LaunchError::NotAPlan { .. }
            | LaunchError::PlanFormat { .. }
            | LaunchError::NoRank
            | LaunchError::WorldSize { .. }
            | LaunchError::LauncherMissing { .. }
            | LaunchError::PlanTooLarge { .. }
            | LaunchError::Limit { .. }
            | LaunchError::OutputFile { .. }
            | LaunchError::Bind(_) => Fault::User,
            LaunchError::Instance(e) => e.fault(),
            LaunchError::Config(e) => e.fault(),
            LaunchError::Registry(e) => e.fault(),
            LaunchError::Binding(e) => e.fault(),
            LaunchError::NoLauncherCommand
            | LaunchError::SerialisePlan(_)
            | LaunchError::Threaded { .. }
            | LaunchError::Rendezvous(_)
            | LaunchError::Pmi(_)
            | LaunchError::Pmix(_)
            | LaunchError::Sys { .. }
            | LaunchError::Io { .. } => Fault::Host,
        }
    }
}

impl LaunchError {
    fn from_instance(e: InstanceError) -> LaunchError {
        LaunchError::Instance(e)
    }
}

/// Runs the job `plan` describes and returns cmpirun's exit status. Must be called while
/// cmpirun is single-threaded.
pub fn launch(plan: &LaunchPlan) -> Result<i32, LaunchError> {
    match plan.launcher.kind {
        LauncherKind::Local => Ok(local::run(plan)?.exit_code()),
        LauncherKind::Slurm | LauncherKind::Hydra | LauncherKind::Mpirun => front_end::run(plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whose_errors() {
        assert_eq!(LaunchError::NoProgram.fault(), Fault::User);
        assert_eq!(LaunchError::NoRank.fault(), Fault::User);
        // The rank mode's key is cmpirun's own: even a bad one is not the user's to fix.
        let bad_key = RendezvousError::BadKey("x/y".into());
        assert_eq!(LaunchError::Rendezvous(bad_key).fault(), Fault::Host);
        let root = InstanceError::Root("bind source /x does not exist on the host".into());
        assert_eq!(LaunchError::Instance(root).fault(), Fault::User);
        let setup = InstanceError::Setup("mount /x: EPERM".into());
        assert_eq!(LaunchError::Instance(setup).fault(), Fault::Host);
        assert_eq!(LaunchError::Threaded { names: vec![] }.fault(), Fault::Host);
    }

    #[test]
    fn messages_name_what_to_do() {
        assert_eq!(
            LaunchError::TooManyImages { n: 17 }.to_string(),
            "the job's parts name 17 different images; a node runs at most 16: put programs \
             that share an image into one image"
        );
        assert_eq!(
            LaunchError::PlanVarUnset {
                plan: "env:CMPIRUN_PLAN".into(),
                var: "CMPIRUN_PLAN".into()
            }
            .to_string(),
            "__rank --plan env:CMPIRUN_PLAN: $CMPIRUN_PLAN is not set (the rank mode is started \
             by cmpirun through srun or mpiexec, which pass it)"
        );
    }
}
