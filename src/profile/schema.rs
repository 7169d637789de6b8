//! The YAML schema of one site profile file, exactly as written (before `extends:` is merged).
//!
//! Every struct denies unknown keys, and every value that has a shape (an absolute path, a glob,
//! a variable name) is checked while it is deserialized, so serde_yaml reports the field, line
//! and column of a bad value. The fields are documented for users in `docs/profiles.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::jobspec::{LauncherKind, MountBackendKind, PmiKind, VerifyPolicy};

/// One profile file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// The profile's name; `--profile NAME` and `extends: NAME` find it as `NAME.yaml`.
    pub name: ProfileName,
    /// One line for `cmpirun profile show`.
    #[serde(default)]
    pub description: Option<String>,
    /// When the profile applies without being named. A profile without `match` is only used
    /// when named (`--profile`, `$CMPIRUN_PROFILE`, `extends`).
    #[serde(default, rename = "match")]
    pub match_rules: Option<MatchRules>,
    /// A profile whose settings this one starts from.
    #[serde(default)]
    pub extends: Option<ProfileName>,
    /// How ranks are started.
    #[serde(default)]
    pub launcher: Option<LauncherSection>,
    /// The process-management interface.
    #[serde(default)]
    pub pmi: Option<PmiSection>,
    /// The host libfabric, its providers and devices.
    #[serde(default)]
    pub fabric: Option<FabricSection>,
    /// Extra binds into every container.
    #[serde(default)]
    pub binds: Vec<BindEntry>,
    /// Environment changes for every rank.
    #[serde(default)]
    pub env: Option<EnvSection>,
    /// How images are mounted.
    #[serde(default)]
    pub mount: Option<MountBackendKind>,
    /// Where nodes keep their copies of the images' MPI stacks (`off`: nowhere).
    #[serde(default)]
    pub library_cache: Option<LibraryCacheSetting>,
    /// Whether launched images must carry a valid signature.
    #[serde(default)]
    pub verify: Option<VerifyPolicy>,
    /// PEM public keys whose signatures `verify` accepts.
    #[serde(default)]
    pub verify_keys: Vec<HostPath>,
    /// Registries (`HOST[:PORT]`) of `oras://` images spoken to in plain HTTP, as `--insecure`.
    #[serde(default)]
    pub insecure_registries: Vec<RegistryHost>,
}

/// The `library_cache:` value: `off`, or an absolute directory (which may use `$VAR`s, such as
/// `/local/$USER/cmpirun-libraries`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum LibraryCacheSetting {
    /// No library cache.
    Off,
    /// This directory.
    Dir(HostPath),
}

impl TryFrom<String> for LibraryCacheSetting {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "off" {
            return Ok(LibraryCacheSetting::Off);
        }
        HostPath::try_from(s)
            .map(LibraryCacheSetting::Dir)
            .map_err(|e| format!("{e}; use off or an absolute directory"))
    }
}

// By a visitor rather than `try_from`: an error raised while the scalar is read carries the
// key and the line of the value.
impl<'de> Deserialize<'de> for LibraryCacheSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LibraryCacheSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("off or an absolute directory")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                LibraryCacheSetting::try_from(v.to_owned()).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl From<LibraryCacheSetting> for String {
    fn from(s: LibraryCacheSetting) -> String {
        match s {
            LibraryCacheSetting::Off => "off".into(),
            LibraryCacheSetting::Dir(p) => p.into(),
        }
    }
}

/// When a profile applies: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRules {
    /// Host name globs; at least one must match this host's name (if any are given).
    #[serde(default)]
    pub hostnames: Vec<GlobPattern>,
    /// Absolute paths or globs that must each name at least one existing file.
    #[serde(default)]
    pub files: Vec<HostPath>,
    /// Environment conditions: a glob the variable's value must match (`"*"`: set to anything),
    /// or `null`: the variable must not be set.
    #[serde(default)]
    pub env: BTreeMap<VarName, Option<GlobPattern>>,
    /// Which profile wins when several match: the highest weight. Defaults to the number of
    /// conditions (hostname list, files and env entries each count one).
    #[serde(default)]
    pub weight: Option<i32>,
}

impl MatchRules {
    /// The weight used to rank matching profiles.
    pub fn effective_weight(&self) -> i32 {
        self.weight.unwrap_or_else(|| {
            let n = usize::from(!self.hostnames.is_empty()) + self.files.len() + self.env.len();
            i32::try_from(n).unwrap_or(i32::MAX)
        })
    }
}

