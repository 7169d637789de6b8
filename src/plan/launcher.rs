//! How ranks are started: the launcher (local, slurm, hydra) and why, the PMI the ranks speak,
//! and the command lines cmpirun runs for an external launcher.

use super::PlanError;
use super::nodes::{host_origin, hydra_hosts};
use super::output_files::srun_pattern;
use super::types::{AppPlan, Check, CommandLine, LauncherPlan, Verdict};
use crate::facts::{HostFacts, ImageSummary};
use crate::jobspec::{BindTo, BindingSpec, JobSpec, LauncherKind, Mapping, PmiKind};
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

/// srun's words for `binding`: `--cpu-bind=[verbose,]TYPE`, `--cpus-per-task=N` and, when
/// ranks may share cores, `--overcommit`. srun has no cache binding: L1 and L2 caches become
/// cores, L3 sockets ([`unapplied_binding`] says so).
fn srun_binding(binding: &BindingSpec) -> Vec<String> {
    let mut args = Vec::new();
    let kind = match binding.effective() {
        BindTo::None if binding.to.is_none() => None,
        BindTo::None => Some("none".to_owned()),
        BindTo::Hwthread | BindTo::Rr => Some("threads".to_owned()),
        BindTo::Core | BindTo::L1cache | BindTo::L2cache => Some("cores".to_owned()),
        BindTo::Socket | BindTo::L3cache => Some("sockets".to_owned()),
        BindTo::Numa => Some("ldoms".to_owned()),
        BindTo::Machine => Some("boards".to_owned()),
        BindTo::User => Some(format!(
            "mask_cpu:{}",
            binding
                .user
                .iter()
                .map(|s| hex_mask(s))
                .collect::<Vec<_>>()
                .join(",")
        )),
    };
    match (binding.report, kind) {
        (true, Some(k)) => args.push(format!("--cpu-bind=verbose,{k}")),
        (true, None) => args.push("--cpu-bind=verbose".to_owned()),
        (false, Some(k)) => args.push(format!("--cpu-bind={k}")),
        (false, None) => {}
    }
    if let Some(n) = binding.cpus_per_rank {
        args.push(format!("--cpus-per-task={n}"));
    }
    if binding.overload {
        args.push("--overcommit".to_owned());
    }
    args
}

/// `0x5` for CPUs 0 and 2: a CPU set as the hexadecimal mask srun's `mask_cpu:` takes.
fn hex_mask(cpus: &[usize]) -> String {
    let top = cpus.iter().max().map_or(0, |&c| c / 4);
    let digits: String = (0..=top)
        .rev()
        .map(|nibble| {
            let bits = (0..4)
                .filter(|b| cpus.contains(&(nibble * 4 + b)))
                .fold(0u32, |a, b| a | 1 << b);
            char::from_digit(bits, 16).unwrap_or('0')
        })
        .collect();
    format!("0x{digits}")
}

