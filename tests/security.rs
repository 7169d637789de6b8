//! The claims of `docs/security.md` that are about users, checked as the unprivileged test user:
//! another user cannot hand a job their rendezvous directory, a directory others can write to is
//! made private, and a bind through an image symlink to a host path stays inside the container
//! root. (The other claims' tests are cited in `docs/security.md`.)

mod common;
#[path = "container/support.rs"]
mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::PathBuf;

use common::*;

/// `cmpirun exec --instance-key KEY IMAGE true` as the test user with `XDG_RUNTIME_DIR=xdg`.
fn exec_with_key(xdg: &std::path::Path, image: &std::path::Path) -> RunOutput {
    TuserCommand::cmpirun()
        .args(["exec", "--instance-key", "security-test"])
        .env("XDG_RUNTIME_DIR", xdg)
        .arg(image)
        .arg("/bin/true")
        .run()
}

/// A directory image and an `XDG_RUNTIME_DIR` of the test user's, in a scratch folder.
fn fixture() -> (TuserDir, PathBuf, PathBuf) {
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    let xdg = dir.path().join("xdg");
    fs::create_dir(&xdg).unwrap();
    chown_to_tuser(&xdg);
    (dir, image, xdg)
}

#[test]
fn a_runtime_directory_of_another_user_is_refused() {
    let (_dir, image, xdg) = fixture();
    // Another user (root here) made the rendezvous directory first, open to all.
    let theirs = xdg.join("cmpirun");
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o777)).unwrap();
    let out = exec_with_key(&xdg, &image);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("is not a directory owned by uid"),
        "{out}"
    );
    assert_eq!(
        fs::read_dir(&theirs).unwrap().count(),
        0,
        "nothing was put in it"
    );
}

#[test]
fn a_runtime_directory_others_can_write_to_is_made_private() {
    let (dir, image, xdg) = fixture();
    let ours = xdg.join("cmpirun");
    fs::create_dir(&ours).unwrap();
    chown_to_tuser(&ours);
    fs::set_permissions(&ours, fs::Permissions::from_mode(0o777)).unwrap();
    exec_with_key(&xdg, &image).assert_success();
    // The instance removes the directory when it ends, or leaves it private.
    if let Ok(m) = fs::symlink_metadata(&ours) {
        assert_eq!(m.mode() & 0o777, 0o700);
        assert_eq!(m.uid(), tuser().uid);
    }
    // A symlink in its place (to a directory of the user's own) is refused too.
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    chown_to_tuser(&elsewhere);
    let _ = fs::remove_dir(&ours);
    symlink(&elsewhere, &ours).unwrap();
    let out = exec_with_key(&xdg, &image);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("is not a directory owned by uid"),
        "{out}"
    );
}

#[test]
fn a_bind_through_an_image_symlink_to_a_host_path_stays_inside_the_root() {
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    // A host folder of the user's that no bind brings into the container (not under the
    // working directory, the home, /tmp or /var/tmp), and an image symlink naming it by its
    // host path.
    let host = PathBuf::from(format!("/cmpirun-security-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&host);
    fs::create_dir(&host).unwrap();
    chown_to_tuser(&host);
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(host.clone());
    symlink(&host, image.join("hostlink")).unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("in.txt"), "bound\n").unwrap();
    chown_to_tuser(&data);
    let bind = format!("{}:/hostlink/x", data.display());
    let run = |cwd: &std::path::Path| {
        TuserCommand::cmpirun()
            .args(["exec", "--bind", &bind])
            .arg(&image)
            .args(["/bin/sh", "-c", "cat /hostlink/x/in.txt"])
            .current_dir(cwd)
            .run()
    };
    // The host folder is not bound into the container: the symlink is followed inside the
    // root, and the mount point is made on the container's own layer.
    let out = run(&data);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "bound");
    assert_eq!(
        fs::read_dir(&host).unwrap().count(),
        0,
        "the bind's mount point was made in the host folder the symlink names"
    );
    assert!(!image.join(host.strip_prefix("/").unwrap()).exists());
    // A symlink to a host folder that is bound (the working directory, at its host path)
    // leads into that bind, and cmpirun refuses to make a mount point there.
    let cwd_target = dir.path().join("cwd-target");
    fs::create_dir(&cwd_target).unwrap();
    chown_to_tuser(&cwd_target);
    fs::remove_file(image.join("hostlink")).unwrap();
    symlink(&cwd_target, image.join("hostlink")).unwrap();
    let out = run(dir.path());
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("create it on the host or choose another destination"),
        "{out}"
    );
    assert_eq!(
        fs::read_dir(&cwd_target).unwrap().count(),
        0,
        "the host folder was changed"
    );
}
