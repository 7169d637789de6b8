//! End-to-end test of the hydra launcher: `cmpirun -f hostfile -n 4 …` with a hostfile naming
//! this machine runs the ranks through MPICH's `mpiexec.hydra`, each as `cmpirun __rank`, all in
//! one container.

mod common;

use common::*;

/// `cmpirun -f HOSTS -n N` as the test user: a job through hydra.
fn hydra(hosts: &std::path::Path, n: u32) -> TuserCommand {
    TuserCommand::cmpirun()
        .arg("-f")
        .arg(hosts)
        .args(["-n", &n.to_string()])
}

/// A hostfile naming this machine with `slots` slots.
fn hostfile(dir: &TuserDir, slots: u32) -> std::path::PathBuf {
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, format!("{host}:{slots}\n")).unwrap();
    hostfile
}

/// Runs a 4-rank job under hydra whose rank 1 fails as `args` say (the others wait in a
/// barrier), and checks cmpirun's status and message, as the local launcher gives them, and
/// that nothing is left behind.
fn failing_job(args: &[&str], code: i32, message: &str) {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(&dir, 4);
    let before = Snapshot::take();
    let out = hydra(&hosts, 4)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(std::time::Duration::from_secs(120))
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/abort")
        .args(args)
        .run();
    assert!(!out.timed_out, "{out}");
    out.assert_code(code);
    assert!(out.stderr.contains(message), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_rank_that_exits_3_ends_the_job_with_3() {
    failing_job(
        &["exit", "3"],
        3,
        "cmpirun: rank 1 of 4 exited with status 3; the job was ended",
    );
}

#[test]
fn a_rank_killed_by_a_signal_ends_the_job_with_128_plus_the_signal() {
    failing_job(
        &["signal", "9"],
        137,
        "cmpirun: rank 1 of 4 was killed by signal 9 (SIGKILL)",
    );
}

#[test]
fn mpi_abort_ends_the_job_with_its_code() {
    failing_job(
        &["abort", "7"],
        7,
        "cmpirun: rank 1 of 4 called MPI_Abort with code 7",
    );
}

#[test]
fn hostfile_naming_this_machine_launches_through_mpiexec_hydra() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hostfile = hostfile(&dir, 4);
    let before = Snapshot::take();
    let dry = hydra(&hostfile, 4)
        .arg("--dry-run")
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/mpitest")
        .run();
    dry.assert_success();
    assert!(dry.stdout.contains("launcher: hydra"), "{dry}");
    let out = hydra(&hostfile, 4)
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
fn sigterm_to_cmpirun_ends_the_job_with_143_and_leaves_nothing() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(&dir, 4);
    let before = Snapshot::take();
    let child = hydra(&hosts, 4)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(std::time::Duration::from_secs(120))
        .arg(staged_image("mpich4"))
        .args(["/bin/sleep", "600"])
        .spawn();
    wait_for_sleeps(child.tag(), 4);
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let out = child.wait();
    out.assert_code(143);
    assert!(out.stderr.contains("cmpirun: received SIGTERM"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// Waits until `n` processes named `sleep` carry run `tag`.
fn wait_for_sleeps(tag: &str, n: usize) {
    let want = format!("{TAG_VAR}={tag}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let sleeps = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "sleep")
                    && std::fs::read(e.path().join("environ"))
                        .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()))
            })
            .count();
        if sleeps >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ranks did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn each_rank_leads_its_own_session() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(&dir, 3);
    let out = hydra(&hosts, 3)
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
    let hosts = hostfile(&dir, 2);
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::write(xdg.join("cmpirun"), "").unwrap();
    for p in [&xdg, &xdg.join("cmpirun")] {
        nix::unistd::chown(
            p,
            Some(nix::unistd::Uid::from_raw(tuser().uid)),
            Some(nix::unistd::Gid::from_raw(tuser().gid)),
        )
        .unwrap();
    }
    let before = Snapshot::take();
    let out = hydra(&hosts, 2)
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
    let hosts = hostfile(&dir, 4);
    let before = Snapshot::take();
    let mut tags = Vec::new();
    for i in 0..8 {
        let out = hydra(&hosts, 4)
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
