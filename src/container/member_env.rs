//! The environment of a program in the container, as pure functions.
//!
//! Order, as Apptainer does it: the host environment minus what must not cross, then the image's
//! `/.singularity.d/env/*.sh` (evaluated once per node instance, kept as a [`EnvChange`] list),
//! then `--env` values. MPI wire-up variables of the host are never dropped, and an image script
//! cannot overwrite them (a user's `--env` still can).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `PATH` inside the container when neither the image nor the user sets one (Apptainer's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Prefixes of the variables that wire an MPI rank up with its launcher and fabric.
pub const WIRE_UP_PREFIXES: &[&str] = &[
    "PMI_",
    "PMIX_",
    "SLURM_",
    "OMPI_",
    "PRTE_",
    "HYDRA_",
    "FI_",
    "UCX_",
    "MPIR_CVAR_",
];

/// An environment: name → value, sorted for stable output.
pub type Env = BTreeMap<OsString, OsString>;

/// What the image's environment scripts did to one variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvChange {
    /// Set (or changed) to this value.
    Set(OsString, OsString),
    /// Removed.
    Unset(OsString),
}

/// Whether `name` is an MPI wire-up variable.
pub fn is_wire_up(name: &OsStr) -> bool {
    let b = name.as_bytes();
    WIRE_UP_PREFIXES.iter().any(|p| b.starts_with(p.as_bytes()))
}

/// Whether a host variable must not cross into the container.
fn is_dropped(name: &OsStr) -> bool {
    let b = name.as_bytes();
    if is_wire_up(name) {
        return false;
    }
    b == b"LD_LIBRARY_PATH"
        || b == b"PATH"
        || b == b"HOME"
        || b.starts_with(b"APPTAINER_")
        || b.starts_with(b"SINGULARITY_")
        || b.starts_with(b"APPTAINERENV_")
        || b.starts_with(b"SINGULARITYENV_")
}

/// The host environment as it enters the container, before the image's scripts: host variables
/// minus `PATH`, `HOME`, `LD_LIBRARY_PATH`, `APPTAINER*`/`SINGULARITY*`; `PATH` set to
/// [`DEFAULT_PATH`] and `HOME` to the user's home.
pub fn base_environment<I>(host: I, home: &Path) -> Env
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let mut env: Env = host.into_iter().filter(|(k, _)| !is_dropped(k)).collect();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), home.as_os_str().to_owned());
    env
}

/// What the image's scripts changed, given the environment before and after them.
pub fn image_changes(before: &Env, after: &Env) -> Vec<EnvChange> {
    let mut out = Vec::new();
    for (k, v) in after {
        if before.get(k) != Some(v) {
            out.push(EnvChange::Set(k.clone(), v.clone()));
        }
    }
    for k in before.keys() {
        if !after.contains_key(k) {
            out.push(EnvChange::Unset(k.clone()));
        }
    }
    out
}

/// Variables the environment scripts' shell sets on its own; not the image's doing.
const SHELL_OWN: &[&str] = &["PWD", "OLDPWD", "SHLVL", "_"];

/// Drops the variables a shell sets by itself from a script evaluation result.
pub fn without_shell_noise(mut env: Env) -> Env {
    for k in SHELL_OWN {
        env.remove(OsStr::new(k));
    }
    env
}

/// Parses a `KEY=VALUE\0…` block (as in `/proc/<pid>/environ`).
pub fn parse_environ(block: &[u8]) -> Env {
    block
        .split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let i = e.iter().position(|&b| b == b'=')?;
            Some((
                OsStr::from_bytes(&e[..i]).to_owned(),
                OsStr::from_bytes(&e[i + 1..]).to_owned(),
            ))
        })
        .collect()
}

/// A `--env K=V` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--env {0:?}: expected NAME=VALUE with a non-empty NAME without '='")]
pub struct EnvSpecError(pub String);

/// Parses one `--env NAME=VALUE`.
pub fn parse_env(spec: &str) -> Result<(OsString, OsString), EnvSpecError> {
    match spec.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.into(), v.into()))
        }
        _ => Err(EnvSpecError(spec.into())),
    }
}

