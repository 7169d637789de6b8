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
    /// `--insecure`: speak plain HTTP to the registry of an `oras://` image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// `--expect-provider NAME`: fail a rank that did not load the host libfabric with this
    /// provider.
    pub expect_provider: Option<String>,
    /// `--shm SIZE`: size limit of the node's private `/dev/shm` (a tmpfs `size=` value).
    pub shm_size: Option<String>,
    /// `--verify require|warn|off`: whether the images must carry a valid signature.
    pub verify: Option<VerifyPolicy>,
    /// `--verify-key PEM`: public keys whose signatures a launch accepts (with the profile's).
    pub verify_keys: Vec<PathBuf>,
    /// Per-rank output files (`-outfile-pattern`, `-errfile-pattern`, `--output-filename`).
    #[serde(default)]
    pub output_files: OutputFiles,
    /// `--merge-stderr-to-stdout`: each rank's standard error goes where its standard output
    /// goes, in one stream.
    #[serde(default)]
    pub merge_stderr: bool,
    /// `--timestamp-output`: each output line starts with the time cmpirun read it.
    #[serde(default)]
    pub timestamp_output: bool,
    /// `-print-all-exitcodes`: print how every rank ended once the job is over.
    #[serde(default)]
    pub print_all_exitcodes: bool,
    /// `--display-map`: print the rank layout before the ranks start.
    #[serde(default)]
    pub display_map: bool,
    /// `-bootstrap`/`-launcher ssh|rsh`: hydra's way of reaching the hosts, passed on to it.
    #[serde(default)]
    pub hydra_bootstrap: Option<String>,
    /// CPU binding of the ranks (`--bind-to`, `--cpus-per-rank`, `--report-bindings`).
    #[serde(default)]
    pub binding: BindingSpec,
    /// Messages about flags that were accepted but not acted on, for the user to see.
    pub warnings: Vec<String>,
}

/// How the ranks are bound to CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingSpec {
    /// `--bind-to`: what each rank is bound to; `None`: not asked (ranks are not bound, unless
    /// `cpus_per_rank` asks for cores).
    pub to: Option<BindTo>,
    /// `--cpus-per-rank N`, `--map-by …:PE=N`: cores (hardware threads with `--bind-to
    /// hwthread`) per rank.
    pub cpus_per_rank: Option<u32>,
    /// `--report-bindings`: print the CPUs each rank got.
    pub report: bool,
    /// `--bind-to OBJ:overload-allowed`: more ranks than cores (or hardware threads) share
    /// them, several per core, instead of being refused (as Open MPI, where `--oversubscribe`
    /// alone does not allow it).
    #[serde(default)]
    pub overload: bool,
    /// hydra's `-bind-to user:0+2,1+4,3`: the CPU sets ranks take in turn (rank `r` gets set
    /// `r % len`), with [`BindTo::User`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<Vec<usize>>,
    /// `--rankfile FILE` (Open MPI): each rank's host and slots; applied as CPU binding by the
    /// local launcher, in place of `to`.
    #[serde(default)]
    pub rankfile: Option<Rankfile>,
}

/// An Open MPI rankfile (`rank N=HOST slot=SPEC` lines), as read from its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rankfile {
    /// The file, as named on the command line.
    pub path: PathBuf,
    /// Its lines, in file order.
    pub lines: Vec<RankfileLine>,
}

/// One line of an Open MPI rankfile: `rank N=HOST slot=SPEC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankfileLine {
    /// The line's number in the file (from 1).
    pub line: usize,
    /// The rank.
    pub rank: u32,
    /// The host it runs on.
    pub host: String,
    /// The slot list as written: `S:C` items (socket `S`, cores `C` of it: `0`, `0-2`, `0,2`,
    /// `*`) or core lists (`1-2`), separated by `;`.
    pub slot: String,
}

impl BindingSpec {
    /// What the ranks are bound to: `--bind-to`, else cores when `--cpus-per-rank` is given (as
    /// Open MPI's `PE=n`), else nothing.
    pub fn effective(&self) -> BindTo {
        match (self.to, self.cpus_per_rank) {
            (Some(to), _) => to,
            (None, Some(_)) => BindTo::Core,
            (None, None) => BindTo::None,
        }
    }

    /// Whether anything about binding was asked.
    pub fn asked(&self) -> bool {
        self.to.is_some() || self.cpus_per_rank.is_some() || self.report || self.rankfile.is_some()
    }
}

