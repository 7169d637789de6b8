//! Faults of the environment a job runs in: output to a reader that went away.

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
