//! Faults of the environment a job runs in: output to a reader that went away (stderr, stdout),
//! an image server that dies while the job runs (under each launcher), a job beyond the node's
//! limits.

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

/// Which process of a running job a test kills.
#[derive(Clone, Copy)]
enum Victim {
    /// The built-in FUSE server (a fork of the node instance that names itself `cmpirun-fuse`).
    ImageServer,
    /// The node instance (the image server's parent).
    NodeInstance,
}

/// Starts `job` (two ranks that sleep, in the mpich4 image with the built-in FUSE server),
/// SIGKILLs `victim` once both ranks sleep (as the OOM killer would), and checks that the job
/// ended with status 1 at once, its stderr holding every one of `said`, instead of running on
/// with its files gone (it exited 0 before), and that it left nothing.
fn kill_during_job(job: TuserCommand, ready: &std::path::Path, victim: Victim, said: &[&str]) {
    let before = Snapshot::take();
    let child = job
        .env("CMPIRUN_KILL_GRACE", "2")
        .env("CMPIRUN_LIBRARY_CACHE", "off")
        .timeout(Duration::from_secs(120))
        .args(["--image-mount", "fuse", "-n", "2"])
        .arg(staged_image("mpich4"))
        .args([
            "/bin/sh",
            "-c",
            &format!("touch {}.$PMI_RANK; sleep 30", ready.display()),
        ])
        .spawn();
    let procs = wait_for_tagged(
        child.tag(),
        Duration::from_secs(60),
        "two sleeping ranks",
        |p| p.iter().filter(|p| p.comm == "sleep").count() == 2,
    );
    let server = procs
        .iter()
        .find(|p| p.comm == "cmpirun-fuse")
        .unwrap_or_else(|| panic!("no image server: {procs:?}"));
    let pid = match victim {
        Victim::ImageServer => server.pid,
        Victim::NodeInstance => server.ppid,
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let tag = child.tag().to_owned();
    let out = child.wait();
    out.assert_code(1);
    for s in said {
        assert!(out.stderr.contains(s), "{s:?} not said: {out}");
    }
    assert!(
        out.elapsed < Duration::from_secs(25),
        "ended at once, not after the ranks' sleep: {out}"
    );
    assert_no_leftovers(&before, &[tag.as_str()]);
}

/// [`kill_during_job`] of the image server.
fn kill_the_image_server(job: TuserCommand, ready: &std::path::Path) {
    kill_during_job(
        job,
        ready,
        Victim::ImageServer,
        &[
            "cmpirun: rank ",
            "the image mount of node",
            "was killed by signal 9 (SIGKILL)); the job was ended",
        ],
    );
}

#[test]
fn a_killed_image_server_ends_a_local_job_and_says_so() {
    let _serial = exclusive();
    let work = TuserDir::new();
    kill_the_image_server(TuserCommand::cmpirun(), &work.path().join("ready"));
}

#[test]
fn a_killed_image_server_ends_a_job_under_srun_and_says_so() {
    let _serial = exclusive();
    runtime_dir();
    let work = TuserDir::new();
    kill_the_image_server(salloc_cmpirun(2), &work.path().join("ready"));
}

#[test]
fn a_killed_image_server_ends_a_job_under_hydra_and_says_so() {
    let _serial = exclusive();
    runtime_dir();
    let work = TuserDir::new();
    let hosts = hostfile(work.path(), 2);
    kill_the_image_server(
        TuserCommand::cmpirun().arg("-f").arg(&hosts),
        &work.path().join("ready"),
    );
}

/// `-n 100000` on one node: more descriptors or processes than the node's limits allow. The job
/// is refused before anything starts, with the numbers and what to do (three `EMFILE` lines and
/// status 1 before).
#[test]
fn a_job_beyond_the_nodes_limits_is_refused_with_the_numbers() {
    let before = Snapshot::take();
    let out = TuserCommand::cmpirun()
        .args(["-n", "100000"])
        .arg(staged_image("mpich4"))
        .arg("/bin/true")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("cmpirun: the job needs ")
            && out.stderr.contains("on this node, but the limit is ")
            && out.stderr.contains("run fewer ranks on this node"),
        "{out}"
    );
    assert!(!out.stderr.contains("EMFILE"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// [`kill_during_job`] of the node instance.
fn kill_the_node_instance(job: TuserCommand, ready: &std::path::Path) {
    kill_during_job(
        job,
        ready,
        Victim::NodeInstance,
        &["node instance", "ended while the rank"],
    );
}

#[test]
fn a_killed_node_instance_ends_a_local_job_and_says_so() {
    let _serial = exclusive();
    let work = TuserDir::new();
    kill_the_node_instance(TuserCommand::cmpirun(), &work.path().join("ready"));
}

#[test]
fn a_killed_node_instance_ends_a_job_under_srun_and_says_so() {
    let _serial = exclusive();
    runtime_dir();
    let work = TuserDir::new();
    kill_the_node_instance(salloc_cmpirun(2), &work.path().join("ready"));
}

/// A job whose front end was killed under srun leaves its step's rendezvous files (its
/// instance died by SIGKILL with it, and the step's key never comes again): the next job's front
/// end on the node removes the files of instances that no longer answer, and keeps the others.
#[test]
fn the_next_front_end_removes_the_files_a_killed_job_left() {
    let _serial = exclusive();
    let dir = runtime_dir();
    let stale = format!("{dir}/slurm-999999.0");
    // A socket nobody listens on, and its lock file, as a killed instance leaves them.
    TuserCommand::new("python3")
        .args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]+'.sock'); \
             open(sys.argv[1]+'.lock','w')",
            &stale,
        ])
        .run()
        .assert_success();
    let out = salloc_cmpirun(1)
        .args(["-n", "1"])
        .arg(staged_image("mpich4"))
        .arg("/bin/true")
        .run();
    out.assert_success();
    for f in [".sock", ".lock"] {
        assert!(
            !std::path::Path::new(&format!("{stale}{f}")).exists(),
            "{stale}{f} is still there"
        );
    }
}

/// After an srun job, the user's runtime directory holds no `cmpirun` folder: the instance
/// removes it with its files, and the front end's sweep of stale files (which makes it when it
/// is missing) removes it again when it is empty.
#[test]
fn an_srun_job_leaves_no_runtime_folder_behind() {
    let _serial = exclusive();
    let xdg = TuserDir::new();
    let out = salloc_cmpirun(2)
        .env("XDG_RUNTIME_DIR", xdg.path())
        .args(["-n", "2"])
        .arg(staged_image("mpich4"))
        .arg("mpitest")
        .run();
    out.assert_success();
    let folder = xdg.path().join("cmpirun");
    assert!(
        !folder.exists(),
        "{} is still there: {out}",
        folder.display()
    );
}
