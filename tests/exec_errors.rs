//! Bad input and unusable hosts make `cmpirun exec` fail with one clear line, the right exit
//! status, and nothing left behind.

mod common;
#[path = "container/support.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn exec_in(dir: &TuserDir, args: &[&str]) -> RunOutput {
    TuserCommand::cmpirun()
        .arg("exec")
        .args(args)
        .current_dir(dir.path())
        .run()
}

fn assert_fails(out: &RunOutput, code: i32, needle: &str) {
    assert_eq!(out.code(), Some(code), "{out:?}");
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?} in: {}",
        out.stderr
    );
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "one line: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn bad_input_is_a_usage_error() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    let img = image.to_str().unwrap();
    let before = Snapshot::take();
    let mut tags = Vec::new();

    let out = exec_in(&dir, &["/no/such/image.sif", "true"]);
    assert_fails(&out, 2, "no such file or directory");
    tags.push(out.tag);

    let secret = dir.path().join("secret.sif");
    std::fs::write(&secret, b"not for tuser").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = exec_in(&dir, &[secret.to_str().unwrap(), "true"]);
    assert_fails(&out, 2, "Permission denied");
    tags.push(out.tag);

    let out = exec_in(&dir, &["--bind", "/no/such/dir:/data", img, "true"]);
    assert_fails(&out, 2, "/no/such/dir does not exist on the host");
    tags.push(out.tag);

    let out = exec_in(&dir, &["--bind", "/etc:/escape/x", img, "true"]);
    assert_fails(&out, 2, "points outside the container root");
    tags.push(out.tag);

    let out = exec_in(&dir, &["--bind", "/etc:relative", img, "true"]);
    assert_fails(&out, 2, "must be an absolute path");
    tags.push(out.tag);

    let out = exec_in(&dir, &["--env", "NOVALUE", img, "true"]);
    assert_fails(&out, 2, "NAME=VALUE");
    tags.push(out.tag);

    let out = exec_in(&dir, &["--image-mount", "nfs", img, "true"]);
    assert_eq!(out.code(), Some(2));
    tags.push(out.tag);

    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

/// The squashfs form of the directory image.
fn squashfs_image(dir: &TuserDir) -> PathBuf {
    let root = support::directory_image(dir.path());
    let out = dir.path().join("image.sqfs");
    mksquashfs(&root, &out, &[]);
    out
}

#[test]
fn unusable_dev_fuse_is_reported_with_the_fix() {
    let dir = TuserDir::new();
    let image = squashfs_image(&dir);
    // A private mount namespace where /dev/fuse is a file only root can open: what a site that
    // keeps /dev/fuse 0600 looks like to the user.
    let blocker = dir.path().join("fuse-blocker");
    std::fs::write(&blocker, "").unwrap();
    std::fs::set_permissions(&blocker, std::fs::Permissions::from_mode(0o600)).unwrap();
    let user = tuser();
    let script = format!(
        "mount --bind {} /dev/fuse && exec setpriv --reuid={} --regid={} --init-groups \
         --inh-caps=-all --bounding-set=-all env -i PATH=/usr/bin:/bin HOME={} {} exec \
         --image-mount fuse {} /bin/true",
        blocker.display(),
        user.uid,
        user.gid,
        user.home.display(),
        cmpirun_bin().display(),
        image.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/dev/fuse"), "{stderr}");
    assert!(stderr.contains("--image-mount extract"), "{stderr}");
}

#[test]
fn missing_user_namespaces_are_reported_with_what_to_ask_for() {
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    // Inside a user namespace whose own limit of nested user namespaces is 0, as on a site that
    // disables them.
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec {} exec {} /bin/true",
        cmpirun_bin().display(),
        image.display()
    );
    let out = TuserCommand::new("unshare")
        .args(["-U", "--map-root-user", "sh", "-c", &script])
        .current_dir(dir.path())
        .run();
    assert_fails(&out, 1, "cannot create a user namespace");
    assert!(
        out.stderr.contains("user.max_user_namespaces is 0"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("ask the site"), "{}", out.stderr);
}
