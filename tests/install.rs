//! Installing cmpirun: `install.sh PREFIX` puts the binary in `PREFIX/bin` and the shipped
//! profiles in `PREFIX/share/cmpirun/profiles`, where the installed binary finds them on its
//! own; `DESTDIR` stages the same layout; the Spack recipe in `examples/spack/repo` parses and
//! its install steps (cargo, then `install.sh`) produce that layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_profiles() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

/// The layout cmpirun expects in `root` (an installed prefix, or one staged under DESTDIR).
fn assert_layout(root: &Path) {
    let bin = root.join("bin/cmpirun");
    let meta = std::fs::metadata(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
        "{} is executable",
        bin.display()
    );
    let dir = root.join("share/cmpirun/profiles");
    let mut installed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    installed.sort();
    assert_eq!(installed, shipped_profiles());
    assert!(root.join("share/doc/cmpirun/docs/install.md").is_file());
}

/// The installed binary, run with no profile settings and an empty home: which profile file
/// `--profile tcp` finds, and the directories it searched.
fn installed_profile_choice(prefix: &Path, home: &Path) -> serde_json::Value {
    let out = Command::new(prefix.join("bin/cmpirun"))
        .args(["profile", "show", "--profile", "tcp", "--json"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn install_sh(args: &[&std::ffi::OsStr], destdir: Option<&Path>) -> Output {
    let mut cmd = Command::new(repo().join("install.sh"));
    cmd.args(args);
    if let Some(d) = destdir {
        cmd.env("DESTDIR", d);
    }
    cmd.output().unwrap()
}

#[test]
fn install_sh_puts_the_binary_and_profiles_where_cmpirun_finds_them() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("opt/cmpirun");
    let binary = Path::new(env!("CARGO_BIN_EXE_cmpirun"));
    // A profile from an older release, no longer shipped: the install removes it.
    let stale = prefix.join("share/cmpirun/profiles/retired.yaml");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "name: retired\n").unwrap();
    let out = install_sh(
        &["--binary".as_ref(), binary.as_os_str(), prefix.as_os_str()],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("/etc/cmpirun/profiles.d"), "{said}");
    assert_layout(&prefix);
    assert!(!stale.exists());

    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let choice = installed_profile_choice(&prefix, &home);
    let profiles = prefix.join("share/cmpirun/profiles");
    assert_eq!(
        choice["profile"]["file"].as_str().unwrap(),
        profiles.join("tcp.yaml").to_str().unwrap()
    );
    let searched: Vec<&str> = choice["searched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    // Site profiles first, then the user's, then the installed ones.
    assert_eq!(
        &searched[..3],
        [
            "/etc/cmpirun/profiles.d",
            home.join(".config/cmpirun/profiles.d").to_str().unwrap(),
            profiles.to_str().unwrap()
        ]
    );
}

#[test]
fn install_sh_stages_under_destdir_and_refuses_bad_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_cmpirun"));
    let stage = tmp.path().join("stage");
    let out = install_sh(
        &["--binary".as_ref(), binary.as_os_str(), "/usr".as_ref()],
        Some(&stage),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_layout(&stage.join("usr"));

    let relative = install_sh(
        &["--binary".as_ref(), binary.as_os_str(), "opt".as_ref()],
        None,
    );
    assert_eq!(relative.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&relative.stderr).contains("PREFIX must be an absolute path"),
        "{relative:?}"
    );
    let missing = install_sh(
        &[
            "--binary".as_ref(),
            "/nonexistent/cmpirun".as_ref(),
            tmp.path().as_os_str(),
        ],
        None,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("/nonexistent/cmpirun: not an executable file"),
        "{missing:?}"
    );
}

/// Spack is not installable here: `tests/fixtures/spack_recipe.py` gives the recipe the few
/// `spack.package` names it uses and runs its `install` (a real `cargo build`, of the debug
/// profile the tests are built with, so it has nothing to do, then `install.sh`) and its
/// stand-alone test.
#[test]
fn spack_recipe_builds_the_layout_cmpirun_expects() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("spack/opt/cmpirun-main");
    let recipe = repo().join("examples/spack/repo/packages/cmpirun/package.py");
    // The cargo that builds these tests builds the recipe's binary too.
    let cargo = PathBuf::from(std::env::var_os("CARGO").expect("cargo sets $CARGO"));
    let path = std::env::join_paths(
        std::iter::once(cargo.parent().unwrap().to_path_buf()).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .unwrap();
    let out = Command::new("python3")
        .arg(repo().join("tests/fixtures/spack_recipe.py"))
        .arg(&recipe)
        .arg(repo())
        .arg(&prefix)
        .arg("debug")
        .env("PATH", path)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_layout(&prefix);
    let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report: {out:?}"));
    let declared = &report["declared"];
    assert_eq!(declared["versions"][0]["name"], "main");
    assert_eq!(declared["variants"]["build_type"]["default"], "release");
    let rust = declared["depends_on"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["spec"].as_str().unwrap().starts_with("rust"))
        .expect("depends on rust");
    // The workspace's rust-version.
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    assert_eq!(rust["spec"], format!("rust@{msrv}:"));
    assert_eq!(rust["type"][0], "build");
    assert_eq!(report["tests"][0], "test_version");
    assert_eq!(declared["licenses"][0], "MIT OR Apache-2.0");
}
