//! The environment of one rank, from the plan's environment changes (pure).
//!
//! The plan lists every change with its reason; this module only applies them, in three layers
//! that match how a container member's environment is built
//! ([`crate::container::member_env::member_environment`]):
//!
//! 1. [`RankEnv::inherited`]: the caller's variables that reach the rank (all of them, or only
//!    the passed ones after `-genvnone`), minus what the plan unsets and minus stray PMI/PMIx
//!    variables of an enclosing launcher;
//! 2. the image's environment scripts (applied by the container code);
//! 3. [`RankEnv::set`]: values the command line and the profile set, and the launcher's own PMI
//!    variables: they win over the image's scripts.
//!
//! `prepend` changes (library paths) are applied last, to the final environment, by
//! [`RankEnv::finish`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use crate::plan::{EnvAction, EnvChange, EnvScope};

/// A rank's environment before the image's scripts are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankEnv {
    /// Inherited from the caller (layer 1).
    pub inherited: Vec<(OsString, OsString)>,
    /// Set by the plan and the launcher (layer 3).
    pub set: Vec<(OsString, OsString)>,
    /// `(name, directory)` to prepend to `:`-separated lists in the final environment.
    pub prepend: Vec<(String, String)>,
    /// Variables removed from the final environment (unless the plan sets them).
    pub unset: Vec<String>,
}

fn glob_matches(pattern: &str, name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(name),
        Err(_) => pattern == name,
    }
}

fn applies(scope: EnvScope, part: usize) -> bool {
    match scope {
        EnvScope::All => true,
        EnvScope::Part(p) => p == part,
    }
}

impl RankEnv {
    /// The environment of a rank of MPMD part `part`, from the plan's `changes`, the caller's
    /// environment `host`, and the launcher's per-rank variables `launcher` (PMI).
    pub fn build<I>(
        changes: &[EnvChange],
        part: usize,
        host: I,
        launcher: &[(String, String)],
    ) -> RankEnv
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let host: Vec<(OsString, OsString)> = host.into_iter().collect();
        let changes: Vec<&EnvChange> = changes.iter().filter(|c| applies(c.scope, part)).collect();
        let clear = changes
            .iter()
            .any(|c| matches!(c.action, EnvAction::ClearInherited));
        let passed = |k: &OsStr| {
            changes.iter().any(|c| match c.action {
                EnvAction::Pass => OsStr::new(&c.name) == k,
                EnvAction::PassMatching => glob_matches(&c.name, k),
                _ => false,
            })
        };
        let unset = |k: &OsStr| {
            changes.iter().any(|c| match c.action {
                EnvAction::Unset => OsStr::new(&c.name) == k,
                // The plan's globbed unsets remove wire-up state only (the PMI crate's rule):
                // `OMPI_*` goes for `OMPI_COMM_WORLD_RANK`, while `OMPI_MCA_*` settings stay.
                EnvAction::UnsetMatching => {
                    glob_matches(&c.name, k) && cmpirun_pmi::wireup::is_wireup_var(k)
                }
                _ => false,
            })
        };
        // Stray wire-up variables never cross, whatever the plan lists: a launcher sets its own.
        let inherited: Vec<(OsString, OsString)> =
            cmpirun_pmi::wireup::scrub_env(host.iter().cloned())
                .into_iter()
                .filter(|(k, _)| (!clear || passed(k)) && !unset(k))
                .collect();
        let mut set = Vec::new();
        let mut prepend = Vec::new();
        let mut unset_names = Vec::new();
        for c in &changes {
            match &c.action {
                EnvAction::Set { value } => set.push((c.name.clone().into(), value.into())),
                EnvAction::Prepend { value } => prepend.push((c.name.clone(), value.clone())),
                EnvAction::Unset => unset_names.push(c.name.clone()),
                // Passing is done above; per-rank values come from the launcher; globbed unsets
                // only concern the caller's variables.
                EnvAction::Pass
                | EnvAction::PassMatching
                | EnvAction::PerRank { .. }
                | EnvAction::UnsetMatching
                | EnvAction::ClearInherited
                | EnvAction::FromLauncher { .. } => {}
            }
        }
        set.extend(
            launcher
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        // After the launcher's own: a value it gives under another name, where it gives none
        // under this one.
        let given = |name: &str| launcher.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        for c in &changes {
            if let EnvAction::FromLauncher { variable } = &c.action
                && given(&c.name).is_none()
                && let Some(value) = given(variable)
            {
                set.push((c.name.clone().into(), value.into()));
            }
        }
        RankEnv {
            inherited,
            set,
            prepend,
            unset: unset_names,
        }
    }

