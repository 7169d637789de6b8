//! The launch plan's types: [`LaunchPlan`] and its parts, as `--dry-run --json` prints them and
//! `cmpirun __rank` reads them back (`CMPIRUN_PLAN`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::layout::RankLayout;
use crate::facts::ImageSummary;
use crate::jobspec::{JobSpec, LauncherKind, MountBackendKind, PmiKind};

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

    /// Whether the launch may go ahead: no failed check, or `--force` and only failures it
    /// can get past ([`Check::force_helps`]).
    pub fn may_launch(&self) -> bool {
        self.failed_checks()
            .all(|c| self.job.force && c.force_helps())
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
    /// The providers its `fabric.providers` expects (ranks prove the use of a device
    /// provider by holding its device open).
    #[serde(default)]
    pub providers: Vec<String>,
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
    /// PMIx under the local launcher: the host libpmix files its PMIx server tries, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmix_libraries: Vec<String>,
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
    pub image: ImageSummary,
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
    /// Where each node keeps its copies of the images' MPI stacks (`ImageSummary::stack_files`)
    /// and of the other ELF files their ranks loaded, stacked over the image's own:
    /// `$CMPIRUN_LIBRARY_CACHE`, else
    /// `$XDG_CACHE_HOME/cmpirun/libraries`. `None`: off. Not used for an extracted image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_cache: Option<PathBuf>,
    /// Where the library cache setting comes from (`$CMPIRUN_LIBRARY_CACHE`, the profile, the
    /// default), or why there is none.
    #[serde(default)]
    pub library_cache_reason: String,
    /// Where each node keeps its own state (the rendezvous of its instance, the caches), as
    /// this host sees it: which may be a folder the nodes share and which must not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_state: Vec<NodeState>,
}

/// One place where each node keeps some of its state, as the planning host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// What is kept there (`rendezvous`, `library cache`, `extract cache`, `image facts`).
    pub what: String,
    /// The folder.
    pub path: PathBuf,
    /// The network filesystem the folder is on (a folder the nodes may share), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<String>,
    /// Why it is there, and whether the nodes may share it.
    pub why: String,
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
    /// Set when each rank starts to the value the launcher gives `variable`, if it gives that
    /// one and not this one (the rank mode applies it).
    FromLauncher {
        /// The launcher's variable.
        variable: String,
    },
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

impl Check {
    /// Whether `--force` can launch past this check's failure. Not when the job cannot start
    /// at all: an image that cannot be read, a launcher that is not installed, a bind whose
    /// source does not exist; `--force` is for compatibility checks that may be wrong.
    pub fn force_helps(&self) -> bool {
        !matches!(
            self.name.as_str(),
            "image" | "launcher-program" | "bind-source"
        )
    }
}
