//! The binds the user and the site ask for: `--bind`, the profile's `binds:`, and the PMIx
//! server's directories. Host libraries are [`super::inject`]'s and [`super::fabric`]'s.

use super::types::{Bind, BindKind, BindTime, Check, LaunchPlan, Verdict};
use crate::facts::HostFacts;
use crate::jobspec::PmiKind;
use crate::profile::SiteProfile;

/// Adds the user's, the profile's and the PMIx server's binds to `plan`, and a `bind-source`
/// check for each source that is not on this host.
pub(super) fn plan_binds(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    user_binds(plan, host);
    profile_binds(plan, profile, host);
    if plan.launcher.pmi == PmiKind::Pmix {
        pmix_dirs(plan, profile);
    }
}

/// `--bind SRC:DST`: the source must exist on this host.
fn user_binds(plan: &mut LaunchPlan, host: &HostFacts) {
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
}

/// The profile's `binds:`: every existing file a source pattern names; a missing source fails
/// unless the bind is `optional`.
fn profile_binds(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
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
}

/// The directories a PMIx server shares with its clients, resolved in each rank's environment
/// when it starts: the profile's `pmi.pmix_dirs`, then the two a PMIx server names in the
/// variables it gives every task (`srun --mpi=pmix` sets both), each once.
fn pmix_dirs(plan: &mut LaunchPlan, profile: &SiteProfile) {
    let named = profile.pmi.pmix_dirs.iter().map(|d| d.as_str());
    for dir in named.chain(["$PMIX_SERVER_TMPDIR", "$PMIX_SYSTEM_TMPDIR"]) {
        if plan
            .binds
            .iter()
            .any(|b| b.when == BindTime::RankStart && b.source == dir)
        {
            continue;
        }
        plan.binds.push(Bind {
            source: dir.to_owned(),
            destination: dir.to_owned(),
            kind: BindKind::Directory,
            read_only: false,
            when: BindTime::RankStart,
            reason: "the PMIx server shares this directory with its clients (rendezvous files, shared-memory store); resolved in each rank's environment, skipped when unset, not a directory, or /tmp or /var/tmp (bound already)".into(),
            image: None,
        });
    }
}
