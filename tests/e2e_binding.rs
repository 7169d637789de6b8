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

#[test]
fn each_rank_gets_the_cpus_asked_for() {
    let _serial = exclusive();
    // The machine has two cores (CPUs 0 and 1).
    if all_cpus() != "0-1" {
        eprintln!("skipped: this test expects CPUs 0-1, found {}", all_cpus());
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
    if all_cpus() != "0-1" {
        eprintln!("skipped: this test expects CPUs 0-1, found {}", all_cpus());
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