/// One item of a rankfile's slot list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotItem {
    /// `S:C`: cores `C` of socket `S` (logical numbers, counted among the CPUs the job may
    /// use); `None` for `S:*`, the whole socket.
    SocketCores {
        /// The socket.
        socket: usize,
        /// The cores of that socket.
        cores: Option<Vec<usize>>,
    },
    /// `C`: cores of the node (logical numbers).
    Cores(Vec<usize>),
}

impl RankfileLine {
    /// The slot list as items: `;`-separated `S:C` or `C`, where `C` is `N`, `N-M`, a
    /// comma-separated list of those, or (after `S:`) `*`. The error says what is wrong.
    pub fn slots(&self) -> Result<Vec<SlotItem>, String> {
        self.slot
            .split(';')
            .map(|item| match item.split_once(':') {
                Some((socket, cores)) => Ok(SlotItem::SocketCores {
                    socket: socket
                        .trim()
                        .parse()
                        .map_err(|_| format!("the socket {socket:?} is not a number"))?,
                    cores: if cores.trim() == "*" {
                        None
                    } else {
                        Some(number_list(cores)?)
                    },
                }),
                None => Ok(SlotItem::Cores(number_list(item)?)),
            })
            .collect()
    }
}

/// `0`, `0-2`, `0,2,4-5`: a list of numbers with ranges, in the order written.
pub fn number_list(text: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{text:?} is not a list of numbers such as 0, 0-2 or 0,2");
    let mut out = Vec::new();
    for word in text.split(',') {
        let word = word.trim();
        match word.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().map_err(|_| bad())?;
                let b: usize = b.parse().map_err(|_| bad())?;
                if b < a || b - a > 65535 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(word.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// What a rank is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindTo {
    /// Not bound: every CPU the job may use.
    None,
    /// Hardware threads (`cpus_per_rank` of them).
    Hwthread,
    /// Cores, with all their hardware threads (`cpus_per_rank` of them).
    Core,
    /// The package (socket) of its cores.
    Socket,
    /// The NUMA node of its cores.
    Numa,
    /// The L1 cache of its cores (hydra's `l1cache`, `l1dcache`, ...).
    L1cache,
    /// The L2 cache of its cores.
    L2cache,
    /// The L3 cache of its cores (hydra's `l4cache` and `l5cache` too: the largest cache level
    /// cmpirun binds to).
    L3cache,
    /// Every CPU of the node the job may use (hydra's `machine`, Open MPI's `board`).
    Machine,
    /// One CPU per rank in the kernel's numbering, round-robin (hydra's `rr`).
    Rr,
    /// The CPU sets of hydra's `user:0+2,1+4` ([`BindingSpec::user`]).
    User,
}

impl BindTo {
    /// The name used on the command line (`--bind-to NAME`) and by hydra's `-bind-to`.
    pub fn as_str(self) -> &'static str {
        match self {
            BindTo::None => "none",
            BindTo::Hwthread => "hwthread",
            BindTo::Core => "core",
            BindTo::Socket => "socket",
            BindTo::Numa => "numa",
            BindTo::L1cache => "l1cache",
            BindTo::L2cache => "l2cache",
            BindTo::L3cache => "l3cache",
            BindTo::Machine => "machine",
            BindTo::Rr => "rr",
            BindTo::User => "user",
        }
    }
}

/// Where each rank's output goes besides cmpirun's own standard output and error: hydra-style
/// file name patterns (`%r` rank, `%h` host, `%p` node index, `%g` 0, `%%` a `%`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFiles {
    /// The file of each rank's standard output (`-outfile-pattern`).
    pub stdout: Option<String>,
    /// The file of each rank's standard error (`-errfile-pattern`).
    pub stderr: Option<String>,
    /// `%r` zero-padded to as many digits as the job's size has (`rank.07` in a job of 12
    /// ranks), as Open MPI 4.1 names the folders of `--output-filename`.
    #[serde(default)]
    pub pad_rank: bool,
}

impl OutputFiles {
    /// Whether any stream goes to a file.
    pub fn any(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// How many digits `%r` takes in a job of `size` ranks: the digits of `size` with
    /// [`Self::pad_rank`], else none (as many as the rank has).
    pub fn rank_width(&self, size: u32) -> usize {
        if self.pad_rank {
            size.to_string().len()
        } else {
            0
        }
    }
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
    /// The image (SIF, squashfs or directory, or an `oras://` reference) as given on the command
    /// line.
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

/// Whether a launch requires signed images (`--verify`, the profile's `verify:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyPolicy {
    /// Refuse an image that verified signatures by the given keys do not cover.
    Require,
    /// Launch it, with a warning.
    Warn,
    /// Do not check signatures.
    Off,
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
