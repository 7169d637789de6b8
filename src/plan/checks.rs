//! The checks of a plan that weigh its inputs against each other: the profile against this
//! host, each image against the PMI the launch offers, the images of an MPMD job against each
//! other, and an image against the host libfabric injected into it. Each returns its verdicts
//! as values; the plan keeps them in order.

use std::collections::BTreeSet;
use std::path::Path;

use cmpirun_fabric::elf::SymbolVersion;

use super::parts::distinct_images;
use super::types::{AppPlan, Check, Verdict};
use crate::facts::{HostLibfabric, ImageSummary, LibfabricUse};
use crate::jobspec::{LauncherKind, PmiKind};
use crate::profile::{ProfileChoice, SelectedBy};

/// Whether the chosen profile fits this host (`profile-match`).
pub(super) fn profile_match_check(choice: &ProfileChoice) -> Check {
    let p = &choice.profile;
    let at = format!("{}:{}", p.file.display(), p.match_line.unwrap_or(1));
    match (&choice.outcome, choice.selected_by) {
        (_, SelectedBy::Match) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!("{}: {}", p.name, choice.reason),
        },
        (None, _) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!("{} has no match rules; used because it was named", p.name),
        },
        (Some(o), _) if o.matched => Check {
            name: "profile-match".into(),
            verdict: Verdict::Pass,
            message: format!(
                "{at}: {} matches this host: {}",
                p.name,
                o.reasons.join("; ")
            ),
        },
        (Some(o), _) => Check {
            name: "profile-match".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{at}: profile {} was named but its match rules do not hold on this host: {}; name the profile that fits this host, or use --force",
                p.name,
                o.reasons.join("; ")
            ),
        },
    }
}

/// Whether the image could be located (`image`).
fn image_check(image: &ImageSummary) -> Check {
    match (&image.kind, &image.error) {
        (_, Some(e)) => Check {
            name: "image".into(),
            verdict: Verdict::Fail,
            message: e.to_string(),
        },
        (Some(k), None) => Check {
            name: "image".into(),
            verdict: Verdict::Pass,
            message: format!("{}: {k} image", image.path.display()),
        },
        (None, None) => Check {
            name: "image".into(),
            verdict: Verdict::Skipped,
            message: format!("{}: not inspected", image.path.display()),
        },
    }
}

/// Whether the image's MPI family suits the PMI the launch offers.
fn mpi_family_check(image: &ImageSummary, kind: LauncherKind, pmi: PmiKind) -> Option<Check> {
    let family = image.mpi_family.as_deref()?;
    let img = image.path.display();
    let lib = image.mpi_library.clone().unwrap_or_default();
    Some(
        if family == "openmpi" && pmi != PmiKind::Pmix && kind != LauncherKind::Slurm {
            // Without a PMIx server every rank runs MPI on its own (a singleton); Debian's Open
            // MPI 4 has no PMI-1/PMI-2 client, and Open MPI 5 speaks only PMIx.
            Check {
                name: "mpi-family".into(),
                verdict: Verdict::Fail,
                message: format!(
                    "{img}: Open MPI ({lib}) needs a PMIx server, and the {} launcher serves {}: every rank would run as a singleton (a world of 1); {}, or inside a Slurm allocation (--launcher slurm --pmi pmix)",
                    kind.as_str(),
                    pmi.as_str(),
                    // --pmi pmix helps only where the launcher can serve it: hydra cannot.
                    if kind == LauncherKind::Hydra {
                        "hydra serves no PMIx: launch it with --launcher mpirun (Open MPI's mpirun serves PMIx, with the same -H/-f hosts)"
                    } else {
                        "launch it with --pmi pmix (the local launcher serves PMIx through the host's libpmix)"
                    }
                ),
            }
        } else if family == "openmpi" && pmi != PmiKind::Pmix {
            Check {
                name: "mpi-family".into(),
                verdict: Verdict::Warn,
                message: format!(
                    "{img}: Open MPI ({lib}) with {} under the {} launcher: Open MPI 5 speaks only PMIx (use --pmi pmix); Open MPI 4 needs its s1/s2 components built with Slurm's PMI libraries, else its ranks run as singletons (cmpirun then fails the job)",
                    pmi.as_str(),
                    kind.as_str()
                ),
            }
        } else {
            Check {
                name: "mpi-family".into(),
                verdict: Verdict::Pass,
                message: format!("{img}: {family} ({lib}) with {}", pmi.as_str()),
            }
        },
    )
}

