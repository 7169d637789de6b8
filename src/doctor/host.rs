//! The node's own checks: user namespaces and their limits, FUSE, overlayfs, the host PMI
//! libraries, where the caches live, and the descriptor and process limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cmpirun_fabric::child::answer_in_child;

use super::Finding;
use crate::mount::{self, MountBackend, MountOptions, SquashfsSource};

/// How long a check in a child may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a sysctl under `/proc/sys` (`None` when it does not exist on this kernel).
fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Fewer user namespaces than this per user is a limit worth a warning: every job step on a
/// node needs one, and so does every `cmpirun exec`.
const FEW_USER_NAMESPACES: u64 = 64;

/// `user-namespaces`: a child creates a user and mount namespace as cmpirun's node instance
/// does; the sysctls that limit them are named in the message or the fix.
pub fn user_namespaces() -> Finding {
    const CHECK: &str = "user-namespaces";
    let max = sysctl("/proc/sys/user/max_user_namespaces");
    let clone = sysctl("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let mut settings = vec![format!(
        "user.max_user_namespaces={}",
        max.as_deref().unwrap_or("(absent)")
    )];
    if let Some(c) = &clone {
        settings.push(format!("kernel.unprivileged_userns_clone={c}"));
    }
    if let Some(a) = &apparmor {
        settings.push(format!("kernel.apparmor_restrict_unprivileged_userns={a}"));
    }
    let settings = settings.join(", ");
    let tried = answer_in_child(CHILD_TIMEOUT, || {
        crate::sys::userns::enter_user_namespace().map_err(|e| e.to_string())
    })
    .and_then(|r| r);
    if let Err(e) = tried {
        let mut fixes = Vec::new();
        if max.as_deref() == Some("0") || e.contains("No space left") {
            fixes.push(
                "raise the limit: sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/)",
            );
        }
        if clone.as_deref() == Some("0") {
            fixes.push("sysctl -w kernel.unprivileged_userns_clone=1");
        }
        if apparmor.as_deref() == Some("1") {
            fixes.push("allow cmpirun in AppArmor (a profile with `userns,` for its path) or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0");
        }
        if fixes.is_empty() {
            fixes.push("enable unprivileged user namespaces (CONFIG_USER_NS) for this user; a container or seccomp policy may forbid unshare(CLONE_NEWUSER)");
        }
        return Finding::fail(CHECK, format!("{e} ({settings})"), fixes.join("; "));
    }
    if let Some(n) = max.as_deref().and_then(|m| m.parse::<u64>().ok())
        && n < FEW_USER_NAMESPACES
    {
        return Finding::warn(
            CHECK,
            format!("a user namespace can be created, but only {n} per user ({settings})"),
            "raise it: sysctl -w user.max_user_namespaces=15000",
        );
    }
    Finding::pass(
        CHECK,
        format!("a user and mount namespace can be created ({settings})"),
    )
}

/// `fuse-device`: `/dev/fuse` opens for reading and writing and is the FUSE device, as the
/// image mount's own probe checks it.
pub fn fuse_device() -> Finding {
    const CHECK: &str = "fuse-device";
    match mount::probe_fuse() {
        Ok(()) => Finding::pass(
            CHECK,
            "/dev/fuse is the FUSE device and opens for reading and writing",
        ),
        Err(e) => Finding::fail(
            CHECK,
            e.to_string(),
            "load the module (modprobe fuse) and make the device usable by users (chmod 0666 \
             /dev/fuse, as most distributions ship it); until then jobs extract images into a \
             cache instead of mounting them (slower, uses disk)",
        ),
    }
}

