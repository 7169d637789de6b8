//! The ranks' environment changes, in the order they apply: the caller's environment cleared
//! (`-genvnone`), stray wire-up variables scrubbed, the launcher's PMI variables, the profile's
//! `env` and `fabric.env`, then the command line's settings.

use super::types::{EnvAction, EnvChange, EnvScope, LaunchPlan};
use crate::facts::HostFacts;
use crate::jobspec::{EnvInherit, EnvSetting, JobSpec, LauncherKind, PmiKind};
use crate::profile::{EnvSection, SiteProfile};

/// One environment change with its reason.
pub(super) fn env_change(
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

/// Adds the environment changes of the ranks to `plan.env`, in the order they apply.
pub(super) fn plan_environment(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    let env = &mut plan.env;
    if plan.job.env_all == EnvInherit::None {
        env.push(env_change(
            "*",
            EnvAction::ClearInherited,
            EnvScope::All,
            "-genvnone: the caller's environment is not inherited",
        ));
    }
    let kind = plan.launcher.kind;
    env.extend(scrub_wireup(kind, host));
    if kind == LauncherKind::Local && plan.launcher.pmi == PmiKind::Pmix {
        let open_mpi_4 = plan.apps.iter().any(|a| {
            a.image
                .stack_files
                .iter()
                .any(|f| f.contains("/libopen-rte.so.40"))
        });
        let oversubscribed = plan.layout.size > host.cpus;
        env.extend(local_pmix_variables(
            open_mpi_4,
            oversubscribed,
            &host.hostname,
        ));
    } else {
        env.extend(launcher_variables(
            kind,
            plan.launcher.pmi,
            &plan.layout.process_mapping,
        ));
    }
    env.extend(profile_section(&profile.name, &profile.env, "env"));
    if let Some(fenv) = &profile.fabric.env {
        env.extend(profile_section(&profile.name, fenv, "fabric.env"));
    }
    env.extend(command_line(&plan.job));
}

/// Removes the wire-up variables of another process manager that the caller's environment
/// (`host.env`) holds, one change per family present.
fn scrub_wireup(kind: LauncherKind, host: &HostFacts) -> Vec<EnvChange> {
    let mut env = Vec::new();
    // Leftovers from an enclosing launcher would make the ranks' MPI talk to a PMI server that is
    // not theirs (or start as singletons); the launcher sets its own.
    let scrub_reason = match kind {
        LauncherKind::Local => {
            "stray PMI variables from the caller would point the ranks' MPI at a server that is not theirs; cmpirun's PMI server sets its own"
        }
        LauncherKind::Slurm => {
            "removed before srun starts, so only the variables srun sets for this step reach the ranks"
        }
        LauncherKind::Hydra => {
            "removed before mpiexec starts, so only the variables hydra sets reach the ranks"
        }
        LauncherKind::Mpirun => {
            "removed before mpirun starts, so only the variables Open MPI's mpirun sets reach the ranks"
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
            k.starts_with(prefix) && cmpirun_pmi::wireup::is_wireup_var(std::ffi::OsStr::new(k))
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
    env
}

/// The variables the launcher sets for the ranks' PMI: cmpirun's own server's (local), or the
/// `PMIX_MCA_*` mapping of a PMIx server's module choice.
fn launcher_variables(kind: LauncherKind, pmi: PmiKind, process_mapping: &str) -> Vec<EnvChange> {
    let mut env = Vec::new();
    match (kind, pmi) {
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
                    value: process_mapping.to_owned(),
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
                    EnvAction::FromLauncher {
                        variable: from.to_owned(),
                    },
                    EnvScope::All,
                    "newer PMIx clients read the server's module choice from PMIX_MCA_* (as enroot's PMIx hook does)",
                ));
            }
        }
        _ => {}
    }
    env
}

/// The variables of the local launcher's PMIx server: each rank's from `PMIx_server_setup_fork`,
/// the Slurm-like job variables Open MPI 4 needs to take itself for a direct-launched rank,
/// and the yield hint of an oversubscribed node.
fn local_pmix_variables(open_mpi_4: bool, oversubscribed: bool, hostname: &str) -> Vec<EnvChange> {
    let setup = "cmpirun's PMIx server (the host's libpmix, in a process of its own) gives each rank these from PMIx_server_setup_fork";
    let mut env: Vec<EnvChange> = [
        ("PMIX_NAMESPACE", "the job's namespace"),
        ("PMIX_RANK", "the rank"),
        (
            "PMIX_SERVER_URI*",
            "the server's loopback address (the ranks share cmpirun's network namespace)",
        ),
        (
            "PMIX_SECURITY_MODE",
            "native (the server runs with PMIX_MCA_psec=native: no munge)",
        ),
        (
            "PMIX_GDS_MODULE",
            "hash (the server runs with PMIX_MCA_gds=hash: no shared-memory store files)",
        ),
        (
            "PMIX_SERVER_TMPDIR",
            "the server's private directory under /tmp",
        ),
        (
            "PMIX_VERSION",
            "the version of the host's libpmix (and the others setup_fork adds)",
        ),
    ]
    .into_iter()
    .map(|(name, value)| {
        env_change(
            name,
            EnvAction::PerRank {
                value: value.into(),
            },
            EnvScope::All,
            setup,
        )
    })
    .collect();
    if open_mpi_4 {
        for (name, value) in [
            ("SLURM_JOBID", "0"),
            ("SLURM_NODELIST", hostname),
            ("SLURM_STEP_ID", "0"),
        ] {
            env.push(env_change(
                name,
                EnvAction::Set {
                    value: value.into(),
                },
                EnvScope::All,
                "Open MPI 4 (libopen-rte.so.40) takes a rank not started by its own mpirun for an unmanaged singleton and never contacts the PMIx server; these make its schizo/slurm component declare it direct-launched, so it uses PMIx",
            ));
        }
    }
    if oversubscribed {
        env.push(env_change(
            "OMPI_MCA_mpi_yield_when_idle",
            EnvAction::Set { value: "1".into() },
            EnvScope::All,
            "more ranks than CPUs: Open MPI's ranks yield while they poll (the server also tells PMIx clients the node is oversubscribed)",
        ));
    }
    env
}

/// The changes of one environment section of the profile (`env` or `fabric.env`, named `what`).
fn profile_section(pname: &str, section: &EnvSection, what: &str) -> Vec<EnvChange> {
    let mut env = Vec::new();
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
    env
}

/// The command line's settings: the job's (`-x`, `-genv`, …), then each part's (`-env`).
fn command_line(spec: &JobSpec) -> Vec<EnvChange> {
    let mut env = Vec::new();
    for s in &spec.env {
        env.push(user_env(s, EnvScope::All));
    }
    for (i, app) in spec.apps.iter().enumerate() {
        for s in &app.env {
            env.push(user_env(s, EnvScope::Part(i)));
        }
    }
    env
}

/// One setting of the command line, for every rank or for one part's.
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
