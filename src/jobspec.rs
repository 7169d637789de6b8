//! What the user asked for on the command line, as plain data: the input of the launch plan.
//!
//! [`crate::cli`] turns an mpirun-style argv into a [`JobSpec`]; [`crate::plan`] combines it with
//! the site profile and the facts about the image and the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The largest job cmpirun plans (ranks over all parts): far above any machine, low enough that
/// a typo in `-n` cannot make the plan allocate gigabytes.
pub const MAX_RANKS: u32 = 1 << 22;

/// One launch request: the MPMD parts, where they run, and the options around them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The parts of the job, one per `:`-separated section of the command line, in rank order.
    pub apps: Vec<AppSpec>,
    /// Hosts named with `-H/--host` and `-f/--hostfile`, in order, with their slot counts.
    pub hosts: Vec<HostSlots>,
    /// The hostfile given with `-f/--hostfile/--machinefile`, if any (its hosts are in `hosts`).
    pub hostfile: Option<PathBuf>,
    /// Ranks per node (`-N`, `-ppn`, `--npernode`).
    pub ppn: Option<u32>,
    /// How consecutive ranks are spread over the nodes.
    pub mapping: Mapping,
    /// Environment settings that apply to every part (`-x`, `-genv`, `-genvlist`, `--mca`).
    pub env: Vec<EnvSetting>,
    /// Whether the caller's whole environment reaches the ranks (`-genvall`/`-genvnone`).
    pub env_all: EnvInherit,
    /// The working directory of every rank (`-wdir/--wdir`), unless a part names its own.
    pub wdir: Option<PathBuf>,
    /// How rank output is labelled.
    pub output_tag: OutputTag,
    /// End the job after this many seconds (`--timeout`).
    pub timeout_secs: Option<u64>,
    /// Verbosity (`-v` once per level).
    pub verbose: u8,
    /// `--profile NAME|PATH`.
    pub profile: Option<String>,
    /// `--launcher local|slurm|hydra`.
    pub launcher: Option<LauncherKind>,
    /// `--pmi pmi1|pmi2|pmix`.
    pub pmi: Option<PmiKind>,
    /// Extra binds (`--bind SRC[:DST[:ro|rw]]`).
    pub binds: Vec<BindSpec>,
    /// `--image-mount fuse|squashfuse|extract`.
    pub image_mount: Option<MountBackendKind>,
    /// `--dry-run [--json]`: print the plan instead of launching.
    pub dry_run: Option<DryRunFormat>,
    /// `--force`: launch even when a check fails.
    pub force: bool,
    /// `--no-inject`: use the image's own libfabric and PMI libraries.
    pub no_inject: bool,
    /// `--expect-provider NAME`: fail a rank that did not load the host libfabric with this
    /// provider.
    pub expect_provider: Option<String>,
    /// `--shm SIZE`: size limit of the node's private `/dev/shm` (a tmpfs `size=` value).
    pub shm_size: Option<String>,
    /// Messages about flags that were accepted but not acted on, for the user to see.
    pub warnings: Vec<String>,
}

impl JobSpec {
    /// The ranks asked for explicitly, summed over the parts; `None` if any part left `-n` out.
    pub fn explicit_ranks(&self) -> Option<u32> {
        self.apps.iter().map(|a| a.np).sum()
    }
}

/// One MPMD part: an image, a program inside it, and its own count and environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// The image (SIF, squashfs or directory) as given on the command line.
    pub image: PathBuf,
    /// The program to run inside the image.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// `-n/-np` for this part; `None` means "fill the slots".
    pub np: Option<u32>,
    /// Settings that apply to this part only (`-env`, and `-x` given after the first `:`).
    pub env: Vec<EnvSetting>,
    /// The working directory for this part, overriding the job's.
    pub wdir: Option<PathBuf>,
}

/// A host and how many ranks it takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSlots {
    /// The host name as given.
    pub name: String,
    /// Slots on it; `None` when the list did not say (counts as one slot).
    pub slots: Option<u32>,
}

