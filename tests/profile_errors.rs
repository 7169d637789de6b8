//! Profile errors through the real binary: each names the file, and where there is one the line
//! and the field, and exits 2.

use std::path::Path;
use std::process::{Command, Output};

fn cmpirun(dirs: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(args)
        .env("CMPIRUN_PROFILE_DIRS", dirs)
        .env_remove("CMPIRUN_PROFILE")
        .env_remove("SLURM_JOB_ID")
        .output()
        .expect("run cmpirun")
}

fn expect_usage_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    for n in needles {
        assert!(last.contains(n), "{last:?} should contain {n:?}");
    }
    last
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn missing_profile_names_the_name_and_the_directories() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    let out = cmpirun(d.path(), &["profile", "show", "--profile", "nosuch"]);
    expect_usage_error(&out, &["--profile", "\"nosuch\"", "nosuch.yaml", &dir]);
    let out = Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(["profile", "show"])
        .env("CMPIRUN_PROFILE_DIRS", d.path())
        .env("CMPIRUN_PROFILE", "gone")
        .output()
        .unwrap();
    expect_usage_error(&out, &["$CMPIRUN_PROFILE", "\"gone\""]);
    // The same through a launch.
    let out = cmpirun(d.path(), &["--profile", "nosuch", "--dry-run", "/", "true"]);
    expect_usage_error(&out, &["nosuch"]);
    // A missing path.
    let missing = d.path().join("missing.yaml").display().to_string();
    let out = cmpirun(d.path(), &["profile", "show", "--profile", &missing]);
    expect_usage_error(&out, &[&missing]);
}

#[test]
fn missing_extends_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "a.yaml",
        "name: a\ndescription: x\nextends: nosuch\n",
    );
    let out = cmpirun(d.path(), &["profile", "show", "--profile", "a"]);
    expect_usage_error(&out, &[&format!("{f}:3: extends"), "nosuch"]);
}

#[test]
fn extends_cycle_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.yaml", "name: a\nextends: b\n");
    let b = write(d.path(), "b.yaml", "name: b\nextends: a\n");
    let out = cmpirun(d.path(), &["profile", "show", "--profile", "a"]);
    expect_usage_error(&out, &[&format!("{b}:2"), "cycle", "a → b → a"]);
}

#[test]
fn profile_that_matches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "only-there.yaml",
        "name: only-there\n# a site\nmatch:\n  hostnames: [\"no-such-host-*\"]\n",
    );
    // Chosen automatically: nothing matches.
    let out = cmpirun(d.path(), &["profile", "show"]);
    expect_usage_error(
        &out,
        &["no site profile matches", &d.path().display().to_string()],
    );
    // Named: the check names its file and the line of its match rules.
    let out = cmpirun(d.path(), &["profile", "check", "--profile", "only-there"]);
    expect_usage_error(
        &out,
        &[&format!("{f}:3:"), "does not match", "no-such-host-*"],
    );
    // A dry run shows the failed check; a launch refuses with it.
    let out = cmpirun(
        d.path(),
        &["--profile", "only-there", "--dry-run", "/", "true"],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL    profile-match") && text.contains(&format!("{f}:3:")),
        "{text}"
    );
    let out = cmpirun(d.path(), &["--profile", "only-there", "/", "true"]);
    expect_usage_error(
        &out,
        &["not launching", "profile-match", &format!("{f}:3:")],
    );
}

#[test]
fn two_profiles_with_equal_weight() {
    let d = tempfile::tempdir().unwrap();
    let a = write(d.path(), "a.yaml", "name: a\nmatch:\n  weight: 5\n");
    let b = write(
        d.path(),
        "b.yaml",
        "name: b\ndescription: b\nmatch:\n  weight: 5\n",
    );
    let out = cmpirun(d.path(), &["profile", "show"]);
    expect_usage_error(&out, &[&format!("{a}:2"), &format!("{b}:3"), "weight 5"]);
    // A higher weight settles it.
    write(d.path(), "b.yaml", "name: b\nmatch:\n  weight: 6\n");
    let out = cmpirun(d.path(), &["profile", "show"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("profile: b\n"));
}

#[test]
fn yaml_syntax_error() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "bad.yaml",
        "name: bad\nfabric:\n  libfabric: [/x\n  devices: ]\n",
    );
    let out = cmpirun(d.path(), &["profile", "show", "--profile", &f]);
    expect_usage_error(&out, &[&f, "line"]);
    // A broken profile in the search path is reported even when another would be chosen.
    write(d.path(), "ok.yaml", "name: ok\nmatch: {}\n");
    let out = cmpirun(d.path(), &["profile", "show"]);
    expect_usage_error(&out, &[&f, "line"]);
    let out = cmpirun(d.path(), &["profile", "check"]);
    expect_usage_error(&out, &[&f, "line"]);
}

#[test]
fn unknown_key() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "u.yaml", "name: u\nfabric:\n  provders: [cxi]\n");
    let out = cmpirun(d.path(), &["profile", "show", "--profile", &f]);
    expect_usage_error(&out, &[&f, "fabric", "unknown field `provders`", "line 3"]);
    let f = write(d.path(), "t.yaml", "name: t\nlauncher_kind: slurm\n");
    let out = cmpirun(d.path(), &["profile", "show", "--profile", &f]);
    expect_usage_error(&out, &[&f, "unknown field `launcher_kind`", "line 2"]);
}

#[test]
fn bad_type_and_bad_values() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        (
            "name: x\nmatch:\n  weight: heavy\n",
            "match.weight",
            "line 3",
        ),
        ("name: x\npmi:\n  kind: pmi3\n", "pmi.kind", "line 3"),
        (
            "name: x\nlauncher:\n  kind: ssh\n",
            "launcher.kind",
            "line 3",
        ),
        ("name: x\nmount: nfs\n", "mount", "line 2"),
        (
            "name: x\nbinds:\n  - source: /a\n    read_only: maybe\n",
            "binds[0].read_only",
            "line 4",
        ),
        (
            "name: x\nfabric:\n  providers: [\"c x i\"]\n",
            "fabric.providers",
            "line 3",
        ),
        ("name: x\nenv:\n  set:\n    1BAD: v\n", "env.set", "line 4"),
        ("name: \"bad name\"\n", "not a profile name", "line 1"),
        ("description: no name\n", "missing field `name`", "line 1"),
    ];
    for (i, (text, field, line)) in cases.iter().enumerate() {
        let f = write(d.path(), &format!("c{i}.yaml"), text);
        let out = cmpirun(d.path(), &["profile", "show", "--profile", &f]);
        expect_usage_error(&out, &[&f, field, line]);
    }
}

#[test]
fn bad_paths() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        (
            "name: x\nfabric:\n  libfabric:\n    - lib/libfabric.so.1\n",
            "\"lib/libfabric.so.1\" is not an absolute path",
            "line 4",
        ),
        (
            "name: x\nfabric:\n  devices:\n    - \"/dev/cxi[\"\n",
            "not a valid glob",
            "line 4",
        ),
        (
            "name: x\nbinds:\n  - source: scratch\n",
            "\"scratch\" is not an absolute path",
            "line 3",
        ),
        (
            "name: x\nmatch:\n  files: [relative]\n",
            "is not an absolute path",
            "line 3",
        ),
    ];
    for (i, (text, msg, line)) in cases.iter().enumerate() {
        let f = write(d.path(), &format!("p{i}.yaml"), text);
        let out = cmpirun(d.path(), &["profile", "show", "--profile", &f]);
        expect_usage_error(&out, &[&f, msg, line]);
    }
}
