//! The launch plan: every decision of one launch, as a plain value.
//!
//! [`build`] combines what the user asked ([`JobSpec`]), what the site says ([`ProfileChoice`])
//! and what the images and the host offer ([`ImageSummary`], [`HostFacts`], gathered by
//! [`crate::facts`]) into a [`LaunchPlan`]: the launcher and its command lines, the rank layout,
//! every bind and every environment change with its reason, and every check with its verdict.
//! It reads no file, touches no namespace, reads no environment variable and spawns nothing, so
//! it is tested exhaustively; `--dry-run` prints it ([`dry_run_text`], or JSON) and the
//! launchers carry it out.
//!
//! One file per concern, in the order [`build`] takes the steps:
//!
//! - [`types`]: the plan's types, as they are serialised.
//! - [`launcher`]: which launcher and PMI, and the external launcher's command line.
//! - [`nodes`], [`layout`], [`parts`]: the nodes and their slots, where each rank runs, the
//!   MPMD parts and their ranks.
//! - [`checks`]: the checks that weigh the inputs against each other (profile and host, image
//!   and PMI, MPMD images, image and host libfabric).
//! - [`mount`]: the mount backend and the library cache.
//! - [`environment`]: the ranks' environment changes.
//! - [`binds`]: `--bind`, the profile's `binds:`, the PMIx directories.
//! - [`inject`]: the injection directory and the host PMI libraries.
//! - [`fabric`]: the host libfabric, its closure and providers, fabric devices.
//! - [`signatures`]: the launch-time signature policy and its check (added after [`build`], from
//!   verifications made on the front end).
//! - [`dry_run`]: the plan as text for people.
//! - [`encoding`]: the plan as the tasks of srun, hydra and mpirun get it (`CMPIRUN_PLAN`).

pub mod binds;
pub mod checks;
pub mod dry_run;
pub mod encoding;
pub mod environment;
pub mod fabric;
pub mod inject;
pub mod launcher;
pub mod layout;
pub mod mount;
pub mod nodes;
pub mod output_files;
pub mod parts;
pub mod signatures;
pub mod types;

pub use dry_run::{dry_run_text, layout_text, summary};
pub use inject::INJECT_DIR;
pub use launcher::{MPIRUN_NAMES, PLAN_FILE_PLACEHOLDER};
pub use layout::{NodeSlots, RankLayout, RankPlace};
pub use mount::library_cache_dir;
pub use output_files::{expand_pattern, srun_pattern};
pub use parts::image_apps;
pub use types::{
    AppPlan, Bind, BindKind, BindTime, Check, CommandLine, EnvAction, EnvChange, EnvScope,
    LaunchPlan, LauncherPlan, MountPlan, ProfileSummary, Verdict,
};

use crate::facts::{HostFacts, ImageSummary};
use crate::jobspec::{JobSpec, LauncherKind, MAX_RANKS};
use crate::profile::ProfileChoice;

/// Launch requests that cannot be planned. All are the user's to fix (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// An MPMD part without `-n`.
    #[error("part {part} has no -n; every part of an MPMD command line needs its own -n")]
    MpmdCountMissing {
        /// 1-based part number.
        part: usize,
    },
    /// A PMI the launcher cannot serve.
    #[error(
        "the {launcher} launcher cannot serve {pmi}: hydra serves PMI-1 and PMI-2, Open MPI's mpirun serves PMIx, srun and the local launcher serve all three; choose another --pmi or --launcher"
    )]
    PmiUnsupported {
        /// The PMI asked for.
        pmi: &'static str,
        /// The launcher chosen.
        launcher: &'static str,
    },
    /// Hosts other than this one without a way to reach them.
    #[error(
        "{origin} names {host}, which is not this host ({this}), and the local launcher runs on one node; install MPICH's mpiexec.hydra or use --launcher slurm inside an allocation"
    )]
    RemoteHostsNeedLauncher {
        /// `-H` or the hostfile.
        origin: String,
        /// The other host.
        host: String,
        /// This host's name.
        this: String,
    },
    /// `--launcher slurm` outside an allocation.
    #[error(
        "the slurm launcher needs an allocation: $SLURM_JOB_NODELIST is not set; run cmpirun inside salloc or sbatch"
    )]
    NoAllocation,
    /// A Slurm variable cmpirun could not read.
    #[error("{0}")]
    Slurm(#[from] layout::SlurmVarError),
    /// More ranks than cmpirun plans.
    #[error("{ranks} ranks in all: cmpirun plans at most {MAX_RANKS}; check -n")]
    TooManyRanks {
        /// The ranks asked for.
        ranks: u32,
    },
    /// A rankfile line names another host under the local launcher.
    #[error(
        "{path}:{line}: rank {rank} is placed on {host}, which is not this host ({this}), and the \
         local launcher runs on one node; name this host in the rankfile, or start the job with \
         --launcher hydra (with -H/-f) or inside a Slurm allocation"
    )]
    RankfileHost {
        /// The rankfile.
        path: std::path::PathBuf,
        /// The line.
        line: usize,
        /// The rank.
        rank: u32,
        /// The other host.
        host: String,
        /// This host's name.
        this: String,
    },
    /// `--launcher hydra` without hosts.
    #[error("the hydra launcher needs hosts: give -f HOSTFILE or -H HOSTS")]
    HydraWithoutHosts,
}