/// The final environment of a member: `host` filtered, the image's `changes` (except over the
/// host's wire-up variables), then `user` (`--env`, which overrides everything).
pub fn member_environment<I>(
    host: I,
    home: &Path,
    changes: &[EnvChange],
    user: &[(OsString, OsString)],
) -> Env
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let mut env = base_environment(host, home);
    let protected: Vec<OsString> = env.keys().filter(|k| is_wire_up(k)).cloned().collect();
    for c in changes {
        match c {
            EnvChange::Set(k, v) if !protected.contains(k) => {
                env.insert(k.clone(), v.clone());
            }
            EnvChange::Unset(k) if !protected.contains(k) => {
                env.remove(k);
            }
            _ => {}
        }
    }
    for (k, v) in user {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// Serialises changes for the wire between a node instance and its members.
pub fn encode_changes(changes: &[EnvChange]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in changes {
        match c {
            EnvChange::Set(k, v) => {
                out.push(b'S');
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                out.extend_from_slice(v.as_bytes());
            }
            EnvChange::Unset(k) => {
                out.push(b'U');
                out.extend_from_slice(k.as_bytes());
            }
        }
        out.push(0);
    }
    out
}

/// Reads what [`encode_changes`] wrote; malformed entries are skipped.
pub fn decode_changes(data: &[u8]) -> Vec<EnvChange> {
    data.split(|&b| b == 0)
        .filter_map(|e| match e.split_first() {
            Some((b'S', rest)) => {
                let i = rest.iter().position(|&b| b == b'=')?;
                Some(EnvChange::Set(
                    OsStr::from_bytes(&rest[..i]).to_owned(),
                    OsStr::from_bytes(&rest[i + 1..]).to_owned(),
                ))
            }
            Some((b'U', rest)) if !rest.is_empty() => {
                Some(EnvChange::Unset(OsStr::from_bytes(rest).to_owned()))
            }
            _ => None,
        })
        .collect()
}

/// Evaluates environment scripts without a shell when every line is a plain assignment: blank
/// lines, comments, `[export] NAME=VALUE` (VALUE unquoted, `"…"` or `'…'`, with `$NAME` and
/// `${NAME}` expanded), `export NAME` and `unset NAME`. Returns `None` as soon as a line is
/// anything else, and the caller runs the scripts with the image's `/bin/sh` instead. Sourcing
/// semantics are kept: an assignment to a name that is not exported changes a shell variable only.
pub fn eval_simple_scripts(scripts: &[&str], env: &Env) -> Option<Env> {
    let mut exported = env.clone();
    let mut local: BTreeMap<OsString, OsString> = BTreeMap::new();
    for script in scripts {
        for raw in script.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (export, rest) = match line.strip_prefix("export ") {
                Some(r) => (true, r.trim_start()),
                None => (false, line),
            };
            if let Some(name) = rest.strip_prefix("unset ") {
                let name = name.trim();
                if export || !is_name(name) {
                    return None;
                }
                exported.remove(OsStr::new(name));
                local.remove(OsStr::new(name));
                continue;
            }
            match rest.split_once('=') {
                None => {
                    if !export || !is_name(rest) {
                        return None;
                    }
                    if let Some(v) = local.remove(OsStr::new(rest)) {
                        exported.insert(rest.into(), v);
                    }
                }
                Some((name, value)) => {
                    if !is_name(name) {
                        return None;
                    }
                    let value = simple_value(value, &exported, &local)?;
                    let key = OsString::from(name);
                    if export || exported.contains_key(&key) {
                        local.remove(&key);
                        exported.insert(key, value);
                    } else {
                        local.insert(key, value);
                    }
                }
            }
        }
    }
    Some(exported)
}

fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// The value of a simple shell word, or `None` if it needs a shell.
fn simple_value(
    word: &str,
    exported: &Env,
    local: &BTreeMap<OsString, OsString>,
) -> Option<OsString> {
    let lookup = |name: &str| -> OsString {
        local
            .get(OsStr::new(name))
            .or_else(|| exported.get(OsStr::new(name)))
            .cloned()
            .unwrap_or_default()
    };
    if let Some(inner) = word.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'')?;
        return (!inner.contains('\'')).then(|| inner.into());
    }
    let (body, quoted) = match word.strip_prefix('"') {
        Some(inner) => (inner.strip_suffix('"')?, true),
        None => (word, false),
    };
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => {
                let name: String = if chars.peek() == Some(&'{') {
                    chars.next();
                    let n: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    n
                } else {
                    let mut n = String::new();
                    while let Some(&c) = chars.peek() {
                        if c == '_' || c.is_ascii_alphanumeric() {
                            n.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    n
                };
                if !is_name(&name) {
                    return None;
                }
                out.push_str(&lookup(&name).to_string_lossy());
            }
            '"' | '\\' | '`' => return None,
            '\'' if quoted => out.push(c),
            c if !quoted && (c.is_whitespace() || "'\\;&|<>()*?[]~#{}!".contains(c)) => {
                return None;
            }
            c => out.push(c),
        }
    }
    Some(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn get<'a>(env: &'a Env, k: &str) -> Option<&'a str> {
        env.get(OsStr::new(k)).and_then(|v| v.to_str())
    }

    #[test]
    fn host_filtering() {
        let env = base_environment(
            host(&[
                ("PATH", "/host/bin"),
                ("HOME", "/wrong"),
                ("LD_LIBRARY_PATH", "/host/lib"),
                ("APPTAINER_BIND", "x"),
                ("SINGULARITY_NAME", "x"),
                ("APPTAINERENV_FOO", "x"),
                ("TERM", "xterm"),
                ("LANG", "C.UTF-8"),
                ("PMI_FD", "3"),
                ("SLURM_PROCID", "0"),
            ]),
            Path::new("/home/u"),
        );
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(get(&env, "HOME"), Some("/home/u"));
        for k in [
            "LD_LIBRARY_PATH",
            "APPTAINER_BIND",
            "SINGULARITY_NAME",
            "APPTAINERENV_FOO",
        ] {
            assert_eq!(get(&env, k), None, "{k}");
        }
        for k in ["TERM", "LANG", "PMI_FD", "SLURM_PROCID"] {
            assert!(get(&env, k).is_some(), "{k}");
        }
    }

    #[test]
    fn every_wire_up_prefix_passes() {
        for p in WIRE_UP_PREFIXES {
            let k = format!("{p}X");
            let env = base_environment(host(&[(&k, "1")]), Path::new("/h"));
            assert_eq!(get(&env, &k), Some("1"), "{k}");
        }
        assert!(!is_wire_up(OsStr::new("PMIXX")));
        assert!(is_wire_up(OsStr::new("PMIX_RANK")));
    }

    #[test]
    fn image_changes_and_precedence() {
        let before = base_environment(
            host(&[("TERM", "x"), ("DROPME", "1"), ("FI_PROVIDER", "tcp")]),
            Path::new("/h"),
        );
        let mut after = before.clone();
        after.insert("PATH".into(), format!("/opt/mpi/bin:{DEFAULT_PATH}").into());
        after.insert("FOO".into(), "image".into());
        after.insert("FI_PROVIDER".into(), "shm".into());
        after.insert("BAR".into(), "image".into());
        after.remove(OsStr::new("DROPME"));
        let changes = image_changes(&before, &after);
        assert!(changes.contains(&EnvChange::Unset("DROPME".into())));
        assert_eq!(changes.len(), 5);

        // A member with its own rank variables and the user's --env.
        let env = member_environment(
            host(&[
                ("TERM", "x"),
                ("DROPME", "1"),
                ("FI_PROVIDER", "verbs"),
                ("PMI_RANK", "3"),
            ]),
            Path::new("/h"),
            &changes,
            &[("BAR".into(), "user".into())],
        );
        assert_eq!(
            get(&env, "PATH"),
            Some(format!("/opt/mpi/bin:{DEFAULT_PATH}").as_str())
        );
        assert_eq!(get(&env, "FOO"), Some("image"));
        assert_eq!(get(&env, "BAR"), Some("user"), "--env overrides the image");
        assert_eq!(
            get(&env, "FI_PROVIDER"),
            Some("verbs"),
            "host wire-up beats the image"
        );
        assert_eq!(get(&env, "PMI_RANK"), Some("3"));
        assert_eq!(get(&env, "DROPME"), None);

        // Without a host value, the image's wire-up setting applies.
        let env = member_environment(host(&[]), Path::new("/h"), &changes, &[]);
        assert_eq!(get(&env, "FI_PROVIDER"), Some("shm"));
        // And --env beats the host's wire-up value.
        let env = member_environment(
            host(&[("FI_PROVIDER", "verbs")]),
            Path::new("/h"),
            &changes,
            &[("FI_PROVIDER".into(), "tcp".into())],
        );
        assert_eq!(get(&env, "FI_PROVIDER"), Some("tcp"));
    }

    #[test]
    fn environ_blocks_and_wire_format() {
        let env = parse_environ(b"A=1\0B=x=y\0\0NOEQ\0C=\0");
        assert_eq!(get(&env, "A"), Some("1"));
        assert_eq!(get(&env, "B"), Some("x=y"));
        assert_eq!(get(&env, "C"), Some(""));
        assert_eq!(env.len(), 3);
        let changes = vec![
            EnvChange::Set("A".into(), "1=2".into()),
            EnvChange::Unset("B".into()),
            EnvChange::Set("E".into(), "".into()),
        ];
        assert_eq!(decode_changes(&encode_changes(&changes)), changes);
        assert_eq!(decode_changes(b"Xjunk\0U\0"), vec![]);
        let noisy = parse_environ(b"PWD=/\0SHLVL=1\0_=/bin/sh\0K=v\0");
        assert_eq!(without_shell_noise(noisy).len(), 1);
    }

    #[test]
    fn env_specs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }

    #[test]
    fn simple_scripts_are_evaluated_without_a_shell() {
        let env = base_environment(host(&[("TERM", "x"), ("GONE", "1")]), Path::new("/h"));
        let docker = "#!/bin/sh\nexport PATH=\"/opt/a/bin:$PATH\"\nexport LANG='C.UTF-8'\n";
        let custom = "\n# comment\nLOCAL=/opt/l\nexport LIBDIR=${LOCAL}/lib\nTERM=vt100\nunset GONE\nexport LOCAL\nexport EMPTY=\n";
        let out = eval_simple_scripts(&[docker, custom], &env).unwrap();
        assert_eq!(
            get(&out, "PATH"),
            Some(format!("/opt/a/bin:{DEFAULT_PATH}").as_str())
        );
        assert_eq!(get(&out, "LANG"), Some("C.UTF-8"));
        assert_eq!(get(&out, "LIBDIR"), Some("/opt/l/lib"));
        assert_eq!(
            get(&out, "TERM"),
            Some("vt100"),
            "assigning an exported name changes it"
        );
        assert_eq!(
            get(&out, "LOCAL"),
            Some("/opt/l"),
            "export NAME exports a shell variable"
        );
        assert_eq!(get(&out, "EMPTY"), Some(""));
        assert_eq!(get(&out, "GONE"), None);
        let local_only = eval_simple_scripts(&["X=1\n"], &env).unwrap();
        assert_eq!(
            get(&local_only, "X"),
            None,
            "a plain assignment is not exported"
        );
    }

    #[test]
    fn anything_else_needs_a_shell() {
        let env = base_environment(host(&[]), Path::new("/h"));
        for script in [
            "if [ -d /opt ]; then export A=1; fi",
            "export A=$(uname -m)",
            "export A=`uname`",
            "export A=\"x\\\"y\"",
            "export A=a b",
            "export A=\"$1\"",
            "export A=${B:-x}",
            ". /other.sh",
            "export A=x; export B=y",
            "export A=~/bin",
            "export A='it'\\''s'",
            "export 1A=x",
        ] {
            assert_eq!(eval_simple_scripts(&[script], &env), None, "{script}");
        }
    }
}
