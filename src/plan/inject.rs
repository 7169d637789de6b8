//! Host libraries into the image by soname: the injection directory on the ranks'
//! `LD_LIBRARY_PATH`, and the host PMI libraries the profile injects (`pmi.inject`). The host
//! libfabric is [`super::fabric`]'s.

use std::path::{Path, PathBuf};

use super::environment::env_change;
use super::parts::distinct_images;
use super::types::{Bind, BindKind, BindTime, Check, EnvAction, EnvScope, LaunchPlan, Verdict};
use crate::facts::HostFacts;
use crate::profile::SiteProfile;

/// Where ranks find the libraries cmpirun injects by directory rather than over a file.
pub const INJECT_DIR: &str = "/.cmpirun/lib";

/// Binds the host PMI libraries the profile injects (`pmi.inject: true`): over the image's copy
/// when its MPI links one by that name, otherwise into the injection directory.
pub(super) fn plan_pmi_libraries(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    if profile.pmi.inject != Some(true) {
        return;
    }
    if plan.job.no_inject {
        plan.checks.push(Check {
            name: "pmi-inject".into(),
            verdict: Verdict::Skipped,
            message: "--no-inject: the image's own PMI libraries are used".into(),
        });
        return;
    }
    for lib in &profile.pmi.host_libraries {
        match host.paths.get(lib.as_str()).and_then(|v| v.last()) {
            Some(p) => {
                let name = Path::new(lib.as_str())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Over the image's copy when its MPI links one by this name; otherwise
                // into the injection directory, found by soname.
                // With several images, each gets the host library over its own copy only.
                let multi = distinct_images(&plan.apps) > 1;
                let mut over: Vec<(Option<PathBuf>, String)> = plan
                    .apps
                    .iter()
                    .flat_map(|a| {
                        a.image
                            .pmi_libraries
                            .iter()
                            .map(move |l| (multi.then(|| a.image.path.clone()), l))
                    })
                    .filter(|(_, l)| l.name == name)
                    .map(|(i, l)| (i, l.real_file.clone()))
                    .collect();
                over.sort();
                over.dedup();
                if over.is_empty() {
                    plan.binds.push(lib_bind(p, "the profile injects the host PMI library (pmi.inject)"));
                }
                for (image, dest) in over {
                    plan.binds.push(Bind {
                        source: p.display().to_string(),
                        destination: dest,
                        kind: BindKind::Library,
                        read_only: true,
                        when: BindTime::Plan,
                        reason: format!("the host PMI library over the image's {name} (pmi.inject)"),
                        image,
                    });
                }
            }
            None => plan.checks.push(Check {
                name: "pmi-inject".into(),
                verdict: Verdict::Fail,
                message: format!("{}: no such file on this host, but profile {} injects it (pmi.host_libraries); fix the path or set pmi.inject: false", lib.as_str(), profile.name),
            }),
        }
    }
}

/// Puts the injection directory first on the ranks' `LD_LIBRARY_PATH` when a bind puts a
/// library there.
pub(super) fn inject_dir_on_library_path(plan: &mut LaunchPlan) {
    if plan
        .binds
        .iter()
        .any(|b| b.destination.starts_with(&format!("{INJECT_DIR}/")))
    {
        plan.env.push(env_change(
            "LD_LIBRARY_PATH",
            EnvAction::Prepend {
                value: INJECT_DIR.into(),
            },
            EnvScope::All,
            "the injected host libraries are found first by soname",
        ));
    }
}

/// A library bound into the injection directory under its own file name.
pub(super) fn lib_bind(src: &Path, reason: &str) -> Bind {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Bind {
        source: src.display().to_string(),
        destination: format!("{INJECT_DIR}/{name}"),
        kind: BindKind::Library,
        read_only: true,
        when: BindTime::Plan,
        reason: reason.to_owned(),
        image: None,
    }
}