    /// Applies the prepends and unsets to the final environment of the rank.
    pub fn finish(&self, env: &mut BTreeMap<OsString, OsString>) {
        for name in &self.unset {
            if !self.set.iter().any(|(k, _)| k == name.as_str()) {
                env.remove(OsStr::new(name));
            }
        }
        for (name, dir) in &self.prepend {
            let key = OsString::from(name);
            let value = match env.get(&key) {
                Some(old) if !old.is_empty() => {
                    let mut v = OsString::from(format!("{dir}:"));
                    v.push(old);
                    v
                }
                _ => OsString::from(dir),
            };
            env.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, action: EnvAction, scope: EnvScope) -> EnvChange {
        EnvChange {
            name: name.into(),
            action,
            scope,
            reason: String::new(),
        }
    }

    fn host(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn inherits_all_but_stray_pmi() {
        let e = RankEnv::build(
            &[],
            0,
            host(&[("A", "1"), ("PMI_FD", "9"), ("PMIX_RANK", "0")]),
            &[("PMI_RANK".into(), "3".into())],
        );
        assert_eq!(e.inherited, host(&[("A", "1")]));
        assert_eq!(e.set, host(&[("PMI_RANK", "3")]));
    }

    #[test]
    fn genvnone_keeps_only_passed() {
        let changes = [
            change("*", EnvAction::ClearInherited, EnvScope::All),
            change("B", EnvAction::Pass, EnvScope::All),
            change("C_*", EnvAction::PassMatching, EnvScope::All),
            change("D", EnvAction::Pass, EnvScope::Part(1)),
        ];
        let e = RankEnv::build(
            &changes,
            0,
            host(&[("A", "1"), ("B", "2"), ("C_X", "3"), ("D", "4")]),
            &[],
        );
        assert_eq!(e.inherited, host(&[("B", "2"), ("C_X", "3")]));
    }

    #[test]
    fn a_launcher_value_under_another_name() {
        let from = |to: &str, variable: &str| {
            change(
                to,
                EnvAction::FromLauncher {
                    variable: variable.into(),
                },
                EnvScope::All,
            )
        };
        let changes = [
            from("PMIX_MCA_ptl", "PMIX_PTL_MODULE"),
            from("PMIX_MCA_gds", "PMIX_GDS_MODULE"),
            from("PMIX_MCA_psec", "PMIX_SECURITY_MODE"),
        ];
        let e = RankEnv::build(
            &changes,
            0,
            host(&[("PMIX_MCA_psec", "caller's")]),
            &[
                ("PMIX_PTL_MODULE".into(), "tcp".into()),
                ("PMIX_GDS_MODULE".into(), "hash".into()),
                ("PMIX_MCA_gds".into(), "ds21".into()),
            ],
        );
        // Translated where the launcher gives no value under the new name; nothing where it
        // gives none under the old one.
        assert_eq!(
            e.set,
            host(&[
                ("PMIX_PTL_MODULE", "tcp"),
                ("PMIX_GDS_MODULE", "hash"),
                ("PMIX_MCA_gds", "ds21"),
                ("PMIX_MCA_ptl", "tcp"),
            ])
        );
    }

    #[test]
    fn set_prepend_unset() {
        let changes = [
            change("X", EnvAction::Set { value: "v".into() }, EnvScope::All),
            change(
                "Y",
                EnvAction::Set { value: "p1".into() },
                EnvScope::Part(1),
            ),
            change(
                "LD_LIBRARY_PATH",
                EnvAction::Prepend {
                    value: "/inj".into(),
                },
                EnvScope::All,
            ),
            change("GONE", EnvAction::Unset, EnvScope::All),
            change("OMPI_*", EnvAction::UnsetMatching, EnvScope::All),
        ];
        let e = RankEnv::build(
            &changes,
            0,
            host(&[
                ("GONE", "1"),
                ("OMPI_COMM_WORLD_RANK", "1"),
                ("OMPI_MCA_btl", "self"),
            ]),
            &[],
        );
        assert_eq!(e.inherited, host(&[("OMPI_MCA_btl", "self")]));
        assert_eq!(e.set, host(&[("X", "v")]));
        let mut fin: BTreeMap<OsString, OsString> =
            host(&[("GONE", "from image"), ("LD_LIBRARY_PATH", "/a")])
                .into_iter()
                .collect();
        e.finish(&mut fin);
        assert_eq!(fin.get(OsStr::new("LD_LIBRARY_PATH")).unwrap(), "/inj:/a");
        assert!(!fin.contains_key(OsStr::new("GONE")));
        let mut empty = BTreeMap::new();
        e.finish(&mut empty);
        assert_eq!(empty.get(OsStr::new("LD_LIBRARY_PATH")).unwrap(), "/inj");
    }
}
