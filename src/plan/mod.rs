//! The launch plan: every decision of one launch, as a plain value.
//!
//! [`build_plan`] combines what the user asked ([`JobSpec`]), what the site says
//! ([`ProfileChoice`]) and what the image and host offer ([`ImageInfo`], [`HostFacts`]) into a
//! [`LaunchPlan`]: the launcher and its command lines, the rank layout, every bind and every
//! environment change with its reason, and every check with its verdict. It reads no file,
//! touches no namespace and spawns nothing, so it is tested exhaustively; `--dry-run` prints it
//! ([`render_text`], or JSON) and the launchers carry it out.

pub mod facts;
pub mod layout;
mod render;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use facts::{
    FactsCache, FactsCacheKey, HostFacts, HostLibfabric, ImageInfo, ImageLibrary, LibfabricUse,
};

use cmpirun_fabric::elf::SymbolVersion;
pub use layout::{NodeRanks, NodeSlots, RankLayout};
pub use render::render_text;

use crate::jobspec::{
    EnvInherit, EnvSetting, JobSpec, LauncherKind, MAX_RANKS, Mapping, MountBackendKind, PmiKind,
};
use crate::profile::{ProfileChoice, SelectedBy};

/// Where ranks find the libraries cmpirun injects by directory rather than over a file.
pub const INJECT_DIR: &str = "/.cmpirun/lib";

/// The placeholder in rank command lines for the path of the plan file the launcher writes.
pub const PLAN_FILE_PLACEHOLDER: &str = "{plan}";

/// Every decision of one launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPlan {
    /// What the user asked.
    pub job: JobSpec,
    /// The site profile used, and why.
    pub profile: ProfileSummary,
    /// How ranks are started.
    pub launcher: LauncherPlan,
    /// The parts of the job and their ranks.
    pub apps: Vec<AppPlan>,
    /// Where every rank runs.
    pub layout: RankLayout,
    /// How images are mounted on each node.
    pub mount: MountPlan,
    /// Binds into every node's container, beyond the standard ones (`/proc`, `/sys`, `/dev`,
    /// `/tmp`, home, working directory) that every container gets.
    pub binds: Vec<Bind>,
    /// Environment changes for the ranks, in the order they apply.
    pub env: Vec<EnvChange>,
    /// Compatibility and availability checks.
    pub checks: Vec<Check>,
    /// Things the user should know that do not stop the launch.
    pub warnings: Vec<String>,
}

impl LaunchPlan {
    /// The checks that stop a launch (failed ones), unless `--force` was given.
    pub fn failed_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.verdict == Verdict::Fail)
    }

    /// Whether the launch may go ahead: no failed check, or `--force`.
    pub fn may_launch(&self) -> bool {
        self.job.force || self.failed_checks().next().is_none()
    }
}

/// The profile a plan used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSummary {
    /// Its name.
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// The files merged into it (`extends:`), base first.
    pub chain: Vec<PathBuf>,
    /// Why it was chosen.
    pub reason: String,
}

/// The launcher and what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherPlan {
    /// Which launcher.
    pub kind: LauncherKind,
    /// Why this one.
    pub reason: String,
    /// The PMI the ranks speak.
    pub pmi: PmiKind,
    /// Why this one.
    pub pmi_reason: String,
    /// The commands cmpirun runs, in order (none for the local launcher, which starts the
    /// ranks itself).
    pub commands: Vec<CommandLine>,
}

/// One command line and why it looks as it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    /// Program and arguments. `{plan}` stands for the plan file the launcher writes.
    pub argv: Vec<String>,
    /// Why.
    pub why: String,
}

/// One MPMD part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPlan {
    /// The image.
    pub image: ImageInfo,
    /// The program inside it.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its first rank.
    pub first_rank: u32,
    /// Its number of ranks.
    pub ranks: u32,
    /// Its working directory inside the container, if not the caller's.
    pub wdir: Option<PathBuf>,
}

/// How images are mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// The backend.
    pub backend: MountBackendKind,
    /// Why.
    pub reason: String,
    /// Size limit of the node's private `/dev/shm` (`--shm`), if any.
    pub shm_size: Option<String>,
    /// Where each node keeps its copies of the images' MPI stacks (`ImageInfo::stack_files`),
    /// bound over the image's own: `$CMPIRUN_LIBRARY_CACHE`, else
    /// `$XDG_CACHE_HOME/cmpirun/libraries`. `None`: off. Not used for an extracted image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_cache: Option<PathBuf>,
    /// Where the library cache setting comes from (`$CMPIRUN_LIBRARY_CACHE`, the profile, the
    /// default), or why there is none.
    #[serde(default)]
    pub library_cache_reason: String,
}

/// When a bind's paths are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindTime {
    /// Now, on the host that plans the launch (the path exists on every node by the profile's
    /// word).
    Plan,
    /// When each rank starts: the source names `$VAR`s from the rank's environment (PMIx
    /// server directories).
    RankStart,
}

/// What a bind brings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindKind {
    /// A library bound over a file or into the injection directory.
    Library,
    /// A device file or directory.
    Device,
    /// A directory.
    Directory,
    /// Something the user or the site asked for.
    Path,
}

/// One bind into every node's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Host path (may contain `$VAR` when `when` is `rank-start`).
    pub source: String,
    /// Path inside the container.
    pub destination: String,
    /// What it is.
    pub kind: BindKind,
    /// Read-only.
    pub read_only: bool,
    /// When its paths are resolved.
    pub when: BindTime,
    /// Why it is there.
    pub reason: String,
    /// Only the container of this image gets the bind: a host library over the file that one
    /// image's MPI loads, in a job whose parts name different images. `None`: every image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

/// Which ranks an environment change applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "scope", content = "part")]
pub enum EnvScope {
    /// Every rank.
    All,
    /// The ranks of one MPMD part (0-based).
    Part(usize),
}

/// What happens to a variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum EnvAction {
    /// Set to a value.
    Set {
        /// The value.
        value: String,
    },
    /// Prepend a directory to a `:`-separated list.
    Prepend {
        /// The directory.
        value: String,
    },
    /// Pass the caller's value through.
    Pass,
    /// Pass every caller variable whose name matches the glob in `name`.
    PassMatching,
    /// Remove it.
    Unset,
    /// Remove every wire-up variable of a process manager (the PMI crate's `is_wireup_var`)
    /// whose name matches the glob in `name`; `OMPI_MCA_*` settings other than launch state stay.
    UnsetMatching,
    /// Set in each rank when it starts (by the launcher or cmpirun's PMI server).
    PerRank {
        /// What it is set to.
        value: String,
    },
    /// The caller's environment is not inherited.
    ClearInherited,
}

