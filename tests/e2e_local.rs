//! End-to-end tests of the local launcher: real images, real MPI, run as the test user.
//!
//! `cmpirun -n N IMAGE PROGRAM` with the test programs of `examples/mpi`; each failure mode ends
//! the job with the status `docs/exit-status.md` documents and leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn cmpirun(image: &str) -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .env("CMPIRUN_TEST_IMAGE", image)
}

/// Runs `cmpirun -n N [flags] IMAGE PROGRAM ARGS` as the test user.
fn run(image: &str, n: u32, flags: &[&str], program: &str, args: &[&str]) -> RunOutput {
    cmpirun(image)
        .args(["-n", &n.to_string()])
        .args(flags)
        .arg(staged_image(image))
        .arg(program)
        .args(args)
        .run()
}

#[test]
fn mpich4_mpitest_and_bigmsg_on_1_2_4_8_ranks() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let uid = tuser().uid;
    for n in [1u32, 2, 4, 8] {
        let out = run("mpich4", n, &[], "/usr/local/bin/mpitest", &[]);
        let hellos = assert_mpitest_ok(&out, n);
        assert_one_container_per_host(&hellos, uid);
        let userns = hellos[0].userns.unwrap().to_string();
        let host_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
        assert!(!host_userns.to_string_lossy().contains(&userns), "{out}");
        let out = run("mpich4", n, &[], "/usr/local/bin/bigmsg", &[]);
        assert_bigmsg_ok(&out, n);
    }
}

#[test]
fn mpich5_ofi_over_tcp_and_shm() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    for provider in ["tcp", "shm"] {
        for program in ["mpitest", "bigmsg"] {
            let out = run(
                "mpich5",
                4,
                &[
                    "-x",
                    &format!("FI_PROVIDER={provider}"),
                    "-x",
                    "MPIR_CVAR_CH4_NETMOD=ofi",
                ],
                &format!("/usr/local/bin/{program}"),
                &[],
            );
            out.assert_success();
            assert!(
                out.stdout.contains(&format!("{program}: OK size=4")),
                "{provider}:\n{out}"
            );
        }
    }
}

#[test]
fn output_tags() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let out = run("mpich4", 2, &["--tag-output"], "/usr/local/bin/hello", &[]);
    out.assert_success();
    for r in 0..2 {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("[1,{r}]<stdout>:hello: rank={r} size=2"))),
            "{out}"
        );
    }
    let out = run(
        "mpich4",
        2,
        &["-l"],
        "/bin/sh",
        &[
            "-c",
            "echo out $PMI_RANK; echo err $PMI_RANK >&2; printf tail",
        ],
    );
    out.assert_success();
    for r in 0..2 {
        assert!(out.stdout.contains(&format!("[{r}] out {r}\n")), "{out}");
        assert!(out.stdout.contains(&format!("[{r}] tail\n")), "{out}");
        assert!(out.stderr.contains(&format!("[{r}] err {r}\n")), "{out}");
    }
    // Untagged output is still whole lines, with the last partial line kept as written.
    let out = run("mpich4", 1, &[], "/bin/sh", &["-c", "printf 'a\\nb'"]);
    out.assert_success();
    assert_eq!(out.stdout, "a\nb", "{out}");
}

