//! End-to-end tests of the slurm launcher on the one-node test cluster (`ci/start-slurm.sh`):
//! cmpirun inside `salloc` launches through `srun`, every task is `cmpirun __rank`, and all ranks
//! of a node share one container.

mod common;

use std::time::Duration;

use common::*;

/// `salloc -n N cmpirun -n N FLAGS IMAGE PROGRAM ARGS` as the test user.
fn salloc(n: u32, flags: &[&str], image: &str, program: &str, args: &[&str]) -> RunOutput {
    salloc_cmpirun(n)
        .args(["-n", &n.to_string()])
        .args(flags)
        .arg(staged_image(image))
        .arg(program)
        .args(args)
        .run()
}

/// Checks an mpitest run of `n` ranks: passed, one container for all.
fn check_mpitest(out: &RunOutput, n: u32) {
    let hellos = assert_mpitest_ok(out, n);
    assert_one_container_per_host(&hellos, tuser().uid);
}

#[test]
fn mpich4_through_srun_pmi2() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let out = salloc(
        4,
        &["--pmi", "pmi2"],
        "mpich4",
        "/usr/local/bin/mpitest",
        &[],
    );
    check_mpitest(&out, 4);
    let out2 = salloc(
        2,
        &["--pmi", "pmi2"],
        "mpich4",
        "/usr/local/bin/bigmsg",
        &[],
    );
    out2.assert_success();
    assert!(out2.stdout.contains("bigmsg: OK size=2"), "{out2}");
    assert_no_leftovers(&before, &[out.tag.as_str(), out2.tag.as_str()]);
}

#[test]
fn mpich5_through_srun_pmi2() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let out = salloc(
        4,
        &[
            "--pmi",
            "pmi2",
            "-x",
            "FI_PROVIDER=tcp",
            "-x",
            "MPIR_CVAR_CH4_NETMOD=ofi",
        ],
        "mpich5",
        "/usr/local/bin/mpitest",
        &[],
    );
    check_mpitest(&out, 4);
}