/// `fuse-mount`: a child enters a user and mount namespace and mounts `image` with cmpirun's
/// built-in FUSE server, as a node instance does, and reads the smoke script back from it.
pub fn fuse_mount(scratch: &Path, image: &Path) -> Finding {
    const CHECK: &str = "fuse-mount";
    let target = scratch.join("fuse-mount");
    if let Err(e) = std::fs::create_dir(&target) {
        return Finding::fail(CHECK, format!("{}: {e}", target.display()), "set TMPDIR");
    }
    let image = image.to_path_buf();
    let tried = answer_in_child(CHILD_TIMEOUT, || mount_and_read(&image, &target)).and_then(|r| r);
    match tried {
        Ok(()) => Finding::pass(
            CHECK,
            "an image mounts through FUSE inside a user namespace (built-in server) and reads back",
        ),
        Err(e) => Finding::fail(
            CHECK,
            e,
            "make /dev/fuse usable (fuse-device) and allow FUSE mounts in user namespaces (Linux \
             4.18 or later); meanwhile jobs run with --image-mount extract (slower)",
        ),
    }
}

fn mount_and_read(image: &Path, target: &Path) -> Result<(), String> {
    let loc = crate::image::locate(image).map_err(|e| e.to_string())?;
    let src = SquashfsSource {
        path: image.to_path_buf(),
        offset: loc.squashfs_offset,
        size: loc.squashfs_size,
    };
    crate::sys::userns::enter_user_namespace().map_err(|e| e.to_string())?;
    let mounted = mount::mount_squashfs(&src, target, MountBackend::Fuse, &MountOptions::default())
        .map_err(|e| e.to_string())?;
    let script = target.join(super::smoke::SCRIPT_PATH.trim_start_matches('/'));
    let read = std::fs::read_to_string(&script)
        .map_err(|e| format!("mounted, but reading {} failed: {e}", script.display()));
    mounted.unmount().map_err(|e| e.to_string())?;
    if read? != super::smoke::SMOKE_SCRIPT {
        return Err("mounted, but the file read back differs from the one packed".into());
    }
    Ok(())
}

/// `overlayfs`: a child mounts an overlay in a user namespace. cmpirun does not need one (its
/// writable layers are tmpfs), so a failure only warns: it matters to images or tools that do.
pub fn overlayfs(scratch: &Path) -> Finding {
    const CHECK: &str = "overlayfs";
    let base = scratch.join("overlay");
    let dirs: Vec<PathBuf> = ["lower", "upper", "work", "merged"]
        .iter()
        .map(|d| base.join(d))
        .collect();
    for d in &dirs {
        if let Err(e) = std::fs::create_dir_all(d) {
            return Finding::warn(CHECK, format!("{}: {e}", d.display()), "set TMPDIR");
        }
    }
    let tried = answer_in_child(CHILD_TIMEOUT, || {
        crate::sys::userns::enter_user_namespace().map_err(|e| e.to_string())?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            dirs[0].display(),
            dirs[1].display(),
            dirs[2].display()
        );
        nix::mount::mount(
            Some("overlay"),
            &dirs[3],
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| format!("mount overlay: {e}"))?;
        let wrote = std::fs::write(dirs[3].join("probe"), b"x").map_err(|e| e.to_string());
        let _ = nix::mount::umount2(&dirs[3], nix::mount::MntFlags::MNT_DETACH);
        wrote
    })
    .and_then(|r| r);
    // The work directory the kernel made inside `work` has mode 000: open it up so the
    // scratch directory can be removed.
    let _ = std::fs::set_permissions(
        dirs[2].join("work"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    );
    match tried {
        Ok(()) => Finding::pass(
            CHECK,
            "an overlay mounts and takes writes in a user namespace",
        ),
        Err(e) => Finding::warn(
            CHECK,
            format!("overlayfs in a user namespace: {e}"),
            "not needed by cmpirun (its writable layers are tmpfs); Linux 5.11 or later allows it \
             for tools that want it",
        ),
    }
}

