//! The smoke test: a tiny image packed on the spot from the host's own `bash` and the libraries
//! it needs (nothing is downloaded), and a real 2-rank job in it through cmpirun's local
//! launcher. Each rank speaks PMI-1 over `PMI_FD` in plain bash: it puts a value, meets the
//! other rank at a barrier, reads the other rank's value back and finalizes, which proves rank
//! launch, the image mount, the container and PMI wire-up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cmpirun_fabric::child::answer_in_child;
use cmpirun_fabric::closure::dependency_closure;
use cmpirun_fabric::loader::HostLoader;

use super::Finding;

/// Where the smoke script lives in the tiny image.
pub const SCRIPT_PATH: &str = "/cmpirun-doctor/smoke.sh";

/// The program each rank runs: PMI-1 over the inherited socket, in bash builtins only.
pub const SMOKE_SCRIPT: &str = r#"# cmpirun doctor's smoke test: one rank of a PMI-1 job, in bash builtins only.
set -u
fail() { echo "doctor-smoke: rank ${PMI_RANK:-?}: $*" >&2; exit 1; }
[ -n "${PMI_FD:-}" ] || fail "no PMI_FD in the environment"
ask() {
    printf '%s\n' "$1" >&"$PMI_FD" || fail "cannot send: $1"
    IFS= read -r -u "$PMI_FD" reply || fail "no answer to: $1"
}
field() {
    local r=" $reply"
    case "$r" in
        *" $1="*) r=${r#* $1=}; v=${r%% *} ;;
        *) v= ;;
    esac
}
ask "cmd=init pmi_version=1 pmi_subversion=1"; field rc
[ "$v" = 0 ] || fail "init answered: $reply"
ask "cmd=get_my_kvsname"; field kvsname; kvs=$v
ask "cmd=put kvsname=$kvs key=doctor-$PMI_RANK value=from-rank-$PMI_RANK"; field rc
[ "$v" = 0 ] || fail "put answered: $reply"
ask "cmd=barrier_in"
[ "${reply%% *}" = cmd=barrier_out ] || fail "barrier answered: $reply"
peer=$(( (PMI_RANK + 1) % PMI_SIZE ))
ask "cmd=get kvsname=$kvs key=doctor-$peer"; field value
[ "$v" = "from-rank-$peer" ] || fail "get answered: $reply"
ask "cmd=finalize"
echo "doctor-smoke rank=$PMI_RANK size=$PMI_SIZE peer=$peer value=$v"
"#;

/// How long the smoke job may run (a cold mount and two bash processes take well under a
/// second).
const JOB_TIMEOUT_SECS: u32 = 60;

/// Fills `tree` with the tiny image's files: the host's `bash` as `/bin/bash`, its libraries at
/// the paths the host loader finds them, the ELF interpreter at its `PT_INTERP` path, and the
/// smoke script. Returns the directories of the libraries (the job's `LD_LIBRARY_PATH`).
fn tiny_image_tree(tree: &Path) -> Result<Vec<PathBuf>, String> {
    let bash = ["/bin/bash", "/usr/bin/bash"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("the host has no /bin/bash to pack")?;
    let loader = HostLoader::from_env();
    let closure =
        dependency_closure(std::slice::from_ref(&bash), &loader).map_err(|e| e.to_string())?;
    if let Some(m) = closure.missing.first() {
        return Err(format!(
            "{} needs {}, which the loader does not find",
            m.needed_by.display(),
            m.name
        ));
    }
    let mut files: Vec<(PathBuf, PathBuf)> = vec![(bash.clone(), PathBuf::from("/bin/bash"))];
    for lib in closure.libraries.iter().skip(1) {
        files.push((lib.path.clone(), lib.path.clone()));
    }
    for name in &closure.glibc_libraries {
        let found = loader
            .find(name, None)
            .ok_or_else(|| format!("the loader does not find {name}"))?;
        files.push((found.path.clone(), found.path));
    }
    let interp = interpreter(&bash)?;
    files.push((interp.clone(), interp));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (host, inside) in &files {
        let dest = tree.join(inside.strip_prefix("/").unwrap_or(inside));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            if let Some(dir) = inside.parent()
                && inside != &PathBuf::from("/bin/bash")
                && !dirs.iter().any(|d| d == dir)
            {
                dirs.push(dir.to_path_buf());
            }
        }
        // Copies follow symlinks: the image holds the files themselves.
        std::fs::copy(host, &dest).map_err(|e| format!("copy {}: {e}", host.display()))?;
    }
    let script = tree.join(SCRIPT_PATH.trim_start_matches('/'));
    if let Some(parent) = script.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&script, SMOKE_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    Ok(dirs)
}

