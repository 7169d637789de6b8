//! End-to-end tests of the slurm launcher on the one-node test cluster (`ci/start-slurm.sh`):
//! cmpirun inside `salloc` launches through `srun`, every task is `cmpirun __rank`, and all ranks
//! of a node share one container.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// The per-user rendezvous directory of node instances (`/tmp/cmpirun-UID`) persists by design,
/// like `$XDG_RUNTIME_DIR`; it is made before a snapshot so that it does not count as a leftover.
fn runtime_dir() -> String {
    let dir = format!("/tmp/cmpirun-{}", tuser().uid);
    TuserCommand::new("mkdir")
        .args(["-p", "-m", "700", &dir])
        .run()
        .assert_success();
    dir
}

/// `salloc -n N cmpirun -n N FLAGS IMAGE PROGRAM ARGS` as the test user.
fn salloc(n: u32, flags: &[&str], image: &str, program: &str, args: &[&str]) -> RunOutput {
    TuserCommand::new("salloc")
        .slurm()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
        .args(["-n", &n.to_string()])
        .arg(cmpirun_bin())
        .args(["-n", &n.to_string()])
        .args(flags)
        .arg(staged_image(image))
        .arg(program)
        .args(args)
        .run()
}

/// Checks an mpitest run of `n` ranks: passed, one container for all.
fn check_mpitest(out: &RunOutput, n: u32) {
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("mpitest: OK size={n}")),
        "{out}"
    );
    let ns: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.contains("hello: rank="))
        .map(|l| {
            l.split_whitespace()
                .filter(|w| w.starts_with("userns=") || w.starts_with("mntns="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(ns.len(), n as usize, "{out}");
    assert_eq!(
        ns.iter().collect::<BTreeSet<_>>().len(),
        1,
        "one container:\n{out}"
    );
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

#[test]
fn a_failing_rank_ends_the_step_and_leaves_nothing() {
    let _serial = exclusive();
    let runtime = runtime_dir();
    let before = Snapshot::take();
    let out = salloc(
        4,
        &["--pmi", "pmi2"],
        "mpich4",
        "/usr/local/bin/abort",
        &["exit", "3"],
    );
    assert!(!out.timed_out && !out.success(), "{out}");
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
