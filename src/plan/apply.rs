//! From the plan to what the container and the ranks get: the binds as the container root's
//! [`Bind`]s, and the environment of a rank. Pure, so the launchers only carry the result out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{BindKind, BindTime, EnvAction, EnvScope, LaunchPlan};
use crate::container::plan::Bind;

/// The plan's binds for the container root. Sources resolved at rank start (`$VAR` paths such
/// as `$PMIX_SERVER_TMPDIR`) are expanded from `env`, the environment the rank was started
/// with; those whose variables are unset or empty are left out.
pub fn container_binds(plan: &LaunchPlan, env: &BTreeMap<String, String>) -> Vec<Bind> {
    let mut out = Vec::new();
    for b in &plan.binds {
        let (src, dst) = match b.when {
            BindTime::Plan => (b.source.clone(), b.destination.clone()),
            BindTime::RankStart => match (
                super::facts::expand_vars(&b.source, env),
                super::facts::expand_vars(&b.destination, env),
            ) {
                (Some(s), Some(d)) => (s, d),
                _ => continue,
            },
        };
        let bind = Bind {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
            readonly: b.read_only,
            // A device directory such as /dev/infiniband carries no mounts below it; binds of
            // host directories keep what is mounted inside them.
            recursive: b.kind != BindKind::Library,
        };
        if !out.contains(&bind) {
            out.push(bind);
        }
    }
    out
}

/// The environment the plan gives the ranks of MPMD part `part`, starting from `caller` (the
/// environment cmpirun was started with): the plan's changes in order, for every rank and for
/// this part. Values set per rank (`PMI_RANK`, `PMI_FD`, …) are the launcher's to add, and under
/// srun or hydra the launcher adds its own wire-up variables on top.
pub fn rank_environment(
    plan: &LaunchPlan,
    part: usize,
    caller: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let clear = plan
        .env
        .iter()
        .any(|e| e.action == EnvAction::ClearInherited);
    let mut env = if clear {
        BTreeMap::new()
    } else {
        caller.clone()
    };
    for change in &plan.env {
        if let EnvScope::Part(p) = change.scope
            && p != part
        {
            continue;
        }
        let name = change.name.as_str();
        let pattern = glob::Pattern::new(name).ok();
        let matches = |k: &str| pattern.as_ref().is_some_and(|p| p.matches(k));
        match &change.action {
            EnvAction::Set { value } => {
                env.insert(name.to_owned(), value.clone());
            }
            EnvAction::Prepend { value } => {
                let joined = match env.get(name).filter(|v| !v.is_empty()) {
                    Some(old) => format!("{value}:{old}"),
                    None => value.clone(),
                };
                env.insert(name.to_owned(), joined);
            }
            EnvAction::Pass => {
                if let Some(v) = caller.get(name) {
                    env.insert(name.to_owned(), v.clone());
                }
            }
            EnvAction::PassMatching => {
                for (k, v) in caller.iter().filter(|(k, _)| matches(k)) {
                    env.insert(k.clone(), v.clone());
                }
            }
            EnvAction::Unset => {
                env.remove(name);
            }
            EnvAction::UnsetMatching => {
                // Only wire-up state goes (the PMI crate's rule): OMPI_MCA_* settings stay.
                env.retain(|k, _| {
                    !(matches(k) && cmpirun_pmi::env::is_wireup_var(std::ffi::OsStr::new(k)))
                });
            }
            EnvAction::PerRank { .. } | EnvAction::ClearInherited => {}
        }
    }
    env
}
