//! Faults of the environment a job runs in: output to a reader that went away (stderr, stdout).

mod common;

use std::time::Duration;

use common::*;

/// `cmpirun -vv` with its log going to a pipe whose reader stops after one byte (`… 2>&1 | head
/// -c 1`): log lines to the closed pipe are dropped, and the job runs to its end with its own
/// status (it panicked with 101 before, or hung).
#[test]
fn a_closed_stderr_neither_panics_nor_stops_the_job() {
    let _serial = exclusive();
    let work = TuserDir::new();
    let out_file = work.path().join("stdout");
    let before = Snapshot::take();
    let out = TuserCommand::new("bash")
        .timeout(Duration::from_secs(120))
        .args([
            "-c",
            r#""$0" -vv -n 2 "$1" /usr/local/bin/mpitest 2>&1 >"$2" | head -c 1 >/dev/null; echo "status=${PIPESTATUS[0]}""#,
        ])
        .arg(cmpirun_bin())
        .arg(staged_image("mpich4"))
        .arg(&out_file)
        .run();
    out.assert_success();
    assert!(out.stdout.contains("status=0"), "{out}");
    let stdout = std::fs::read_to_string(&out_file).unwrap();
    assert!(stdout.contains("mpitest: OK size=2"), "{stdout}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// Ranks that write without end into `| head -1`: once the reader has gone, the job ends with
/// status 141 (as if cmpirun had been killed by SIGPIPE, as `mpiexec.hydra` ends), its ranks
/// are stopped, and nothing is left. It ran for ever before, writing into nothing.
#[test]
fn a_closed_stdout_ends_the_job_with_141() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = TuserCommand::new("bash")
        .timeout(Duration::from_secs(120))
        .env("CMPIRUN_KILL_GRACE", "2")
        .args([
            "-c",
            r#""$0" -n 2 "$1" /bin/sh -c 'while :; do echo "rank $PMI_RANK"; done' | head -1 >/dev/null; echo "status=${PIPESTATUS[0]}""#,
        ])
        .arg(cmpirun_bin())
        .arg(staged_image("mpich4"))
        .run();
    out.assert_success();
    assert!(out.stdout.contains("status=141"), "{out}");
    assert!(
        out.stderr
            .contains("the reader of cmpirun's standard output went away; the job was ended"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
