//! `cmpirun exec` as the unprivileged test user, on a directory image built from the host's own
//! programs: identity, working directory, environment, binds, /dev/shm, exit status, signals and
//! what is left behind.

mod common;
#[path = "container/support.rs"]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

struct Fixture {
    dir: TuserDir,
    image: PathBuf,
}

fn fixture() -> Fixture {
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    Fixture { dir, image }
}

fn exec(f: &Fixture, args: &[&str]) -> TuserCommand {
    TuserCommand::cmpirun()
        .arg("exec")
        .args(args.iter().take_while(|a| **a != "--"))
        .arg(&f.image)
        .args(args.iter().skip_while(|a| **a != "--").skip(1))
        .current_dir(f.dir.path())
}

#[test]
fn runs_as_the_user_in_the_working_directory_with_the_image_environment() {
    let f = fixture();
    let user = tuser();
    let out = exec(
        &f,
        &[
            "--",
            "/bin/sh",
            "-c",
            "id -u; id -g; pwd; echo FOO=$FOO; echo PATH=$PATH; echo HOME=$HOME; \
             cat /etc/passwd; readlink /proc/self/ns/user; echo LD=${LD_LIBRARY_PATH-unset}; \
             echo PMI=$PMI_RANK; echo APPT=${APPTAINER_NAME-unset}; echo COMPLEX=$COMPLEX",
        ],
    )
    .env("LD_LIBRARY_PATH", "/host/lib")
    .env("PMI_RANK", "7")
    .env("APPTAINER_NAME", "x")
    .run();
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], user.uid.to_string(), "{}", out.stdout);
    assert_eq!(lines[1], user.gid.to_string());
    assert_eq!(lines[2], f.dir.path().to_str().unwrap());
    assert_eq!(lines[3], "FOO=from-image");
    assert!(
        lines[4].starts_with("PATH=/opt/image/bin:/usr/local/sbin:"),
        "{}",
        lines[4]
    );
    assert_eq!(lines[5], format!("HOME={}", user.home.display()));
    assert!(out.stdout.contains("root:x:0:0:root:/root:/bin/sh"));
    assert!(
        out.stdout
            .contains(&format!("tuser:x:{}:{}:", user.uid, user.gid))
    );
    let host_ns = std::fs::read_link("/proc/self/ns/user").unwrap();
    assert_ne!(
        out.stdout.lines().nth(8).unwrap(),
        host_ns.to_str().unwrap(),
        "the program must run in a user namespace of its own"
    );
    assert!(
        out.stdout.contains("LD=unset"),
        "LD_LIBRARY_PATH must not cross"
    );
    assert!(out.stdout.contains("PMI=7"), "wire-up variables pass");
    assert!(out.stdout.contains("APPT=unset"));
    assert!(
        out.stdout.contains("COMPLEX=from-image-seen"),
        "{}",
        out.stdout
    );
}

#[test]
fn user_env_overrides_the_image_and_shell_runs_sh() {
    let f = fixture();
    let out = exec(
        &f,
        &[
            "--env",
            "BAR=from-user",
            "--",
            "/bin/sh",
            "-c",
            "echo $FOO $BAR",
        ],
    )
    .run();
    out.assert_success();
    assert_eq!(out.stdout.trim(), "from-image from-user");
    let out = TuserCommand::cmpirun()
        .arg("shell")
        .arg(&f.image)
        .current_dir(f.dir.path())
        .env("SHELL", "/bin/nonexistent")
        .stdin("echo shell-ok $FOO; exit 4\n")
        .run();
    assert_eq!(out.code(), Some(4), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "shell-ok from-image");
}

#[test]
fn binds_read_only_and_missing_mount_points() {
    let f = fixture();
    let data = f.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "bound\n").unwrap();
    nix::unistd::chown(&data, Some(nix::unistd::Uid::from_raw(tuser().uid)), None).unwrap();
    let ro = format!("{}:/srv/in:ro", data.display());
    let rw = format!("{}:/inside/share/rw", data.display());
    let out = exec(
        &f,
        &[
            "--bind",
            &ro,
            "--bind",
            &rw,
            "--",
            "/bin/sh",
            "-c",
            "cat /srv/in/in.txt; touch /srv/in/x 2>/dev/null && echo ro-writable; \
             touch /usr/share/rw/y && echo rw-ok; touch /new-file 2>/dev/null && echo root-writable; \
             ls /srv",
        ],
    )
    .run();
    out.assert_success();
    assert!(out.stdout.contains("bound"), "{}", out.stdout);
    assert!(!out.stdout.contains("ro-writable"));
    assert!(
        out.stdout.contains("rw-ok"),
        "a bind through an image symlink stays inside"
    );
    assert!(
        !out.stdout.contains("root-writable"),
        "the image is read-only"
    );
    assert!(data.join("y").exists());
    // The mount point /srv/in was made on the tmpfs layer, not in the image.
    assert!(!f.image.join("srv").exists());
}

