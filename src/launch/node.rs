//! What every launcher does on a node: the node instance's configuration from the plan, and
//! each rank's command and environment. The launchers differ only in how ranks get started and
//! where PMI comes from (MPICH hydra's split); this is the part they share.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::container::ShmMode;
use crate::container::config::{RootRequest, instance_config};
use crate::container::instance::{InstanceConfig, MAX_IMAGES, MemberCommand};
use crate::container::member_env::{Env, member_environment};
use crate::container::root::{HostBind, LibraryCache};
use crate::facts::patterns::expand_vars;
use crate::jobspec::MountBackendKind;
use crate::mount::MountBackend;
use crate::plan::{AppPlan, Bind, BindKind, BindTime, LaunchPlan, image_apps};

use super::LaunchError;
use super::rank_env::RankEnv;

/// The MPMD part that `rank` belongs to.
pub fn part_of(plan: &LaunchPlan, rank: u32) -> usize {
    plan.apps
        .iter()
        .position(|a| rank >= a.first_rank && rank < a.first_rank.saturating_add(a.ranks))
        .unwrap_or(0)
}

/// What a task knows of its own rank from the plan alone: its node and local rank (computed from
/// the layout's rule, [`crate::plan::RankLayout::locate`]), its MPMD part and program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankView<'a> {
    /// The rank.
    pub rank: u32,
    /// Its node id.
    pub node: u32,
    /// Its node's name.
    pub node_name: &'a str,
    /// Its index among its node's ranks.
    pub local_rank: u32,
    /// Its MPMD part (0-based).
    pub part: usize,
    /// The program it runs.
    pub program: &'a str,
}

/// `rank`'s view of the plan; `None` past the job's last rank.
pub fn rank_view(plan: &LaunchPlan, rank: u32) -> Option<RankView<'_>> {
    let place = plan.layout.locate(rank)?;
    let part = part_of(plan, rank);
    Some(RankView {
        rank,
        node: place.node,
        node_name: plan.layout.nodes.get(place.node as usize)?.name.as_str(),
        local_rank: place.local_rank,
        part,
        program: plan.apps.get(part).map_or("", |a| a.program.as_str()),
    })
}

/// The distinct images of the job, in the order the parts first name them. A node instance
/// holds one root per image (each in its own mount namespace, all in one user namespace), and
/// every rank and every task of the job knows this list from the plan.
pub fn job_images(plan: &LaunchPlan) -> Vec<PathBuf> {
    distinct_images(&plan.apps)
}

fn distinct_images(apps: &[AppPlan]) -> Vec<PathBuf> {
    image_apps(apps)
        .into_iter()
        .map(|a| a.image.path.clone())
        .collect()
}

/// The index in [`job_images`] of the image that MPMD part `part` runs in.
pub fn image_index(plan: &LaunchPlan, part: usize) -> usize {
    part_image(&plan.apps, part)
}

fn part_image(apps: &[AppPlan], part: usize) -> usize {
    apps.get(part)
        .and_then(|a| {
            distinct_images(apps)
                .iter()
                .position(|i| *i == a.image.path)
        })
        .unwrap_or(0)
}

/// Makes sure every image of the plan that was pulled from a registry is in this node's cache
/// of pulled images (pulled by the digest the front end resolved, if it is not), held until this
/// process exits, and points the plan at this node's copy (a node's cache folder may not be the
/// front end's).
pub fn fetch_registry_images(plan: &mut LaunchPlan) -> Result<(), LaunchError> {
    for i in 0..plan.apps.len() {
        let Some(registry) = plan.apps[i].image.registry.clone() else {
            continue;
        };
        let local = crate::image::oras::fetch(&registry, None)?;
        let old = std::mem::replace(&mut plan.apps[i].image.path, local.clone());
        for b in &mut plan.binds {
            if b.image.as_ref() == Some(&old) {
                b.image = Some(local.clone());
            }
        }
    }
    Ok(())
}

