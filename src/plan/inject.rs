//! Host libraries into the image by soname: the injection directory on the ranks'
//! `LD_LIBRARY_PATH`, and the host PMI libraries the profile injects (`pmi.inject`). The host
//! libfabric is [`super::fabric`]'s.

use std::path::{Path, PathBuf};

use super::environment::env_change;
use super::parts::distinct_images;
use super::types::{Bind, BindKind, BindTime, Check, EnvAction, EnvScope, LaunchPlan, Verdict};
use crate::facts::{HostFacts, HostPmiLibrary};
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
                if let Some(read) = host.pmi_libraries.get(lib.as_str()) {
                    pmi_library_closure(plan, &name, read);
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

/// What an injected host PMI library brings along (`read`, its ELF facts): its dependency
/// closure into the injection directory (glibc left to the image, each file once), and per
/// image the `pmi-glibc` check (the image's glibc defines the newest `GLIBC_x.y` the closure
/// needs) and, for a libpmix, the `pmi-pmix-version` check (the host's PMIx client library
/// speaks to what the image's MPI was built against).
fn pmi_library_closure(plan: &mut LaunchPlan, name: &str, read: &HostPmiLibrary) {
    let host = read.path.display();
    if let Some(e) = &read.error {
        plan.checks.push(Check {
            name: "pmi-inject".into(),
            verdict: Verdict::Warn,
            message: format!(
                "{host}: its dependencies could not be read ({e}); it is injected alone"
            ),
        });
    }
    if !read.missing.is_empty() {
        plan.checks.push(Check {
            name: "pmi-inject".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{host} needs libraries this host's loader does not find: {}; install them, or set pmi.inject: false",
                read.missing.join(", ")
            ),
        });
    }
    for dep in &read.dependencies {
        let src = dep.display().to_string();
        if plan.binds.iter().any(|b| b.source == src) {
            continue;
        }
        plan.binds.push(lib_bind(
            dep,
            &format!(
                "needed by the host PMI library {name} (dependency closure, glibc left to the image)"
            ),
        ));
    }
    let mut seen: Vec<PathBuf> = Vec::new();
    let images: Vec<_> = plan.apps.iter().map(|a| a.image.clone()).collect();
    for image in images {
        if seen.contains(&image.path) {
            continue;
        }
        seen.push(image.path.clone());
        let img = image.path.display();
        if let Some(check) = pmi_glibc_check(read, &image) {
            plan.checks.push(check);
        }
        if let (Some(h), Some(c)) = (&read.pmix_version, &image.pmix_version) {
            plan.checks.push(match cmpirun_pmi::pmix::version::replaces(h, c) {
                Ok(()) => Check {
                    name: "pmi-pmix-version".into(),
                    verdict: Verdict::Pass,
                    message: format!(
                        "{host} (OpenPMIx {h}) replaces {img}'s libpmix (OpenPMIx {c})"
                    ),
                },
                Err(why) => Check {
                    name: "pmi-pmix-version".into(),
                    verdict: Verdict::Fail,
                    message: format!(
                        "{host} (OpenPMIx {h}) cannot replace {img}'s libpmix (OpenPMIx {c}): {why}; name a host PMIx of the image's release or later in pmi.host_libraries, or set pmi.inject: false"
                    ),
                },
            });
        }
    }
}

/// Whether `image`'s glibc defines the newest `GLIBC_x.y` the injected PMI library `read` and
/// its closure need (`pmi-glibc`).
fn pmi_glibc_check(read: &HostPmiLibrary, image: &crate::facts::ImageSummary) -> Option<Check> {
    use cmpirun_fabric::elf::SymbolVersion;
    let need = read.glibc_needs.as_deref().and_then(SymbolVersion::parse)?;
    let img = image.path.display();
    let by = read
        .glibc_needed_by
        .as_ref()
        .unwrap_or(&read.path)
        .display();
    Some(
        match image.glibc.as_deref().and_then(SymbolVersion::parse) {
            Some(have) if need <= have => Check {
                name: "pmi-glibc".into(),
                verdict: Verdict::Pass,
                message: format!(
                    "{img} has {have}; the injected PMI library {} needs at most {need} ({by})",
                    read.path.display()
                ),
            },
            Some(have) => Check {
                name: "pmi-glibc".into(),
                verdict: Verdict::Fail,
                message: format!(
                    "{by} needs {need} but {img} has {have}; use an image with a glibc of at least {need}, or set pmi.inject: false (or --no-inject)"
                ),
            },
            None => Check {
                name: "pmi-glibc".into(),
                verdict: Verdict::Warn,
                message: format!(
                    "the injected PMI library {} needs {need}, but {img}'s glibc version is not known",
                    read.path.display()
                ),
            },
        },
    )
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