/// The checks of the parts' images, in order: for each part, `image` and `mpi-family`; then
/// `mpmd-mpi` when the parts name several images.
pub(super) fn image_checks(apps: &[AppPlan], kind: LauncherKind, pmi: PmiKind) -> Vec<Check> {
    let mut checks = Vec::new();
    for app in apps {
        checks.push(image_check(&app.image));
        checks.extend(mpi_family_check(&app.image, kind, pmi));
    }
    checks.extend(mpmd_images_check(apps));
    checks
}

/// Whether the images of an MPMD job can form one MPI job: the ranks of every part speak to
/// each other, so they need one MPI family (MPICH ABI, Open MPI, MPI ABI), and preferably one
/// build of it. `None` for a job with one image.
fn mpmd_images_check(apps: &[AppPlan]) -> Option<Check> {
    if distinct_images(apps) < 2 {
        return None;
    }
    let describe = |i: usize| {
        let img = &apps[i].image;
        format!(
            "part {} ({}: {}{})",
            i + 1,
            img.path.display(),
            img.mpi_family.as_deref().unwrap_or("MPI unknown"),
            img.mpi_library
                .as_deref()
                .map(|l| format!(", {l}"))
                .unwrap_or_default()
        )
    };
    let unknown: Vec<String> = (0..apps.len())
        .filter(|&i| apps[i].image.mpi_family.is_none())
        .map(&describe)
        .collect();
    let first = (0..apps.len()).find(|&i| apps[i].image.mpi_family.is_some());
    let differs = first.and_then(|f| {
        (0..apps.len())
            .find(|&i| {
                apps[i].image.mpi_family.is_some()
                    && apps[i].image.mpi_family != apps[f].image.mpi_family
            })
            .map(|i| (f, i))
    });
    if let Some((a, b)) = differs {
        return Some(Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{} and {} use different MPI families: the ranks of one job exchange messages through one MPI library's wire protocol, so MPI_Init would fail or hang; build every part's program against one MPI (the images may differ otherwise)",
                describe(a),
                describe(b)
            ),
        });
    }
    if !unknown.is_empty() {
        return Some(Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Warn,
            message: format!(
                "the MPI of {} is not known, so whether the parts' images use one MPI family is not checked",
                unknown.join(", ")
            ),
        });
    }
    // Different versions or network modules of one MPI do not wire up with each other: MPICH
    // 4 over UCX and MPICH 5 over libfabric wait for each other in MPI_Init for ever.
    let mismatch = first.and_then(|f| {
        (0..apps.len()).find_map(|i| {
            let (x, y) = (&apps[f].image, &apps[i].image);
            if mpi_build(x) != mpi_build(y) {
                Some((f, i, "versions (library files)"))
            } else if netmods(x) != netmods(y) {
                Some((f, i, "network modules"))
            } else {
                None
            }
        })
    });
    if let Some((a, b, what)) = mismatch {
        return Some(Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{} and {} use one MPI family but different {what} ({} against {}): ranks of different builds of one MPI do not wire up with each other (MPI_Init waits for ever); use images with the same MPI build",
                describe(a),
                describe(b),
                build_text(&apps[a].image),
                build_text(&apps[b].image),
            ),
        });
    }
    let other_build = first.and_then(|f| {
        (0..apps.len())
            .find(|&i| apps[i].image.mpi_library != apps[f].image.mpi_library)
            .map(|i| (f, i))
    });
    Some(match other_build {
        Some((a, b)) => Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Warn,
            message: format!(
                "{} and {} use one MPI family but different library files: ranks of different versions or builds (devices, netmods) of one MPI may not interoperate; use images with the same MPI build if MPI_Init fails",
                describe(a),
                describe(b)
            ),
        },
        None => Check {
            name: "mpmd-mpi".into(),
            verdict: Verdict::Pass,
            message: format!(
                "the parts' {} images use one MPI ({}); every node holds them in one container (one user namespace, one /dev/shm), each image in its own mount namespace",
                distinct_images(apps),
                apps[0].image.mpi_library.as_deref().unwrap_or("?")
            ),
        },
    })
}

