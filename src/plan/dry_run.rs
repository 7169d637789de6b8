//! The human form of a launch plan (`cmpirun --dry-run`): every decision with its reason.

use std::fmt::Write;

use super::types::{BindKind, BindTime, EnvAction, EnvChange, EnvScope, LaunchPlan, Verdict};
use crate::jobspec::LauncherKind;

/// Renders `plan` as text for people: profile, launcher and command lines, rank layout, mount,
/// binds, environment and checks, each with why.
pub fn dry_run_text(plan: &LaunchPlan) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = write_plan(&mut o, plan);
    o
}

fn write_plan(o: &mut String, plan: &LaunchPlan) -> std::fmt::Result {
    let p = &plan.profile;
    writeln!(o, "profile: {} ({})", p.name, p.file.display())?;
    writeln!(o, "  why: {}", p.reason)?;
    if p.chain.len() > 1 {
        let chain: Vec<String> = p.chain.iter().map(|f| f.display().to_string()).collect();
        writeln!(o, "  merged from: {}", chain.join(" <- "))?;
    }
    let l = &plan.launcher;
    writeln!(o, "launcher: {}", l.kind.as_str())?;
    writeln!(o, "  why: {}", l.reason)?;
    writeln!(o, "pmi: {}", l.pmi.as_str())?;
    writeln!(o, "  why: {}", l.pmi_reason)?;
    if l.kind == LauncherKind::Local {
        writeln!(
            o,
            "  cmpirun starts one container on this node and {} rank(s) in it, served by {}",
            plan.layout.size,
            if l.pmi == crate::jobspec::PmiKind::Pmix {
                "its PMIx server (the host's libpmix, in a process of its own)"
            } else {
                "its own PMI server"
            }
        )?;
        if !l.pmix_libraries.is_empty() {
            writeln!(
                o,
                "  PMIx server library, the first that loads of: {}",
                l.pmix_libraries.join(" ")
            )?;
        }
    }
    if let Some(b) = super::launcher::binding_text(&plan.job, l.kind) {
        writeln!(o, "binding: {b}")?;
    }
    for c in &l.commands {
        writeln!(o, "command: {}", shell_words(&c.argv))?;
        writeln!(o, "  why: {}", c.why)?;
    }
    if l.kind != LauncherKind::Local
        && let Ok(encoded) = super::encoding::encode(plan)
    {
        writeln!(
            o,
            "  every task gets the plan in {}: {} bytes (one environment string takes {} at most)",
            super::encoding::PLAN_VAR,
            super::encoding::env_bytes(super::encoding::PLAN_VAR, &encoded),
            super::encoding::MAX_ARG_STRLEN
        )?;
    }
    writeln!(o, "apps:")?;
    for (i, a) in plan.apps.iter().enumerate() {
        let last = a.first_rank + a.ranks.saturating_sub(1);
        let mut argv = vec![a.program.clone()];
        argv.extend(a.args.iter().cloned());
        writeln!(
            o,
            "  part {}: ranks {}-{} ({}): {} in {}{}",
            i + 1,
            a.first_rank,
            last,
            a.ranks,
            shell_words(&argv),
            a.image.path.display(),
            a.wdir
                .as_ref()
                .map(|w| format!(", in directory {}", w.display()))
                .unwrap_or_default()
        )?;
        if let Some(r) = &a.image.registry {
            writeln!(
                o,
                "    image from a registry: {} = {} (SIF layer {}, {} bytes), file {}; every \
                 node uses this digest",
                r.given,
                r.reference,
                r.layer,
                r.size,
                a.image.path.display()
            )?;
        }
        if plan.apps.len() > 1 {
            write_part(o, plan, i)?;
        }
    }
    write_layout(o, plan)?;
    writeln!(o, "mount: {}", plan.mount.backend.as_str())?;
    writeln!(o, "  why: {}", plan.mount.reason)?;
    if let Some(s) = &plan.mount.shm_size {
        writeln!(o, "  /dev/shm: private tmpfs of size {s} (--shm)")?;
    }
    match &plan.mount.library_cache {
        Some(dir) => {
            writeln!(
                o,
                "  library cache: {} ({})",
                dir.display(),
                plan.mount.library_cache_reason
            )?;
            writeln!(
                o,
                "    why: the image's C library and MPI stack are unpacked there once per node, and the other ELF files (program, loader, plugins) its ranks loaded through the image mount in earlier jobs on the node when the next job starts; they are stacked read-only over the image, so their pages stay in the node's memory between jobs (those of a FUSE mount go with it); CMPIRUN_LIBRARY_CACHE=off turns this off"
            )?;
            for a in super::parts::image_apps(&plan.apps) {
                writeln!(
                    o,
                    "    {}: {}",
                    a.image.path.display(),
                    if a.image.stack_files.is_empty() {
                        "(no MPI stack known)".to_owned()
                    } else {
                        a.image.stack_files.join(" ")
                    }
                )?;
                let loaded = loaded_files(dir, &a.image.path);
                if !loaded.is_empty() {
                    writeln!(
                        o,
                        "      loaded through the mount by earlier jobs (as this host's cache lists them): {}",
                        loaded.join(" ")
                    )?;
                }
            }
        }
        None => writeln!(o, "  library cache: {}", plan.mount.library_cache_reason)?,
    }
    if !plan.mount.node_state.is_empty() {
        writeln!(
            o,
            "node state: (each node's own; as this host sees the folders)"
        )?;
    }
    for st in &plan.mount.node_state {
        let fs = match &st.shared {
            Some(fs) => format!("{fs}: a folder the nodes may share"),
            None => "local filesystem".into(),
        };
        writeln!(o, "  {}: {} ({fs})", st.what, st.path.display())?;
        writeln!(o, "    why: {}", st.why)?;
    }
    writeln!(o, "binds:")?;
    if plan.binds.is_empty() {
        writeln!(
            o,
            "  (none beyond the standard /proc, /sys, /dev, /tmp, home and working directory)"
        )?;
    }
    for b in &plan.binds {
        writeln!(
            o,
            "  {} -> {} [{}{}{}{}]",
            b.source,
            b.destination,
            serde_kind(&b.kind),
            if b.read_only { ", ro" } else { "" },
            if b.when == BindTime::RankStart {
                ", resolved at rank start"
            } else {
                ""
            },
            b.image
                .as_ref()
                .map(|i| format!(", only in image {}", i.display()))
                .unwrap_or_default()
        )?;
        writeln!(o, "    why: {}", b.reason)?;
    }
    writeln!(o, "environment:")?;
    if plan.env.is_empty() {
        writeln!(o, "  (no changes)")?;
    }
    for e in &plan.env {
        let scope = match e.scope {
            EnvScope::All => String::new(),
            EnvScope::Part(i) => format!(" (part {})", i + 1),
        };
        let what = env_change_text(e);
        writeln!(o, "  {what}{scope}")?;
        writeln!(o, "    why: {}", e.reason)?;
    }
    writeln!(o, "checks:")?;
    for c in &plan.checks {
        let v = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Warn => "warn",
            Verdict::Skipped => "skipped",
        };
        writeln!(o, "  {v:<7} {}: {}", c.name, c.message)?;
    }
    for w in &plan.warnings {
        writeln!(o, "warning: {w}")?;
    }
    if let Some(t) = plan.job.timeout_secs {
        writeln!(o, "timeout: {t} s")?;
    }
    let failed = plan.failed_checks().count();
    if failed > 0 {
        writeln!(
            o,
            "result: {failed} check(s) failed; the launch would stop{}",
            match (
                plan.failed_checks().all(|c| c.force_helps()),
                plan.job.force
            ) {
                (false, _) =>
                    " (--force cannot launch past the image, launcher-program or bind-source check)",
                (true, true) => ", but --force launches anyway",
                (true, false) => " (--force launches anyway)",
            }
        )?;
    } else {
        writeln!(o, "result: ready to launch")?;
    }
    Ok(())
}

