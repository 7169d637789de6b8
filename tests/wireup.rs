//! End-to-end tests of a job that waits in PMI wire-up, under the local launcher: the ranks that
//! reached `MPI_Init`'s fence wait for one that has not connected yet, and cmpirun says so on
//! stderr (which fence, how long, which ranks arrived and which are missing, which never
//! connected to its PMI server) after `CMPIRUN_WIREUP_REPORT` seconds, again each time the wait
//! has doubled, and lets the job go on (docs/pmi.md, "Faults").
//!
//! The late rank is an MPMD part whose program sleeps before it execs the MPI program: the
//! shape of the "MPMD parts that cannot talk" hang, where some ranks never come to the fence.

mod common;

use std::time::Duration;

use common::*;

/// The report lines of `stderr`, in order.
fn fence_reports(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("PMI fence "))
        .collect()
}

/// The `waited` seconds of a report line.
fn waited_secs(line: &str) -> f64 {
    let at = line.find("has waited ").expect("a waited time") + "has waited ".len();
    let rest = &line[at..];
    let end = rest.find(' ').expect("a unit");
    rest[..end].parse().expect("seconds")
}

#[test]
fn a_rank_late_to_mpi_init_is_named_while_the_others_wait_and_the_job_then_succeeds() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let img = staged_image("mpich4");
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_WIREUP_REPORT", "1")
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(["-n", "1"])
        .arg(&img)
        .arg(program("hello"))
        .args([":", "-n", "1"])
        .arg(&img)
        .args(["/bin/sh", "-c"])
        .arg(format!("sleep 5; exec {}", program("hello")))
        .run();
    out.assert_success();
    let mut hellos: Vec<u32> = hello_lines(&out.stdout).iter().map(|h| h.rank).collect();
    hellos.sort_unstable();
    assert_eq!(hellos, [0, 1], "{out}");

    let reports = fence_reports(&out.stderr);
    assert!(
        !reports.is_empty(),
        "no report of the waiting fence:\n{out}"
    );
    let first = reports[0];
    for part in [
        "WARN",
        "PMI fence 1 (0 completed) has waited 1.",
        "for 1 of 2 ranks: arrived 0; missing 1",
        "never connected to the PMI server: 1",
        "--timeout",
    ] {
        assert!(first.contains(part), "{part:?} not in {first:?}:\n{out}");
    }
    // Repeated as the wait grows, at doublings (1, 2, 4 s …), not at every turn of the loop.
    // The k-th report (from 0) comes when the wait has reached 2^k s: reports at every turn of
    // the loop would come early.
    assert!(reports.len() >= 2, "one report only:\n{out}");
    for (k, line) in reports.iter().enumerate() {
        let due = f64::from(1u32 << k);
        assert!(
            waited_secs(line) >= due - 0.05,
            "report {k} before {due} s:\n{out}"
        );
    }
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn mpmd_parts_whose_mpi_stacks_cannot_talk_are_reported_until_the_timeout_ends_the_job() {
    // Debian's MPICH 4.0.2 and MPICH 5 (issue 15, item 6): rank 0 waits in the first fence while
    // rank 1 spoke PMI and then waits for something rank 0 never gives it. Before, the job hung
    // with nothing on stderr.
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_WIREUP_REPORT", "2")
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(["--force", "--timeout", "12", "-n", "1"])
        .arg(staged_image("mpich4"))
        .arg(program("hello"))
        .args([":", "-n", "1"])
        .arg(staged_image("mpich5"))
        .arg(program("hello"))
        .run();
    // Reported, not ended: --timeout ends the job.
    out.assert_code(124);
    let reports = fence_reports(&out.stderr);
    assert!(reports.len() >= 2, "{out}");
    for line in &reports {
        assert!(
            line.contains("PMI fence 1 (0 completed)") && line.contains("missing 1"),
            "{line:?}:\n{out}"
        );
    }
    assert!(reports[0].contains("has waited 2."), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_job_whose_fences_complete_in_time_says_nothing_about_them() {
    let _serial = exclusive();
    let out = TuserCommand::cmpirun()
        .env("CMPIRUN_WIREUP_REPORT", "20")
        .timeout(Duration::from_secs(120))
        .args(["-n", "2"])
        .arg(staged_image("mpich4"))
        .arg(program("hello"))
        .run();
    out.assert_success();
    assert!(fence_reports(&out.stderr).is_empty(), "{out}");
}