/// One environment change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvChange {
    /// The variable (or glob, for the `*-matching` actions; `*` for `clear-inherited`).
    pub name: String,
    /// What happens to it.
    #[serde(flatten)]
    pub action: EnvAction,
    /// Which ranks.
    #[serde(flatten)]
    pub scope: EnvScope,
    /// Why.
    pub reason: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Pass,
    /// Stops the launch unless `--force`.
    Fail,
    /// Worth knowing; does not stop the launch.
    Warn,
    /// Not run (the facts it needs are missing, or it does not apply).
    Skipped,
}

/// One check and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// A short stable name (`profile-match`, `launcher-program`, `host-libfabric`, …).
    pub name: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// What was found: the file, the version, and for a failure the fix.
    pub message: String,
}

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
        "{pmi} needs the slurm launcher (srun hosts the PMIx server); the {launcher} launcher serves PMI-1 and PMI-2 — use --pmi pmi2, or run inside a Slurm allocation"
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
    /// `--launcher hydra` without hosts.
    #[error("the hydra launcher needs hosts: give -f HOSTFILE or -H HOSTS")]
    HydraWithoutHosts,
}

/// Why [`prepare`] could not plan a launch. Both are the user's to fix (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// No usable profile.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// The request cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Plans `spec` on this host: chooses the profile (`--profile`, `$CMPIRUN_PROFILE`, match
/// rules), gathers the host's and the images' facts, and calls [`build_plan`]. This is the edge
/// where files are read and the host libfabric is probed; it mounts and starts nothing.
pub fn prepare(spec: &JobSpec) -> Result<LaunchPlan, PrepareError> {
    let search = crate::profile::ProfileSearch::from_env();
    let env_profile = std::env::var("CMPIRUN_PROFILE").ok();
    let mut ctx = crate::profile::MatchContext::from_host();
    let choice = crate::profile::choose(
        spec.profile.as_deref(),
        env_profile.as_deref(),
        &search,
        &mut ctx,
    )?;
    // Host facts first: the libfabric probe forks, which needs a single-threaded process. Images
    // are read in a child process: backhand's worker threads must not stay in this one, which
    // the local launcher forks the node instance and the ranks from.
    let host = HostFacts::gather(spec, &choice.profile);
    let paths: Vec<std::path::PathBuf> = spec.apps.iter().map(|a| a.image.clone()).collect();
    let images: Vec<ImageInfo> = crate::launch::isolate::gather_images(&paths);
    Ok(build_plan(spec, &choice, &images, &host)?)
}

