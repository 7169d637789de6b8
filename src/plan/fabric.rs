//! The profile's `fabric` section: the host libfabric bound over the file each image's MPI
//! loads (or into the injection directory), its dependency closure and provider plugins, the
//! site's extra fabric libraries and devices, and the checks between the images and the host
//! libfabric.

use std::path::{Path, PathBuf};

use super::checks::{compatibility_checks, provider_checks};
use super::environment::env_change;
use super::inject::{INJECT_DIR, lib_bind};
use super::parts::distinct_images;
use super::types::{Bind, BindKind, BindTime, Check, EnvAction, EnvScope, LaunchPlan, Verdict};
use crate::facts::{HostFacts, HostLibfabric, ImageSummary};
use crate::profile::{HostPath, ProfileChoice, SiteProfile};

/// Adds the fabric's binds, environment and checks to `plan`.
pub(super) fn plan_fabric(plan: &mut LaunchPlan, choice: &ProfileChoice, host: &HostFacts) {
    let profile = &choice.profile;
    let fabric = &profile.fabric;
    if let Some(skipped) = injection_skipped(plan, profile) {
        plan.checks.push(skipped);
    } else {
        match host.libfabric_named_by(profile) {
            Some((pattern, path)) => host_libfabric(plan, profile, host, pattern, &path),
            None if !fabric.libfabric.is_empty() => {
                let expanded: Vec<String> = fabric
                    .libfabric
                    .iter()
                    .map(|c| c.as_str().to_owned())
                    .collect();
                plan.checks.push(Check {
            name: "host-libfabric".into(),
            verdict: Verdict::Fail,
            message: format!("no host libfabric at {} (profile {}, fabric.libfabric in {}); fix the path, or use --no-inject to run on the image's libfabric", expanded.join(", "), profile.name, profile.file.display()),
        });
            }
            None => {}
        }
        provider_dir(plan, profile, host);
        fabric_libraries(plan, profile, host);
        devices(plan, profile, host);
    }
    let providers = provider_checks(
        choice,
        plan.job.expect_provider.as_ref(),
        host.libfabric.as_ref(),
    );
    plan.checks.extend(providers);
}

/// Why nothing of the host's fabric is injected (`host-libfabric`, skipped), if it is not: the
/// profile names no fabric, `--no-inject`, or `fabric.inject: false`.
fn injection_skipped(plan: &LaunchPlan, profile: &SiteProfile) -> Option<Check> {
    let fabric = &profile.fabric;
    if fabric.libfabric.is_empty() && fabric.devices.is_empty() && fabric.libraries.is_empty() {
        return Some(Check {
            name: "host-libfabric".into(),
            verdict: Verdict::Skipped,
            message: format!(
                "profile {} names no host libfabric: the image's own libfabric is used",
                profile.name
            ),
        });
    }
    if plan.job.no_inject || fabric.inject == Some(false) {
        return Some(Check {
            name: "host-libfabric".into(),
            verdict: Verdict::Skipped,
            message: if plan.job.no_inject {
                "--no-inject: the image's own libfabric is used".into()
            } else {
                format!("profile {} sets fabric.inject: false", profile.name)
            },
        });
    }
    None
}

/// The host libfabric at `path` (found from the profile's `pattern`): its checks, the binds
/// over each image's copy, its dependencies and its provider plugins.
fn host_libfabric(
    plan: &mut LaunchPlan,
    profile: &SiteProfile,
    host: &HostFacts,
    pattern: &HostPath,
    path: &Path,
) {
    let defines = host
        .libfabric
        .as_ref()
        .and_then(|l| l.fabric_versions.last())
        .map(|v| format!(", defines up to {v}"))
        .unwrap_or_default();
    plan.checks.push(Check {
        name: "host-libfabric".into(),
        verdict: Verdict::Pass,
        message: format!("{} (from {}){defines}", path.display(), pattern.as_str()),
    });
    if let Some(e) = &host.libfabric_error {
        plan.checks.push(Check {
            name: "host-libfabric-facts".into(),
            verdict: Verdict::Fail,
            message: format!("{e}; fix fabric.libfabric in {}", profile.file.display()),
        });
    }
    let checks: Vec<Check> = plan
        .apps
        .iter()
        .flat_map(|a| compatibility_checks(&a.image, path, host.libfabric.as_ref()))
        .collect();
    plan.checks.extend(checks);
    libfabric_over_images(plan, path);
    if let Some(lf) = &host.libfabric {
        dependency_binds(plan, profile, lf);
    }
}