/// A request that cannot be planned is the user's to fix.
impl crate::exit::Blame for PlanError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::User
    }
}

/// Builds the plan of `spec` under the chosen profile, from the facts of its images (`images`:
/// one per part of `spec.apps`, in order) and of this host. Pure: everything it needs is in
/// its arguments.
pub fn build(
    spec: &JobSpec,
    choice: &ProfileChoice,
    images: &[ImageSummary],
    host: &HostFacts,
) -> Result<LaunchPlan, PlanError> {
    let profile = &choice.profile;
    let mut warnings = spec.warnings.clone();

    let mut launcher = launcher::choose(spec, profile, host, images)?;
    warnings.extend(launcher::unapplied_output_flags(spec, launcher.kind));
    warnings.extend(launcher::unapplied_binding(spec, launcher.kind));
    if launcher.kind == LauncherKind::Local {
        nodes::rankfile_hosts(spec, host)?;
    }
    let nodes = nodes::nodes(spec, launcher.kind, host, &mut warnings)?;
    // Without -n, an applied rankfile decides the job's size, as in Open MPI: its ranks.
    let rankfile_ranks = spec
        .binding
        .rankfile
        .as_ref()
        .filter(|_| launcher.kind == LauncherKind::Local)
        .and_then(|rf| rf.lines.iter().map(|l| l.rank.saturating_add(1)).max());
    let apps = parts::parts(spec, images, &nodes, rankfile_ranks)?;
    let size = parts::job_size(&apps);
    if launcher.kind == LauncherKind::Hydra && spec.output_files.rank_width(size) > 1 {
        warnings.push(
            "--output-filename: mpiexec.hydra names the folders rank.0, rank.1, …, without Open \
             MPI's zero padding (rank.00)"
                .to_owned(),
        );
    }
    let layout = RankLayout::place(size, &nodes, spec.mapping);

    let mut checks = vec![checks::profile_match_check(choice)];
    checks.extend(checks::image_checks(&apps, launcher.kind, launcher.pmi));
    checks.extend(launcher::program_check(&launcher, profile, host));
    checks.extend(launcher::pmix_server_check(&launcher, &apps, host));
    launcher.commands = launcher::commands(spec, profile, host, &launcher, &apps, size);
    let mount = mount::mount_plan(spec, profile, &host.env, &mut warnings);

    let mut plan = LaunchPlan {
        job: spec.clone(),
        profile: ProfileSummary {
            name: profile.name.clone(),
            file: profile.file.clone(),
            chain: profile.chain.clone(),
            reason: choice.reason.clone(),
            providers: profile
                .fabric
                .providers
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
        },
        launcher,
        apps,
        layout,
        mount,
        binds: Vec::new(),
        env: Vec::new(),
        checks,
        warnings,
    };
    environment::plan_environment(&mut plan, profile, host);
    binds::plan_binds(&mut plan, profile, host);
    inject::plan_pmi_libraries(&mut plan, profile, host);
    fabric::plan_fabric(&mut plan, choice, host);
    inject::inject_dir_on_library_path(&mut plan);
    Ok(plan)
}