/// One environment setting for the ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EnvSetting {
    /// Set `name` to `value`.
    Set {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Pass the caller's value of `name` through (if it has one).
    Pass {
        /// Variable name.
        name: String,
    },
}

impl EnvSetting {
    /// The variable this setting is about.
    pub fn name(&self) -> &str {
        match self {
            EnvSetting::Set { name, .. } | EnvSetting::Pass { name } => name,
        }
    }
}

/// Whether the caller's environment is inherited by the ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvInherit {
    /// The default: the caller's environment reaches the ranks, minus launcher variables that
    /// would confuse the ranks' MPI.
    #[default]
    All,
    /// `-genvnone`: only what `-x`/`-genv`, the image and the profile set.
    None,
}

/// How consecutive ranks are spread over nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mapping {
    /// Fill a node's slots before moving to the next one (mpirun's default).
    #[default]
    Block,
    /// One rank per node in turn (`--map-by node`, hydra's `-rr`).
    Cyclic,
}

/// How rank output lines are labelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputTag {
    /// Lines are forwarded as they are.
    #[default]
    None,
    /// `--tag-output`: `[1,RANK]<stdout>:` as Open MPI writes it.
    TagOutput,
    /// `-l`/`-prepend-rank`: `[RANK] ` as MPICH writes it.
    PrependRank,
}

/// The ways ranks can be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// One node, cmpirun's own PMI server.
    Local,
    /// `srun` inside a Slurm allocation.
    Slurm,
    /// MPICH's `mpiexec.hydra` over a host list.
    Hydra,
    /// Open MPI's `mpirun` (its own PMIx server) on this node or a host list.
    Mpirun,
}

impl LauncherKind {
    /// The name used on the command line and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            LauncherKind::Local => "local",
            LauncherKind::Slurm => "slurm",
            LauncherKind::Hydra => "hydra",
            LauncherKind::Mpirun => "mpirun",
        }
    }
}

/// The process-management interface the ranks' MPI speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PmiKind {
    /// PMI-1 (the "simple" wire protocol).
    Pmi1,
    /// PMI-2.
    Pmi2,
    /// PMIx (only through a launcher that hosts a PMIx server, such as `srun --mpi=pmix`).
    Pmix,
}

impl PmiKind {
    /// The name used on the command line, in profiles and by `srun --mpi=`.
    pub fn as_str(self) -> &'static str {
        match self {
            PmiKind::Pmi1 => "pmi1",
            PmiKind::Pmi2 => "pmi2",
            PmiKind::Pmix => "pmix",
        }
    }
}

/// How the image's squashfs is made visible (mirrors `cmpirun::mount::MountBackend`, plus the
/// automatic choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountBackendKind {
    /// Try the built-in FUSE server, then squashfuse, then extraction.
    Auto,
    /// The built-in FUSE server.
    Fuse,
    /// `squashfuse_ll`.
    Squashfuse,
    /// Extract once per node into a cache.
    Extract,
}

impl MountBackendKind {
    /// The name used on the command line and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            MountBackendKind::Auto => "auto",
            MountBackendKind::Fuse => "fuse",
            MountBackendKind::Squashfuse => "squashfuse",
            MountBackendKind::Extract => "extract",
        }
    }
}

/// A bind the user asked for with `--bind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindSpec {
    /// Host path.
    pub source: PathBuf,
    /// Path inside the container (defaults to `source`).
    pub destination: PathBuf,
    /// Mounted read-only (`:ro`); binds are read-write by default, as in Apptainer.
    pub read_only: bool,
}

/// The output form of `--dry-run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DryRunFormat {
    /// Human-readable, explaining each decision.
    Text,
    /// The `LaunchPlan` as JSON.
    Json,
    /// `--dry-run=job`: only the parsed command line (this `JobSpec`) as JSON, without reading
    /// profiles, images or the host.
    Job,
}