/// The `launcher:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherSection {
    /// `local`, `slurm`, `hydra`, or `auto` (decide from the environment).
    #[serde(default)]
    pub kind: Option<LauncherChoice>,
    /// Extra arguments for `srun`, placed before the task command.
    #[serde(default)]
    pub srun_args: Vec<String>,
    /// The `srun --mpi=` plugin, when it is not the PMI kind's name: `cray_shasta` for HPE
    /// Cray PMI (the ranks' MPI then uses the host's Cray PMI library, `pmi.host_libraries`).
    #[serde(default)]
    pub srun_mpi: Option<SrunMpiPlugin>,
    /// The hydra launcher program (name looked up on `PATH`, or an absolute path).
    #[serde(default)]
    pub mpiexec: Option<String>,
    /// Extra arguments for the hydra launcher.
    #[serde(default)]
    pub mpiexec_args: Vec<String>,
}

/// A launcher, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherChoice {
    /// Decide from the environment and the command line.
    Auto,
    /// One node, cmpirun's own PMI server.
    Local,
    /// `srun`.
    Slurm,
    /// `mpiexec.hydra`.
    Hydra,
    /// Open MPI's `mpirun`.
    Mpirun,
}

impl LauncherChoice {
    /// The fixed launcher, or `None` for `auto`.
    pub fn fixed(self) -> Option<LauncherKind> {
        match self {
            LauncherChoice::Auto => None,
            LauncherChoice::Local => Some(LauncherKind::Local),
            LauncherChoice::Slurm => Some(LauncherKind::Slurm),
            LauncherChoice::Hydra => Some(LauncherKind::Hydra),
            LauncherChoice::Mpirun => Some(LauncherKind::Mpirun),
        }
    }
}

/// The `pmi:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PmiSection {
    /// `pmi1`, `pmi2` or `pmix`.
    #[serde(default)]
    pub kind: Option<PmiKind>,
    /// Bind the host PMI libraries below over the image's copies.
    #[serde(default)]
    pub inject: Option<bool>,
    /// Host PMI libraries (`libpmi2.so.0`, `libpmix.so.2`, …), absolute paths or globs.
    #[serde(default)]
    pub host_libraries: Vec<HostPath>,
    /// Directories the PMIx server shares with its clients, bound at the same path. May use
    /// `$VAR`, expanded in each rank's environment when it starts (for `PMIX_SERVER_TMPDIR`).
    #[serde(default)]
    pub pmix_dirs: Vec<HostPath>,
}

/// The `fabric:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FabricSection {
    /// Bind the host libfabric over the image's (default true when `libfabric` is given).
    #[serde(default)]
    pub inject: Option<bool>,
    /// Where the host `libfabric.so.1` is: candidates tried in order, each an absolute path or a
    /// glob (the highest version-sorted match of a glob wins).
    #[serde(default)]
    pub libfabric: Vec<HostPath>,
    /// The host provider directory (DL providers `lib<prov>-fi.so`), bound at the same path and
    /// named in `FI_PROVIDER_PATH`.
    #[serde(default)]
    pub provider_dir: Option<HostPath>,
    /// Providers the host libfabric must offer (`cxi`, `efa`, `verbs`, …); a job that does not
    /// use one of them is an error, not a slow run.
    #[serde(default)]
    pub providers: Vec<ProviderName>,
    /// Jobs must use the host libfabric: an MPI rank that loads no libfabric at all (its MPI
    /// uses UCX, sockets or shared memory) ends the job, as with `--expect-provider`. Default
    /// false: such a rank only warns, since an image may rightly use another transport.
    #[serde(default)]
    pub required: Option<bool>,
    /// Device files or directories (globs) bound into every container.
    #[serde(default)]
    pub devices: Vec<HostPath>,
    /// Extra host libraries the fabric needs (`libcxi.so.1`, …), bound into the injection
    /// directory.
    #[serde(default)]
    pub libraries: Vec<HostPath>,
    /// Environment for the fabric (`FI_PROVIDER`, variables to pass through).
    #[serde(default)]
    pub env: Option<EnvSection>,
}