/// Builds the plan. Pure: everything it needs is in its arguments.
///
/// `images` holds one [`ImageInfo`] per part of `spec.apps`, in order.
pub fn build_plan(
    spec: &JobSpec,
    choice: &ProfileChoice,
    images: &[ImageInfo],
    host: &HostFacts,
) -> Result<LaunchPlan, PlanError> {
    let profile = &choice.profile;
    let mut checks = Vec::new();
    let mut warnings = spec.warnings.clone();

    checks.push(profile_match_check(choice));

    // Launcher.
    let has_hosts = !spec.hosts.is_empty();
    let mpiexec = profile
        .launcher
        .mpiexec
        .clone()
        .unwrap_or_else(|| "mpiexec.hydra".into());
    let (kind, reason) = if let Some(k) = spec.launcher {
        (k, format!("--launcher {}", k.as_str()))
    } else if let Some(k) = profile.launcher.kind.and_then(|c| c.fixed()) {
        (
            k,
            format!(
                "profile {} sets launcher.kind: {}",
                profile.name,
                k.as_str()
            ),
        )
    } else if let Some(id) = host.env.get("SLURM_JOB_ID") {
        (
            LauncherKind::Slurm,
            format!("inside a Slurm allocation ($SLURM_JOB_ID={id})"),
        )
    } else if has_hosts && host.programs.contains_key(&mpiexec) {
        (
            LauncherKind::Hydra,
            format!("{} given and {mpiexec} is on PATH", host_origin(spec)),
        )
    } else {
        (
            LauncherKind::Local,
            if has_hosts {
                format!(
                    "{} names only this host and {mpiexec} is not on PATH",
                    host_origin(spec)
                )
            } else {
                "no allocation and no host list: one node".to_owned()
            },
        )
    };

    // PMI.
    let (pmi, pmi_reason) = if let Some(p) = spec.pmi {
        (p, format!("--pmi {}", p.as_str()))
    } else if let Some(p) = profile.pmi.kind {
        (
            p,
            format!("profile {} sets pmi.kind: {}", profile.name, p.as_str()),
        )
    } else {
        (PmiKind::Pmi2, "the default".to_owned())
    };
    if pmi == PmiKind::Pmix && kind != LauncherKind::Slurm {
        return Err(PlanError::PmiUnsupported {
            pmi: pmi.as_str(),
            launcher: kind.as_str(),
        });
    }

    // Nodes and layout.
    let nodes = match kind {
        LauncherKind::Local => {
            if let Some(other) = spec
                .hosts
                .iter()
                .find(|h| !is_this_host(&h.name, &host.hostname))
            {
                return Err(PlanError::RemoteHostsNeedLauncher {
                    origin: host_origin(spec),
                    host: other.name.clone(),
                    this: host.hostname.clone(),
                });
            }
            let slots = spec
                .ppn
                .or_else(|| {
                    let s = spec
                        .hosts
                        .iter()
                        .fold(0u32, |a, h| a.saturating_add(h.slots.unwrap_or(1)));
                    (s > 0).then_some(s)
                })
                .unwrap_or(host.cpus.max(1));
            vec![NodeSlots {
                name: host.hostname.clone(),
                slots,
            }]
        }
        LauncherKind::Hydra => {
            if !has_hosts {
                return Err(PlanError::HydraWithoutHosts);
            }
            merged_hosts(spec)
                .into_iter()
                .map(|h| NodeSlots {
                    slots: spec.ppn.unwrap_or(h.slots),
                    name: h.name,
                })
                .collect()
        }
        LauncherKind::Slurm => {
            let list = host
                .env
                .get("SLURM_JOB_NODELIST")
                .or_else(|| host.env.get("SLURM_NODELIST"))
                .ok_or(PlanError::NoAllocation)?;
            let names = layout::expand_nodelist(list)?;
            let tasks = match host.env.get("SLURM_TASKS_PER_NODE") {
                Some(t) => layout::expand_tasks_per_node(t)?,
                None => vec![1; names.len()],
            };
            if has_hosts {
                warnings.push(format!(
                    "{} is ignored under Slurm: srun places ranks on the allocation's nodes",
                    host_origin(spec)
                ));
            }
            names
                .into_iter()
                .enumerate()
                .map(|(i, name)| NodeSlots {
                    name,
                    slots: spec
                        .ppn
                        .unwrap_or_else(|| tasks.get(i).copied().unwrap_or(1))
                        .max(1),
                })
                .collect()
        }
    };
    let capacity = nodes
        .iter()
        .fold(0u32, |a, n| a.saturating_add(n.slots))
        .min(MAX_RANKS);
    let mut apps = Vec::with_capacity(spec.apps.len());
    let mut next = 0u32;
    for (i, app) in spec.apps.iter().enumerate() {
        let ranks = match app.np {
            Some(n) => n,
            None if spec.apps.len() == 1 => capacity.max(1),
            None => return Err(PlanError::MpmdCountMissing { part: i + 1 }),
        };
        let image = images.get(i).cloned().unwrap_or_else(|| ImageInfo {
            path: app.image.clone(),
            ..ImageInfo::default()
        });
        apps.push(AppPlan {
            image,
            program: app.program.clone(),
            args: app.args.clone(),
            first_rank: next,
            ranks,
            wdir: app.wdir.clone().or_else(|| spec.wdir.clone()),
        });
        next = next.saturating_add(ranks);
    }
    if next > MAX_RANKS {
        return Err(PlanError::TooManyRanks { ranks: next });
    }
    let size = next;
    let layout = RankLayout::place(size, &nodes, spec.mapping);

    for app in &apps {
        checks.push(image_check(&app.image));
        if let Some(c) = mpi_family_check(&app.image, kind, pmi) {
            checks.push(c);
        }
    }
    if let Some(c) = mpmd_images_check(&apps) {
        checks.push(c);
    }

    // Commands.
    let rank_cmd = [
        host.cmpirun.display().to_string(),
        "__rank".to_owned(),
        "--plan".to_owned(),
        PLAN_FILE_PLACEHOLDER.to_owned(),
    ];
    let mut commands = Vec::new();
    match kind {
        LauncherKind::Local => {}
        LauncherKind::Slurm => {
            checks.push(program_check("srun", host));
            let mut argv = vec![
                "srun".to_owned(),
                format!("--mpi={}", pmi.as_str()),
                "-n".to_owned(),
                size.to_string(),
            ];
            if let Some(p) = spec.ppn {
                argv.push(format!("--ntasks-per-node={p}"));
            }
            if spec.mapping == Mapping::Cyclic {
                argv.push("--distribution=cyclic".to_owned());
            }
            argv.push("--kill-on-bad-exit=1".to_owned());
            argv.extend(profile.launcher.srun_args.iter().cloned());
            argv.extend(rank_cmd.iter().cloned());
            commands.push(CommandLine {
                argv,
                why: format!(
                    "srun starts every rank (Slurm's {} server wires them up); each task is cmpirun in rank mode, which joins or creates its node's container and execs the rank; --kill-on-bad-exit ends the job when a rank fails, as mpirun does",
                    pmi.as_str()
                ),
            });
        }
        LauncherKind::Hydra => {
            checks.push(program_check(&mpiexec, host));
            let mut argv = vec![mpiexec.clone()];
            match &spec.hostfile {
                Some(f) => argv.extend(["-f".to_owned(), f.display().to_string()]),
                None => argv.extend(["-hosts".to_owned(), hydra_hosts(spec)]),
            }
            // An MPMD job is given to hydra as one section per part, so that hydra's PMI tells
            // each rank its part's number (MPI_APPNUM), as the local launcher does.
            let mpmd = apps.len() > 1;
            if !mpmd {
                argv.extend(["-n".to_owned(), size.to_string()]);
            }
            if let Some(p) = spec.ppn {
                argv.extend(["-ppn".to_owned(), p.to_string()]);
            }
            if spec.mapping == Mapping::Cyclic {
                argv.push("-rr".to_owned());
            }
            argv.extend(profile.launcher.mpiexec_args.iter().cloned());
            if mpmd {
                for (i, app) in apps.iter().enumerate() {
                    if i > 0 {
                        argv.push(":".to_owned());
                    }
                    argv.extend(["-n".to_owned(), app.ranks.to_string()]);
                    argv.extend(rank_cmd.iter().cloned());
                }
            } else {
                argv.extend(rank_cmd.iter().cloned());
            }
            commands.push(CommandLine {
                argv,
                why: format!(
                    "{mpiexec} starts every rank on the listed hosts and serves PMI{}; each rank is cmpirun in rank mode, which joins or creates its node's container and execs the rank",
                    if mpmd {
                        ", one section per MPMD part (its MPI_APPNUM)"
                    } else {
                        ""
                    }
                ),
            });
        }
    }

    // Mount.
    let (backend, mount_reason) = match (spec.image_mount, profile.mount) {
        (Some(b), _) => (b, format!("--image-mount {}", b.as_str())),
        (None, Some(b)) => (
            b,
            format!("profile {} sets mount: {}", profile.name, b.as_str()),
        ),
        (None, None) => (
            MountBackendKind::Auto,
            "the default: built-in FUSE, then squashfuse, then extraction".into(),
        ),
    };
    let (library_cache, library_cache_reason) = if backend == MountBackendKind::Extract {
        (
            None,
            "off: the image is extracted, its files are host files already".into(),
        )
    } else {
        library_cache_dir(profile, &host.env, &mut warnings)
    };
    let mount = MountPlan {
        backend,
        reason: mount_reason,
        shm_size: spec.shm_size.clone(),
        library_cache,
        library_cache_reason,
    };

    let mut plan = LaunchPlan {
        job: spec.clone(),
        profile: ProfileSummary {
            name: profile.name.clone(),
            file: profile.file.clone(),
            chain: profile.chain.clone(),
            reason: choice.reason.clone(),
        },
        launcher: LauncherPlan {
            kind,
            reason,
            pmi,
            pmi_reason,
            commands,
        },
        apps,
        layout,
        mount,
        binds: Vec::new(),
        env: Vec::new(),
        checks,
        warnings,
    };
    plan_environment(&mut plan, choice, host);
    plan_binds(&mut plan, choice, host);
    plan_fabric(&mut plan, choice, host);
    if plan
        .binds
        .iter()
        .any(|b| b.destination.starts_with(&format!("{INJECT_DIR}/")))
    {
        plan.env.push(env_change(
            "LD_LIBRARY_PATH",
            EnvAction::Prepend {
                value: INJECT_DIR.into(),
            },
            EnvScope::All,
            "the injected host libraries are found first by soname",
        ));
    }
    Ok(plan)
}

