//! How ranks are started: the launcher (local, slurm, hydra) and why, the PMI the ranks speak,
//! and the command lines cmpirun runs for an external launcher.

use super::PlanError;
use super::nodes::{host_origin, hydra_hosts};
use super::types::{AppPlan, Check, CommandLine, LauncherPlan, Verdict};
use crate::facts::{HostFacts, ImageSummary};
use crate::jobspec::{JobSpec, LauncherKind, Mapping, PmiKind};
use crate::profile::SiteProfile;

/// The names Open MPI's launcher has on `PATH`, in the order they are preferred: Debian's
/// `mpirun.openmpi` (its `mpirun` may be MPICH's), Open MPI 5's `prterun`, then `mpirun`.
pub const MPIRUN_NAMES: [&str; 3] = ["mpirun.openmpi", "prterun", "mpirun"];

/// The Open MPI launcher found on `PATH` (the first of [`MPIRUN_NAMES`]), else `mpirun`.
fn mpirun_name(host: &HostFacts) -> &'static str {
    MPIRUN_NAMES
        .into_iter()
        .find(|n| host.programs.contains_key(*n))
        .unwrap_or("mpirun")
}

/// The placeholder in rank command lines for the path of the plan file the launcher writes.
pub const PLAN_FILE_PLACEHOLDER: &str = "{plan}";

/// The launcher and the PMI of the job, each with its reason; the command lines are added by
/// [`commands`] once the ranks are known.
pub(super) fn choose(
    spec: &JobSpec,
    profile: &SiteProfile,
    host: &HostFacts,
    images: &[ImageSummary],
) -> Result<LauncherPlan, PlanError> {
    let (kind, reason) = launcher_kind(spec, profile, host);
    let open_mpi = images
        .iter()
        .find(|i| i.mpi_family.as_deref() == Some("openmpi"));
    let (pmi, pmi_reason) = if let Some(p) = spec.pmi {
        (p, format!("--pmi {}", p.as_str()))
    } else if kind == LauncherKind::Mpirun {
        (
            PmiKind::Pmix,
            "Open MPI's mpirun serves PMIx to the ranks it starts".to_owned(),
        )
    } else if let Some(img) = open_mpi.filter(|_| kind == LauncherKind::Local) {
        (
            PmiKind::Pmix,
            format!(
                "{} holds Open MPI, which needs a PMIx server: the local launcher serves PMIx through the host's libpmix",
                img.path.display()
            ),
        )
    } else if let Some(p) = profile.pmi.kind {
        (
            p,
            format!("profile {} sets pmi.kind: {}", profile.name, p.as_str()),
        )
    } else {
        (PmiKind::Pmi2, "the default".to_owned())
    };
    if (pmi == PmiKind::Pmix && kind == LauncherKind::Hydra)
        || (pmi != PmiKind::Pmix && kind == LauncherKind::Mpirun)
    {
        return Err(PlanError::PmiUnsupported {
            pmi: pmi.as_str(),
            launcher: kind.as_str(),
        });
    }
    Ok(LauncherPlan {
        kind,
        reason,
        pmi,
        pmi_reason,
        commands: Vec::new(),
        pmix_libraries: if pmi == PmiKind::Pmix && kind == LauncherKind::Local {
            host.pmix_candidates(profile)
        } else {
            Vec::new()
        },
    })
}

/// Which launcher starts the ranks, and why: `--launcher`, the profile, a Slurm allocation, a
/// host list with `mpiexec.hydra` on `PATH`, else the local launcher.
fn launcher_kind(
    spec: &JobSpec,
    profile: &SiteProfile,
    host: &HostFacts,
) -> (LauncherKind, String) {
    let has_hosts = !spec.hosts.is_empty();
    let mpiexec = mpiexec_name(profile);
    if let Some(k) = spec.launcher {
        (k, format!("--launcher {}", k.as_str()))
    } else if let Some(k) = profile.launcher.kind.and_then(|c| c.fixed()) {
        (
            k,
            format!(
                "profile {} sets launcher.kind: {}",
                profile.name,
                k.as_str()
            ),
        )
    } else if let Some(id) = host.env.get("SLURM_JOB_ID") {
        (
            LauncherKind::Slurm,
            format!("inside a Slurm allocation ($SLURM_JOB_ID={id})"),
        )
    } else if has_hosts && host.programs.contains_key(&mpiexec) {
        (
            LauncherKind::Hydra,
            format!("{} given and {mpiexec} is on PATH", host_origin(spec)),
        )
    } else {
        (
            LauncherKind::Local,
            if has_hosts {
                format!(
                    "{} names only this host and {mpiexec} is not on PATH",
                    host_origin(spec)
                )
            } else {
                "no allocation and no host list: one node".to_owned()
            },
        )
    }
}

/// The `mpiexec` the profile names, else `mpiexec.hydra`.
fn mpiexec_name(profile: &SiteProfile) -> String {
    profile
        .launcher
        .mpiexec
        .clone()
        .unwrap_or_else(|| "mpiexec.hydra".into())
}

