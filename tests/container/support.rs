//! Fixtures of the container tests: a small directory image made from the host's own programs,
//! and the CMA probe helper compiled statically.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Programs copied from the host into the directory image, with the libraries they load.
const PROGRAMS: &[&str] = &[
    "/bin/sh",
    "/usr/bin/env",
    "/usr/bin/id",
    "/bin/cat",
    "/bin/ls",
    "/bin/sleep",
    "/bin/touch",
    "/usr/bin/readlink",
    "/bin/true",
    "/bin/false",
    "/bin/pwd",
    "/bin/mkdir",
    "/bin/echo",
];

fn copy_with_libs(root: &Path, prog: &Path) {
    let real = fs::canonicalize(prog).unwrap_or_else(|e| panic!("{}: {e}", prog.display()));
    let dst = root.join("usr/bin").join(prog.file_name().unwrap());
    fs::copy(&real, &dst).unwrap();
    let out = Command::new("ldd").arg(&real).output().unwrap();
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if !word.starts_with('/') {
            continue;
        }
        let lib = Path::new(word);
        let to = root.join(lib.strip_prefix("/").unwrap());
        if to.exists() {
            continue;
        }
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(fs::canonicalize(lib).unwrap(), &to).unwrap();
    }
}

/// Builds a small root directory under `parent`: merged-/usr layout, `/bin/sh` and a few
/// coreutils, `/etc/passwd`, an environment script setting `FOO=from-image` and prepending
/// `/opt/image/bin` to `PATH`, one that needs a shell (`COMPLEX=$FOO-seen`), and symlinks: `/inside -> /usr` (stays inside) and
/// `/escape -> ../../../../etc` (climbs out). Everything is readable by the test user.
pub fn directory_image(parent: &Path) -> PathBuf {
    let root = parent.join("rootfs");
    for d in [
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "opt",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for (l, t) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(t, root.join(l)).unwrap();
    }
    for p in PROGRAMS {
        copy_with_libs(&root, Path::new(p));
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::create_dir_all(root.join(".singularity.d/env")).unwrap();
    fs::write(
        root.join(".singularity.d/env/90-environment.sh"),
        "export FOO=from-image\nexport BAR=from-image\nexport PATH=/opt/image/bin:$PATH\n",
    )
    .unwrap();
    // Not a plain assignment: evaluated by the image's /bin/sh.
    fs::write(
        root.join(".singularity.d/env/95-complex.sh"),
        "if [ -n \"$FOO\" ]; then export COMPLEX=\"$FOO-seen\"; fi\n",
    )
    .unwrap();
    symlink("/usr", root.join("inside")).unwrap();
    symlink("../../../../etc", root.join("escape")).unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&root)
        .status()
        .unwrap();
    root
}

/// Compiles `tests/container/cma.c` statically into `dir` (runs in any image).
pub fn cma_helper(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/container/cma.c");
    let out = dir.join("cma");
    let st = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc must be installed to build the CMA helper");
    assert!(st.success(), "compiling {} failed", src.display());
    fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
    out
}