/// The MPI library's file name, which carries its version (`libmpich.so.12.2.2`).
fn mpi_build(image: &ImageSummary) -> Option<&str> {
    let lib = image.mpi_library.as_deref()?;
    Some(lib.rsplit('/').next().unwrap_or(lib))
}

/// The network modules the image's MPI stack loads, as far as its libraries tell: `ofi`
/// (libfabric) and `ucx` (`libucp`).
fn netmods(image: &ImageSummary) -> Vec<&'static str> {
    let mut mods = Vec::new();
    if matches!(
        image.libfabric_use,
        Some(LibfabricUse::Dynamic | LibfabricUse::Embedded | LibfabricUse::Unresolved)
    ) {
        mods.push("ofi");
    }
    if image.stack_files.iter().any(|f| {
        f.rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("libucp.so"))
    }) {
        mods.push("ucx");
    }
    mods
}

/// `libmpich.so.12.2.2 with ucx`, for messages.
fn build_text(image: &ImageSummary) -> String {
    let mods = netmods(image);
    format!(
        "{} with {}",
        mpi_build(image).unwrap_or("?"),
        if mods.is_empty() {
            "no known network module".to_owned()
        } else {
            mods.join("+")
        }
    )
}

fn parse_versions<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<SymbolVersion> {
    v.into_iter()
        .filter_map(|s| SymbolVersion::parse(s))
        .collect()
}