/// What one part of an MPMD job gets: its image (each image of the job has its own mount
/// namespace in the node's one container), the binds only its image gets, and the environment
/// changes only its ranks get.
fn write_part(o: &mut String, plan: &LaunchPlan, part: usize) -> std::fmt::Result {
    let a = &plan.apps[part];
    let img = &a.image;
    let images: Vec<&std::path::Path> = plan.apps.iter().fold(Vec::new(), |mut v, x| {
        if !v.contains(&x.image.path.as_path()) {
            v.push(&x.image.path);
        }
        v
    });
    let mpi = match (&img.mpi_family, &img.mpi_library) {
        (Some(f), Some(l)) => format!("{f}, {l}"),
        (Some(f), None) => f.clone(),
        _ => "MPI not known".to_owned(),
    };
    writeln!(
        o,
        "    image: {} ({}{mpi}){}",
        img.path.display(),
        img.kind
            .as_deref()
            .map(|k| format!("{k}, "))
            .unwrap_or_default(),
        if images.len() > 1 {
            format!(
                "; mount namespace {} of {} in the node's container, with its own /.singularity.d/env scripts",
                images.iter().position(|p| *p == img.path).unwrap_or(0) + 1,
                images.len()
            )
        } else {
            String::new()
        }
    )?;
    let own: Vec<String> = plan
        .binds
        .iter()
        .filter(|b| b.image.as_ref() == Some(&img.path))
        .map(|b| format!("{} -> {}", b.source, b.destination))
        .collect();
    writeln!(
        o,
        "    binds: {}{}",
        if plan.binds.iter().any(|b| b.image.is_none()) {
            "the job's (below)"
        } else {
            "the standard ones"
        },
        if own.is_empty() {
            String::new()
        } else {
            format!(", plus for this image only: {}", own.join(", "))
        }
    )?;
    let own: Vec<String> = plan
        .env
        .iter()
        .filter(|e| e.scope == EnvScope::Part(part))
        .map(env_change_text)
        .collect();
    writeln!(
        o,
        "    environment: the job's (below){}",
        if own.is_empty() {
            String::new()
        } else {
            format!(", plus for this part only: {}", own.join(", "))
        }
    )
}

