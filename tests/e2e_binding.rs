//! CPU binding under the local launcher, with real ranks in a real image run as the test user:
//! each rank reads its own `Cpus_allowed_list` from `/proc/self/status`, which must be what
//! `--bind-to`/`--cpus-per-rank` asked for, within the CPUs cmpirun itself may use (here narrowed
//! with `taskset`, as a cgroup cpuset or a Slurm step would), and what `--report-bindings` said.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const SHOW: &str = "echo \"cpus $PMI_RANK $(grep Cpus_allowed_list /proc/self/status | cut -f2)\"";

/// Runs `[taskset -c CPUS] cmpirun -n N FLAGS mpich4 /bin/sh -c SHOW` and returns each rank's
/// CPU list, with the output.
fn cpus_of_ranks(
    taskset: Option<&str>,
    n: u32,
    flags: &[&str],
) -> (BTreeMap<u32, String>, RunOutput) {
    let cmd = match taskset {
        Some(cpus) => TuserCommand::new("taskset")
            .args(["-c", cpus])
            .arg(cmpirun_bin()),
        None => TuserCommand::cmpirun(),
    };
    let out = cmd
        .timeout(Duration::from_secs(120))
        .args(["-n", &n.to_string()])
        .args(flags)
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", SHOW])
        .run();
    let mut cpus = BTreeMap::new();
    for line in out.stdout.lines() {
        let mut w = line.split_whitespace();
        if let (Some("cpus"), Some(r), Some(list)) = (w.next(), w.next(), w.next()) {
            cpus.insert(r.parse().unwrap(), list.to_owned());
        }
    }
    (cpus, out)
}

/// The CPUs this machine lets the tests use, as the kernel writes the list.
fn all_cpus() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Whether the tests may use CPUs 0-1, the two cores of the test machine; says why not.
fn two_cpus() -> bool {
    let cpus = all_cpus();
    if cpus != "0-1" {
        eprintln!("skipped: this test expects CPUs 0-1, found {cpus}");
    }
    cpus == "0-1"
}

#[test]
fn each_rank_gets_the_cpus_asked_for() {
    let _serial = exclusive();
    // The machine has two cores (CPUs 0 and 1).
    if !two_cpus() {
        return;
    }
    let (cpus, out) = cpus_of_ranks(None, 2, &["--bind-to", "core", "--report-bindings"]);
    out.assert_success();
    assert_eq!(
        cpus,
        BTreeMap::from([(0, "0".into()), (1, "1".into())]),
        "{out}"
    );
    for (r, c) in &cpus {
        assert!(
            out.stderr.contains(&format!("cmpirun: rank {r} on "))
                && out.stderr.contains(&format!(" bound to CPUs {c}\n")),
            "{out}"
        );
    }
    // Two cores for one rank, in both spellings.
    for flags in [&["--cpus-per-rank", "2"][..], &["--map-by", "slot:PE=2"]] {
        let (cpus, out) = cpus_of_ranks(None, 1, flags);
        out.assert_success();
        assert_eq!(
            cpus,
            BTreeMap::from([(0, "0-1".into())]),
            "{flags:?}: {out}"
        );
    }
    // A socket holds both cores; hardware threads are the cores here.
    let (cpus, out) = cpus_of_ranks(None, 2, &["--bind-to", "socket"]);
    out.assert_success();
    assert_eq!(cpus.values().collect::<Vec<_>>(), ["0-1", "0-1"], "{out}");
    let (cpus, out) = cpus_of_ranks(None, 2, &["-bind-to", "hwthread"]);
    out.assert_success();
    assert_eq!(cpus.values().collect::<Vec<_>>(), ["0", "1"], "{out}");
    // Not bound: every CPU, and --report-bindings says so.
    let (cpus, out) = cpus_of_ranks(None, 2, &["--bind-to", "none", "--report-bindings"]);
    out.assert_success();
    assert_eq!(cpus.values().collect::<Vec<_>>(), ["0-1", "0-1"], "{out}");
    assert!(
        out.stderr.contains("not bound (it may run on CPUs 0-1)"),
        "{out}"
    );
}

#[test]
fn binding_stays_within_the_cpus_cmpirun_may_use() {
    let _serial = exclusive();
    if !two_cpus() {
        return;
    }
    // cmpirun may use CPU 1 only (as a cpuset or a Slurm step would leave it).
    let (cpus, out) = cpus_of_ranks(Some("1"), 1, &["--bind-to", "core"]);
    out.assert_success();
    assert_eq!(cpus, BTreeMap::from([(0, "1".into())]), "{out}");
    let (cpus, out) = cpus_of_ranks(Some("1"), 2, &[]);
    out.assert_success();
    assert_eq!(cpus.values().collect::<Vec<_>>(), ["1", "1"], "{out}");
    // More cores than it may use: refused before anything starts, saying what to do.
    let (cpus, out) = cpus_of_ranks(Some("1"), 2, &["--bind-to", "core"]);
    out.assert_code(2);
    assert!(cpus.is_empty(), "{out}");
    assert!(
        out.stderr.contains("needs 2 cores for 2 rank(s)")
            && out.stderr.contains("use 1 (1)")
            && out.stderr.contains("--bind-to none"),
        "{out}"
    );
}