/// hydra's `-bind-to OBJECT[:N]`: `N` objects per rank, so cores or hardware threads per rank
/// (`--cpus-per-rank`) go there only when the object is a core or a hardware thread; `user:`
/// sets in hydra's form. hydra wraps ranks around the objects itself (overload).
fn hydra_binding(binding: &BindingSpec) -> String {
    let to = binding.effective();
    match binding.cpus_per_rank {
        _ if to == BindTo::User => format!(
            "user:{}",
            binding
                .user
                .iter()
                .map(|s| s.iter().map(usize::to_string).collect::<Vec<_>>().join("+"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(n) if matches!(to, BindTo::Core | BindTo::Hwthread) => format!("{}:{n}", to.as_str()),
        _ => to.as_str().to_owned(),
    }
}

/// Open MPI mpirun's binding flags: `--bind-to OBJECT[:overload-allowed]`, `--map-by
/// slot|node:PE=N` for several CPUs per rank, `--report-bindings`. Its names: `board` for the
/// machine, hardware threads for `rr`; `user:` sets are not passed ([`unapplied_binding`]).
fn mpirun_binding(binding: &BindingSpec, mapping: Mapping) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(n) = binding.cpus_per_rank {
        let by = if mapping == Mapping::Cyclic {
            "node"
        } else {
            "slot"
        };
        argv.extend(["--map-by".to_owned(), format!("{by}:PE={n}")]);
    }
    if binding.to.is_some() || binding.cpus_per_rank.is_some() {
        let object = match binding.effective() {
            BindTo::Machine => "board",
            BindTo::Rr => "hwthread",
            BindTo::User => "none",
            to => to.as_str(),
        };
        let overload = if binding.overload || binding.effective() == BindTo::Rr {
            ":overload-allowed"
        } else {
            ""
        };
        argv.extend(["--bind-to".to_owned(), format!("{object}{overload}")]);
    }
    if binding.report {
        argv.push("--report-bindings".to_owned());
    }
    argv
}

/// One warning for each binding request `kind` does not apply as asked: a rankfile outside the
/// local launcher, srun's nearest object for a cache, `user:` sets under mpirun.
pub(super) fn unapplied_binding(spec: &JobSpec, kind: LauncherKind) -> Vec<String> {
    let b = &spec.binding;
    let mut w = Vec::new();
    if let Some(rf) = &b.rankfile
        && kind != LauncherKind::Local
    {
        w.push(format!(
            "--rankfile {}: not applied under the {} launcher (it places and binds the ranks \
             itself; the local launcher applies a rankfile's slots)",
            rf.path.display(),
            kind.as_str()
        ));
    }
    let to = b.effective();
    if kind == LauncherKind::Slurm
        && matches!(to, BindTo::L1cache | BindTo::L2cache | BindTo::L3cache)
    {
        w.push(format!(
            "--bind-to {}: srun binds to no cache; the ranks are bound to {} instead",
            to.as_str(),
            if to == BindTo::L3cache {
                "sockets"
            } else {
                "cores"
            }
        ));
    }
    if kind == LauncherKind::Mpirun && to == BindTo::User {
        w.push(
            "--bind-to user:…: not applied under the mpirun launcher (Open MPI's mpirun has no \
             such sets); the ranks are not bound"
                .to_owned(),
        );
    }
    w
}

/// Who binds the ranks to CPUs and how, for `--dry-run` and `-v`; `None` when no binding flag
/// was given (the ranks are not bound).
pub fn binding_text(spec: &JobSpec, kind: LauncherKind) -> Option<String> {
    let b = &spec.binding;
    if !b.asked() {
        return None;
    }
    let mut what = match (b.effective(), b.cpus_per_rank) {
        _ if b.rankfile.is_some() && kind == LauncherKind::Local => {
            "bound to the slots of the rankfile".to_owned()
        }
        (BindTo::None, _) => "not bound".to_owned(),
        (to, Some(n)) => format!("bound to {} ({n} per rank)", to.as_str()),
        (to, None) => format!("bound to {}", to.as_str()),
    };
    if b.overload && b.rankfile.is_none() {
        what.push_str(", several per core when there are more ranks than cores (overload allowed)");
    }
    Some(match kind {
        LauncherKind::Local => format!(
            "ranks {what}: by cmpirun, from this node's topology (hwloc) within the CPUs it may \
             use (its affinity: cgroup cpuset, taskset, a Slurm step){}",
            if b.report {
                "; --report-bindings prints each rank's CPUs"
            } else {
                ""
            }
        ),
        LauncherKind::Slurm => format!(
            "ranks {what}: by srun ({}), which binds the tasks of its step within the allocation",
            srun_binding(b).join(" ")
        ),
        LauncherKind::Hydra => format!(
            "ranks {what}: by mpiexec.hydra (-bind-to {})",
            hydra_binding(b)
        ),
        LauncherKind::Mpirun => format!(
            "ranks {what}: by Open MPI's mpirun ({})",
            mpirun_binding(b, spec.mapping).join(" ")
        ),
    })
}

/// One warning for each output flag of `spec` that `kind` does not apply: the local launcher
/// applies them all; srun and hydra own the ranks' output and apply what they have flags for.
pub(super) fn unapplied_output_flags(spec: &JobSpec, kind: LauncherKind) -> Vec<String> {
    let by = match kind {
        LauncherKind::Local => return Vec::new(),
        LauncherKind::Slurm => "srun",
        LauncherKind::Hydra => "mpiexec.hydra",
        LauncherKind::Mpirun => "mpirun",
    };
    let mut w = Vec::new();
    let mut not_applied = |flag: &str, what: &str| {
        w.push(format!(
            "{flag}: not applied under the {} launcher ({by} writes the ranks' output{what})",
            kind.as_str()
        ));
    };
    if spec.timestamp_output {
        not_applied("--timestamp-output", " and has no timestamps");
    }
    let merged_by_srun = kind == LauncherKind::Slurm && spec.output_files.stdout.is_some();
    if spec.merge_stderr && !merged_by_srun {
        not_applied(
            "--merge-stderr-to-stdout",
            if kind == LauncherKind::Slurm {
                "; with -outfile-pattern srun writes both streams into that file"
            } else {
                ""
            },
        );
    }
    if spec.print_all_exitcodes && kind == LauncherKind::Slurm {
        not_applied("-print-all-exitcodes", " and names the failed tasks itself");
    }
    if kind == LauncherKind::Mpirun {
        if spec.output_files.stdout.is_some() || spec.output_files.stderr.is_some() {
            not_applied("-outfile-pattern/-errfile-pattern/--output-filename", "");
        }
        if spec.print_all_exitcodes {
            not_applied("-print-all-exitcodes", "");
        }
    }
    if kind == LauncherKind::Slurm
        && spec.output_files.stdout.is_some()
        && spec.output_files.stderr.is_none()
        && !spec.merge_stderr
    {
        w.push(
            "-outfile-pattern without -errfile-pattern: srun writes the ranks' standard error \
             into the same files"
                .to_owned(),
        );
    }
    if spec.binding.report && kind == LauncherKind::Hydra {
        w.push(
            "--report-bindings: not applied under the hydra launcher (mpiexec.hydra binds the \
             ranks and does not print their CPUs)"
                .to_owned(),
        );
    }
    w
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
    let version = lib.version();
    let server = version.as_deref();
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
    // The plugin is the PMI kind's name unless the profile names another (`cray_shasta`).
    let plugin = profile
        .launcher
        .srun_mpi
        .as_ref()
        .map_or(pmi.as_str(), |p| p.as_str());
    let mut argv = vec![
        "srun".to_owned(),
        format!("--mpi={plugin}"),
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
    argv.extend(srun_binding(&spec.binding));
    let files = &spec.output_files;
    let width = files.rank_width(size);
    if let Some(p) = &files.stdout {
        argv.push(format!("--output={}", srun_pattern(p, width)));
    }
    // srun writes standard error into the --output file unless --error names another one.
    if let Some(p) = files.stderr.as_ref().filter(|_| !spec.merge_stderr) {
        argv.push(format!("--error={}", srun_pattern(p, width)));
    }
    argv.extend(profile.launcher.srun_args.iter().cloned());
    argv.extend(rank_cmd.iter().cloned());
    CommandLine {
        argv,
        why: format!(
            "srun starts every rank (Slurm's {plugin} plugin wires them up); each task is cmpirun in rank mode, which joins or creates its node's container and execs the rank; --kill-on-bad-exit ends the job when a rank fails, as mpirun does"
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
    if spec.binding.cpus_per_rank.is_some() {
        argv.extend(mpirun_binding(&spec.binding, spec.mapping));
    } else {
        if spec.mapping == Mapping::Cyclic {
            argv.extend(["--map-by".to_owned(), "node".to_owned()]);
        }
        argv.extend(mpirun_binding(&spec.binding, spec.mapping));
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
    // The hosts as cmpirun read them (`-H`, or the hostfile in MPICH's or Open MPI's form):
    // hydra reads only MPICH's `host:n` and rejects Open MPI's `host slots=n`.
    argv.extend(["-hosts".to_owned(), hydra_hosts(spec)]);
    // An MPMD job is given to hydra as one section per part, so that hydra's PMI tells
    // each rank its part's number (MPI_APPNUM), as the local launcher does.
    let mpmd = apps.len() > 1;
    if !mpmd {
        argv.extend(["-n".to_owned(), size.to_string()]);
    }
    // Round-robin is one rank per node per round: hydra 4 has no -rr any more, -ppn 1 is it.
    match (spec.ppn, spec.mapping) {
        (Some(p), _) => argv.extend(["-ppn".to_owned(), p.to_string()]),
        (None, Mapping::Cyclic) => argv.extend(["-ppn".to_owned(), "1".to_owned()]),
        (None, _) => {}
    }
    if spec.binding.to.is_some() || spec.binding.cpus_per_rank.is_some() {
        argv.extend(["-bind-to".to_owned(), hydra_binding(&spec.binding)]);
    }
    if let Some(b) = &spec.hydra_bootstrap {
        argv.extend(["-bootstrap".to_owned(), b.clone()]);
    }
    if let Some(p) = &spec.output_files.stdout {
        argv.extend(["-outfile-pattern".to_owned(), p.clone()]);
    }
    if let Some(p) = &spec.output_files.stderr {
        argv.extend(["-errfile-pattern".to_owned(), p.clone()]);
    }
    if spec.print_all_exitcodes {
        argv.push("-print-all-exitcodes".to_owned());
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
            "{mpiexec} starts every rank on the listed hosts ({}, as -hosts) and serves PMI{}; each rank is cmpirun in rank mode, which joins or creates its node's container and execs the rank",
            super::nodes::host_origin(spec),
            if mpmd {
                ", one section per MPMD part (its MPI_APPNUM)"
            } else {
                ""
            }
        ),
    }
}
