//! Checks of the test helpers themselves: running as the test user, timeouts, leftover detection.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn runs_as_the_test_user_without_capabilities() {
    let out = TuserCommand::new("sh")
        .args([
            "-c",
            "id -u; id -g; grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status; env",
        ])
        .env("SLURM_JOB_ID", "set-on-purpose")
        .run();
    out.assert_success();
    let user = tuser();
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some(user.uid.to_string().as_str()), "{out}");
    assert_eq!(lines.next(), Some(user.gid.to_string().as_str()), "{out}");
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            out.stdout.contains(&format!("{cap}:\t0000000000000000")),
            "{cap} not empty:\n{out}"
        );
    }
    assert!(
        out.stdout.contains(&format!("{TAG_VAR}={}", out.tag)),
        "{out}"
    );
    assert!(out.stdout.contains("SLURM_JOB_ID=set-on-purpose"), "{out}");
    // Nothing of the test's own environment leaks in unless asked for.
    assert!(!out.stdout.contains("CARGO_"), "{out}");
}

#[test]
fn reports_exit_codes_and_signals() {
    TuserCommand::new("sh")
        .args(["-c", "exit 3"])
        .run()
        .assert_code(3);
    let out = TuserCommand::new("sh").args(["-c", "kill -TERM $$"]).run();
    assert_eq!(out.signal(), Some(15), "{out}");
    let out = TuserCommand::new("cat").stdin("piped in").run();
    assert_eq!(out.assert_success().stdout, "piped in");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = TuserCommand::new("sh")
        .args(["-c", "sleep 300 & sleep 300"])
        .timeout(Duration::from_millis(500))
        .run();
    assert!(out.timed_out, "{out}");
    assert!(!out.success());
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn leftover_processes_are_found_by_tag() {
    let _serial = exclusive();
    let before = Snapshot::take();
    // setsid leaves the process group, as a daemonising helper would; only the tag finds it.
    let out = TuserCommand::new("sh")
        .args([
            "-c",
            "setsid sleep 300 >/dev/null 2>&1 < /dev/null & exit 0",
        ])
        .run();
    out.assert_success();
    // The detached child may still be `setsid` between its fork and its exec of `sleep`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = Snapshot::take().leftovers_since(&before, &[out.tag.as_str()]);
        if left.processes.iter().any(|p| p.comm == "sleep") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the detached sleep was not reported: {left}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let other = Snapshot::take().leftovers_since(&before, &["some-other-run"]);
    assert!(other.processes.iter().all(|p| p.comm != "sleep"), "{other}");
    kill_tagged(&out.tag);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn leftover_files_in_tmp_and_shm_are_found() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let name = format!("cmpirun-helper-check-{}", std::process::id());
    TuserCommand::new("sh")
        .args(["-c", &format!("mkdir /tmp/{name} && touch /dev/shm/{name}")])
        .run()
        .assert_success();
    let left = Snapshot::take().leftovers_since(&before, &[]);
    assert!(left.tmp.iter().any(|t| t.ends_with(&name)), "{left}");
    assert!(left.shm.iter().any(|t| t.ends_with(&name)), "{left}");
    std::fs::remove_dir(format!("/tmp/{name}")).unwrap();
    std::fs::remove_file(format!("/dev/shm/{name}")).unwrap();
}

#[test]
fn test_user_dir_is_owned_by_the_test_user_and_removed() {
    let dir = TuserDir::new();
    let path = dir.path().to_path_buf();
    TuserCommand::new("touch")
        .arg("made-here")
        .current_dir(&path)
        .run()
        .assert_success();
    assert!(path.join("made-here").exists());
    drop(dir);
    assert!(!path.exists());
}

#[test]
fn staged_binary_is_executable_by_the_test_user() {
    let out = TuserCommand::cmpirun().arg("--version").run();
    out.assert_success();
    assert!(out.stdout.starts_with("cmpirun "), "{out}");
}

#[test]
fn slurm_test_cluster_runs_jobs_as_the_test_user() {
    if std::env::var_os("CI").is_none() && slurm_conf().is_none() {
        // Outside CI the cluster may not be started; ci/test.sh always starts it.
        eprintln!("skipped: the Slurm test cluster is not running (ci/start-slurm.sh)");
        return;
    }
    let out = TuserCommand::new("srun")
        .args(["-n", "2", "id", "-u"])
        .slurm()
        .timeout(Duration::from_secs(60))
        .run();
    out.assert_success();
    let uid = tuser().uid.to_string();
    assert_eq!(out.stdout.lines().filter(|l| *l == uid).count(), 2, "{out}");
}