#[test]
fn overload_puts_several_ranks_on_each_core() {
    let _serial = exclusive();
    if !two_cpus() {
        return;
    }
    // Four ranks bound to cores on two: each rank one core, two ranks per core, as Open MPI
    // binds with overload allowed; -v says so.
    for flags in [
        &["--bind-to", "core:overload-allowed", "-v"][..],
        &[
            "--oversubscribe",
            "--bind-to",
            "core:overload-allowed",
            "-v",
        ],
    ] {
        let (cpus, out) = cpus_of_ranks(None, 4, flags);
        out.assert_success();
        assert_eq!(
            cpus.values().collect::<Vec<_>>(),
            ["0", "1", "0", "1"],
            "{flags:?}: {out}"
        );
        assert!(
            out.stderr.contains("overload allowed: 4 rank(s)")
                && out.stderr.contains("up to 2 rank(s) per core"),
            "{flags:?}: {out}"
        );
    }
    // --oversubscribe alone is about slots: binding 4 ranks to 2 cores is refused, as Open MPI
    // 4.1 refuses it, with the modifier that allows it.
    let (cpus, out) = cpus_of_ranks(None, 4, &["--oversubscribe", "--bind-to", "core"]);
    out.assert_code(2);
    assert!(cpus.is_empty(), "{out}");
    assert!(
        out.stderr.contains("needs 4 cores for 4 rank(s)")
            && out.stderr.contains("--bind-to core:overload-allowed"),
        "{out}"
    );
}

#[test]
fn hydra_s_cache_and_machine_objects_bind() {
    let _serial = exclusive();
    if !two_cpus() {
        return;
    }
    // This machine: one L3 over both cores, an L2 and an L1 per core.
    for (bind, want) in [
        ("l3cache", ["0-1", "0-1"]),
        ("l2cache", ["0", "1"]),
        ("l1dcache", ["0", "1"]),
        ("machine", ["0-1", "0-1"]),
        ("rr", ["0", "1"]),
        ("user:1,0", ["1", "0"]),
    ] {
        let (cpus, out) = cpus_of_ranks(None, 2, &["-bind-to", bind]);
        out.assert_success();
        assert_eq!(cpus.values().collect::<Vec<_>>(), want, "{bind}: {out}");
        assert!(!out.stderr.contains("WARN"), "{bind}: {out}");
    }
}

/// A rankfile readable by the test user, in a folder it owns.
fn rankfile(dir: &TuserDir, text: &str) -> String {
    let path = dir.path().join("rankfile");
    std::fs::write(&path, text).unwrap();
    chown_to_tuser(&path);
    path.to_str().unwrap().to_owned()
}

#[test]
fn a_rankfile_binds_each_rank_to_its_slots() {
    let _serial = exclusive();
    if !two_cpus() {
        return;
    }
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let dir = TuserDir::new();
    // Socket 0's core 1, core 0 by its node-wide number, the whole socket.
    let rf = rankfile(
        &dir,
        &format!(
            "# three ranks\nrank 0={host} slot=0:1\nrank 1=localhost slot=0\nrank 2={host} slot=0:*\n"
        ),
    );
    let (cpus, out) = cpus_of_ranks(None, 3, &["--rankfile", &rf, "--report-bindings"]);
    out.assert_success();
    let want = BTreeMap::from([(0, "1".into()), (1, "0".into()), (2, "0-1".into())]);
    assert_eq!(cpus, want, "{out}");
    assert!(out.stderr.contains(" bound to CPUs 0-1\n"), "{out}");
    assert!(!out.stderr.contains("WARN"), "{out}");
    // Without -n the rankfile's ranks are the job, as in Open MPI.
    let out = TuserCommand::cmpirun()
        .timeout(Duration::from_secs(120))
        .args(["--rankfile", &rf])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", SHOW])
        .run();
    out.assert_success();
    assert_eq!(out.stdout.matches("cpus ").count(), 3, "{out}");
    // Another host under the local launcher, a core this node lacks, a rank without a line:
    // each refused before any rank starts, naming the file and line.
    for (text, n, message) in [
        (
            format!("rank 0={host} slot=0\nrank 1=elsewhere slot=1\n"),
            2,
            format!("{rf}:2: rank 1 is placed on elsewhere, which is not this host"),
        ),
        (
            "rank 0=localhost slot=0:5\n".to_owned(),
            1,
            format!("{rf}:1: slot=0:5: socket 0 has no core 5"),
        ),
        (
            "rank 0=localhost slot=0\n".to_owned(),
            2,
            format!("{rf}: no line for rank 1 (the job has 2 rank(s))"),
        ),
    ] {
        rankfile(&dir, &text);
        let (cpus, out) = cpus_of_ranks(None, n, &["--rankfile", &rf]);
        out.assert_code(2);
        assert!(cpus.is_empty(), "{out}");
        assert!(out.stderr.contains(&message), "{message}: {out}");
    }
}