/// Where the nodes keep the library cache in environment `vars`, and why:
/// `$CMPIRUN_LIBRARY_CACHE` (the user's), else the profile's `library_cache` (the site's; a
/// `$VAR` in it that is unset is a warning and the default is used), else
/// `$XDG_CACHE_HOME/cmpirun/libraries`.
pub fn library_cache_dir(
    profile: &crate::profile::SiteProfile,
    vars: &std::collections::BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> (Option<PathBuf>, String) {
    use crate::mount::{LIBRARY_CACHE_ENV, default_library_cache_in, library_cache_setting};
    use crate::profile::LibraryCacheSetting;
    let from_env = vars.get(LIBRARY_CACHE_ENV).filter(|v| !v.is_empty());
    let default = |reason: String| match default_library_cache_in(|k| vars.get(k).cloned()) {
        Some(d) => (Some(d), reason),
        None => (None, "off: neither XDG_CACHE_HOME nor HOME is set".into()),
    };
    match (from_env, &profile.library_cache) {
        (Some(v), _) => {
            let dir = library_cache_setting(v);
            let reason = match &dir {
                Some(_) => format!("{LIBRARY_CACHE_ENV}={v}"),
                None => format!("off: {LIBRARY_CACHE_ENV}={v}"),
            };
            (dir, reason)
        }
        (None, Some(LibraryCacheSetting::Off)) => (
            None,
            format!("off: profile {} sets library_cache: off", profile.name),
        ),
        (None, Some(LibraryCacheSetting::Dir(p))) => {
            match crate::plan::facts::expand_vars(p.as_str(), vars) {
                Some(dir) => (
                    Some(PathBuf::from(dir)),
                    format!(
                        "profile {} sets library_cache: {}",
                        profile.name,
                        p.as_str()
                    ),
                ),
                None => {
                    warnings.push(format!(
                        "profile {}: library_cache {} names a variable that is not set; the \
                         library cache is in the user's cache folder instead",
                        profile.name,
                        p.as_str()
                    ));
                    default(format!(
                        "the default (profile {}'s {} could not be expanded)",
                        profile.name,
                        p.as_str()
                    ))
                }
            }
        }
        (None, None) => default("the default: the user's cache folder".into()),
    }
}

fn host_origin(spec: &JobSpec) -> String {
    match &spec.hostfile {
        Some(f) => format!("hostfile {}", f.display()),
        None => "-H".to_owned(),
    }
}

/// The hosts of `-H`/the hostfile, each once, in order of first appearance, with their slots
/// added up: Open MPI and hydra read `-H a,a,b` as two slots on `a`, not two nodes.
fn merged_hosts(spec: &JobSpec) -> Vec<NodeSlots> {
    let mut out: Vec<NodeSlots> = Vec::new();
    for h in &spec.hosts {
        let slots = h.slots.unwrap_or(1);
        match out.iter_mut().find(|n| n.name == h.name) {
            Some(n) => n.slots += slots,
            None => out.push(NodeSlots {
                name: h.name.clone(),
                slots,
            }),
        }
    }
    out
}

fn hydra_hosts(spec: &JobSpec) -> String {
    merged_hosts(spec)
        .iter()
        .map(|h| format!("{}:{}", h.name, h.slots))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a host name from `-H`/a hostfile means this machine.
fn is_this_host(name: &str, hostname: &str) -> bool {
    let short = |s: &str| s.split('.').next().unwrap_or(s).to_owned();
    name == "localhost" || name == "127.0.0.1" || name == hostname || short(name) == short(hostname)
}

fn profile_match_check(choice: &ProfileChoice) -> Check {
    let p = &choice.profile;
    let at = format!("{}:{}", p.file.display(), p.match_line.unwrap_or(1));
    match (&choice.outcome, choice.selected_by) {
        (_, SelectedBy::Match) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!("{}: {}", p.name, choice.reason),
        },
        (None, _) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!("{} has no match rules; used because it was named", p.name),
        },
        (Some(o), _) if o.matched => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!(
                "{at}: {} matches this host: {}",
                p.name,
                o.reasons.join("; ")
            ),
        },
        (Some(o), _) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{at}: profile {} was named but its match rules do not hold on this host: {}; name the profile that fits this host, or use --force",
                p.name,
                o.reasons.join("; ")
            ),
        },
    }
}

fn image_check(image: &ImageInfo) -> Check {
    match (&image.kind, &image.error) {
        (_, Some(e)) => Check {
            name: "image".into(),
            verdict: Verdict::Fail,
            message: e.to_string(),
        },
        (Some(k), None) => Check {
            name: "image".into(),
            verdict: Verdict::Pass,
            message: format!("{}: {k} image", image.path.display()),
        },
        (None, None) => Check {
            name: "image".into(),
            verdict: Verdict::Skipped,
            message: format!("{}: not inspected", image.path.display()),
        },
    }
}

/// Whether the image's MPI family suits the PMI the launch offers.
fn mpi_family_check(image: &ImageInfo, kind: LauncherKind, pmi: PmiKind) -> Option<Check> {
    let family = image.mpi_family.as_deref()?;
    let img = image.path.display();
    let lib = image.mpi_library.clone().unwrap_or_default();
    Some(if family == "openmpi" && pmi != PmiKind::Pmix {
        Check {
            name: "mpi-family".into(),
            verdict: Verdict::Warn,
            message: format!(
                "{img}: Open MPI ({lib}) with {} under the {} launcher: Open MPI 5 speaks only PMIx (run inside a Slurm allocation with --pmi pmix); Open MPI 4 needs its s1/s2 components built with Slurm's PMI libraries",
                pmi.as_str(),
                kind.as_str()
            ),
        }
    } else {
        Check {
            name: "mpi-family".into(),
            verdict: Verdict::Pass,
            message: format!("{img}: {family} ({lib}) with {}", pmi.as_str()),
        }
    })
}

/// The first part naming each different image, in the order the parts first name them: the
/// job's images (a node instance holds one root per image).
pub fn image_apps(apps: &[AppPlan]) -> Vec<&AppPlan> {
    let mut out: Vec<&AppPlan> = Vec::new();
    for a in apps {
        if !out.iter().any(|o| o.image.path == a.image.path) {
            out.push(a);
        }
    }
    out
}

/// How many different images the parts name.
fn distinct_images(apps: &[AppPlan]) -> usize {
    image_apps(apps).len()
}