#[test]
fn rank_zero_gets_stdin() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let out = cmpirun("mpich4")
        .args(["-n", "2", "-l"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", "echo got $(cat)"])
        .stdin("piped")
        .run();
    out.assert_success();
    assert!(out.stdout.contains("[0] got piped\n"), "{out}");
    assert!(out.stdout.contains("[1] got\n"), "{out}");
}

/// Runs a failing job and checks its status, its message and that nothing is left behind.
fn failing_job(failure: &RankFailure) {
    let _serial = exclusive();
    let before = Snapshot::take();
    let started = Instant::now();
    let out = run("mpich4", 4, &[], "/usr/local/bin/abort", &failure.args);
    failure.assert_ended(&out);
    // The other ranks wait in a barrier forever: only a teardown ends the job.
    assert!(started.elapsed() < Duration::from_secs(30), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_rank_that_exits_3_ends_the_job_with_3() {
    failing_job(&RANK_EXITS_3);
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
fn timeout_ends_the_job_with_124() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = run("mpich4", 4, &["--timeout", "2"], "/bin/sleep", &["600"]);
    out.assert_code(124);
    assert!(
        out.stderr.contains("did not end within --timeout 2 s"),
        "{out}"
    );
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

/// Starts a 4-rank job that never ends and waits until every rank has said it started.
fn start_hanging_job() -> TuserChild {
    let child = cmpirun("mpich4")
        .args(["-n", "4"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sleep", "600"])
        .spawn();
    wait_for_tagged(
        child.tag(),
        Duration::from_secs(60),
        "the ranks did not start",
        |procs| count_named(procs, "sleep") == 4,
    );
    child
}

#[test]
fn sigterm_to_cmpirun_reaches_every_rank_and_ends_with_143() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let child = start_hanging_job();
    child.signal(nix::sys::signal::Signal::SIGTERM);
    let out = child.wait();
    out.assert_code(143);
    assert!(out.stderr.contains("received SIGTERM"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigkill_to_cmpirun_leaves_nothing_behind() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let child = start_hanging_job();
    child.signal(nix::sys::signal::Signal::SIGKILL);
    let out = child.wait();
    assert_eq!(out.signal(), Some(9), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn a_missing_program_fails_with_127_and_a_bad_image_with_2() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let out = run("mpich4", 2, &[], "/no/such/program", &[]);
    out.assert_code(127);
    assert!(out.stderr.contains("not found in the container"), "{out}");
    let out = cmpirun("mpich4")
        .args(["-n", "2", "/no/such/image.sif", "/usr/local/bin/hello"])
        .run();
    out.assert_code(2);
    assert_no_leftovers(&before, &[]);
}

#[test]
fn sixty_four_ranks_on_two_cores() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let out = cmpirun("mpich4")
        .args(["-n", "64"])
        .arg(staged_image("mpich4"))
        .arg("/usr/local/bin/hello")
        .timeout(Duration::from_secs(300))
        .run();
    out.assert_success();
    let ranks: BTreeSet<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("size=64"))
        .collect();
    assert_eq!(ranks.len(), 64, "{out}");
}

#[test]
fn four_hundred_ranks_beyond_the_default_open_file_limit() {
    // Serial: every run mounts an image, which shows host-wide as a FUSE connection
    // that the leftover checks of the other tests would count.
    let _serial = exclusive();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 3 * 400 + 64 {
        eprintln!("skipped: the hard limit on open files ({hard}) is below what 400 ranks need");
        return;
    }
    let out = cmpirun("mpich4")
        .args(["-n", "400"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", "[ \"$PMI_SIZE\" = 400 ]"])
        .timeout(Duration::from_secs(300))
        .run();
    out.assert_success();
}

/// Lines each rank of [`sigint_rank`] writes after its "got SIGINT" line (more than a pipe
/// holds, so cmpirun must go on reading while the job is torn down).
const LINES_AFTER_SIGINT: usize = 2000;

/// A rank that says it is ready (a file in `dir`), then waits; SIGINT makes it say so, write
/// [`LINES_AFTER_SIGINT`] more lines and a last one, and exit 0.
fn sigint_rank(dir: &std::path::Path) -> String {
    format!(
        "trap 'echo \"rank $PMI_RANK got SIGINT\"; i=0; while [ $i -lt {LINES_AFTER_SIGINT} ]; do \
         echo \"rank $PMI_RANK line $i, written after SIGINT\"; i=$((i+1)); done; \
         echo \"rank $PMI_RANK wrote all\"; exit 0' INT; \
         echo $$ >{d}/pid.$PMI_RANK && mv {d}/pid.$PMI_RANK {d}/ready.$PMI_RANK; sleep 600 & wait",
        d = dir.display()
    )
}

/// Waits until `n` ranks of [`sigint_rank`] are ready.
fn wait_ready(dir: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ready."))
            .count()
    }) < n
    {
        assert!(Instant::now() < deadline, "the ranks did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The session id and state of a process.
fn session_and_state(pid: i32) -> (i32, char) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (rest[3].parse().unwrap(), rest[0].chars().next().unwrap())
}

/// Single quotes for the shell.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Checks that each of the 4 ranks said once that SIGINT reached it, and that every line it
/// wrote after that reached cmpirun's output.
fn every_rank_got_sigint_once(out: &RunOutput) {
    for r in 0..4 {
        let count = |what: &str| {
            out.stdout
                .lines()
                .filter(|l| l.starts_with(&format!("rank {r} {what}")))
                .count()
        };
        assert_eq!(count("got SIGINT"), 1, "{out}");
        assert_eq!(count("line "), LINES_AFTER_SIGINT, "rank {r}: {out}");
        assert_eq!(count("wrote all"), 1, "{out}");
    }
}

#[test]
fn sigint_to_cmpirun_reaches_every_rank_once_and_each_rank_leads_its_own_session() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let before = Snapshot::take();
    let child = cmpirun("mpich4")
        .args(["-n", "4"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", &sigint_rank(dir.path())])
        .spawn();
    wait_ready(dir.path(), 4);
    // Everything the ranks write while they handle the signal must arrive, also under load.
    let _load = Load::start(&[&staged_image("mpich4")]);
    // Each rank its own session, as under hydra (the kernel's autogroup gives each its share).
    // The ranks' pids come from their ready files: a scan for `sh` processes would also catch
    // a rank's child between its fork and its exec of `sleep`.
    let (cmpirun_session, _) = session_and_state(child.pid());
    let ranks: Vec<i32> = (0..4)
        .map(|r| {
            let f = dir.path().join(format!("ready.{r}"));
            std::fs::read_to_string(&f).unwrap().trim().parse().unwrap()
        })
        .collect();
    for pid in &ranks {
        let (session, _) = session_and_state(*pid);
        assert_eq!(session, *pid, "rank pid {pid} leads its session");
        assert_ne!(session, cmpirun_session);
    }
    child.signal(nix::sys::signal::Signal::SIGINT);
    let out = child.wait();
    out.assert_code(130);
    assert!(out.stderr.contains("received SIGINT"), "{out}");
    every_rank_got_sigint_once(&out);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn ctrl_c_on_the_terminal_reaches_every_rank_once() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let before = Snapshot::take();
    // `script` runs the job on a pseudo-terminal; ^C written to it makes the terminal send
    // SIGINT to its foreground process group, which the ranks are not in.
    let job = format!(
        "{} -n 4 {} /bin/sh -c {}",
        sq(&cmpirun_bin().to_string_lossy()),
        sq(&staged_image("mpich4").to_string_lossy()),
        sq(&sigint_rank(dir.path()))
    );
    let driver = format!(
        "(until [ \"$(ls {} | grep -c ready)\" -ge 4 ]; do sleep 0.1; done; printf '\\003') | \
         script -qfec {} /dev/null",
        sq(&dir.path().to_string_lossy()),
        sq(&job)
    );
    let _load = Load::start(&[&staged_image("mpich4")]);
    let out = TuserCommand::new("sh")
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(["-c", &driver])
        .run();
    out.assert_code(130);
    assert!(out.stdout.contains("received SIGINT"), "{out}");
    every_rank_got_sigint_once(&out);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn under_nohup_sighup_neither_ends_the_job_nor_reaches_the_ranks() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let before = Snapshot::take();
    // `nohup` ignores SIGHUP and runs cmpirun in its place (the pid stays the same).
    let child = TuserCommand::new("nohup")
        .arg(cmpirun_bin())
        .args(["-n", "2"])
        .arg(staged_image("mpich4"))
        .args([
            "/bin/sh",
            "-c",
            &format!(
                "touch {}/ready.$PMI_RANK; sleep 3; echo \"rank $PMI_RANK ran to its end\"",
                dir.path().display()
            ),
        ])
        .spawn();
    wait_ready(dir.path(), 2);
    child.signal(nix::sys::signal::Signal::SIGHUP);
    let out = child.wait();
    out.assert_success();
    for r in 0..2 {
        assert!(
            out.stdout.contains(&format!("rank {r} ran to its end")),
            "{out}"
        );
    }
    assert!(!out.stderr.contains("SIGHUP"), "{out}");
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}

#[test]
fn sigtstp_stops_every_rank_and_sigcont_continues_them() {
    use nix::sys::signal::Signal;
    let _serial = exclusive();
    let before = Snapshot::take();
    let child = start_hanging_job();
    let sleeps: Vec<i32> = tagged_processes(child.tag())
        .into_iter()
        .filter(|p| p.comm == "sleep")
        .map(|p| p.pid)
        .collect();
    let states = |want: char| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now: Vec<char> = sleeps.iter().map(|p| session_and_state(*p).1).collect();
            if now.iter().all(|s| *s == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rank states {now:?}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    child.signal(Signal::SIGTSTP);
    states('T');
    // cmpirun stops itself after it has stopped the ranks: wait for it too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while session_and_state(child.pid()).1 != 'T' {
        assert!(Instant::now() < deadline, "cmpirun did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.signal(Signal::SIGCONT);
    states('S');
    child.signal(Signal::SIGTERM);
    let out = child.wait();
    out.assert_code(143);
    assert_no_leftovers(&before, &[out.tag.as_str()]);
}
