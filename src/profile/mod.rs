//! Site profiles: what a cluster offers (launcher, PMI, host libfabric, devices, binds, env),
//! written once per site in YAML and chosen per launch.
//!
//! Choosing a profile: `--profile NAME|PATH`, else `$CMPIRUN_PROFILE`, else the profile whose
//! `match:` rules hold on this host with the highest weight, among the profiles in the search
//! directories ([`ProfileSearch`]). `extends:` chains are merged base first. Every error names
//! the file, and where serde_yaml knows it, the field, line and column. The format is documented
//! field by field in `docs/profiles.md`.

pub mod schema;
pub mod show;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use schema::{
    BindEntry, EnvSection, FabricSection, GlobPattern, HostPath, LauncherChoice, LauncherSection,
    LibraryCacheSetting, MatchRules, PmiSection, ProfileFile, ProfileName, ProviderName,
    RegistryHost, VarName,
};

use crate::jobspec::{MountBackendKind, VerifyPolicy};

/// A site profile with its `extends:` chain merged: the settings one launch uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SiteProfile {
    /// The profile's name.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// The file it was read from.
    pub file: PathBuf,
    /// The files merged into it, base first, ending with `file`.
    pub chain: Vec<PathBuf>,
    /// The profile's own match rules (not inherited).
    pub match_rules: Option<MatchRules>,
    /// The 1-based line of the `match:` key in `file`, for messages.
    pub match_line: Option<usize>,
    /// Launcher settings.
    pub launcher: LauncherSection,
    /// PMI settings.
    pub pmi: PmiSection,
    /// Fabric settings.
    pub fabric: FabricSection,
    /// Extra binds.
    pub binds: Vec<BindEntry>,
    /// Extra environment.
    pub env: EnvSection,
    /// Image mount backend.
    pub mount: Option<MountBackendKind>,
    /// Where nodes keep their copies of the images' MPI stacks.
    pub library_cache: Option<LibraryCacheSetting>,
    /// Whether launched images must carry a valid signature.
    pub verify: Option<VerifyPolicy>,
    /// PEM public keys whose signatures `verify` accepts.
    pub verify_keys: Vec<HostPath>,
    /// Registries of `oras://` images spoken to in plain HTTP.
    pub insecure_registries: Vec<RegistryHost>,
}

/// Errors from finding, reading, merging and choosing profiles. All are the user's (or the
/// site's) to fix; the binary exits 2 for them.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A profile named with `--profile`, `$CMPIRUN_PROFILE` or `extends:` does not exist.
    #[error("{origin}: profile {name:?} not found; looked for {name}.yaml in {searched}")]
    NotFound {
        /// Where the name came from (`--profile`, `$CMPIRUN_PROFILE`, `FILE:LINE: extends`).
        origin: String,
        /// The name.
        name: String,
        /// The directories searched.
        searched: String,
    },
    /// A profile file that cannot be read.
    #[error("{}: cannot read the profile: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A YAML syntax error, an unknown key, a bad type or a bad value. The message comes from
    /// serde_yaml and names the field, line and column.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its field and location.
        message: String,
    },
    /// An `extends:` chain that comes back to a profile already in it.
    #[error("{}:{line}: extends {name:?} makes a cycle: {chain}", path.display())]
    ExtendsCycle {
        /// The file whose `extends` closes the cycle.
        path: PathBuf,
        /// The line of its `extends:` key.
        line: usize,
        /// The name it extends.
        name: String,
        /// The chain of names.
        chain: String,
    },
    /// No profile's `match:` rules hold on this host.
    #[error(
        "no site profile matches this host ({host}); searched {searched}; name one with --profile or $CMPIRUN_PROFILE"
    )]
    NoMatch {
        /// A summary of this host (name).
        host: String,
        /// The directories searched.
        searched: String,
    },
    /// Several profiles match with the same, highest weight.
    #[error(
        "profiles {first} ({}:{first_line}) and {second} ({}:{second_line}) both match this host with weight {weight}; give one a higher match.weight or name one with --profile",
        first_file.display(),
        second_file.display()
    )]
    Ambiguous {
        /// One profile.
        first: String,
        /// Its file.
        first_file: PathBuf,
        /// The line of its `match:` key.
        first_line: usize,
        /// The other.
        second: String,
        /// Its file.
        second_file: PathBuf,
        /// The line of its `match:` key.
        second_line: usize,
        /// The shared weight.
        weight: i32,
    },
}