/// Whether the images of an MPMD job can form one MPI job: the ranks of every part speak to
/// each other, so they need one MPI family (MPICH ABI, Open MPI, MPI ABI), and preferably one
/// build of it. `None` for a job with one image.
fn mpmd_images_check(apps: &[AppPlan]) -> Option<Check> {
    if distinct_images(apps) < 2 {
        return None;
    }
    let describe = |i: usize| {
        let img = &apps[i].image;
        format!(
            "part {} ({}: {}{})",
            i + 1,
            img.path.display(),
            img.mpi_family.as_deref().unwrap_or("MPI unknown"),
            img.mpi_library
                .as_deref()
                .map(|l| format!(", {l}"))
                .unwrap_or_default()
        )
    };
    let unknown: Vec<String> = (0..apps.len())
        .filter(|&i| apps[i].image.mpi_family.is_none())
        .map(&describe)
        .collect();
    let first = (0..apps.len()).find(|&i| apps[i].image.mpi_family.is_some());
    let differs = first.and_then(|f| {
        (0..apps.len())
            .find(|&i| {
                apps[i].image.mpi_family.is_some()
                    && apps[i].image.mpi_family != apps[f].image.mpi_family
            })
            .map(|i| (f, i))
    });
    if let Some((a, b)) = differs {
        return Some(Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{} and {} use different MPI families: the ranks of one job exchange messages through one MPI library's wire protocol, so MPI_Init would fail or hang; build every part's program against one MPI (the images may differ otherwise)",
                describe(a),
                describe(b)
            ),
        });
    }
    if !unknown.is_empty() {
        return Some(Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Warn,
            message: format!(
                "the MPI of {} is not known, so whether the parts' images use one MPI family is not checked",
                unknown.join(", ")
            ),
        });
    }
    let other_build = first.and_then(|f| {
        (0..apps.len())
            .find(|&i| apps[i].image.mpi_library != apps[f].image.mpi_library)
            .map(|i| (f, i))
    });
    Some(match other_build {
        Some((a, b)) => Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Warn,
            message: format!(
                "{} and {} use one MPI family but different library files: ranks of different versions or builds (devices, netmods) of one MPI may not interoperate; use images with the same MPI build if MPI_Init fails",
                describe(a),
                describe(b)
            ),
        },
        None => Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Pass,
            message: format!(
                "the parts' {} images use one MPI ({}); every node holds them in one container (one user namespace, one /dev/shm), each image in its own mount namespace",
                distinct_images(apps),
                apps[0].image.mpi_library.as_deref().unwrap_or("?")
            ),
        },
    })
}

fn program_check(name: &str, host: &HostFacts) -> Check {
    match host.programs.get(name) {
        Some(p) => Check {
            name: "launcher-program".into(),
            verdict: Verdict::Pass,
            message: format!("{name} is {}", p.display()),
        },
        None => Check {
            name: "launcher-program".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{name} is not on PATH; load the module that provides it, or choose another --launcher"
            ),
        },
    }
}

fn env_change(
    name: &str,
    action: EnvAction,
    scope: EnvScope,
    reason: impl Into<String>,
) -> EnvChange {
    EnvChange {
        name: name.to_owned(),
        action,
        scope,
        reason: reason.into(),
    }
}

fn plan_environment(plan: &mut LaunchPlan, choice: &ProfileChoice, host: &HostFacts) {
    let profile = &choice.profile;
    let pname = profile.name.clone();
    let spec = plan.job.clone();
    let env = &mut plan.env;
    if spec.env_all == EnvInherit::None {
        env.push(env_change(
            "*",
            EnvAction::ClearInherited,
            EnvScope::All,
            "-genvnone: the caller's environment is not inherited",
        ));
    }
    // Leftovers from an enclosing launcher would make the ranks' MPI talk to a PMI server that is
    // not theirs (or start as singletons); the launcher sets its own.
    let scrub_reason = match plan.launcher.kind {
        LauncherKind::Local => {
            "stray PMI variables from the caller would point the ranks' MPI at a server that is not theirs; cmpirun's PMI server sets its own"
        }
        LauncherKind::Slurm => {
            "removed before srun starts, so only the variables srun sets for this step reach the ranks"
        }
        LauncherKind::Hydra => {
            "removed before mpiexec starts, so only the variables hydra sets reach the ranks"
        }
    };
    // The launcher removes every wire-up variable of another process manager (the PMI crate's
    // rule); list the families actually present.
    for (prefix, glob) in [
        ("PMI_", "PMI_*"),
        ("PMI2_", "PMI2_*"),
        ("PMIX_", "PMIX_*"),
        ("PRTE_", "PRTE_*"),
        ("OMPI_", "OMPI_*"),
    ] {
        let present = host.env.keys().any(|k| {
            k.starts_with(prefix) && cmpirun_pmi::env::is_wireup_var(std::ffi::OsStr::new(k))
        });
        if present {
            let reason = if prefix == "OMPI_" {
                format!("{scrub_reason} (OMPI_MCA_* settings stay, except launch state)")
            } else {
                scrub_reason.to_owned()
            };
            env.push(env_change(
                glob,
                EnvAction::UnsetMatching,
                EnvScope::All,
                reason,
            ));
        }
    }
    match (plan.launcher.kind, plan.launcher.pmi) {
        (LauncherKind::Local, _) => {
            for (name, value) in [
                (
                    "PMI_FD",
                    "this rank's end of a socketpair to cmpirun's PMI server",
                ),
                ("PMI_RANK", "the rank"),
                ("PMI_SIZE", "the number of ranks"),
                ("PMI_JOBID", "the job id"),
            ] {
                env.push(env_change(
                    name,
                    EnvAction::PerRank {
                        value: value.into(),
                    },
                    EnvScope::All,
                    "cmpirun's PMI-1/PMI-2 server wires the ranks up over inherited socketpairs",
                ));
            }
            env.push(env_change(
                "PMI_process_mapping",
                EnvAction::Set {
                    value: plan.layout.process_mapping.clone(),
                },
                EnvScope::All,
                "served by cmpirun's PMI server so MPICH finds the ranks that share a node",
            ));
        }
        (_, PmiKind::Pmix) => {
            for (from, to) in [
                ("PMIX_PTL_MODULE", "PMIX_MCA_ptl"),
                ("PMIX_SECURITY_MODE", "PMIX_MCA_psec"),
                ("PMIX_GDS_MODULE", "PMIX_MCA_gds"),
            ] {
                env.push(env_change(
                    to,
                    EnvAction::PerRank {
                        value: format!("${from}, when set and {to} is not"),
                    },
                    EnvScope::All,
                    "newer PMIx clients read the server's module choice from PMIX_MCA_* (as enroot's PMIx hook does)",
                ));
            }
        }
        _ => {}
    }
    let mut push_section = |section: &crate::profile::EnvSection, what: &str| {
        for (k, v) in &section.set {
            env.push(env_change(
                k.as_str(),
                EnvAction::Set { value: v.clone() },
                EnvScope::All,
                format!("profile {pname} sets {what}.set"),
            ));
        }
        for g in &section.pass {
            env.push(env_change(
                g.as_str(),
                EnvAction::PassMatching,
                EnvScope::All,
                format!("profile {pname} passes {what}.pass"),
            ));
        }
        for u in &section.unset {
            env.push(env_change(
                u.as_str(),
                EnvAction::Unset,
                EnvScope::All,
                format!("profile {pname} unsets {what}.unset"),
            ));
        }
    };
    push_section(&profile.env, "env");
    if let Some(fenv) = &profile.fabric.env {
        push_section(fenv, "fabric.env");
    }
    for s in &spec.env {
        env.push(user_env(s, EnvScope::All));
    }
    for (i, app) in spec.apps.iter().enumerate() {
        for s in &app.env {
            env.push(user_env(s, EnvScope::Part(i)));
        }
    }
}