#[test]
fn a_host_directory_is_bound_with_the_mounts_inside_it() {
    // Serial: the test's own tmpfs would count as a leftover mount in other tests.
    let _serial = exclusive();
    let f = fixture();
    let data = f.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let inner = TestTmpfs::mount(&data.join("inner"), nix::mount::MsFlags::empty());
    std::fs::write(inner.0.join("f.txt"), "inside the inner mount\n").unwrap();
    let ro = format!("{}:/srv/d:ro", data.display());
    let out = exec(
        &f,
        &[
            "--bind",
            &ro,
            "--",
            "/bin/sh",
            "-c",
            "cat /srv/d/inner/f.txt data/inner/f.txt; \
             touch /srv/d/inner/x 2>/dev/null && echo inner-writable; \
             touch data/inner/y && echo cwd-inner-ok",
        ],
    )
    .run();
    drop(inner);
    out.assert_success();
    assert_eq!(
        out.stdout.matches("inside the inner mount").count(),
        2,
        "{out}"
    );
    assert!(
        !out.stdout.contains("inner-writable"),
        "a read-only bind is read-only below too: {out}"
    );
    assert!(out.stdout.contains("cwd-inner-ok"), "{out}");
}

#[test]
fn dev_shm_is_private_unless_host_is_asked() {
    let _serial = exclusive();
    let f = fixture();
    let name = format!("cmpirun-test-shm-{}", std::process::id());
    let script = format!("echo x > /dev/shm/{name} && ls /dev/shm");
    let before = Snapshot::take();
    let out = exec(&f, &["--", "/bin/sh", "-c", &script]).run();
    out.assert_success();
    assert_eq!(out.stdout.trim(), name, "the private /dev/shm starts empty");
    assert!(!std::path::Path::new("/dev/shm").join(&name).exists());
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    let out = exec(&f, &["--shm", "host", "--", "/bin/sh", "-c", &script]).run();
    out.assert_success();
    let host = std::path::Path::new("/dev/shm").join(&name);
    assert!(host.exists(), "--shm host writes to the host's /dev/shm");
    std::fs::remove_file(host).unwrap();
}

#[test]
fn exit_status_and_signals_pass_through() {
    let f = fixture();
    exec(&f, &["--", "/bin/sh", "-c", "exit 3"])
        .run()
        .assert_code(3);
    let out = exec(&f, &["--", "/bin/sh", "-c", "kill -USR1 $$"]).run();
    assert_eq!(out.signal(), Some(Signal::SIGUSR1 as i32), "{out:?}");
    let out = exec(&f, &["--", "no-such-program"]).run();
    assert_eq!(out.code(), Some(127));
    assert!(
        out.stderr
            .contains("no-such-program: not found in the container")
    );
    // stdin reaches the program untouched.
    let out = exec(&f, &["--", "/bin/cat"]).stdin("through stdin\n").run();
    assert_eq!(out.stdout, "through stdin\n");
}

#[test]
fn sigterm_is_forwarded_and_nothing_is_left() {
    let _serial = exclusive();
    let f = fixture();
    let before = Snapshot::take();
    let ready = f.dir.path().join("ready");
    let script = format!("touch {}; exec sleep 60", ready.display());
    let child = exec(&f, &["--", "/bin/sh", "-c", &script]).spawn();
    wait_for_file(&ready, Duration::from_secs(20));
    child.signal(Signal::SIGTERM);
    let out = child.wait();
    assert_eq!(out.signal(), Some(Signal::SIGTERM as i32), "{out:?}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigkill_of_cmpirun_leaves_nothing() {
    let _serial = exclusive();
    let f = fixture();
    let before = Snapshot::take();
    let ready = f.dir.path().join("ready");
    // A background grandchild that would outlive its parent, and a shm object.
    let script = format!(
        "sleep 60 & echo x > /dev/shm/cmpirun-test-kill; touch {}; wait",
        ready.display()
    );
    let child = exec(&f, &["--", "/bin/sh", "-c", &script]).spawn();
    wait_for_file(&ready, Duration::from_secs(20));
    child.signal(Signal::SIGKILL);
    let out = child.wait();
    assert_eq!(out.signal(), Some(Signal::SIGKILL as i32));
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn normal_and_failing_runs_leave_nothing() {
    let _serial = exclusive();
    let f = fixture();
    let before = Snapshot::take();
    let ok = exec(&f, &["--", "/bin/sh", "-c", "sleep 30 & echo started"]).run();
    ok.assert_success();
    let bad = exec(&f, &["--", "/bin/false"]).run();
    assert_eq!(bad.code(), Some(1));
    assert_no_leftovers(&before, &[ok.tag.as_str(), bad.tag.as_str()]);
}