/// A profile that cannot be found, read or chosen is the user's (or the site's) to fix.
impl crate::exit::Blame for ProfileError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::User
    }
}

/// The directories profiles are looked for in, in order; earlier directories shadow later ones
/// (a site's `generic.yaml` replaces the shipped one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileSearch {
    /// The directories, in order. Directories that do not exist are skipped.
    pub dirs: Vec<PathBuf>,
}

impl ProfileSearch {
    /// The search path of this process: `$CMPIRUN_PROFILE_DIRS` (colon-separated) if set,
    /// otherwise `/etc/cmpirun/profiles.d`, `$XDG_CONFIG_HOME/cmpirun/profiles.d` (default
    /// `~/.config`), `<exe>/../share/cmpirun/profiles`, and the source tree's `profiles/`.
    pub fn from_env() -> ProfileSearch {
        if let Some(list) = std::env::var_os("CMPIRUN_PROFILE_DIRS") {
            return ProfileSearch {
                dirs: std::env::split_paths(&list)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect(),
            };
        }
        let mut dirs = vec![PathBuf::from("/etc/cmpirun/profiles.d")];
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        if let Some(config) = config {
            dirs.push(config.join("cmpirun/profiles.d"));
        }
        if let Some(prefix) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        {
            dirs.push(prefix.join("share/cmpirun/profiles"));
        }
        dirs.push(shipped_dir());
        ProfileSearch { dirs }
    }

    fn describe(&self) -> String {
        if self.dirs.is_empty() {
            return "no directories".into();
        }
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The file of the profile called `name`: the first `NAME.yaml` (or `.yml`) in the
    /// search directories.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        self.dirs.iter().find_map(|dir| {
            ["yaml", "yml"]
                .iter()
                .map(|ext| dir.join(format!("{name}.{ext}")))
                .find(|p| p.is_file())
        })
    }

    /// Every profile file in the search directories, shadowed names removed, sorted by name.
    pub fn all(&self) -> Vec<PathBuf> {
        let mut seen = BTreeMap::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        && p.is_file()
                })
                .collect();
            files.sort();
            for f in files {
                if let Some(stem) = f.file_stem().and_then(|s| s.to_str()) {
                    seen.entry(stem.to_owned()).or_insert(f);
                }
            }
        }
        seen.into_values().collect()
    }
}

/// The `profiles/` directory of the source tree this binary was built from.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles")
}

/// One profile file, parsed but not merged.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// The file.
    pub path: PathBuf,
    /// Its contents.
    pub file: ProfileFile,
    /// 1-based lines of its top-level keys, for messages.
    pub key_lines: BTreeMap<String, usize>,
}

/// Reads and parses one profile file.
pub fn load_file(path: &Path) -> Result<LoadedFile, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_text(path, &text)
}

/// Parses the text of a profile file; `path` is used in messages.
pub fn parse_text(path: &Path, text: &str) -> Result<LoadedFile, ProfileError> {
    let file: ProfileFile = serde_yaml::from_str(text).map_err(|e| ProfileError::Parse {
        path: path.to_owned(),
        message: yaml_message(&e),
    })?;
    // Top-level keys start at column 0; serde_yaml keeps no spans, so find their lines here.
    let key_lines = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let key = l.split(':').next()?;
            let plain = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            (plain && l.len() > key.len()).then(|| (key.to_owned(), i + 1))
        })
        .collect();
    Ok(LoadedFile {
        path: path.to_owned(),
        file,
        key_lines,
    })
}

/// serde_yaml's message, always with a location: errors that carry none (a missing field, a
/// bad value of the first key) point at the top of the file.
fn yaml_message(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    if msg.contains(" at line ") {
        return msg;
    }
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    format!("{msg} at line {line} column {column}")
}