fn user_env(s: &EnvSetting, scope: EnvScope) -> EnvChange {
    let reason = match scope {
        EnvScope::All => "command line (-x, -genv, -genvlist, --mca)",
        EnvScope::Part(_) => "command line (-env, -envlist of this part)",
    };
    match s {
        EnvSetting::Set { name, value } => env_change(
            name,
            EnvAction::Set {
                value: value.clone(),
            },
            scope,
            reason,
        ),
        EnvSetting::Pass { name } => env_change(name, EnvAction::Pass, scope, reason),
    }
}

fn plan_binds(plan: &mut LaunchPlan, choice: &ProfileChoice, host: &HostFacts) {
    let profile = &choice.profile;
    for b in &plan.job.binds.clone() {
        let src = b.source.display().to_string();
        if host.paths.get(&src).is_some_and(|v| !v.is_empty()) {
            plan.binds.push(Bind {
                source: src,
                destination: b.destination.display().to_string(),
                kind: BindKind::Path,
                read_only: b.read_only,
                when: BindTime::Plan,
                reason: "--bind".into(),
                image: None,
            });
        } else {
            plan.checks.push(Check {
                name: "bind-source".into(),
                verdict: Verdict::Fail,
                message: format!(
                    "--bind {src}: no such file or directory on this host; fix the path"
                ),
            });
        }
    }
    for b in &profile.binds {
        let pattern = b.source.as_str();
        let found = host.paths.get(pattern).cloned().unwrap_or_default();
        if found.is_empty() {
            plan.checks.push(Check {
                name: "bind-source".into(),
                verdict: if b.optional { Verdict::Skipped } else { Verdict::Fail },
                message: if b.optional {
                    format!("{pattern}: not on this host; optional bind of profile {} skipped", profile.name)
                } else {
                    format!("{pattern}: not on this host, but profile {} ({}) binds it; fix binds: in the profile or mark it optional: true", profile.name, profile.file.display())
                },
            });
            continue;
        }
        let dest = b.destination.as_ref().map(|d| d.as_str().to_owned());
        for src in found {
            let s = src.display().to_string();
            plan.binds.push(Bind {
                destination: dest.clone().unwrap_or_else(|| s.clone()),
                source: s,
                kind: BindKind::Path,
                read_only: b.read_only,
                when: BindTime::Plan,
                reason: format!("profile {} binds:", profile.name),
                image: None,
            });
        }
    }
    if plan.launcher.pmi == PmiKind::Pmix {
        for d in &profile.pmi.pmix_dirs {
            plan.binds.push(Bind {
                source: d.as_str().to_owned(),
                destination: d.as_str().to_owned(),
                kind: BindKind::Directory,
                read_only: false,
                when: BindTime::RankStart,
                reason: "the PMIx server shares this directory with its clients (rendezvous files, shared-memory store); resolved in each rank's environment, skipped when unset".into(),
                image: None,
            });
        }
    }
    // Host PMI libraries.
    if profile.pmi.inject == Some(true) {
        if plan.job.no_inject {
            plan.checks.push(Check {
                name: "pmi-inject".into(),
                verdict: Verdict::Skipped,
                message: "--no-inject: the image's own PMI libraries are used".into(),
            });
        } else {
            for lib in &profile.pmi.host_libraries {
                match host.paths.get(lib.as_str()).and_then(|v| v.last()) {
                    Some(p) => {
                        let name = Path::new(lib.as_str())
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        // Over the image's copy when its MPI links one by this name; otherwise
                        // into the injection directory, found by soname.
                        // With several images, each gets the host library over its own copy only.
                        let multi = distinct_images(&plan.apps) > 1;
                        let mut over: Vec<(Option<PathBuf>, String)> = plan
                            .apps
                            .iter()
                            .flat_map(|a| {
                                a.image
                                    .pmi_libraries
                                    .iter()
                                    .map(move |l| (multi.then(|| a.image.path.clone()), l))
                            })
                            .filter(|(_, l)| l.name == name)
                            .map(|(i, l)| (i, l.real_file.clone()))
                            .collect();
                        over.sort();
                        over.dedup();
                        if over.is_empty() {
                            plan.binds.push(lib_bind(p, "the profile injects the host PMI library (pmi.inject)"));
                        }
                        for (image, dest) in over {
                            plan.binds.push(Bind {
                                source: p.display().to_string(),
                                destination: dest,
                                kind: BindKind::Library,
                                read_only: true,
                                when: BindTime::Plan,
                                reason: format!("the host PMI library over the image's {name} (pmi.inject)"),
                                image,
                            });
                        }
                    }
                    None => plan.checks.push(Check {
                        name: "pmi-inject".into(),
                        verdict: Verdict::Fail,
                        message: format!("{}: no such file on this host, but profile {} injects it (pmi.host_libraries); fix the path or set pmi.inject: false", lib.as_str(), profile.name),
                    }),
                }
            }
        }
    }
}

/// A library bound into the injection directory under its own file name.
fn lib_bind(src: &Path, reason: &str) -> Bind {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Bind {
        source: src.display().to_string(),
        destination: format!("{INJECT_DIR}/{name}"),
        kind: BindKind::Library,
        read_only: true,
        when: BindTime::Plan,
        reason: reason.to_owned(),
        image: None,
    }
}

/// The host libfabric a profile names on this host: the first `fabric.libfabric` candidate that
/// names a file; within a glob, the highest version.
pub(crate) fn chosen_libfabric<'a>(
    profile: &'a crate::profile::SiteProfile,
    host: &HostFacts,
) -> Option<(&'a crate::profile::HostPath, PathBuf)> {
    profile.fabric.libfabric.iter().find_map(|c| {
        host.paths
            .get(c.as_str())
            .and_then(|v| v.last())
            .map(|p| (c, p.clone()))
    })
}

fn parse_versions<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<SymbolVersion> {
    v.into_iter()
        .filter_map(|s| SymbolVersion::parse(s))
        .collect()
}