/// `pmi-libraries`: which host PMI client libraries the dynamic linker finds (loaded in a
/// child). Informational: a profile that injects them checks its own list (`profile-files`).
pub fn pmi_libraries() -> Finding {
    const CHECK: &str = "pmi-libraries";
    let report = match answer_in_child(CHILD_TIMEOUT, cmpirun_pmi::probe::probe_host) {
        Ok(r) => r,
        Err(e) => {
            return Finding::warn(CHECK, format!("cannot probe: {e}"), "run cmpirun doctor -v");
        }
    };
    let found: Vec<String> = report
        .libraries
        .iter()
        .filter(|l| l.loaded)
        .map(|l| {
            // The development link and the soname name one file: show the file once.
            let path = l
                .path
                .as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| l.name.clone());
            match &l.pmix_version {
                Some(v) => format!("{path} ({v})"),
                None => path,
            }
        })
        .collect();
    let mut found = found;
    found.dedup();
    if found.is_empty() {
        Finding::pass(
            CHECK,
            "no host PMI library (libpmi, libpmi2, libpmix); fine for cmpirun's own PMI server \
             and for srun, which serves PMI itself",
        )
    } else {
        Finding::pass(CHECK, format!("host PMI libraries: {}", found.join(", ")))
    }
}

/// `extract-cache` and `library-cache`: where the caches a launch would use live, and whether
/// that is a network filesystem (a warning: every node would share and lock it). `profile`: the
/// profile a launch would use (its `library_cache`), when one could be chosen.
pub fn caches(profile: Option<&crate::profile::SiteProfile>) -> Vec<Finding> {
    let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let extract = mount::default_extract_cache();
    let library = match profile {
        Some(p) => crate::plan::library_cache_dir(p, &vars, &mut Vec::new()).0,
        None => mount::library_cache_in(|k| vars.get(k).cloned()),
    };
    vec![
        cache_finding("extract-cache", extract.as_deref(), "XDG_CACHE_HOME"),
        cache_finding(
            "library-cache",
            library.as_deref(),
            "CMPIRUN_LIBRARY_CACHE or the profile's library_cache",
        ),
    ]
}

fn cache_finding(check: &'static str, dir: Option<&Path>, knob: &str) -> Finding {
    let Some(dir) = dir else {
        return Finding::pass(check, "off");
    };
    // The cache may not exist yet: its nearest existing ancestor is where it will be made.
    let magic = match crate::sys::filesystem_type(dir) {
        Ok(m) => m,
        Err(e) => {
            return Finding::warn(
                check,
                format!("{}: {e}", dir.display()),
                format!("set {knob} to a local directory"),
            );
        }
    };
    match crate::sys::network_filesystem(magic) {
        Some(fs) => Finding::warn(
            check,
            format!("{} is on {fs} (a network filesystem)", dir.display()),
            format!(
                "set {knob} to node-local storage (such as /tmp or /local/$USER): a cache on a \
                 shared filesystem is slow and every node locks the same files"
            ),
        ),
        None => Finding::pass(
            check,
            format!("{} (local filesystem, type {magic:#x})", dir.display()),
        ),
    }
}

/// Open descriptors a rank's process tree should be allowed: MPI opens several per peer.
const FEW_FILES: u64 = 4096;
/// Processes (threads count) a user should be allowed on a node.
const FEW_PROCESSES: u64 = 4096;

/// `limits`: the soft limits on open files and processes of this process (which a job
/// inherits), against what an MPI job on a full node needs.
pub fn limits() -> Finding {
    use nix::sys::resource::{Resource, getrlimit};
    const CHECK: &str = "limits";
    let show = |v: u64| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_owned()
        } else {
            v.to_string()
        }
    };
    let (files, files_hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    let (procs, _) = getrlimit(Resource::RLIMIT_NPROC).unwrap_or((0, 0));
    let message = format!(
        "open files {} (hard {}), processes {}",
        show(files),
        show(files_hard),
        show(procs)
    );
    let mut fixes = Vec::new();
    if files < FEW_FILES {
        fixes.push(format!(
            "raise the open-files limit to at least {FEW_FILES} (ulimit -n; nofile in \
             /etc/security/limits.conf, Slurm's PropagateResourceLimits)"
        ));
    }
    if procs < FEW_PROCESSES {
        fixes.push(format!(
            "raise the process limit to at least {FEW_PROCESSES} (ulimit -u; nproc in \
             /etc/security/limits.conf)"
        ));
    }
    if fixes.is_empty() {
        Finding::pass(CHECK, message)
    } else {
        Finding::warn(CHECK, message, fixes.join("; "))
    }
}
