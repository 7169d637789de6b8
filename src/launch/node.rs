//! What every launcher does on a node: the node instance's configuration from the plan, and
//! each rank's command and environment. The launchers differ only in how ranks get started and
//! where PMI comes from (MPICH hydra's split); this is the part they share.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::container::instance::{InstanceConfig, MAX_IMAGES, MemberCommand};
use crate::container::run::{ExecRequest, instance_config_images};
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

/// The distinct images of the job, in the order the parts first name them. A node instance
/// holds one root per image (each in its own mount namespace, all in one user namespace), and
/// every rank and every task of the job knows this list from the plan.
pub fn job_images(plan: &LaunchPlan) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for a in &plan.apps {
        if !out.contains(&a.image.path) {
            out.push(a.image.path.clone());
        }
    }
    out
}

/// The index in [`job_images`] of the image that MPMD part `part` runs in.
pub fn image_index(plan: &LaunchPlan, part: usize) -> usize {
    plan.apps
        .get(part)
        .and_then(|a| job_images(plan).iter().position(|i| *i == a.image.path))
        .unwrap_or(0)
}

/// The node instance configuration: a root per image of the job, each with the plan's binds
/// for that image (those of `rank-start` resolved in `rank_env`, and skipped when a variable
/// they name is unset), `extra` binds (`SRC:DST:ro|rw`) of the launcher, the mount backend.
pub fn node_config(
    plan: &LaunchPlan,
    rank_env: &BTreeMap<String, String>,
    extra: &[String],
) -> Result<InstanceConfig, LaunchError> {
    let images = job_images(plan);
    if images.is_empty() {
        return Err(LaunchError::Usage("the job has no program".into()));
    }
    if images.len() > MAX_IMAGES {
        return Err(LaunchError::Usage(format!(
            "the job's parts name {} different images; a node runs at most {MAX_IMAGES}: put \
             programs that share an image into one image",
            images.len()
        )));
    }
    let backend = match plan.mount.backend {
        MountBackendKind::Auto => None,
        MountBackendKind::Fuse => Some(MountBackend::Fuse),
        MountBackendKind::Squashfuse => Some(MountBackend::Squashfuse),
        MountBackendKind::Extract => Some(MountBackend::Extract),
    };
    let reqs: Vec<ExecRequest> = images
        .into_iter()
        .map(|image| ExecRequest {
            binds: image_binds(plan, &image, rank_env, extra),
            image,
            env: Vec::new(),
            backend,
            shm: ShmMode::Private,
            instance_key: None,
            argv: Vec::new(),
        })
        .collect();
    instance_config_images(&reqs).map_err(|e| {
        if e.is_usage() {
            LaunchError::Usage(e.to_string())
        } else {
            LaunchError::Failed(e.to_string())
        }
    })
}

/// The binds of `image`'s root, as `SRC:DST:ro|rw`: the plan's binds for every image and for
/// this one, then the launcher's `extra`.
fn image_binds(
    plan: &LaunchPlan,
    image: &std::path::Path,
    rank_env: &BTreeMap<String, String>,
    extra: &[String],
) -> Vec<String> {
    let mut binds = Vec::new();
    for b in &plan.binds {
        if b.image.as_deref().is_some_and(|i| i != image) {
            continue;
        }
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
    binds
}

/// The command of `rank` in the container: its part's image, program, arguments, working
/// directory (`-wdir`, else the caller's) and environment (the plan's changes over `host`, what
/// the environment scripts of the part's image change (`changes`, by image as the instance
/// reports them), then the launcher's `launcher_env`).
pub fn rank_command(
    plan: &LaunchPlan,
    cfg: &InstanceConfig,
    rank: u32,
    host: Vec<(OsString, OsString)>,
    changes: &[Vec<crate::container::env::EnvChange>],
    launcher_env: &[(String, String)],
) -> MemberCommand {
    let part = part_of(plan, rank);
    let app = &plan.apps[part];
    let image = image_index(plan, part);
    let rank_env = RankEnv::build(&plan.env, part, host, launcher_env);
    let mut env = member_environment(
        rank_env.inherited.clone(),
        &cfg.root.account.home,
        changes.get(image).map_or(&[], Vec::as_slice),
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
        // Each rank its own session, so that autogroup scheduling gives each its CPU share (as
        // hydra's proxy does; slurmstepd keeps a node's tasks in its own session). Signals reach
        // the rank through its parent, cmpirun or the rank mode, which pass every one on, and
        // the rank dies with that parent (its parent-death signal).
        new_session: true,
        image,
        fds: Vec::new(),
    }
}