/// One environment change as the dry run shows it.
fn env_change_text(e: &EnvChange) -> String {
    match &e.action {
        EnvAction::Set { value } => format!("{}={value}", e.name),
        EnvAction::Prepend { value } => format!("{}={value}:${}", e.name, e.name),
        EnvAction::Pass | EnvAction::PassMatching => format!("{} passed through", e.name),
        EnvAction::Unset | EnvAction::UnsetMatching => format!("{} removed", e.name),
        EnvAction::PerRank { value } => format!("{} per rank: {value}", e.name),
        EnvAction::ClearInherited => "caller's environment not inherited".to_owned(),
        EnvAction::FromLauncher { variable } => format!(
            "{} per rank: ${variable}, when the launcher sets it and not {}",
            e.name, e.name
        ),
    }
}

fn serde_kind(k: &BindKind) -> &'static str {
    match k {
        BindKind::Library => "library",
        BindKind::Device => "device",
        BindKind::Directory => "directory",
        BindKind::Path => "path",
    }
}

/// Joins arguments for display, quoting the ones a shell would split.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%{}".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `-v` prints at launch, in a few lines: the profile and why, the launcher, PMI and
/// layout, the mount, what is injected (host libraries, devices, variables set), and how the
/// checks went (those that warned are printed as warnings of their own).
pub fn summary(plan: &LaunchPlan) -> Vec<String> {
    let l = &plan.launcher;
    let mut lines = vec![
        format!("profile {}: {}", plan.profile.name, plan.profile.reason),
        format!(
            "launcher {} ({}); pmi {} ({}); {} rank(s) on {} node(s)",
            l.kind.as_str(),
            l.reason,
            l.pmi.as_str(),
            l.pmi_reason,
            plan.layout.size,
            plan.layout.nodes.len()
        ),
        format!(
            "mount {}: {}",
            plan.mount.backend.as_str(),
            plan.mount.reason
        ),
    ];
    lines.extend(super::launcher::binding_text(&plan.job, l.kind).map(|b| format!("binding: {b}")));
    let names = |kind: BindKind| -> Vec<String> {
        plan.binds
            .iter()
            .filter(|b| b.kind == kind)
            .map(|b| b.source.rsplit('/').next().unwrap_or(&b.source).to_owned())
            .collect()
    };
    let set: Vec<&str> = plan
        .env
        .iter()
        .filter(|c| matches!(c.action, EnvAction::Set { .. } | EnvAction::Prepend { .. }))
        .map(|c| c.name.as_str())
        .collect();
    let none = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(" ")
        }
    };
    lines.push(format!(
        "injected: libraries {}; devices {}; variables set {}",
        none(&names(BindKind::Library)),
        none(&names(BindKind::Device)),
        if set.is_empty() {
            "none".to_owned()
        } else {
            set.join(" ")
        }
    ));
    let count = |v: Verdict| plan.checks.iter().filter(|c| c.verdict == v).count();
    lines.push(format!(
        "checks: {} passed, {} warned, {} failed{}",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail),
        if count(Verdict::Fail) > 0 {
            " (--force)"
        } else {
            ""
        }
    ));
    lines
}

/// The rank layout (`--display-map` prints it before the ranks start): nodes, their ranks and
/// each part's program.
pub fn layout_text(plan: &LaunchPlan) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = write_layout(&mut o, plan);
    o
}

fn write_layout(o: &mut String, plan: &LaunchPlan) -> std::fmt::Result {
    let lay = &plan.layout;
    writeln!(
        o,
        "layout: {} rank(s) on {} node(s), {} mapping",
        lay.size,
        lay.nodes.len(),
        match lay.mapping {
            crate::jobspec::Mapping::Block => "block",
            crate::jobspec::Mapping::Cyclic => "cyclic",
        }
    )?;
    for (id, (n, ranks)) in lay.nodes.iter().zip(lay.ranks_by_node()).enumerate() {
        writeln!(
            o,
            "  node {id} {}: ranks {}",
            n.name,
            cmpirun_pmi::server::rank_ranges(&ranks)
        )?;
    }
    if lay.process_mapping.is_empty() && lay.size > 0 {
        writeln!(
            o,
            "  PMI_process_mapping: unknown (longer than a PMI value; MPICH exchanges host names)"
        )?;
    } else {
        writeln!(o, "  PMI_process_mapping: {}", lay.process_mapping)?;
    }
    Ok(())
}

/// The ELF files earlier jobs of `image` loaded through its mount, as the library cache `dir`
/// lists them (see [`crate::container::library_cache`]); empty when none are listed or the
/// image cannot be read.
fn loaded_files(dir: &std::path::Path, image: &std::path::Path) -> Vec<String> {
    let Ok(loc) = crate::image::locate(image) else {
        return Vec::new();
    };
    let src = crate::mount::SquashfsSource {
        path: loc.path,
        offset: loc.squashfs_offset,
        size: loc.squashfs_size,
    };
    match crate::mount::cache_key(&src) {
        Ok(key) => crate::container::library_cache::read_loads(dir, &key)
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}
