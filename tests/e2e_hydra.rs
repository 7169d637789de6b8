//! End-to-end test of the hydra launcher: `cmpirun -f hostfile -n 4 …` with a hostfile naming
//! this machine runs the ranks through MPICH's `mpiexec.hydra`, each as `cmpirun __rank`, all in
//! one container.

mod common;

use common::*;

/// Runs a 4-rank job under hydra whose rank 1 fails as `failure` says (the others wait in a
/// barrier), and checks cmpirun's status and message, as the local launcher gives them, and
/// that nothing is left behind.
fn failing_job(failure: &RankFailure) {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 4);
    let before = Snapshot::take();
    let out = hydra_cmpirun(&hosts, 4)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(std::time::Duration::from_secs(120))
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/abort")
        .args(failure.args)
        .run();
    assert!(!out.timed_out, "{out}");
    failure.assert_ended(&out);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_rank_that_exits_3_ends_the_job_with_3() {
    failing_job(&RankFailure {
        message: "cmpirun: rank 1 of 4 exited with status 3; the job was ended",
        ..RANK_EXITS_3
    });
}

#[test]
fn a_rank_killed_by_a_signal_ends_the_job_with_128_plus_the_signal() {
    failing_job(&RANK_KILLED_BY_SIGKILL);
}

#[test]
fn mpi_abort_ends_the_job_with_its_code() {
    failing_job(&RANK_CALLS_MPI_ABORT_7);
}

#[test]
fn hostfile_naming_this_machine_launches_through_mpiexec_hydra() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hostfile = hostfile(dir.path(), 4);
    let before = Snapshot::take();
    let dry = hydra_cmpirun(&hostfile, 4)
        .arg("--dry-run")
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    dry.assert_success();
    assert!(dry.stdout.contains("launcher: hydra"), "{dry}");
    let out = hydra_cmpirun(&hostfile, 4)
        .arg("-l")
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    let hellos = assert_mpitest_ok(&out, 4);
    assert!(out.stdout.contains("[0] mpitest: OK size=4"), "{out}");
    assert_one_container_per_host(&hellos, tuser().uid);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_hostfile_of_twenty_thousand_nodes_reaches_hydra() {
    // This machine first, then 20,000 other names (about 760 KB as `-hosts name:slots,…`, more
    // than one argument may hold): hydra gets them in a hostfile cmpirun keeps in memory, and
    // runs the 2 ranks on this machine's slots.
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 2);
    let mut text = std::fs::read_to_string(&hosts).unwrap();
    for i in 0..20_000 {
        text.push_str(&format!("node{i:05}.cluster.example.org:128\n"));
    }
    std::fs::write(&hosts, text).unwrap();
    let before = Snapshot::take();
    let out = hydra_cmpirun(&hosts, 2)
        .arg("-v")
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    assert_mpitest_ok(&out, 2);
    assert!(
        out.stderr
            .contains("20001 hosts: passed to mpiexec.hydra in a hostfile (-f)"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigterm_to_cmpirun_ends_the_job_with_143_and_leaves_nothing() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 4);
    let before = Snapshot::take();
    let child = hydra_cmpirun(&hosts, 4)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(std::time::Duration::from_secs(120))
        .arg(staged_image("mpich4"))
        .args(["/bin/sleep", "600"])
        .spawn();
    wait_for_tagged(
        child.tag(),
        std::time::Duration::from_secs(60),
        "the ranks did not start",
        |procs| count_named(procs, "sleep") >= 4,
    );
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let out = child.wait();
    out.assert_code(143);
    assert!(out.stderr.contains("cmpirun: received SIGTERM"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn each_rank_leads_its_own_session() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 3);
    let out = hydra_cmpirun(&hosts, 3)
        .arg(staged_image("mpich4"))
        .args([
            "/bin/sh",
            "-c",
            "[ \"$(cut -d' ' -f6 /proc/$$/stat)\" = $$ ] && echo \"rank $PMI_RANK leads its session\"",
        ])
        .run();
    out.assert_success();
    for r in 0..3 {
        assert!(
            out.stdout.contains(&format!("rank {r} leads its session")),
            "{out}"
        );
    }
}

#[test]
fn a_rank_mode_that_cannot_start_its_rank_reports_its_status() {
    // Each task finds a file where its runtime directory should be: it fails before its rank
    // starts, and says so to cmpirun.
    let _serial = exclusive();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 2);
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::write(xdg.join("cmpirun"), "").unwrap();
    for p in [&xdg, &xdg.join("cmpirun")] {
        chown_to_tuser(p);
    }
    let before = Snapshot::take();
    let out = hydra_cmpirun(&hosts, 2)
        .env("XDG_RUNTIME_DIR", &xdg)
        .timeout(std::time::Duration::from_secs(120))
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(1);
    assert!(out.stderr.contains("of 2 exited with status 1"), "{out}");
    assert!(
        out.stderr.contains("is not a directory owned by uid"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// A node's first launch of an image under hydra: four `cmpirun __rank` tasks start at once with
/// an empty library cache; only the one that creates the node instance fills it, and no launch
/// hangs. Repeated, each time with an empty cache.
#[test]
fn cold_first_launches_under_hydra_never_hang() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 4);
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for i in 0..8 {
        let out = hydra_cmpirun(&hosts, 4)
            .env("CMPIRUN_KILL_GRACE", "2")
            .env(
                "CMPIRUN_LIBRARY_CACHE",
                dir.path().join(format!("libraries-{i}")),
            )
            .timeout(std::time::Duration::from_secs(60))
            .arg(staged_image("mpich4"))
            .arg("/usr/local/bin/mpitest")
            .run();
        tags.push(out.tag.clone());
        let hellos = assert_mpitest_ok(&out, 4);
        assert_one_container_per_host(&hellos, tuser().uid);
    }
    let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
    assert_no_leftovers(&before, &tags);
}