#[test]
fn openmpi4_through_srun_pmix() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let out = salloc(
        4,
        &["--pmi", "pmix"],
        "openmpi4",
        "/usr/local/bin/mpitest",
        &[],
    );
    check_mpitest(&out, 4);
    // The PMIx server's directories are visible inside: no shared-memory store errors.
    assert!(!out.stderr.contains("PMIX ERROR"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// Runs a 4-rank job under srun whose rank 1 fails as `failure` says (the others wait in a
/// barrier), and checks cmpirun's status and message, as the local launcher gives them, and that
/// nothing is left behind: no process, mount, temporary file or rendezvous file.
fn failing_step(failure: &RankFailure) {
    let _serial = exclusive();
    let runtime = runtime_dir();
    let before = Snapshot::take();
    let out = salloc(
        4,
        &["--pmi", "pmi2"],
        "mpich4",
        "/usr/local/bin/abort",
        &failure.args,
    );
    assert!(!out.timed_out, "{out}");
    failure.assert_ended(&out);
    assert!(
        !out.stderr.contains("no rank reported") && !out.stderr.contains("never reported"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
    let stale: Vec<String> = std::fs::read_dir(&runtime)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("slurm-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        stale.is_empty(),
        "rendezvous files left in {runtime}: {stale:?}"
    );
}

#[test]
fn a_rank_that_exits_3_ends_the_step_with_3() {
    failing_step(&RankFailure {
        message: "cmpirun: rank 1 of 4 exited with status 3; the job was ended",
        ..RANK_EXITS_3
    });
}

#[test]
fn a_rank_killed_by_a_signal_ends_the_step_with_128_plus_the_signal() {
    failing_step(&RANK_KILLED_BY_SIGKILL);
}

#[test]
fn mpi_abort_ends_the_step_with_its_code() {
    // Slurm's pmi2 plugin kills the whole step with SIGKILL when it gets the abort; the code
    // comes from the rank's task, which sees the abort on its way to the plugin.
    failing_step(&RANK_CALLS_MPI_ABORT_7);
}

#[test]
fn timeout_ends_the_step_with_124() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let out = salloc(2, &["--timeout", "3"], "mpich4", "/bin/sleep", &["600"]);
    out.assert_code(124);
    assert!(
        out.stderr.contains("did not end within --timeout 3 s"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigterm_to_cmpirun_ends_the_step_with_143_and_leaves_nothing() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let (child, _, front) = sleeping_job();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(front),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait();
    out.assert_code(143);
    assert!(out.stderr.contains("cmpirun: received SIGTERM"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn each_rank_leads_its_own_session() {
    // slurmstepd keeps a node's tasks in one session; cmpirun makes each rank a session leader,
    // so that autogroup scheduling gives each rank its share of the CPUs.
    let _serial = exclusive();
    let out = salloc(
        3,
        &[],
        "mpich4",
        "/bin/sh",
        &[
            "-c",
            "[ \"$(cut -d' ' -f6 /proc/$$/stat)\" = $$ ] && echo \"rank $PMI_RANK leads its session\"",
        ],
    );
    out.assert_success();
    for r in 0..3 {
        assert!(
            out.stdout.contains(&format!("rank {r} leads its session")),
            "{out}"
        );
    }
}

/// Starts `salloc -n 2 cmpirun -n 2 mpich4 /bin/sleep 600` and waits until both ranks run;
/// returns the run, its processes and the pid of cmpirun's front end, which is salloc's child
/// (the tasks, also cmpirun, are slurmstepd's).
fn sleeping_job() -> (TuserChild, Vec<ProcInfo>, i32) {
    let child = salloc_cmpirun(2)
        .args(["-n", "2"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sleep", "600"])
        .spawn();
    let procs = wait_for_ranks(&child, 2);
    let front = procs
        .iter()
        .find(|p| p.comm == "cmpirun" && p.ppid == child.pid())
        .map(|p| p.pid)
        .unwrap_or_else(|| panic!("no front end under salloc: {procs:?}"));
    (child, procs, front)
}

/// Waits until `n` `sleep` ranks of run `child` run, and its front end; returns its processes.
fn wait_for_ranks(child: &TuserChild, n: usize) -> Vec<ProcInfo> {
    wait_for_tagged(
        child.tag(),
        Duration::from_secs(150),
        "the ranks did not start",
        |procs| {
            let front = procs
                .iter()
                .any(|p| p.comm == "cmpirun" && p.ppid == child.pid());
            count_named(procs, "sleep") == n && front
        },
    )
}

#[test]
fn a_task_killed_before_it_reports_ends_the_step_with_sruns_status() {
    let _serial = exclusive();
    runtime_dir();
    let before = Snapshot::take();
    let (child, procs, _) = sleeping_job();
    // A task (cmpirun __rank under slurmstepd) dies without a word, as on a lost node.
    let task = procs
        .iter()
        .find(|p| {
            p.comm == "cmpirun"
                && std::fs::read_to_string(format!("/proc/{}/comm", p.ppid))
                    .is_ok_and(|c| c.trim() == "slurmstepd")
        })
        .map(|p| p.pid)
        .unwrap_or_else(|| panic!("no task under slurmstepd: {procs:?}"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(task),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait();
    assert!(!out.timed_out && !out.success(), "{out}");
    let code = out.code().unwrap();
    assert!(
        out.stderr.contains(&format!(
            "cmpirun: srun ended with status {code} and no rank reported a failure"
        )),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// A node's first launch of an image under srun: every task of the step starts at once and
/// finds the library cache empty. Only the task that creates the node instance fills the entry;
/// the others wait for the instance, never for a cache lock that a task whose ranks wait for
/// theirs in MPI wire-up holds (one launch in five hung so before). Repeated, each time with an
/// empty cache.
#[test]
fn cold_first_launches_under_srun_fill_the_library_cache_once_and_never_hang() {
    let _serial = exclusive();
    runtime_dir();
    let work = TuserDir::new();
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for i in 0..8 {
        let cache = work.path().join(format!("libraries-{i}"));
        let out = salloc_cmpirun(4)
            .env("CMPIRUN_LIBRARY_CACHE", &cache)
            .timeout(Duration::from_secs(60))
            .args(["-n", "4"])
            .arg(staged_image("mpich4"))
            .arg("/usr/local/bin/mpitest")
            .run();
        tags.push(out.tag.clone());
        check_mpitest(&out, 4);
        let entries: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.contains('.'))
            .collect();
        assert_eq!(
            entries.len(),
            1,
            "one entry in {}: {entries:?}",
            cache.display()
        );
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}