/// The node instance configuration: a root per image of the job, each with the plan's binds
/// for that image (those of `rank-start` resolved in `rank_env`), the mount backend, the
/// private `/dev/shm` and the library cache; the host's part is
/// [`crate::container::config::instance_config`]'s.
pub fn node_config(
    plan: &LaunchPlan,
    rank_env: &BTreeMap<String, String>,
) -> Result<InstanceConfig, LaunchError> {
    let images = job_images(plan);
    if images.is_empty() {
        return Err(LaunchError::NoProgram);
    }
    if images.len() > MAX_IMAGES {
        return Err(LaunchError::TooManyImages { n: images.len() });
    }
    let backend = match plan.mount.backend {
        MountBackendKind::Auto => None,
        MountBackendKind::Fuse => Some(MountBackend::Fuse),
        MountBackendKind::Squashfuse => Some(MountBackend::Squashfuse),
        MountBackendKind::Extract => Some(MountBackend::Extract),
    };
    let mut roots = Vec::with_capacity(images.len());
    for image in images {
        roots.push(RootRequest {
            binds: image_binds(&plan.binds, &image, rank_env)?,
            library_cache: plan.mount.library_cache.as_ref().map(|dir| LibraryCache {
                dir: dir.clone(),
                files: stack_files(plan, &image),
            }),
            image,
            backend,
            shm: ShmMode::Private,
            shm_size: plan.mount.shm_size.clone(),
        });
    }
    Ok(instance_config(&roots)?)
}

/// The files of `image`'s MPI stack (the facts' libraries, symlinks resolved), which the node
/// serves from its library cache.
fn stack_files(plan: &LaunchPlan, image: &Path) -> Vec<PathBuf> {
    plan.apps
        .iter()
        .find(|a| a.image.path == image)
        .map(|a| a.image.stack_files.iter().map(PathBuf::from).collect())
        .unwrap_or_default()
}

/// Host directories every root binds already: a rank-start bind that resolves to one of them
/// is left out.
const BOUND_ALREADY: &[&str] = &["/tmp", "/var/tmp"];

/// The binds of `image`'s root: the plan's binds for every image and for this one, each once.
/// Binds resolved at rank start (`$VAR` paths such as `$PMIX_SERVER_TMPDIR`) are expanded from
/// `rank_env`; those whose variables are unset or empty, whose source does not exist (or is not
/// a directory, for a directory bind), or that name a host directory every root binds already
/// (`BOUND_ALREADY`) are left out.
pub fn image_binds(
    plan_binds: &[Bind],
    image: &Path,
    rank_env: &BTreeMap<String, String>,
) -> Result<Vec<HostBind>, LaunchError> {
    let mut binds: Vec<HostBind> = Vec::new();
    for b in plan_binds {
        if b.image.as_deref().is_some_and(|i| i != image) {
            continue;
        }
        let (source, dest) = match b.when {
            BindTime::Plan => (b.source.clone(), b.destination.clone()),
            BindTime::RankStart => {
                let (Some(s), Some(d)) = (
                    expand_vars(&b.source, rank_env),
                    expand_vars(&b.destination, rank_env),
                ) else {
                    continue;
                };
                let usable = match b.kind {
                    BindKind::Directory => Path::new(&s).is_dir(),
                    _ => Path::new(&s).exists(),
                };
                if !usable || BOUND_ALREADY.contains(&s.trim_end_matches('/')) {
                    continue;
                }
                (s, d)
            }
        };
        let spec = format!("{source}:{dest}");
        let bind = HostBind::new(PathBuf::from(&source), Path::new(&dest), b.read_only, &spec)?;
        // Two rank-start binds can name one directory ($PMIX_SERVER_TMPDIR and
        // $PMIX_SYSTEM_TMPDIR often do); a second mount over it would only hide the first.
        if !binds.contains(&bind) {
            binds.push(bind);
        }
    }
    Ok(binds)
}

