//! How the images are mounted on each node: the backend, `/dev/shm`'s size, and where each node
//! keeps its library cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::types::{MountPlan, NodeState};
use crate::container::rendezvous::runtime_dir_in;
use crate::facts::expand_vars;
use crate::jobspec::{JobSpec, MountBackendKind};
use crate::mount::user_cache_in;
use crate::mount::{LIBRARY_CACHE_ENV, default_library_cache_in, library_cache_setting};
use crate::profile::{LibraryCacheSetting, SiteProfile};
use crate::sys::shared_filesystem;

/// The mount plan of `spec` under `profile`, with the library cache read from the caller's
/// environment `env`; a note for the user goes to `warnings`.
pub(super) fn mount_plan(
    spec: &JobSpec,
    profile: &SiteProfile,
    env: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> MountPlan {
    let (backend, mount_reason) = match (spec.image_mount, profile.mount) {
        (Some(b), _) => (b, format!("--image-mount {}", b.as_str())),
        (None, Some(b)) => (
            b,
            format!("profile {} sets mount: {}", profile.name, b.as_str()),
        ),
        (None, None) => (
            MountBackendKind::Auto,
            "the default: built-in FUSE, then squashfuse, then extraction".into(),
        ),
    };
    let (library_cache, library_cache_reason) = if backend == MountBackendKind::Extract {
        (
            None,
            "off: the image is extracted, its files are host files already".into(),
        )
    } else {
        library_cache_dir(profile, env, warnings)
    };
    let node_state = node_state(backend, library_cache.as_deref(), env);
    MountPlan {
        backend,
        reason: mount_reason,
        shm_size: spec.shm_size.clone(),
        library_cache,
        library_cache_reason,
        node_state,
    }
}

/// Why a cache may be on a folder the nodes share.
const SHARED_CACHE_OK: &str = "the nodes may share it: each entry is filled once, under a lock in \
     the folder, in a temporary name renamed into place whole (node-local storage is faster)";

/// Where each node keeps its state (`--dry-run`'s `node state`), in environment `env`: the
/// rendezvous of its instance ([`runtime_dir_in`]: node-local, chosen so), and the caches the
/// nodes may share (the library cache, the extract cache when extraction may be used, the image
/// facts).
fn node_state(
    backend: MountBackendKind,
    library_cache: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Vec<NodeState> {
    let var = |k: &str| env.get(k).cloned();
    let place = |what: &str, path: PathBuf, why: String| NodeState {
        what: what.into(),
        shared: shared_filesystem(&path).map(str::to_owned),
        path,
        why,
    };
    let (dir, chosen) = runtime_dir_in(|k| var(k).map(Into::into));
    let mut state = vec![place(
        "rendezvous",
        dir,
        format!(
            "{chosen}; each node's instance socket and lock, named by the job step, which is \
             the same on every node: never on a folder the nodes share"
        ),
    )];
    if let Some(dir) = library_cache {
        state.push(place(
            "library cache",
            dir.to_owned(),
            SHARED_CACHE_OK.into(),
        ));
    }
    let user_cache = user_cache_in(var);
    if backend != MountBackendKind::Fuse
        && backend != MountBackendKind::Squashfuse
        && let Some(c) = &user_cache
    {
        state.push(place(
            "extract cache",
            c.join("extract"),
            format!("used when the image is extracted; {SHARED_CACHE_OK}"),
        ));
    }
    if let Some(c) = &user_cache {
        state.push(place(
            "image facts",
            c.join("facts"),
            "read by the front end only; each entry is written whole under a temporary name \
             and renamed, so the nodes may share it"
                .into(),
        ));
    }
    state
}

/// Where the nodes keep the library cache in environment `vars`, and why:
/// `$CMPIRUN_LIBRARY_CACHE` (the user's), else the profile's `library_cache` (the site's; a
/// `$VAR` in it that is unset is a warning and the default is used), else
/// `$XDG_CACHE_HOME/cmpirun/libraries`.
pub fn library_cache_dir(
    profile: &SiteProfile,
    vars: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> (Option<PathBuf>, String) {
    let from_env = vars.get(LIBRARY_CACHE_ENV).filter(|v| !v.is_empty());
    let default = |reason: String| match default_library_cache_in(|k| vars.get(k).cloned()) {
        Some(d) => (Some(d), reason),
        None => (None, "off: neither XDG_CACHE_HOME nor HOME is set".into()),
    };
    match (from_env, &profile.library_cache) {
        (Some(v), _) => {
            let dir = library_cache_setting(v);
            let reason = match &dir {
                Some(_) => format!("{LIBRARY_CACHE_ENV}={v}"),
                None => format!("off: {LIBRARY_CACHE_ENV}={v}"),
            };
            (dir, reason)
        }
        (None, Some(LibraryCacheSetting::Off)) => (
            None,
            format!("off: profile {} sets library_cache: off", profile.name),
        ),
        (None, Some(LibraryCacheSetting::Dir(p))) => match expand_vars(p.as_str(), vars) {
            Some(dir) => (
                Some(PathBuf::from(dir)),
                format!(
                    "profile {} sets library_cache: {}",
                    profile.name,
                    p.as_str()
                ),
            ),
            None => {
                warnings.push(format!(
                    "profile {}: library_cache {} names a variable that is not set; the \
                         library cache is in the user's cache folder instead",
                    profile.name,
                    p.as_str()
                ));
                default(format!(
                    "the default (profile {}'s {} could not be expanded)",
                    profile.name,
                    p.as_str()
                ))
            }
        },
        (None, None) => default("the default: the user's cache folder".into()),
    }
}