/// Whether the external launcher's program is on `PATH` (`launcher-program`); `None` for the
/// local launcher.
pub(super) fn program_check(
    launcher: &LauncherPlan,
    profile: &SiteProfile,
    host: &HostFacts,
) -> Option<Check> {
    let name = match launcher.kind {
        LauncherKind::Local => return None,
        LauncherKind::Slurm => "srun".to_owned(),
        LauncherKind::Hydra => mpiexec_name(profile),
        LauncherKind::Mpirun => mpirun_name(host).to_owned(),
    };
    Some(match host.programs.get(&name) {
        Some(p) => Check {
            name: "launcher-program".into(),
            verdict: Verdict::Pass,
            message: format!("{name} is {}", p.display()),
        },
        None => Check {
            name: "launcher-program".into(),
            verdict: Verdict::Fail,
            message: format!(
                "{name} is not on PATH; load the module that provides it, or choose another --launcher"
            ),
        },
    })
}

/// Whether the local launcher's PMIx server can serve the images' PMIx clients
/// (`pmix-server`): a host libpmix is there, and its version serves the version of each image's
/// libpmix. `None` when the local launcher does not serve PMIx.
pub(super) fn pmix_server_check(
    launcher: &LauncherPlan,
    apps: &[AppPlan],
    host: &HostFacts,
) -> Option<Check> {
    if launcher.kind != LauncherKind::Local || launcher.pmi != PmiKind::Pmix {
        return None;
    }
    let check = |verdict, message| Check {
        name: "pmix-server".into(),
        verdict,
        message,
    };
    let Some(lib) = &host.pmix else {
        // The dynamic linker may still find one by soname; the server says so at launch if not.
        return Some(check(
            Verdict::Warn,
            format!(
                "no host libpmix at {}; the PMIx server tries the dynamic linker's libpmix.so.2 at launch (install the host's PMIx, Debian: libpmix2, or name it in the profile's pmi.host_libraries)",
                launcher
                    .pmix_libraries
                    .iter()
                    .filter(|l| l.starts_with('/'))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let server = lib.version.as_deref();
    let mut seen = Vec::new();
    for app in apps {
        let img = &app.image;
        if seen.contains(&&img.path) {
            continue;
        }
        seen.push(&img.path);
        let (Some(s), Some(c)) = (server, img.pmix_version.as_deref()) else {
            continue;
        };
        if let Err(why) = cmpirun_pmi::pmix::version::compatible(s, c) {
            return Some(check(
                Verdict::Fail,
                format!(
                    "the host's libpmix {} (OpenPMIx {s}) cannot serve the PMIx client of {} (OpenPMIx {c}): {why}; use a host PMIx of 3.2 or later (pmi.host_libraries) and an image whose PMIx is 2.1 or later",
                    lib.path.display(),
                    img.path.display()
                ),
            ));
        }
    }
    let clients: Vec<String> = apps
        .iter()
        .filter_map(|a| {
            a.image
                .pmix_version
                .as_ref()
                .map(|v| format!("{} (OpenPMIx {v})", a.image.path.display()))
        })
        .collect();
    Some(check(
        Verdict::Pass,
        format!(
            "cmpirun's PMIx server loads {} (OpenPMIx {}), which serves {}",
            lib.path.display(),
            server.unwrap_or("of unknown version"),
            if clients.is_empty() {
                "the images' PMIx clients (their version is not known)".to_owned()
            } else {
                clients.join(", ")
            }
        ),
    ))
}

/// The command lines that start the `size` ranks of `apps` (none for the local launcher, which
/// starts the ranks itself): every rank is `cmpirun __rank --plan {plan}`.
pub(super) fn commands(
    spec: &JobSpec,
    profile: &SiteProfile,
    host: &HostFacts,
    launcher: &LauncherPlan,
    apps: &[AppPlan],
    size: u32,
) -> Vec<CommandLine> {
    let rank_cmd = [
        host.cmpirun.display().to_string(),
        "__rank".to_owned(),
        "--plan".to_owned(),
        PLAN_FILE_PLACEHOLDER.to_owned(),
    ];
    match launcher.kind {
        LauncherKind::Local => Vec::new(),
        LauncherKind::Slurm => vec![srun_command(spec, profile, launcher.pmi, size, &rank_cmd)],
        LauncherKind::Hydra => vec![hydra_command(spec, profile, apps, size, &rank_cmd)],
        LauncherKind::Mpirun => vec![mpirun_command(spec, host, apps, size, &rank_cmd)],
    }
}

/// `srun … cmpirun __rank --plan {plan}`.
fn srun_command(
    spec: &JobSpec,
    profile: &SiteProfile,
    pmi: PmiKind,
    size: u32,
    rank_cmd: &[String],
) -> CommandLine {
    let mut argv = vec![
        "srun".to_owned(),
        format!("--mpi={}", pmi.as_str()),
        "-n".to_owned(),
        size.to_string(),
    ];
    if let Some(p) = spec.ppn {
        argv.push(format!("--ntasks-per-node={p}"));
    }
    if spec.mapping == Mapping::Cyclic {
        argv.push("--distribution=cyclic".to_owned());
    }
    argv.push("--kill-on-bad-exit=1".to_owned());
    argv.extend(profile.launcher.srun_args.iter().cloned());
    argv.extend(rank_cmd.iter().cloned());
    CommandLine {
        argv,
        why: format!(
            "srun starts every rank (Slurm's {} server wires them up); each task is cmpirun in rank mode, which joins or creates its node's container and execs the rank; --kill-on-bad-exit ends the job when a rank fails, as mpirun does",
            pmi.as_str()
        ),
    }
}

/// One `-n K RANK_CMD` section per MPMD part, separated by `:` (hydra's and mpirun's syntax), so
/// that the launcher tells each rank its part's number (`MPI_APPNUM`).
fn push_mpmd_sections(argv: &mut Vec<String>, apps: &[AppPlan], rank_cmd: &[String]) {
    for (i, app) in apps.iter().enumerate() {
        if i > 0 {
            argv.push(":".to_owned());
        }
        argv.extend(["-n".to_owned(), app.ranks.to_string()]);
        argv.extend(rank_cmd.iter().cloned());
    }
}

/// `mpirun … cmpirun __rank --plan {plan}`, one application context per MPMD part: Open MPI's
/// launcher starts every task and serves PMIx to the ranks (its PMIx server directories are under
/// `/tmp`, which every node instance binds).
fn mpirun_command(
    spec: &JobSpec,
    host: &HostFacts,
    apps: &[AppPlan],
    size: u32,
    rank_cmd: &[String],
) -> CommandLine {
    let mpirun = mpirun_name(host);
    let mut argv = vec![mpirun.to_owned()];
    match &spec.hostfile {
        Some(f) => argv.extend(["--hostfile".to_owned(), f.display().to_string()]),
        None if !spec.hosts.is_empty() => argv.extend(["-H".to_owned(), hydra_hosts(spec)]),
        None => {}
    }
    if let Some(p) = spec.ppn {
        argv.extend(["--npernode".to_owned(), p.to_string()]);
    }
    if spec.mapping == Mapping::Cyclic {
        argv.extend(["--map-by".to_owned(), "node".to_owned()]);
    }
    // cmpirun places more ranks than CPUs as the local launcher does; Open MPI would refuse.
    argv.push("--oversubscribe".to_owned());
    // mpirun passes only named variables to other nodes: the plan and the report address.
    for var in ["CMPIRUN_PLAN", "CMPIRUN_REPORT"] {
        argv.extend(["-x".to_owned(), var.to_owned()]);
    }
    let mpmd = apps.len() > 1;
    if mpmd {
        push_mpmd_sections(&mut argv, apps, rank_cmd);
    } else {
        argv.extend(["-n".to_owned(), size.to_string()]);
        argv.extend(rank_cmd.iter().cloned());
    }
    CommandLine {
        argv,
        why: format!(
            "{mpirun} (Open MPI's launcher) starts every rank{} and serves PMIx; each rank is cmpirun in rank mode, which joins or creates its node's container and execs the rank with the PMIx variables and server directories mpirun gave it",
            if mpmd {
                ", one application context per MPMD part (its MPI_APPNUM)"
            } else {
                ""
            }
        ),
    }
}

/// `mpiexec.hydra … cmpirun __rank --plan {plan}`, one section per MPMD part.
fn hydra_command(
    spec: &JobSpec,
    profile: &SiteProfile,
    apps: &[AppPlan],
    size: u32,
    rank_cmd: &[String],
) -> CommandLine {
    let mpiexec = mpiexec_name(profile);
    let mut argv = vec![mpiexec.clone()];
    match &spec.hostfile {
        Some(f) => argv.extend(["-f".to_owned(), f.display().to_string()]),
        None => argv.extend(["-hosts".to_owned(), hydra_hosts(spec)]),
    }
    // An MPMD job is given to hydra as one section per part, so that hydra's PMI tells
    // each rank its part's number (MPI_APPNUM), as the local launcher does.
    let mpmd = apps.len() > 1;
    if !mpmd {
        argv.extend(["-n".to_owned(), size.to_string()]);
    }
    if let Some(p) = spec.ppn {
        argv.extend(["-ppn".to_owned(), p.to_string()]);
    }
    if spec.mapping == Mapping::Cyclic {
        argv.push("-rr".to_owned());
    }
    argv.extend(profile.launcher.mpiexec_args.iter().cloned());
    if mpmd {
        push_mpmd_sections(&mut argv, apps, rank_cmd);
    } else {
        argv.extend(rank_cmd.iter().cloned());
    }
    CommandLine {
        argv,
        why: format!(
            "{mpiexec} starts every rank on the listed hosts and serves PMI{}; each rank is cmpirun in rank mode, which joins or creates its node's container and execs the rank",
            if mpmd {
                ", one section per MPMD part (its MPI_APPNUM)"
            } else {
                ""
            }
        ),
    }
}