/// Binds the host libfabric at `path` over the file each image's MPI loads, or into the
/// injection directory where that file is not known.
fn libfabric_over_images(plan: &mut LaunchPlan, path: &Path) {
    let targets: Vec<&ImageSummary> = plan.apps.iter().map(|a| &a.image).collect();
    let known: Vec<PathBuf> = targets.iter().filter_map(|i| i.libfabric.clone()).collect();
    // With several images, each is decided on its own: the host library over the file
    // its MPI loads, only in its own root; or, where that file is not known, into the
    // injection directory of that root.
    let multi = distinct_images(&plan.apps) > 1;
    let over_bind = |image: Option<PathBuf>, dest: &Path| {
        Bind {
        source: path.display().to_string(),
        destination: dest.display().to_string(),
        kind: BindKind::Library,
        read_only: true,
        when: BindTime::Plan,
        reason: "the host libfabric over the exact file the image's MPI loads, so RPATH, RUNPATH and the image's ld.so.cache all find it".into(),
        image,
    }
    };
    let unknown_target = |img: &str| Check {
        name: "libfabric-target".into(),
        verdict: Verdict::Warn,
        message: format!(
            "where {img}'s MPI loads libfabric from is not known, so {} goes into {INJECT_DIR} on LD_LIBRARY_PATH; an RPATH in the image's MPI would still win",
            path.display()
        ),
    };
    if multi {
        let mut seen: Vec<PathBuf> = Vec::new();
        for i in &targets {
            if seen.contains(&i.path) {
                continue;
            }
            seen.push(i.path.clone());
            match &i.libfabric {
                Some(dest) => plan.binds.push(over_bind(Some(i.path.clone()), dest)),
                None => {
                    let mut b = lib_bind(path, "the host libfabric, found through LD_LIBRARY_PATH");
                    b.image = Some(i.path.clone());
                    plan.binds.push(b);
                    plan.checks
                        .push(unknown_target(&i.path.display().to_string()));
                }
            }
        }
    } else if known.len() == targets.len() && !known.is_empty() {
        let mut seen = Vec::new();
        for dest in known {
            if seen.contains(&dest) {
                continue;
            }
            plan.binds.push(over_bind(None, &dest));
            seen.push(dest);
        }
    } else {
        plan.binds.push(lib_bind(
            path,
            "the host libfabric, found through LD_LIBRARY_PATH",
        ));
        plan.checks.push(unknown_target("the image"));
    }
}

/// The host libfabric's dependency closure into the injection directory, and its provider
/// plugin directories with `FI_PROVIDER_PATH` unless the profile names `fabric.provider_dir`.
fn dependency_binds(plan: &mut LaunchPlan, profile: &SiteProfile, lf: &HostLibfabric) {
    let fabric = &profile.fabric;
    for dep in &lf.dependencies {
        plan.binds.push(lib_bind(
            dep,
            "needed by the host libfabric or its providers (dependency closure, glibc left to the image)",
        ));
    }
    if fabric.provider_dir.is_none() && !lf.plugin_dirs.is_empty() {
        let dirs: Vec<String> = lf
            .plugin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        provider_plugins(plan, &dirs);
    }
}

/// The profile's `fabric.provider_dir`, with `FI_PROVIDER_PATH`.
fn provider_dir(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    if let Some(dir) = &profile.fabric.provider_dir {
        match host.paths.get(dir.as_str()).and_then(|v| v.last()) {
            Some(d) => provider_plugins(plan, &[d.display().to_string()]),
            None => plan.checks.push(Check {
                name: "provider-dir".into(),
                verdict: Verdict::Fail,
                message: format!("{}: no such directory on this host (profile {}, fabric.provider_dir); fix the path", dir.as_str(), profile.name),
            }),
        }
    }
}

/// The profile's `fabric.libraries`, into the injection directory.
fn fabric_libraries(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    for lib in &profile.fabric.libraries {
        match host.paths.get(lib.as_str()).and_then(|v| v.last()) {
            Some(p) => {
                plan.binds.push(lib_bind(
                    p,
                    "a library the host libfabric needs (fabric.libraries)",
                ));
            }
            None => plan.checks.push(Check {
                name: "fabric-library".into(),
                verdict: Verdict::Warn,
                message: format!(
                    "{}: not on this host (profile {}, fabric.libraries); skipped",
                    lib.as_str(),
                    profile.name
                ),
            }),
        }
    }
}

/// The profile's `fabric.devices`.
fn devices(plan: &mut LaunchPlan, profile: &SiteProfile, host: &HostFacts) {
    for dev in &profile.fabric.devices {
        let found = host.paths.get(dev.as_str()).cloned().unwrap_or_default();
        if found.is_empty() {
            plan.checks.push(Check {
                name: "fabric-device".into(),
                verdict: Verdict::Warn,
                message: format!("{}: no such device on this host (profile {}, fabric.devices); the fabric may fall back to a slower path", dev.as_str(), profile.name),
            });
        }
        for d in found {
            let d = d.display().to_string();
            plan.binds.push(Bind {
                source: d.clone(),
                destination: d,
                kind: BindKind::Device,
                read_only: false,
                when: BindTime::Plan,
                reason: format!(
                    "fabric device (profile {}, fabric.devices {})",
                    profile.name,
                    dev.as_str()
                ),
                image: None,
            });
        }
    }
}

/// Binds the host libfabric's provider plugin directories `dirs` and points `FI_PROVIDER_PATH`
/// at them.
fn provider_plugins(plan: &mut LaunchPlan, dirs: &[String]) {
    for d in dirs {
        plan.binds.push(Bind {
            source: d.clone(),
            destination: d.clone(),
            kind: BindKind::Directory,
            read_only: true,
            when: BindTime::Plan,
            reason: "the host libfabric's provider plugins, built against it".into(),
            image: None,
        });
    }
    plan.env.push(env_change(
        "FI_PROVIDER_PATH",
        EnvAction::Set {
            value: dirs.join(":"),
        },
        EnvScope::All,
        "libfabric loads the host's DL providers from here instead of the image's",
    ));
}