/// Loads the profile at `path` and merges its `extends:` chain.
pub fn resolve_file(path: &Path, search: &ProfileSearch) -> Result<SiteProfile, ProfileError> {
    let top = load_file(path)?;
    let mut chain = vec![top];
    let mut names = vec![chain[0].file.name.as_str().to_owned()];
    while let Some(parent) = chain.last().and_then(|l| l.file.extends.clone()) {
        let child = chain
            .last()
            .map(|l| (l.path.clone(), line_of(l, "extends")));
        let (child_path, line) = child.unwrap_or_default();
        if names.iter().any(|n| n == parent.as_str()) {
            names.push(parent.as_str().to_owned());
            return Err(ProfileError::ExtendsCycle {
                path: child_path,
                line,
                name: parent.as_str().to_owned(),
                chain: names.join(" → "),
            });
        }
        let file = search
            .find(parent.as_str())
            .ok_or_else(|| ProfileError::NotFound {
                origin: format!("{}:{line}: extends", child_path.display()),
                name: parent.as_str().to_owned(),
                searched: search.describe(),
            })?;
        names.push(parent.as_str().to_owned());
        chain.push(load_file(&file)?);
    }
    let mut merged = SiteProfile::default();
    for loaded in chain.iter().rev() {
        merge(&mut merged, loaded);
    }
    Ok(merged)
}

/// The profile one parsed file describes on its own, ignoring its `extends:` (for tests and
/// for tools that show a single file).
pub fn single(loaded: &LoadedFile) -> SiteProfile {
    let mut p = SiteProfile::default();
    merge(&mut p, loaded);
    p
}

fn line_of(l: &LoadedFile, key: &str) -> usize {
    l.key_lines.get(key).copied().unwrap_or(1)
}

/// Merges one file over what its bases gave: scalars replace, lists append (without
/// duplicates), maps merge key by key; name, description and match rules are the file's own.
fn merge(into: &mut SiteProfile, loaded: &LoadedFile) {
    let f = &loaded.file;
    into.name = f.name.as_str().to_owned();
    into.description = f.description.clone();
    into.file = loaded.path.clone();
    into.chain.push(loaded.path.clone());
    into.match_rules = f.match_rules.clone();
    into.match_line = f.match_rules.as_ref().map(|_| line_of(loaded, "match"));
    if let Some(l) = &f.launcher {
        let t = &mut into.launcher;
        set(&mut t.kind, &l.kind);
        append(&mut t.srun_args, &l.srun_args);
        set(&mut t.srun_mpi, &l.srun_mpi);
        set(&mut t.mpiexec, &l.mpiexec);
        append(&mut t.mpiexec_args, &l.mpiexec_args);
    }
    if let Some(p) = &f.pmi {
        let t = &mut into.pmi;
        set(&mut t.kind, &p.kind);
        set(&mut t.inject, &p.inject);
        append(&mut t.host_libraries, &p.host_libraries);
        append(&mut t.pmix_dirs, &p.pmix_dirs);
    }
    if let Some(fab) = &f.fabric {
        let t = &mut into.fabric;
        set(&mut t.inject, &fab.inject);
        // A more specific profile names its own libfabric; candidates do not accumulate.
        if !fab.libfabric.is_empty() {
            t.libfabric = fab.libfabric.clone();
        }
        set(&mut t.provider_dir, &fab.provider_dir);
        set(&mut t.required, &fab.required);
        append(&mut t.providers, &fab.providers);
        append(&mut t.devices, &fab.devices);
        append(&mut t.libraries, &fab.libraries);
        if let Some(env) = &fab.env {
            merge_env(t.env.get_or_insert_with(EnvSection::default), env);
        }
    }
    for b in &f.binds {
        if !into.binds.contains(b) {
            into.binds.push(b.clone());
        }
    }
    if let Some(env) = &f.env {
        merge_env(&mut into.env, env);
    }
    set(&mut into.mount, &f.mount);
    set(&mut into.library_cache, &f.library_cache);
    set(&mut into.verify, &f.verify);
    append(&mut into.verify_keys, &f.verify_keys);
    append(&mut into.insecure_registries, &f.insecure_registries);
}

fn set<T: Clone>(into: &mut Option<T>, from: &Option<T>) {
    if from.is_some() {
        into.clone_from(from);
    }
}

fn append<T: Clone + PartialEq>(into: &mut Vec<T>, from: &[T]) {
    for x in from {
        if !into.contains(x) {
            into.push(x.clone());
        }
    }
}