/// The final environment of a rank of MPMD part `part`: the plan's changes over `host` (the
/// caller's environment), what the environment scripts of the part's image change
/// (`image_changes`), then the launcher's `launcher_env` and the plan's values, and last the
/// plan's prepends and unsets. `home` is the account's home in the container.
pub fn rank_environment(
    plan: &LaunchPlan,
    part: usize,
    host: Vec<(OsString, OsString)>,
    home: &Path,
    image_changes: &[crate::container::member_env::EnvChange],
    launcher_env: &[(String, String)],
) -> Env {
    let rank_env = RankEnv::build(&plan.env, part, host, launcher_env);
    let mut env = member_environment(
        rank_env.inherited.clone(),
        home,
        image_changes,
        &rank_env.set,
    );
    rank_env.finish(&mut env);
    env
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
    changes: &[Vec<crate::container::member_env::EnvChange>],
    launcher_env: &[(String, String)],
) -> MemberCommand {
    let part = part_of(plan, rank);
    let app = &plan.apps[part];
    let image = image_index(plan, part);
    let env = rank_environment(
        plan,
        part,
        host,
        &cfg.root.account.home,
        changes.get(image).map_or(&[], Vec::as_slice),
        launcher_env,
    );
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
        cpus: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::ImageSummary;
    use crate::plan::BindKind;

    fn app(image: &str) -> AppPlan {
        AppPlan {
            image: ImageSummary {
                path: image.into(),
                ..ImageSummary::default()
            },
            program: "/bin/true".into(),
            args: Vec::new(),
            first_rank: 0,
            ranks: 1,
            wdir: None,
        }
    }

    #[test]
    fn one_root_per_distinct_image_in_order_of_first_use() {
        let apps = [app("/b.sif"), app("/a.sif"), app("/b.sif"), app("/c")];
        assert_eq!(
            distinct_images(&apps),
            vec![
                PathBuf::from("/b.sif"),
                PathBuf::from("/a.sif"),
                PathBuf::from("/c")
            ]
        );
        let parts: Vec<usize> = (0..5).map(|p| part_image(&apps, p)).collect();
        // Part 2 reuses part 0's image; an unknown part falls back to the first image.
        assert_eq!(parts, vec![0, 1, 0, 2, 0]);
    }

    #[test]
    fn binds_scoped_to_an_image_go_into_that_root_only() {
        let bind = |src: &str, dst: &str, image: Option<&str>, when: BindTime| Bind {
            source: src.into(),
            destination: dst.into(),
            kind: BindKind::Library,
            read_only: true,
            when,
            reason: String::new(),
            image: image.map(PathBuf::from),
        };
        let binds = [
            bind(
                "/h/lf.so",
                "/.cmpirun/lib/lf.so",
                Some("/a.sif"),
                BindTime::Plan,
            ),
            bind("/h/lf.so", "/opt/b/lf.so", Some("/b.sif"), BindTime::Plan),
            bind("/dev/null", "/x", None, BindTime::Plan),
            bind("$UNSET_DIR", "$UNSET_DIR", None, BindTime::RankStart),
            // A PMIx server's directories: resolved when the rank starts; one already bound
            // as a host directory, and a second naming the same one, left out.
            Bind {
                read_only: false,
                kind: BindKind::Directory,
                ..bind("$SERVER_DIR", "$SERVER_DIR", None, BindTime::RankStart)
            },
            Bind {
                read_only: false,
                kind: BindKind::Directory,
                ..bind("$SYSTEM_DIR", "$SYSTEM_DIR", None, BindTime::RankStart)
            },
            Bind {
                read_only: false,
                kind: BindKind::Directory,
                ..bind("$TMP_DIR", "$TMP_DIR", None, BindTime::RankStart)
            },
        ];
        let env: BTreeMap<String, String> = [
            ("SERVER_DIR", "/usr"),
            ("SYSTEM_DIR", "/usr"),
            ("TMP_DIR", "/tmp"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let specs = |image: &str| -> Vec<String> {
            image_binds(&binds, Path::new(image), &env)
                .expect("binds")
                .iter()
                .map(|b| {
                    let mode = if b.readonly { "ro" } else { "rw" };
                    format!("{}:{}:{mode}", b.src.display(), b.dst.display())
                })
                .collect()
        };
        assert_eq!(
            specs("/a.sif"),
            vec![
                "/h/lf.so:/.cmpirun/lib/lf.so:ro",
                "/dev/null:/x:ro",
                "/usr:/usr:rw"
            ]
        );
        assert_eq!(
            specs("/b.sif"),
            vec![
                "/h/lf.so:/opt/b/lf.so:ro",
                "/dev/null:/x:ro",
                "/usr:/usr:rw"
            ]
        );
    }
}