/// An environment section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSection {
    /// Variables to set.
    #[serde(default)]
    pub set: BTreeMap<VarName, String>,
    /// Globs of caller variables to pass through even under `-genvnone` (`SLINGSHOT_*`).
    #[serde(default)]
    pub pass: Vec<GlobPattern>,
    /// Variables to remove.
    #[serde(default)]
    pub unset: Vec<VarName>,
}

/// One extra bind.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BindEntry {
    /// Host path.
    pub source: HostPath,
    /// Path inside the container; defaults to `source`.
    #[serde(default)]
    pub destination: Option<HostPath>,
    /// Read-only (default false).
    #[serde(default)]
    pub read_only: bool,
    /// Skip silently when the source is missing (default false: a failed check).
    #[serde(default)]
    pub optional: bool,
}

/// A profile name: letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProfileName(String);

impl ProfileName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProfileName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(ProfileName(s))
        } else {
            Err(format!(
                "{s:?} is not a profile name (letters, digits, '-', '_' and '.')"
            ))
        }
    }
}

impl From<ProfileName> for String {
    fn from(n: ProfileName) -> String {
        n.0
    }
}

/// A registry's `HOST[:PORT]`, as in `oras://HOST[:PORT]/REPO:TAG`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegistryHost(String);

impl RegistryHost {
    /// The host as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegistryHost {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::image::oras::reference::check_host(&s)?;
        Ok(RegistryHost(s))
    }
}

impl From<RegistryHost> for String {
    fn from(h: RegistryHost) -> String {
        h.0
    }
}

/// An absolute host path, possibly a glob, possibly using `$VAR`/`${VAR}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPath(String);

impl HostPath {
    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !(s.starts_with('/') || s.starts_with('$')) {
            return Err(format!(
                "{s:?} is not an absolute path (start it with / or with a $VARIABLE)"
            ));
        }
        if s.contains('\0') {
            return Err(format!("{s:?} contains a NUL byte"));
        }
        glob::Pattern::new(&s).map_err(|e| format!("{s:?} is not a valid glob: {e}"))?;
        Ok(HostPath(s))
    }
}

impl From<HostPath> for String {
    fn from(p: HostPath) -> String {
        p.0
    }
}

/// A glob pattern over names or values (`nid*`, `pmix*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct GlobPattern(String);

impl GlobPattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` matches the pattern.
    pub fn matches(&self, text: &str) -> bool {
        glob::Pattern::new(&self.0)
            .map(|p| p.matches(text))
            .unwrap_or(false)
    }
}

impl TryFrom<String> for GlobPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        glob::Pattern::new(&s).map_err(|e| format!("{s:?} is not a valid glob: {e}"))?;
        Ok(GlobPattern(s))
    }
}

impl From<GlobPattern> for String {
    fn from(p: GlobPattern) -> String {
        p.0
    }
}

/// An environment variable name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct VarName(String);

impl VarName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VarName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut b = s.bytes();
        let ok = matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
            && b.all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if ok {
            Ok(VarName(s))
        } else {
            Err(format!(
                "{s:?} is not a variable name (letters, digits and _, not starting with a digit)"
            ))
        }
    }
}

impl From<VarName> for String {
    fn from(v: VarName) -> String {
        v.0
    }
}

/// A libfabric provider name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProviderName(String);

impl ProviderName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProviderName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Ok(ProviderName(s))
        } else {
            Err(format!(
                "{s:?} is not a libfabric provider name (cxi, efa, verbs, tcp, shm, …)"
            ))
        }
    }
}

impl From<ProviderName> for String {
    fn from(p: ProviderName) -> String {
        p.0
    }
}

/// The name of a Slurm MPI plugin (`pmi2`, `pmix_v4`, `cray_shasta`): letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct SrunMpiPlugin(String);

impl SrunMpiPlugin {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SrunMpiPlugin {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        ProviderName::try_from(s.clone())
            .map(|_| SrunMpiPlugin(s.clone()))
            .map_err(|_| {
                format!("{s:?} is not a Slurm MPI plugin name (pmi2, pmix, cray_shasta, …)")
            })
    }
}

impl From<SrunMpiPlugin> for String {
    fn from(p: SrunMpiPlugin) -> String {
        p.0
    }
}

macro_rules! as_ref_str {
    ($($t:ty),*) => {$(
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}

as_ref_str!(ProfileName, HostPath, GlobPattern, VarName, ProviderName);
