//! `cmpirun doctor` as the unprivileged test user: every check passes on this machine (with a
//! real 2-rank smoke job), and each FAIL that can be caused for real here is: FUSE unusable
//! (`/dev/fuse` bind-mounted from `/dev/null` in a private mount namespace), user namespaces off
//! (`user.max_user_namespaces` set to 0 in a user namespace the doctor then runs in), and a
//! profile that names a missing library.

mod common;
use common::*;

use serde_json::Value;

/// Runs `cmpirun doctor --json ARGS` through `sh -c PREFIX "$0" doctor --json ARGS` (PREFIX
/// sets up the fault, then execs), as the test user; returns the run and the report.
fn doctor_in(prefix: Option<&str>, args: &[&str]) -> (RunOutput, Value) {
    let cmd = match prefix {
        None => TuserCommand::cmpirun().args(["doctor", "--json"]),
        Some(prefix) => TuserCommand::new("unshare")
            .args(["-Ur", "-m", "sh", "-c"])
            .arg(format!("{prefix} && exec \"$0\" \"$@\""))
            .arg(cmpirun_bin())
            .args(["doctor", "--json"]),
    };
    let out = cmd.args(args).run();
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: not a JSON report:\n{}\n{}", out.stdout, out.stderr));
    (out, report)
}

/// The finding of `check` in `report`: (verdict, message, fix).
fn finding(report: &Value, check: &str) -> (String, String, String) {
    let f = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {report:#}"));
    let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
    (s("verdict"), s("message"), s("fix"))
}

#[test]
fn everything_passes_here_with_a_real_smoke_job() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let (out, report) = doctor_in(None, &[]);
    assert_eq!(report["worst"], "pass", "{report:#}\n{}", out.stderr);
    out.assert_code(0);
    let (verdict, message, _) = finding(&report, "smoke-test");
    assert_eq!(verdict, "pass");
    assert!(message.contains("2-rank job"), "{message}");
    for check in [
        "user-namespaces",
        "fuse-device",
        "fuse-mount",
        "overlayfs",
        "profile",
        "libfabric",
        "profile-files",
        "pmi-libraries",
        "extract-cache",
        "library-cache",
        "limits",
    ] {
        assert_eq!(finding(&report, check).0, "pass", "{check}: {report:#}");
    }
    assert_no_leftovers(&before, &[out.tag.as_str()]);

    // The text form: one line per check, a summary, the same status.
    let out = TuserCommand::cmpirun().args(["doctor", "--no-smoke"]).run();
    assert!(
        out.stdout.starts_with("cmpirun doctor on "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\nPASS  fuse-mount: "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("\nWARN  smoke-test: skipped (--no-smoke)\n      fix: "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .ends_with("WARN: 11 passed, 1 warned, 0 failed\n"),
        "{}",
        out.stdout
    );
    out.assert_code(3);
}

#[test]
fn fuse_unusable_fails_and_jobs_still_run_by_extracting() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let (out, report) = doctor_in(Some("mount --bind /dev/null /dev/fuse"), &[]);
    assert_eq!(report["worst"], "fail", "{report:#}");
    out.assert_code(1);
    let (verdict, message, fix) = finding(&report, "fuse-device");
    assert_eq!(verdict, "fail");
    assert!(
        message.contains("not the FUSE device (device 1:3, expected 10:229)"),
        "{message}"
    );
    assert!(fix.contains("modprobe fuse"), "{fix}");
    let (verdict, message, fix) = finding(&report, "fuse-mount");
    assert_eq!(verdict, "fail");
    assert!(message.contains("not the FUSE device"), "{message}");
    assert!(fix.contains("--image-mount extract"), "{fix}");
    // Without FUSE a launch extracts the image instead: the smoke job still runs.
    assert_eq!(finding(&report, "smoke-test").0, "pass", "{report:#}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn user_namespaces_off_fails_with_the_sysctl_to_change() {
    let _serial = exclusive();
    let (out, report) = doctor_in(
        Some("echo 0 > /proc/sys/user/max_user_namespaces"),
        &["--no-smoke"],
    );
    out.assert_code(1);
    let (verdict, message, fix) = finding(&report, "user-namespaces");
    assert_eq!(verdict, "fail");
    assert!(
        message.contains("cannot create a user namespace"),
        "{message}"
    );
    assert!(message.contains("user.max_user_namespaces=0"), "{message}");
    assert!(fix.contains("sysctl -w user.max_user_namespaces="), "{fix}");
    assert_eq!(finding(&report, "fuse-mount").0, "fail");
}

#[test]
fn a_profile_naming_a_missing_library_fails() {
    let dir = TuserDir::new();
    let profile = dir.path().join("missing-lib.yaml");
    std::fs::write(
        &profile,
        "name: missing-lib\ndescription: names a library this host lacks\nfabric:\n  \
         libraries:\n    - /opt/nowhere/lib64/libcxi.so.1\n  devices:\n    - /dev/null\n",
    )
    .unwrap();
    let (out, report) = doctor_in(
        None,
        &["--no-smoke", "--profile", profile.to_str().unwrap()],
    );
    out.assert_code(1);
    let (verdict, message, fix) = finding(&report, "profile-files");
    assert_eq!(verdict, "fail");
    assert!(
        message.contains("fabric.libraries /opt/nowhere/lib64/libcxi.so.1"),
        "{message}"
    );
    assert!(!message.contains("/dev/null"), "{message}");
    assert!(fix.contains(profile.to_str().unwrap()), "{fix}");
    let (verdict, message, _) = finding(&report, "profile");
    assert_eq!(verdict, "pass");
    assert!(message.contains("named with --profile"), "{message}");
}

/// A user inside an allocation, on each node of it (`srun … cmpirun doctor`): the Slurm profile
/// is the one that matches, and the smoke job (cmpirun's local launcher, inside the step) runs.
#[test]
fn inside_an_allocation_through_srun() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = TuserCommand::new("salloc")
        .args(["-N", "1", "--quiet", "srun", "-n", "1"])
        .arg(cmpirun_bin())
        .args(["doctor", "--json"])
        .slurm()
        .run();
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: not a JSON report:\n{out}"));
    assert_eq!(report["worst"], "pass", "{report:#}\n{}", out.stderr);
    out.assert_code(0);
    let (_, message, _) = finding(&report, "profile");
    assert!(message.starts_with("slurm-pmi2 ("), "{message}");
    assert!(message.contains("$SLURM_JOB_ID="), "{message}");
    assert_eq!(finding(&report, "smoke-test").0, "pass");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