/// The checks between one image and the host libfabric injected into it: the MPI loads
/// libfabric dynamically, the host library defines every `FABRIC_x.y` the MPI needs, and the
/// image's glibc defines every `GLIBC_x.y` the host library and its dependencies need.
pub(super) fn compatibility_checks(
    image: &ImageSummary,
    host_lib: &Path,
    facts: Option<&HostLibfabric>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let img = image.path.display().to_string();
    let Some(usage) = image.libfabric_use else {
        checks.push(Check {
            name: "mpi-libfabric".into(),
            verdict: Verdict::Skipped,
            message: match &image.facts_error {
                Some(e) => format!("{img}: image facts not read: {e}"),
                None => format!("{img}: no MPI library found in the image"),
            },
        });
        return checks;
    };
    let mpi = image.mpi_library.clone().unwrap_or_default();
    let (verdict, message) = match usage {
        LibfabricUse::Dynamic => (
            Verdict::Pass,
            format!(
                "{img}: {mpi} loads libfabric.so.1 dynamically ({})",
                image
                    .libfabric
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        LibfabricUse::Embedded => (
            Verdict::Fail,
            format!(
                "{img}: {mpi} carries libfabric inside itself, so a host libfabric cannot be injected; build the image's MPI against an external libfabric (MPICH: --with-libfabric=PREFIX), or use --no-inject"
            ),
        ),
        LibfabricUse::Unresolved => (
            Verdict::Warn,
            format!(
                "{img}: {mpi} needs libfabric.so.1 but the image's loader does not find it; the host copy is put on LD_LIBRARY_PATH"
            ),
        ),
        LibfabricUse::NotLinked => (
            Verdict::Warn,
            format!(
                "{img}: {mpi} does not use libfabric; injecting {} has no effect",
                host_lib.display()
            ),
        ),
    };
    checks.push(Check {
        name: "mpi-libfabric".into(),
        verdict,
        message,
    });
    let Some(lf) = facts else {
        checks.push(Check {
            name: "fabric-versions".into(),
            verdict: Verdict::Skipped,
            message: format!("{}: not read", host_lib.display()),
        });
        return checks;
    };
    if usage == LibfabricUse::Dynamic || usage == LibfabricUse::Unresolved {
        let defined: BTreeSet<SymbolVersion> =
            parse_versions(&lf.fabric_versions).into_iter().collect();
        let needed = parse_versions(&image.fabric_needs);
        let missing = cmpirun_fabric::elf::missing_versions(&needed, &defined);
        let newest = defined
            .iter()
            .next_back()
            .map(ToString::to_string)
            .unwrap_or_else(|| "no FABRIC version".into());
        checks.push(if missing.is_empty() {
            Check {
                name: "fabric-versions".into(),
                verdict: Verdict::Pass,
                message: format!("{} defines every FABRIC version {img}'s MPI needs (up to {newest})", host_lib.display()),
            }
        } else {
            let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
            Check {
                name: "fabric-versions".into(),
                verdict: Verdict::Fail,
                message: format!("{} (libfabric defining up to {newest}) lacks {} that {img}'s MPI ({mpi}) needs; point fabric.libfabric at a newer libfabric, or use --no-inject", host_lib.display(), names.join(", ")),
            }
        });
    }
    match (
        lf.glibc_needs.as_deref().and_then(SymbolVersion::parse),
        image.glibc.as_deref().and_then(SymbolVersion::parse),
    ) {
        (Some(need), Some(have)) => {
            let by = lf
                .glibc_needed_by
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| host_lib.display().to_string());
            checks.push(if need <= have {
                Check {
                    name: "glibc".into(),
                    verdict: Verdict::Pass,
                    message: format!("{img} has {have}; the injected libraries need at most {need} ({by})"),
                }
            } else {
                Check {
                    name: "glibc".into(),
                    verdict: Verdict::Fail,
                    message: format!("{by} needs {need} but {img} has {have} ({}); use a host libfabric built for an older glibc, an image with a glibc of at least {need}, or --no-inject", image.glibc_file.clone().unwrap_or_default()),
                }
            });
        }
        (Some(need), None) => checks.push(Check {
            name: "glibc".into(),
            verdict: Verdict::Warn,
            message: format!(
                "the injected libraries need {need}, but {img}'s glibc version is not known"
            ),
        }),
        (None, _) => {}
    }
    checks
}

/// The check that says the profile sets `fabric.required` (ranks read it from the plan).
pub const REQUIRED_CHECK: &str = "fabric-required";

/// Whether the host libfabric offers the providers the profile (`fabric.providers`) and
/// `--expect-provider` expect (`fabric-providers`, one check per provider once it is probed),
/// and `fabric-required` when the profile requires ranks to use the host libfabric.
pub(super) fn provider_checks(
    choice: &ProfileChoice,
    expect_provider: Option<&String>,
    host_libfabric: Option<&HostLibfabric>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let fabric = &choice.profile.fabric;
    let mut expected: Vec<String> = fabric
        .providers
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    if let Some(p) = expect_provider
        && !expected.contains(p)
    {
        expected.push(p.clone());
    }
    if fabric.required == Some(true) {
        checks.push(Check {
            name: REQUIRED_CHECK.into(),
            verdict: Verdict::Pass,
            message: format!(
                "profile {} sets fabric.required: an MPI rank that loads no libfabric ends the job",
                choice.profile.name
            ),
        });
    }
    if expected.is_empty() {
        return checks;
    }
    if let Some((lf, providers)) =
        host_libfabric.and_then(|lf| lf.providers.as_ref().map(|ps| (lf, ps)))
    {
        let version = lf.version.clone().unwrap_or_else(|| "?".into());
        for p in expected {
            let ok = providers.contains(&p);
            checks.push(Check {
                name: "fabric-providers".into(),
                verdict: if ok { Verdict::Pass } else { Verdict::Fail },
                message: if ok {
                    format!("{} (libfabric {version}) offers provider {p}", lf.path.display())
                } else {
                    format!("{} (libfabric {version}) does not offer provider {p} on this node (it offers {}); check the devices and the provider installation, or drop the expectation", lf.path.display(), providers.join(", "))
                },
            });
        }
        return checks;
    }
    if let Some(e) = host_libfabric.and_then(|lf| lf.probe_error.as_ref()) {
        checks.push(Check {
            name: "fabric-providers".into(),
            verdict: Verdict::Warn,
            message: format!(
                "expected providers {}: {e}; checked in each rank after start",
                expected.join(", ")
            ),
        });
        return checks;
    }
    checks.push(Check {
        name: "fabric-providers".into(),
        verdict: Verdict::Skipped,
        message: format!("expected providers {}: checked on the host libfabric once it is probed, and in each rank after start", expected.join(", ")),
    });
    checks
}