fn merge_env(into: &mut EnvSection, from: &EnvSection) {
    for (k, v) in &from.set {
        into.set.insert(k.clone(), v.clone());
    }
    append(&mut into.pass, &from.pass);
    append(&mut into.unset, &from.unset);
}

/// What the match rules are evaluated against.
#[derive(Debug, Clone, Default)]
pub struct MatchContext {
    /// This host's name.
    pub hostname: String,
    /// The environment of the cmpirun process.
    pub env: BTreeMap<String, String>,
    /// Paths and globs known to name existing files (filled by [`MatchContext::probe`] or a
    /// test).
    pub existing: BTreeSet<String>,
}

impl MatchContext {
    /// This process's host name and environment.
    pub fn from_host() -> MatchContext {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        MatchContext {
            hostname,
            env: std::env::vars().collect(),
            existing: BTreeSet::new(),
        }
    }

    /// Records which of the `files:` rules of `profiles` name existing files on this host.
    pub fn probe<'a>(&mut self, profiles: impl IntoIterator<Item = &'a SiteProfile>) {
        for p in profiles {
            for f in p.match_rules.iter().flat_map(|m| &m.files) {
                if glob_exists(f.as_str()) {
                    self.existing.insert(f.as_str().to_owned());
                }
            }
        }
    }
}

/// Whether a path or glob names at least one existing file (a dangling symlink counts as
/// missing).
pub fn glob_exists(pattern: &str) -> bool {
    match glob::glob(pattern) {
        Ok(mut paths) => paths.any(|p| p.map(|p| p.exists()).unwrap_or(false)),
        Err(_) => Path::new(pattern).exists(),
    }
}

/// How one profile's match rules fared on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchOutcome {
    /// Whether every rule held.
    pub matched: bool,
    /// Its weight.
    pub weight: i32,
    /// One line per rule, saying whether and why it held.
    pub reasons: Vec<String>,
}

/// Evaluates `rules` against `ctx`.
pub fn evaluate(rules: &MatchRules, ctx: &MatchContext) -> MatchOutcome {
    let mut matched = true;
    let mut reasons = Vec::new();
    if !rules.hostnames.is_empty() {
        let pats: Vec<&str> = rules.hostnames.iter().map(GlobPattern::as_str).collect();
        match rules.hostnames.iter().find(|g| g.matches(&ctx.hostname)) {
            Some(g) => reasons.push(format!(
                "host name {:?} matches {:?}",
                ctx.hostname,
                g.as_str()
            )),
            None => {
                matched = false;
                reasons.push(format!(
                    "host name {:?} matches none of {pats:?}",
                    ctx.hostname
                ));
            }
        }
    }
    for f in &rules.files {
        if ctx.existing.contains(f.as_str()) {
            reasons.push(format!("{} exists", f.as_str()));
        } else {
            matched = false;
            reasons.push(format!("{} does not exist", f.as_str()));
        }
    }
    for (var, cond) in &rules.env {
        let value = ctx.env.get(var.as_str());
        let (ok, why) = match (cond, value) {
            (None, None) => (true, format!("${} is not set", var.as_str())),
            (None, Some(v)) => (false, format!("${} is set ({v:?})", var.as_str())),
            (Some(g), Some(v)) if g.matches(v) => (
                true,
                format!("${}={v:?} matches {:?}", var.as_str(), g.as_str()),
            ),
            (Some(g), Some(v)) => (
                false,
                format!("${}={v:?} does not match {:?}", var.as_str(), g.as_str()),
            ),
            (Some(_), None) => (false, format!("${} is not set", var.as_str())),
        };
        matched &= ok;
        reasons.push(why);
    }
    if reasons.is_empty() {
        reasons.push("no conditions: matches every host".into());
    }
    MatchOutcome {
        matched,
        weight: rules.effective_weight(),
        reasons,
    }
}

/// How the profile was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectedBy {
    /// `--profile`.
    Flag,
    /// `$CMPIRUN_PROFILE`.
    EnvVar,
    /// Its `match:` rules, with the highest weight.
    Match,
}

/// A profile considered during automatic selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// How its rules fared (`None`: it has no `match:` and is only used when named).
    pub outcome: Option<MatchOutcome>,
}

