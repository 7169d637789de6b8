//! What every launcher does on a node: the node instance's configuration from the plan, and
//! each rank's command and environment. The launchers differ only in how ranks get started and
//! where PMI comes from (MPICH hydra's split); this is the part they share.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::container::instance::{InstanceConfig, MemberCommand};
use crate::container::run::{ExecRequest, instance_config};
use crate::container::{ShmMode, env::member_environment};
use crate::jobspec::MountBackendKind;
use crate::mount::MountBackend;
use crate::plan::{BindTime, LaunchPlan};

use super::LaunchError;
use super::env::RankEnv;

/// The MPMD part that `rank` belongs to.
pub fn part_of(plan: &LaunchPlan, rank: u32) -> usize {
    plan.apps
        .iter()
        .position(|a| rank >= a.first_rank && rank < a.first_rank + a.ranks)
        .unwrap_or(0)
}

/// The one image of the job. Every part must use the same image: a node holds one instance.
pub fn job_image(plan: &LaunchPlan) -> Result<PathBuf, LaunchError> {
    let first = plan
        .apps
        .first()
        .ok_or_else(|| LaunchError::Usage("the job has no program".into()))?;
    if let Some(other) = plan.apps.iter().find(|a| a.image.path != first.image.path) {
        return Err(LaunchError::Usage(format!(
            "MPMD parts with different images ({} and {}) are not supported yet: a node runs one \
             container; use one image that holds every program",
            first.image.path.display(),
            other.image.path.display()
        )));
    }
    Ok(first.image.path.clone())
}

/// The node instance configuration: the image, the plan's binds (those of `rank-start` resolved
/// in `rank_env`, and skipped when a variable they name is unset), `extra` binds
/// (`SRC:DST:ro|rw`) of the launcher, the mount backend.
pub fn node_config(
    plan: &LaunchPlan,
    rank_env: &BTreeMap<String, String>,
    extra: &[String],
) -> Result<InstanceConfig, LaunchError> {
    let image = job_image(plan)?;
    let mut binds = Vec::new();
    for b in &plan.binds {
        let source = match b.when {
            BindTime::Plan => b.source.clone(),
            BindTime::RankStart => match crate::plan::facts::expand_vars(&b.source, rank_env) {
                Some(s) if std::path::Path::new(&s).exists() => s,
                _ => continue,
            },
        };
        let dest = match b.when {
            BindTime::Plan => b.destination.clone(),
            BindTime::RankStart => {
                match crate::plan::facts::expand_vars(&b.destination, rank_env) {
                    Some(d) => d,
                    None => continue,
                }
            }
        };
        binds.push(format!(
            "{source}:{dest}:{}",
            if b.read_only { "ro" } else { "rw" }
        ));
    }
    for e in extra {
        if !binds.iter().any(|b| b == e) {
            binds.push(e.clone());
        }
    }
    let backend = match plan.mount.backend {
        MountBackendKind::Auto => None,
        MountBackendKind::Fuse => Some(MountBackend::Fuse),
        MountBackendKind::Squashfuse => Some(MountBackend::Squashfuse),
        MountBackendKind::Extract => Some(MountBackend::Extract),
    };
    let req = ExecRequest {
        image,
        binds,
        env: Vec::new(),
        backend,
        shm: ShmMode::Private,
        instance_key: None,
        argv: Vec::new(),
    };
    instance_config(&req).map_err(|e| {
        if e.is_usage() {
            LaunchError::Usage(e.to_string())
        } else {
            LaunchError::Failed(e.to_string())
        }
    })
}

/// The command of `rank` in the container: its part's program, arguments, working directory
/// (`-wdir`, else the caller's) and environment (the plan's changes over `host`, the image's
/// scripts' `changes`, then the launcher's `launcher_env`).
pub fn rank_command(
    plan: &LaunchPlan,
    cfg: &InstanceConfig,
    rank: u32,
    host: Vec<(OsString, OsString)>,
    changes: &[crate::container::env::EnvChange],
    launcher_env: &[(String, String)],
) -> MemberCommand {
    let part = part_of(plan, rank);
    let app = &plan.apps[part];
    let rank_env = RankEnv::build(&plan.env, part, host, launcher_env);
    let mut env = member_environment(
        rank_env.inherited.clone(),
        &cfg.root.account.home,
        changes,
        &rank_env.set,
    );
    rank_env.finish(&mut env);
    let mut argv: Vec<OsString> = vec![app.program.clone().into()];
    argv.extend(app.args.iter().map(OsString::from));
    let cwd = app
        .wdir
        .clone()
        .or_else(|| plan.job.wdir.clone())
        .or_else(|| cfg.root.cwd.clone())
        .unwrap_or_else(|| PathBuf::from("/"));
    MemberCommand {
        argv,
        env,
        cwd,
        // Under srun and hydra the task above the rank is the session leader already; the rank
        // stays in its process group, which is what they signal.
        new_session: false,
    }
}
