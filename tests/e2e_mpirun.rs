//! End-to-end test of the mpirun launcher on one node: `cmpirun --launcher mpirun -n 4 …` runs
//! the ranks through the host's Open MPI `mpirun` (Debian's 4.1.4, the `openmpi4` image's), each
//! as `cmpirun __rank`, all in one container, with mpirun's PMIx server; failures end the job
//! with the statuses of the other launchers, and nothing is left behind.

mod common;

use std::time::Duration;

use common::*;

fn mpirun_cmpirun() -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(["--launcher", "mpirun"])
}

#[test]
fn open_mpi_ranks_run_under_mpirun_in_one_container() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let dry = mpirun_cmpirun()
        .args(["--dry-run", "-n", "4"])
        .arg(staged_image("openmpi4"))
        .arg(program("mpitest"))
        .run();
    dry.assert_success();
    assert!(
        dry.stdout.contains("launcher: mpirun") && dry.stdout.contains("pmi: pmix"),
        "{dry}"
    );
    let mut tags = Vec::new();
    for n in [1u32, 4] {
        let out = mpirun_cmpirun()
            .args(["-n", &n.to_string()])
            .arg(staged_image("openmpi4"))
            .arg(program("mpitest"))
            .run();
        let hellos = assert_mpitest_ok(&out, n);
        assert_one_container_per_host(&hellos, tuser().uid);
        tags.push(out.tag.clone());
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}

fn failing_job(failure: &RankFailure) {
    let _serial = exclusive();
    runtime_dir();
    run_failing_abort_job(mpirun_cmpirun(), &staged_image("openmpi4"), failure);
}

/// Under mpirun, `MPI_Abort` reaches mpirun's PMIx server, not a relay; Open MPI's rank then
/// exits with the code, which its task reports.
#[test]
fn mpi_abort_ends_the_job_with_its_code() {
    failing_job(&RankFailure {
        message: "cmpirun: rank 1 of 4 exited with status 7",
        ..RANK_CALLS_MPI_ABORT_7
    });
}

#[test]
fn a_rank_that_exits_3_ends_the_job_with_3() {
    failing_job(&RANK_EXITS_3);
}

#[test]
fn a_killed_rank_ends_the_job_with_137() {
    failing_job(&RANK_KILLED_BY_SIGKILL);
}
