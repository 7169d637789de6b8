//! How the images are mounted on each node: the backend, `/dev/shm`'s size, and where each node
//! keeps its library cache.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::types::MountPlan;
use crate::facts::expand_vars;
use crate::jobspec::{JobSpec, MountBackendKind};
use crate::mount::{LIBRARY_CACHE_ENV, default_library_cache_in, library_cache_setting};
use crate::profile::{LibraryCacheSetting, SiteProfile};

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
    MountPlan {
        backend,
        reason: mount_reason,
        shm_size: spec.shm_size.clone(),
        library_cache,
        library_cache_reason,
    }
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