/// The checks between one image and the host libfabric injected into it: the MPI loads
/// libfabric dynamically, the host library defines every `FABRIC_x.y` the MPI needs, and the
/// image's glibc defines every `GLIBC_x.y` the host library and its dependencies need.
fn compatibility_checks(
    plan: &mut LaunchPlan,
    image: &ImageInfo,
    host_lib: &Path,
    facts: Option<&facts::HostLibfabric>,
) {
    let img = image.path.display().to_string();
    let Some(usage) = image.libfabric_use else {
        plan.checks.push(Check {
            name: "mpi-libfabric".into(),
            verdict: Verdict::Skipped,
            message: match &image.facts_error {
                Some(e) => format!("{img}: image facts not read: {e}"),
                None => format!("{img}: no MPI library found in the image"),
            },
        });
        return;
    };
    let mpi = image.mpi_library.clone().unwrap_or_default();
    let (verdict, message) = match usage {
        LibfabricUse::Dynamic => (
            Verdict::Pass,
            format!(
                "{img}: {mpi} loads libfabric.so.1 dynamically ({})",
                image
                    .libfabric
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        LibfabricUse::Embedded => (
            Verdict::Fail,
            format!(
                "{img}: {mpi} carries libfabric inside itself, so a host libfabric cannot be injected; build the image's MPI against an external libfabric (MPICH: --with-libfabric=PREFIX), or use --no-inject"
            ),
        ),
        LibfabricUse::Unresolved => (
            Verdict::Warn,
            format!(
                "{img}: {mpi} needs libfabric.so.1 but the image's loader does not find it; the host copy is put on LD_LIBRARY_PATH"
            ),
        ),
        LibfabricUse::NotLinked => (
            Verdict::Warn,
            format!(
                "{img}: {mpi} does not use libfabric; injecting {} has no effect",
                host_lib.display()
            ),
        ),
    };
    plan.checks.push(Check {
        name: "mpi-libfabric".into(),
        verdict,
        message,
    });
    let Some(lf) = facts else {
        plan.checks.push(Check {
            name: "fabric-versions".into(),
            verdict: Verdict::Skipped,
            message: format!("{}: not read", host_lib.display()),
        });
        return;
    };
    if usage == LibfabricUse::Dynamic || usage == LibfabricUse::Unresolved {
        let defined: std::collections::BTreeSet<SymbolVersion> =
            parse_versions(&lf.fabric_versions).into_iter().collect();
        let needed = parse_versions(&image.fabric_needs);
        let missing = cmpirun_fabric::elf::missing_versions(&needed, &defined);
        let newest = defined
            .iter()
            .next_back()
            .map(ToString::to_string)
            .unwrap_or_else(|| "no FABRIC version".into());
        plan.checks.push(if missing.is_empty() {
            Check {
                name: "fabric-versions".into(),
                verdict: Verdict::Pass,
                message: format!("{} defines every FABRIC version {img}'s MPI needs (up to {newest})", host_lib.display()),
            }
        } else {
            let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
            Check {
                name: "fabric-versions".into(),
                verdict: Verdict::Fail,
                message: format!("{} (libfabric defining up to {newest}) lacks {} that {img}'s MPI ({mpi}) needs; point fabric.libfabric at a newer libfabric, or use --no-inject", host_lib.display(), names.join(", ")),
            }
        });
    }
    match (
        lf.glibc_needs.as_deref().and_then(SymbolVersion::parse),
        image.glibc.as_deref().and_then(SymbolVersion::parse),
    ) {
        (Some(need), Some(have)) => {
            let by = lf
                .glibc_needed_by
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| host_lib.display().to_string());
            plan.checks.push(if need <= have {
                Check {
                    name: "glibc".into(),
                    verdict: Verdict::Pass,
                    message: format!("{img} has {have}; the injected libraries need at most {need} ({by})"),
                }
            } else {
                Check {
                    name: "glibc".into(),
                    verdict: Verdict::Fail,
                    message: format!("{by} needs {need} but {img} has {have} ({}); use a host libfabric built for an older glibc, an image with a glibc of at least {need}, or --no-inject", image.glibc_file.clone().unwrap_or_default()),
                }
            });
        }
        (Some(need), None) => plan.checks.push(Check {
            name: "glibc".into(),
            verdict: Verdict::Warn,
            message: format!(
                "the injected libraries need {need}, but {img}'s glibc version is not known"
            ),
        }),
        (None, _) => {}
    }
}

fn plan_fabric(plan: &mut LaunchPlan, choice: &ProfileChoice, host: &HostFacts) {
    let profile = &choice.profile;
    let fabric = &profile.fabric;
    if fabric.libfabric.is_empty() && fabric.devices.is_empty() && fabric.libraries.is_empty() {
        plan.checks.push(Check {
            name: "host-libfabric".into(),
            verdict: Verdict::Skipped,
            message: format!(
                "profile {} names no host libfabric: the image's own libfabric is used",
                profile.name
            ),
        });
        push_expect_check(plan, choice, host.libfabric.as_ref());
        return;
    }
    if plan.job.no_inject || fabric.inject == Some(false) {
        plan.checks.push(Check {
            name: "host-libfabric".into(),
            verdict: Verdict::Skipped,
            message: if plan.job.no_inject {
                "--no-inject: the image's own libfabric is used".into()
            } else {
                format!("profile {} sets fabric.inject: false", profile.name)
            },
        });
        push_expect_check(plan, choice, host.libfabric.as_ref());
        return;
    }
    match (chosen_libfabric(profile, host), fabric.libfabric.is_empty()) {
        (Some((pattern, path)), _) => {
            let defines = host
                .libfabric
                .as_ref()
                .and_then(|l| l.fabric_versions.last())
                .map(|v| format!(", defines up to {v}"))
                .unwrap_or_default();
            plan.checks.push(Check {
                name: "host-libfabric".into(),
                verdict: Verdict::Pass,
                message: format!("{} (from {}){defines}", path.display(), pattern.as_str()),
            });
            if let Some(e) = &host.libfabric_error {
                plan.checks.push(Check {
                    name: "host-libfabric-facts".into(),
                    verdict: Verdict::Fail,
                    message: format!("{e}; fix fabric.libfabric in {}", profile.file.display()),
                });
            }
            for i in 0..plan.apps.len() {
                let image = plan.apps[i].image.clone();
                compatibility_checks(plan, &image, &path, host.libfabric.as_ref());
            }
            let targets: Vec<&ImageInfo> = plan.apps.iter().map(|a| &a.image).collect();
            let known: Vec<PathBuf> = targets.iter().filter_map(|i| i.libfabric.clone()).collect();
            // With several images, each is decided on its own: the host library over the file
            // its MPI loads, only in its own root; or, where that file is not known, into the
            // injection directory of that root.
            let multi = distinct_images(&plan.apps) > 1;
            let over_bind = |image: Option<PathBuf>, dest: &Path| {
                Bind {
                source: path.display().to_string(),
                destination: dest.display().to_string(),
                kind: BindKind::Library,
                read_only: true,
                when: BindTime::Plan,
                reason: "the host libfabric over the exact file the image's MPI loads, so RPATH, RUNPATH and the image's ld.so.cache all find it".into(),
                image,
            }
            };
            let unknown_target = |img: &str| Check {
                name: "libfabric-target".into(),
                verdict: Verdict::Warn,
                message: format!(
                    "where {img}'s MPI loads libfabric from is not known, so {} goes into {INJECT_DIR} on LD_LIBRARY_PATH; an RPATH in the image's MPI would still win",
                    path.display()
                ),
            };
            if multi {
                let mut seen: Vec<PathBuf> = Vec::new();
                for i in &targets {
                    if seen.contains(&i.path) {
                        continue;
                    }
                    seen.push(i.path.clone());
                    match &i.libfabric {
                        Some(dest) => plan.binds.push(over_bind(Some(i.path.clone()), dest)),
                        None => {
                            let mut b = lib_bind(
                                &path,
                                "the host libfabric, found through LD_LIBRARY_PATH",
                            );
                            b.image = Some(i.path.clone());
                            plan.binds.push(b);
                            plan.checks
                                .push(unknown_target(&i.path.display().to_string()));
                        }
                    }
                }
            } else if known.len() == targets.len() && !known.is_empty() {
                let mut seen = Vec::new();
                for dest in known {
                    if seen.contains(&dest) {
                        continue;
                    }
                    plan.binds.push(over_bind(None, &dest));
                    seen.push(dest);
                }
            } else {
                plan.binds.push(lib_bind(
                    &path,
                    "the host libfabric, found through LD_LIBRARY_PATH",
                ));
                plan.checks.push(unknown_target("the image"));
            }
            if let Some(lf) = &host.libfabric {
                for dep in &lf.dependencies {
                    plan.binds.push(lib_bind(
                        dep,
                        "needed by the host libfabric or its providers (dependency closure, glibc left to the image)",
                    ));
                }
                if fabric.provider_dir.is_none() && !lf.plugin_dirs.is_empty() {
                    let dirs: Vec<String> = lf
                        .plugin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect();
                    for d in &dirs {
                        plan.binds.push(Bind {
                            source: d.clone(),
                            destination: d.clone(),
                            kind: BindKind::Directory,
                            read_only: true,
                            when: BindTime::Plan,
                            reason: "the host libfabric's provider plugins, built against it"
                                .into(),
                            image: None,
                        });
                    }
                    plan.env.push(env_change(
                        "FI_PROVIDER_PATH",
                        EnvAction::Set {
                            value: dirs.join(":"),
                        },
                        EnvScope::All,
                        "libfabric loads the host's DL providers from here instead of the image's",
                    ));
                }
            }
        }
        (None, false) => {
            let expanded: Vec<String> = fabric
                .libfabric
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect();
            plan.checks.push(Check {
                name: "host-libfabric".into(),
                verdict: Verdict::Fail,
                message: format!("no host libfabric at {} (profile {}, fabric.libfabric in {}); fix the path, or use --no-inject to run on the image's libfabric", expanded.join(", "), profile.name, profile.file.display()),
            });
        }
        (None, true) => {}
    }
    if let Some(dir) = &fabric.provider_dir {
        match host.paths.get(dir.as_str()).and_then(|v| v.last()) {
            Some(d) => {
                let d = d.display().to_string();
                plan.binds.push(Bind {
                    source: d.clone(),
                    destination: d.clone(),
                    kind: BindKind::Directory,
                    read_only: true,
                    when: BindTime::Plan,
                    reason: "the host libfabric's provider plugins, built against it".into(),
                    image: None,
                });
                plan.env.push(env_change("FI_PROVIDER_PATH", EnvAction::Set { value: d }, EnvScope::All, "libfabric loads the host's DL providers from here instead of the image's"));
            }
            None => plan.checks.push(Check {
                name: "provider-dir".into(),
                verdict: Verdict::Fail,
                message: format!("{}: no such directory on this host (profile {}, fabric.provider_dir); fix the path", dir.as_str(), profile.name),
            }),
        }
    }
    for lib in &fabric.libraries {
        match host.paths.get(lib.as_str()).and_then(|v| v.last()) {
            Some(p) => {
                plan.binds.push(lib_bind(
                    p,
                    "a library the host libfabric needs (fabric.libraries)",
                ));
            }
            None => plan.checks.push(Check {
                name: "fabric-library".into(),
                verdict: Verdict::Warn,
                message: format!(
                    "{}: not on this host (profile {}, fabric.libraries); skipped",
                    lib.as_str(),
                    profile.name
                ),
            }),
        }
    }
    for dev in &fabric.devices {
        let found = host.paths.get(dev.as_str()).cloned().unwrap_or_default();
        if found.is_empty() {
            plan.checks.push(Check {
                name: "fabric-device".into(),
                verdict: Verdict::Warn,
                message: format!("{}: no such device on this host (profile {}, fabric.devices); the fabric may fall back to a slower path", dev.as_str(), profile.name),
            });
        }
        for d in found {
            let d = d.display().to_string();
            plan.binds.push(Bind {
                source: d.clone(),
                destination: d,
                kind: BindKind::Device,
                read_only: false,
                when: BindTime::Plan,
                reason: format!(
                    "fabric device (profile {}, fabric.devices {})",
                    profile.name,
                    dev.as_str()
                ),
                image: None,
            });
        }
    }
    push_expect_check(plan, choice, host.libfabric.as_ref());
}

fn push_expect_check(
    plan: &mut LaunchPlan,
    choice: &ProfileChoice,
    host_libfabric: Option<&facts::HostLibfabric>,
) {
    let fabric = &choice.profile.fabric;
    let mut expected: Vec<String> = fabric
        .providers
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    if let Some(p) = &plan.job.expect_provider
        && !expected.contains(p)
    {
        expected.push(p.clone());
    }
    if expected.is_empty() {
        return;
    }
    if let Some((lf, providers)) =
        host_libfabric.and_then(|lf| lf.providers.as_ref().map(|ps| (lf, ps)))
    {
        let version = lf.version.clone().unwrap_or_else(|| "?".into());
        for p in expected {
            let ok = providers.contains(&p);
            plan.checks.push(Check {
                name: "fabric-providers".into(),
                verdict: if ok { Verdict::Pass } else { Verdict::Fail },
                message: if ok {
                    format!("{} (libfabric {version}) offers provider {p}", lf.path.display())
                } else {
                    format!("{} (libfabric {version}) does not offer provider {p} on this node (it offers {}); check the devices and the provider installation, or drop the expectation", lf.path.display(), providers.join(", "))
                },
            });
        }
        return;
    }
    if let Some(e) = host_libfabric.and_then(|lf| lf.probe_error.as_ref()) {
        plan.checks.push(Check {
            name: "fabric-providers".into(),
            verdict: Verdict::Warn,
            message: format!(
                "expected providers {}: {e}; checked in each rank after start",
                expected.join(", ")
            ),
        });
        return;
    }
    plan.checks.push(Check {
        name: "fabric-providers".into(),
        verdict: Verdict::Skipped,
        message: format!("expected providers {}: checked on the host libfabric once it is probed, and in each rank after start", expected.join(", ")),
    });
}