/// The `PT_INTERP` of the 64-bit ELF executable `exe` (`/lib64/ld-linux-x86-64.so.2`).
fn interpreter(exe: &Path) -> Result<PathBuf, String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let data = std::fs::read(exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    let bad = |e: object::read::Error| format!("{}: {e}", exe.display());
    let elf = object::elf::FileHeader64::<object::Endianness>::parse(&*data).map_err(bad)?;
    let endian = elf.endian().map_err(bad)?;
    for ph in elf.program_headers(endian, &*data).map_err(bad)? {
        if ph.p_type(endian) == object::elf::PT_INTERP {
            let bytes = ph
                .data(endian, &*data)
                .map_err(|()| format!("{}: bad PT_INTERP", exe.display()))?;
            let path = bytes.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(PathBuf::from(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Err(format!("{} has no ELF interpreter", exe.display()))
}

/// The tiny image made in `scratch`: its SIF file, and the directories of its libraries.
#[derive(Debug, Clone)]
pub struct TinyImage {
    /// The SIF file.
    pub path: PathBuf,
    /// Its library directories.
    pub lib_dirs: Vec<PathBuf>,
}

/// Makes the tiny image in `scratch` (packed in a child: the packer may start threads, and
/// the doctor must stay single-threaded to fork its other checks).
pub fn make_tiny_image(scratch: &Path) -> Result<TinyImage, String> {
    let tree = scratch.join("tree");
    let lib_dirs = tiny_image_tree(&tree)?;
    let path = scratch.join("doctor.sif");
    let out = path.clone();
    answer_in_child(Duration::from_secs(60), move || {
        let opts = crate::image::pack::PackOptions {
            deterministic: true,
            ..Default::default()
        };
        crate::image::pack::pack(&tree, &out, &opts)
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .and_then(|r| r)?;
    Ok(TinyImage { path, lib_dirs })
}

/// The smoke job's own profile: cmpirun's local launcher and PMI server, nothing injected, no
/// library cache (nothing is left behind).
const SMOKE_PROFILE: &str = "name: doctor-smoke
description: cmpirun doctor's smoke job
launcher:
  kind: local
pmi:
  kind: pmi2
  inject: false
fabric:
  inject: false
library_cache: off
";

/// `smoke-test`: runs `cmpirun -n 2` of the smoke script in `image` and checks that both ranks
/// exchanged their values through PMI.
pub fn run_job(scratch: &Path, image: &TinyImage, opts: &super::DoctorOptions) -> Finding {
    const CHECK: &str = "smoke-test";
    let profile = scratch.join("doctor-smoke.yaml");
    if let Err(e) = std::fs::write(&profile, SMOKE_PROFILE) {
        return Finding::fail(CHECK, format!("{}: {e}", profile.display()), "set TMPDIR");
    }
    let exe = match &opts.cmpirun {
        Some(p) => p.clone(),
        None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cmpirun")),
    };
    let lib_path = std::env::join_paths(&image.lib_dirs).unwrap_or_default();
    let mut ld = std::ffi::OsString::from("LD_LIBRARY_PATH=");
    ld.push(&lib_path);
    let mut cmd = Command::new(&exe);
    if opts.verbose {
        cmd.arg("-v");
    }
    cmd.args(["-n", "2", "--launcher", "local", "--timeout"])
        .arg(JOB_TIMEOUT_SECS.to_string())
        .arg("--profile")
        .arg(&profile)
        .arg("-x")
        .arg(ld)
        .arg(&image.path)
        .args(["/bin/bash", SCRIPT_PATH])
        // The extract backend (when FUSE is unusable) caches here, and goes with the scratch
        // directory.
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .env_remove("CMPIRUN_PROFILE")
        .stdin(std::process::Stdio::null());
    // A doctor killed while the job runs ends the job too (cmpirun tears it down on SIGTERM).
    // SAFETY: the closure runs between fork and exec and calls only prctl, which is
    // async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            return Finding::fail(
                CHECK,
                format!("cannot start {}: {e}", exe.display()),
                "run cmpirun doctor from an installed cmpirun",
            );
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if opts.verbose {
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(out.stderr.as_slice());
    }
    let ranks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("doctor-smoke rank="))
        .collect();
    if out.status.success() && ranks.len() == 2 {
        return Finding::pass(
            CHECK,
            "a 2-rank job in a tiny image packed here launched, wired up over PMI-1 (put, \
             barrier, get of the other rank's value) and finalized",
        );
    }
    let why = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .to_owned();
    Finding::fail(
        CHECK,
        format!(
            "the 2-rank job ended with {} and {} of 2 ranks reported: {why}",
            out.status,
            ranks.len()
        ),
        "fix the failed checks above first; cmpirun doctor -v shows the job's own messages",
    )
}