/// The chosen profile and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileChoice {
    /// The merged profile.
    pub profile: SiteProfile,
    /// How it was chosen.
    pub selected_by: SelectedBy,
    /// One sentence: why this profile.
    pub reason: String,
    /// How its own match rules fare on this host (also when it was named).
    pub outcome: Option<MatchOutcome>,
    /// Every profile considered (automatic selection only).
    pub candidates: Vec<Candidate>,
    /// The directories searched.
    pub searched: Vec<PathBuf>,
}

/// Chooses the profile: `requested` (`--profile`), else `from_env` (`$CMPIRUN_PROFILE`),
/// else the best match in `search` on the host `ctx` describes (its `existing` set is filled
/// here for the candidates' `files:` rules).
pub fn choose(
    requested: Option<&str>,
    from_env: Option<&str>,
    search: &ProfileSearch,
    ctx: &mut MatchContext,
) -> Result<ProfileChoice, ProfileError> {
    let named = requested
        .map(|r| (r, SelectedBy::Flag, "--profile".to_owned()))
        .or_else(|| {
            from_env
                .filter(|v| !v.is_empty())
                .map(|r| (r, SelectedBy::EnvVar, "$CMPIRUN_PROFILE".to_owned()))
        });
    if let Some((what, by, origin)) = named {
        let path = if what.contains('/') || what.ends_with(".yaml") || what.ends_with(".yml") {
            PathBuf::from(what)
        } else {
            search.find(what).ok_or_else(|| ProfileError::NotFound {
                origin: origin.clone(),
                name: what.to_owned(),
                searched: search.describe(),
            })?
        };
        let profile = resolve_file(&path, search)?;
        ctx.probe([&profile]);
        let outcome = profile.match_rules.as_ref().map(|m| evaluate(m, ctx));
        return Ok(ProfileChoice {
            reason: format!("named with {origin} {what}"),
            profile,
            selected_by: by,
            outcome,
            candidates: Vec::new(),
            searched: search.dirs.clone(),
        });
    }

    let mut profiles = Vec::new();
    for file in search.all() {
        profiles.push(resolve_file(&file, search)?);
    }
    ctx.probe(&profiles);
    let mut candidates = Vec::new();
    let mut best: Vec<(i32, usize)> = Vec::new();
    for (i, p) in profiles.iter().enumerate() {
        let outcome = p.match_rules.as_ref().map(|m| evaluate(m, ctx));
        if let Some(o) = outcome.as_ref().filter(|o| o.matched) {
            match best.first() {
                Some((w, _)) if *w > o.weight => {}
                Some((w, _)) if *w == o.weight => best.push((o.weight, i)),
                _ => best = vec![(o.weight, i)],
            }
        }
        candidates.push(Candidate {
            name: p.name.clone(),
            file: p.file.clone(),
            outcome,
        });
    }
    match best.as_slice() {
        [] => Err(ProfileError::NoMatch {
            host: format!("host name {:?}", ctx.hostname),
            searched: search.describe(),
        }),
        [(w, a), (_, b), ..] => Err(ProfileError::Ambiguous {
            first: profiles[*a].name.clone(),
            first_file: profiles[*a].file.clone(),
            first_line: profiles[*a].match_line.unwrap_or(1),
            second: profiles[*b].name.clone(),
            second_file: profiles[*b].file.clone(),
            second_line: profiles[*b].match_line.unwrap_or(1),
            weight: *w,
        }),
        [(w, i)] => {
            let profile = profiles[*i].clone();
            let outcome = candidates[*i].outcome.clone();
            let runner_up = candidates
                .iter()
                .filter(|c| c.name != profile.name)
                .filter_map(|c| c.outcome.as_ref().filter(|o| o.matched).map(|o| (c, o)))
                .max_by_key(|(_, o)| o.weight)
                .map(|(c, o)| format!(", above {} (weight {})", c.name, o.weight))
                .unwrap_or_default();
            let why = outcome
                .as_ref()
                .map(|o| o.reasons.join("; "))
                .unwrap_or_default();
            Ok(ProfileChoice {
                reason: format!("matched this host with weight {w}{runner_up}: {why}"),
                profile,
                selected_by: SelectedBy::Match,
                outcome,
                candidates,
                searched: search.dirs.clone(),
            })
        }
    }
}
